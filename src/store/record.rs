//! The byte format of the rows in the store's tables: event records, room metadata and
//! snapshots.
//!
//! The rkyv types here are private to the store and are deliberately not the wire
//! protocol's types, so the log format and the protocol can change independently; the
//! conversions to and from the domain types ([`EventRecord`], [`RoomMeta`], [`Snapshot`],
//! [`Value`]) are explicit. Table layout and keys are `tables.rs`'s business; this file
//! only turns one row into bytes and back.
//!
//! Every row is one format-version byte followed by an rkyv archive; each row type has its
//! own version ([`BATCH_VERSION`], [`META_VERSION`], [`SNAPSHOT_VERSION`]). Log rows hold
//! one room batch's events; the event rows of one event that older builds wrote
//! ([`EVENT_VERSION`] and before) read as log rows of one event ([`LogRow`]). Meta rows of
//! version 1 (before retention, so without a first retained seq) are still read, as
//! untrimmed rooms. A [`Value`] is stored flat, as its nodes in pre-order, so no archived
//! type is recursive and validation cost is linear. Decoding checks the size limit first,
//! then goes through `rkyv::access` (validated), and rebuilds values with an explicit
//! stack bounded by [`MAX_RECORD_DEPTH`]: bad bytes on disk give a [`RecordError`], never
//! a panic.

use std::collections::BTreeMap;

use rkyv::rancor;

use super::{EventRecord, RoomMeta, Snapshot};
use crate::kind::{Changes, Slot};
use crate::value::{Value, MAX_DEPTH};

/// The version byte of the rows of one event (with its op id) that builds before batch
/// rows wrote (data dir format 2); read, no longer written. A reader refuses any version
/// it does not know rather than guessing at the layout.
pub const EVENT_VERSION: u8 = 2;
/// Event rows written before op ids moved into them: read as events without an op id.
const EVENT_VERSION_NO_OP_ID: u8 = 1;
/// The version byte of log rows written now: one room batch's events in one row
/// ([`encode_log_row`]), stored under the seq of its last event. Rows of one event
/// ([`EVENT_VERSION`], [`EVENT_VERSION_NO_OP_ID`]) are still read ([`log_row`]): an
/// event row is a log row of one event.
pub const BATCH_VERSION: u8 = 3;
/// The version byte of meta rows written now (with the kind's name and the first
/// retained seq).
pub const META_VERSION: u8 = 3;
/// Meta rows written while kinds were a closed set, stored as a code (0 chat, 1 poll,
/// 2 state): read, never written.
const META_VERSION_CODED: u8 = 2;
/// Meta rows written before retention existed: kind code, epoch and head only.
const META_VERSION_UNTRIMMED: u8 = 1;
/// The version byte in front of every snapshot row.
pub const SNAPSHOT_VERSION: u8 = 1;

/// The deepest value a row holds. Client values (an op, an `init`) are at most
/// [`MAX_DEPTH`] deep, checked at the wire; the log records a creation as the op
/// `{"type":"create","kind":…,"init":init}`, one map around the client's `init`, so its
/// op is one level deeper. Entry values and snapshots are parts of client values, so they
/// stay within [`MAX_DEPTH`]. A row the store writes must be one it reads back, so both
/// directions use this bound; valid input must never fail here (it would be nacked
/// `unavailable`, a store failure, rather than `invalid`).
pub const MAX_RECORD_DEPTH: usize = MAX_DEPTH + 1;

/// The largest event or meta row, in bytes, this store writes or reads. Checked before
/// validation so a corrupt length cannot make the reader walk gigabytes; checked on write
/// so the store never writes a row it would refuse to read back.
pub const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

/// The largest log row ([`BATCH_VERSION`]), in bytes: one event of up to
/// [`MAX_RECORD_BYTES`] with the row's own few bytes around it. A room batch whose row
/// would be larger is written as several rows (`tables::encode_events`).
pub const MAX_LOG_ROW_BYTES: usize = MAX_RECORD_BYTES + 4096;

/// The largest snapshot row, in bytes. A snapshot holds a whole room (tombstones and
/// private facts included), so its bound is twice the default room limit of 64 MiB
/// (`Limits::max_room_bytes`) rather than the event row bound.
pub const MAX_SNAPSHOT_BYTES: usize = 128 * 1024 * 1024;

/// Why a row could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record is empty")]
    Empty,
    #[error("record of {len} bytes exceeds limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error(
        "record format version {found} is not supported (this roomd reads version {expected})"
    )]
    Version { found: u8, expected: u8 },
    #[error("record bytes fail validation: {reason}")]
    Invalid { reason: String },
    #[error("record could not be serialized: {reason}")]
    Serialize { reason: String },
    #[error("value nests deeper than {MAX_RECORD_DEPTH} levels")]
    TooDeep,
    #[error(
        "list or map of {len} items exceeds the record limit of {} items",
        u32::MAX
    )]
    TooLong { len: usize },
    #[error("float {value} is not finite")]
    NonFinite { value: f64 },
    #[error("map key at node {index} is not a string")]
    MapKeyNotString { index: usize },
    #[error("map repeats key {key:?}")]
    DuplicateKey { key: String },
    #[error("value ends after {n_nodes} nodes inside an unfinished list or map")]
    Truncated { n_nodes: usize },
    #[error("value has {n_trailing} nodes after its end")]
    Trailing { n_trailing: usize },
    #[error("room kind code {code} is unknown")]
    UnknownKind { code: u8 },
    /// Snapshot entries are stored in strictly ascending key order, so a repeat cannot
    /// hide in a snapshot and a reader can rebuild its maps without checks.
    #[error("snapshot key {key:?} at entry {index} does not sort after the entry before it")]
    KeyOrder { key: String, index: usize },
    #[error("snapshot entry {key:?} has ver {ver}, after the snapshot's seq {seq}")]
    VerAfterSeq { key: String, ver: u64, seq: u64 },
    #[error("snapshot tombstone floor {floor} is after the snapshot's seq {seq}")]
    FloorAfterSeq { floor: u64, seq: u64 },
    #[error(
        "log row stored under seq {last} holds {len} events from seq {first}, which do not end there"
    )]
    RowSpan { first: u64, len: usize, last: u64 },
    #[error("seq {seq} is outside the log row {first}..={last}")]
    NotInRow { seq: u64, first: u64, last: u64 },
    #[error("meta row's first retained seq {first_retained} is past head {head} + 1, or 0")]
    RetainedPastHead { first_retained: u64, head: u64 },
}

/// One node of a flattened [`Value`]. A container node carries its item count and is
/// followed by its items in pre-order; a map's items alternate key (`Str`) and value.
#[derive(rkyv::Archive, rkyv::Serialize)]
enum Node {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(u32),
    Map(u32),
}

/// A [`Value`] as its nodes in pre-order.
#[derive(rkyv::Archive, rkyv::Serialize)]
struct FlatValue {
    nodes: Vec<Node>,
}

/// One changed entry: `value` is `None` when the change deletes the key.
#[derive(rkyv::Archive, rkyv::Serialize)]
struct ChangeRow {
    key: String,
    value: Option<FlatValue>,
}

/// The stored form of an [`EventRecord`]. The seq is not repeated here: it is the
/// row's key, and the key is authoritative. The op id rides in the row, so a commit
/// writes one row per op (the `op_ids` table only keeps ids whose events were trimmed).
// Only its archived form is read (rows are written as [`EventRowRef`]); the tests
// build one to check the two give the same bytes.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(rkyv::Archive, rkyv::Serialize)]
struct EventRow {
    user: String,
    ts_ms: i64,
    op: FlatValue,
    public: Vec<ChangeRow>,
    private: Vec<ChangeRow>,
    op_id: Option<String>,
}

