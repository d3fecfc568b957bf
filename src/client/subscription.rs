//! A live subscription: the room's mirror (read any time, without waiting) and the
//! stream of [`RoomEvent`]s that changed it.
//!
//! The connection task writes the mirror and sends events; a [`Subscription`] only
//! reads. The mirror is updated *before* the event that describes the change is sent,
//! so after `next()` returns an event up to seq `n`, `seq()` is at least `n`.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::RwLock;
use tokio::sync::mpsc;

use super::driver::Command;
use super::mirror::Mirror;
use crate::protocol::codes::Code;
use crate::value::Value;

/// One changed entry: `value: None` is a deleted key.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub key: String,
    pub value: Option<Value>,
    /// The seq of the event that last changed the key.
    pub ver: u64,
}

/// One member of a room in a presence list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user: String,
    /// The member's open connections subscribed to the room.
    pub conns: u32,
}

/// A presence frame (only for subscriptions made with `presence: true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    /// The full member list, sent after every snapshot and resume.
    Members(Vec<Member>),
    /// Users who joined or left since the last presence frame.
    Change {
        join: Vec<String>,
        leave: Vec<String>,
    },
}

/// What happened to a subscribed room, in the order the server said it.
#[derive(Debug, Clone, PartialEq)]
pub enum RoomEvent {
    /// The mirror was replaced by a full snapshot: the first event of every
    /// subscription, and after a resume the server could not serve (another epoch,
    /// history no longer held). Read the entries from the mirror.
    Snapshot {
        epoch: u64,
        seq: u64,
        recovered: bool,
    },
    /// After a reconnect or a detected gap, the server caught the mirror up without a
    /// snapshot: `changes` are the entries changed in `from..=to`, at their latest value.
    Resumed {
        epoch: u64,
        from: u64,
        to: u64,
        changes: Vec<Change>,
    },
    /// A live batch: the entries changed by events `from..=to`, coalesced.
    Diff {
        from: u64,
        to: u64,
        changes: Vec<Change>,
    },
    Presence(Presence),
    /// A member's ephemeral message.
    Signal {
        user: String,
        data: Value,
    },
    /// An `error` frame about this room (e.g. a signal that was `too_large`). With
    /// `not_found` the room is gone: the subscription ends after this event.
    Error {
        code: Code,
        msg: String,
    },
    /// `missed` events were dropped here because the subscription's channel was full.
    /// The mirror is complete regardless; read it to catch up.
    Lagged {
        missed: u64,
    },
}

/// A key's value and `ver`.
pub type Entry = (Value, u64);

/// A subscription to one room. Dropping it unsubscribes.
///
/// Events arrive through a channel bounded by
/// [`Options::event_buffer`](super::Options::event_buffer). If the holder does not
/// read fast enough and the channel is full, the mirror keeps updating, the events
/// that do not fit are dropped, and a [`RoomEvent::Lagged`] with their count is
/// delivered where they were missing as soon as there is room for it (and for the
/// event that follows it). The connection task never waits for a subscriber.
pub struct Subscription {
    pub(crate) room: String,
    /// Tells this subscription from a later one to the same room, for `Unsubscribe`.
    pub(crate) sub_id: u64,
    /// Written by the connection task; read by the accessors below.
    pub(crate) mirror: Arc<RwLock<Mirror>>,
    pub(crate) events: mpsc::Receiver<RoomEvent>,
    /// For `unsubscribe`; holding it keeps the connection alive.
    pub(crate) commands: mpsc::Sender<Command>,
    /// Set by `unsubscribe` so that drop does not send a second `Unsubscribe`.
    pub(crate) unsubscribed: bool,
}

impl Subscription {
    pub fn room(&self) -> &str {
        &self.room
    }

    /// The next event, or `None` once the subscription has ended (unsubscribed, the
    /// room was deleted, or the client closed).
    pub async fn next(&mut self) -> Option<RoomEvent> {
        self.events.recv().await
    }

    /// The next event if one is waiting.
    pub fn try_next(&mut self) -> Option<RoomEvent> {
        self.events.try_recv().ok()
    }

    /// A copy of every entry in the mirror.
    pub fn entries(&self) -> BTreeMap<String, Entry> {
        self.mirror.read().entries.clone()
    }

