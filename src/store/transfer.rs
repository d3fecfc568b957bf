//! Moving a room to another data dir (`roomd cluster rebalance`): everything the store
//! keeps of one room, read in one read transaction ([`Store::export_room`]), framed as
//! bytes for the wire ([`RoomExport::encode`], [`RoomExport::decode`]), and written on
//! the new owner in one write transaction ([`Store::submit_import`]).
//!
//! An export holds the room's meta (kind, and the epoch as clients see it), its head and
//! first retained seq, every stored snapshot, every retained event (each with its op
//! id), and the op ids kept apart for trimmed events. With these the room loads on its
//! new owner as it would have on the old one: same epoch, same seq, same op-id window,
//! same history and time travel. The row of the user who created it (the per-user room
//! count) does not move: that count is per node.
//!
//! The framing is `u32` (big endian) length of a JSON header, the header, then the blobs
//! it lists in order: snapshot rows and log rows in the store's own record formats
//! (`record.rs`), so the receiving side validates them exactly as it validates rows
//! read from its own disk, size first. The whole encoded export is bounded by
//! [`MAX_EXPORT_BYTES`]; the cluster streams it in pieces under NATS's payload limit.
//!
//! The import is checked before anything is written: the room must be absent (and not
//! being deleted), the events must run gaplessly from the first retained seq to the
//! head, every snapshot must be at or before the head, and a trimmed log must come with
//! a snapshot that covers the trimmed part, so the imported room always loads. The
//! writer thread writes it (`writer.rs`, [`Job::Import`](super::writer::Job)), durably.

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::record::{self, decode_snapshot, encode_snapshot, log_row, StoredMeta};
use redb::ReadableTable;

use super::tables::{self, LogRows, RoomReads, WriteTables};
use super::writer::Job;
use super::{
    EventRecord, OpIdRecord, RoomMeta, Snapshot, Store, StoreError, SubmitError, MAX_SNAPSHOT_BYTES,
};

/// The largest encoded export a node sends or accepts: a room of `--history-events`
/// retained events of the largest size, with its snapshots, stays far below it.
pub const MAX_EXPORT_BYTES: usize = 1 << 30;

/// The largest header an export may carry (op ids and the blob list).
const MAX_HEADER_BYTES: usize = 64 << 20;

/// Events per log row in an encoded export: rows stay small (a piece of the stream),
/// and an oversized event still gets a row of its own (`tables::encode_events` halves).
const EVENTS_PER_ROW: usize = 256;

/// Everything the store keeps of one room.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomExport {
    pub room: String,
    /// Kind, and the epoch as clients see it (the data dir's salt taken off).
    pub meta: RoomMeta,
    pub head: u64,
    pub first_retained: u64,
    /// Every stored snapshot, oldest first.
    pub snapshots: Vec<Snapshot>,
    /// Every retained event, `first_retained..=head`.
    pub events: Vec<EventRecord>,
    /// The op ids kept apart for trimmed events (seq below `first_retained`).
    pub op_ids: Vec<OpIdRecord>,
}

/// The JSON header of an encoded export.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    room: String,
    kind: String,
    epoch: u64,
    head: u64,
    first_retained: u64,
    /// `(user, op_id, seq)`.
    op_ids: Vec<(String, String, u64)>,
    /// `(seq, bytes)` of each snapshot blob, in order.
    snapshots: Vec<(u64, u64)>,
    /// `(last seq, bytes)` of each log row blob, in order.
    rows: Vec<(u64, u64)>,
}

/// Why encoded export bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("room export: {0}")]
pub struct ExportError(pub String);

impl RoomExport {
    /// The export as bytes (see the module docs for the framing).
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let mut blobs: Vec<Vec<u8>> = Vec::new();
        let mut snapshots = Vec::with_capacity(self.snapshots.len());
        for snapshot in &self.snapshots {
            let row = encode_snapshot(snapshot).map_err(|source| StoreError::Encode {
                room: self.room.clone(),
                seq: snapshot.seq,
                source,
            })?;
            snapshots.push((snapshot.seq, row.len() as u64));
            blobs.push(row);
        }
        let mut rows = Vec::new();
        for chunk in self.events.chunks(EVENTS_PER_ROW) {
            let LogRows { rows: encoded, .. } = tables::encode_events(&self.room, chunk)?;
            for (last, row) in encoded {
                rows.push((last, row.len() as u64));
                blobs.push(row);
            }
        }
        let header = Header {
            room: self.room.clone(),
            kind: self.meta.kind.clone(),
            epoch: self.meta.epoch,
            head: self.head,
            first_retained: self.first_retained,
            op_ids: self
                .op_ids
                .iter()
                .map(|o| (o.user.clone(), o.op_id.clone(), o.seq))
                .collect(),
            snapshots,
            rows,
        };
        // Strings and integers only: always serializable.
        let header = serde_json::to_vec(&header).unwrap_or_default();
        let total = 4 + header.len() + blobs.iter().map(Vec::len).sum::<usize>();
        let mut bytes = Vec::with_capacity(total);
        bytes.extend_from_slice(&(header.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&header);
        for blob in blobs {
            bytes.extend_from_slice(&blob);
        }
        Ok(bytes)
    }

