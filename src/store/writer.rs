//! The one writer thread: group commit, maintenance scheduling, the durability policy,
//! and fail-stop.
//!
//! The writer blocks for the first queued job, drains whatever else is queued (up to
//! [`MAX_GROUP_BATCHES`] batches), writes the plain batches to the journal (its segment
//! file, one write and one `fdatasync`, `journal_file.rs`) and the others directly
//! after folding their room, in one redb write transaction that also carries the folds
//! due, snapshots and a trim piece (`journal.rs`), and then answers every batch in
//! queue order. Under load this pays one fsync for many batches from many rooms; redb
//! allows only one write transaction at a time anyway. A group whose batches are all
//! journaled opens no redb transaction unless folds, snapshots or a trim need one, and
//! is answered as soon as the segment is synced, before that transaction commits; a
//! group with a direct batch is answered after redb's commit. Under `Immediate` every
//! redb commit of a store with segment files is durable (a fold's segment is deleted
//! only after that), and a transaction whose batches were answered before it is
//! committed by the committer thread (`committer.rs`): meanwhile the writer writes the
//! next groups whose batches are all journaled, of rooms with batches pending, with no
//! snapshot (`overlaps_commit`), and anything else (another transaction, a fold
//! request, a trim, a deletion, a sync, shutdown) first waits for that commit's end,
//! where its folds are published and the segments it emptied deleted.
//!
//! Maintenance shares the queue and the thread:
//! - A trim job joins the writer's list of running trims (at most
//!   [`MAX_PENDING_TRIMS`](super::MAX_PENDING_TRIMS), one per room). Every transaction
//!   carries one piece of the trim at the front of the list (round robin), so trimming
//!   rides along with batch commits; while trims remain and no batch is queued, the
//!   writer commits trim pieces alone, without waiting for the queue.
//! - A delete job ends the drain: the batches drained before it commit first, then the
//!   deletion runs in pieces, back to back, and only then does the writer take the next
//!   job, so batches queued after it find the room absent.
//! - Folds ride with batch commits by the journal's policy (age, pending bytes, a
//!   bounded number of rooms and bytes per transaction, a big room in parts over
//!   several); a read's fold request of one room rides
//!   with the next commit, of every room it runs like a deletion; with no job for
//!   `IDLE_FOLD` the writer commits folds alone, and at shutdown it folds everything.
//!
//! Commits that hold only maintenance or folds are not fsync'd on their own in a store
//! without segment files (losing one to a crash loses progress, never consistency, as
//! each piece is a consistent state and a fold's rows stay in the journal until the
//! fold is durable), except a deletion's last piece, which is made durable like a batch
//! before it is answered.
//!
//! Under `Durability::None` commits skip the fsync, and an fsync'd commit follows the
//! first unsynced one within `sync_interval`: by piggybacking on the next group if one
//! arrives in time, or as an empty commit when the queue wait times out.
//!
//! A failed transaction is fail-stop: every job in it gets an error, the store is
//! marked failed, and every later job is refused without touching the disk until the
//! process restarts and rebuilds state from the log. Which batches exist and what they
//! hold is the Room's business; the table layout is `tables.rs`'s, the pieces
//! `retention.rs`'s.
//!
//! Test hook: [`COMMIT_DELAY_ENV`] (milliseconds, read once at start) holds every group
//! of batches that long before writing it, so black-box tests can widen the window
//! between a room accepting an op and the store having it (a rebalance beginning in
//! that window). Unset, as in every real deployment, it costs nothing.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};
use redb::ReadableDatabase;
use tokio::sync::oneshot;

use crate::metrics::names;

use super::committer::{Committed, Committer, Poll};
use super::journal::{Fold, Pending, Sink, IDLE_FOLD, MAX_FOLD_ROOMS};
use super::journal_file::JournalFile;
use super::retention::{Deletion, Trim, MAX_PENDING_TRIMS};
use super::tables::{self, LogRows, WriteTables};
use super::{guard, probe};
use super::{Batch, Durability, StoreError, TrimOutcome, TrimPolicy};

/// The most batches one transaction takes, so one commit stays bounded in size and the
/// first batch of a long queue is not kept waiting for the last.
pub const MAX_GROUP_BATCHES: usize = 1024;

/// A commit at least this long is logged (a warning with what it carried and how long
/// redb's own commit took), so a stall shows in the log with its cause: on a shared
/// virtual disk commits of 100-500 ms were seen a few times a minute under load
/// (`benches/README.md`). Each such commit takes this long, so they log at most ten
/// times a second.
pub const SLOW_COMMIT: Duration = Duration::from_millis(100);

/// A room probed whole (`probe::room`) before a trim less than this long ago is not
/// probed again before its next one. A busy room asks for a trim at every snapshot once
/// its log is past `--history-events` (at 100 rooms and 165,000 ops/s, 165 trims a
/// second), and each probe walked all of the room's rows: 43% of the writer's time in a
/// steady ingest (`benches/README.md`, thirteenth pass). A page probed that recently is
/// still in redb's cache, where a second probe would only read the cached copy again;
/// the database's reopen empties that cache, and the record with it.
const TRIM_PROBE_EVERY: Duration = Duration::from_secs(60);

/// The most rooms whose last trim probe is remembered; past it, rooms are probed each
/// time, as before.
const MAX_TRIM_PROBED: usize = 65_536;

/// How long the writer waits for a handed-over commit (`committer.rs`) before it looks
/// at the queue again: the most a job that arrives meanwhile waits to be seen.
const IN_FLIGHT_POLL: Duration = Duration::from_micros(100);

/// One unit of work in the writer queue.
pub enum Job {
    Batch(BatchJob),
    Trim(TrimJob),
    Delete(DeleteJob),
    /// A whole room from another node (`transfer.rs`), in a transaction of its own.
    Import(super::transfer::ImportJob),
    /// A read needs a room (or every room) folded out of the journal (`journal.rs`).
    Fold(FoldJob),
}

impl Job {
    /// The room the job is for.
    pub fn room(&self) -> &str {
        match self {
            Job::Batch(job) => &job.batch.room,
            Job::Trim(job) => &job.room,
            Job::Delete(job) => &job.room,
            Job::Import(job) => &job.room,
            Job::Fold(job) => job.room.as_deref().unwrap_or(""),
        }
    }

    /// Answers the job with `error` without running it.
    pub fn fail(self, error: StoreError) {
        // A dropped receiver means the caller gave up waiting; nothing to tell it.
        match self {
            Job::Batch(job) => {
                let _ = job.reply.send(Err(error));
            }
            Job::Trim(job) => {
                let _ = job.reply.send(Err(error));
            }
            Job::Delete(job) => {
                let _ = job.reply.send(Err(error));
            }
            Job::Import(job) => {
                let _ = job.reply.send(Err(error));
            }
            Job::Fold(job) => {
                let _ = job.reply.send(Err(error));
            }
        }
    }
}

/// A queued batch and where its outcome goes once its transaction has committed.
pub struct BatchJob {
    /// The batch, with its events taken out and encoded into `rows`, and its snapshot
    /// taken out and encoded into `snapshot`.
    pub batch: Batch,
    /// The events' log rows, encoded by `submit` on the caller's thread.
    pub rows: LogRows,
    /// For a batch that creates its room: the user of the creation event.
    pub creator: Option<String>,
    /// The snapshot's seq and row, encoded by `submit` on the caller's thread.
    pub snapshot: Option<(u64, Vec<u8>)>,
    pub reply: oneshot::Sender<Result<(), StoreError>>,
}

/// A queued trim; see `Store::submit_trim`.
pub struct TrimJob {
    pub room: String,
    pub policy: TrimPolicy,
    pub reply: oneshot::Sender<Result<TrimOutcome, StoreError>>,
    /// Holds one of the [`MAX_PENDING_TRIMS`] places until the job is dropped, however
    /// it ends.
    pub _slot: TrimSlot,
}

