//! The layout of `roomd.redb`: its tables, how one batch is written into them, and how
//! one room is read back.
//!
//! - `events`: `(room, last)` -> log row (`record.rs`): the events of one room batch,
//!   `first..=last`, in one row keyed by the seq of its last event (an older build wrote
//!   one row per event, keyed by its seq: a row of one event, read alike). A range read
//!   from seq `s` finds the row holding `s` first. Rows run gaplessly per room from the
//!   room's first retained seq to its head. One row per room batch (not per event) is
//!   one B-tree insert per batch: the insert per event was a third of the server's CPU
//!   per op (`benches/README.md`, issue 14).
//! - `meta`: `room` -> meta row (kind, epoch, head seq, first retained seq). The head
//!   moves in the same transaction as the events that advance it, and the first
//!   retained seq in the same transaction as the trimming that deletes events, so a
//!   reader never sees one without the other.
//! - `snapshots`: `(room, seq)` -> snapshot row, the room's state at that seq.
//! - `op_ids`: `(room, seq)` -> `(user, op_id)` of a *trimmed* event whose op id the
//!   room still dedups against (the trim copies it here, `retention.rs`). A retained
//!   event's op id lives in its own row, so a commit writes one row per op: a row of its
//!   own per op id was the writer's largest cost (keyed by id, 60% of its time and a
//!   random page per op; keyed by seq, 87k-91k against 125k-134k acked ops/s with the
//!   id in the event row, `roomd bench ingest --window 256`). Loading a room reads the
//!   ids of this table and of every retained event row; the room keeps the id -> seq
//!   index in memory and says which ids it no longer needs (`expire_op_ids_through`).
//! - `creators`: `room` -> the user whose `create` made it, written with the creation
//!   event and removed with the meta row; the store counts rooms per user from it
//!   (`--max-rooms-per-user`).
//! - `deleting`: `room` -> (), rooms whose deletion has removed their meta row but not
//!   yet all their other rows (`retention.rs`).
//! - `journal`: increasing key -> journal row (`record.rs`): plain room batches in
//!   commit order, each with its room, the room's stored epoch and its log rows as
//!   they go into `events`, not yet folded into `events` and `meta` (`journal.rs`). A
//!   room's `meta` head and `events` lag its journaled batches until the fold.
//!
//! Writing a batch checks it against the stored head before touching any table, so a
//! batch that would break gapless seq is refused whole while the rest of its transaction
//! commits; a fold ([`WriteTables::append_run`]) checks its run the same way. When and how transactions commit is `writer.rs`'s business.

use std::ops::Bound;
use std::path::Path;

use redb::{
    ReadOnlyTable, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction,
};

use super::record::{self, decode_meta, encode_log_row, encode_meta, log_row, StoredMeta};
use super::{Batch, EventRecord, LoadedRoom, OpIdRecord, Snapshot, StoreError};

pub(super) const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(super) const OP_IDS: TableDefinition<(&str, u64), (&str, &str)> =
    TableDefinition::new("op_ids");
pub(super) const SNAPSHOTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("snapshots");
pub(super) const DELETING: TableDefinition<&str, ()> = TableDefinition::new("deleting");
pub(super) const CREATORS: TableDefinition<&str, &str> = TableDefinition::new("creators");
pub(super) const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");

/// Creates any missing table, so read transactions on a new database find them all.
pub fn create_all(txn: &WriteTransaction) -> Result<(), redb::TableError> {
    txn.open_table(EVENTS)?;
    txn.open_table(META)?;
    txn.open_table(OP_IDS)?;
    txn.open_table(SNAPSHOTS)?;
    txn.open_table(DELETING)?;
    txn.open_table(CREATORS)?;
    txn.open_table(JOURNAL)?;
    Ok(())
}

/// Reads a room's meta row from `meta` (of a write or a read transaction); the inner
/// error is a corrupt row.
pub fn stored_meta_in(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    room: &str,
) -> Result<Result<Option<StoredMeta>, StoreError>, redb::StorageError> {
    let Some(row) = meta.get(room)? else {
        return Ok(Ok(None));
    };
    Ok(decode_meta(row.value())
        .map(Some)
        .map_err(|source| StoreError::Corrupt {
            room: room.to_owned(),
            seq: None,
            source,
        }))
}

