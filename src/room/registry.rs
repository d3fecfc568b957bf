//! The room registry: room id -> `Addr<Room>` and the room's backlog bound, where new
//! rooms are started, and how ops are handed to them ([`Registry::deliver`]).
//!
//! Architecture invariant: the map holds addresses, never room state, and no map guard
//! lives across an await or an actor send (DashMap shards are locked only inside the
//! synchronous calls below). Beside each address it keeps the room's backlog semaphore
//! (`backlog.rs`): flow control every sender must reach before the room, not state
//! anything reads, so it lives where the senders look the room up. DESIGN.md's
//! registry line (`DashMap<RoomId, Addr<Room>>`, addresses only) predates it.

use std::borrow::Borrow;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::SendError;
use actix::{Actor, Addr, ArbiterHandle, Handler, Message};
use dashmap::DashMap;

use crate::metrics::names;
use crate::protocol::ids::RoomId;

use super::backlog::{Backlog, Slot};
use super::messages::Queued;
use super::{Room, RoomConfig};
use crate::store::Store;

/// A running room: its actor and its backlog bound.
struct Entry {
    addr: Addr<Room>,
    backlog: Backlog,
}

impl Entry {
    fn new(addr: Addr<Room>) -> Entry {
        Entry {
            addr,
            backlog: Backlog::default(),
        }
    }
}

/// How [`Registry::deliver`] handed an op to its room.
pub enum Delivery {
    /// In the room's mailbox.
    Sent,
    /// The room holds [`MAX_BACKLOG`](super::backlog::MAX_BACKLOG) unanswered ops: this
    /// future sends the op once one of them is answered. The sender awaits it before
    /// taking its next op (a connection stops reading meanwhile), which is the bound.
    Wait(Pin<Box<dyn Future<Output = ()> + Send>>),
}

/// Every live Room actor, by room id.
pub struct Registry {
    rooms: DashMap<Key, Entry>,
    /// One arbiter (thread) per core; rooms are spread round-robin.
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: AtomicUsize,
    /// Rooms stopped so far (idle or absent), so the server knows when freed room
    /// memory is worth handing back to the OS.
    stopped: AtomicUsize,
    store: Store,
    config: Arc<RoomConfig>,
    /// Where rooms hand diffs for other nodes (cluster mode only; see `tap`).
    tap: std::sync::OnceLock<super::tap::Tap>,
    /// Rooms on their way to another node (cluster mode), which rooms refuse to serve.
    moving: super::moving::Moving,
}

impl Registry {
    pub fn new(arbiters: Vec<ArbiterHandle>, store: Store, config: RoomConfig) -> Arc<Registry> {
        assert!(!arbiters.is_empty(), "rooms need at least one arbiter");
        Arc::new(Registry {
            rooms: DashMap::new(),
            arbiters,
            next_arbiter: AtomicUsize::new(0),
            stopped: AtomicUsize::new(0),
            store,
            config: Arc::new(config),
            tap: std::sync::OnceLock::new(),
            moving: Default::default(),
        })
    }

    /// The room's actor, started (and loading from the store) if it is not running.
    pub fn get(self: &Arc<Self>, room_id: &RoomId) -> Addr<Room> {
        self.admit(room_id, |entry| entry.addr.clone())
    }

    /// Runs `f` on the room's entry, starting the room if it is not running (under the
    /// map's shard lock: `f` must not block).
    fn admit<T>(self: &Arc<Self>, room_id: &RoomId, f: impl FnOnce(&Entry) -> T) -> T {
        if let Some(entry) = self.rooms.get(room_id.as_bytes()) {
            if entry.addr.connected() {
                return f(&entry);
            }
        }
        let mut entry = self
            .rooms
            .entry(Key::new(room_id))
            .or_insert_with(|| Entry::new(self.start(room_id)));
        if !entry.addr.connected() {
            *entry = Entry::new(self.start(room_id));
        }
        f(&entry)
    }