    /// Reads the mirror in place, without copying it. Keep `f` short: the connection
    /// task waits for it before it can apply the next change.
    pub fn with_entries<R>(&self, f: impl FnOnce(&BTreeMap<String, Entry>) -> R) -> R {
        f(&self.mirror.read().entries)
    }

    /// One entry of the mirror.
    pub fn get(&self, key: &str) -> Option<Entry> {
        self.mirror.read().entries.get(key).cloned()
    }

    /// The seq the mirror is at.
    pub fn seq(&self) -> u64 {
        self.mirror.read().seq
    }

    /// The epoch the mirror's seq belongs to.
    pub fn epoch(&self) -> u64 {
        self.mirror.read().epoch
    }

    /// The room kind (`chat`, `poll`, `state`).
    pub fn kind(&self) -> String {
        self.mirror.read().kind.clone()
    }

    /// Stops the subscription (sends `unsub` when connected) and waits until the
    /// connection task has taken the request.
    pub async fn unsubscribe(mut self) {
        self.unsubscribed = true;
        let _ = self
            .commands
            .send(Command::Unsubscribe {
                room: self.room.clone(),
                sub_id: self.sub_id,
            })
            .await;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if !self.unsubscribed {
            // A full command channel drops this request; the connection task then
            // notices the closed event channel at the room's next event and unsubscribes
            // there instead.
            let _ = self.commands.try_send(Command::Unsubscribe {
                room: self.room.clone(),
                sub_id: self.sub_id,
            });
        }
    }
}

impl futures_util::Stream for Subscription {
    type Item = RoomEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<RoomEvent>> {
        self.events.poll_recv(cx)
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mirror = self.mirror.read();
        f.debug_struct("Subscription")
            .field("room", &self.room)
            .field("epoch", &mirror.epoch)
            .field("seq", &mirror.seq)
            .field("entries", &mirror.entries.len())
            .finish()
    }
}

/// The connection task's end of a subscription's event channel.
pub(crate) struct EventSink {
    tx: mpsc::Sender<RoomEvent>,
    /// Events dropped since the last one delivered; owed as a `Lagged` marker.
    missed: u64,
}

impl EventSink {
    pub(crate) fn new(tx: mpsc::Sender<RoomEvent>) -> EventSink {
        EventSink { tx, missed: 0 }
    }

    /// Delivers `event` without waiting. When the channel is full the event is counted
    /// as missed; the next delivery that finds room for two sends the `Lagged` marker
    /// first. Returns false when the subscriber is gone.
    pub(crate) fn deliver(&mut self, event: RoomEvent) -> bool {
        use mpsc::error::TrySendError;
        if self.missed == 0 {
            return match self.tx.try_send(event) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    self.missed = 1;
                    true
                }
                Err(TrySendError::Closed(_)) => false,
            };
        }
        match self.tx.try_reserve_many(2) {
            Ok(mut permits) => {
                let missed = std::mem::take(&mut self.missed);
                // `try_reserve_many(2)` returned exactly two permits.
                if let Some(permit) = permits.next() {
                    permit.send(RoomEvent::Lagged { missed });
                }
                if let Some(permit) = permits.next() {
                    permit.send(event);
                }
                true
            }
            // Also what a channel smaller than two answers, closed or not.
            Err(TrySendError::Full(())) => {
                self.missed += 1;
                !self.tx.is_closed()
            }
            Err(TrySendError::Closed(())) => false,
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diff(n: u64) -> RoomEvent {
        RoomEvent::Diff {
            from: n,
            to: n,
            changes: vec![],
        }
    }

    #[test]
    fn a_full_channel_drops_events_and_marks_the_place() {
        let (tx, mut rx) = mpsc::channel(2);
        let mut sink = EventSink::new(tx);
        for n in 1..=5 {
            assert!(sink.deliver(diff(n)));
        }
        assert_eq!(rx.try_recv().ok(), Some(diff(1)));
        assert_eq!(rx.try_recv().ok(), Some(diff(2)));
        assert!(rx.try_recv().is_err());
        assert!(sink.deliver(diff(6)));
        assert_eq!(rx.try_recv().ok(), Some(RoomEvent::Lagged { missed: 3 }));
        assert_eq!(rx.try_recv().ok(), Some(diff(6)));
        drop(rx);
        assert!(!sink.deliver(diff(7)));
    }
}
