//! A room's diffs for other nodes (cluster mode): each diff a room sends is also handed,
//! once, with every distinct view inside, to one tap per process, while some of the
//! room's subscribers are relayed (connections on other nodes, `cluster::relay`).
//!
//! The room knows nothing of NATS: it hands [`Tapped`] items to a bounded channel, and
//! the cluster publishes them (`cluster::feed`). A relayed subscriber itself gets no
//! diff from the room: its node fans the tapped diff out to it.
//!
//! Overflow policy: the channel holds [`TAP_CAPACITY`] items; when it is full the item is
//! dropped and counted. Nothing is lost for good: the subscribing nodes see the gap in
//! `from`/`to` and catch up from the room ([`messages::CatchUp`](super::messages::CatchUp)),
//! exactly as when NATS drops a message.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::protocol::ids::RoomId;
use crate::protocol::message::ServerMsg;

/// Tapped items waiting to be published, all rooms together.
pub const TAP_CAPACITY: usize = 4_096;

/// One view of a diff: the `diff` message for its viewers.
#[derive(Debug, Clone)]
pub struct TapView {
    /// None: the public view, for every viewer not named below it; Some: the view of
    /// one user named in an audience, sent only when it differs from the public one.
    pub user: Option<String>,
    pub msg: ServerMsg,
}

/// What a room hands to the tap.
#[derive(Debug, Clone)]
pub enum Tapped {
    /// A diff, once, with its distinct views (the public one first).
    Diff {
        room: RoomId,
        epoch: u64,
        from: u64,
        to: u64,
        views: Vec<TapView>,
    },
    /// The room was deleted; its relayed subscribers were told through their relays.
    Deleted { room: RoomId },
}

/// The sending side, shared by every room of the process (`Registry::set_tap`).
#[derive(Debug, Clone)]
pub struct Tap {
    tx: mpsc::Sender<Tapped>,
    dropped: Arc<AtomicU64>,
}

impl Tap {
    /// A tap and the receiver its publisher drains.
    pub fn new() -> (Tap, mpsc::Receiver<Tapped>) {
        let (tx, rx) = mpsc::channel(TAP_CAPACITY);
        let tap = Tap {
            tx,
            dropped: Arc::default(),
        };
        (tap, rx)
    }

    /// Hands an item over without waiting; a full channel drops it (see the module docs).
    pub fn send(&self, item: Tapped) {
        if self.tx.try_send(item).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(
                    dropped,
                    "cluster: tapped diffs dropped (publisher behind); subscribing nodes catch up"
                );
            }
        }
    }

    /// Items dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}
