//! Trimming and deletion as bounded pieces: each piece reads or deletes at most
//! [`MAX_PIECE_ROWS`] rows in the writer's current transaction, so maintenance never
//! holds redb's one write transaction long enough to stall acks.
//!
//! Trimming a room with head H by a [`TrimPolicy`](super::TrimPolicy) with
//! `history_events` h: the events up to H - h are due. With an age limit, the pieces
//! then read the events after those, oldest first and no further than the newest
//! snapshot, and every one stamped before the cutoff is due too, up to the first that
//! is not (the run of old events, so the log stays gapless whatever order timestamps
//! are in). `base` is the newest snapshot seq among the due events. The pieces delete
//! events up to `base` (oldest first, whole log rows, moving the meta row's first
//! retained seq past each deleted one in the same transaction; the row holding `base`,
//! if it holds later events too, is rewritten under its key with those alone), then
//! snapshots before `base`. Events
//! first: while they go, the older snapshots still rebuild the seqs that remain. The
//! snapshot at `base` is kept, so the room always loads; op ids are never touched. The
//! store never reads a clock: the cutoff comes with the job.
//!
//! Deleting a room: the first piece removes its meta row (the room is absent from then
//! on) and records it in the `deleting` table; later pieces remove its events,
//! snapshots and op ids; the last removes the `deleting` mark. A crash midway leaves the
//! mark, and [`finish_deletions`] completes the work at the next open, before any batch
//! can recreate the room onto leftover rows.
//!
//! When pieces run and how they commit is `writer.rs`'s business.

use std::mem;

use redb::{ReadableDatabase, ReadableTable};

use super::record;
use super::tables::{WriteTables, DELETING};
use super::writer::TrimJob;
use super::{StoreError, TrimOutcome, TrimReport};

/// The most rows one trimming or deletion piece deletes, or reads and deletes when a
/// trim looks for old events, in one transaction. A redb delete of a small row is a few
/// microseconds (a read less), so a piece adds milliseconds to the transaction it rides
/// in, not the seconds a whole room could take.
pub const MAX_PIECE_ROWS: usize = 2_000;

/// The most trims queued or running at once (one per room runs; a second for the same
/// room is answered `AlreadyRunning`). Beyond this `submit_trim` reports Full.
pub const MAX_PENDING_TRIMS: usize = 64;

/// Where a trim is.
enum TrimState {
    /// The first piece reads the meta row and applies the count limit.
    Planning,
    /// Reading events `next..=limit` oldest first for the age limit; every event before
    /// `next` is due. `limit` is the newest snapshot seq at planning: nothing after it
    /// can be trimmed, so nothing after it is read.
    Aging {
        next: u64,
        limit: u64,
        older_than_ms: i64,
    },
    Deleting {
        base: u64,
    },
    /// The answer is ready.
    Finished(Result<TrimOutcome, StoreError>),
}

/// One room's running trim.
pub struct Trim {
    job: TrimJob,
    state: TrimState,
    report: TrimReport,
}

impl Trim {
    pub fn new(job: TrimJob) -> Trim {
        Trim {
            job,
            state: TrimState::Planning,
            report: TrimReport {
                first_retained: 1,
                events_deleted: 0,
                snapshots_deleted: 0,
                pieces: 0,
            },
        }
    }

    pub fn room(&self) -> &str {
        &self.job.room
    }