/// A read's request for a fold: of one room (folded in the next transaction, with
/// whatever batches are queued), or of every pending room (None: in transactions of
/// their own before the next job). Answered after the fold committed.
pub struct FoldJob {
    pub room: Option<String>,
    /// Bounded (1): the one answer, sent once. A std channel, so the reader blocks on
    /// it from any thread (tokio's `blocking_recv` refuses to run inside a runtime).
    pub reply: std::sync::mpsc::SyncSender<Result<(), StoreError>>,
}

/// A queued room deletion; see `Store::submit_delete`.
pub struct DeleteJob {
    pub room: String,
    pub reply: oneshot::Sender<Result<(), StoreError>>,
}

/// What the writer reports to the store handle. The writer writes it; `Store::submit`
/// and `Store::is_healthy` read it.
#[derive(Debug, Default)]
pub struct Health {
    /// Set while the writer thread is running (cleared on exit, even by a panic).
    running: AtomicBool,
    /// Set once, by the first failed commit; never cleared.
    failed: AtomicBool,
    /// Why the store failed, for the errors of later batches.
    failure: Mutex<Option<String>>,
    /// Committed write transactions, sync-only ones included.
    commits: AtomicU64,
    /// Committed trimming and deletion pieces.
    pieces: AtomicU64,
    /// Times the writer reopened the database.
    reopens: AtomicU64,
    /// Groups written while the committer ran an earlier group's transaction.
    beside_commits: AtomicU64,
    /// Rooms probed whole before a trim (`start_trim`).
    pub(super) trim_probes: AtomicU64,
    /// Trim jobs queued or running, bounded by [`MAX_PENDING_TRIMS`].
    trims: AtomicUsize,
    /// Rooms per creating user (users with none have no entry): filled from the
    /// `creators` table at open, then moved by the writer as creations and deletions
    /// commit.
    rooms_by_creator: DashMap<String, usize>,
    /// Rooms whose rows were found damaged, with what was found. Written by guarded
    /// reads and the writer's probes; read before every job and read of a room, which is
    /// then refused without touching the file. Never cleared: the damage stays until the
    /// file is restored, and a restart finds it again.
    damaged: Mutex<std::collections::BTreeMap<String, String>>,
    /// Rooms with journaled batches not yet folded (`journal.rs`), with their pending
    /// head. Written by the writer only: a room is added (or its head moved) after the
    /// commit that journaled it and before its batch is answered, and removed after the
    /// commit that folded it; reads of a room in it ask for a fold first, and the room
    /// list reads the head here instead (a fold of every room per listing would stall
    /// the writer each time a dashboard refreshes).
    journaled: Mutex<std::collections::HashMap<String, u64>>,
    /// Test hook: the writer folds only when asked (a read, a direct batch of the room)
    /// and not at shutdown, which leaves the journal as a crash would.
    #[cfg(test)]
    pub(super) hold_folds: AtomicBool,
}

impl Health {
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// The reason of the commit failure that stopped writes, if one did.
    pub fn failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.failure.lock().clone()
    }

    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    pub fn reopens(&self) -> u64 {
        self.reopens.load(Ordering::Relaxed)
    }

    pub fn beside_commits(&self) -> u64 {
        self.beside_commits.load(Ordering::Relaxed)
    }

    pub fn pieces(&self) -> u64 {
        self.pieces.load(Ordering::Relaxed)
    }

    /// Rooms `user` created that exist (committed creations minus deletions).
    pub fn rooms_created_by(&self, user: &str) -> usize {
        self.rooms_by_creator.get(user).map_or(0, |n| *n)
    }

    /// Sets the counts read from the `creators` table at open.
    pub fn set_rooms_by_creator(&self, counts: std::collections::HashMap<String, usize>) {
        self.rooms_by_creator.clear();
        for (user, n) in counts {
            self.rooms_by_creator.insert(user, n);
        }
    }

    fn count_created(&self, user: &str) {
        *self.rooms_by_creator.entry(user.to_owned()).or_insert(0) += 1;
    }

    fn count_deleted(&self, user: &str) {
        if let Some(mut n) = self.rooms_by_creator.get_mut(user) {
            *n = n.saturating_sub(1);
        }
        self.rooms_by_creator.remove_if(user, |_, n| *n == 0);
    }

    /// One of the [`MAX_PENDING_TRIMS`] places for a trim job, or None when all are
    /// taken.
    pub fn take_trim_slot(self: &Arc<Self>) -> Option<TrimSlot> {
        self.trims
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_PENDING_TRIMS).then_some(n + 1)
            })
            .ok()
            .map(|_| TrimSlot(self.clone()))
    }

    /// Records `room` as damaged; true the first time, so the caller logs it once.
    pub fn mark_damaged(&self, room: &str, detail: &str) -> bool {
        let mut damaged = self.damaged.lock();
        if damaged.contains_key(room) {
            return false;
        }
        damaged.insert(room.to_owned(), detail.to_owned());
        true
    }

    /// What was found wrong with `room`, if it is known damaged.
    pub fn damage_of(&self, room: &str) -> Option<String> {
        self.damaged.lock().get(room).cloned()
    }

    /// Every room known damaged, in room order, with what was found.
    pub fn damaged(&self) -> Vec<(String, String)> {
        self.damaged
            .lock()
            .iter()
            .map(|(room, detail)| (room.clone(), detail.clone()))
            .collect()
    }

    /// Whether `room` has journaled batches not yet folded.
    pub fn is_journaled(&self, room: &str) -> bool {
        self.journaled.lock().contains_key(room)
    }

    /// The head of `room` counting its journaled batches not yet folded; None when it
    /// has none (its meta row's head is current).
    pub fn journaled_head(&self, room: &str) -> Option<u64> {
        self.journaled.lock().get(room).copied()
    }

    /// Whether any room has.
    pub fn any_journaled(&self) -> bool {
        !self.journaled.lock().is_empty()
    }

    /// Applies a commit's journaled batches (each room with the head its batches moved
    /// it to) and folds to the published set and heads.
    fn publish(&self, folded: &[String], journaled: &[(String, u64)], pending: &Pending) {
        if folded.is_empty() && journaled.is_empty() {
            return;
        }
        let mut set = self.journaled.lock();
        for (room, head) in journaled {
            match set.get_mut(room.as_str()) {
                Some(published) => *published = *head,
                None => {
                    set.insert(room.clone(), *head);
                }
            }
        }
        for room in folded {
            match (pending.head(room), set.get_mut(room)) {
                (Some(head), Some(published)) => *published = head,
                (Some(head), None) => {
                    set.insert(room.clone(), head);
                }
                (None, _) => {
                    set.remove(room);
                }
            }
        }
    }

    pub(super) fn fail(&self, reason: String) {
        self.failure.lock().get_or_insert(reason);
        self.failed.store(true, Ordering::Release);
    }
}

/// A place taken in the bounded set of trims; given back when dropped.
pub struct TrimSlot(Arc<Health>);

impl Drop for TrimSlot {
    fn drop(&mut self) {
        self.0.trims.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Clears `running` when the writer thread ends, however it ends.
struct RunningGuard<'a>(&'a Health);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
    }
}

/// What the writer does next, when no job is in hand.
// Lives for one loop turn on the writer's stack; boxing the job would allocate per job.
#[allow(clippy::large_enum_variant)]
enum Next {
    Job(Job),
    /// Trims are running and the queue is empty: commit a trim piece alone.
    TrimPiece,
    /// The oldest unsynced commit is `sync_interval` old: sync now.
    Sync,
    /// Rooms are pending in the journal and no job came for [`IDLE_FOLD`]: fold some.
    FoldPiece,
    /// The queue is closed and empty.
    Closed,
}

/// The open database as readers find it: `None` once the store shuts down (or if a
/// reopen failed).
pub type DbSlot = RwLock<Option<Arc<redb::Database>>>;