/// The rows an event is written as: [`EventRow`], [`ChangeRow`], [`FlatValue`] and
/// [`Node`] borrowing the record's strings instead of owning copies. Same fields, same
/// order, and `Inline` archives a `&String` exactly as a `String`, so the bytes are
/// those of the owned rows (a test holds them equal) and each string is copied once,
/// into the archive.
#[derive(rkyv::Archive, rkyv::Serialize)]
enum NodeRef<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(#[rkyv(with = rkyv::with::Inline)] &'a String),
    Bytes(#[rkyv(with = rkyv::with::Inline)] &'a Vec<u8>),
    List(u32),
    Map(u32),
}

#[derive(rkyv::Archive, rkyv::Serialize)]
struct FlatValueRef<'a> {
    nodes: Vec<NodeRef<'a>>,
}

#[derive(rkyv::Archive, rkyv::Serialize)]
struct ChangeRowRef<'a> {
    #[rkyv(with = rkyv::with::Inline)]
    key: &'a String,
    value: Option<FlatValueRef<'a>>,
}

#[derive(rkyv::Archive, rkyv::Serialize)]
struct EventRowRef<'a> {
    #[rkyv(with = rkyv::with::Inline)]
    user: &'a String,
    ts_ms: i64,
    op: FlatValueRef<'a>,
    public: Vec<ChangeRowRef<'a>>,
    private: Vec<ChangeRowRef<'a>>,
    #[rkyv(with = rkyv::with::Map<rkyv::with::Inline>)]
    op_id: Option<&'a String>,
}

/// The stored form of one room batch's events ([`BATCH_VERSION`]): the seq of the
/// first, then each event as its own [`EventRow`] would hold it. The row's key is the
/// seq of the last event, so a range read from seq `s` finds the row holding `s` first.
// Only its archived form is read (rows are written as [`BatchRowRef`]).
#[cfg_attr(not(test), allow(dead_code))]
#[derive(rkyv::Archive, rkyv::Serialize)]
struct BatchRow {
    first: u64,
    events: Vec<EventRow>,
}

/// [`BatchRow`] borrowing the records' strings, as [`EventRowRef`] does: the same bytes.
#[derive(rkyv::Archive, rkyv::Serialize)]
struct BatchRowRef<'a> {
    first: u64,
    events: Vec<EventRowRef<'a>>,
}

/// An event row of [`EVENT_VERSION_NO_OP_ID`]; read, never written.
// Only its archived form is read; the tests build one to read back.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(rkyv::Archive, rkyv::Serialize)]
struct EventRowNoOpId {
    user: String,
    ts_ms: i64,
    op: FlatValue,
    public: Vec<ChangeRow>,
    private: Vec<ChangeRow>,
}

/// The stored form of a room's metadata, with the head seq written in the same
/// transaction as the events that advance it, and the first retained seq in the same
/// transaction as the trimming that advances it.
#[derive(rkyv::Archive, rkyv::Serialize)]
struct MetaRow {
    /// The kind's name, as [`crate::kind::RoomKind::name`] returns it.
    kind: String,
    epoch: u64,
    head: u64,
    first_retained: u64,
}

/// A meta row of [`META_VERSION_CODED`]; read, never written.
// Only its archived form is read; the tests build one to read back.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(rkyv::Archive, rkyv::Serialize)]
struct MetaRowCoded {
    kind: u8,
    epoch: u64,
    head: u64,
    first_retained: u64,
}

/// A meta row of [`META_VERSION_UNTRIMMED`]; read, never written.
// Only its archived form is read; the tests build one to read back.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(rkyv::Archive, rkyv::Serialize)]
struct MetaRowUntrimmed {
    kind: u8,
    epoch: u64,
    head: u64,
}

/// One public entry of a snapshot; `value` is `None` for a tombstone.
#[derive(rkyv::Archive, rkyv::Serialize)]
struct SlotRow {
    key: String,
    value: Option<FlatValue>,
    ver: u64,
}

/// One private fact of a snapshot.
#[derive(rkyv::Archive, rkyv::Serialize)]
struct PrivateRow {
    key: String,
    value: FlatValue,
}

/// The stored form of a [`Snapshot`]; its seq is the row's key, like an event's.
#[derive(rkyv::Archive, rkyv::Serialize)]
struct SnapshotRow {
    tombstone_floor: u64,
    public: Vec<SlotRow>,
    private: Vec<PrivateRow>,
}

/// A meta row decoded: the room's fixed facts and where its log starts and ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMeta {
    pub meta: RoomMeta,
    pub head: u64,
    /// The oldest seq whose event is still stored (`head + 1` when none is); 1 until the
    /// room is first trimmed.
    pub first_retained: u64,
}

/// Encodes an event (without its seq, which is the row key) as a row of
/// [`EVENT_VERSION`], as builds before batch rows wrote them: the tests write old files
/// with it.
#[cfg(test)]
pub fn encode_event(event: &EventRecord) -> Result<Vec<u8>, RecordError> {
    let row = EventRowRef {
        user: &event.user,
        ts_ms: event.ts_ms,
        op: flatten_ref(&event.op)?,
        public: change_rows_ref(&event.changes.public)?,
        private: change_rows_ref(&event.changes.private)?,
        op_id: event.op_id.as_ref(),
    };
    // Serialized straight behind the version byte: rkyv's positions are relative and
    // every archived type here has alignment 1 (the `unaligned` format), so the archive
    // reads the same from `bytes[1..]` as from a buffer of its own, with no copy.
    let mut bytes = Vec::with_capacity(256);
    bytes.push(EVENT_VERSION);
    let bytes = rkyv::api::high::to_bytes_in::<_, rancor::Error>(&row, bytes).map_err(|e| {
        RecordError::Serialize {
            reason: e.to_string(),
        }
    })?;
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge {
            len: bytes.len(),
            limit: MAX_RECORD_BYTES,
        });
    }
    Ok(bytes)
}

/// Encodes consecutive events (`events[i].seq == events[0].seq + i`, checked by the
/// caller) as one log row, stored under the last one's seq. Each string is copied once,
/// into the archive; nothing is built per event but its flattened values.
pub fn encode_log_row(events: &[EventRecord]) -> Result<Vec<u8>, RecordError> {
    let first = events.first().map_or(0, |event| event.seq);
    let rows = events
        .iter()
        .map(|event| {
            Ok(EventRowRef {
                user: &event.user,
                ts_ms: event.ts_ms,
                op: flatten_ref(&event.op)?,
                public: change_rows_ref(&event.changes.public)?,
                private: change_rows_ref(&event.changes.private)?,
                op_id: event.op_id.as_ref(),
            })
        })
        .collect::<Result<Vec<_>, RecordError>>()?;
    let row = BatchRowRef {
        first,
        events: rows,
    };
    // Behind the version byte, as `encode_event` does (alignment 1 throughout).
    let mut bytes = Vec::with_capacity(64 + 192 * events.len());
    bytes.push(BATCH_VERSION);
    let bytes = rkyv::api::high::to_bytes_in::<_, rancor::Error>(&row, bytes).map_err(|e| {
        RecordError::Serialize {
            reason: e.to_string(),
        }
    })?;
    if bytes.len() > MAX_LOG_ROW_BYTES {
        return Err(RecordError::TooLarge {
            len: bytes.len(),
            limit: MAX_LOG_ROW_BYTES,
        });
    }
    Ok(bytes)
}

/// A validated row of the events table, stored under `last`: the events
/// `first()..=last()`, each read on demand. Rows of one event (either older version)
/// and batch rows read alike.
pub struct LogRow<'a> {
    last: u64,
    row: RowRef<'a>,
}