    /// Hands an op or a create to its room (started if need be), counted against the
    /// room's backlog bound (`backlog.rs`). When the room is at its bound the op is not
    /// sent yet: the caller awaits [`Delivery::Wait`], which sends it in its turn.
    /// Either way the op is answered through its `ReplyTo`, also if the room stops.
    pub fn deliver<M>(self: &Arc<Self>, room_id: &RoomId, msg: M) -> Delivery
    where
        M: Message<Result = ()> + Queued + Send + 'static,
        Room: Handler<M>,
    {
        let (addr, slot) = self.admit(room_id, |entry| {
            let slot = entry
                .backlog
                .try_take()
                .ok_or_else(|| entry.backlog.clone());
            (entry.addr.clone(), slot)
        });
        match slot {
            Ok(slot) => {
                self.send_held(room_id, addr, msg, slot);
                Delivery::Sent
            }
            Err(backlog) => {
                metrics::counter!(names::BACKLOG_WAITS).increment(1);
                let registry = self.clone();
                let room_id = room_id.clone();
                Delivery::Wait(Box::pin(async move {
                    match backlog.take().await {
                        Some(slot) => registry.send_held(&room_id, addr, msg, slot),
                        // Never: the semaphore is not closed. Sent unbounded, not lost.
                        None => registry.send(&room_id, addr, msg),
                    }
                }))
            }
        }
    }

    fn send_held<M>(self: &Arc<Self>, room_id: &RoomId, addr: Addr<Room>, mut msg: M, slot: Slot)
    where
        M: Message<Result = ()> + Queued + Send + 'static,
        Room: Handler<M>,
    {
        msg.reply_mut().hold(slot);
        self.send(room_id, addr, msg);
    }

    /// Queues `msg` whatever the mailbox holds (the backlog is the bound, see
    /// `backlog.rs`); a room that stopped meanwhile is started again and gets it. If
    /// that fails too, the message is dropped and its `ReplyTo` answers `unavailable`.
    fn send<M>(self: &Arc<Self>, room_id: &RoomId, addr: Addr<Room>, msg: M)
    where
        M: Message<Result = ()> + Send + 'static,
        Room: Handler<M>,
    {
        match addr.try_send(msg) {
            Ok(()) => {}
            Err(SendError::Full(msg)) => addr.do_send(msg),
            Err(SendError::Closed(msg)) => self.get(room_id).do_send(msg),
        }
    }

    /// The room's actor if it is running; never starts one.
    pub fn live(&self, room_id: &str) -> Option<Addr<Room>> {
        self.rooms
            .get(room_id.as_bytes())
            .map(|entry| entry.addr.clone())
            .filter(|addr| addr.connected())
    }

    fn start(self: &Arc<Self>, room_id: &RoomId) -> Addr<Room> {
        let i = self.next_arbiter.fetch_add(1, Ordering::Relaxed) % self.arbiters.len();
        let room = Room::new(
            room_id.clone(),
            self.clone(),
            self.store.clone(),
            self.config.clone(),
        );
        Room::start_in_arbiter(&self.arbiters[i], move |_| room)
    }

    /// Forgets a stopping room, unless the id already maps to a newer actor.
    pub fn remove(&self, room_id: &RoomId, addr: &Addr<Room>) {
        self.rooms
            .remove_if(room_id.as_bytes(), |_, current| current.addr == *addr);
    }

    pub fn note_stopped(&self) {
        self.stopped.fetch_add(1, Ordering::Relaxed);
    }

    /// How many rooms have stopped since the server started.
    pub fn stopped_count(&self) -> usize {
        self.stopped.load(Ordering::Relaxed)
    }

    /// Every running room with its id whose id passes `keep` (one shard locked at a
    /// time, nothing awaited while iterating).
    pub fn live_rooms(&self, keep: impl Fn(&str) -> bool) -> Vec<(RoomId, Addr<Room>)> {
        self.rooms
            .iter()
            .filter(|e| e.value().addr.connected() && keep(e.key().as_str()))
            .map(|e| (e.key().room_id(), e.value().addr.clone()))
            .collect()
    }