    /// Whether its next piece is its first, which reads the room's meta row: the room's
    /// journaled batches must be folded before it (`writer.rs`), or it would plan
    /// against a head that leaves out what they hold.
    pub fn is_planning(&self) -> bool {
        matches!(self.state, TrimState::Planning)
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, TrimState::Finished(_))
    }

    /// Answers the trim with `outcome`, whatever state it is in.
    pub fn finish(self, outcome: Result<TrimOutcome, StoreError>) {
        // A dropped receiver means the room does not care how the trim ended.
        let _ = self.job.reply.send(outcome);
    }

    /// Answers a trim that is done with its own outcome.
    pub fn finish_done(mut self) {
        let outcome = match mem::replace(&mut self.state, TrimState::Planning) {
            TrimState::Finished(outcome) => outcome,
            TrimState::Planning | TrimState::Aging { .. } | TrimState::Deleting { .. } => {
                Ok(TrimOutcome::Cancelled)
            }
        };
        self.finish(outcome);
    }

    /// Reads and deletes the next at most [`MAX_PIECE_ROWS`] rows of the trim in the
    /// caller's transaction (the meta row and the snapshot lookups are not counted: a
    /// few per piece). A storage error dooms the transaction; anything else finishes
    /// the trim with its answer.
    pub fn piece(&mut self, tables: &mut WriteTables) -> Result<(), redb::StorageError> {
        let mut budget = MAX_PIECE_ROWS;
        let mut counted = false;
        loop {
            let working = matches!(
                self.state,
                TrimState::Aging { .. } | TrimState::Deleting { .. }
            );
            if working {
                if budget == 0 {
                    return Ok(());
                }
                // Counted before the work, as a finishing step copies the report.
                if !counted {
                    counted = true;
                    self.report.pieces += 1;
                }
            }
            self.state = match self.state {
                TrimState::Planning => self.plan(tables)?,
                TrimState::Aging {
                    next,
                    limit,
                    older_than_ms,
                } => self.age(tables, next, limit, older_than_ms, &mut budget)?,
                TrimState::Deleting { base } => self.delete(tables, base, &mut budget)?,
                TrimState::Finished(_) => return Ok(()),
            };
        }
    }

    /// Reads the meta row: the events up to head - history_events are due; with an age
    /// limit, the events after them are read next.
    fn plan(&mut self, tables: &WriteTables) -> Result<TrimState, redb::StorageError> {
        let room = self.job.room.as_str();
        let stored = match tables.stored_meta(room)? {
            Ok(Some(stored)) => stored,
            Ok(None) => return Ok(TrimState::Finished(Ok(TrimOutcome::Cancelled))),
            Err(corrupt) => return Ok(TrimState::Finished(Err(corrupt))),
        };
        self.report.first_retained = stored.first_retained;
        // 0 when the log is not longer than the history: seqs start at 1.
        let due_through = stored.head.saturating_sub(self.job.policy.history_events);
        if let Some(older_than_ms) = self.job.policy.older_than_ms {
            // Events before the first retained one are gone, so due already.
            let next = due_through.max(stored.first_retained - 1) + 1;
            if let Some(limit) = newest_snapshot(tables, room, stored.head)? {
                if next <= limit {
                    return Ok(TrimState::Aging {
                        next,
                        limit,
                        older_than_ms,
                    });
                }
            }
        }
        self.settle(tables, due_through)
    }

    /// Reads events from `next` while they are stamped before `older_than_ms`, at most
    /// `budget` of them, and goes on in the next piece if the budget ran out first.
    fn age(
        &mut self,
        tables: &WriteTables,
        next: u64,
        limit: u64,
        older_than_ms: i64,
        budget: &mut usize,
    ) -> Result<TrimState, redb::StorageError> {
        let room = self.job.room.as_str();
        let mut due_through = next - 1;
        let mut stopped = false;
        // Rows are keyed by their last seq: the first one from `next` holds `next`.
        for entry in tables
            .events
            .range((room, next)..=(room, u64::MAX))?
            .take(*budget)
        {
            let (key, guard) = entry?;
            *budget -= 1;
            let last = key.value().1;
            let row = match record::log_row(last, guard.value()) {
                Ok(row) => row,
                Err(source) => {
                    return Ok(TrimState::Finished(Err(StoreError::Corrupt {
                        room: room.to_owned(),
                        seq: Some(last),
                        source,
                    })))
                }
            };
            // A gap cannot happen (the log is gapless from the first retained seq);
            // if it did, stopping there keeps it from growing.
            if row.first() > due_through + 1 {
                stopped = true;
                break;
            }
            for seq in due_through + 1..=last.min(limit) {
                // Timestamps are stamped as ops arrive, so they may run backwards a
                // little between seqs: the run of old events ends at the first young
                // one, and the log stays gapless. A seq the row does not hold (it
                // cannot happen) stops the run too.
                if row.ts_ms(seq).is_none_or(|ts| ts >= older_than_ms) {
                    stopped = true;
                    break;
                }
                due_through = seq;
            }
            if stopped || due_through >= limit {
                break;
            }
        }
        if !stopped && due_through < limit && *budget == 0 {
            return Ok(TrimState::Aging {
                next: due_through + 1,
                limit,
                older_than_ms,
            });
        }
        self.settle(tables, due_through)
    }

    /// Once every event up to `due_through` is known to be due: the base is the newest
    /// snapshot among them, and with none there is nothing to do.
    fn settle(
        &self,
        tables: &WriteTables,
        due_through: u64,
    ) -> Result<TrimState, redb::StorageError> {
        Ok(
            match newest_snapshot(tables, &self.job.room, due_through)? {
                Some(base) => TrimState::Deleting { base },
                None => TrimState::Finished(Ok(TrimOutcome::Done(self.report))),
            },
        )
    }

    /// Deletes at most `budget` rows: events up to `base`, then snapshots before it.
    fn delete(
        &mut self,
        tables: &mut WriteTables,
        base: u64,
        budget: &mut usize,
    ) -> Result<TrimState, redb::StorageError> {
        let room = self.job.room.as_str();
        let keep_from = self.job.policy.keep_op_ids_from;
        // Rows are keyed by their last seq: those up to `base` hold only due events.
        let mut deleted_through = None;
        let op_ids = &mut tables.op_ids;
        *budget -= take_first(&mut tables.events, room, 0, base, *budget, |last, row| {
            deleted_through = Some(last);
            // An event's op id outlives its row while the room still dedups against
            // it; ids that cannot be read are dropped with their row (verify reports
            // corrupt rows; dedup of those ops is all that is lost).
            if last >= keep_from {
                if let Ok(row) = record::log_row(last, row) {
                    keep_op_ids(op_ids, room, &row, keep_from, last)?;
                }
            }
            Ok(())
        })?;
        // Every row up to `base` is gone: the row holding `base` (if it holds more)
        // keeps its events after `base`, rewritten under the same key.
        if *budget > 0 {
            let straddling = tables
                .events
                .range((room, base.saturating_add(1))..=(room, u64::MAX))?
                .next()
                .transpose()?
                .map(|(key, row)| (key.value().1, row.value().to_vec()));
            if let Some((last, bytes)) = straddling {
                let rewritten = record::log_row(last, &bytes).and_then(|row| {
                    if row.first() > base {
                        return Ok(None);
                    }
                    let kept = (base + 1..=last)
                        .map(|seq| row.event(seq))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(Some((row, record::encode_log_row(&kept)?)))
                });
                match rewritten {
                    Ok(None) => {}
                    Ok(Some((row, kept))) => {
                        keep_op_ids(&mut tables.op_ids, room, &row, keep_from, base)?;
                        tables.events.insert((room, last), kept.as_slice())?;
                        *budget -= 1;
                        deleted_through = Some(base);
                    }
                    Err(source) => {
                        return Ok(TrimState::Finished(Err(StoreError::Corrupt {
                            room: room.to_owned(),
                            seq: Some(last),
                            source,
                        })))
                    }
                }
            }
        }
        if let Some(through) = deleted_through {
            match tables.stored_meta(room)? {
                Ok(Some(mut stored)) => {
                    // Never past the head: `base` is a snapshot seq at or below it.
                    let first_retained = stored.first_retained.max(through + 1);
                    // The log is gapless from the first retained seq, so this counts
                    // the events of the rows deleted and of the part cut off.
                    self.report.events_deleted += first_retained - stored.first_retained;
                    stored.first_retained = first_retained;
                    tables.put_meta(room, &stored)?;
                    self.report.first_retained = stored.first_retained;
                }
                // The writer cancels a room's trim before deleting the room, so the meta
                // row is there; if not, the events are leftovers and stay deleted.
                Ok(None) => return Ok(TrimState::Finished(Ok(TrimOutcome::Cancelled))),
                Err(corrupt) => return Ok(TrimState::Finished(Err(corrupt))),
            }
        }

        if *budget > 0 && base > 0 {
            let n = take_first(&mut tables.snapshots, room, 0, base - 1, *budget, |_, _| {
                Ok(())
            })?;
            *budget -= n;
            self.report.snapshots_deleted += n as u64;
        }

        // Budget left over means both ranges ran out within this piece.
        Ok(if *budget > 0 {
            TrimState::Finished(Ok(TrimOutcome::Done(self.report)))
        } else {
            TrimState::Deleting { base }
        })
    }
}

