//! The journal: plain room batches written in commit order, and moved later into
//! their rooms' rows by a fold.
//!
//! Why: a batch written straight into its room dirties the room's `events` leaf and a
//! `meta` leaf, and redb copies, checksums and writes each dirty page per commit; with
//! many rooms every op is its own room batch and that page work was 85-90% of the
//! writer (`benches/README.md`, issue 14). A commit instead appends its plain batches
//! to the journal as one or a few rows under increasing keys, and answers them after
//! that append is durable. The rows go to the segment files of `journal_file.rs` (a
//! store with a data dir: one `fdatasync` per commit, no redb transaction unless
//! something else needs one), or to the `journal` table of the commit's transaction (a
//! store over a redb backend, for tests and the fuzz target; and what a version 4 data
//! dir holds). A fold later writes many commits' worth of one room at once
//! ([`WriteTables::append_run`]): one leaf copy per fold instead of one per batch. A
//! journal row is serialized straight into its destination (`record::write_journal_row`),
//! so the log rows are copied once on the writer thread.
//!
//! What is journaled: batches with events and without `create`, whose log rows are
//! small ([`MAX_JOURNALED_BATCH_BYTES`]); a snapshot riding with one is written to
//! `snapshots` directly (see [`Pending::journal`]), an expiry of op ids rides in the
//! entry and is applied by the fold. Any other batch of a pending room (one without events
//! or with a large row; a `create`, which is then refused) folds the room first, in
//! the same transaction, and is then written directly as before; a deletion drops the room's pending batches (the deletion removes the room in order
//! after them either way). A trim reads and moves only the folded part of a room
//! (events up to a stored snapshot, the head of the meta row), so the writer folds
//! its room in the transaction of its first piece, before it plans (else a room whose
//! events were all journaled when it asked would trim nothing until its next
//! snapshot); a fold reads the meta row afresh, so neither undoes the other.
//!
//! [`Pending`] is the writer's view of what is journaled and not yet folded: per room
//! the epoch and pending head (the gapless check of a journaled batch runs against it,
//! so a refused batch is still refused whole), the pending batches' rows in order with
//! their journal key, and per journal row how many of its batches are unfolded; a table
//! row is deleted in the transaction that folds its last batch, a segment file once
//! every row in it is folded and the fold is durable. Only the writer thread
//! touches it. Readers see folded rows only: the writer publishes the set of pending
//! rooms with their pending heads (`Health`), adding a room or moving its head after
//! the commit that journaled its batch and before the batch is answered, and removing
//! it after the commit that folded its last pending batch; a read of a pending room
//! asks the writer for a fold first (`Store::ensure_folded`), which folds it whole.
//!
//! Fold policy ([`Pending::due`]): a room is folded about [`FOLD_AGE`] after its first
//! pending batch, while the pending bytes pass [`FOLD_BYTES`] (earliest due first;
//! it is also what a restart replays at most, plus one commit), when the writer has
//! had no job for [`IDLE_FOLD`], on demand, and at shutdown; by policy at most
//! [`MAX_FOLD_ROOMS`] rooms and about [`MAX_FOLD_BYTES`] per transaction (more while
//! past [`FOLD_BYTES`]) besides the rooms asked for, so a fold does not hold up the acks
//! of its commit for long. A fold by policy may take a prefix of a room's pending
//! batches (whole batches, in seq order, at least one), so one big room is folded over
//! several commits within that bound; the rest stays pending and due, first in line.
//! Its journal rows stay until their last batch is folded.
//!
//! Replay ([`replay`], at open, before the writer serves): every journal row in key
//! order, the table's first, then the segment files'; an entry is applied when its room exists with the epoch it was journaled
//! under and its events are past the stored head (those at or below it were folded
//! before the stop; a partial fold may have folded the first of an entry's log rows,
//! which then end exactly at the head, and only the rows after it are applied). Epochs are drawn at random per creation (64 bits,
//! `room/handlers.rs`) and moved whole with an import, so an entry of a deleted room
//! does not land in a room created again under its name, and a room that left and came
//! back (export, deletion, import) has a head at or past every old entry of it. An entry that would leave a gap refuses the open,
//! naming the row and room.
//!
//! Damage: a fold probes the room's pages first (`probe.rs`). A damaged room is marked
//! as today and dropped from [`Pending`] without counting its batches folded, so its
//! journal rows stay (a replay after the file is restored applies them); the room then
//! answers `unavailable` like any damaged room. Replay probes likewise and keeps the
//! rows that hold entries of damaged rooms.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::time::{Duration, Instant};