enum RowRef<'a> {
    NoOpId(&'a ArchivedEventRowNoOpId),
    Event(&'a ArchivedEventRow),
    Batch(&'a ArchivedBatchRow),
}

/// One event inside a [`LogRow`].
enum EventRef<'a> {
    NoOpId(&'a ArchivedEventRowNoOpId),
    Event(&'a ArchivedEventRow),
}

/// Validates the row stored under `last` (size first, then the whole archive) and checks
/// that its events end at `last`. Decoding an event from it is then [`LogRow::event`].
pub fn log_row(last: u64, bytes: &[u8]) -> Result<LogRow<'_>, RecordError> {
    let row = match bytes.first() {
        Some(&EVENT_VERSION_NO_OP_ID) => {
            RowRef::NoOpId(access(bytes, EVENT_VERSION_NO_OP_ID, MAX_RECORD_BYTES)?)
        }
        Some(&EVENT_VERSION) => RowRef::Event(access(bytes, EVENT_VERSION, MAX_RECORD_BYTES)?),
        _ => {
            let row: &ArchivedBatchRow = access(bytes, BATCH_VERSION, MAX_LOG_ROW_BYTES)?;
            let first = row.first.to_native();
            let len = row.events.len();
            let ends_at_last =
                len > 0 && first >= 1 && first.checked_add(len as u64 - 1) == Some(last);
            if !ends_at_last {
                return Err(RecordError::RowSpan { first, len, last });
            }
            RowRef::Batch(row)
        }
    };
    Ok(LogRow { last, row })
}

impl<'a> LogRow<'a> {
    /// The seq of the row's first event.
    pub fn first(&self) -> u64 {
        match self.row {
            RowRef::Batch(row) => row.first.to_native(),
            RowRef::NoOpId(_) | RowRef::Event(_) => self.last,
        }
    }

    /// The seq of the row's last event: its key.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// How many events the row holds.
    pub fn len(&self) -> u64 {
        self.last - self.first() + 1
    }

    /// The event `seq`, or an error naming the row's span when the row does not hold it.
    fn at(&self, seq: u64) -> Result<EventRef<'a>, RecordError> {
        if !(self.first()..=self.last).contains(&seq) {
            return Err(RecordError::NotInRow {
                seq,
                first: self.first(),
                last: self.last,
            });
        }
        Ok(match self.row {
            RowRef::NoOpId(row) => EventRef::NoOpId(row),
            RowRef::Event(row) => EventRef::Event(row),
            RowRef::Batch(row) => {
                EventRef::Event(&row.events[(seq - row.first.to_native()) as usize])
            }
        })
    }

    /// Rebuilds the event `seq` ([`RecordError::NotInRow`] outside `first()..=last()`).
    pub fn event(&self, seq: u64) -> Result<EventRecord, RecordError> {
        match self.at(seq)? {
            EventRef::NoOpId(row) => event_from_row(
                seq,
                &row.user,
                row.ts_ms.to_native(),
                &row.op,
                &row.public,
                &row.private,
                None,
            ),
            EventRef::Event(row) => event_from_row(
                seq,
                &row.user,
                row.ts_ms.to_native(),
                &row.op,
                &row.public,
                &row.private,
                row.op_id.as_ref().map(|id| id.as_str().to_owned()),
            ),
        }
    }

    /// The `(user, op id)` of the event `seq`, without rebuilding its op or changes.
    /// None for an event whose op carried no id, or a seq the row does not hold.
    pub fn op_id(&self, seq: u64) -> Option<(String, String)> {
        match self.at(seq).ok()? {
            EventRef::NoOpId(_) => None,
            EventRef::Event(row) => row
                .op_id
                .as_ref()
                .map(|id| (row.user.as_str().to_owned(), id.as_str().to_owned())),
        }
    }

    /// The timestamp of the event `seq`, for trimming by age; None for a seq the row
    /// does not hold.
    pub fn ts_ms(&self, seq: u64) -> Option<i64> {
        Some(match self.at(seq).ok()? {
            EventRef::NoOpId(row) => row.ts_ms.to_native(),
            EventRef::Event(row) => row.ts_ms.to_native(),
        })
    }
}

/// Rebuilds an event from the fields both row versions share.
fn event_from_row(
    seq: u64,
    user: &rkyv::string::ArchivedString,
    ts_ms: i64,
    op: &ArchivedFlatValue,
    public: &rkyv::vec::ArchivedVec<ArchivedChangeRow>,
    private: &rkyv::vec::ArchivedVec<ArchivedChangeRow>,
    op_id: Option<String>,
) -> Result<EventRecord, RecordError> {
    Ok(EventRecord {
        seq,
        user: user.as_str().to_owned(),
        ts_ms,
        op: unflatten(op)?,
        changes: Changes {
            public: changes_from_rows(public.as_slice())?,
            private: changes_from_rows(private.as_slice())?,
        },
        op_id,
    })
}

/// Decodes the event of a row of one event stored under `seq` (any layout), for tests.
#[cfg(test)]
pub fn decode_event(seq: u64, bytes: &[u8]) -> Result<EventRecord, RecordError> {
    log_row(seq, bytes)?.event(seq)
}

/// Encodes a room's metadata, head seq and first retained seq as a versioned row.
pub fn encode_meta(stored: &StoredMeta) -> Result<Vec<u8>, RecordError> {
    check_retained(stored.first_retained, stored.head)?;
    versioned(
        &MetaRow {
            kind: stored.meta.kind.clone(),
            epoch: stored.meta.epoch,
            head: stored.head,
            first_retained: stored.first_retained,
        },
        META_VERSION,
        MAX_RECORD_BYTES,
    )
}

/// Decodes a metadata row of any version; a version 1 row is an untrimmed room, and
/// rows of versions 1 and 2 name their kind by code.
pub fn decode_meta(bytes: &[u8]) -> Result<StoredMeta, RecordError> {
    let (kind, epoch, head, first_retained) = match bytes.first() {
        Some(&META_VERSION_UNTRIMMED) => {
            let row: &ArchivedMetaRowUntrimmed =
                access(bytes, META_VERSION_UNTRIMMED, MAX_RECORD_BYTES)?;
            let kind = kind_from_code(row.kind)?.to_owned();
            (kind, row.epoch.to_native(), row.head.to_native(), 1)
        }
        Some(&META_VERSION_CODED) => {
            let row: &ArchivedMetaRowCoded = access(bytes, META_VERSION_CODED, MAX_RECORD_BYTES)?;
            (
                kind_from_code(row.kind)?.to_owned(),
                row.epoch.to_native(),
                row.head.to_native(),
                row.first_retained.to_native(),
            )
        }
        _ => {
            let row: &ArchivedMetaRow = access(bytes, META_VERSION, MAX_RECORD_BYTES)?;
            (
                row.kind.as_str().to_owned(),
                row.epoch.to_native(),
                row.head.to_native(),
                row.first_retained.to_native(),
            )
        }
    };
    check_retained(first_retained, head)?;
    Ok(StoredMeta {
        meta: RoomMeta { kind, epoch },
        head,
        first_retained,
    })
}

/// The first retained seq is at least 1 and at most one past the head.
fn check_retained(first_retained: u64, head: u64) -> Result<(), RecordError> {
    if first_retained == 0 || first_retained > head.saturating_add(1) {
        return Err(RecordError::RetainedPastHead {
            first_retained,
            head,
        });
    }
    Ok(())
}

/// Encodes a snapshot (without its seq, which is the row key) as a versioned row, with
/// the checks its reader makes: keys strictly ascending, no ver or floor after its seq.
pub fn encode_snapshot(snapshot: &Snapshot) -> Result<Vec<u8>, RecordError> {
    let seq = snapshot.seq;
    check_floor(snapshot.tombstone_floor, seq)?;
    let mut public = Vec::with_capacity(snapshot.public.len());
    let mut previous = None;
    for (index, (key, slot)) in snapshot.public.iter().enumerate() {
        check_order(previous, key, index)?;
        previous = Some(key.as_str());
        check_ver(key, slot.ver, seq)?;
        public.push(SlotRow {
            key: key.clone(),
            value: slot.value.as_ref().map(flatten).transpose()?,
            ver: slot.ver,
        });
    }
    let mut private = Vec::with_capacity(snapshot.private.len());
    let mut previous = None;
    for (index, (key, value)) in snapshot.private.iter().enumerate() {
        check_order(previous, key, index)?;
        previous = Some(key.as_str());
        private.push(PrivateRow {
            key: key.clone(),
            value: flatten(value)?,
        });
    }
    let row = SnapshotRow {
        tombstone_floor: snapshot.tombstone_floor,
        public,
        private,
    };
    versioned(&row, SNAPSHOT_VERSION, MAX_SNAPSHOT_BYTES)
}

/// Decodes a snapshot row stored under `seq`.
pub fn decode_snapshot(seq: u64, bytes: &[u8]) -> Result<Snapshot, RecordError> {
    let row: &ArchivedSnapshotRow = access(bytes, SNAPSHOT_VERSION, MAX_SNAPSHOT_BYTES)?;
    let tombstone_floor = row.tombstone_floor.to_native();
    check_floor(tombstone_floor, seq)?;
    let rows = row.public.as_slice();
    let mut public = Vec::with_capacity(rows.len());
    let mut previous = None;
    for (index, slot) in rows.iter().enumerate() {
        let (key, ver) = (slot.key.as_str(), slot.ver.to_native());
        check_order(previous, key, index)?;
        previous = Some(key);
        check_ver(key, ver, seq)?;
        let value = slot.value.as_ref().map(unflatten).transpose()?;
        public.push((key.to_owned(), Slot::new(value, ver)));
    }
    let rows = row.private.as_slice();
    let mut private = Vec::with_capacity(rows.len());
    let mut previous = None;
    for (index, fact) in rows.iter().enumerate() {
        let key = fact.key.as_str();
        check_order(previous, key, index)?;
        previous = Some(key);
        private.push((key.to_owned(), unflatten(&fact.value)?));
    }
    Ok(Snapshot {
        seq,
        public,
        private,
        tombstone_floor,
    })
}

/// Refuses an entry whose key does not sort strictly after the one before it.
fn check_order(previous: Option<&str>, key: &str, index: usize) -> Result<(), RecordError> {
    match previous {
        Some(previous) if previous >= key => Err(RecordError::KeyOrder {
            key: key.to_owned(),
            index,
        }),
        _ => Ok(()),
    }
}

fn check_ver(key: &str, ver: u64, seq: u64) -> Result<(), RecordError> {
    if ver > seq {
        return Err(RecordError::VerAfterSeq {
            key: key.to_owned(),
            ver,
            seq,
        });
    }
    Ok(())
}

fn check_floor(floor: u64, seq: u64) -> Result<(), RecordError> {
    if floor > seq {
        return Err(RecordError::FloorAfterSeq { floor, seq });
    }
    Ok(())
}

/// The kind a meta row of version 1 or 2 names by code. Rows written now carry the
/// kind's name instead.
fn kind_from_code(code: u8) -> Result<&'static str, RecordError> {
    match code {
        0 => Ok("chat"),
        1 => Ok("poll"),
        2 => Ok("state"),
        code => Err(RecordError::UnknownKind { code }),
    }
}