/// Every table, open in one write transaction for the batches and maintenance pieces
/// of one commit.
pub struct WriteTables<'txn> {
    pub events: Table<'txn, (&'static str, u64), &'static [u8]>,
    pub meta: Table<'txn, &'static str, &'static [u8]>,
    pub op_ids: Table<'txn, (&'static str, u64), (&'static str, &'static str)>,
    pub snapshots: Table<'txn, (&'static str, u64), &'static [u8]>,
    pub deleting: Table<'txn, &'static str, ()>,
    pub creators: Table<'txn, &'static str, &'static str>,
    pub journal: Table<'txn, u64, &'static [u8]>,
}

impl<'txn> WriteTables<'txn> {
    pub fn open(txn: &'txn WriteTransaction) -> Result<Self, redb::TableError> {
        Ok(WriteTables {
            events: txn.open_table(EVENTS)?,
            meta: txn.open_table(META)?,
            op_ids: txn.open_table(OP_IDS)?,
            snapshots: txn.open_table(SNAPSHOTS)?,
            deleting: txn.open_table(DELETING)?,
            creators: txn.open_table(CREATORS)?,
            journal: txn.open_table(JOURNAL)?,
        })
    }

    /// Reads a room's meta row; the inner error is a corrupt row.
    pub fn stored_meta(
        &self,
        room: &str,
    ) -> Result<Result<Option<StoredMeta>, StoreError>, redb::StorageError> {
        stored_meta_in(&self.meta, room)
    }

    /// Writes a room's meta row.
    pub fn put_meta(&mut self, room: &str, stored: &StoredMeta) -> Result<(), redb::StorageError> {
        let row = encode_meta(stored).expect(
            "a meta row is four integers, always serializable and far below the row limit; \
             callers keep first_retained within 1..=head + 1",
        );
        self.meta.insert(room, row.as_slice())?;
        Ok(())
    }

    /// Writes one batch, given its log rows as [`encode_events`] made them, and its
    /// encoded snapshot `(seq, row)`. The outer error is a storage failure that dooms
    /// the whole transaction; the inner one refuses this batch alone, before anything
    /// of it is written.
    pub fn apply(
        &mut self,
        batch: &Batch,
        rows: &LogRows,
        creator: Option<&str>,
        snapshot: Option<(u64, &[u8])>,
    ) -> Result<Result<(), StoreError>, redb::StorageError> {
        let room = batch.room.as_str();
        let stored = match self.stored_meta(room)? {
            Ok(stored) => stored,
            Err(corrupt) => return Ok(Err(corrupt)),
        };
        let (meta, head, first_retained) = match (stored, &batch.create) {
            (Some(stored), Some(_)) => {
                return Ok(Err(StoreError::RoomExists {
                    room: room.to_owned(),
                    head: stored.head,
                }))
            }
            (None, None) => {
                return Ok(Err(StoreError::NoSuchRoom {
                    room: room.to_owned(),
                }))
            }
            (Some(stored), None) => (stored.meta, stored.head, stored.first_retained),
            (None, Some(create)) => (create.clone(), 0, 1),
        };
        // The rows run gaplessly among themselves (`encode_events`); they must also
        // continue the stored head.
        if rows.events > 0 && rows.first != head + 1 {
            return Ok(Err(StoreError::SeqGap {
                room: room.to_owned(),
                expected: head + 1,
                found: rows.first,
            }));
        }
        let new_head = head + rows.events;
        if let Some((seq, _)) = snapshot {
            if seq == 0 || seq > new_head {
                return Ok(Err(StoreError::SnapshotSeq {
                    room: room.to_owned(),
                    seq,
                    head: new_head,
                }));
            }
        }

        if let (Some(_), Some(creator)) = (&batch.create, creator) {
            self.creators.insert(room, creator)?;
        }
        for (last, row) in &rows.rows {
            self.events.insert((room, *last), row.as_slice())?;
        }
        if let Some((seq, row)) = snapshot {
            self.snapshots.insert((room, seq), row)?;
        }
        if batch.expire_op_ids_through > 0 {
            self.op_ids
                .retain_in((room, 0)..=(room, batch.expire_op_ids_through), |_, _| {
                    false
                })?;
        }
        let stored = StoredMeta {
            meta,
            head: new_head,
            first_retained,
        };
        self.put_meta(room, &stored)?;
        Ok(Ok(()))
    }
}

