//! The `roomd.v1.rkyv` codec: one validated rkyv archive per binary frame.
//!
//! Frames arrive unaligned from the socket; the `unaligned` format feature makes that
//! safe, and `rkyv::access` validates every byte (bytecheck) before anything is read.
//! Values are flat (see [`WireValue`](super::message::WireValue)), so validation depth does not grow with nesting.

use bytes::Bytes;
use rkyv::rancor::Error as RkyvError;

use super::message::{ClientMsg, ServerMsg};
use super::{BadFrame, Inbound, Since};

/// Decodes one client binary frame (already bounded in size by the frame guard).
pub fn decode(frame: &[u8]) -> Result<Inbound, BadFrame> {
    let archived = rkyv::access::<rkyv::Archived<ClientMsg>, RkyvError>(frame)
        .map_err(|e| BadFrame(format!("not a valid rkyv ClientMsg: {e}")))?;
    let msg: ClientMsg = rkyv::deserialize::<ClientMsg, RkyvError>(archived)
        .map_err(|e| BadFrame(format!("rkyv ClientMsg does not deserialize: {e}")))?;
    Ok(match msg {
        ClientMsg::Create {
            id,
            room,
            kind,
            init,
        } => Inbound::Create {
            id,
            room,
            kind,
            init: init.to_value(),
        },
        ClientMsg::Sub {
            room,
            presence,
            since,
        } => Inbound::Sub {
            room,
            presence,
            since: since.map(|s| Since {
                epoch: Some(s.epoch),
                seq: Some(s.seq),
            }),
        },
        ClientMsg::Unsub { room } => Inbound::Unsub { room },
        ClientMsg::Op { id, room, op } => Inbound::Op {
            id,
            room,
            op: op.to_value(),
        },
        ClientMsg::Signal { room, data } => Inbound::Signal {
            room,
            data: data.to_value(),
        },
        ClientMsg::Auth { token } => Inbound::Auth { token },
    })
}

/// Encodes one server message as a binary frame.
pub fn encode(msg: &ServerMsg) -> Bytes {
    // Serializing into a growable buffer has no failure mode for these types.
    let bytes = rkyv::to_bytes::<RkyvError>(msg).expect("rkyv serialization into memory");
    Bytes::from(bytes.into_vec())
}

/// Encodes one server message into `out` (cleared first), the same bytes as
/// [`encode`]: for a buffer reused across many messages.
pub fn encode_into(msg: &ServerMsg, out: &mut Vec<u8>) {
    let mut buffer = std::mem::take(out);
    buffer.clear();
    // The format is unaligned (alignment 1 throughout), so a plain Vec holds the archive
    // as well as an aligned one; serializing into memory cannot fail.
    *out = rkyv::api::high::to_bytes_in::<_, RkyvError>(msg, buffer)
        .expect("rkyv serialization into memory");
}

/// Encodes a client message; used by clients, fixtures and tests.
pub fn encode_client(msg: &ClientMsg) -> Bytes {
    // Same as `encode`: in-memory serialization cannot fail.
    let bytes = rkyv::to_bytes::<RkyvError>(msg).expect("rkyv serialization into memory");
    Bytes::from(bytes.into_vec())
}

/// Decodes a server message (for clients); validated like every untrusted input.
pub fn decode_server(frame: &[u8]) -> Result<ServerMsg, BadFrame> {
    rkyv::from_bytes::<ServerMsg, RkyvError>(frame)
        .map_err(|e| BadFrame(format!("not a valid rkyv ServerMsg: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::{Node, WireValue};

    #[test]
    fn garbage_is_a_bad_frame_not_a_panic() {
        for frame in [&b""[..], b"\x00", &[0xff; 64], &[0; 3]] {
            assert!(decode(frame).is_err());
        }
    }

    #[test]
    fn encoding_into_a_reused_buffer_gives_the_same_bytes() {
        let mut buffer = b"left over".to_vec();
        for (id, seq) in [("c1", 1), ("a much longer op id, past the first", u64::MAX)] {
            let msg = ServerMsg::Ack { id: id.into(), seq };
            encode_into(&msg, &mut buffer);
            assert_eq!(buffer, encode(&msg).to_vec());
            assert_eq!(decode_server(&buffer).ok(), Some(msg));
        }
    }

    #[test]
    fn unaligned_frames_decode() {
        let msg = ClientMsg::Op {
            id: "c1".into(),
            room: "r".into(),
            op: WireValue {
                nodes: vec![Node::Int(3)],
            },
        };
        let bytes = encode_client(&msg);
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        assert!(decode(&shifted[1..]).is_ok());
    }
}