/// The version byte of journal rows (`tables.rs`, `journal.rs`).
pub const JOURNAL_VERSION: u8 = 1;

/// The largest journal row this store reads. The writer starts a new row once one
/// passes the row cap of `journal.rs` (1 MiB), and journals only batches whose
/// log rows are small (64 KiB), so a row stays well under this.
pub const MAX_JOURNAL_ROW_BYTES: usize = 4 * 1024 * 1024;

/// The stored form of one journal row: the room batches of one commit (or part of
/// one), in commit order, one entry per room with that room's batches run together.
// Only its archived form is read (rows are written as [`JournalRowRef`]).
#[cfg_attr(not(test), allow(dead_code))]
#[derive(rkyv::Archive, rkyv::Serialize)]
struct JournalRow {
    entries: Vec<JournalEntry>,
}

#[cfg_attr(not(test), allow(dead_code))]
#[derive(rkyv::Archive, rkyv::Serialize)]
struct JournalEntry {
    room: String,
    /// The room's stored epoch (salted) when the entry was written.
    epoch: u64,
    first: u64,
    events: u64,
    expire_op_ids_through: u64,
    rows: Vec<JournalLogRow>,
}

#[cfg_attr(not(test), allow(dead_code))]
#[derive(rkyv::Archive, rkyv::Serialize)]
struct JournalLogRow {
    last: u64,
    row: Vec<u8>,
}

/// [`JournalRow`] borrowing the writer's bytes: the same archive, nothing copied
/// before serialization.
#[derive(rkyv::Archive, rkyv::Serialize)]
pub struct JournalRowRef<'a> {
    pub entries: Vec<JournalEntryRef<'a>>,
}

/// One room's entry of a [`JournalRowRef`]: its log rows exactly as
/// `tables::encode_events` made them, `first..first + events`.
#[derive(rkyv::Archive, rkyv::Serialize)]
pub struct JournalEntryRef<'a> {
    #[rkyv(with = rkyv::with::Inline)]
    pub room: &'a String,
    pub epoch: u64,
    pub first: u64,
    pub events: u64,
    pub expire_op_ids_through: u64,
    pub rows: Vec<JournalLogRowRef<'a>>,
}

#[derive(rkyv::Archive, rkyv::Serialize)]
pub struct JournalLogRowRef<'a> {
    pub last: u64,
    #[rkyv(with = rkyv::with::Inline)]
    pub row: &'a Vec<u8>,
}

/// The stored length of one journal row, measured by serializing it without writing a
/// byte, so the writer can reserve the row's value in redb and serialize straight into
/// it ([`write_journal_row`]): the log rows are copied once, into the page, instead of
/// into a growing buffer first and then into the page.
pub fn journal_row_len(row: &JournalRowRef) -> Result<usize, RecordError> {
    let measured =
        rkyv::api::high::to_bytes_in::<_, rancor::Error>(row, Measure(1)).map_err(|e| {
            RecordError::Serialize {
                reason: e.to_string(),
            }
        })?;
    if measured.0 > MAX_JOURNAL_ROW_BYTES {
        return Err(RecordError::TooLarge {
            len: measured.0,
            limit: MAX_JOURNAL_ROW_BYTES,
        });
    }
    Ok(measured.0)
}

/// Writes one journal row into `out`, which holds exactly [`journal_row_len`] bytes.
pub fn write_journal_row(row: &JournalRowRef, out: &mut [u8]) -> Result<(), RecordError> {
    let len = out.len();
    let mut writer = rkyv::ser::writer::Buffer::from(out);
    // The version byte first, through the writer, so positions are those of the
    // measuring pass.
    rkyv::ser::Writer::<rancor::Error>::write(&mut writer, &[JOURNAL_VERSION])
        .and_then(|()| rkyv::api::high::to_bytes_in::<_, rancor::Error>(row, writer))
        .map_err(|e| RecordError::Serialize {
            reason: e.to_string(),
        })
        .and_then(|written| {
            if written.len() == len {
                Ok(())
            } else {
                Err(RecordError::Serialize {
                    reason: format!("wrote {} of the {len} bytes measured", written.len()),
                })
            }
        })
}

/// Encodes one journal row into a buffer of its own (a damaged room's rows set aside,
/// tests).
pub fn encode_journal_row(row: &JournalRowRef) -> Result<Vec<u8>, RecordError> {
    let mut bytes = vec![0; journal_row_len(row)?];
    write_journal_row(row, &mut bytes)?;
    Ok(bytes)
}

/// A writer that only counts: the length a serialization would take.
struct Measure(usize);

impl rkyv::ser::Positional for Measure {
    fn pos(&self) -> usize {
        self.0
    }
}

impl<E> rkyv::ser::Writer<E> for Measure {
    fn write(&mut self, bytes: &[u8]) -> Result<(), E> {
        self.0 += bytes.len();
        Ok(())
    }
}

/// One entry of a journal row as read back: the log rows are borrowed from the row
/// and still undecoded (`log_row` checks each when it is applied or read).
#[derive(Debug)]
pub struct JournalEntryView<'a> {
    pub room: &'a str,
    pub epoch: u64,
    pub first: u64,
    pub events: u64,
    pub expire_op_ids_through: u64,
    /// `(last seq, log row)`, in seq order.
    pub rows: Vec<(u64, &'a [u8])>,
}

