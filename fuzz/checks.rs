//! The properties the fuzz targets check, one `check_*` function per target.
//!
//! Shared by the libFuzzer targets in `fuzz/fuzz_targets/` (nightly, cargo-fuzz) and by
//! the stable test `tests/fuzz_corpus.rs`, which replays the committed seed corpora in
//! `fuzz/corpus/<target>/` so CI needs no nightly. Both include this file with
//! `#[path]`, so it may use only `roomd` and std. Every check takes arbitrary bytes and
//! panics exactly when roomd breaks a property; a panic inside roomd is a finding too.

use roomd::kind::{Changes, ChatKind, Ctx, Limits, PollKind, RoomKind, RoomState, StateKind};

/// The built-in kinds the generator knows how to shape inits and ops for.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Chat,
    Poll,
    State,
}

impl Kind {
    fn rules(self) -> &'static dyn RoomKind {
        match self {
            Kind::Chat => &ChatKind,
            Kind::Poll => &PollKind,
            Kind::State => &StateKind,
        }
    }
}
use roomd::protocol::message::{ClientMsg, WireValue};
use roomd::protocol::{binary, json, Inbound};
use roomd::store::{Batch, Durability, EventRecord, RoomMeta, StorageBackend, Store};
use roomd::value::{Value, MAX_DEPTH};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// `decode_json`: any text decodes to a request or a `BadFrame`, and every value a frame
/// carries survives JSON and flat-node round trips.
pub fn check_decode_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(inbound) = json::decode(text) {
        check_inbound_values(&inbound);
    }
}

/// `decode_rkyv`: any bytes decode to a request or a `BadFrame` without panicking or
/// aborting (bytecheck validates first; nesting is flat), whether read as a client or a
/// server message; and a server message that validates re-encodes to a fixed point.
pub fn check_decode_rkyv(data: &[u8]) {
    if let Ok(inbound) = binary::decode(data) {
        check_inbound_values(&inbound);
    }
    if let Ok(msg) = binary::decode_server(data) {
        // Both encoders must cope with whatever a valid archive holds (non-finite floats
        // and malformed node lists included); compare bytes, since NaN != NaN.
        let _ = json::encode(&msg);
        let bytes = binary::encode(&msg);
        let again = binary::decode_server(&bytes).expect("an encoded ServerMsg decodes");
        assert_eq!(binary::encode(&again), bytes, "re-encoding is not stable");
    }
}

/// `wire_value_roundtrip`: a value generated from the bytes survives flattening, an rkyv
/// `ClientMsg::Op` frame, and (when JSON can express it) the JSON conversion.
pub fn check_wire_value_roundtrip(data: &[u8]) {
    let mut gen = Gen::new(data);
    let value = gen.value(0);
    assert!(value.depth() <= MAX_DEPTH);
    let wire = WireValue::from_value(&value);
    if has_b64_lookalike(&value) {
        // No JSON form, so the wire refuses it (see `WireValue::to_value`).
        assert!(
            wire.to_value().is_err(),
            "b64 look-alike accepted: {wire:?}"
        );
        return;
    }
    assert_eq!(wire.to_value(), Ok(value.clone()), "flat nodes: {wire:?}");

    let msg = ClientMsg::Op {
        id: "c1".into(),
        room: "state:fuzz".into(),
        op: wire,
    };
    let frame = binary::encode_client(&msg);
    match binary::decode(&frame) {
        Ok(Inbound::Op { id, room, op }) => {
            assert_eq!((id.as_str(), room.as_str()), ("c1", "state:fuzz"));
            assert_eq!(op, Ok(value.clone()), "rkyv op frame");
        }
        other => panic!("an encoded op decodes as {other:?}"),
    }

    assert_json_round_trip(&value);
}

/// True when some map in `value` has `$b64` as its only key with a string value.
fn has_b64_lookalike(value: &Value) -> bool {
    match value {
        Value::List(items) => items.iter().any(has_b64_lookalike),
        Value::Map(map) => {
            (map.len() == 1 && matches!(map.get("$b64"), Some(Value::Str(_))))
                || map.values().any(has_b64_lookalike)
        }
        _ => false,
    }
}