/// The test hook of the module docs: a delay before each group of batches is written.
pub const COMMIT_DELAY_ENV: &str = "ROOMD_TEST_COMMIT_DELAY_MS";

/// The open database and what the writer needs to reopen it.
pub struct Opened {
    pub db: Arc<redb::Database>,
    /// Where readers get the database; shared with the `Store` handle.
    pub slot: Arc<DbSlot>,
    /// The first journal key the writer may use (past every row replay kept).
    pub journal_key: u64,
    /// The journal's segment files (`journal_file.rs`); None for a store without a data
    /// dir, whose journal rows go to the `journal` table.
    pub journal_file: Option<JournalFile>,
    pub cache_bytes: usize,
    /// See `StoreConfig::quiet_reopen`.
    pub quiet_reopen: Option<Duration>,
}

/// The writer thread's state; it owns the receiving end of the queue.
pub struct Writer {
    /// `None` only if a reopen failed (the store is then fail-stopped).
    db: Option<Arc<redb::Database>>,
    slot: Arc<DbSlot>,
    cache_bytes: usize,
    quiet_reopen: Option<Duration>,
    /// For error messages only.
    db_path: PathBuf,
    queue: Receiver<Job>,
    durability: Durability,
    health: Arc<Health>,
    /// Whether commits save the allocator state (see `QUICK_REPAIR`).
    quick_repair: bool,
    /// Running trims, one per room, the next to get a piece in front.
    trims: VecDeque<Trim>,
    /// When the oldest commit not yet fsync'd happened.
    unsynced_since: Option<Instant>,
    /// Whether the database was reopened (and freed memory handed back) since the last
    /// job.
    released: bool,
    /// The test hook ([`COMMIT_DELAY_ENV`]).
    commit_delay: Option<Duration>,
    /// Journaled batches not yet folded (`journal.rs`).
    pending: Pending,
    /// Where journal rows are appended, when not to the `journal` table.
    journal_file: Option<JournalFile>,
    /// Fold requests of single rooms taken from the queue, answered by the next commit.
    fold_requests: Vec<FoldJob>,
    /// Set while every pending room is being folded (a request for all, shutdown), so
    /// the test hook that holds folds does not hold these.
    folding_all: bool,
    /// The thread that commits a transaction whose group was answered before it
    /// (`committer.rs`); None if it could not be started (the writer commits itself).
    committer: Option<Committer>,
    /// The group whose transaction the committer holds: what its end still has to do.
    in_flight: Option<AfterCommit>,
    /// When each room was last probed whole before a trim ([`TRIM_PROBE_EVERY`]).
    trim_probed: HashMap<String, Instant>,
}

/// What a group still has to do once redb's transaction has committed (or failed).
struct AfterCommit {
    /// When the group started waiting for its commit.
    held: Instant,
    /// When redb's commit started.
    committing: Instant,
    appending: Duration,
    redb_durable: Option<bool>,
    durable: bool,
    /// Whether the batches were answered before the commit.
    early: bool,
    report: FoldReport,
    requests: Vec<FoldJob>,
    trim: Option<Trim>,
    /// The batches not answered yet (empty when `early`), and their outcomes.
    group: Vec<BatchJob>,
    outcomes: Vec<Result<(), StoreError>>,
    events: u64,
    started: Instant,
}

impl Writer {
    pub fn new(
        opened: Opened,
        db_path: PathBuf,
        queue: Receiver<Job>,
        durability: Durability,
        health: Arc<Health>,
        quick_repair: bool,
    ) -> Writer {
        Writer {
            db: Some(opened.db),
            slot: opened.slot,
            pending: Pending::new(opened.journal_key, opened.journal_file.is_some()),
            journal_file: opened.journal_file,
            fold_requests: Vec::new(),
            folding_all: false,
            committer: Committer::spawn()
                .map_err(|error| {
                    tracing::warn!(
                        %error,
                        "cannot start the store's committer thread; the writer commits folds itself"
                    )
                })
                .ok(),
            in_flight: None,
            trim_probed: HashMap::new(),
            cache_bytes: opened.cache_bytes,
            quiet_reopen: opened.quiet_reopen,
            db_path,
            queue,
            durability,
            health,
            quick_repair,
            trims: VecDeque::new(),
            unsynced_since: None,
            // Nothing to give back until a job has run.
            released: true,
            commit_delay: std::env::var(COMMIT_DELAY_ENV)
                .ok()
                .and_then(|ms| ms.parse().ok())
                .map(Duration::from_millis),
        }
    }

    /// Marks the writer running; call on the spawning thread so `is_healthy` is true as
    /// soon as `Store::open` returns.
    pub fn mark_running(&self) {
        self.health.running.store(true, Ordering::Release);
    }

    /// Runs until the queue is closed and drained, then makes every commit durable.
    pub fn run(mut self) {
        let health = self.health.clone();
        let _running = RunningGuard(&health);
        loop {
            let first = match self.next() {
                Next::Job(job) => {
                    self.released = false;
                    job
                }
                Next::TrimPiece => {
                    self.commit_group(Vec::new());
                    continue;
                }
                Next::Sync => {
                    self.sync();
                    continue;
                }
                Next::FoldPiece => {
                    self.commit_group(Vec::new());
                    continue;
                }
                Next::Closed => break,
            };
            let mut group = Vec::new();
            let mut delete = None;
            let mut import = None;
            let mut fold_all = None;
            let mut next = Some(first);
            while let Some(job) = next.take() {
                match job {
                    Job::Batch(job) => group.push(job),
                    Job::Trim(job) => self.start_trim(job),
                    // Later jobs wait until the deletion is done.
                    Job::Delete(job) => {
                        delete = Some(job);
                        break;
                    }
                    // Likewise for an import, after the batches queued before it.
                    Job::Import(job) => {
                        import = Some(job);
                        break;
                    }
                    // One room's fold rides with this group's transaction.
                    Job::Fold(job) if job.room.is_some() => self.fold_requests.push(job),
                    // Every room's takes transactions of its own, like a deletion.
                    Job::Fold(job) => {
                        fold_all = Some(job);
                        break;
                    }
                }
                if group.len() < MAX_GROUP_BATCHES {
                    next = self.queue.try_recv().ok();
                }
            }
            self.commit_group(group);
            if delete.is_some() || import.is_some() || fold_all.is_some() {
                self.finish_commit();
            }
            if let Some(job) = delete {
                self.delete(job);
            }
            if let Some(job) = import {
                self.import(job);
            }
            if let Some(job) = fold_all {
                self.fold_everything();
                let outcome = match self.health.failure() {
                    Some(reason) => Err(self.fail_stopped(reason)),
                    None => Ok(()),
                };
                let _ = job.reply.send(outcome);
            }
        }
        self.finish_commit();
        // Folded now, so the next start has nothing to replay (the test hook skips
        // this to leave the journal as a crash would).
        if !self.folds_held() {
            self.fold_everything();
        }
        for job in self.fold_requests.drain(..) {
            let _ = job.reply.send(Ok(()));
        }
        self.finish_commit();
        // Shutdown does not wait for trims: each committed piece is a consistent state,
        // and the room asks again after the restart.
        for trim in self.trims.drain(..) {
            trim.finish(Ok(TrimOutcome::Cancelled));
        }
        // The queue is closed and everything in it committed; make it durable.
        if self.unsynced_since.is_some() {
            self.sync();
        }
    }