/// Decodes a journal row (size, version, then validated access) into its entries.
pub fn decode_journal_row(bytes: &[u8]) -> Result<Vec<JournalEntryView<'_>>, RecordError> {
    let row: &ArchivedJournalRow = access(bytes, JOURNAL_VERSION, MAX_JOURNAL_ROW_BYTES)?;
    Ok(row
        .entries
        .iter()
        .map(|entry| JournalEntryView {
            room: entry.room.as_str(),
            epoch: entry.epoch.to_native(),
            first: entry.first.to_native(),
            events: entry.events.to_native(),
            expire_op_ids_through: entry.expire_op_ids_through.to_native(),
            rows: entry
                .rows
                .iter()
                .map(|row| (row.last.to_native(), row.row.as_slice()))
                .collect(),
        })
        .collect())
}

/// Serializes `row` behind `version`, refusing rows over `limit` bytes.
fn versioned<T>(row: &T, version: u8, limit: usize) -> Result<Vec<u8>, RecordError>
where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >,
{
    let archive = rkyv::to_bytes::<rancor::Error>(row).map_err(|e| RecordError::Serialize {
        reason: e.to_string(),
    })?;
    let len = 1 + archive.len();
    if len > limit {
        return Err(RecordError::TooLarge { len, limit });
    }
    let mut bytes = Vec::with_capacity(len);
    bytes.push(version);
    bytes.extend_from_slice(&archive);
    Ok(bytes)
}

/// Checks size and version, then validates the archive behind the version byte.
fn access<T>(bytes: &[u8], expected: u8, limit: usize) -> Result<&T, RecordError>
where
    T: rkyv::Portable
        + for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>,
{
    if bytes.len() > limit {
        return Err(RecordError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    let (&found, archive) = bytes.split_first().ok_or(RecordError::Empty)?;
    if found != expected {
        return Err(RecordError::Version { found, expected });
    }
    rkyv::access::<T, rancor::Error>(archive).map_err(|e| RecordError::Invalid {
        reason: e.to_string(),
    })
}

fn change_rows_ref(
    changes: &[(String, Option<Value>)],
) -> Result<Vec<ChangeRowRef<'_>>, RecordError> {
    changes
        .iter()
        .map(|(key, value)| {
            Ok(ChangeRowRef {
                key,
                value: value.as_ref().map(flatten_ref).transpose()?,
            })
        })
        .collect()
}

#[cfg(test)]
fn change_rows(changes: &[(String, Option<Value>)]) -> Result<Vec<ChangeRow>, RecordError> {
    changes
        .iter()
        .map(|(key, value)| {
            Ok(ChangeRow {
                key: key.clone(),
                value: value.as_ref().map(flatten).transpose()?,
            })
        })
        .collect()
}

fn changes_from_rows(
    rows: &[ArchivedChangeRow],
) -> Result<Vec<(String, Option<Value>)>, RecordError> {
    rows.iter()
        .map(|row| {
            let value = row.value.as_ref().map(unflatten).transpose()?;
            Ok((row.key.as_str().to_owned(), value))
        })
        .collect()
}

/// What the flattening walk visits next: a value at a nesting depth, or a map key.
enum Pending<'a> {
    Value(&'a Value, usize),
    Key(&'a String),
}

/// Flattens `value` into pre-order nodes with an explicit stack. Refuses values deeper
/// than [`MAX_RECORD_DEPTH`] and non-finite floats, which a reader would refuse.
fn flatten(value: &Value) -> Result<FlatValue, RecordError> {
    let nodes = flatten_ref(value)?
        .nodes
        .into_iter()
        .map(|node| match node {
            NodeRef::Null => Node::Null,
            NodeRef::Bool(b) => Node::Bool(b),
            NodeRef::Int(n) => Node::Int(n),
            NodeRef::Float(f) => Node::Float(f),
            NodeRef::Str(s) => Node::Str(s.clone()),
            NodeRef::Bytes(b) => Node::Bytes(b.clone()),
            NodeRef::List(n) => Node::List(n),
            NodeRef::Map(n) => Node::Map(n),
        })
        .collect();
    Ok(FlatValue { nodes })
}

/// [`flatten`], borrowing the value's strings.
fn flatten_ref(value: &Value) -> Result<FlatValueRef<'_>, RecordError> {
    // Most values of an op or a change are one scalar, or a small map of scalars: a
    // scalar needs neither the stack nor a growing list, a map of scalars (an op) is its
    // members in order without the stack, and any other container starts with room for
    // a few members.
    if let Some(node) = scalar_node(value)? {
        return Ok(FlatValueRef { nodes: vec![node] });
    }
    if let Value::Map(map) = value {
        let mut nodes = Vec::with_capacity(1 + 2 * map.len());
        nodes.push(NodeRef::Map(item_count(map.len())?));
        let mut flat = true;
        for (key, item) in map {
            let Some(node) = scalar_node(item)? else {
                flat = false;
                break;
            };
            nodes.push(NodeRef::Str(key));
            nodes.push(node);
        }
        if flat {
            return Ok(FlatValueRef { nodes });
        }
    }
    let mut nodes = Vec::with_capacity(16);
    let mut stack = Vec::with_capacity(16);
    stack.push(Pending::Value(value, 0));
    while let Some(next) = stack.pop() {
        let (value, depth) = match next {
            Pending::Key(key) => {
                nodes.push(NodeRef::Str(key));
                continue;
            }
            Pending::Value(value, depth) => (value, depth),
        };
        let node = match value {
            Value::Null => NodeRef::Null,
            Value::Bool(b) => NodeRef::Bool(*b),
            Value::Int(n) => NodeRef::Int(*n),
            Value::Float(f) if f.is_finite() => NodeRef::Float(*f),
            Value::Float(f) => return Err(RecordError::NonFinite { value: *f }),
            Value::Str(s) => NodeRef::Str(s),
            Value::Bytes(b) => NodeRef::Bytes(b),
            Value::List(items) => {
                if depth + 1 > MAX_RECORD_DEPTH {
                    return Err(RecordError::TooDeep);
                }
                // Reversed so the stack pops them in order.
                for item in items.iter().rev() {
                    stack.push(Pending::Value(item, depth + 1));
                }
                NodeRef::List(item_count(items.len())?)
            }
            Value::Map(map) => {
                if depth + 1 > MAX_RECORD_DEPTH {
                    return Err(RecordError::TooDeep);
                }
                for (key, item) in map.iter().rev() {
                    stack.push(Pending::Value(item, depth + 1));
                    stack.push(Pending::Key(key));
                }
                NodeRef::Map(item_count(map.len())?)
            }
        };
        nodes.push(node);
    }
    Ok(FlatValueRef { nodes })
}

/// The one node of a scalar value (`None`: a list or map); refuses a non-finite float.
fn scalar_node(value: &Value) -> Result<Option<NodeRef<'_>>, RecordError> {
    Ok(match value {
        Value::Null => Some(NodeRef::Null),
        Value::Bool(b) => Some(NodeRef::Bool(*b)),
        Value::Int(n) => Some(NodeRef::Int(*n)),
        Value::Float(f) if f.is_finite() => Some(NodeRef::Float(*f)),
        Value::Float(f) => return Err(RecordError::NonFinite { value: *f }),
        Value::Str(s) => Some(NodeRef::Str(s)),
        Value::Bytes(b) => Some(NodeRef::Bytes(b)),
        Value::List(_) | Value::Map(_) => None,
    })
}

fn item_count(len: usize) -> Result<u32, RecordError> {
    u32::try_from(len).map_err(|_| RecordError::TooLong { len })
}

/// A list or map being rebuilt, with how many items it still expects.
enum Open {
    List {
        items: Vec<Value>,
        remaining: u32,
    },
    Map {
        map: BTreeMap<String, Value>,
        remaining: u32,
        key: Option<String>,
    },
}

