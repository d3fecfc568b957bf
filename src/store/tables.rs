//! The layout of `roomd.redb`: its three tables, how one batch is written into them,
//! and how one room is read back.
//!
//! - `events`: `(room, seq)` -> event row (`record.rs`), one per event, gapless per room.
//! - `meta`: `room` -> meta row (kind, epoch, head seq). The head moves in the same
//!   transaction as the events that advance it, so a reader never sees one without the
//!   other.
//! - `op_ids`: `(room, user, op_id)` -> seq of the event the op became, for dedup.
//!
//! Writing a batch checks it against the stored head before touching any table, so a
//! batch that would break gapless seq is refused whole while the rest of its transaction
//! commits. When and how transactions commit is `writer.rs`'s business.

use redb::{ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction};

use super::record::{self, decode_event, decode_meta, encode_event, encode_meta};
use super::{Batch, EventRecord, LoadedRoom, OpIdRecord, StoreError};

pub(super) const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(super) const OP_IDS: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("op_ids");

/// Creates any missing table, so read transactions on a new database find them all.
pub fn create_all(txn: &WriteTransaction) -> Result<(), redb::TableError> {
    txn.open_table(EVENTS)?;
    txn.open_table(META)?;
    txn.open_table(OP_IDS)?;
    Ok(())
}

/// The three tables, open in one write transaction for the batches of one group commit.
pub struct WriteTables<'txn> {
    events: Table<'txn, (&'static str, u64), &'static [u8]>,
    meta: Table<'txn, &'static str, &'static [u8]>,
    op_ids: Table<'txn, (&'static str, &'static str, &'static str), u64>,
}

impl<'txn> WriteTables<'txn> {
    pub fn open(txn: &'txn WriteTransaction) -> Result<Self, redb::TableError> {
        Ok(WriteTables {
            events: txn.open_table(EVENTS)?,
            meta: txn.open_table(META)?,
            op_ids: txn.open_table(OP_IDS)?,
        })
    }

    /// Writes one batch. The outer error is a storage failure that dooms the whole
    /// transaction; the inner one refuses this batch alone, before anything of it is
    /// written.
    pub fn apply(&mut self, batch: &Batch) -> Result<Result<(), StoreError>, redb::StorageError> {
        let room = batch.room.as_str();
        let stored = match self.meta.get(room)? {
            Some(row) => match decode_meta(row.value()) {
                Ok(stored) => Some(stored),
                Err(source) => {
                    return Ok(Err(StoreError::Corrupt {
                        room: room.to_owned(),
                        seq: None,
                        source,
                    }))
                }
            },
            None => None,
        };
        let (meta, head) = match (stored, &batch.create) {
            (Some((_, head)), Some(_)) => {
                return Ok(Err(StoreError::RoomExists {
                    room: room.to_owned(),
                    head,
                }))
            }
            (None, None) => {
                return Ok(Err(StoreError::NoSuchRoom {
                    room: room.to_owned(),
                }))
            }
            (Some(stored), None) => stored,
            (None, Some(create)) => (*create, 0),
        };
        let rows = match encode_batch(room, head, &batch.events) {
            Ok(rows) => rows,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let new_head = head + rows.len() as u64;
        let meta_row = encode_meta(&meta, new_head).expect(
            "a meta row is three integers: it always serializes and is far below the row limit",
        );

        for (seq, row) in &rows {
            self.events.insert((room, *seq), row.as_slice())?;
        }
        // Expiry goes first so an op id the batch also records is kept.
        for (user, op_id) in &batch.expire_op_ids {
            self.op_ids.remove((room, user.as_str(), op_id.as_str()))?;
        }
        for op in &batch.op_ids {
            self.op_ids
                .insert((room, op.user.as_str(), op.op_id.as_str()), op.seq)?;
        }
        self.meta.insert(room, meta_row.as_slice())?;
        Ok(Ok(()))
    }
}

/// Encodes a batch's events, checking that they run gaplessly on from `head`.
fn encode_batch(
    room: &str,
    head: u64,
    events: &[EventRecord],
) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let mut rows = Vec::with_capacity(events.len());
    for (expected, event) in (head + 1..).zip(events) {
        if event.seq != expected {
            return Err(StoreError::SeqGap {
                room: room.to_owned(),
                expected,
                found: event.seq,
            });
        }
        let row = encode_event(event).map_err(|source| StoreError::Encode {
            room: room.to_owned(),
            seq: event.seq,
            source,
        })?;
        rows.push((event.seq, row));
    }
    Ok(rows)
}

/// Reads one room in a read transaction: its meta, head, events in seq order (checked
/// gapless up to the head) and op ids sorted by seq. `Ok(None)` if it does not exist.
pub fn read_room(
    db: &redb::Database,
    db_path: &std::path::Path,
    room: &str,
) -> Result<Option<LoadedRoom>, StoreError> {
    let read_error = |source: redb::Error| StoreError::Read {
        room: room.to_owned(),
        path: db_path.to_owned(),
        source: Box::new(source),
    };
    let corrupt = |seq, source: record::RecordError| StoreError::Corrupt {
        room: room.to_owned(),
        seq,
        source,
    };
    let txn = db.begin_read().map_err(|e| read_error(e.into()))?;
    let meta_table = txn.open_table(META).map_err(|e| read_error(e.into()))?;
    let Some(row) = meta_table.get(room).map_err(|e| read_error(e.into()))? else {
        return Ok(None);
    };
    let (meta, head) = decode_meta(row.value()).map_err(|e| corrupt(None, e))?;

    let events_table = txn.open_table(EVENTS).map_err(|e| read_error(e.into()))?;
    let mut events: Vec<EventRecord> = Vec::new();
    let range = events_table
        .range((room, 0u64)..=(room, u64::MAX))
        .map_err(|e| read_error(e.into()))?;
    for entry in range {
        let (key, value) = entry.map_err(|e| read_error(e.into()))?;
        let seq = key.value().1;
        if let Some(previous) = events.last() {
            if seq != previous.seq + 1 {
                return Err(StoreError::LogGap {
                    room: room.to_owned(),
                    head,
                    expected: previous.seq + 1,
                    found: seq,
                });
            }
        }
        events.push(decode_event(seq, value.value()).map_err(|e| corrupt(Some(seq), e))?);
    }
    // Older events may be trimmed away later, but the newest one must be the head.
    if let Some(last) = events.last() {
        if last.seq != head {
            return Err(StoreError::LogGap {
                room: room.to_owned(),
                head,
                expected: head,
                found: last.seq,
            });
        }
    }

    let op_ids_table = txn.open_table(OP_IDS).map_err(|e| read_error(e.into()))?;
    let mut op_ids = Vec::new();
    // Keys sort by room first, so this room's op ids are one contiguous run.
    let range = op_ids_table
        .range((room, "", "")..)
        .map_err(|e| read_error(e.into()))?;
    for entry in range {
        let (key, seq) = entry.map_err(|e| read_error(e.into()))?;
        let (key_room, user, op_id) = key.value();
        if key_room != room {
            break;
        }
        op_ids.push(OpIdRecord {
            user: user.to_owned(),
            op_id: op_id.to_owned(),
            seq: seq.value(),
        });
    }
    op_ids.sort_by_key(|op| op.seq);

    Ok(Some(LoadedRoom {
        meta,
        head,
        events,
        op_ids,
    }))
}