use redb::{ReadableDatabase, ReadableTable};

use super::journal_file::{self, JournalFile};
use super::probe;
use super::record::{self, JournalEntryRef, JournalLogRowRef, JournalRowRef};
use super::tables::{LogRows, WriteTables, JOURNAL};
use super::StoreError;

/// Pending bytes past which the oldest rooms are folded in every commit until they are
/// back under it. It bounds the writer's memory for pending rows and what a restart
/// replays; 64 MiB lets [`FOLD_AGE`] hold at 10,000 rooms and 85,000 ops/s (32 MiB was
/// reached there, and the catch-up folds cost more than the age saves).
pub const FOLD_BYTES: usize = 64 * 1024 * 1024;
/// A room is folded about this long after its first pending batch: between half and
/// one and a half times it, spread by the order in which rooms became pending. Rooms
/// that start together (a bench, a restart) would otherwise fall due together, and the
/// commits that fold them in a row held acks up: open-loop ack p99 at 100 rooms 5.3-5.6
/// -> 11.8-12.9 ms with one age for all (`benches/README.md`). 4 s rather than 2 s: a
/// room with few events per second is folded with twice as many per page written
/// (10,000 rooms, closed loop: acked ops/s x1.13, `benches/README.md` eleventh pass).
pub const FOLD_AGE: Duration = Duration::from_secs(4);
/// The most pending bytes one transaction folds by policy (at least one room) while
/// the pending bytes are under [`FOLD_BYTES`]: the rows of a fold are B-tree inserts
/// like any others, and 2 MiB per commit held acks up by tens of ms (ack p99 at 100
/// rooms 37 -> 90-170 ms, `benches/README.md`); spread thin over commits, rooms also
/// fall due at different times. 64 KiB rather than 256 KiB with the 4 s age: a busy
/// room's fold is split over more, shorter commits, so fewer ops wait behind a long
/// one.
pub const MAX_FOLD_BYTES: usize = 64 * 1024;
/// Without a job for this long, the writer folds (up to [`MAX_FOLD_ROOMS`] rooms per
/// transaction) until nothing is pending.
pub const IDLE_FOLD: Duration = Duration::from_millis(20);
/// The most rooms one transaction folds by policy (rooms a read asks for come on top).
pub const MAX_FOLD_ROOMS: usize = 256;
/// Batches whose log rows are larger are written directly: a journal row stays small,
/// and a large batch dirties its own leaves anyway.
pub const MAX_JOURNALED_BATCH_BYTES: usize = 64 * 1024;
/// A commit starts another journal row once its current one holds this much.
const ROW_CAP: usize = 1024 * 1024;
/// What an entry costs in a journal row besides its log rows (room name aside): the
/// archive's integers and offsets, rounded up.
const ENTRY_OVERHEAD: usize = 64;