    /// Reads an export back, validating every row as if read from disk (sizes first).
    pub fn decode(bytes: &[u8]) -> Result<RoomExport, ExportError> {
        let bad = |what: String| ExportError(what);
        if bytes.len() > MAX_EXPORT_BYTES {
            return Err(bad(format!(
                "{} bytes exceed the limit of {MAX_EXPORT_BYTES}",
                bytes.len()
            )));
        }
        let (len, rest) = bytes
            .split_first_chunk::<4>()
            .ok_or_else(|| bad("shorter than its length prefix".into()))?;
        let len = u32::from_be_bytes(*len) as usize;
        if len > MAX_HEADER_BYTES || len > rest.len() {
            return Err(bad(format!(
                "header of {len} bytes in {} bytes",
                rest.len()
            )));
        }
        let (header, mut blobs) = rest.split_at(len);
        let header: Header =
            serde_json::from_slice(header).map_err(|e| bad(format!("header: {e}")))?;
        let mut take = |n: u64, limit: usize| -> Result<&[u8], ExportError> {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if n > limit || n > blobs.len() {
                return Err(bad(format!(
                    "a blob of {n} bytes with {} left",
                    blobs.len()
                )));
            }
            let (blob, rest) = blobs.split_at(n);
            blobs = rest;
            Ok(blob)
        };
        let mut snapshots = Vec::with_capacity(header.snapshots.len());
        for (seq, n) in &header.snapshots {
            let row = take(*n, MAX_SNAPSHOT_BYTES)?;
            snapshots
                .push(decode_snapshot(*seq, row).map_err(|e| bad(format!("snapshot {seq}: {e}")))?);
        }
        let mut events = Vec::new();
        for (last, n) in &header.rows {
            let row = take(*n, record::MAX_LOG_ROW_BYTES)?;
            let row = log_row(*last, row).map_err(|e| bad(format!("row {last}: {e}")))?;
            for seq in row.first()..=row.last() {
                events.push(
                    row.event(seq)
                        .map_err(|e| bad(format!("event {seq}: {e}")))?,
                );
            }
        }
        if !blobs.is_empty() {
            return Err(bad(format!("{} bytes after the last blob", blobs.len())));
        }
        Ok(RoomExport {
            room: header.room,
            meta: RoomMeta {
                kind: header.kind,
                epoch: header.epoch,
            },
            head: header.head,
            first_retained: header.first_retained,
            snapshots,
            events,
            op_ids: header
                .op_ids
                .into_iter()
                .map(|(user, op_id, seq)| OpIdRecord { user, op_id, seq })
                .collect(),
        })
    }

    /// The checks an import makes before writing (see the module docs); pure.
    pub fn check(&self) -> Result<(), String> {
        if self.head == 0 || self.first_retained == 0 || self.first_retained > self.head + 1 {
            return Err(format!(
                "head {} with first retained seq {}",
                self.head, self.first_retained
            ));
        }
        for (expected, event) in (self.first_retained..).zip(&self.events) {
            if event.seq != expected {
                return Err(format!("event {} where {expected} comes next", event.seq));
            }
        }
        let retained = self.head + 1 - self.first_retained;
        if self.events.len() as u64 != retained {
            return Err(format!(
                "{} events for the retained seqs {}..={}",
                self.events.len(),
                self.first_retained,
                self.head
            ));
        }
        if let Some(late) = self
            .snapshots
            .iter()
            .find(|s| s.seq == 0 || s.seq > self.head)
        {
            return Err(format!(
                "a snapshot at {} with head {}",
                late.seq, self.head
            ));
        }
        let covered = self
            .snapshots
            .iter()
            .any(|s| s.seq + 1 >= self.first_retained);
        if self.first_retained > 1 && !covered {
            return Err(format!(
                "events before {} are trimmed and no snapshot covers them",
                self.first_retained
            ));
        }
        if let Some(op) = self.op_ids.iter().find(|o| o.seq >= self.first_retained) {
            return Err(format!("a kept op id at seq {}, which is retained", op.seq));
        }
        Ok(())
    }
}

