//! Trimming and deletion as bounded pieces: each piece deletes at most
//! [`MAX_PIECE_ROWS`] rows in the writer's current transaction, so maintenance never
//! holds redb's one write transaction long enough to stall acks.
//!
//! Trimming a room with head H and `history_events` h: `base` is the newest snapshot
//! seq at or below H - h, decided by the first piece. The pieces delete events up to
//! `base` (oldest first, moving the meta row's first retained seq past each deleted one
//! in the same transaction), then snapshots before `base`. Events first: while they go,
//! the older snapshots still rebuild the seqs that remain. The snapshot at `base` is
//! kept, so the room always loads; op ids are never touched.
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

use super::tables::{WriteTables, DELETING};
use super::writer::TrimJob;
use super::{StoreError, TrimOutcome, TrimReport};

/// The most rows one trimming or deletion piece deletes in one transaction. A redb
/// delete of a small row is a few microseconds, so a piece adds milliseconds to the
/// transaction it rides in, not the seconds a whole room could take.
pub const MAX_PIECE_ROWS: usize = 2_000;

/// The most trims queued or running at once (one per room runs; a second for the same
/// room is answered `AlreadyRunning`). Beyond this `submit_trim` reports Full.
pub const MAX_PENDING_TRIMS: usize = 64;

/// Where a trim is.
enum TrimState {
    /// The first piece decides `base`.
    Planning,
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
            TrimState::Planning | TrimState::Deleting { .. } => Ok(TrimOutcome::Cancelled),
        };
        self.finish(outcome);
    }

    /// Deletes the next at most [`MAX_PIECE_ROWS`] rows of the trim in the caller's
    /// transaction. A storage error dooms the transaction; anything else finishes the
    /// trim with its answer.
    pub fn piece(&mut self, tables: &mut WriteTables) -> Result<(), redb::StorageError> {
        let room = self.job.room.as_str();
        let base = match self.state {
            TrimState::Planning => match plan(tables, room, self.job.history_events)? {
                Ok(Plan::Absent) => {
                    self.state = TrimState::Finished(Ok(TrimOutcome::Cancelled));
                    return Ok(());
                }
                Ok(Plan::NothingDue { first_retained }) => {
                    self.report.first_retained = first_retained;
                    self.state = TrimState::Finished(Ok(TrimOutcome::Done(self.report)));
                    return Ok(());
                }
                Ok(Plan::Base {
                    base,
                    first_retained,
                }) => {
                    self.report.first_retained = first_retained;
                    base
                }
                Err(corrupt) => {
                    self.state = TrimState::Finished(Err(corrupt));
                    return Ok(());
                }
            },
            TrimState::Deleting { base } => base,
            TrimState::Finished(_) => return Ok(()),
        };
        self.report.pieces += 1;
        let mut budget = MAX_PIECE_ROWS;

        let seqs = first_keys(&tables.events, room, 0, base, budget)?;
        for &seq in &seqs {
            tables.events.remove((room, seq))?;
        }
        budget -= seqs.len();
        self.report.events_deleted += seqs.len() as u64;
        if let Some(&last) = seqs.last() {
            match tables.stored_meta(room)? {
                Ok(Some(mut stored)) => {
                    // Never past the head: `base` is a snapshot seq at or below it.
                    stored.first_retained = stored.first_retained.max(last + 1);
                    tables.put_meta(room, &stored)?;
                    self.report.first_retained = stored.first_retained;
                }
                // The writer cancels a room's trim before deleting the room, so the meta
                // row is there; if not, the events are leftovers and stay deleted.
                Ok(None) => {
                    self.state = TrimState::Finished(Ok(TrimOutcome::Cancelled));
                    return Ok(());
                }
                Err(corrupt) => {
                    self.state = TrimState::Finished(Err(corrupt));
                    return Ok(());
                }
            }
        }

        if budget > 0 && base > 0 {
            let seqs = first_keys(&tables.snapshots, room, 0, base - 1, budget)?;
            for &seq in &seqs {
                tables.snapshots.remove((room, seq))?;
            }
            budget -= seqs.len();
            self.report.snapshots_deleted += seqs.len() as u64;
        }

        // Budget left over means both ranges ran out within this piece.
        self.state = if budget > 0 {
            TrimState::Finished(Ok(TrimOutcome::Done(self.report)))
        } else {
            TrimState::Deleting { base }
        };
        Ok(())
    }
}

/// What the first piece of a trim found.
enum Plan {
    Absent,
    /// No snapshot at or below head - history_events.
    NothingDue {
        first_retained: u64,
    },
    Base {
        base: u64,
        first_retained: u64,
    },
}

fn plan(
    tables: &WriteTables,
    room: &str,
    history_events: u64,
) -> Result<Result<Plan, StoreError>, redb::StorageError> {
    let stored = match tables.stored_meta(room)? {
        Ok(Some(stored)) => stored,
        Ok(None) => return Ok(Ok(Plan::Absent)),
        Err(corrupt) => return Ok(Err(corrupt)),
    };
    let first_retained = stored.first_retained;
    let Some(newest_allowed) = stored.head.checked_sub(history_events) else {
        return Ok(Ok(Plan::NothingDue { first_retained }));
    };
    let base = tables
        .snapshots
        .range((room, 0)..=(room, newest_allowed))?
        .next_back()
        .transpose()?
        .map(|(key, _)| key.value().1);
    Ok(Ok(match base {
        Some(base) => Plan::Base {
            base,
            first_retained,
        },
        None => Plan::NothingDue { first_retained },
    }))
}

/// The first at most `limit` seqs of `room` in `lo..=hi` in a `(room, seq)` table.
fn first_keys(
    table: &redb::Table<(&'static str, u64), &'static [u8]>,
    room: &str,
    lo: u64,
    hi: u64,
    limit: usize,
) -> Result<Vec<u64>, redb::StorageError> {
    let mut seqs = Vec::new();
    if lo > hi || limit == 0 {
        return Ok(seqs);
    }
    for entry in table.range((room, lo)..=(room, hi))?.take(limit) {
        let (key, _) = entry?;
        seqs.push(key.value().1);
    }
    Ok(seqs)
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
}

impl Deletion {
    pub fn new(room: &str) -> Deletion {
        Deletion {
            room: room.to_owned(),
            phase: Phase::Meta,
        }
    }

    /// A deletion found in the `deleting` table: its meta row is already gone.
    fn resumed(room: &str) -> Deletion {
        Deletion {
            room: room.to_owned(),
            phase: Phase::Events,
        }
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
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
                    tables.deleting.insert(room, ())?;
                    Phase::Events
                }
                Phase::Events => {
                    let seqs = first_keys(&tables.events, room, 0, u64::MAX, budget)?;
                    for &seq in &seqs {
                        tables.events.remove((room, seq))?;
                    }
                    budget -= seqs.len();
                    if budget > 0 {
                        Phase::Snapshots
                    } else {
                        Phase::Events
                    }
                }
                Phase::Snapshots => {
                    let seqs = first_keys(&tables.snapshots, room, 0, u64::MAX, budget)?;
                    for &seq in &seqs {
                        tables.snapshots.remove((room, seq))?;
                    }
                    budget -= seqs.len();
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