/// Copies the op ids of `row`'s events `keep_from..=through` to the `op_ids` table.
fn keep_op_ids(
    op_ids: &mut redb::Table<(&'static str, u64), (&'static str, &'static str)>,
    room: &str,
    row: &record::LogRow,
    keep_from: u64,
    through: u64,
) -> Result<(), redb::StorageError> {
    for seq in row.first().max(keep_from)..=through.min(row.last()) {
        if let Some((user, op_id)) = row.op_id(seq) {
            op_ids.insert((room, seq), (user.as_str(), op_id.as_str()))?;
        }
    }
    Ok(())
}

/// The newest snapshot seq of `room` at or below `hi`.
fn newest_snapshot(
    tables: &WriteTables,
    room: &str,
    hi: u64,
) -> Result<Option<u64>, redb::StorageError> {
    Ok(tables
        .snapshots
        .range((room, 0)..=(room, hi))?
        .next_back()
        .transpose()?
        .map(|(key, _)| key.value().1))
}

/// Removes the first at most `limit` rows of `room` in `lo..=hi` from a `(room, seq)`
/// table, oldest first, handing each (seq, bytes) to `each` as it goes; returns how many.
///
/// One pass of a cursor takes them off, each leaf rewritten once. Read first and then
/// removed one by one, each from the B-tree's root, trims took a third of the store
/// writer in a steady ingest past `--history-events`, and a quarter this way
/// (benches/README.md, "Fourteenth pass").
fn take_first(
    table: &mut redb::Table<(&'static str, u64), &'static [u8]>,
    room: &str,
    lo: u64,
    hi: u64,
    limit: usize,
    mut each: impl FnMut(u64, &[u8]) -> Result<(), redb::StorageError>,
) -> Result<usize, redb::StorageError> {
    if lo > hi || limit == 0 {
        return Ok(0);
    }
    let mut taken = 0;
    // Only the rows the iterator yields are removed.
    let mut rows = table.extract_from_if((room, lo)..=(room, hi), |_, _| true)?;
    while taken < limit {
        let Some(entry) = rows.next() else {
            break;
        };
        let (key, row) = entry?;
        taken += 1;
        each(key.value().1, row.value())?;
    }
    rows.close()?;
    Ok(taken)
}

/// What a deletion removes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Meta,
    Events,
    Snapshots,
    OpIds,
    Mark,
    Done,
}

/// One room's deletion, piece by piece.
pub struct Deletion {
    room: String,
    phase: Phase,
    /// Who created the room, once its `creators` row is removed.
    creator: Option<String>,
}

impl Deletion {
    pub fn new(room: &str) -> Deletion {
        Deletion {
            room: room.to_owned(),
            phase: Phase::Meta,
            creator: None,
        }
    }

    /// A deletion found in the `deleting` table: its meta row is already gone.
    fn resumed(room: &str) -> Deletion {
        Deletion {
            room: room.to_owned(),
            phase: Phase::Events,
            creator: None,
        }
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The user who created the room, known once the piece that removed its meta row
    /// committed (None for a deletion resumed after a crash, which had done that).
    pub fn creator(&self) -> Option<&str> {
        self.creator.as_deref()
    }

    /// Removes the next at most [`MAX_PIECE_ROWS`] rows of the room in the caller's
    /// transaction (the meta row and the marks are not counted: one each per deletion).
    pub fn piece(&mut self, tables: &mut WriteTables) -> Result<(), redb::StorageError> {
        let room = self.room.as_str();
        let mut budget = MAX_PIECE_ROWS;
        while budget > 0 && self.phase != Phase::Done {
            self.phase = match self.phase {
                Phase::Meta => {
                    tables.meta.remove(room)?;
                    // In the same transaction as the meta row, so a deletion that
                    // crashed after it has nothing left to uncount.
                    if let Some(creator) = tables.creators.remove(room)? {
                        self.creator = Some(creator.value().to_owned());
                    }
                    tables.deleting.insert(room, ())?;
                    Phase::Events
                }
                Phase::Events => {
                    budget -=
                        take_first(&mut tables.events, room, 0, u64::MAX, budget, |_, _| Ok(()))?;
                    if budget > 0 {
                        Phase::Snapshots
                    } else {
                        Phase::Events
                    }
                }
                Phase::Snapshots => {
                    budget -=
                        take_first(&mut tables.snapshots, room, 0, u64::MAX, budget, |_, _| {
                            Ok(())
                        })?;
                    if budget > 0 {
                        Phase::OpIds
                    } else {
                        Phase::Snapshots
                    }
                }
                Phase::OpIds => {
                    let mut removed = 0;
                    // Rows the iterator yields are removed; the rest stay for later pieces.
                    let taken = tables
                        .op_ids
                        .extract_from_if((room, 0)..=(room, u64::MAX), |_, _| true)?;
                    for entry in taken.take(budget) {
                        entry?;
                        removed += 1;
                    }
                    budget -= removed;
                    if budget > 0 {
                        Phase::Mark
                    } else {
                        Phase::OpIds
                    }
                }
                Phase::Mark => {
                    // Gone with the meta row already; again here so a deletion resumed
                    // after a crash leaves nothing of the room whatever it started from.
                    tables.creators.remove(room)?;
                    tables.deleting.remove(room)?;
                    Phase::Done
                }
                Phase::Done => Phase::Done,
            };
        }
        Ok(())
    }
}

/// Completes every deletion a crash interrupted, one durable piece per transaction.
/// Runs at open, before the writer takes any batch.
pub fn finish_deletions(db: &redb::Database, quick_repair: bool) -> Result<(), redb::Error> {
    let rooms: Vec<String> = {
        let txn = db.begin_read()?;
        let table = txn.open_table(DELETING)?;
        let mut rooms = Vec::new();
        for entry in table.iter()? {
            let (room, _) = entry?;
            rooms.push(room.value().to_owned());
        }
        rooms
    };
    for room in rooms {
        tracing::warn!(room = %room, "finishing the deletion of a room a crash interrupted");
        let mut deletion = Deletion::resumed(&room);
        while !deletion.is_done() {
            let mut txn = db.begin_write()?;
            txn.set_quick_repair(quick_repair);
            {
                let mut tables = WriteTables::open(&txn)?;
                deletion.piece(&mut tables)?;
            }
            txn.commit()?;
        }
    }
    Ok(())
}