impl WriteTables<'_> {
    /// Moves a run of journaled events `first..=last` of `room` into `events` and its
    /// meta row (one meta write for the whole run), and forgets trimmed op ids through
    /// `expire_op_ids_through`: a fold (`journal.rs`). The run must continue the stored
    /// head of the room with the epoch it was journaled under; anything else is
    /// refused, before anything is written, with the inner error.
    pub fn append_run<'r>(
        &mut self,
        room: &str,
        epoch: u64,
        (first, last): (u64, u64),
        rows: impl IntoIterator<Item = (u64, &'r [u8])>,
        expire_op_ids_through: u64,
    ) -> Result<Result<(), StoreError>, redb::StorageError> {
        let mut stored = match self.stored_meta(room)? {
            Ok(Some(stored)) if stored.meta.epoch == epoch => stored,
            Ok(_) => {
                return Ok(Err(StoreError::NoSuchRoom {
                    room: room.to_owned(),
                }))
            }
            Err(corrupt) => return Ok(Err(corrupt)),
        };
        if first != stored.head + 1 || last < first {
            return Ok(Err(StoreError::SeqGap {
                room: room.to_owned(),
                expected: stored.head + 1,
                found: first,
            }));
        }
        // Every row goes after the room's stored ones, in seq order: through one cursor
        // at the end of the room, whose inserts land a leaf at a time, not one lookup
        // from the root each (benches/README.md, "Fourteenth pass").
        let end = Bound::Included((room, u64::MAX));
        let mut cursor = self.events.upper_bound_mut(end)?;
        for (row_last, row) in rows {
            match cursor.insert_before((room, row_last), row) {
                Ok(()) => {}
                Err(redb::CursorError::Storage(e)) => return Err(e),
                // A row already stored under that key (the head check above rules it
                // out): replaced, as a plain insert would, and the run goes on after it.
                Err(redb::CursorError::UnorderedKey) => {
                    cursor.close()?;
                    self.events.insert((room, row_last), row)?;
                    cursor = self.events.upper_bound_mut(end)?;
                }
                // Errors of later redb versions.
                Err(e) => return Err(redb::StorageError::Io(std::io::Error::other(e))),
            }
        }
        cursor.close()?;
        if expire_op_ids_through > 0 {
            self.op_ids
                .retain_in((room, 0)..=(room, expire_op_ids_through), |_, _| false)?;
        }
        stored.head = last;
        self.put_meta(room, &stored)?;
        Ok(Ok(()))
    }
}

/// A batch's events encoded as log rows, for [`WriteTables::apply`].
#[derive(Debug, Default)]
pub struct LogRows {
    /// The seq of the first event (meaningless when there are none).
    pub first: u64,
    /// How many events the rows hold, `first..first + events`.
    pub events: u64,
    /// `(last seq, row)`, in seq order: usually one row, more only when one row would
    /// pass [`record::MAX_LOG_ROW_BYTES`].
    pub rows: Vec<(u64, Vec<u8>)>,
}

/// Encodes a batch's events as log rows (one, unless the row would be too large: then
/// halves, recursively), checking that they run gaplessly from the first one's seq
/// (whether that continues the stored head is checked when the batch is written).
/// `Store::submit` calls this on the caller's thread, so the one writer thread neither
/// encodes events nor frees them.
pub fn encode_events(room: &str, events: &[EventRecord]) -> Result<LogRows, StoreError> {
    let first = events.first().map_or(1, |event| event.seq);
    for (expected, event) in (first..).zip(events) {
        if event.seq != expected {
            return Err(StoreError::SeqGap {
                room: room.to_owned(),
                expected,
                found: event.seq,
            });
        }
    }
    let mut rows = LogRows {
        first,
        events: events.len() as u64,
        rows: Vec::with_capacity(1),
    };
    encode_rows(room, events, &mut rows.rows)?;
    Ok(rows)
}