/// `reduce_state`: a sequence of ops generated from the bytes, against a room of each
/// kind, never panics; each accepted event names a key at most once, and `undo` after
/// `apply` restores the state exactly.
pub fn check_reduce_state(data: &[u8]) {
    let mut gen = Gen::new(data);
    let kind = [Kind::Chat, Kind::Poll, Kind::State][usize::from(gen.byte() % 3)];
    // Small limits, so short inputs reach the size and count refusals.
    let limits = Limits {
        max_keys: 8,
        max_room_bytes: 600,
        max_value_bytes: 96,
        max_key_bytes: 12,
        max_chat_history: 6,
        default_chat_history: 3,
        max_text_bytes: 16,
    };
    let init = gen.init(kind);
    let creator = ctx(USERS[0], 1);
    let Ok(changes) = kind.rules().init(&init, &creator, &limits) else {
        return;
    };
    let mut room = RoomState::new();
    apply_checked(&mut room, 1, &changes);
    let mut seq = 1;
    for _ in 0..MAX_OPS {
        if gen.is_empty() {
            break;
        }
        let user = USERS[usize::from(gen.byte()) % USERS.len()];
        let op = gen.op(kind, seq);
        let at = ctx(user, seq + 1);
        let result = kind.rules().reduce(&room, &op, &at, &limits);
        assert_eq!(
            result,
            kind.rules().reduce(&room, &op, &at, &limits),
            "reduce is not deterministic"
        );
        if let Ok(changes) = result {
            seq += 1;
            apply_checked(&mut room, seq, &changes);
        }
        if gen.byte() == 0xff {
            room.prune_tombstones(seq / 2);
        }
    }
}

/// `store_faults`: batches, trims and deletions written through the real store (writer
/// thread, group commit, probes, guarded reads) onto redb over an in-memory file that
/// fails writes and syncs, loses what was not synced (a crash), or has bytes flipped,
/// checked against a model of what was acknowledged. Properties:
/// - nothing panics out of the store, whatever the file holds (redb's own panics on
///   damaged pages must come back as errors);
/// - without flipped bytes, every reopen succeeds and every room loads with every
///   acknowledged event, in order and unchanged, and nothing that was never submitted;
/// - with flipped bytes, opening and loading may fail, but as errors.
pub fn check_store_faults(data: &[u8]) {
    let mut gen = Gen::new(data);
    let file = FaultyFile::default();
    let mut model = StoreModel::default();
    let mut store = Store::open_with_backend(file.backend(), Durability::Immediate)
        .expect("an empty in-memory database opens");
    for _ in 0..MAX_STORE_STEPS {
        if gen.is_empty() {
            break;
        }
        match gen.byte() % 8 {
            0..=3 => {
                let room = STORE_ROOMS[usize::from(gen.byte()) % STORE_ROOMS.len()];
                let n_events = 1 + usize::from(gen.byte() % 3);
                let events: Vec<Value> = (0..n_events).map(|_| gen.value(0)).collect();
                model.submit(&store, room, events);
            }
            4 => {
                // The next write or sync from now on fails (an I/O error).
                let after = u32::from(gen.byte() % 16);
                let sync = gen.byte() & 1 == 1;
                file.fail_after(after, sync);
            }
            5 => {
                if let Some(offset) = file.flip(u32::from_le_bytes(gen.bytes()), gen.byte()) {
                    model.flipped = true;
                    let _ = offset;
                }
            }
            6 => {
                // Restart: a clean shutdown, or a crash that keeps only what was synced.
                let crash = gen.byte() & 1 == 1;
                store.shutdown();
                drop(store);
                file.restart(crash);
                match Store::open_with_backend(file.backend(), Durability::Immediate) {
                    Ok(reopened) => store = reopened,
                    Err(error) => {
                        assert!(
                            model.flipped,
                            "reopening an undamaged file failed (crash {crash}): {error}"
                        );
                        return;
                    }
                }
                model.check_all(&store);
            }
            _ => {
                let room = STORE_ROOMS[usize::from(gen.byte()) % STORE_ROOMS.len()];
                model.check_room(&store, room);
            }
        }
    }
    model.check_all(&store);
    store.shutdown();
}