/// A room import as the writer takes it: checked and encoded on the caller's thread.
pub struct ImportJob {
    pub room: String,
    /// The meta as stored (the epoch salted for this data dir).
    pub stored: StoredMeta,
    pub rows: LogRows,
    pub snapshots: Vec<(u64, Vec<u8>)>,
    pub op_ids: Vec<OpIdRecord>,
    pub reply: oneshot::Sender<Result<(), StoreError>>,
}

impl ImportJob {
    /// Writes the room into `tables` (one transaction, the writer's); the inner error
    /// refuses the import before anything of it is written.
    pub fn write(
        &self,
        tables: &mut WriteTables<'_>,
    ) -> Result<Result<(), StoreError>, redb::StorageError> {
        let room = self.room.as_str();
        match tables.stored_meta(room)? {
            Ok(None) => {}
            Ok(Some(stored)) => {
                return Ok(Err(StoreError::RoomExists {
                    room: room.to_owned(),
                    head: stored.head,
                }))
            }
            Err(corrupt) => return Ok(Err(corrupt)),
        }
        if tables.deleting.get(room)?.is_some() {
            return Ok(Err(StoreError::Import {
                room: room.to_owned(),
                reason: "an earlier copy is still being deleted here; retry".into(),
            }));
        }
        for (last, row) in &self.rows.rows {
            tables.events.insert((room, *last), row.as_slice())?;
        }
        for (seq, row) in &self.snapshots {
            tables.snapshots.insert((room, *seq), row.as_slice())?;
        }
        for op in &self.op_ids {
            tables
                .op_ids
                .insert((room, op.seq), (op.user.as_str(), op.op_id.as_str()))?;
        }
        tables.put_meta(room, &self.stored)?;
        Ok(Ok(()))
    }
}

impl Store {
    /// Blocking: everything the store keeps of `room`, read in one read transaction;
    /// Ok(None) if it does not exist. Holds the whole retained room in memory.
    pub fn export_room(&self, room: &str) -> Result<Option<RoomExport>, StoreError> {
        self.ensure_folded(Some(room))?;
        let path = &self.inner.db_path;
        let export = self.guarded_read(room, |db| {
            let reads = RoomReads::open(db, path, room)?;
            let Some(stored) = reads.meta()? else {
                return Ok(None);
            };
            let events =
                reads.events(stored.first_retained, stored.head, usize::MAX, stored.head)?;
            let op_ids = reads
                .op_ids()?
                .into_iter()
                .filter(|op| op.seq < stored.first_retained)
                .collect();
            Ok(Some(RoomExport {
                room: room.to_owned(),
                meta: stored.meta,
                head: stored.head,
                first_retained: stored.first_retained,
                snapshots: reads.snapshots()?,
                events,
                op_ids,
            }))
        })?;
        Ok(export.map(|mut export| {
            export.meta.epoch ^= self.inner.epoch_salt;
            export
        }))
    }