fn encode_rows(
    room: &str,
    events: &[EventRecord],
    rows: &mut Vec<(u64, Vec<u8>)>,
) -> Result<(), StoreError> {
    let Some(last) = events.last() else {
        return Ok(());
    };
    match encode_log_row(events) {
        Ok(row) => {
            rows.push((last.seq, row));
            Ok(())
        }
        Err(record::RecordError::TooLarge { .. }) if events.len() > 1 => {
            let (older, newer) = events.split_at(events.len() / 2);
            encode_rows(room, older, rows)?;
            encode_rows(room, newer, rows)
        }
        Err(source) => {
            // Name the event that cannot be encoded (the error path alone pays this).
            let failing = events
                .iter()
                .find_map(|event| {
                    encode_log_row(std::slice::from_ref(event))
                        .err()
                        .map(|e| (event.seq, e))
                })
                .unwrap_or((events[0].seq, source));
            Err(StoreError::Encode {
                room: room.to_owned(),
                seq: failing.0,
                source: failing.1,
            })
        }
    }
}

/// How many rooms each user created (rooms deleted since do not count), from the
/// `creators` table.
pub fn count_creators(
    db: &redb::Database,
) -> Result<std::collections::HashMap<String, usize>, redb::Error> {
    let txn = db.begin_read()?;
    let creators = txn.open_table(CREATORS)?;
    let mut counts = std::collections::HashMap::new();
    for entry in creators.iter()? {
        let (_, user) = entry?;
        *counts.entry(user.value().to_owned()).or_insert(0) += 1;
    }
    Ok(counts)
}