    fn next(&mut self) -> Next {
        // A job that comes while a handed-over commit runs may be written beside it
        // (`overlaps_commit`); everything below waits for the commit's end first.
        while !self.poll_commit(Duration::ZERO) {
            match self.queue.try_recv() {
                Ok(job) => return Next::Job(job),
                Err(TryRecvError::Disconnected) => self.finish_commit(),
                Err(TryRecvError::Empty) => {
                    self.poll_commit(IN_FLIGHT_POLL);
                }
            }
        }
        // Folded segments wait for a durable commit to be deleted (`journal_file.rs`).
        if self.health.failure().is_none()
            && self
                .journal_file
                .as_ref()
                .is_some_and(|file| file.releasable(self.pending.min_unfolded()))
        {
            return Next::Sync;
        }
        if !self.trims.is_empty() {
            return match self.queue.try_recv() {
                Ok(job) => Next::Job(job),
                Err(TryRecvError::Empty) => Next::TrimPiece,
                Err(TryRecvError::Disconnected) => Next::Closed,
            };
        }
        // A fold piece also carries a sync that falls due meanwhile (`commit_group`).
        if !self.pending.is_empty() && !self.folds_held() {
            return match self.queue.recv_timeout(IDLE_FOLD) {
                Ok(job) => Next::Job(job),
                Err(RecvTimeoutError::Timeout) => Next::FoldPiece,
                Err(RecvTimeoutError::Disconnected) => Next::Closed,
            };
        }
        match (self.sync_interval(), self.unsynced_since) {
            (Some(interval), Some(since)) => {
                let wait = (since + interval).saturating_duration_since(Instant::now());
                match self.queue.recv_timeout(wait) {
                    Ok(job) => Next::Job(job),
                    Err(RecvTimeoutError::Timeout) => Next::Sync,
                    Err(RecvTimeoutError::Disconnected) => Next::Closed,
                }
            }
            _ => {
                // Everything committed is durable. Quiet for a while: reopen the
                // database, which empties its page cache, and hand the pages freed by
                // the last commits back to the OS before blocking (once per quiet
                // spell; a read in progress postpones it by another quiet period).
                while let (false, Some(quiet)) = (self.released, self.quiet_reopen) {
                    match self.queue.recv_timeout(quiet) {
                        Ok(job) => return Next::Job(job),
                        Err(RecvTimeoutError::Timeout) => {
                            if self.reopen() {
                                crate::memory::release_thread_memory();
                                self.released = true;
                            }
                        }
                        Err(RecvTimeoutError::Disconnected) => return Next::Closed,
                    }
                }
                match self.queue.recv() {
                    Ok(job) => Next::Job(job),
                    Err(_) => Next::Closed,
                }
            }
        }
    }

    /// Closes and reopens the database, unless a read holds it (false: try later) or
    /// the store is shutting down or failed (true: nothing to do). Readers wait for the
    /// swap on the slot's lock. A failed reopen fail-stops the store.
    fn reopen(&mut self) -> bool {
        if self.health.failure().is_some() {
            return true;
        }
        // Fold and trim commits are not fsync'd on their own; one that the close
        // dropped would take back a fold the writer already counts as done.
        if self.unsynced_since.is_some() {
            self.sync();
            if self.health.failure().is_some() {
                return true;
            }
        }
        let mut slot = self.slot.write();
        let Some(current) = slot.as_ref() else {
            return true;
        };
        // The slot's handle and the writer's: no read holds the database.
        if Arc::strong_count(current) > 2 {
            return false;
        }
        drop(slot.take());
        let Some(db) = self.db.take() else {
            return true;
        };
        let db = match Arc::try_unwrap(db) {
            Ok(db) => db,
            Err(db) => {
                *slot = Some(db.clone());
                self.db = Some(db);
                return false;
            }
        };
        let started = Instant::now();
        let closed = db.close().map_err(|e| e.to_string());
        let close_ms = started.elapsed().as_secs_f64() * 1e3;
        let reopened = closed.and_then(|()| {
            super::open_database(&self.db_path, self.cache_bytes).map_err(|e| e.to_string())
        });
        match reopened {
            Ok(db) => {
                let db = Arc::new(db);
                *slot = Some(db.clone());
                self.db = Some(db);
                self.health.reopens.fetch_add(1, Ordering::Relaxed);
                // A page now comes from the disk again: the next trim probes it.
                self.trim_probed.clear();
                tracing::debug!(
                    db = %self.db_path.display(),
                    ms = started.elapsed().as_secs_f64() * 1e3,
                    close_ms,
                    "store quiet: database reopened to empty its page cache"
                );
            }
            Err(reason) => {
                tracing::error!(
                    db = %self.db_path.display(),
                    error = %reason,
                    "cannot reopen the database; refusing all further writes until restart"
                );
                self.health.fail(reason);
            }
        }
        true
    }

    fn sync_interval(&self) -> Option<Duration> {
        match self.durability {
            Durability::Immediate => None,
            Durability::None { sync_interval } => Some(sync_interval),
        }
    }

    /// Whether a commit that must reach the disk under the durability policy (one that
    /// answers batches, or finishes a deletion) is fsync'd.
    fn answer_durably(&self) -> bool {
        match self.sync_interval() {
            None => true,
            Some(interval) => self
                .unsynced_since
                .is_some_and(|since| since.elapsed() >= interval),
        }
    }

    /// Records a commit for the sync policy; after a durable one, deletes the journal
    /// segments its folds (and earlier ones) emptied.
    fn committed(&mut self, durable: bool) {
        self.health.commits.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(names::STORE_COMMITS).increment(1);
        if durable {
            self.unsynced_since = None;
            self.release_segments();
        } else {
            self.unsynced_since.get_or_insert_with(Instant::now);
        }
    }

    /// Right after a durable commit: syncs the journal segment too (under
    /// Durability::None it may hold unsynced rows), and deletes the segments whose
    /// batches are all folded durably. A failure fail-stops.
    fn release_segments(&mut self) {
        let min_unfolded = self.pending.min_unfolded();
        let Some(file) = self.journal_file.as_mut() else {
            return;
        };
        // Damaged rooms' rows set aside first: their segments may go now.
        let aside = self.pending.take_aside();
        if let Err(error) = aside
            .iter()
            .try_for_each(|(key, row)| file.set_aside(*key, row))
            .and_then(|()| file.sync())
            .and_then(|()| file.release(min_unfolded))
        {
            tracing::error!(db = %self.db_path.display(), %error, "cannot sync or empty the journal segment; refusing all further writes until restart");
            self.health
                .fail(format!("cannot sync or empty the journal segment: {error}"));
        }
    }

    /// Takes a trim into the running list, unless one for its room already runs.
    fn start_trim(&mut self, job: TrimJob) {
        if let Some(reason) = self.health.failure() {
            let _ = job.reply.send(Err(self.fail_stopped(reason)));
            return;
        }
        if self.trims.iter().any(|trim| trim.room() == job.room) {
            let _ = job.reply.send(Ok(TrimOutcome::AlreadyRunning));
            return;
        }
        let now = Instant::now();
        let probed_lately = self
            .trim_probed
            .get(&job.room)
            .is_some_and(|at| now.duration_since(*at) < TRIM_PROBE_EVERY);
        // A room known to be damaged is refused whatever the record says.
        let probed = if probed_lately && self.health.damage_of(&job.room).is_none() {
            Ok(())
        } else {
            self.health.trim_probes.fetch_add(1, Ordering::Relaxed);
            self.probe_room(&job.room)
        };
        if let Err(error) = probed {
            let _ = job.reply.send(Err(error));
            return;
        }
        if !probed_lately {
            if self.trim_probed.len() >= MAX_TRIM_PROBED {
                self.trim_probed
                    .retain(|_, at| now.duration_since(*at) < TRIM_PROBE_EVERY);
            }
            if self.trim_probed.len() < MAX_TRIM_PROBED {
                self.trim_probed.insert(job.room.clone(), now);
            }
        }
        self.trims.push_back(Trim::new(job));
    }