/// Steps per input.
const MAX_STORE_STEPS: usize = 48;

const STORE_ROOMS: [&str; 3] = ["r0", "r1", "r2"];

/// What the store acknowledged, per room.
#[derive(Default)]
struct StoreModel {
    /// Events acknowledged (their batch's receiver said Ok), by room, in seq order.
    acked: BTreeMap<String, Vec<Value>>,
    /// Events submitted but not acknowledged after the acked ones: they may or may not
    /// have reached the file (a failed commit can land), so a load may show a prefix.
    maybe: BTreeMap<String, Vec<Value>>,
    /// Whether a byte of the file was flipped: from then on, loads may fail.
    flipped: bool,
    /// Whether a write failed: the store refuses writes until restart.
    failed: bool,
}

impl StoreModel {
    fn head(&self, room: &str) -> u64 {
        self.acked.get(room).map_or(0, |events| events.len() as u64)
    }

    fn submit(&mut self, store: &Store, room: &str, ops: Vec<Value>) {
        if self.maybe.get(room).is_some_and(|m| !m.is_empty()) {
            // The room's head is unknown until a reopen shows which events landed.
            return;
        }
        let head = self.head(room);
        let events: Vec<EventRecord> = ops
            .iter()
            .enumerate()
            .map(|(i, op)| EventRecord {
                seq: head + 1 + i as u64,
                user: "u".into(),
                ts_ms: 1,
                op: op.clone(),
                changes: Changes::default(),
                op_id: None,
            })
            .collect();
        let batch = Batch {
            create: (head == 0).then_some(RoomMeta {
                kind: "state".to_owned(),
                epoch: 7,
            }),
            events,
            ..Batch::new(room)
        };
        let outcome = match store.submit(batch) {
            Ok(receiver) => receiver.blocking_recv().unwrap_or_else(|_| {
                Err(roomd::store::StoreError::ShutDown {
                    path: "writer gone".into(),
                })
            }),
            Err(_) => return,
        };
        match outcome {
            Ok(()) => self.acked.entry(room.to_owned()).or_default().extend(ops),
            Err(error) => {
                if !self.flipped {
                    assert!(
                        self.failed || matches!(error, roomd::store::StoreError::Commit { .. }),
                        "a batch failed without an I/O fault or damage: {error}"
                    );
                }
                self.failed = true;
                self.maybe.entry(room.to_owned()).or_default().extend(ops);
            }
        }
    }

    fn check_all(&mut self, store: &Store) {
        for room in STORE_ROOMS {
            self.check_room(store, room);
        }
        // After a reopen the store takes writes again.
        self.failed = false;
    }

    /// Loads `room` and compares it with the model; after a successful load the events
    /// that landed become acknowledged and the rest are forgotten.
    fn check_room(&mut self, store: &Store, room: &str) {
        let loaded = match store.load_room(room) {
            Ok(loaded) => loaded,
            Err(error) => {
                assert!(
                    self.flipped || self.failed,
                    "room {room} of an undamaged file does not load: {error}"
                );
                return;
            }
        };
        if self.flipped {
            // Bytes inside a value can change without redb noticing (it checks page
            // checksums only when it repairs): only the absence of panics holds.
            return;
        }
        let acked = self.acked.get(room).cloned().unwrap_or_default();
        let maybe = self.maybe.get(room).cloned().unwrap_or_default();
        let ops: Vec<Value> = match &loaded {
            None => Vec::new(),
            Some(loaded) => loaded.events.iter().map(|e| e.op.clone()).collect(),
        };
        assert!(
            ops.len() >= acked.len() && ops.len() <= acked.len() + maybe.len(),
            "room {room}: loaded {} events, acked {}, maybe {}",
            ops.len(),
            acked.len(),
            maybe.len()
        );
        let expected = acked.iter().chain(&maybe).take(ops.len());
        for (seq, (found, wanted)) in ops.iter().zip(expected).enumerate() {
            assert_eq!(found, wanted, "room {room}: event {} differs", seq + 1);
        }
        if let Some(loaded) = &loaded {
            assert_eq!(loaded.head, ops.len() as u64, "room {room}: head");
        }
        if !self.failed {
            // What landed is now known: it is the room's log from here on.
            self.acked.insert(room.to_owned(), ops);
            self.maybe.remove(room);
        }
    }
}

