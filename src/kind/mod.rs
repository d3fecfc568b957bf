//! Room state, the room-kind API and the three built-in kinds.
//!
//! This module owns [`RoomState`] (public entries with versions and tombstones, private
//! server-only facts, and the live size counters), the [`RoomKind`] trait through which
//! every kind (built-in or an application's) defines its rules, the [`Kinds`] registry,
//! the refusal codes kinds return, and the op-parsing helpers ([`Fields`]). The built-in
//! kinds live in `chat`, `poll` and `state` and use nothing an application's kind could
//! not. It knows nothing of actors, sockets, the log or wire formats: the room actor
//! calls [`RoomKind::reduce`], records the returned [`Changes`] and then calls `apply`;
//! recovery replays the recorded `Changes` through `apply` alone.
//!
//! Architecture invariant: `init` and `reduce` are pure functions of
//! (state, op, ctx, limits). They read no clock, do no IO, use no randomness and should
//! not panic (a panic costs the op, see [`catch_panic`]), so replaying a log always
//! rebuilds the same state.

pub mod audience;
mod chat;
mod poll;
mod registry;
mod room_kind;
pub mod rules;
// The kind is called "state" in PROTOCOL.md, so its module is too.
#[allow(clippy::module_inception)]
mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use crate::value::Value;

pub use audience::{visible, Audience, Visibility};
pub use chat::ChatKind;
pub use poll::PollKind;
pub use registry::{KindError, Kinds};
pub use room_kind::{KindRef, RoomKind};
pub use state::StateKind;

/// What one event changed, as recorded in the log and applied on recovery.
///
/// `public` keys are the entries clients see; `private` keys are server-only facts the
/// reducers need (a poll's voters, a room's creator, a chat's history size). A `None`
/// value deletes the key. Within each list a key appears at most once.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Changes {
    pub public: Vec<(String, Option<Value>)>,
    pub private: Vec<(String, Option<Value>)>,
}

impl Changes {
    /// Adds a public entry `key` = `value`, visible to every viewer.
    pub fn put(mut self, key: impl Into<String>, value: Value) -> Changes {
        self.public.push((key.into(), Some(value)));
        self
    }

    /// Adds a public entry `key` = `value` that only `users` may see: every read path
    /// (snapshot, diff, resumed, `GET`, `?at=`, `/events`, the stream) hides it, and
    /// any trace of the event that wrote it, from everyone else. Writing the key again
    /// with `put` shows it to everyone; deleting it tells only its audience.
    pub fn put_for(
        mut self,
        key: impl Into<String>,
        value: Value,
        users: impl IntoIterator<Item = impl Into<String>>,
    ) -> Changes {
        let key = key.into();
        let audience = Audience::new(users);
        self.private
            .push((audience::fact_key(&key), Some(audience.to_value())));
        self.public.push((key, Some(value)));
        self
    }

    /// Deletes the public entry `key`.
    pub fn delete(mut self, key: impl Into<String>) -> Changes {
        self.public.push((key.into(), None));
        self
    }

    /// Sets the private (server-only) fact `key`.
    pub fn put_private(mut self, key: impl Into<String>, value: Value) -> Changes {
        self.private.push((key.into(), Some(value)));
        self
    }

    /// Removes the private fact `key`.
    pub fn delete_private(mut self, key: impl Into<String>) -> Changes {
        self.private.push((key.into(), None));
        self
    }

    /// True when the event changes nothing (for example a vote for the option the user
    /// already voted for).
    pub fn is_empty(&self) -> bool {
        self.public.is_empty() && self.private.is_empty()
    }
}

/// Why a reducer refused an op. The protocol layer maps these to wire codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseCode {
    /// The op is malformed or refers to something that does not exist.
    Invalid,
    /// The op is well formed but this user may not do it.
    Forbidden,
    /// An `if_ver` compare-and-set did not match.
    Conflict,
    /// The room (a poll) is closed to further changes.
    Closed,
    /// One value or text is larger than its limit.
    TooLarge,
    /// The room as a whole would exceed its key or byte limit.
    Limit,
}

/// A refused op: the code and a message that names the field and the numbers involved.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub code: RefuseCode,
    pub msg: String,
}

impl Refusal {
    pub fn new(code: RefuseCode, msg: impl Into<String>) -> Refusal {
        Refusal {
            code,
            msg: msg.into(),
        }
    }

    /// An `invalid` refusal: the op is malformed or names something that is not there.
    pub fn invalid(msg: impl Into<String>) -> Refusal {
        Refusal::new(RefuseCode::Invalid, msg)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.msg)
    }
}

impl std::error::Error for Refusal {}

