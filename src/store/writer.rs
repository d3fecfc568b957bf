//! The one writer thread: group commit, the durability policy, and fail-stop.
//!
//! The writer blocks for the first queued batch, drains whatever else is queued (up to
//! [`MAX_GROUP_BATCHES`]), writes them all in one redb write transaction, commits once,
//! and then answers every batch in queue order. Under load this pays one fsync for many
//! batches from many rooms; redb allows only one write transaction at a time anyway.
//!
//! Under `Durability::None` commits skip the fsync, and an fsync'd commit follows the
//! first unsynced one within `sync_interval`: by piggybacking on the next group if one
//! arrives in time, or as an empty commit when the queue wait times out.
//!
//! A failed transaction is fail-stop: every batch in it gets an error, the store is
//! marked failed, and every later batch is refused without touching the disk until the
//! process restarts and rebuilds state from the log. Which batches exist and what they
//! hold is the Room's business; the table layout is `tables.rs`'s.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::tables::WriteTables;
use super::{Batch, Durability, StoreError};

/// The most batches one transaction takes, so one commit stays bounded in size and the
/// first batch of a long queue is not kept waiting for the last.
pub const MAX_GROUP_BATCHES: usize = 1024;

/// A queued batch and where its outcome goes once its transaction has committed.
pub struct Job {
    pub batch: Batch,
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

    fn fail(&self, reason: String) {
        self.failure.lock().get_or_insert(reason);
        self.failed.store(true, Ordering::Release);
    }
}

/// Clears `running` when the writer thread ends, however it ends.
struct RunningGuard<'a>(&'a Health);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
    }
}

/// The writer thread's state; it owns the receiving end of the queue.
pub struct Writer {
    pub db: Arc<redb::Database>,
    /// For error messages only.
    pub db_path: PathBuf,
    pub queue: Receiver<Job>,
    pub durability: Durability,
    pub health: Arc<Health>,
}

impl Writer {
    /// Marks the writer running; call on the spawning thread so `is_healthy` is true as
    /// soon as `Store::open` returns.
    pub fn mark_running(&self) {
        self.health.running.store(true, Ordering::Release);
    }

    /// Runs until the queue is closed and drained, then makes every commit durable.
    pub fn run(self) {
        let _running = RunningGuard(&self.health);
        // When the oldest commit not yet fsync'd happened; always None under Immediate.
        let mut unsynced_since: Option<Instant> = None;
        loop {
            let first = match (self.sync_interval(), unsynced_since) {
                (Some(interval), Some(since)) => {
                    let wait = (since + interval).saturating_duration_since(Instant::now());
                    match self.queue.recv_timeout(wait) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout) => {
                            self.sync(&mut unsynced_since);
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                _ => match self.queue.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            let mut group = vec![first];
            while group.len() < MAX_GROUP_BATCHES {
                match self.queue.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            self.commit_group(group, &mut unsynced_since);
        }
        // The queue is closed and everything in it committed; make it durable.
        if unsynced_since.is_some() {
            self.sync(&mut unsynced_since);
        }
    }

    fn sync_interval(&self) -> Option<Duration> {
        match self.durability {
            Durability::Immediate => None,
            Durability::None { sync_interval } => Some(sync_interval),
        }
    }

    fn commit_group(&self, group: Vec<Job>, unsynced_since: &mut Option<Instant>) {
        if let Some(reason) = self.health.failure() {
            for job in group {
                let _ = job.reply.send(Err(self.fail_stopped(reason.clone())));
            }
            return;
        }
        let durable = match self.sync_interval() {
            None => true,
            Some(interval) => unsynced_since.is_some_and(|since| since.elapsed() >= interval),
        };
        match self.write_group(&group, durable) {
            Ok(outcomes) => {
                self.health.commits.fetch_add(1, Ordering::Relaxed);
                if durable {
                    *unsynced_since = None;
                } else {
                    unsynced_since.get_or_insert_with(Instant::now);
                }
                // A dropped receiver means the room gave up waiting; nothing to tell it.
                for (job, outcome) in group.into_iter().zip(outcomes) {
                    let _ = job.reply.send(outcome);
                }
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::error!(
                    db = %self.db_path.display(),
                    n_batches = group.len(),
                    error = %reason,
                    "store commit failed; refusing all further writes until restart"
                );
                self.health.fail(reason.clone());
                let n_batches = group.len();
                for job in group {
                    let _ = job.reply.send(Err(StoreError::Commit {
                        path: self.db_path.clone(),
                        n_batches,
                        reason: reason.clone(),
                    }));
                }
            }
        }
    }

    /// Writes every batch of the group in one transaction and commits it. Returns each
    /// batch's outcome (a batch may be refused alone), or the error that failed them all.
    fn write_group(
        &self,
        group: &[Job],
        durable: bool,
    ) -> Result<Vec<Result<(), StoreError>>, redb::Error> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(if durable {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        })?;
        let outcomes = {
            let mut tables = WriteTables::open(&txn)?;
            let mut outcomes = Vec::with_capacity(group.len());
            for job in group {
                outcomes.push(tables.apply(&job.batch)?);
            }
            outcomes
        };
        txn.commit()?;
        Ok(outcomes)
    }

    /// Makes all earlier non-durable commits durable with an empty fsync'd commit.
    fn sync(&self, unsynced_since: &mut Option<Instant>) {
        if self.health.failure().is_some() {
            return;
        }
        let result = self
            .db
            .begin_write()
            .map_err(redb::Error::from)
            .and_then(|mut txn| {
                txn.set_durability(redb::Durability::Immediate)?;
                txn.commit()?;
                Ok(())
            });
        match result {
            Ok(()) => {
                self.health.commits.fetch_add(1, Ordering::Relaxed);
                *unsynced_since = None;
            }
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

    fn fail_stopped(&self, reason: String) -> StoreError {
        StoreError::FailStopped {
            path: self.db_path.clone(),
            reason,
        }
    }
}