/// An in-memory file under redb: `live` is what redb wrote, `synced` what the last
/// successful sync made durable (a crash restarts from it). Writes and syncs can be set
/// to fail.
#[derive(Clone, Default)]
struct FaultyFile {
    state: Arc<Mutex<FileState>>,
}

#[derive(Default)]
struct FileState {
    live: Vec<u8>,
    synced: Vec<u8>,
    /// Fail the write or sync after this many more succeed.
    fail_after: Option<(u32, bool)>,
}

impl FaultyFile {
    fn backend(&self) -> FaultyBackend {
        FaultyBackend { file: self.clone() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FileState> {
        // A panic while holding it is a finding already; read through the poison.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail_after(&self, after: u32, sync: bool) {
        self.lock().fail_after = Some((after, sync));
    }

    /// XORs `mask` (made nonzero) into the live and synced byte at `at` modulo the
    /// length; None for an empty file.
    fn flip(&self, at: u32, mask: u8) -> Option<usize> {
        let mut state = self.lock();
        if state.live.is_empty() {
            return None;
        }
        let offset = at as usize % state.live.len();
        let mask = mask.max(1);
        state.live[offset] ^= mask;
        if offset < state.synced.len() {
            state.synced[offset] ^= mask;
        }
        Some(offset)
    }

    /// Before a reopen: faults are cleared, and a crash drops what was not synced.
    fn restart(&self, crash: bool) {
        let mut state = self.lock();
        state.fail_after = None;
        if crash {
            state.live = state.synced.clone();
        }
    }

    /// Counts down an armed fault for a write (`sync` false) or sync; true: fail this one.
    fn fault(&self, sync: bool) -> bool {
        let mut state = self.lock();
        match state.fail_after {
            Some((0, on_sync)) if on_sync == sync => true,
            Some((n, on_sync)) if on_sync == sync => {
                state.fail_after = Some((n - 1, on_sync));
                false
            }
            _ => false,
        }
    }
}

#[derive(Clone)]
struct FaultyBackend {
    file: FaultyFile,
}

impl std::fmt::Debug for FaultyBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FaultyBackend({} bytes)", self.file.lock().live.len())
    }
}

fn injected() -> std::io::Error {
    std::io::Error::other("injected I/O failure")
}

impl StorageBackend for FaultyBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.file.lock().live.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let state = self.file.lock();
        let start = usize::try_from(offset).map_err(|_| injected())?;
        let end = start.checked_add(out.len()).ok_or_else(injected)?;
        let bytes = state.live.get(start..end).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the end")
        })?;
        out.copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        if self.file.fault(false) {
            return Err(injected());
        }
        let len = usize::try_from(len).map_err(|_| injected())?;
        self.file.lock().live.resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        if self.file.fault(true) {
            return Err(injected());
        }
        let mut state = self.file.lock();
        state.synced = state.live.clone();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        if self.file.fault(false) {
            return Err(injected());
        }
        let mut state = self.file.lock();
        let start = usize::try_from(offset).map_err(|_| injected())?;
        let end = start.checked_add(data.len()).ok_or_else(injected)?;
        if state.live.len() < end {
            state.live.resize(end, 0);
        }
        state.live[start..end].copy_from_slice(data);
        Ok(())
    }
}

const USERS: [&str; 3] = ["u0", "u1", "u2"];

/// Ops per input: enough for eviction and limits, few enough to keep execs fast.
const MAX_OPS: usize = 64;

fn ctx(user: &str, seq: u64) -> Ctx<'_> {
    Ctx {
        user,
        now_ms: 1_700_000_000_000 + seq as i64,
        seq,
    }
}