/// Who submits an event and when; everything a reducer may know beyond the state.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    /// The authenticated user submitting the op (the creator, for `create`).
    pub user: &'a str,
    /// The room's clock reading for this event, in ms; reducers copy it into entries.
    pub now_ms: i64,
    /// The seq this event will get if accepted (1 for the creation event).
    pub seq: u64,
}

/// The size limits reducers enforce. The server builds one from its `Config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Live public keys a "state" room may hold.
    pub max_keys: usize,
    /// Live public bytes (key length + value JSON size) a "state" room may hold.
    pub max_room_bytes: usize,
    /// JSON size of one "state" value.
    pub max_value_bytes: usize,
    /// Byte length of one "state" key.
    pub max_key_bytes: usize,
    /// Largest `history` a chat room may ask for.
    pub max_chat_history: usize,
    /// Messages a chat keeps when `init` does not say.
    pub default_chat_history: usize,
    /// Byte length of one chat message text.
    pub max_text_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_keys: 100_000,
            max_room_bytes: 64 * 1024 * 1024,
            max_value_bytes: 32 * 1024,
            max_key_bytes: 256,
            max_chat_history: 10_000,
            default_chat_history: 500,
            max_text_bytes: 4096,
        }
    }
}

/// One public entry: its value and the seq of the event that last wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    /// `None` is the tombstone of a deleted key, kept so resuming clients learn of the
    /// deletion until `prune_tombstones` drops it.
    pub value: Option<Value>,
    pub ver: u64,
    /// Who may see the entry (`None`: everyone). Kept from the recorded audience facts
    /// ([`audience`]); a tombstone keeps the audience of the entry it deleted.
    pub audience: Visibility,
}

impl Slot {
    /// A slot visible to everyone.
    pub fn new(value: Option<Value>, ver: u64) -> Slot {
        Slot {
            value,
            ver,
            audience: None,
        }
    }

    /// True when `user` may see this entry.
    pub fn visible_to(&self, user: &str) -> bool {
        visible(&self.audience, user)
    }
}

/// What one `apply` overwrote, so `undo` can put it back.
///
/// The room actor uses it to roll back an event whose log write failed.
#[derive(Debug)]
pub struct Undo {
    /// Each public key the apply touched with its slot before (`None`: it was absent).
    public: Vec<(String, Option<Slot>)>,
    /// Each private key the apply touched with its value before.
    private: Vec<(String, Option<Value>)>,
}

impl Undo {
    /// True when undoing changes nothing (an event that touched no private fact,
    /// applied by [`RoomState::apply_handing_back`]), so there is nothing to keep.
    pub fn is_empty(&self) -> bool {
        self.public.is_empty() && self.private.is_empty()
    }
}

/// The state of one room: what the log's events add up to.
///
/// Invariant: `live_keys`, `live_bytes` and `chat_messages` are always what a full
/// scan of `public` would compute; every write to `public` goes through `put_public`.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomState {
    /// Entries clients see, including tombstones, by key.
    public: BTreeMap<String, Slot>,
    /// Server-only facts the reducers need; never sent to clients.
    private: BTreeMap<String, Value>,
    /// Number of live (non-tombstone) public entries.
    live_keys: usize,
    /// Sum over live public entries of `key.len() + value.json_size()`.
    live_bytes: usize,
    /// Tombstones with `ver <= tombstone_floor` may have been pruned.
    tombstone_floor: u64,
    /// The numbers of live keys of the form `<prefix>/<n>` (canonical decimal `n`), by
    /// prefix, so a kind finds the oldest or newest numbered entry without scanning
    /// (chat evicts its oldest `msg/<seq>` this way). Kept by `put_public`.
    numbered: BTreeMap<String, BTreeSet<u64>>,
    /// Slots (tombstones included) with an audience; kept by `put_public`.
    n_hidden: usize,
}

impl RoomState {
    /// An empty room, before its creation event is applied. The state does not know
    /// its kind: everything in it came from recorded [`Changes`].
    pub fn new() -> Self {
        RoomState {
            public: BTreeMap::new(),
            private: BTreeMap::new(),
            live_keys: 0,
            live_bytes: 0,
            tombstone_floor: 0,
            numbered: BTreeMap::new(),
            n_hidden: 0,
        }
    }

    /// Applies the recorded changes of event `seq`, live and in recovery: no validation
    /// and no clock. Public keys get `Slot { value, ver: seq }` (a `None` value leaves a
    /// tombstone with `ver: seq`); private keys are set or removed.
    pub fn apply(&mut self, seq: u64, changes: &Changes) -> Undo {
        let mut public = Vec::with_capacity(changes.public.len());
        let mut undo = self.apply_handing_back(seq, changes, |key, before| {
            public.push((key.to_owned(), before));
        });
        undo.public = public;
        undo
    }