    /// Commits the group's batches, the folds due (`journal.rs`) and one piece of the
    /// front trim in one transaction, and answers them. Does nothing for an empty group
    /// with no fold due and no trim running.
    fn commit_group(&mut self, group: Vec<BatchJob>) {
        if self.in_flight.is_some() {
            if self.overlaps_commit(&group) {
                self.health.beside_commits.fetch_add(1, Ordering::Relaxed);
            } else {
                self.finish_commit();
            }
        }
        let requests = std::mem::take(&mut self.fold_requests);
        if let Some(reason) = self.health.failure() {
            for job in group {
                let _ = job.reply.send(Err(self.fail_stopped(reason.clone())));
            }
            for job in requests {
                let _ = job.reply.send(Err(self.fail_stopped(reason.clone())));
            }
            for trim in self.trims.drain(..) {
                trim.finish(Err(StoreError::FailStopped {
                    path: self.db_path.clone(),
                    reason: reason.clone(),
                }));
            }
            return;
        }
        // From here on the group waits for its commit (the slow-commit warning counts it).
        let held = Instant::now();
        if let (Some(delay), false) = (self.commit_delay, group.is_empty()) {
            std::thread::sleep(delay);
        }
        let mut group = self.probe_batches(group);
        let mut folds: Vec<Fold> = Vec::new();
        for job in &requests {
            if let Some(room) = job.room.as_ref() {
                if self.pending.contains(room) && !folds.iter().any(|fold| &fold.room == room) {
                    // A read folds its room whole.
                    folds.push(Fold {
                        room: room.clone(),
                        at_most: None,
                    });
                }
            }
        }
        // No new fold while one is being committed: it needs the next transaction.
        if !self.folds_held() && self.in_flight.is_none() {
            let idle = group.is_empty();
            self.pending.due(
                Instant::now(),
                idle,
                folds.len() + MAX_FOLD_ROOMS,
                &mut folds,
            );
        }
        let mut trim = self.trims.pop_front();
        // A trim plans from the folded head, so its room is folded first (in this
        // transaction, before the piece): else a room whose events were all journaled
        // when it asked would trim nothing, and ask again only at its next snapshot.
        if let Some(room) = trim
            .as_ref()
            .filter(|trim| trim.is_planning())
            .map(Trim::room)
        {
            if self.pending.contains(room) && !folds.iter().any(|fold| fold.room == room) {
                folds.push(Fold {
                    room: room.to_owned(),
                    at_most: None,
                });
            }
        }
        let folds = self.probe_folds(folds);
        if group.is_empty() && trim.is_none() && folds.is_empty() {
            for job in requests {
                let _ = job.reply.send(Ok(()));
            }
            return;
        }
        // Under Immediate only batches need the fsync (a fold moves rows that are
        // durable in the journal until the fold is); under None a trim or fold piece
        // is as good a carrier for the due sync as anything.
        let durable = match self.sync_interval() {
            None => !group.is_empty(),
            Some(_) => self.answer_durably(),
        };
        let events: u64 = group.iter().map(|job| job.rows.events).sum();
        let started = Instant::now();
        let mut pending = std::mem::take(&mut self.pending);
        let mut file = self.journal_file.take();
        let written = guard::catch(|| {
            self.write_group(
                &mut pending,
                file.as_mut(),
                &mut group,
                &folds,
                trim.as_mut(),
                durable,
            )
        })
        .map_err(WriteError::Panicked)
        .and_then(|result| result.map_err(WriteError::Redb));
        self.pending = pending;
        if let (Some(file), Err(_)) = (file.as_mut(), &written) {
            file.discard();
        }
        self.journal_file = file;
        let (written, txn) = match written {
            Ok(written) => written,
            Err(e) => {
                self.fail_group(e.to_string(), group, requests, trim);
                return;
            }
        };
        // Batches that are all journaled are durable in the segment file already: they
        // are answered before redb's transaction (folds, snapshots, a trim piece)
        // commits, so their acks do not wait for its fsyncs.
        let Written {
            mut outcomes,
            report,
            direct,
            appending,
            redb_durable,
        } = written;
        let early = txn.is_some() && self.journal_file.is_some() && !direct;
        // Only a commit that answered batches runs beside the next groups; maintenance
        // commits alone (idle folds, trim pieces, shutdown's folds) keep the thread.
        let hand_over = early && !group.is_empty() && self.sync_interval().is_none();
        if early {
            // Published once: beside this commit later groups may move the same rooms'
            // heads further, which its end must not set back.
            self.health.publish(&[], &report.journaled, &self.pending);
            self.answer(&mut group, std::mem::take(&mut outcomes), events, started);
        }
        let after = AfterCommit {
            held,
            committing: Instant::now(),
            appending,
            redb_durable,
            durable,
            early,
            report,
            requests,
            trim,
            group,
            outcomes,
            events,
            started,
        };
        match txn {
            // Answered already: the commit runs beside the next journal-only groups.
            Some(txn) if hand_over => {
                // One transaction in flight at most (`overlaps_commit` keeps a group
                // that opens one from running beside another); kept true here too, so
                // no commit's end is ever dropped.
                self.finish_commit();
                let left = match self.committer.as_ref() {
                    Some(committer) => committer.hand(txn),
                    None => Some(txn),
                };
                match left {
                    None => self.in_flight = Some(after),
                    Some(txn) => {
                        let committed = guard::catch(|| txn.commit());
                        self.after_commit(after, committed);
                    }
                }
            }
            Some(txn) => {
                let committed = guard::catch(|| txn.commit());
                self.after_commit(after, committed);
            }
            None => self.after_commit(after, Ok(Ok(()))),
        }
    }

    /// Waits for the transaction handed to the committer, if any, and finishes its
    /// group (`after_commit`).
    fn finish_commit(&mut self) {
        if let (Some(after), Some(committer)) = (self.in_flight.take(), self.committer.as_ref()) {
            let committed = committer.wait();
            self.after_commit(after, committed);
        }
    }

    /// Finishes the handed-over commit if it has ended; true when nothing is in flight
    /// any more.
    fn poll_commit(&mut self, wait: Duration) -> bool {
        let (Some(_), Some(committer)) = (self.in_flight.as_ref(), self.committer.as_ref()) else {
            return true;
        };
        match committer.poll_for(wait) {
            Poll::Done(committed) => {
                if let Some(after) = self.in_flight.take() {
                    self.after_commit(after, committed);
                }
                true
            }
            Poll::Running => false,
        }
    }

    /// Whether `group` may be written while a handed-over commit runs: batches that
    /// are all journaled, of rooms with batches pending (so their gapless check reads
    /// no meta row the commit changes), with no snapshot, fold request or trim, under
    /// Immediate. Anything else waits for the commit first.
    fn overlaps_commit(&self, group: &[BatchJob]) -> bool {
        !group.is_empty()
            && self.fold_requests.is_empty()
            && self.trims.is_empty()
            && self.journal_file.is_some()
            && self.sync_interval().is_none()
            && self.commit_delay.is_none()
            && group.iter().all(|job| {
                job.snapshot.is_none()
                    && Pending::journals(job.batch.create.is_some(), &job.rows)
                    && self.pending.contains(&job.batch.room)
            })
    }