/// One room's rows, open in one read transaction, so every read of a request sees the
/// same commit.
pub struct RoomReads<'a> {
    room: &'a str,
    path: &'a Path,
    events: ReadOnlyTable<(&'static str, u64), &'static [u8]>,
    meta: ReadOnlyTable<&'static str, &'static [u8]>,
    snapshots: ReadOnlyTable<(&'static str, u64), &'static [u8]>,
    op_ids: ReadOnlyTable<(&'static str, u64), (&'static str, &'static str)>,
}

impl<'a> RoomReads<'a> {
    pub fn open(db: &redb::Database, path: &'a Path, room: &'a str) -> Result<Self, StoreError> {
        let read_error = |source: redb::Error| StoreError::Read {
            room: room.to_owned(),
            path: path.to_owned(),
            source: Box::new(source),
        };
        let txn = db.begin_read().map_err(|e| read_error(e.into()))?;
        Ok(RoomReads {
            room,
            path,
            events: txn.open_table(EVENTS).map_err(|e| read_error(e.into()))?,
            meta: txn.open_table(META).map_err(|e| read_error(e.into()))?,
            snapshots: txn
                .open_table(SNAPSHOTS)
                .map_err(|e| read_error(e.into()))?,
            op_ids: txn.open_table(OP_IDS).map_err(|e| read_error(e.into()))?,
        })
    }

    fn read_error(&self, source: impl Into<redb::Error>) -> StoreError {
        StoreError::Read {
            room: self.room.to_owned(),
            path: self.path.to_owned(),
            source: Box::new(source.into()),
        }
    }

    /// The room's meta row, or None if the room does not exist.
    pub fn meta(&self) -> Result<Option<StoredMeta>, StoreError> {
        let Some(row) = self.meta.get(self.room).map_err(|e| self.read_error(e))? else {
            return Ok(None);
        };
        decode_meta(row.value())
            .map(Some)
            .map_err(|source| StoreError::Corrupt {
                room: self.room.to_owned(),
                seq: None,
                source,
            })
    }

    /// The events `from..=to`, at most `limit` of them, checked to start at `from` and
    /// run gaplessly (up to `to` when fewer than `limit`). `head` is for the error.
    /// Rows are keyed by their last seq, so the first row of the range from `from` holds
    /// `from`; of a row reaching past `to` or the limit only the events asked for are
    /// rebuilt.
    pub fn events(
        &self,
        from: u64,
        to: u64,
        limit: usize,
        head: u64,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let mut events: Vec<EventRecord> = Vec::new();
        if from > to || limit == 0 {
            return Ok(events);
        }
        let gap = |expected, found| StoreError::LogGap {
            room: self.room.to_owned(),
            head,
            expected,
            found,
        };
        let range = self
            .events
            .range((self.room, from)..=(self.room, u64::MAX))
            .map_err(|e| self.read_error(e))?;
        let mut next = from;
        for entry in range {
            let (key, value) = entry.map_err(|e| self.read_error(e))?;
            let last = key.value().1;
            let row = log_row(last, value.value()).map_err(|source| self.corrupt(last, source))?;
            // The first row may start before `from`; every later one where the one
            // before it ended.
            let starts_ok = if next == from {
                row.first() <= from
            } else {
                row.first() == next
            };
            if !starts_ok {
                return Err(gap(next, row.first()));
            }
            while next <= last.min(to) && events.len() < limit {
                let event = row
                    .event(next)
                    .map_err(|source| self.corrupt(next, source))?;
                events.push(event);
                next += 1;
            }
            if next > to || events.len() == limit {
                break;
            }
        }
        // Fewer than asked for: the range must have run to its end.
        let last = next - 1;
        if events.len() < limit && last != to {
            return Err(gap(to, last));
        }
        Ok(events)
    }

    fn corrupt(&self, seq: u64, source: record::RecordError) -> StoreError {
        StoreError::Corrupt {
            room: self.room.to_owned(),
            seq: Some(seq),
            source,
        }
    }

    /// The newest snapshot with a seq in `lo..=hi`, if one is stored.
    pub fn latest_snapshot(&self, lo: u64, hi: u64) -> Result<Option<Snapshot>, StoreError> {
        if lo > hi {
            return Ok(None);
        }
        let mut range = self
            .snapshots
            .range((self.room, lo)..=(self.room, hi))
            .map_err(|e| self.read_error(e))?;
        let Some(entry) = range.next_back() else {
            return Ok(None);
        };
        let (key, value) = entry.map_err(|e| self.read_error(e))?;
        let seq = key.value().1;
        self.decode_snapshot(seq, value.value()).map(Some)
    }

    /// Every stored snapshot, oldest first.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>, StoreError> {
        let range = self
            .snapshots
            .range((self.room, 0)..=(self.room, u64::MAX))
            .map_err(|e| self.read_error(e))?;
        let mut snapshots = Vec::new();
        for entry in range {
            let (key, value) = entry.map_err(|e| self.read_error(e))?;
            snapshots.push(self.decode_snapshot(key.value().1, value.value())?);
        }
        Ok(snapshots)
    }

    fn decode_snapshot(&self, seq: u64, bytes: &[u8]) -> Result<Snapshot, StoreError> {
        record::decode_snapshot(seq, bytes).map_err(|source| StoreError::CorruptSnapshot {
            room: self.room.to_owned(),
            seq,
            source,
        })
    }

    /// The op ids stored in the rows of events `from..=to` (those not loaded whole),
    /// reading only the id out of each event. Newest first, and at most `limit` of them:
    /// a long log (a large `--history-events`) is not read whole for ids the room would
    /// forget at once.
    pub fn event_op_ids(
        &self,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<OpIdRecord>, StoreError> {
        let mut op_ids = Vec::new();
        if from > to || limit == 0 {
            return Ok(op_ids);
        }
        // The row holding `to` may reach past it: it is the first one keyed after `to`
        // when no row ends at `to`.
        let past_to = self
            .events
            .range((self.room, to.saturating_add(1))..=(self.room, u64::MAX))
            .map_err(|e| self.read_error(e))?
            .next();
        let up_to = self
            .events
            .range((self.room, from)..=(self.room, to))
            .map_err(|e| self.read_error(e))?
            .rev();
        for entry in past_to.into_iter().chain(up_to) {
            let (key, value) = entry.map_err(|e| self.read_error(e))?;
            let last = key.value().1;
            let row = log_row(last, value.value()).map_err(|source| self.corrupt(last, source))?;
            if row.first() > to {
                continue;
            }
            for seq in (row.first().max(from)..=last.min(to)).rev() {
                if op_ids.len() >= limit {
                    return Ok(op_ids);
                }
                if let Some((user, op_id)) = row.op_id(seq) {
                    op_ids.push(OpIdRecord { user, op_id, seq });
                }
            }
        }
        Ok(op_ids)
    }

    /// The op ids kept apart from the log (those of trimmed events), sorted by seq.
    pub fn op_ids(&self) -> Result<Vec<OpIdRecord>, StoreError> {
        let mut op_ids = Vec::new();
        let range = self
            .op_ids
            .range((self.room, 0)..=(self.room, u64::MAX))
            .map_err(|e| self.read_error(e))?;
        for entry in range {
            let (key, value) = entry.map_err(|e| self.read_error(e))?;
            let (user, op_id) = value.value();
            op_ids.push(OpIdRecord {
                user: user.to_owned(),
                op_id: op_id.to_owned(),
                seq: key.value().1,
            });
        }
        Ok(op_ids)
    }
}

/// The most op ids a room load reads out of event rows before the snapshot: a room
/// remembers 10,000 to 11,000 (`RoomConfig::op_ids_kept` and its slack), so older ones
/// would be forgotten at its next commit anyway.
pub const MAX_LOADED_OP_IDS: usize = 11_000;

/// Reads one room in a read transaction: its meta, newest snapshot, the events after it
/// (checked gapless up to the head) and op ids sorted by seq. `Ok(None)` if it does not
/// exist.
pub fn read_room(
    db: &redb::Database,
    path: &Path,
    room: &str,
) -> Result<Option<LoadedRoom>, StoreError> {
    let reads = RoomReads::open(db, path, room)?;
    let Some(stored) = reads.meta()? else {
        return Ok(None);
    };
    let StoredMeta {
        meta,
        head,
        first_retained,
    } = stored;
    let snapshot = reads.latest_snapshot(0, u64::MAX)?;
    let after = match &snapshot {
        Some(snapshot) if snapshot.seq > head => {
            return Err(StoreError::SnapshotPastHead {
                room: room.to_owned(),
                seq: snapshot.seq,
                head,
            })
        }
        Some(snapshot) => snapshot.seq,
        None => 0,
    };
    // The events after the snapshot must all be retained.
    if after.saturating_add(1) < first_retained {
        return Err(StoreError::NoBaseSnapshot {
            room: room.to_owned(),
            first_retained,
        });
    }
    let events = reads.events(after.saturating_add(1), head, usize::MAX, head)?;
    // Op ids: those kept apart for trimmed events, then those in the rows of retained
    // events, the loaded ones included. By seq, so a row written both ways (by a build
    // that kept every id apart) counts once.
    let mut by_seq: std::collections::BTreeMap<u64, OpIdRecord> =
        reads.op_ids()?.into_iter().map(|op| (op.seq, op)).collect();
    let loaded_ids = events.iter().filter(|event| event.op_id.is_some()).count();
    let limit = MAX_LOADED_OP_IDS.saturating_sub(loaded_ids);
    for op in reads.event_op_ids(first_retained, after, limit)? {
        by_seq.insert(op.seq, op);
    }
    for event in &events {
        if let Some(op_id) = &event.op_id {
            by_seq.insert(
                event.seq,
                OpIdRecord {
                    user: event.user.clone(),
                    op_id: op_id.clone(),
                    seq: event.seq,
                },
            );
        }
    }
    let op_ids = by_seq.into_values().collect();
    Ok(Some(LoadedRoom {
        meta,
        head,
        first_retained,
        snapshot,
        events,
        op_ids,
    }))
}