    /// [`RoomState::apply`], handing each public key's slot from before the event to
    /// `before` (in the order of `changes.public`) instead of keeping it in the returned
    /// [`Undo`], which then restores the private facts alone. For a caller that keeps
    /// the slots it needs itself and puts them back with [`RoomState::restore_public`]
    /// (a room's batch keeps each key's slot from before the batch), so no key is
    /// copied for an undo it already has; recovery, which undoes nothing, drops them.
    pub fn apply_handing_back(
        &mut self,
        seq: u64,
        changes: &Changes,
        mut before: impl FnMut(&str, Option<Slot>),
    ) -> Undo {
        // Only events that record an audience pay for looking one up.
        let has_audiences = changes
            .private
            .iter()
            .any(|(key, _)| key.starts_with(audience::AUDIENCE_PREFIX));
        for (key, value) in &changes.public {
            let recorded = match has_audiences {
                false => None,
                true => {
                    let fact = audience::fact_key(key);
                    changes.private.iter().find(|(k, _)| *k == fact)
                }
            };
            // The slot before is looked up only where the audience depends on it: a
            // plain write, the common case, costs the one lookup of `put_public`.
            let audience = match recorded {
                Some((_, Some(fact))) => {
                    let mut audience = Audience::from_value(fact);
                    audience.narrowed_at =
                        audience::narrowed_at(self.public.get(key), &audience, seq);
                    Some(Arc::new(audience))
                }
                Some((_, None)) => None,
                // Not recorded: a write shows the entry to everyone, a deletion keeps
                // the audience (`complete_audiences` records both explicitly).
                None if value.is_some() => None,
                None => self.public.get(key).and_then(|slot| slot.audience.clone()),
            };
            let slot = Slot {
                value: value.clone(),
                ver: seq,
                audience,
            };
            before(key, self.put_public(key, Some(slot)));
        }
        let private = changes
            .private
            .iter()
            .map(|(key, value)| {
                let before = match value {
                    Some(value) => self.private.insert(key.clone(), value.clone()),
                    None => self.private.remove(key),
                };
                (key.clone(), before)
            })
            .collect();
        Undo {
            public: Vec::new(),
            private,
        }
    }

    /// Puts back a public key's slot as it was before the applies handed it back (see
    /// [`RoomState::apply_handing_back`]); `None`: the key was absent. With the private
    /// facts' undos, the same rules as [`RoomState::undo`]: newest first, no
    /// `prune_tombstones` in between.
    pub fn restore_public(&mut self, key: &str, slot: Option<Slot>) {
        self.put_public(key, slot);
    }

    /// Records in `changes` the audience of every public key it touches whose audience
    /// this state holds and the changes leave unsaid (a `put` over a hidden entry shows
    /// it to everyone; a deletion keeps its audience), so the log says on its own which
    /// events touched hidden entries. The room calls it before recording; a state with
    /// no hidden entries returns at once.
    pub fn complete_audiences(&self, changes: &mut Changes) {
        if self.n_hidden == 0 {
            return;
        }
        let mut facts = Vec::new();
        for (key, value) in &changes.public {
            let Some(audience) = self.public.get(key).and_then(|s| s.audience.as_ref()) else {
                continue;
            };
            let fact = audience::fact_key(key);
            if changes.private.iter().any(|(k, _)| *k == fact) {
                continue;
            }
            let recorded = value.as_ref().map_or(Some(audience.to_value()), |_| None);
            facts.push((fact, recorded));
        }
        changes.private.extend(facts);
    }

    /// How many entries (tombstones included) have an audience: 0 means every viewer
    /// sees the same room, and the read paths take their shared fast path.
    pub fn n_hidden(&self) -> usize {
        self.n_hidden
    }

    /// Reverts one `apply`. Undos must be applied in reverse order of their applies,
    /// with no `prune_tombstones` in between.
    pub fn undo(&mut self, undo: Undo) {
        // Reverse order, so a key listed twice (which `Changes` forbids, but `apply`
        // does not check) still ends at its value from before the apply.
        for (key, before) in undo.public.into_iter().rev() {
            self.put_public(&key, before);
        }
        for (key, before) in undo.private.into_iter().rev() {
            match before {
                Some(value) => self.private.insert(key, value),
                None => self.private.remove(&key),
            };
        }
    }