    /// The end of a group once redb's transaction (if any) committed or failed: the
    /// sync policy, the slow-commit warning, what readers see, and the answers not
    /// given before the commit.
    fn after_commit(&mut self, after: AfterCommit, committed: Committed) {
        let AfterCommit {
            held,
            committing,
            appending,
            redb_durable,
            durable,
            early,
            report,
            requests,
            trim,
            mut group,
            outcomes,
            events,
            started,
        } = after;
        let committing = committing.elapsed();
        let committed = committed
            .map_err(WriteError::Panicked)
            .and_then(|result| result.map_err(|e| WriteError::Redb(e.into())));
        if let Err(e) = committed {
            self.fail_group(e.to_string(), group, requests, trim);
            return;
        }
        match redb_durable {
            Some(durable) => self.committed(durable),
            // Only journal segments were written: synced when `durable`, which leaves
            // redb's own unsynced commits as they were.
            None => {
                self.health.commits.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(names::STORE_COMMITS).increment(1);
                if !durable {
                    self.unsynced_since.get_or_insert_with(Instant::now);
                }
            }
        }
        let took = held.elapsed();
        if took >= SLOW_COMMIT {
            metrics::counter!(names::STORE_SLOW_COMMITS).increment(1);
            tracing::warn!(
                ms = took.as_millis() as u64,
                redb_commit_ms = committing.as_millis() as u64,
                journal_append_ms = appending.as_millis() as u64,
                batches = if early { 0 } else { group.len() },
                answered_before_redb_commit = early,
                events,
                rooms_folded = report.folded.len(),
                trim = trim.is_some(),
                durable,
                journal_bytes = self.pending.bytes(),
                "slow store commit"
            );
        }
        for (room, detail) in &report.damaged {
            self.note_damage(room, detail);
        }
        // Before any answer, so a read issued after an ack finds its room; a group
        // answered early published its journaled rooms then.
        let journaled: &[(String, u64)] = if early { &[] } else { &report.journaled };
        self.health
            .publish(&report.folded, journaled, &self.pending);
        if !report.folded.is_empty() {
            metrics::counter!(names::STORE_FOLDS).increment(report.folded.len() as u64);
        }
        metrics::gauge!(names::STORE_JOURNAL_BYTES).set(self.pending.bytes() as f64);
        for job in requests {
            let _ = job.reply.send(Ok(()));
        }
        if !early {
            self.answer(&mut group, outcomes, events, started);
        }
        if let Some(trim) = trim {
            self.health.pieces.fetch_add(1, Ordering::Relaxed);
            if trim.is_done() {
                trim.finish_done();
            } else {
                self.trims.push_back(trim);
            }
        }
    }

    /// Answers a committed group's batches (leaving `group` empty) and counts them.
    fn answer(
        &self,
        group: &mut Vec<BatchJob>,
        outcomes: Vec<Result<(), StoreError>>,
        events: u64,
        started: Instant,
    ) {
        if !group.is_empty() {
            metrics::counter!(names::STORE_BATCH_COMMITS).increment(1);
            metrics::counter!(names::STORE_BATCHES).increment(group.len() as u64);
            metrics::counter!(names::STORE_EVENTS).increment(events);
            crate::metrics::hot()
                .store_commit_seconds
                .record(started.elapsed().as_secs_f64());
        }
        // A dropped receiver means the room gave up waiting; nothing to tell it.
        for (job, outcome) in group.drain(..).zip(outcomes) {
            if let (Ok(()), Some(creator)) = (&outcome, &job.creator) {
                self.health.count_created(creator);
            }
            if let Err(error) = &outcome {
                if error.is_damage() {
                    self.note_damage(&job.batch.room, &error.to_string());
                }
            }
            let _ = job.reply.send(outcome);
        }
    }

    /// A group's write or commit failed: fail-stop, and every job of it (those not
    /// answered yet) and every running trim gets the error.
    fn fail_group(
        &mut self,
        reason: String,
        group: Vec<BatchJob>,
        requests: Vec<FoldJob>,
        trim: Option<Trim>,
    ) {
        let n_batches = group.len();
        tracing::error!(
            db = %self.db_path.display(),
            n_batches,
            error = %reason,
            "store commit failed; refusing all further writes until restart"
        );
        self.health.fail(reason.clone());
        let commit_error = || StoreError::Commit {
            path: self.db_path.clone(),
            n_batches,
            reason: reason.clone(),
        };
        for job in group {
            let _ = job.reply.send(Err(commit_error()));
        }
        for job in requests {
            let _ = job.reply.send(Err(commit_error()));
        }
        for trim in trim.into_iter().chain(self.trims.drain(..)) {
            trim.finish(Err(commit_error()));
        }
    }

    /// Writes the folds, every batch of the group (journaled or directly) and one trim
    /// piece: in one redb transaction, with the journal rows in its `journal` table when
    /// the store has no segment files (`file`); else the journal rows go to the segment
    /// file (written, and synced when `durable`) and redb's transaction is opened only
    /// when something else needs it. Returns each batch's outcome (a batch may be
    /// refused alone), what the folds did, whether redb's commit will be durable (None:
    /// no transaction), and the transaction for the caller to commit; or the error
    /// that failed them all (the pending state is then moot: the store stops writing, a
    /// restart replays).
    fn write_group(
        &self,
        pending: &mut Pending,
        mut file: Option<&mut JournalFile>,
        group: &mut [BatchJob],
        folds: &[Fold],
        trim: Option<&mut Trim>,
        durable: bool,
    ) -> Result<(Written, Option<redb::WriteTransaction>), redb::Error> {
        let direct = group
            .iter()
            .any(|job| !Pending::journals(job.batch.create.is_some(), &job.rows));
        // Under Durability::None a due sync needs redb's commit too.
        let needs_txn = file.is_none()
            || direct
            || !folds.is_empty()
            || trim.is_some()
            || group.iter().any(|job| job.snapshot.is_some())
            || (durable && self.sync_interval().is_some());
        // With segment files under Immediate every redb commit is durable, folds
        // included: a durable commit after many that were not writes all their pages
        // at once (130-180 ms at 20,000 ops/s, `benches/README.md`), and a segment is
        // deleted only once its folds are durable. Batches that are all journaled do
        // not wait for it (`commit_group`).
        let redb_durable = match (file.is_some(), self.sync_interval()) {
            (true, None) => true,
            _ => durable,
        };
        let mut txn = if needs_txn {
            Some(self.begin(redb_durable)?)
        } else {
            None
        };
        // Meta rows of rooms journaled without a write transaction, read once per commit.
        let mut meta_reader: Option<redb::ReadOnlyTable<&'static str, &'static [u8]>> = None;
        let mut report = FoldReport::default();
        let outcomes = {
            let mut tables = match txn.as_ref() {
                Some(txn) => Some(WriteTables::open(txn)?),
                None => None,
            };
            pending.begin_commit();
            if let Some(tables) = tables.as_mut() {
                for fold in folds {
                    report.fold(pending, tables, &fold.room, fold.at_most)?;
                }
            }
            let mut outcomes = Vec::with_capacity(group.len());
            for job in group.iter_mut() {
                let room = job.batch.room.as_str();
                let snapshot = job
                    .snapshot
                    .as_ref()
                    .map(|(seq, row)| (*seq, row.as_slice()));
                if Pending::journals(job.batch.create.is_some(), &job.rows) {
                    // The room's head once this batch is journaled (it has events).
                    let last = job.rows.first + job.rows.events - 1;
                    let outcome = match tables.as_mut() {
                        Some(tables) => {
                            let outcome = pending.journal(
                                |room| tables.stored_meta(room),
                                room,
                                &mut job.rows,
                                job.batch.expire_op_ids_through,
                                snapshot.map(|(seq, _)| seq),
                            )?;
                            if let (Ok(()), Some((seq, row))) = (&outcome, snapshot) {
                                tables.snapshots.insert((room, seq), row)?;
                            }
                            outcome
                        }
                        None => pending.journal(
                            |room| {
                                if meta_reader.is_none() {
                                    meta_reader = Some(self.meta_reader()?);
                                }
                                let meta = meta_reader.as_ref().expect("opened above");
                                tables::stored_meta_in(meta, room)
                            },
                            room,
                            &mut job.rows,
                            job.batch.expire_op_ids_through,
                            None,
                        )?,
                    };
                    if outcome.is_ok() {
                        match report.journaled.last_mut() {
                            Some((last_room, head)) if last_room == room => *head = last,
                            _ => report.journaled.push((room.to_owned(), last)),
                        }
                    }
                    outcomes.push(outcome);
                    continue;
                }
                let tables = tables
                    .as_mut()
                    .expect("a batch written directly opens the transaction");
                // Written directly: after the room's journaled batches.
                if pending.contains(room) {
                    report.fold(pending, tables, room, None)?;
                }
                outcomes.push(tables.apply(
                    &job.batch,
                    &job.rows,
                    job.creator.as_deref(),
                    snapshot,
                )?);
            }
            // After the batches, so a piece sees (and keeps) the heads they moved.
            if let Some(trim) = trim {
                let tables = tables.as_mut().expect("a trim piece opens the transaction");
                trim.piece(tables)?;
            }
            match (file.as_deref_mut(), tables.as_mut()) {
                (Some(file), _) => pending.end_commit(Sink::File(file))?,
                (None, Some(tables)) => pending.end_commit(Sink::Table(tables))?,
                (None, None) => unreachable!("a store without segment files opens the transaction"),
            }
            outcomes
        };
        drop(meta_reader);
        let mut redb_durable = txn.as_ref().map(|_| redb_durable);
        if let (Some(txn), Some(file)) = (txn.as_mut(), file.as_deref()) {
            // A segment whose batches this transaction folds is deleted after it, so
            // the transaction must be durable (`journal_file.rs`).
            if redb_durable == Some(false) && file.releasable(pending.min_unfolded()) {
                txn.set_durability(redb::Durability::Immediate)?;
                redb_durable = Some(true);
            }
        }
        let appending = Instant::now();
        if let Some(file) = file {
            file.flush(durable || redb_durable == Some(true))
                .map_err(redb::Error::Io)?;
        }
        let appending = appending.elapsed();
        Ok((
            Written {
                outcomes,
                report,
                direct,
                appending,
                redb_durable,
            },
            txn,
        ))
    }