fn apply_checked(room: &mut RoomState, seq: u64, changes: &Changes) {
    for list in [&changes.public, &changes.private] {
        let mut keys: Vec<&str> = list.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        let n = keys.len();
        keys.dedup();
        assert_eq!(keys.len(), n, "an event names a key twice: {changes:?}");
    }
    let before = room.clone();
    let undo = room.apply(seq, changes);
    for (key, _) in &changes.public {
        let slot = room.get(key).expect("an applied public key has a slot");
        assert_eq!(slot.ver, seq, "{key} not stamped with the event seq");
    }
    let scanned: usize = room
        .entries()
        .map(|(k, slot)| k.len() + slot.value.as_ref().map_or(0, Value::json_size))
        .sum();
    assert_eq!(room.live_keys(), room.entries().count(), "live key count");
    assert_eq!(room.live_bytes(), scanned, "live byte count");
    room.undo(undo);
    assert_eq!(*room, before, "undo did not restore the state");
    let _ = room.apply(seq, changes);
}

fn check_inbound_values(inbound: &Inbound) {
    let value = match inbound {
        Inbound::Create { init, .. } => init,
        Inbound::Op { op, .. } => op,
        Inbound::Signal { data, .. } => data,
        Inbound::Sub { .. } | Inbound::Unsub { .. } | Inbound::Auth { .. } => return,
    };
    let Ok(value) = value else {
        return;
    };
    assert!(value.depth() <= MAX_DEPTH, "a decoded value is too deep");
    assert_eq!(
        WireValue::from_value(value).to_value().as_ref(),
        Ok(value),
        "flat nodes"
    );
    assert_json_round_trip(value);
}

/// A value the server writes as JSON text reads back as the same value, unless JSON
/// cannot express it (see [`json_expressible`]).
fn assert_json_round_trip(value: &Value) {
    if !json_expressible(value) {
        return;
    }
    let json = json::from_value(value);
    assert_eq!(json::to_value(&json).as_ref(), Ok(value), "JSON value");
    let text = json.to_string();
    let parsed: serde_json::Value = serde_json::from_str(&text).expect("written JSON parses");
    assert_eq!(
        json::to_value(&parsed).as_ref(),
        Ok(value),
        "JSON text {text}"
    );
}

/// False for values JSON cannot carry: a map whose only key is `$b64` with a string
/// value reads back as bytes (PROTOCOL.md "Value"). rkyv can carry such a map.
fn json_expressible(value: &Value) -> bool {
    match value {
        Value::List(items) => items.iter().all(json_expressible),
        Value::Map(map) => {
            let b64_lookalike = map.len() == 1 && matches!(map.get("$b64"), Some(Value::Str(_)));
            !b64_lookalike && map.values().all(json_expressible)
        }
        _ => true,
    }
}

/// Builds values and ops from fuzz bytes; once the bytes run out every read is 0, so
/// generation always ends.
struct Gen<'a> {
    data: &'a [u8],
}

/// Strings drawn for keys, texts and map keys: field names the reducers know, keys at
/// and past the small limits, a `$b64` lookalike, and non-ASCII.
const WORDS: [&str; 16] = [
    "type",
    "key",
    "value",
    "if_ver",
    "by",
    "text",
    "msg",
    "option",
    "a",
    "b/c",
    "",
    "$b64",
    "exactly12byt",
    "thirteen-byte",
    "héllo ✓",
    "a text longer than sixteen bytes",
];

const OP_TYPES: [&str; 10] = [
    "post", "edit", "delete", "vote", "retract", "close", "set", "del", "incr", "create",
];