    /// Live public entries (no tombstones), sorted by key.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Slot)> {
        self.public
            .iter()
            .filter(|(_, slot)| slot.value.is_some())
            .map(|(key, slot)| (key.as_str(), slot))
    }

    /// Public entries and tombstones with `ver > since`, sorted by key; `None` when
    /// `since` is below the tombstone floor, because deletions that old may have been
    /// pruned and the answer would be incomplete.
    pub fn changed_since(&self, since: u64) -> Option<Vec<(&str, &Slot)>> {
        if since < self.tombstone_floor {
            return None;
        }
        Some(
            self.public
                .iter()
                .filter(|(_, slot)| slot.ver > since)
                .map(|(key, slot)| (key.as_str(), slot))
                .collect(),
        )
    }

    /// Drops tombstones with `ver <= up_to` and raises the floor to `up_to` (it never
    /// goes down).
    pub fn prune_tombstones(&mut self, up_to: u64) {
        let mut n_pruned_hidden = 0;
        self.public.retain(|_, slot| {
            let keep = slot.value.is_some() || slot.ver > up_to;
            if !keep && slot.audience.is_some() {
                n_pruned_hidden += 1;
            }
            keep
        });
        self.n_hidden -= n_pruned_hidden;
        self.tombstone_floor = self.tombstone_floor.max(up_to);
    }

    /// The public entry under `key`, tombstones included.
    pub fn get(&self, key: &str) -> Option<&Slot> {
        self.public.get(key)
    }

    /// The live public value under `key` (`None` for absent keys and tombstones).
    pub fn live(&self, key: &str) -> Option<&Value> {
        self.public.get(key).and_then(|slot| slot.value.as_ref())
    }

    pub fn private(&self, key: &str) -> Option<&Value> {
        self.private.get(key)
    }

    pub fn live_keys(&self) -> usize {
        self.live_keys
    }

    /// Sum over live public entries of `key.len() + value.json_size()`.
    pub fn live_bytes(&self) -> usize {
        self.live_bytes
    }

    /// Every public slot, tombstones included, sorted by key: what a snapshot holds.
    pub fn all_slots(&self) -> impl Iterator<Item = (&str, &Slot)> {
        self.public.iter().map(|(key, slot)| (key.as_str(), slot))
    }

    /// Every private fact, sorted by key: what a snapshot holds besides the slots.
    pub fn private_entries(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.private
            .iter()
            .map(|(key, value)| (key.as_str(), value))
    }

    /// Tombstones at or below this ver may be gone.
    pub fn tombstone_floor(&self) -> u64 {
        self.tombstone_floor
    }

    /// Rebuilds a state from what `all_slots`, `private_entries` and `tombstone_floor`
    /// returned (a snapshot), recomputing the counters and the chat index.
    pub fn from_parts(
        public: impl IntoIterator<Item = (String, Slot)>,
        private: impl IntoIterator<Item = (String, Value)>,
        tombstone_floor: u64,
    ) -> RoomState {
        let mut state = RoomState::new();
        state.private = private.into_iter().collect();
        for (key, mut slot) in public {
            // The audience comes from its recorded fact. When it last narrowed is not
            // recorded: the slot's ver bounds it (see `Audience::narrowed_after`).
            slot.audience = state.private.get(&audience::fact_key(&key)).map(|fact| {
                let mut audience = Audience::from_value(fact);
                audience.narrowed_at = slot.ver;
                Arc::new(audience)
            });
            state.put_public(&key, Some(slot));
        }
        state.tombstone_floor = tombstone_floor;
        state
    }

    /// The numbers `n` of the live keys `<prefix>/<n>`, smallest first (`n` in canonical
    /// decimal: no sign, no leading zero). Empty when there are none.
    pub fn numbered(&self, prefix: &str) -> impl DoubleEndedIterator<Item = u64> + '_ {
        self.numbered.get(prefix).into_iter().flatten().copied()
    }

    /// How many live keys `<prefix>/<n>` there are (see [`RoomState::numbered`]).
    pub fn n_numbered(&self, prefix: &str) -> usize {
        self.numbered.get(prefix).map_or(0, BTreeSet::len)
    }

    /// Sets (`Some`) or removes (`None`) the slot under `key`, keeping the counters and
    /// the chat index in step, and returns the slot it replaced.
    fn put_public(&mut self, key: &str, slot: Option<Slot>) -> Option<Slot> {
        if slot.as_ref().is_some_and(|slot| slot.audience.is_some()) {
            self.n_hidden += 1;
        }
        if let Some(value) = slot.as_ref().and_then(|slot| slot.value.as_ref()) {
            self.live_keys += 1;
            self.live_bytes += entry_bytes(key, value);
        }
        let before = match slot {
            // A key already there is overwritten in place: no copy of the key, and one
            // lookup.
            Some(slot) => match self.public.get_mut(key) {
                Some(existing) => Some(std::mem::replace(existing, slot)),
                None => self.public.insert(key.to_owned(), slot),
            },
            None => self.public.remove(key),
        };
        if before.as_ref().is_some_and(|slot| slot.audience.is_some()) {
            self.n_hidden = self.n_hidden.saturating_sub(1);
        }
        if let Some(value) = before.as_ref().and_then(|slot| slot.value.as_ref()) {
            // The entry was counted when it was put, so these cannot underflow;
            // saturating keeps that a non-panicking fact rather than a hope.
            self.live_keys = self.live_keys.saturating_sub(1);
            self.live_bytes = self.live_bytes.saturating_sub(entry_bytes(key, value));
        }
        if let Some((prefix, n)) = numbered_key(key) {
            let live = self.public.get(key).is_some_and(|s| s.value.is_some());
            if live {
                self.numbered
                    .entry(prefix.to_owned())
                    .or_default()
                    .insert(n);
            } else if let Some(set) = self.numbered.get_mut(prefix) {
                set.remove(&n);
                if set.is_empty() {
                    self.numbered.remove(prefix);
                }
            }
        }
        before
    }
}