    /// The `meta` table in a read transaction, for the gapless check of journaled
    /// batches in a commit that opens no write transaction.
    fn meta_reader(
        &self,
    ) -> Result<redb::ReadOnlyTable<&'static str, &'static [u8]>, redb::StorageError> {
        let db = self.db.as_ref().ok_or_else(|| {
            redb::StorageError::Io(std::io::Error::other("the database could not be reopened"))
        })?;
        let txn = db
            .begin_read()
            .map_err(|e| redb::StorageError::Io(std::io::Error::other(e.to_string())))?;
        txn.open_table(tables::META)
            .map_err(|e| redb::StorageError::Io(std::io::Error::other(e.to_string())))
    }

    /// Folds every pending room, in transactions bounded by the journal's policy,
    /// before the next job (a read of every room asked for it, or shutdown). Ends early
    /// only if a commit fails (fail-stop).
    fn fold_everything(&mut self) {
        self.folding_all = true;
        while !self.pending.is_empty() && self.health.failure().is_none() {
            self.commit_group(Vec::new());
        }
        self.folding_all = false;
    }

    /// Whether the test hook holds folds that are not asked for.
    fn folds_held(&self) -> bool {
        #[cfg(test)]
        if !self.folding_all && self.health.hold_folds.load(Ordering::Relaxed) {
            return true;
        }
        false
    }

    /// Probes the pages a fold of each room will touch; a damaged room is marked,
    /// dropped from the pending set with its journal rows kept, and not folded.
    fn probe_folds(&mut self, folds: Vec<Fold>) -> Vec<Fold> {
        let Some(db) = self.db.clone() else {
            return folds;
        };
        let mut probe = None;
        let mut kept = Vec::with_capacity(folds.len());
        for fold in folds {
            let room = &fold.room;
            let Some((first, last, expire_op_ids_through)) = self.pending.probe_keys(room) else {
                continue;
            };
            if probe.is_none() {
                // A read transaction that cannot begin is an I/O failure the write
                // meets too; it is reported there.
                probe = db.begin_read().ok().map(probe::BatchProbe::new);
            }
            let Some(reader) = probe.as_mut() else {
                kept.push(fold);
                continue;
            };
            let keys = probe::BatchKeys {
                room,
                creates: false,
                events: Some((first, last)),
                snapshot: None,
                expire_op_ids_through,
            };
            match reader.batch(&keys) {
                Ok(()) => kept.push(fold),
                Err(detail) => {
                    self.note_damage(room, &detail);
                    self.pending.abandon(room);
                    self.health
                        .publish(std::slice::from_ref(room), &[], &self.pending);
                    // Not reused after a panic inside it.
                    probe = None;
                }
            }
        }
        kept
    }

    /// Runs a deletion to its end, one piece per transaction, and answers it after the
    /// last piece committed. Trims of the room stop first.
    fn delete(&mut self, job: DeleteJob) {
        if let Some(reason) = self.health.failure() {
            let _ = job.reply.send(Err(self.fail_stopped(reason)));
            return;
        }
        let (cancelled, kept) = std::mem::take(&mut self.trims)
            .into_iter()
            .partition(|trim| trim.room() == job.room);
        self.trims = kept;
        for trim in cancelled {
            trim.finish(Ok(TrimOutcome::Cancelled));
        }
        self.trim_probed.remove(&job.room);
        if let Err(error) = self.probe_room(&job.room) {
            // Damaged: its journal rows stay with it (`journal.rs`).
            self.pending.abandon(&job.room);
            self.health
                .publish(std::slice::from_ref(&job.room), &[], &self.pending);
            let _ = job.reply.send(Err(error));
            return;
        }
        // Its journaled batches go unwritten: the deletion removes the room anyway, and
        // until its first piece commits a replay would still apply them to the room.
        // The room leaves the published set once the deletion is done, so a read in
        // between waits for it (its fold request queues behind) instead of reading a
        // room without its journaled events.
        self.pending.discard(&job.room);
        let mut deletion = Deletion::new(&job.room);
        // Each piece deletes rows or finishes, and the room's rows are finite, so this
        // ends; a room holds about history + snapshot interval events, a few pieces.
        loop {
            let result = guard::catch(|| {
                self.begin(false).and_then(|mut txn| {
                    {
                        let mut tables = WriteTables::open(&txn)?;
                        deletion.piece(&mut tables)?;
                    }
                    let durable = deletion.is_done() && self.answer_durably();
                    txn.set_durability(if durable {
                        redb::Durability::Immediate
                    } else {
                        redb::Durability::None
                    })?;
                    txn.commit()?;
                    Ok(durable)
                })
            })
            .map_err(WriteError::Panicked)
            .and_then(|result| result.map_err(WriteError::Redb));
            match result {
                Ok(durable) => {
                    self.committed(durable);
                    self.health.pieces.fetch_add(1, Ordering::Relaxed);
                    if deletion.is_done() {
                        if let Some(creator) = deletion.creator() {
                            self.health.count_deleted(creator);
                        }
                        self.health
                            .publish(std::slice::from_ref(&job.room), &[], &self.pending);
                        let _ = job.reply.send(Ok(()));
                        return;
                    }
                }
                Err(e) => {
                    let reason = e.to_string();
                    tracing::error!(
                        db = %self.db_path.display(),
                        room = %job.room,
                        error = %reason,
                        "store commit of a room deletion failed; refusing all further writes until restart"
                    );
                    self.health.fail(reason.clone());
                    let _ = job.reply.send(Err(StoreError::Commit {
                        path: self.db_path.clone(),
                        n_batches: 0,
                        reason,
                    }));
                    return;
                }
            }
        }
    }

