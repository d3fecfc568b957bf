//! Rooms on their way to another node (`roomd cluster rebalance`): which rooms this
//! node must stop serving, and the [`Freeze`] that empties a room's actor before its
//! rows are copied.
//!
//! Two sets, both written by the cluster's rebalance and read by every Room actor on
//! each request:
//! - *frozen* rooms refuse everything (ops, creates, subscriptions, reads, deletes) with
//!   [`RoomError::Moving`] (`unavailable`): a client re-sends with the same op id, or
//!   subscribes again with `since`, and is served by the room's owner once the move is
//!   over (the new one after a commit, the old one after a rollback);
//! - while a move is pending, *leaving* rooms (those whose owner changes from this
//!   node) that do not exist yet refuse their creation, so no room appears here after
//!   the move listed what to copy.
//!
//! The move lists the rooms to copy from the store and from the running actors
//! ([`Holds`]): a room whose creation was accepted just before the move began is not in
//! the store until that creation commits, but its actor holds it already.
//!
//! Nothing here knows about NATS or the member list: the cluster decides, the rooms obey.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use dashmap::DashSet;
use parking_lot::RwLock;

use super::{Room, RoomError};
use crate::outbound::Charge;

/// Decides whether a room id leaves this node in the pending move.
pub type Leaving = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The rooms this node must not serve now (one per registry).
#[derive(Default)]
pub struct Moving {
    frozen: DashSet<String>,
    /// `frozen.len()`, kept beside it so the check every request makes costs one load
    /// while nothing is frozen (`DashSet::is_empty` locks every shard).
    n_frozen: AtomicUsize,
    leaving: RwLock<Option<Leaving>>,
}

impl Moving {
    /// Freezes `room`. Its actor learns it at its next request: the caller then sends
    /// it [`Freeze`] (a message, so the actor sees the count raised here).
    pub fn freeze(&self, room: &str) {
        if self.frozen.insert(room.to_owned()) {
            self.n_frozen.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub fn thaw(&self, room: &str) {
        if self.frozen.remove(room).is_some() {
            self.n_frozen.fetch_sub(1, Ordering::SeqCst);
        }
    }

    pub fn is_frozen(&self, room: &str) -> bool {
        self.n_frozen.load(Ordering::SeqCst) != 0 && self.frozen.contains(room)
    }

    /// Sets (Some) or clears (None) the rooms whose creation is refused.
    pub fn set_leaving(&self, leaving: Option<Leaving>) {
        *self.leaving.write() = leaving;
    }

    /// Whether creating `room` here is refused now.
    pub fn refuses_create(&self, room: &str) -> bool {
        self.is_frozen(room) || self.leaving.read().as_ref().is_some_and(|f| f(room))
    }
}

/// Empties a frozen room's actor: its subscribers are told `unavailable` (they subscribe
/// again with `since`) and dropped, and once nothing is in flight (no batch, snapshot,
/// trim or deletion) the actor stops. True when it stopped; the caller asks again until
/// then. The store then holds everything that was acked.
#[derive(Message, Clone, Copy)]
#[rtype(result = "bool")]
pub struct Freeze;

impl Handler<Freeze> for Room {
    type Result = bool;

    fn handle(&mut self, _msg: Freeze, ctx: &mut Context<Self>) -> bool {
        // What was committed reaches the subscribers before they are told to go, so
        // their `since` is as fresh as it can be.
        self.send_unsent();
        let gone = self.error_msg(&RoomError::Moving(self.room_id.clone()));
        for (_, sub) in self.subscribers.drain() {
            sub.session.evict(&self.room_id);
            sub.session.send(&gone, Charge::Full);
        }
        for sub in self.deferred_subs.drain(..) {
            sub.session.send(&gone, Charge::Full);
        }
        self.presence = Default::default();
        let stopped = self.is_unused();
        if stopped {
            ctx.stop();
        }
        stopped
    }
}

/// Whether the room exists on this node, counting a creation accepted but not yet
/// committed (the store does not list such a room yet). A loading actor answers once
/// its load ends.
#[derive(Message, Clone, Copy)]
#[rtype(result = "bool")]
pub struct Holds;

impl Handler<Holds> for Room {
    type Result = bool;

    fn handle(&mut self, _msg: Holds, _ctx: &mut Context<Self>) -> bool {
        matches!(self.status, super::Status::Live(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_rooms_are_counted_once_and_thawed_once() {
        let moving = Moving::default();
        assert!(!moving.is_frozen("state:a"));
        moving.freeze("state:a");
        moving.freeze("state:a");
        moving.freeze("state:b");
        assert!(moving.is_frozen("state:a") && moving.is_frozen("state:b"));
        assert!(!moving.is_frozen("state:c"));
        moving.thaw("state:a");
        moving.thaw("state:a");
        moving.thaw("state:c");
        assert!(!moving.is_frozen("state:a"));
        assert!(moving.is_frozen("state:b"));
        moving.thaw("state:b");
        assert!(!moving.is_frozen("state:b"));
        assert_eq!(moving.n_frozen.load(Ordering::SeqCst), 0);
    }
}