    /// Non-blocking: queues the import of a room exported elsewhere (checked and encoded
    /// here; a refusal resolves the receiver at once). The receiver resolves once the
    /// transaction holding the whole room committed durably, or with why it was refused.
    pub fn submit_import(
        &self,
        export: RoomExport,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, SubmitError> {
        let (reply, outcome) = oneshot::channel();
        let refuse = |reason: String| StoreError::Import {
            room: export.room.clone(),
            reason,
        };
        let encoded = export.check().map_err(refuse).and_then(|()| {
            let rows = tables::encode_events(&export.room, &export.events)?;
            let mut snapshots = Vec::with_capacity(export.snapshots.len());
            for snapshot in &export.snapshots {
                let row = encode_snapshot(snapshot).map_err(|source| StoreError::Encode {
                    room: export.room.clone(),
                    seq: snapshot.seq,
                    source,
                })?;
                snapshots.push((snapshot.seq, row));
            }
            Ok((rows, snapshots))
        });
        let (rows, snapshots) = match encoded {
            Ok(encoded) => encoded,
            Err(refusal) => {
                let _ = reply.send(Err(refusal));
                return Ok(outcome);
            }
        };
        let RoomExport {
            room,
            mut meta,
            head,
            first_retained,
            op_ids,
            ..
        } = export;
        meta.epoch ^= self.inner.epoch_salt;
        self.send(Job::Import(ImportJob {
            room,
            stored: StoredMeta {
                meta,
                head,
                first_retained,
            },
            rows,
            snapshots,
            op_ids,
            reply,
        }))?;
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{batch, commit, open};
    use super::super::{Batch, Slot, TrimOutcome, TrimPolicy};
    use super::*;
    use crate::value::Value;

    fn import(store: &Store, export: RoomExport) -> Result<(), StoreError> {
        store
            .submit_import(export)
            .expect("the queue has room")
            .blocking_recv()
            .expect("the writer answers every import")
    }

    fn snapshot(seq: u64) -> Snapshot {
        Snapshot {
            seq,
            public: vec![(
                format!("key{seq}"),
                Slot::new(Some(Value::Int(seq as i64)), seq),
            )],
            private: vec![],
            tombstone_floor: 0,
        }
    }

    #[test]
    fn a_trimmed_room_moves_whole_and_loads_alike_on_another_data_dir() {
        let (from_dir, to_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (from, to) = (open(from_dir.path()), open(to_dir.path()));
        commit(&from, batch("r", 1, 40)).unwrap();
        let mut with_ids = batch("r", 41, 60);
        for event in &mut with_ids.events {
            event.op_id = Some(format!("op-{}", event.seq));
        }
        with_ids.snapshot = Some(snapshot(50));
        commit(&from, with_ids).unwrap();
        commit(
            &from,
            Batch {
                snapshot: Some(snapshot(60)),
                ..batch("r", 61, 70)
            },
        )
        .unwrap();
        let policy = TrimPolicy {
            keep_op_ids_from: 0,
            ..TrimPolicy::history_events(15)
        };
        let trimmed = from
            .submit_trim("r", policy)
            .unwrap()
            .blocking_recv()
            .unwrap();
        assert!(matches!(trimmed, Ok(TrimOutcome::Done(_))), "{trimmed:?}");

        let export = from.export_room("r").unwrap().expect("the room exists");
        assert_eq!(export.first_retained, 51);
        assert_eq!(export.head, 70);
        assert_eq!(export.events.len(), 20);
        assert!(export.op_ids.iter().all(|o| o.seq < 51) && !export.op_ids.is_empty());
        // The stream reads back as written.
        let bytes = export.encode().unwrap();
        assert_eq!(RoomExport::decode(&bytes).unwrap(), export);
        import(&to, export.clone()).unwrap();

        let (a, b) = (
            from.load_room("r").unwrap().unwrap(),
            to.load_room("r").unwrap().unwrap(),
        );
        // Same epoch as clients see it, though the data dirs' salts differ.
        assert_eq!(a.meta, b.meta);
        assert_eq!((a.head, a.first_retained), (b.head, b.first_retained));
        assert_eq!(a.snapshot, b.snapshot);
        assert_eq!(a.events, b.events);
        assert_eq!(a.op_ids, b.op_ids);
        assert_eq!(
            from.room_snapshots("r").unwrap(),
            to.room_snapshots("r").unwrap()
        );

        // A second import finds the room there and writes nothing.
        assert!(matches!(
            import(&to, export),
            Err(StoreError::RoomExists { head: 70, .. })
        ));
    }

    #[test]
    fn an_import_that_would_not_load_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        commit(&store, batch("src", 1, 5)).unwrap();
        let good = store.export_room("src").unwrap().unwrap();
        let mut gap = good.clone();
        gap.events.remove(2);
        let mut trimmed_bare = good.clone();
        trimmed_bare.first_retained = 3;
        trimmed_bare.events.drain(..2);
        let mut late_snapshot = good.clone();
        late_snapshot.snapshots.push(snapshot(9));
        for (bad, why) in [
            (gap, "comes next"),
            (trimmed_bare, "no snapshot covers them"),
            (late_snapshot, "a snapshot at 9"),
        ] {
            let bad = RoomExport {
                room: "dst".into(),
                ..bad
            };
            match import(&store, bad) {
                Err(StoreError::Import { reason, .. }) => assert!(reason.contains(why), "{reason}"),
                other => panic!("imported: {other:?}"),
            }
        }
        assert!(store.load_room("dst").unwrap().is_none());
        // Truncated or padded bytes are refused.
        let bytes = good.encode().unwrap();
        assert!(RoomExport::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(RoomExport::decode(&padded).is_err());
    }
}