    /// Writes an imported room in one durable transaction of its own and answers it.
    fn import(&mut self, job: super::transfer::ImportJob) {
        if let Some(reason) = self.health.failure() {
            let _ = job.reply.send(Err(self.fail_stopped(reason)));
            return;
        }
        let written = guard::catch(|| {
            let txn = self.begin(true)?;
            let outcome = {
                let mut tables = WriteTables::open(&txn)?;
                job.write(&mut tables)?
            };
            // A refused import writes nothing: the transaction is dropped unwritten.
            if outcome.is_ok() {
                txn.commit()?;
            }
            Ok::<_, redb::Error>(outcome)
        })
        .map_err(WriteError::Panicked)
        .and_then(|result| result.map_err(WriteError::Redb));
        match written {
            Ok(outcome) => {
                if outcome.is_ok() {
                    self.committed(true);
                }
                let _ = job.reply.send(outcome);
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::error!(
                    db = %self.db_path.display(),
                    room = %job.room,
                    error = %reason,
                    "store commit of a room import failed; refusing all further writes until restart"
                );
                self.health.fail(reason.clone());
                let _ = job.reply.send(Err(StoreError::Commit {
                    path: self.db_path.clone(),
                    n_batches: 0,
                    reason,
                }));
            }
        }
    }

    /// Begins a write transaction with the store's quick-repair setting.
    fn begin(&self, durable: bool) -> Result<redb::WriteTransaction, redb::Error> {
        let db = self.db.as_ref().ok_or_else(|| {
            redb::Error::Io(std::io::Error::other("the database could not be reopened"))
        })?;
        let mut txn = db.begin_write()?;
        txn.set_durability(if durable {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        })?;
        txn.set_quick_repair(self.quick_repair);
        Ok(txn)
    }

    /// Makes all earlier non-durable commits durable with an empty fsync'd commit.
    fn sync(&mut self) {
        if self.health.failure().is_some() {
            return;
        }
        let started = Instant::now();
        let result = guard::catch(|| self.begin(true).and_then(|txn| Ok(txn.commit()?)))
            .map_err(WriteError::Panicked)
            .and_then(|result| result.map_err(WriteError::Redb));
        let took = started.elapsed();
        if took >= SLOW_COMMIT {
            metrics::counter!(names::STORE_SLOW_COMMITS).increment(1);
            tracing::warn!(
                ms = took.as_millis() as u64,
                sync = true,
                "slow store commit"
            );
        }
        match result {
            Ok(()) => self.committed(true),
            Err(e) => {
                let reason = e.to_string();
                tracing::error!(
                    db = %self.db_path.display(),
                    error = %reason,
                    "store sync commit failed; refusing all further writes until restart"
                );
                self.health.fail(reason);
            }
        }
    }

    /// Answers, with `Damaged` and without writing, the batches of rooms known damaged
    /// or whose pages the probe cannot read; returns the others.
    fn probe_batches(&self, group: Vec<BatchJob>) -> Vec<BatchJob> {
        let Some(db) = self.db.as_ref() else {
            return group;
        };
        let mut probe = None;
        let mut kept = Vec::with_capacity(group.len());
        for job in group {
            let room = job.batch.room.as_str();
            if let Some(detail) = self.health.damage_of(room) {
                let _ = job.reply.send(Err(self.damaged(room, detail)));
                continue;
            }
            // A journaled batch of a pending room touches no page of the room at commit
            // (its fold probes them later), unless it carries a snapshot. The first one after a fold is probed like a
            // direct batch: the pages its fold will touch are the same, so damage is
            // found before the batch is acked, as before the journal.
            let journaled = Pending::journals(job.batch.create.is_some(), &job.rows);
            if journaled && job.snapshot.is_none() && self.pending.contains(room) {
                kept.push(job);
                continue;
            }
            if probe.is_none() {
                // A read transaction that cannot begin is an I/O failure the write
                // meets too; it is reported there.
                probe = db.begin_read().ok().map(probe::BatchProbe::new);
            }
            let Some(reader) = probe.as_mut() else {
                kept.push(job);
                continue;
            };
            let keys = probe::BatchKeys {
                room,
                creates: job.batch.create.is_some(),
                events: job
                    .rows
                    .rows
                    .first()
                    .zip(job.rows.rows.last())
                    .map(|(a, b)| (a.0, b.0)),
                snapshot: job.snapshot.as_ref().map(|(seq, _)| *seq),
                expire_op_ids_through: job.batch.expire_op_ids_through,
            };
            match reader.batch(&keys) {
                Ok(()) => kept.push(job),
                Err(detail) => {
                    self.note_damage(room, &detail);
                    let _ = job.reply.send(Err(self.damaged(room, detail)));
                    // Not reused after a panic inside it.
                    probe = None;
                }
            }
        }
        kept
    }

    /// Probes every row of `room` before maintenance touches it; `Err(Damaged)` (the
    /// room marked) when a page of it cannot be read.
    fn probe_room(&self, room: &str) -> Result<(), StoreError> {
        if let Some(detail) = self.health.damage_of(room) {
            return Err(self.damaged(room, detail));
        }
        let Some(db) = self.db.as_ref() else {
            return Ok(());
        };
        let Ok(txn) = db.begin_read() else {
            return Ok(());
        };
        probe::room(&txn, room).map_err(|detail| {
            self.note_damage(room, &detail);
            self.damaged(room, detail)
        })
    }

    fn note_damage(&self, room: &str, detail: &str) {
        note_damage(&self.health, &self.db_path, room, detail);
    }

    fn damaged(&self, room: &str, detail: String) -> StoreError {
        StoreError::Damaged {
            what: format!("room {room}"),
            path: self.db_path.clone(),
            detail,
        }
    }

    fn fail_stopped(&self, reason: String) -> StoreError {
        StoreError::FailStopped {
            path: self.db_path.clone(),
            reason,
        }
    }
}

/// What one group's write did: each batch's outcome, what the folds did, and how long
/// the journal segment's write took.
struct Written {
    outcomes: Vec<Result<(), StoreError>>,
    report: FoldReport,
    /// Whether a batch was written directly (not journaled).
    direct: bool,
    /// How long writing (and syncing) the journal segment took.
    appending: Duration,
    /// Whether redb's commit was durable; None when the commit wrote only journal
    /// segments.
    redb_durable: Option<bool>,
}

/// What the folds of one transaction did, applied to the published pending set once
/// it committed.
#[derive(Default)]
struct FoldReport {
    /// Rooms folded (whole or in part), or found damaged while folding: unpublished
    /// unless still or again pending, else published with their pending head.
    folded: Vec<String>,
    /// Rooms with batches journaled, each with the head its batches moved it to, in
    /// the order journaled (a room again later has a higher head): published so.
    journaled: Vec<(String, u64)>,
    /// Rooms whose stored rows refused their fold, with why.
    damaged: Vec<(String, String)>,
}

impl FoldReport {
    fn fold(
        &mut self,
        pending: &mut Pending,
        tables: &mut WriteTables,
        room: &str,
        at_most: Option<usize>,
    ) -> Result<(), redb::StorageError> {
        match pending.fold(tables, room, at_most)? {
            None => {}
            Some(Ok(())) => self.folded.push(room.to_owned()),
            Some(Err(error)) => {
                self.folded.push(room.to_owned());
                self.damaged.push((room.to_owned(), error.to_string()));
            }
        }
        Ok(())
    }
}

/// Why a write transaction did not commit.
enum WriteError {
    Redb(redb::Error),
    /// redb panicked inside the transaction (a damaged page the probe did not read). The
    /// transaction was dropped without its rollback, so redb marked the file as needing a
    /// repair at the next open.
    Panicked(String),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Redb(error) => write!(f, "{error}"),
            WriteError::Panicked(panic) => write!(
                f,
                "redb panicked inside the write transaction ({panic}); a page is damaged, \
                 and the next start repairs the file, which fails while the page is reachable"
            ),
        }
    }
}

/// Records `room` as damaged and logs it the first time.
pub fn note_damage(health: &Health, db_path: &std::path::Path, room: &str, detail: &str) {
    if health.mark_damaged(room, detail) {
        tracing::error!(
            room = %room,
            db = %db_path.display(),
            damage = %detail,
            "room is damaged: its rows cannot be read; it answers unavailable until the \
             data file is restored, and other rooms keep serving"
        );
    }
}