/// Runs a kind's code (`create` or `reduce`), turning a panic into the panic's message,
/// so a bug in one kind's rules costs one op, not the room.
///
/// The callers pass only code that reads the state (`reduce` takes `&RoomState`), so a
/// panic leaves nothing half-changed: that is why asserting unwind safety is sound.
pub fn catch_panic<T>(code: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(code)).map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|text| (*text).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned())
    })
}

impl Default for RoomState {
    fn default() -> Self {
        RoomState::new()
    }
}

/// Splits `<prefix>/<n>` into its prefix and number, for keys whose last segment is a
/// canonical decimal number (no sign, no leading zero, so "msg/01" never aliases
/// "msg/1"); `None` for any other key.
fn numbered_key(key: &str) -> Option<(&str, u64)> {
    let (prefix, digits) = key.rsplit_once('/')?;
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if canonical {
        digits.parse().ok().map(|n| (prefix, n))
    } else {
        None
    }
}

/// What one live entry counts towards `live_bytes` (and a room's byte limit): the key's
/// length plus the value's JSON size.
pub fn entry_bytes(key: &str, value: &Value) -> usize {
    key.len().saturating_add(value.json_size())
}

/// The fields of an op or `init` map, with typed getters whose refusals name the field:
/// the parsing helpers every kind, built-in or not, may use.
pub struct Fields<'a> {
    map: &'a BTreeMap<String, Value>,
}

/// An empty map, so a `Null` init reads like `{}`.
static NO_FIELDS: BTreeMap<String, Value> = BTreeMap::new();

impl<'a> Fields<'a> {
    /// Splits an op into its `type` and its fields. The op must be a map with a string
    /// `type`.
    pub fn op(op: &'a Value) -> Result<(&'a str, Fields<'a>), Refusal> {
        let map = op
            .as_map()
            .ok_or_else(|| Refusal::invalid("op must be a map"))?;
        let kind = match map.get("type") {
            Some(Value::Str(kind)) => kind.as_str(),
            Some(_) => return Err(Refusal::invalid("field \"type\" must be a string")),
            None => return Err(Refusal::invalid("missing field \"type\"")),
        };
        Ok((kind, Fields { map }))
    }

    /// The fields of `init`, which may be `Null` (no fields) or a map.
    pub fn init(init: &'a Value) -> Result<Fields<'a>, Refusal> {
        match init {
            Value::Null => Ok(Fields { map: &NO_FIELDS }),
            Value::Map(map) => Ok(Fields { map }),
            _ => Err(Refusal::invalid("init must be a map or null")),
        }
    }

    /// Refuses any field other than `type` and those in `allowed`.
    pub fn only(&self, allowed: &[&str]) -> Result<(), Refusal> {
        match self
            .map
            .keys()
            .find(|name| *name != "type" && !allowed.contains(&name.as_str()))
        {
            Some(name) => Err(Refusal::invalid(format!("unknown field \"{name}\""))),
            None => Ok(()),
        }
    }

    pub fn opt(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name)
    }