impl<'a> Gen<'a> {
    fn new(data: &'a [u8]) -> Self {
        Gen { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        for b in &mut out {
            *b = self.byte();
        }
        out
    }

    fn word(&mut self) -> String {
        WORDS[usize::from(self.byte()) % WORDS.len()].to_owned()
    }

    fn int(&mut self) -> i64 {
        match self.byte() % 8 {
            0 => i64::MAX,
            1 => i64::MIN,
            2 => i64::from_le_bytes(self.bytes()),
            n => i64::from(n) - 4,
        }
    }

    fn string(&mut self) -> String {
        if self.byte().is_multiple_of(4) {
            let len = usize::from(self.byte() % 24);
            let raw: Vec<u8> = (0..len).map(|_| self.byte()).collect();
            String::from_utf8_lossy(&raw).into_owned()
        } else {
            self.word()
        }
    }

    /// Any value at `depth`; containers stop at [`MAX_DEPTH`].
    fn value(&mut self, depth: usize) -> Value {
        let tag = self.byte() % 8;
        match tag {
            0 => Value::Null,
            1 => Value::Bool(self.byte() & 1 == 1),
            2 => Value::Int(self.int()),
            3 => {
                let f = f64::from_le_bytes(self.bytes());
                Value::Float(if f.is_finite() { f } else { 0.5 })
            }
            4 => Value::Str(self.string()),
            5 => {
                let len = usize::from(self.byte() % 16);
                Value::Bytes((0..len).map(|_| self.byte()).collect())
            }
            _ if depth >= MAX_DEPTH => Value::Null,
            6 => {
                let len = usize::from(self.byte() % 6);
                Value::List((0..len).map(|_| self.value(depth + 1)).collect())
            }
            _ => {
                let len = usize::from(self.byte() % 6);
                Value::Map(
                    (0..len)
                        .map(|_| (self.string(), self.value(depth + 1)))
                        .collect(),
                )
            }
        }
    }

    /// A creation `init` shaped for `kind` most of the time, anything otherwise.
    fn init(&mut self, kind: Kind) -> Value {
        if self.byte().is_multiple_of(8) {
            return self.value(0);
        }
        match kind {
            Kind::Chat => match self.byte() % 3 {
                0 => Value::Null,
                _ => Value::map([("history", Value::Int(self.int()))]),
            },
            Kind::Poll => {
                let n = usize::from(self.byte() % 36);
                Value::map([
                    ("question", Value::Str(self.string())),
                    (
                        "options",
                        Value::List((0..n).map(|_| Value::Str(self.string())).collect()),
                    ),
                ])
            }
            Kind::State => {
                let n = usize::from(self.byte() % 4);
                let entries = (0..n).map(|_| (self.word(), self.value(2))).collect();
                Value::map([("entries", Value::Map(entries))])
            }
        }
    }

    /// An op: a map with a `type` (usually one of `kind`'s) and fields the reducers
    /// read, holding plausible or arbitrary values.
    fn op(&mut self, kind: Kind, seq: u64) -> Value {
        let selector = self.byte();
        if selector.is_multiple_of(16) {
            return self.value(0);
        }
        let own = match kind {
            Kind::Chat => &OP_TYPES[0..3],
            Kind::Poll => &OP_TYPES[3..6],
            Kind::State => &OP_TYPES[6..9],
        };
        let kind_name = if selector % 16 == 1 {
            OP_TYPES[usize::from(self.byte()) % OP_TYPES.len()]
        } else {
            own[usize::from(self.byte()) % own.len()]
        };
        let mut op = std::collections::BTreeMap::new();
        op.insert("type".to_owned(), Value::Str(kind_name.to_owned()));
        let fields = self.byte();
        let recent = |back: u8| Value::Int(seq as i64 - i64::from(back % 4));
        if fields & 1 != 0 {
            op.insert("key".into(), Value::Str(self.word()));
        }
        if fields & 2 != 0 {
            op.insert("value".into(), self.value(1));
        }
        if fields & 4 != 0 {
            let back = self.byte();
            op.insert("if_ver".into(), recent(back));
        }
        if fields & 8 != 0 {
            op.insert("by".into(), Value::Int(self.int()));
        }
        if fields & 16 != 0 {
            op.insert("text".into(), Value::Str(self.string()));
        }
        if fields & 32 != 0 {
            let back = self.byte();
            op.insert("msg".into(), recent(back));
        }
        if fields & 64 != 0 {
            op.insert("option".into(), Value::Int(i64::from(self.byte() % 6) - 1));
        }
        if fields & 128 != 0 {
            let (name, value) = (self.word(), self.value(1));
            op.insert(name, value);
        }
        Value::Map(op)
    }
}