    /// Addresses of every running room (for shutdown).
    pub fn all(&self) -> Vec<Addr<Room>> {
        self.rooms.iter().map(|e| e.value().addr.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    /// After many rooms stopped: gives the map's spare capacity back.
    pub fn shrink(&self) {
        self.rooms.shrink_to_fit();
    }

    /// Installs the tap rooms hand their relayed subscribers' diffs to (once, at
    /// cluster start); a second call is ignored.
    pub fn set_tap(&self, tap: super::tap::Tap) {
        let _ = self.tap.set(tap);
    }

    /// The tap, in cluster mode.
    pub fn tap(&self) -> Option<&super::tap::Tap> {
        self.tap.get()
    }

    /// Rooms this node must not serve now (see [`super::moving`]).
    pub fn moving(&self) -> &super::moving::Moving {
        &self.moving
    }

    /// The room threads.
    pub fn arbiters(&self) -> &[ArbiterHandle] {
        &self.arbiters
    }

    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }
}

/// The longest room id a registry key holds inline.
const INLINE_ID: usize = 46;

/// A room id as the registry keys it. An id of up to [`INLINE_ID`] bytes (most ids) is
/// held in the map's own memory, so a lookup compares bytes next to those the probe just
/// read: with 10,000 rooms, comparing against an id on the heap was a cache miss per op
/// (7.8% of the connection threads, benches/README.md, "Sixth pass"). A longer id keeps
/// its `RoomId`. Hashed and compared as the id's bytes, which is how lookups ask
/// (`Borrow<[u8]>`).
#[derive(Clone)]
enum Key {
    Inline { len: u8, bytes: [u8; INLINE_ID] },
    Heap(RoomId),
}

impl Key {
    fn new(room_id: &RoomId) -> Key {
        let id = room_id.as_bytes();
        match u8::try_from(id.len()) {
            Ok(len) if id.len() <= INLINE_ID => {
                let mut bytes = [0; INLINE_ID];
                bytes[..id.len()].copy_from_slice(id);
                Key::Inline { len, bytes }
            }
            _ => Key::Heap(room_id.clone()),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Key::Heap(room_id) => room_id.as_bytes(),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // Copied whole from a `RoomId`'s str (ASCII by its pattern).
            Key::Inline { .. } => {
                std::str::from_utf8(self.as_bytes()).expect("copied whole from a str")
            }
            Key::Heap(room_id) => room_id.as_str(),
        }
    }

    /// The id as a `RoomId` again (rare callers: room lists).
    fn room_id(&self) -> RoomId {
        match self {
            Key::Inline { .. } => {
                RoomId::parse(self.as_str()).expect("copied from a RoomId, which was valid")
            }
            Key::Heap(room_id) => room_id.clone(),
        }
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Key {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_ids_are_found_by_their_bytes_and_give_back_the_same_id() {
        let short = RoomId::parse("state:ingest-1764777000000-1234").expect("valid");
        let edge = RoomId::parse(&"e".repeat(INLINE_ID)).expect("valid");
        let long = RoomId::parse(&"l".repeat(INLINE_ID + 1)).expect("valid");
        let map: DashMap<Key, u32> = DashMap::new();
        for (n, id) in [&short, &edge, &long].into_iter().enumerate() {
            map.insert(Key::new(id), n as u32);
        }
        assert!(matches!(Key::new(&edge), Key::Inline { .. }));
        assert!(matches!(Key::new(&long), Key::Heap(_)));
        for (n, id) in [&short, &edge, &long].into_iter().enumerate() {
            assert_eq!(map.get(id.as_bytes()).map(|v| *v), Some(n as u32));
            assert_eq!(Key::new(id).room_id(), *id);
            assert_eq!(Key::new(id).as_str(), id.as_str());
        }
        let prefix = RoomId::parse("state:ingest-1764777000000-123").expect("valid");
        assert!(map.get(prefix.as_bytes()).is_none());
    }
}
