//! A room's feed: the diffs of a room owned here, published once per batch on the
//! room's subject for every node that has subscribers in it, and the wire format of
//! that message (read by [`super::mirror`] on those nodes).
//!
//! Rooms hand their diffs to the process's tap (`room::tap`) while some of their
//! subscribers are relayed, that is while some other node has subscribers in the room
//! (relays expire when their node stops pinging, see [`super::relay`]). One task drains
//! the tap and publishes each item on `{cluster}.room.{hex of the room id}`: room ids
//! may hold characters a NATS subject cannot (`.`, `*`, `>`), so the subject carries the
//! id in hex and the message carries it as it is.
//!
//! A message is binary, big endian:
//!
//! ```text
//! u8 version (1) | u8 what (0 diff, 1 deleted) | u64 epoch | u64 from | u64 to
//! u16 room length | room
//! u16 views | per view: u16 user length (0xFFFF: the public view) | user
//!                       u32 frame length | the view's `diff` as the rkyv ServerMsg
//! ```
//!
//! The public view comes first; a user named in an audience whose view differs from
//! the public one has a view of its own (`room::views`), so a batch of an rps room with
//! 10,000 spectators is three views, not 10,002. The frames are the contract's rkyv
//! encoding, so a receiving node validates them like any untrusted frame and hands
//! them to rkyv clients as they are.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::protocol::message::ServerMsg;
use crate::room::registry::Registry;
use crate::room::tap::{Tap, TapView, Tapped};

/// The feed format's version byte.
const VERSION: u8 = 1;
const PUBLIC: u16 = u16::MAX;
const WHAT_DIFF: u8 = 0;
const WHAT_DELETED: u8 = 1;

/// `{cluster}.room.{hex of room_id}`.
pub fn room_subject(cluster: &str, room_id: &str) -> String {
    let mut subject = String::with_capacity(cluster.len() + 6 + 2 * room_id.len());
    subject.push_str(cluster);
    subject.push_str(".room.");
    for byte in room_id.bytes() {
        subject.push_str(&format!("{byte:02x}"));
    }
    subject
}

/// Installs the tap on `registry` and starts publishing what rooms hand it.
pub fn start(client: async_nats::Client, cluster: String, registry: &Registry) {
    let (tap, rx) = Tap::new();
    registry.set_tap(tap);
    actix_rt::spawn(publish(client, cluster, rx));
}

async fn publish(client: async_nats::Client, cluster: String, mut rx: mpsc::Receiver<Tapped>) {
    while let Some(item) = rx.recv().await {
        let room = match &item {
            Tapped::Diff { room, .. } | Tapped::Deleted { room } => room.to_string(),
        };
        let payload = encode(&item);
        let hot = crate::metrics::hot();
        hot.cluster_feed_messages.increment(1);
        hot.cluster_feed_bytes.increment(payload.len() as u64);
        // A publish fails only while NATS is away: the nodes see the gap and catch up.
        let _ = client.publish(room_subject(&cluster, &room), payload).await;
    }
}

/// One feed message, read and checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Fed {
    Diff {
        room: String,
        epoch: u64,
        from: u64,
        to: u64,
        /// (user, the view's `diff`, its rkyv bytes as published); public first.
        views: Vec<FedView>,
    },
    Deleted {
        room: String,
    },
}

/// One view of a fed diff.
#[derive(Debug, Clone, PartialEq)]
pub struct FedView {
    pub user: Option<String>,
    pub msg: ServerMsg,
    /// The rkyv frame as published: rkyv clients get it as it is.
    pub rkyv: Bytes,
}

/// Encodes one tapped item.
pub fn encode(item: &Tapped) -> Bytes {
    let mut out = BytesMut::with_capacity(256);
    out.put_u8(VERSION);
    match item {
        Tapped::Diff {
            room,
            epoch,
            from,
            to,
            views,
        } => {
            out.put_u8(WHAT_DIFF);
            out.put_u64(*epoch);
            out.put_u64(*from);
            out.put_u64(*to);
            put_str16(&mut out, room);
            // At most one view per audience user and one public: far below u16::MAX
            // for any audience a kind makes; more are cut (their viewers then get the
            // public view, which never holds a hidden entry).
            let views: Vec<&TapView> = views.iter().take(usize::from(PUBLIC) - 1).collect();
            out.put_u16(views.len() as u16);
            for view in views {
                match &view.user {
                    None => out.put_u16(PUBLIC),
                    Some(user) => put_str16(&mut out, user),
                }
                let frame = crate::protocol::binary::encode(&view.msg);
                out.put_u32(frame.len() as u32);
                out.put_slice(&frame);
            }
        }
        Tapped::Deleted { room } => {
            out.put_u8(WHAT_DELETED);
            out.put_u64(0);
            out.put_u64(0);
            out.put_u64(0);
            put_str16(&mut out, room);
            out.put_u16(0);
        }
    }
    out.freeze()
}

