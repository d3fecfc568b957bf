//! The room registry: room id -> `Addr<Room>`, and where new rooms are started.
//!
//! Architecture invariant: the map holds addresses only, never state, and no map guard
//! lives across an await or an actor send (DashMap shards are locked only inside the
//! synchronous calls below).

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::{Actor, Addr, ArbiterHandle};
use dashmap::DashMap;

use crate::protocol::ids::RoomId;

use super::{Room, RoomConfig};
use crate::store::Store;

/// Every live Room actor, by room id.
pub struct Registry {
    rooms: DashMap<Key, Addr<Room>>,
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
        if let Some(addr) = self.rooms.get(room_id.as_bytes()) {
            if addr.connected() {
                return addr.clone();
            }
        }
        let mut entry = self
            .rooms
            .entry(Key::new(room_id))
            .or_insert_with(|| self.start(room_id));
        if !entry.connected() {
            *entry = self.start(room_id);
        }
        entry.clone()
    }

    /// The room's actor if it is running; never starts one.
    pub fn live(&self, room_id: &str) -> Option<Addr<Room>> {
        self.rooms
            .get(room_id.as_bytes())
            .map(|addr| addr.clone())
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
            .remove_if(room_id.as_bytes(), |_, current| current == addr);
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
            .filter(|e| e.value().connected() && keep(e.key().as_str()))
            .map(|e| (e.key().room_id(), e.value().clone()))
            .collect()
    }

    /// Addresses of every running room (for shutdown).
    pub fn all(&self) -> Vec<Addr<Room>> {
        self.rooms.iter().map(|e| e.value().clone()).collect()
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
