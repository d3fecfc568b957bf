//! The `roomd.v1.rkyv` codec: one validated rkyv archive per binary frame.
//!
//! Frames arrive unaligned from the socket; the `unaligned` format feature makes that
//! safe, and `rkyv::access` validates every byte (bytecheck) before anything is read.
//! Values are flat (see [`WireValue`](super::message::WireValue)), so validation depth does not grow with nesting.

use bytes::Bytes;
use rkyv::rancor::Error as RkyvError;

use super::message::{ArchivedClientMsg, ClientMsg, ServerMsg};
use super::{BadFrame, Inbound, Since};

/// Decodes one client binary frame (already bounded in size by the frame guard). The
/// validated archive is read in place: its strings are copied once, into the request
/// and the domain value, with no owned `ClientMsg` in between.
pub fn decode(frame: &[u8]) -> Result<Inbound, BadFrame> {
    let archived = rkyv::access::<ArchivedClientMsg, RkyvError>(frame)
        .map_err(|e| BadFrame(format!("not a valid rkyv ClientMsg: {e}")))?;
    Ok(match archived {
        ArchivedClientMsg::Create {
            id,
            room,
            kind,
            init,
        } => Inbound::Create {
            id: id.as_str().to_owned(),
            room: room.as_str().to_owned(),
            kind: kind.as_str().to_owned(),
            init: init.to_value(),
        },
        ArchivedClientMsg::Sub {
            room,
            presence,
            since,
        } => Inbound::Sub {
            room: room.as_str().to_owned(),
            presence: *presence,
            since: since.as_ref().map(|s| Since {
                epoch: Some(s.epoch.to_native()),
                seq: Some(s.seq.to_native()),
            }),
        },
        ArchivedClientMsg::Unsub { room } => Inbound::Unsub {
            room: room.as_str().to_owned(),
        },
        ArchivedClientMsg::Op { id, room, op } => Inbound::Op {
            id: id.as_str().to_owned(),
            room: room.as_str().to_owned(),
            op: op.to_value(),
        },
        ArchivedClientMsg::Signal { room, data } => Inbound::Signal {
            room: room.as_str().to_owned(),
            data: data.to_value(),
        },
        ArchivedClientMsg::Auth { token } => Inbound::Auth {
            token: token.as_str().to_owned(),
        },
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

    /// The decoder before frames were read in place: the owned `ClientMsg` first.
    fn decode_owned(frame: &[u8]) -> Result<Inbound, BadFrame> {
        let msg = rkyv::from_bytes::<ClientMsg, RkyvError>(frame)
            .map_err(|e| BadFrame(format!("not a valid rkyv ClientMsg: {e}")))?;
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

    #[test]
    fn frames_read_in_place_decode_as_owned_ones_did() {
        let dirs = [
            concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/decode_rkyv"),
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rkyv/client"),
        ];
        let mut n = 0;
        for dir in dirs {
            let entries = std::fs::read_dir(dir).expect("the committed corpus is there");
            for entry in entries {
                let bytes = std::fs::read(entry.expect("a directory entry").path())
                    .expect("a committed file reads");
                assert_eq!(decode(&bytes), decode_owned(&bytes));
                n += 1;
            }
        }
        assert!(n > 40, "only {n} frames");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Arbitrary node lists, well-formed or not, as `op` frames.
        #[test]
        fn node_lists_read_in_place_decode_as_owned_ones_did(
            nodes in proptest::collection::vec(node(), 0..24),
        ) {
            let frame = encode_client(&ClientMsg::Op {
                id: "c1".into(),
                room: "r".into(),
                op: WireValue { nodes },
            });
            proptest::prop_assert_eq!(decode(&frame), decode_owned(&frame));
        }
    }

    fn node() -> impl proptest::strategy::Strategy<Value = Node> {
        use proptest::prelude::*;
        prop_oneof![
            Just(Node::Null),
            any::<bool>().prop_map(Node::Bool),
            any::<i64>().prop_map(Node::Int),
            prop_oneof![Just(f64::NAN), Just(f64::INFINITY), any::<f64>()].prop_map(Node::Float),
            prop_oneof![
                Just("$b64".to_owned()),
                Just("AAE=".to_owned()),
                "[a-c]{0,2}"
            ]
            .prop_map(Node::Str),
            proptest::collection::vec(any::<u8>(), 0..3).prop_map(Node::Bytes),
            (0u32..4).prop_map(Node::List),
            (0u32..4).prop_map(Node::Map),
            Just(Node::List(u32::MAX)),
        ]
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