/// Room ids (at most 128 bytes) and user ids (at most 128 bytes) fit a u16 length.
fn put_str16(out: &mut BytesMut, text: &str) {
    let bytes = &text.as_bytes()[..text.len().min(usize::from(PUBLIC) - 1)];
    out.put_u16(bytes.len() as u16);
    out.put_slice(bytes);
}

/// Why a feed message was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FeedError {
    #[error("feed message of {0} bytes ends early")]
    Short(usize),
    #[error("feed version {0}, this node reads {VERSION}")]
    Version(u8),
    #[error("feed message: {0}")]
    Bad(String),
}

/// Reads one feed message; every view must be a `diff` of the message's room, epoch,
/// from and to.
pub fn decode(payload: &Bytes) -> Result<Fed, FeedError> {
    let mut reader = Reader {
        bytes: payload,
        at: 0,
    };
    let version = reader.u8()?;
    if version != VERSION {
        return Err(FeedError::Version(version));
    }
    let what = reader.u8()?;
    let (epoch, from, to) = (reader.u64()?, reader.u64()?, reader.u64()?);
    let room = reader.str16()?;
    let n_views = reader.u16()?;
    if what == WHAT_DELETED {
        return Ok(Fed::Deleted { room });
    }
    if what != WHAT_DIFF {
        return Err(FeedError::Bad(format!("unknown kind {what}")));
    }
    let mut views = Vec::with_capacity(usize::from(n_views).min(64));
    for _ in 0..n_views {
        let user = match reader.u16()? {
            PUBLIC => None,
            len => Some(reader.str(usize::from(len))?),
        };
        let len = reader.u32()? as usize;
        let rkyv = reader.take(len)?;
        let msg = crate::protocol::binary::decode_server(&rkyv)
            .map_err(|e| FeedError::Bad(e.to_string()))?;
        match &msg {
            ServerMsg::Diff {
                room: r,
                epoch: e,
                from: f,
                to: t,
                ..
            } if *r == room && (*e, *f, *t) == (epoch, from, to) => {}
            _ => return Err(FeedError::Bad("a view that is not the batch's diff".into())),
        }
        views.push(FedView { user, msg, rkyv });
    }
    if views.first().is_none_or(|v| v.user.is_some()) {
        return Err(FeedError::Bad("no public view first".into()));
    }
    Ok(Fed::Diff {
        room,
        epoch,
        from,
        to,
        views,
    })
}

struct Reader<'a> {
    bytes: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<Bytes, FeedError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(FeedError::Short(self.bytes.len()))?;
        let out = self.bytes.slice(self.at..end);
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FeedError> {
        let bytes = self.take(N)?;
        // `take` returned exactly N bytes.
        Ok(bytes[..].try_into().expect("N bytes"))
    }

    fn u8(&mut self) -> Result<u8, FeedError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, FeedError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, FeedError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, FeedError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn str(&mut self, len: usize) -> Result<String, FeedError> {
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| FeedError::Bad(e.to_string()))
    }

    fn str16(&mut self) -> Result<String, FeedError> {
        let len = self.u16()?;
        self.str(usize::from(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ids::RoomId;
    use crate::protocol::message::{WireEntry, WireValue};

    fn diff(entries: &[(&str, i64)]) -> ServerMsg {
        ServerMsg::Diff {
            room: "rps:a.b".into(),
            epoch: 9,
            from: 4,
            to: 6,
            changes: entries
                .iter()
                .map(|(k, v)| WireEntry {
                    k: (*k).into(),
                    v: Some(WireValue::from_value(&crate::value::Value::Int(*v))),
                    ver: 6,
                })
                .collect(),
        }
    }

    #[test]
    fn a_fed_diff_reads_back_with_its_views_and_garbage_is_refused() {
        let item = Tapped::Diff {
            room: RoomId::parse("rps:a.b").expect("a valid id"),
            epoch: 9,
            from: 4,
            to: 6,
            views: vec![
                TapView {
                    user: None,
                    msg: diff(&[("round", 2)]),
                },
                TapView {
                    user: Some("alice".into()),
                    msg: diff(&[("move/alice", 1), ("round", 2)]),
                },
            ],
        };
        let bytes = encode(&item);
        let Ok(Fed::Diff {
            room, from, views, ..
        }) = decode(&bytes)
        else {
            panic!("did not read back: {:?}", decode(&bytes));
        };
        assert_eq!((room.as_str(), from), ("rps:a.b", 4));
        assert_eq!(views.len(), 2);
        assert_eq!(views[1].user.as_deref(), Some("alice"));
        assert_eq!(views[1].msg, diff(&[("move/alice", 1), ("round", 2)]));
        for cut in [0, 1, 10, bytes.len() - 1] {
            assert!(decode(&bytes.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut flipped = bytes.to_vec();
        flipped[0] = 7;
        assert_eq!(decode(&flipped.into()), Err(FeedError::Version(7)));
        assert_eq!(room_subject("c", "a.b"), "c.room.612e62");
    }
}