/// Where a commit's journal rows go: the `journal` table of its transaction (a store
/// without a data dir, `Store::open_with_backend`), or the segment files.
pub enum Sink<'a, 'txn> {
    Table(&'a mut WriteTables<'txn>),
    File(&'a mut JournalFile),
}

/// A room's meta row as [`WriteTables::stored_meta`] reads it.
pub type StoredMetaResult =
    Result<Result<Option<record::StoredMeta>, StoreError>, redb::StorageError>;

/// One journaled batch not yet folded.
struct PendingBatch {
    /// The journal row holding it.
    key: u64,
    rows: LogRows,
    expire_op_ids_through: u64,
    /// Its share of the pending bytes.
    bytes: usize,
}

impl PendingBatch {
    fn last(&self) -> u64 {
        self.rows.first + self.rows.events - 1
    }
}

/// A room to fold in the current transaction: whole (a read asked for it), or a prefix
/// of its pending batches of about `at_most` bytes (by policy, see [`Pending::due`]).
pub struct Fold {
    pub room: String,
    pub at_most: Option<usize>,
}

/// A room with journaled batches not yet folded.
pub struct PendingRoom {
    /// The stored (salted) epoch of the room when its first pending batch was journaled.
    epoch: u64,
    /// The seq of its last pending event: the next batch must start right after it.
    head: u64,
    /// In seq order, gapless from the folded head + 1 to `head`; never empty.
    batches: VecDeque<PendingBatch>,
    bytes: usize,
    /// When it falls due, and which of the room's entries in [`Pending::order`] is
    /// current (a room partly folded goes back under the same entry).
    due: Instant,
    generation: u64,
}

impl PendingRoom {
    /// How many of its first batches a fold of at most `at_most` bytes takes: whole
    /// batches, at least one.
    fn prefix(&self, at_most: Option<usize>) -> usize {
        let Some(limit) = at_most else {
            return self.batches.len();
        };
        let mut bytes = 0;
        let mut take = 0;
        for batch in &self.batches {
            if take > 0 && bytes + batch.bytes > limit {
                break;
            }
            bytes += batch.bytes;
            take += 1;
        }
        take
    }
}

/// The writer's pending (journaled, not yet folded) batches; see the module docs.
#[derive(Default)]
pub struct Pending {
    rooms: HashMap<String, PendingRoom>,
    /// Rooms by when they fall due (see [`FOLD_AGE`]), earliest first; an entry whose
    /// room is no longer pending, or pending again under a newer generation, is
    /// skipped.
    order: BTreeMap<(Instant, u64), String>,
    /// Journal rows on disk (or being written) with unfolded batches: key -> how many.
    unfolded: BTreeMap<u64, usize>,
    /// Journal rows written by earlier commits whose batches are all folded: deleted by
    /// the next transaction.
    emptied: Vec<u64>,
    next_key: u64,
    bytes: usize,
    generation: u64,
    commit: CommitRows,
    set_aside: bool,
    aside: Vec<(u64, Vec<u8>)>,
}

/// The journal rows the current transaction writes.
#[derive(Default)]
struct CommitRows {
    /// Keys from here on belong to the current transaction (not yet on disk).
    first_key: u64,
    /// The row being filled and its bytes so far.
    open: Option<(u64, usize)>,
    /// `(key, room)` in the order batches were journaled, a pair once per run.
    entries: Vec<(u64, String)>,
}

impl Pending {
    /// Nothing pending; journal keys start at `next_key` (past every row on disk).
    /// `set_aside`: journal rows go to segment files (see [`Pending::abandon`]).
    pub fn new(next_key: u64, set_aside: bool) -> Pending {
        Pending {
            next_key,
            set_aside,
            commit: CommitRows {
                first_key: next_key,
                ..CommitRows::default()
            },
            ..Pending::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    pub fn contains(&self, room: &str) -> bool {
        self.rooms.contains_key(room)
    }

    /// The seq of `room`'s last pending event, if it has pending batches.
    pub fn head(&self, room: &str) -> Option<u64> {
        self.rooms.get(room).map(|pending| pending.head)
    }

    /// Bytes of pending log rows (with a per-entry estimate), for the fold policy and
    /// the gauge.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether a batch is journaled (true) or written directly.
    pub fn journals(create: bool, rows: &LogRows) -> bool {
        !create
            && rows.events > 0
            && rows.rows.iter().map(|(_, row)| row.len()).sum::<usize>()
                <= MAX_JOURNALED_BATCH_BYTES
    }

    /// Starts a transaction's journal rows.
    pub fn begin_commit(&mut self) {
        self.commit = CommitRows {
            first_key: self.next_key,
            ..CommitRows::default()
        };
    }

    /// Journals one batch of `room` in the current commit, taking its rows; the caller
    /// writes its snapshot (at seq `snapshot`) to `snapshots` directly when this
    /// answers Ok. The gapless check runs against the pending head, or the meta row
    /// (`stored`) when the room has nothing pending; a refused batch (inner error) is
    /// left untouched.
    ///
    /// A snapshot past the room's folded head is safe to store early: loads and
    /// time travel fold the room first, trims only use snapshots up to the folded head
    /// (`retention.rs` reads the head from the meta row), and a replay brings the head
    /// past it again. Folding the room instead (as for `create`) put every room's
    /// fold into the commits that carried snapshots, which come in waves (every
    /// `--snapshot-every` events per room): 40-50 rooms folded in one commit, 30-60 ms.
    pub fn journal(
        &mut self,
        stored: impl FnOnce(&str) -> StoredMetaResult,
        room: &str,
        rows: &mut LogRows,
        expire_op_ids_through: u64,
        snapshot: Option<u64>,
    ) -> Result<Result<(), StoreError>, redb::StorageError> {
        // One lookup of the room for the check and the update: with 10,000 rooms every
        // batch is a room's own, and each lookup by name is a cache miss or two
        // (benches/README.md, "Fourteenth pass").
        let Pending {
            rooms,
            order,
            unfolded,
            next_key,
            bytes: total_bytes,
            generation,
            commit,
            ..
        } = self;
        let known = rooms.get_mut(room);
        let (epoch, head) = match &known {
            Some(pending) => (pending.epoch, pending.head),
            None => match stored(room)? {
                Ok(Some(stored)) => (stored.meta.epoch, stored.head),
                Ok(None) => {
                    return Ok(Err(StoreError::NoSuchRoom {
                        room: room.to_owned(),
                    }))
                }
                Err(corrupt) => return Ok(Err(corrupt)),
            },
        };
        if rows.first != head + 1 {
            return Ok(Err(StoreError::SeqGap {
                room: room.to_owned(),
                expected: head + 1,
                found: rows.first,
            }));
        }
        let last = rows.first + rows.events - 1;
        if let Some(seq) = snapshot {
            if seq == 0 || seq > last {
                return Ok(Err(StoreError::SnapshotSeq {
                    room: room.to_owned(),
                    seq,
                    head: last,
                }));
            }
        }
        let bytes = ENTRY_OVERHEAD
            + room.len()
            + rows
                .rows
                .iter()
                .map(|(_, row)| row.len() + 16)
                .sum::<usize>();
        let key = row_key(commit, next_key, bytes);
        let rows = std::mem::take(rows);
        *unfolded.entry(key).or_insert(0) += 1;
        *total_bytes += bytes;
        if commit
            .entries
            .last()
            .is_none_or(|(k, r)| *k != key || r != room)
        {
            commit.entries.push((key, room.to_owned()));
        }
        let batch = PendingBatch {
            key,
            rows,
            expire_op_ids_through,
            bytes,
        };
        match known {
            Some(pending) => {
                pending.head = last;
                pending.bytes += bytes;
                pending.batches.push_back(batch);
            }
            None => {
                *generation += 1;
                let due = Instant::now() + fold_age(*generation);
                order.insert((due, *generation), room.to_owned());
                rooms.insert(
                    room.to_owned(),
                    PendingRoom {
                        epoch,
                        head: last,
                        batches: VecDeque::from([batch]),
                        bytes,
                        due,
                        generation: *generation,
                    },
                );
            }
        }
        Ok(Ok(()))
    }

    /// Folds `room` in the current transaction: its first pending batches (all of them
    /// when `at_most` is None, else whole batches of about that many bytes, at least
    /// one) go to `events` and `meta` in one run, and journal rows left without
    /// unfolded batches are deleted (now, or by [`Pending::end_commit`]). A room left
    /// with batches stays pending and due. None when nothing of it was pending; an
    /// inner error when the stored room does not take the run (damage: the room is
    /// dropped from the pending set with its journal rows kept).
    pub fn fold(
        &mut self,
        tables: &mut WriteTables,
        room: &str,
        at_most: Option<usize>,
    ) -> Result<Option<Result<(), StoreError>>, redb::StorageError> {
        let Some(pending) = self.rooms.get_mut(room) else {
            return Ok(None);
        };
        let take = pending.prefix(at_most);
        let batches = pending.batches.range(..take);
        let first = pending.batches[0].rows.first;
        let last = pending.batches[take - 1].last();
        let expire_op_ids_through = batches
            .clone()
            .map(|batch| batch.expire_op_ids_through)
            .max()
            .unwrap_or(0);
        let rows = batches
            .flat_map(|batch| batch.rows.rows.iter())
            .map(|(last, row)| (*last, row.as_slice()));
        let outcome = tables.append_run(
            room,
            pending.epoch,
            (first, last),
            rows,
            expire_op_ids_through,
        )?;
        if outcome.is_err() {
            self.abandon(room);
            return Ok(Some(outcome));
        }
        let folded: Vec<PendingBatch> = pending.batches.drain(..take).collect();
        let bytes: usize = folded.iter().map(|batch| batch.bytes).sum();
        pending.bytes -= bytes;
        self.bytes -= bytes;
        if pending.batches.is_empty() {
            self.rooms.remove(room);
        } else {
            // Still due: first again in the next transaction's folds.
            self.order
                .insert((pending.due, pending.generation), room.to_owned());
        }
        self.release(folded.iter().map(|batch| batch.key));
        Ok(Some(outcome))
    }

    /// Drops `room`'s pending batches unwritten (its deletion is next) and counts them
    /// as folded, so their journal rows go. True if it had any.
    pub fn discard(&mut self, room: &str) -> bool {
        let Some(pending) = self.rooms.remove(room) else {
            return false;
        };
        self.bytes -= pending.bytes;
        self.release(pending.batches.iter().map(|batch| batch.key));
        true
    }

    /// Drops a damaged room. With the `journal` table its batches are not counted
    /// folded, so their rows stay; with segment files (`set_aside`) they are encoded
    /// into one row for a file of its own ([`Pending::take_aside`], written before any
    /// segment is deleted) and counted folded, so a damaged room does not keep every
    /// later segment on disk until the restart.
    pub fn abandon(&mut self, room: &str) {
        let Some(pending) = self.rooms.remove(room) else {
            return;
        };
        self.bytes -= pending.bytes;
        if !self.set_aside {
            return;
        }
        let owned = room.to_owned();
        let row = JournalRowRef {
            entries: vec![JournalEntryRef {
                room: &owned,
                epoch: pending.epoch,
                first: pending.batches[0].rows.first,
                events: pending.batches.iter().map(|batch| batch.rows.events).sum(),
                expire_op_ids_through: pending
                    .batches
                    .iter()
                    .map(|batch| batch.expire_op_ids_through)
                    .max()
                    .unwrap_or(0),
                rows: pending
                    .batches
                    .iter()
                    .flat_map(|batch| batch.rows.rows.iter())
                    .map(|(last, row)| JournalLogRowRef { last: *last, row })
                    .collect(),
            }],
        };
        match record::encode_journal_row(&row) {
            Ok(bytes) => {
                self.aside.push((pending.batches[0].key, bytes));
                self.release(pending.batches.iter().map(|batch| batch.key));
            }
            // Too large for one row (a room pending past 4 MiB): its rows stay in
            // their segments, which then stay until the restart.
            Err(error) => {
                tracing::warn!(room, %error, "cannot set a damaged room's journaled batches aside; the journal segments holding them stay until the restart")
            }
        }
    }

    /// The rows of damaged rooms set aside since the last call, `(key, row)`.
    pub fn take_aside(&mut self) -> Vec<(u64, Vec<u8>)> {
        std::mem::take(&mut self.aside)
    }

    /// Counts the batches in the journal rows `keys` (one key per batch) folded.
    fn release(&mut self, keys: impl Iterator<Item = u64>) {
        for key in keys {
            let Some(count) = self.unfolded.get_mut(&key) else {
                continue;
            };
            *count -= 1;
            if *count == 0 {
                self.unfolded.remove(&key);
                // A row of the current transaction is simply not written.
                if key < self.commit.first_key {
                    self.emptied.push(key);
                }
            }
        }
    }

    /// The keys of `room`'s pending batches' log rows, first and last, and its expiry,
    /// for the probe before a fold (of all of them: a partial fold touches a part).
    pub fn probe_keys(&self, room: &str) -> Option<(u64, u64, u64)> {
        let pending = self.rooms.get(room)?;
        let first = pending.batches.front()?.rows.rows.first()?.0;
        let last = pending.batches.back()?.rows.rows.last()?.0;
        let expire = pending
            .batches
            .iter()
            .map(|batch| batch.expire_op_ids_through)
            .max()
            .unwrap_or(0);
        Some((first, last, expire))
    }

    /// Appends to `out` the rooms due for a fold by policy, earliest due first, up to
    /// `max` in all and about [`MAX_FOLD_BYTES`] (more past [`FOLD_BYTES`]): those
    /// pending for their share of [`FOLD_AGE`], any while
    /// the pending bytes not yet chosen pass [`FOLD_BYTES`], or any at all when `idle`.
    /// The last room may be folded in part, a prefix of its batches that fills the
    /// budget; the rest stays due and goes first in the next transaction.
    pub fn due(&mut self, now: Instant, idle: bool, max: usize, out: &mut Vec<Fold>) {
        let mut chosen = 0;
        // Past the bound the budget grows with the excess, so folds outpace any
        // ingest rate and the pending bytes come back under it.
        let budget = MAX_FOLD_BYTES + self.bytes.saturating_sub(FOLD_BYTES) / 4;
        while out.len() < max && chosen < budget {
            let Some(entry) = self.order.first_entry() else {
                break;
            };
            let (due_at, generation) = *entry.key();
            let pending = match self.rooms.get(entry.get()) {
                Some(pending) if pending.generation == generation => pending,
                _ => {
                    entry.remove();
                    continue;
                }
            };
            if !(idle || self.bytes - chosen > FOLD_BYTES || now >= due_at) {
                break;
            }
            let left = budget - chosen;
            let at_most = (pending.bytes > left).then_some(left);
            chosen += pending.bytes.min(left);
            let room = entry.remove();
            if !out.iter().any(|fold| fold.room == room) {
                out.push(Fold { room, at_most });
            }
        }
    }

    /// The lowest journal key that still holds unfolded batches (None: none does).
    pub fn min_unfolded(&self) -> Option<u64> {
        self.unfolded.keys().next().copied()
    }

    /// Writes the current commit's journal rows (only those with a batch still
    /// unfolded) to `sink`, and deletes the table rows emptied by folds (segment
    /// files go whole, see `journal_file.rs`).
    pub fn end_commit(&mut self, mut sink: Sink) -> Result<(), redb::StorageError> {
        let entries = std::mem::take(&mut self.commit.entries);
        let mut start = 0;
        while start < entries.len() {
            let key = entries[start].0;
            let end = start
                + entries[start..]
                    .iter()
                    .take_while(|(k, _)| *k == key)
                    .count();
            if self.unfolded.contains_key(&key) {
                let mut seen = HashSet::new();
                let mut row = JournalRowRef {
                    entries: Vec::with_capacity(end - start),
                };
                for (_, room) in &entries[start..end] {
                    let Some(pending) = self.rooms.get(room) else {
                        continue;
                    };
                    if !seen.insert(room.as_str()) {
                        continue;
                    }
                    // Keys only grow, so the room's batches in this row are one run, at
                    // the back or just before this commit's later rows: counted from
                    // the back, over this commit's batches only (a binary search over
                    // every pending batch missed the cache: 4% of the writer).
                    let later = pending
                        .batches
                        .iter()
                        .rev()
                        .take_while(|batch| batch.key > key)
                        .count();
                    let to = pending.batches.len() - later;
                    let from = to
                        - pending
                            .batches
                            .iter()
                            .rev()
                            .skip(later)
                            .take_while(|batch| batch.key == key)
                            .count();
                    let batches = pending.batches.range(from..to);
                    let Some(first) = batches.clone().next() else {
                        continue;
                    };
                    row.entries.push(JournalEntryRef {
                        room,
                        epoch: pending.epoch,
                        first: first.rows.first,
                        events: batches.clone().map(|batch| batch.rows.events).sum(),
                        expire_op_ids_through: batches
                            .clone()
                            .map(|batch| batch.expire_op_ids_through)
                            .max()
                            .unwrap_or(0),
                        rows: batches
                            .flat_map(|batch| batch.rows.rows.iter())
                            .map(|(last, row)| JournalLogRowRef { last: *last, row })
                            .collect(),
                    });
                }
                const FITS: &str = "a journal row holds at most ROW_CAP bytes of rows and \
                     their framing, below MAX_JOURNAL_ROW_BYTES, and integers and bytes \
                     always serialize into the length measured";
                let len = record::journal_row_len(&row).expect(FITS);
                match &mut sink {
                    Sink::Table(tables) => {
                        let mut value = tables.journal.insert_reserve(key, len)?;
                        record::write_journal_row(&row, value.as_mut()).expect(FITS);
                    }
                    Sink::File(file) => file
                        .append(key, len, |out| record::write_journal_row(&row, out))
                        .expect(FITS),
                }
            }
            start = end;
        }
        match sink {
            Sink::Table(tables) => {
                for key in self.emptied.drain(..) {
                    tables.journal.remove(key)?;
                }
            }
            Sink::File(_) => self.emptied.clear(),
        }
        self.commit = CommitRows {
            first_key: self.next_key,
            ..CommitRows::default()
        };
        Ok(())
    }
}

/// The key of the journal row a batch of `bytes` goes into in the current transaction
/// (`commit`), opening the next one (`next_key`) when the open row is full.
fn row_key(commit: &mut CommitRows, next_key: &mut u64, bytes: usize) -> u64 {
    if let Some((key, filled)) = commit.open.as_mut() {
        if *filled + bytes <= ROW_CAP {
            *filled += bytes;
            return *key;
        }
    }
    let key = *next_key;
    *next_key += 1;
    commit.open = Some((key, bytes));
    key
}

/// The age at which the room that became pending `generation`-th falls due: spread
/// over `FOLD_AGE / 2 .. 3 * FOLD_AGE / 2` by a multiplicative hash of the count, so
/// rooms that became pending one after the other fall due far apart.
fn fold_age(generation: u64) -> Duration {
    let spread =
        (generation.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
    FOLD_AGE.mul_f64(0.5 + spread)
}

/// Where a replayed journal row came from.
#[derive(Clone, Copy)]
enum Source {
    /// The `journal` table (a store without a data dir, or a version 4 dir).
    Table,
    /// The segment file of this index in [`journal_file::Replayed::segments`].
    Segment(usize),
}

/// Applies the journal left by the last run (see the module docs) in one durable
/// transaction: the `journal` table's rows, then, for a store with a data dir
/// (`segments`: its journal directory), the segment files' records. Returns the first
/// key the writer may use and, with a data dir, the segment file it appends to (the
/// replayed segments deleted, except those holding rows of damaged rooms).
pub fn replay(
    db: &redb::Database,
    path: &Path,
    segments: Option<&Path>,
    quick_repair: bool,
) -> Result<(u64, Option<JournalFile>), StoreError> {
    let init_error = |source: redb::Error| StoreError::Init {
        path: path.to_owned(),
        source: Box::new(source),
    };
    let mut rows: Vec<(u64, Vec<u8>, Source)> = {
        let txn = db.begin_read().map_err(|e| init_error(e.into()))?;
        let table = txn.open_table(JOURNAL).map_err(|e| init_error(e.into()))?;
        let mut rows = Vec::new();
        for entry in table.iter().map_err(|e| init_error(e.into()))? {
            let (key, value) = entry.map_err(|e| init_error(e.into()))?;
            rows.push((key.value(), value.value().to_vec(), Source::Table));
        }
        rows
    };
    let read = match segments {
        Some(dir) => {
            let read = journal_file::read_all(dir)?;
            rows.extend(
                read.rows
                    .into_iter()
                    .map(|row| (row.key, row.bytes, Source::Segment(row.segment))),
            );
            Some((dir, read.segments, read.next_segment))
        }
        None => None,
    };
    let next_key = rows.iter().map(|(key, _, _)| key + 1).max().unwrap_or(0);
    let kept = if rows.is_empty() {
        Vec::new()
    } else {
        apply(db, path, &rows, quick_repair)?
    };
    let file = match read {
        Some((dir, segments, number)) => Some(JournalFile::start(dir, &segments, &kept, number)?),
        None => None,
    };
    Ok((next_key, file))
}

/// Applies `rows` in one durable transaction, deleting the table rows it applied;
/// returns the indexes of the segments holding rows it kept (of damaged rooms).
fn apply(
    db: &redb::Database,
    path: &Path,
    rows: &[(u64, Vec<u8>, Source)],
    quick_repair: bool,
) -> Result<Vec<usize>, StoreError> {
    let init_error = |source: redb::Error| StoreError::Init {
        path: path.to_owned(),
        source: Box::new(source),
    };
    let journal_error = |key: u64, room: &str, detail: String| StoreError::Journal {
        path: path.to_owned(),
        key,
        room: room.to_owned(),
        detail,
    };
    // Probe every room first, so a damaged page is met by a read, not inside the write
    // transaction (`probe.rs`).
    let mut damaged = HashSet::new();
    {
        let begin = || db.begin_read().map(probe::BatchProbe::new);
        let mut reader = begin().map_err(|e| init_error(e.into()))?;
        for (key, bytes, _) in rows {
            let entries = record::decode_journal_row(bytes)
                .map_err(|e| journal_error(*key, "(unknown)", e.to_string()))?;
            for entry in entries {
                if damaged.contains(entry.room) {
                    continue;
                }
                let keys = probe::BatchKeys {
                    room: entry.room,
                    creates: false,
                    events: entry
                        .rows
                        .first()
                        .zip(entry.rows.last())
                        .map(|(a, b)| (a.0, b.0)),
                    snapshot: None,
                    expire_op_ids_through: entry.expire_op_ids_through,
                };
                if let Err(detail) = reader.batch(&keys) {
                    tracing::error!(
                        room = %entry.room,
                        db = %path.display(),
                        damage = %detail,
                        "room is damaged: its journaled events are kept in the journal until the file is restored"
                    );
                    damaged.insert(entry.room.to_owned());
                    reader = begin().map_err(|e| init_error(e.into()))?;
                }
            }
        }
    }
    let mut txn = db.begin_write().map_err(|e| init_error(e.into()))?;
    txn.set_quick_repair(quick_repair);
    let mut applied = 0usize;
    let mut kept = Vec::new();
    {
        let mut tables = WriteTables::open(&txn).map_err(|e| init_error(e.into()))?;
        for (key, bytes, source) in rows {
            let entries = record::decode_journal_row(bytes)
                .map_err(|e| journal_error(*key, "(unknown)", e.to_string()))?;
            let mut keep = false;
            for entry in &entries {
                if damaged.contains(entry.room) {
                    keep = true;
                    continue;
                }
                let last =
                    check_entry(entry).map_err(|detail| journal_error(*key, entry.room, detail))?;
                let stored = match tables
                    .stored_meta(entry.room)
                    .map_err(|e| init_error(e.into()))?
                {
                    Ok(Some(stored)) => stored,
                    // Deleted since: its entries went with it.
                    Ok(None) => continue,
                    Err(corrupt) => {
                        tracing::error!(room = %entry.room, error = %corrupt, "cannot replay the journal into a room whose meta row is corrupt; its journal row is kept");
                        keep = true;
                        continue;
                    }
                };
                // Another room under the same name, or already folded.
                if stored.meta.epoch != entry.epoch || last <= stored.head {
                    continue;
                }
                // A partial fold took whole batches, so a head inside the entry ends
                // one of its log rows: those rows are folded, the rest is applied.
                let folded = entry
                    .rows
                    .partition_point(|(row_last, _)| *row_last <= stored.head);
                let first = match folded {
                    0 => entry.first,
                    n => entry.rows[n - 1].0 + 1,
                };
                if first != stored.head + 1 {
                    return Err(journal_error(
                        *key,
                        entry.room,
                        format!(
                            "its events {first}..={last} do not continue the stored head {}",
                            stored.head
                        ),
                    ));
                }
                tables
                    .append_run(
                        entry.room,
                        entry.epoch,
                        (first, last),
                        entry.rows[folded..].iter().copied(),
                        entry.expire_op_ids_through,
                    )
                    .map_err(|e| init_error(e.into()))?
                    .map_err(|e| journal_error(*key, entry.room, e.to_string()))?;
                applied += 1;
            }
            match (keep, source) {
                (false, Source::Table) => {
                    tables
                        .journal
                        .remove(*key)
                        .map_err(|e| init_error(e.into()))?;
                }
                (true, Source::Segment(index)) if !kept.contains(index) => kept.push(*index),
                _ => {}
            }
        }
    }
    txn.commit().map_err(|e| init_error(e.into()))?;
    tracing::info!(db = %path.display(), rows = rows.len(), applied, "journal replayed");
    Ok(kept)
}

/// Checks that an entry's log rows decode and run gaplessly over its events; returns
/// its last seq.
fn check_entry(entry: &record::JournalEntryView) -> Result<u64, String> {
    if entry.events == 0 || entry.first == 0 {
        return Err("the entry holds no events".to_owned());
    }
    let last = entry.first + entry.events - 1;
    let mut next = entry.first;
    for (row_last, bytes) in &entry.rows {
        let row = record::log_row(*row_last, bytes).map_err(|e| e.to_string())?;
        if row.first() != next {
            return Err(format!(
                "a log row starts at {} where {next} was next",
                row.first()
            ));
        }
        next = row_last + 1;
    }
    if next != last + 1 {
        return Err(format!(
            "its log rows end at {} but its events at {last}",
            next - 1
        ));
    }
    Ok(last)
}