    pub fn required(&self, name: &str) -> Result<&'a Value, Refusal> {
        self.opt(name)
            .ok_or_else(|| Refusal::invalid(format!("missing field \"{name}\"")))
    }

    pub fn str(&self, name: &str) -> Result<&'a str, Refusal> {
        self.required(name)?
            .as_str()
            .ok_or_else(|| Refusal::invalid(format!("field \"{name}\" must be a string")))
    }

    pub fn int(&self, name: &str) -> Result<i64, Refusal> {
        self.required(name)?
            .as_i64()
            .ok_or_else(|| Refusal::invalid(format!("field \"{name}\" must be an integer")))
    }

    pub fn opt_int(&self, name: &str) -> Result<Option<i64>, Refusal> {
        match self.opt(name) {
            None => Ok(None),
            Some(_) => self.int(name).map(Some),
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Builders and strategies shared by the kind modules' tests.

    use super::*;
    use proptest::prelude::*;

    pub(crate) fn s(text: &str) -> Value {
        Value::Str(text.to_owned())
    }

    pub(crate) fn ctx(user: &str, seq: u64) -> Ctx<'_> {
        Ctx {
            user,
            now_ms: 1_000 + seq as i64,
            seq,
        }
    }

    /// A room of `kind` with its creation event applied as seq 1.
    pub(crate) fn created(kind: &dyn RoomKind, init: Value, limits: &Limits) -> RoomState {
        let changes = kind
            .init(&init, &ctx("u0", 1), limits)
            .expect("test init is valid");
        let mut room = RoomState::new();
        let _ = room.apply(1, &changes);
        room
    }

    /// Reduces and applies `op` as event `seq`, checking on the way that `undo` restores
    /// the state exactly.
    pub(crate) fn submit(
        kind: &dyn RoomKind,
        room: &mut RoomState,
        user: &str,
        seq: u64,
        op: Value,
        limits: &Limits,
    ) -> Result<Changes, Refusal> {
        let changes = kind.reduce(room, &op, &ctx(user, seq), limits)?;
        apply_checked(room, seq, &changes);
        Ok(changes)
    }

    /// Applies `changes`, checks that undo restores the state exactly and that the
    /// counters match a full scan, then applies them again for real.
    pub(crate) fn apply_checked(room: &mut RoomState, seq: u64, changes: &Changes) {
        let before = room.clone();
        let undo = room.apply(seq, changes);
        assert_counters_match_scan(room);
        room.undo(undo);
        assert_eq!(*room, before, "undo must restore the state exactly");
        let _ = room.apply(seq, changes);
    }

    pub(crate) fn assert_counters_match_scan(room: &RoomState) {
        let keys = room.entries().count();
        let bytes: usize = room
            .entries()
            .map(|(key, slot)| entry_bytes(key, slot.value.as_ref().expect("entries are live")))
            .sum();
        assert_eq!(room.live_keys(), keys);
        assert_eq!(room.live_bytes(), bytes);
    }

    /// The refusal code of a result, or `None` when it was accepted.
    pub(crate) fn code<T>(result: &Result<T, Refusal>) -> Option<RefuseCode> {
        result.as_ref().err().map(|refusal| refusal.code)
    }

    /// Any `Value` up to depth 3, with map keys drawn from `names` (the field names a
    /// kind knows) or short random strings, so generated ops reach past the parser.
    pub(crate) fn arb_value(names: &'static [&'static str]) -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            prop_oneof![-3i64..40, Just(i64::MAX), Just(i64::MIN), any::<i64>()]
                .prop_map(Value::Int),
            (-1e6f64..1e6).prop_map(Value::Float),
            arb_name(names).prop_map(Value::Str),
            proptest::collection::vec(any::<u8>(), 0..6).prop_map(Value::Bytes),
        ];
        leaf.prop_recursive(3, 24, 5, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::List),
                proptest::collection::btree_map(arb_name(names), inner, 0..5).prop_map(Value::Map),
            ]
        })
    }

    /// A map with a `type` drawn from `types` and fields drawn from `names`, holding
    /// arbitrary values: the shape of a real op with anything in its fields.
    pub(crate) fn arb_op_like(
        types: &'static [&'static str],
        names: &'static [&'static str],
    ) -> impl Strategy<Value = Value> {
        let kind = prop_oneof![
            proptest::sample::select(types).prop_map(|t| Value::Str(t.to_owned())),
            arb_value(names),
        ];
        (
            kind,
            proptest::collection::btree_map(arb_name(names), arb_value(names), 0..4),
        )
            .prop_map(|(kind, mut map)| {
                map.insert("type".to_owned(), kind);
                Value::Map(map)
            })
    }

    fn arb_name(names: &'static [&'static str]) -> impl Strategy<Value = String> {
        prop_oneof![
            3 => proptest::sample::select(names).prop_map(str::to_owned),
            1 => "[a-z/0-9]{0,5}",
        ]
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;

    #[test]
    fn from_parts_rebuilds_an_equal_state() {
        let limits = Limits::default();
        let ctx = |seq| Ctx {
            user: "alice",
            now_ms: 7,
            seq,
        };
        let mut room = RoomState::new();
        let init = Value::map([("history", Value::Int(2))]);
        let created = ChatKind.init(&init, &ctx(1), &limits).expect("valid init");
        room.apply(1, &created);
        for seq in 2..6 {
            let post = Value::map([
                ("type", Value::Str("post".into())),
                ("text", Value::Str(format!("m{seq}"))),
            ]);
            let changes = ChatKind
                .reduce(&room, &post, &ctx(seq), &limits)
                .expect("valid post");
            room.apply(seq, &changes);
        }
        let rebuilt = RoomState::from_parts(
            room.all_slots().map(|(k, s)| (k.to_owned(), s.clone())),
            room.private_entries()
                .map(|(k, v)| (k.to_owned(), v.clone())),
            room.tombstone_floor(),
        );
        assert_eq!(rebuilt, room);
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    fn set_op(key: &str, value: Value) -> Value {
        Value::map([("type", s("set")), ("key", s(key)), ("value", value)])
    }

    fn del_op(key: &str) -> Value {
        Value::map([("type", s("del")), ("key", s(key))])
    }

    #[test]
    fn new_room_is_empty() {
        let room = RoomState::new();
        assert_eq!(room.entries().count(), 0);
        assert_eq!(room.live_keys(), 0);
        assert_eq!(room.live_bytes(), 0);
        assert_eq!(room.changed_since(0), Some(vec![]));
    }

    #[test]
    fn limits_default_to_the_protocol_numbers() {
        let limits = Limits::default();
        assert_eq!(limits.max_keys, 100_000);
        assert_eq!(limits.max_room_bytes, 64 << 20);
        assert_eq!(limits.max_value_bytes, 32 << 10);
        assert_eq!(limits.max_key_bytes, 256);
        assert_eq!(limits.max_chat_history, 10_000);
        assert_eq!(limits.default_chat_history, 500);
        assert_eq!(limits.max_text_bytes, 4096);
    }

    #[test]
    fn apply_stamps_public_keys_with_the_event_seq() {
        let mut room = RoomState::new();
        let changes = Changes {
            public: vec![("a".into(), Some(Value::Int(1)))],
            private: vec![("p".into(), Some(Value::Bool(true)))],
        };
        let _ = room.apply(7, &changes);
        assert_eq!(room.get("a"), Some(&Slot::new(Some(Value::Int(1)), 7)));
        assert_eq!(room.private("p"), Some(&Value::Bool(true)));
        assert_eq!(room.live_keys(), 1);
        assert_eq!(room.live_bytes(), 1 + 1);
    }

    #[test]
    fn deleting_leaves_a_tombstone_with_the_delete_seq() {
        let limits = Limits::default();
        let mut room = created(&StateKind, Value::Null, &limits);
        submit(
            &StateKind,
            &mut room,
            "u0",
            2,
            set_op("a", Value::Int(1)),
            &limits,
        )
        .unwrap();
        submit(&StateKind, &mut room, "u0", 3, del_op("a"), &limits).unwrap();
        assert_eq!(room.get("a"), Some(&Slot::new(None, 3)));
        assert_eq!(room.entries().count(), 0);
        assert_eq!(room.live_keys(), 0);
        assert_eq!(room.live_bytes(), 0);
    }

    #[test]
    fn undo_restores_public_private_and_counters_exactly() {
        let limits = Limits::default();
        let mut room = created(&StateKind, Value::Null, &limits);
        submit(
            &StateKind,
            &mut room,
            "u0",
            2,
            set_op("a", Value::Int(1)),
            &limits,
        )
        .unwrap();
        let before = room.clone();
        let changes = Changes {
            public: vec![("a".into(), None), ("b".into(), Some(s("new")))],
            private: vec![("creator".into(), None), ("x".into(), Some(Value::Null))],
        };
        let undo = room.apply(3, &changes);
        assert_ne!(room, before);
        room.undo(undo);
        assert_eq!(room, before);
        assert_eq!(format!("{room:?}"), format!("{before:?}"));
    }

    #[test]
    fn undos_in_reverse_order_restore_the_state_before_all_applies() {
        let mut room = RoomState::new();
        let before = room.clone();
        let first = Changes {
            public: vec![("msg/1".into(), Some(s("a")))],
            private: vec![],
        };
        let second = Changes {
            public: vec![("msg/1".into(), None), ("msg/2".into(), Some(s("b")))],
            private: vec![],
        };
        let undo_first = room.apply(1, &first);
        let undo_second = room.apply(2, &second);
        assert_eq!(room.numbered("msg").collect::<Vec<_>>(), [2]);
        room.undo(undo_second);
        assert_eq!(room.numbered("msg").collect::<Vec<_>>(), [1]);
        room.undo(undo_first);
        assert_eq!(room, before);
    }

    #[test]
    fn entries_are_live_and_sorted_by_key() {
        let mut room = RoomState::new();
        let changes = Changes {
            public: vec![
                ("c".into(), Some(Value::Int(3))),
                ("a".into(), Some(Value::Int(1))),
                ("b".into(), None),
            ],
            private: vec![],
        };
        let _ = room.apply(1, &changes);
        let keys: Vec<&str> = room.entries().map(|(key, _)| key).collect();
        assert_eq!(keys, ["a", "c"]);
    }

    #[test]
    fn changed_since_includes_tombstones_newer_than_since() {
        let limits = Limits::default();
        let mut room = created(&StateKind, Value::Null, &limits);
        submit(
            &StateKind,
            &mut room,
            "u0",
            2,
            set_op("a", Value::Int(1)),
            &limits,
        )
        .unwrap();
        submit(
            &StateKind,
            &mut room,
            "u0",
            3,
            set_op("b", Value::Int(2)),
            &limits,
        )
        .unwrap();
        submit(&StateKind, &mut room, "u0", 4, del_op("a"), &limits).unwrap();
        let changed = room.changed_since(2).unwrap();
        assert_eq!(
            changed,
            vec![
                ("a", &Slot::new(None, 4)),
                ("b", &Slot::new(Some(Value::Int(2)), 3)),
            ]
        );
        assert_eq!(room.changed_since(4), Some(vec![]));
    }

    #[test]
    fn pruning_drops_old_tombstones_only() {
        let limits = Limits::default();
        let mut room = created(&StateKind, Value::Null, &limits);
        submit(
            &StateKind,
            &mut room,
            "u0",
            2,
            set_op("a", Value::Int(1)),
            &limits,
        )
        .unwrap();
        submit(
            &StateKind,
            &mut room,
            "u0",
            3,
            set_op("b", Value::Int(2)),
            &limits,
        )
        .unwrap();
        submit(&StateKind, &mut room, "u0", 4, del_op("a"), &limits).unwrap();
        submit(&StateKind, &mut room, "u0", 5, del_op("b"), &limits).unwrap();
        submit(
            &StateKind,
            &mut room,
            "u0",
            6,
            set_op("c", Value::Int(3)),
            &limits,
        )
        .unwrap();
        room.prune_tombstones(4);
        assert_eq!(room.get("a"), None);
        assert_eq!(room.get("b"), Some(&Slot::new(None, 5)));
        assert!(room.get("c").is_some());
    }

    #[test]
    fn changed_since_below_the_floor_is_none() {
        let limits = Limits::default();
        let mut room = created(&StateKind, Value::Null, &limits);
        submit(
            &StateKind,
            &mut room,
            "u0",
            2,
            set_op("a", Value::Int(1)),
            &limits,
        )
        .unwrap();
        submit(&StateKind, &mut room, "u0", 3, del_op("a"), &limits).unwrap();
        room.prune_tombstones(3);
        assert_eq!(room.changed_since(2), None);
        assert_eq!(room.changed_since(0), None);
        assert_eq!(room.changed_since(3), Some(vec![]));
    }

    #[test]
    fn the_tombstone_floor_never_goes_down() {
        let mut room = RoomState::new();
        room.prune_tombstones(10);
        room.prune_tombstones(4);
        assert_eq!(room.changed_since(9), None);
        assert_eq!(room.changed_since(10), Some(vec![]));
    }

    #[test]
    fn op_must_be_a_map_with_a_string_type() {
        let room = created(&StateKind, Value::Null, &Limits::default());
        let limits = Limits::default();
        for (op, field) in [
            (Value::Int(1), "map"),
            (Value::map([("key", s("a"))]), "\"type\""),
            (Value::map([("type", Value::Int(3))]), "\"type\""),
        ] {
            let refusal = StateKind
                .reduce(&room, &op, &ctx("u0", 2), &limits)
                .unwrap_err();
            assert_eq!(refusal.code, RefuseCode::Invalid);
            assert!(refusal.msg.contains(field), "{}", refusal.msg);
        }
    }

    #[test]
    fn a_panic_in_kind_code_becomes_its_message() {
        assert_eq!(catch_panic(|| 7), Ok(7));
        let index = 3;
        let failed = catch_panic(|| -> u8 { panic!("index {index} out of range") });
        assert_eq!(failed, Err("index 3 out of range".to_owned()));
    }

    #[test]
    fn refusal_displays_code_and_message() {
        let refusal = Refusal::new(RefuseCode::TooLarge, "text of 5 bytes exceeds limit of 4");
        assert_eq!(
            refusal.to_string(),
            "TooLarge: text of 5 bytes exceeds limit of 4"
        );
    }
}