/// Rebuilds a [`Value`] from validated nodes with an explicit stack. The stack holds one
/// entry per open container, so its length is the nesting depth and is bounded by
/// [`MAX_RECORD_DEPTH`] before anything is pushed.
fn unflatten(flat: &ArchivedFlatValue) -> Result<Value, RecordError> {
    let nodes = flat.nodes.as_slice();
    let mut stack: Vec<Open> = Vec::new();
    for (index, node) in nodes.iter().enumerate() {
        // A map waiting for a key takes this node as the key.
        if let Some(Open::Map {
            key: key @ None, ..
        }) = stack.last_mut()
        {
            match node {
                ArchivedNode::Str(s) => *key = Some(s.as_str().to_owned()),
                _ => return Err(RecordError::MapKeyNotString { index }),
            }
            continue;
        }
        // Capacity is capped by the nodes left, so a corrupt count cannot allocate much.
        let left = nodes.len() - index - 1;
        let mut value = match node {
            ArchivedNode::Null => Value::Null,
            ArchivedNode::Bool(b) => Value::Bool(*b),
            ArchivedNode::Int(n) => Value::Int(n.to_native()),
            ArchivedNode::Float(f) => {
                let value = f.to_native();
                if !value.is_finite() {
                    return Err(RecordError::NonFinite { value });
                }
                Value::Float(value)
            }
            ArchivedNode::Str(s) => Value::Str(s.as_str().to_owned()),
            ArchivedNode::Bytes(b) => Value::Bytes(b.as_slice().to_vec()),
            ArchivedNode::List(_) | ArchivedNode::Map(_) if stack.len() >= MAX_RECORD_DEPTH => {
                return Err(RecordError::TooDeep);
            }
            ArchivedNode::List(len) if len.to_native() == 0 => Value::List(Vec::new()),
            ArchivedNode::Map(len) if len.to_native() == 0 => Value::Map(BTreeMap::new()),
            ArchivedNode::List(len) => {
                let remaining = len.to_native();
                let capacity = usize::try_from(remaining).unwrap_or(usize::MAX).min(left);
                stack.push(Open::List {
                    items: Vec::with_capacity(capacity),
                    remaining,
                });
                continue;
            }
            ArchivedNode::Map(len) => {
                stack.push(Open::Map {
                    map: BTreeMap::new(),
                    remaining: len.to_native(),
                    key: None,
                });
                continue;
            }
        };
        // Attach the finished value to its parent; a parent it completes is attached in
        // turn, until one is still open or the root is done.
        loop {
            let Some(parent) = stack.last_mut() else {
                let n_trailing = nodes.len() - index - 1;
                if n_trailing > 0 {
                    return Err(RecordError::Trailing { n_trailing });
                }
                return Ok(value);
            };
            let remaining = match parent {
                Open::List { items, remaining } => {
                    items.push(value);
                    *remaining -= 1;
                    *remaining
                }
                Open::Map {
                    map,
                    remaining,
                    key,
                } => {
                    let key = key
                        .take()
                        .expect("a map parent always has its key here: the key branch above sets it before any value");
                    if map.contains_key(&key) {
                        return Err(RecordError::DuplicateKey { key });
                    }
                    map.insert(key, value);
                    *remaining -= 1;
                    *remaining
                }
            };
            if remaining > 0 {
                break;
            }
            value = match stack.pop() {
                Some(Open::List { items, .. }) => Value::List(items),
                Some(Open::Map { map, .. }) => Value::Map(map),
                None => unreachable!("the parent was just borrowed from the stack"),
            };
        }
    }
    Err(RecordError::Truncated {
        n_nodes: nodes.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested_value() -> Value {
        Value::map([
            ("int", Value::Int(i64::MIN)),
            ("float", Value::Float(-0.1)),
            ("tiny", Value::Float(f64::MIN_POSITIVE)),
            ("bytes", Value::Bytes(vec![0, 255, 7])),
            ("empty_list", Value::List(vec![])),
            ("empty_map", Value::Map(BTreeMap::new())),
            (
                "list",
                Value::List(vec![
                    Value::Null,
                    Value::Bool(true),
                    Value::map([("k", Value::List(vec![Value::Str("deep".into())]))]),
                    Value::Str(String::new()),
                ]),
            ),
        ])
    }

    fn event(op: Value) -> EventRecord {
        EventRecord {
            seq: 7,
            user: "alice".into(),
            ts_ms: -5,
            op,
            changes: Changes {
                public: vec![("a".into(), Some(nested_value())), ("b".into(), None)],
                private: vec![("voters".into(), Some(Value::List(vec![Value::Int(1)])))],
            },
            op_id: Some("op-7".into()),
        }
    }

    /// A value nested `depth` lists deep around a scalar.
    fn nest(depth: usize) -> Value {
        (0..depth).fold(Value::Int(1), |inner, _| Value::List(vec![inner]))
    }

    fn ts_of(bytes: &[u8]) -> Result<i64, RecordError> {
        log_row(7, bytes).map(|row| row.ts_ms(7).expect("the row holds seq 7"))
    }

    fn op_id_of(bytes: &[u8]) -> Result<Option<(String, String)>, RecordError> {
        log_row(7, bytes).map(|row| row.op_id(7))
    }

    fn assert_event_eq(a: &EventRecord, b: &EventRecord) {
        assert_eq!(
            (a.seq, &a.user, a.ts_ms, &a.op, &a.changes, &a.op_id),
            (b.seq, &b.user, b.ts_ms, &b.op, &b.changes, &b.op_id)
        );
    }

    #[test]
    fn event_round_trips_nested_values_floats_and_bytes() {
        let original = event(nested_value());
        let bytes = encode_event(&original).unwrap();
        assert_eq!(bytes[0], EVENT_VERSION);
        let decoded = decode_event(7, &bytes).unwrap();
        assert_event_eq(&decoded, &original);
        assert_eq!(ts_of(&bytes).unwrap(), -5);
        assert!(ts_of(&bytes[..bytes.len() - 1]).is_err());
        assert_eq!(
            op_id_of(&bytes).unwrap(),
            Some(("alice".to_owned(), "op-7".to_owned()))
        );
        assert!(op_id_of(&bytes[..bytes.len() - 1]).is_err());
        let without = EventRecord {
            op_id: None,
            ..original
        };
        let bytes = encode_event(&without).unwrap();
        assert_eq!(op_id_of(&bytes).unwrap(), None);
        assert_event_eq(&decode_event(7, &bytes).unwrap(), &without);
    }

    #[test]
    fn borrowed_event_rows_are_byte_for_byte_the_owned_rows() {
        let mut original = event(nested_value());
        for op_id in [Some("w3.17".to_owned()), None] {
            original.op_id = op_id;
            let owned = EventRow {
                user: original.user.clone(),
                ts_ms: original.ts_ms,
                op: flatten(&original.op).unwrap(),
                public: change_rows(&original.changes.public).unwrap(),
                private: change_rows(&original.changes.private).unwrap(),
                op_id: original.op_id.clone(),
            };
            let expected = versioned(&owned, EVENT_VERSION, MAX_RECORD_BYTES).unwrap();
            assert_eq!(encode_event(&original).unwrap(), expected);
        }
    }

    /// Events `first..=last` like `event`, op ids on the even ones.
    fn run(first: u64, last: u64) -> Vec<EventRecord> {
        (first..=last)
            .map(|seq| EventRecord {
                seq,
                ts_ms: seq as i64 * 10,
                op_id: (seq % 2 == 0).then(|| format!("op{seq}")),
                ..event(Value::Int(seq as i64))
            })
            .collect()
    }

    #[test]
    fn log_row_round_trips_each_event_its_op_id_and_timestamp() {
        let events = run(7, 9);
        let bytes = encode_log_row(&events).unwrap();
        assert_eq!(bytes[0], BATCH_VERSION);
        let row = log_row(9, &bytes).unwrap();
        assert_eq!((row.first(), row.last(), row.len()), (7, 9, 3));
        for original in &events {
            assert_event_eq(&row.event(original.seq).unwrap(), original);
            assert_eq!(row.ts_ms(original.seq), Some(original.ts_ms));
            assert_eq!(
                row.op_id(original.seq),
                original.op_id.clone().map(|id| (original.user.clone(), id))
            );
        }
        // One event is a row too.
        let one = encode_log_row(&events[..1]).unwrap();
        assert_event_eq(&log_row(7, &one).unwrap().event(7).unwrap(), &events[0]);
    }

    #[test]
    fn log_row_under_the_wrong_key_or_damaged_is_refused() {
        let bytes = encode_log_row(&run(7, 9)).unwrap();
        for key in [8, 10, 0] {
            assert!(
                matches!(
                    log_row(key, &bytes),
                    Err(RecordError::RowSpan {
                        first: 7,
                        len: 3,
                        ..
                    })
                ),
                "key {key}"
            );
        }
        assert!(log_row(9, &bytes[..bytes.len() - 1]).is_err());
        let mut other = bytes.clone();
        other[0] = 9;
        assert!(matches!(
            log_row(9, &other),
            Err(RecordError::Version {
                found: 9,
                expected: BATCH_VERSION
            })
        ));
        // An empty batch row holds nothing a key could name.
        let empty = encode_log_row(&[]).unwrap();
        assert!(matches!(
            log_row(0, &empty),
            Err(RecordError::RowSpan { len: 0, .. })
        ));
        assert!(log_row(9, &[]).is_err());
    }

    #[test]
    fn asking_a_log_row_for_a_seq_it_does_not_hold_is_an_error_naming_its_span() {
        let bytes = encode_log_row(&run(7, 9)).unwrap();
        let row = log_row(9, &bytes).unwrap();
        for seq in [6, 10] {
            assert!(matches!(
                row.event(seq),
                Err(RecordError::NotInRow {
                    first: 7,
                    last: 9,
                    ..
                })
            ));
        }
        assert_eq!(row.event(8).unwrap().seq, 8);
        assert_eq!((row.op_id(6), row.ts_ms(10)), (None, None));
        assert!(row.ts_ms(9).is_some());
    }

    #[test]
    fn borrowed_log_rows_are_byte_for_byte_the_owned_rows() {
        let events = run(3, 5);
        let owned = BatchRow {
            first: 3,
            events: events
                .iter()
                .map(|event| EventRow {
                    user: event.user.clone(),
                    ts_ms: event.ts_ms,
                    op: flatten(&event.op).unwrap(),
                    public: change_rows(&event.changes.public).unwrap(),
                    private: change_rows(&event.changes.private).unwrap(),
                    op_id: event.op_id.clone(),
                })
                .collect(),
        };
        let expected = versioned(&owned, BATCH_VERSION, MAX_LOG_ROW_BYTES).unwrap();
        assert_eq!(encode_log_row(&events).unwrap(), expected);
    }

    #[test]
    fn journal_rows_borrowing_the_writers_bytes_match_the_owned_layout_and_read_back() {
        let room = "room-1".to_owned();
        let (a, b) = (vec![1u8, 2, 3], vec![4u8; 300]);
        let borrowed = JournalRowRef {
            entries: vec![JournalEntryRef {
                room: &room,
                epoch: 9,
                first: 4,
                events: 5,
                expire_op_ids_through: 2,
                rows: vec![
                    JournalLogRowRef { last: 6, row: &a },
                    JournalLogRowRef { last: 8, row: &b },
                ],
            }],
        };
        let owned = JournalRow {
            entries: vec![JournalEntry {
                room: room.clone(),
                epoch: 9,
                first: 4,
                events: 5,
                expire_op_ids_through: 2,
                rows: vec![
                    JournalLogRow {
                        last: 6,
                        row: a.clone(),
                    },
                    JournalLogRow {
                        last: 8,
                        row: b.clone(),
                    },
                ],
            }],
        };
        let bytes = encode_journal_row(&borrowed).unwrap();
        assert_eq!(
            bytes,
            versioned(&owned, JOURNAL_VERSION, MAX_JOURNAL_ROW_BYTES).unwrap()
        );
        // The writer reserves exactly the measured length; any other is refused.
        assert_eq!(journal_row_len(&borrowed).unwrap(), bytes.len());
        for len in [bytes.len() - 1, bytes.len() + 1] {
            assert!(write_journal_row(&borrowed, &mut vec![0; len]).is_err());
        }
        let entries = decode_journal_row(&bytes).unwrap();
        assert_eq!(entries.len(), 1);
        let entry = &entries[0];
        assert_eq!(
            (entry.room, entry.epoch, entry.first, entry.events),
            ("room-1", 9, 4, 5)
        );
        assert_eq!(entry.expire_op_ids_through, 2);
        assert_eq!(entry.rows, vec![(6, a.as_slice()), (8, b.as_slice())]);
        // Damaged bytes are refused, never trusted.
        let mut bad = bytes.clone();
        bad.truncate(bytes.len() - 3);
        assert!(decode_journal_row(&bad).is_err());
        assert!(matches!(
            decode_journal_row(&[JOURNAL_VERSION + 1, 0, 0]),
            Err(RecordError::Version { .. })
        ));
    }

    #[test]
    fn event_rows_written_before_op_ids_moved_in_read_without_one() {
        let original = event(nested_value());
        let row = EventRowNoOpId {
            user: original.user.clone(),
            ts_ms: original.ts_ms,
            op: flatten(&original.op).unwrap(),
            public: change_rows(&original.changes.public).unwrap(),
            private: change_rows(&original.changes.private).unwrap(),
        };
        let bytes = versioned(&row, EVENT_VERSION_NO_OP_ID, MAX_RECORD_BYTES).unwrap();
        let decoded = decode_event(7, &bytes).unwrap();
        assert_event_eq(
            &decoded,
            &EventRecord {
                op_id: None,
                ..original
            },
        );
        assert_eq!(op_id_of(&bytes).unwrap(), None);
        assert_eq!(ts_of(&bytes).unwrap(), -5);
    }

    #[test]
    fn meta_round_trips_every_kind() {
        for kind in ["chat", "poll", "state", "rps"] {
            let stored = StoredMeta {
                meta: RoomMeta {
                    kind: kind.to_owned(),
                    epoch: 42,
                },
                head: 9,
                first_retained: 5,
            };
            let bytes = encode_meta(&stored).unwrap();
            assert_eq!(bytes[0], META_VERSION);
            assert_eq!(decode_meta(&bytes).unwrap(), stored);
        }
    }

    #[test]
    fn meta_row_of_version_1_reads_as_an_untrimmed_room() {
        let row = MetaRowUntrimmed {
            kind: 1,
            epoch: 3,
            head: 12,
        };
        let bytes = versioned(&row, META_VERSION_UNTRIMMED, MAX_RECORD_BYTES).unwrap();
        let stored = decode_meta(&bytes).unwrap();
        assert_eq!(
            (
                stored.meta.kind,
                stored.meta.epoch,
                stored.head,
                stored.first_retained
            ),
            ("poll".to_owned(), 3, 12, 1)
        );
    }

    #[test]
    fn meta_row_of_version_2_reads_its_kind_code_as_a_name() {
        for (code, name) in [(0, "chat"), (1, "poll"), (2, "state")] {
            let row = MetaRowCoded {
                kind: code,
                epoch: 3,
                head: 12,
                first_retained: 4,
            };
            let bytes = versioned(&row, META_VERSION_CODED, MAX_RECORD_BYTES).unwrap();
            let stored = decode_meta(&bytes).unwrap();
            assert_eq!(
                (
                    stored.meta.kind.as_str(),
                    stored.head,
                    stored.first_retained
                ),
                (name, 12, 4)
            );
        }
    }

    #[test]
    fn first_retained_past_head_plus_one_is_refused_both_ways() {
        let stored = StoredMeta {
            meta: RoomMeta {
                kind: "chat".to_owned(),
                epoch: 1,
            },
            head: 4,
            first_retained: 6,
        };
        assert!(matches!(
            encode_meta(&stored),
            Err(RecordError::RetainedPastHead {
                first_retained: 6,
                head: 4
            })
        ));
        let row = MetaRow {
            kind: "chat".to_owned(),
            epoch: 1,
            head: 4,
            first_retained: 0,
        };
        let bytes = versioned(&row, META_VERSION, MAX_RECORD_BYTES).unwrap();
        assert!(matches!(
            decode_meta(&bytes),
            Err(RecordError::RetainedPastHead {
                first_retained: 0,
                ..
            })
        ));
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            seq: 40,
            public: vec![
                ("a".into(), Slot::new(Some(nested_value()), 3)),
                ("b".into(), Slot::new(None, 40)),
                ("c".into(), Slot::new(Some(Value::Float(2.5)), 1)),
            ],
            private: vec![
                ("creator".into(), Value::Str("alice".into())),
                ("voters".into(), Value::List(vec![Value::Int(1)])),
            ],
            tombstone_floor: 12,
        }
    }

    #[test]
    fn snapshot_round_trips_with_tombstones_and_private_facts() {
        let original = snapshot();
        let bytes = encode_snapshot(&original).unwrap();
        assert_eq!(bytes[0], SNAPSHOT_VERSION);
        assert_eq!(decode_snapshot(40, &bytes).unwrap(), original);
        let empty = Snapshot {
            seq: 1,
            public: vec![],
            private: vec![],
            tombstone_floor: 0,
        };
        assert_eq!(
            decode_snapshot(1, &encode_snapshot(&empty).unwrap()).unwrap(),
            empty
        );
    }

    #[test]
    fn snapshot_with_unsorted_keys_or_a_future_ver_is_refused_both_ways() {
        let mut repeated = snapshot();
        repeated.private.push(("voters".into(), Value::Null));
        assert!(matches!(
            encode_snapshot(&repeated),
            Err(RecordError::KeyOrder { index: 2, .. })
        ));
        let mut unsorted = snapshot();
        unsorted.public.swap(0, 2);
        assert!(matches!(
            encode_snapshot(&unsorted),
            Err(RecordError::KeyOrder { index: 1, .. })
        ));
        let mut future = snapshot();
        future.public[0].1.ver = 41;
        assert!(matches!(
            encode_snapshot(&future),
            Err(RecordError::VerAfterSeq {
                ver: 41,
                seq: 40,
                ..
            })
        ));
        let mut floor = snapshot();
        floor.tombstone_floor = 41;
        assert!(matches!(
            encode_snapshot(&floor),
            Err(RecordError::FloorAfterSeq { floor: 41, seq: 40 })
        ));
        // The same row read back under an older seq has vers after it.
        let bytes = encode_snapshot(&snapshot()).unwrap();
        assert!(matches!(
            decode_snapshot(39, &bytes),
            Err(RecordError::VerAfterSeq {
                ver: 40,
                seq: 39,
                ..
            })
        ));
    }

    #[test]
    fn corrupt_snapshot_bytes_give_errors_not_panics() {
        let bytes = encode_snapshot(&snapshot()).unwrap();
        for len in 0..bytes.len() {
            let _ = decode_snapshot(40, &bytes[..len]);
        }
        for i in 1..bytes.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut corrupt = bytes.clone();
                corrupt[i] ^= flip;
                let _ = decode_snapshot(40, &corrupt);
            }
        }
        assert!(matches!(
            decode_snapshot(40, &[EVENT_VERSION + 1, 0]),
            Err(RecordError::Version {
                expected: SNAPSHOT_VERSION,
                ..
            })
        ));
    }

    #[test]
    fn record_depth_holds_a_creation_around_the_deepest_init_and_no_more() {
        // A creation's op wraps an `init` of the deepest depth the wire takes.
        let deepest = event(Value::map([
            ("type", Value::Str("create".into())),
            ("init", nest(MAX_DEPTH)),
        ]));
        assert_eq!(deepest.op.depth(), MAX_RECORD_DEPTH);
        let decoded = decode_event(7, &encode_event(&deepest).unwrap()).unwrap();
        assert_eq!(decoded.op, deepest.op);
        assert!(matches!(
            encode_event(&event(nest(MAX_RECORD_DEPTH + 1))),
            Err(RecordError::TooDeep)
        ));
    }

    #[test]
    fn non_finite_float_is_refused_on_encode() {
        let err = encode_event(&event(Value::Float(f64::NAN))).unwrap_err();
        assert!(matches!(err, RecordError::NonFinite { .. }), "{err}");
    }

    #[test]
    fn corrupt_bytes_give_errors_not_panics() {
        let bytes = encode_event(&event(nested_value())).unwrap();
        assert!(matches!(decode_event(1, &[]), Err(RecordError::Empty)));
        let mut wrong_version = bytes.clone();
        wrong_version[0] = 9;
        assert!(matches!(
            decode_event(1, &wrong_version),
            Err(RecordError::Version { found: 9, .. })
        ));
        // Every truncation and every single-byte flip either fails cleanly or decodes to
        // some valid record; none may panic.
        for len in 0..bytes.len() {
            let _ = decode_event(1, &bytes[..len]);
        }
        for i in 1..bytes.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut corrupt = bytes.clone();
                corrupt[i] ^= flip;
                let _ = decode_event(1, &corrupt);
                let _ = decode_meta(&corrupt);
            }
        }
        assert!(matches!(
            decode_event(1, &[EVENT_VERSION, 1, 2, 3]),
            Err(RecordError::Invalid { .. })
        ));
    }

    /// Encodes raw nodes as an event's op, to test the decoder's structural checks on
    /// archives that pass rkyv validation but are not a well-formed value.
    fn decode_op_nodes(nodes: Vec<Node>) -> Result<Value, RecordError> {
        let row = EventRow {
            user: String::new(),
            ts_ms: 0,
            op: FlatValue { nodes },
            public: vec![],
            private: vec![],
            op_id: None,
        };
        let bytes = versioned(&row, EVENT_VERSION, MAX_RECORD_BYTES).unwrap();
        decode_event(1, &bytes).map(|event| event.op)
    }

    #[test]
    fn malformed_node_sequences_are_refused() {
        assert!(matches!(
            decode_op_nodes(vec![]),
            Err(RecordError::Truncated { .. })
        ));
        assert!(matches!(
            decode_op_nodes(vec![Node::List(u32::MAX), Node::Null]),
            Err(RecordError::Truncated { .. })
        ));
        assert!(matches!(
            decode_op_nodes(vec![Node::Null, Node::Null]),
            Err(RecordError::Trailing { n_trailing: 1 })
        ));
        assert!(matches!(
            decode_op_nodes(vec![Node::Map(1), Node::Int(1), Node::Null]),
            Err(RecordError::MapKeyNotString { index: 1 })
        ));
        assert!(matches!(
            decode_op_nodes(vec![
                Node::Map(2),
                Node::Str("k".into()),
                Node::Null,
                Node::Str("k".into()),
                Node::Null
            ]),
            Err(RecordError::DuplicateKey { .. })
        ));
        assert!(matches!(
            decode_op_nodes(vec![Node::Float(f64::INFINITY)]),
            Err(RecordError::NonFinite { .. })
        ));
        let too_deep = (0..=MAX_RECORD_DEPTH)
            .map(|_| Node::List(1))
            .chain([Node::Null]);
        assert!(matches!(
            decode_op_nodes(too_deep.collect()),
            Err(RecordError::TooDeep)
        ));
    }

    #[test]
    fn unknown_kind_code_is_refused() {
        let row = MetaRowCoded {
            kind: 200,
            epoch: 1,
            head: 1,
            first_retained: 1,
        };
        let bytes = versioned(&row, META_VERSION_CODED, MAX_RECORD_BYTES).unwrap();
        assert!(matches!(
            decode_meta(&bytes),
            Err(RecordError::UnknownKind { code: 200 })
        ));
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::Int),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(Value::Float),
                ".{0,8}".prop_map(Value::Str),
                proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::Bytes),
            ];
            leaf.prop_recursive(6, 64, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::List),
                    proptest::collection::btree_map(".{0,4}", inner, 0..6).prop_map(Value::Map),
                ]
            })
        }

        proptest! {
            #[test]
            fn any_value_round_trips(op in value()) {
                let original = event(op);
                let decoded = decode_event(7, &encode_event(&original).unwrap()).unwrap();
                prop_assert_eq!(decoded.op, original.op);
            }
        }
    }
}
