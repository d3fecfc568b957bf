//! The durable store: one redb database per data dir, written by one thread.
//!
//! Rooms hand the store one [`Batch`] per commit through [`Store::submit`], which never
//! blocks: the writer queue is bounded and a full queue is reported as
//! [`SubmitError::Full`], so the room nacks with `unavailable` instead of buffering. The
//! writer thread (`writer.rs`) commits queued batches from all rooms together (group
//! commit) and answers each batch only after its transaction committed, which is what
//! lets rooms log before they send. Reads ([`Store::load_room`]) block and run on
//! whatever thread calls them, never on an async worker.
//!
//! Codemap: `tables.rs` owns the table layout, `record.rs` the row bytes, `writer.rs`
//! the thread and durability policy, `lock.rs` and `format.rs` the data dir's lock and
//! format version, `error.rs` the error types.
//!
//! Architecture invariants:
//! - Only the writer thread writes to the database, in bounded transactions.
//! - A room's head seq and its events change in the same transaction; a batch that does
//!   not continue the stored head gaplessly is refused whole.
//! - After a failed commit the store writes nothing more until restart (fail-stop).
//! - Rows read from disk are decoded only through validated rkyv access, size first.
//!
//! Not here: deciding epochs, building room state from records, snapshots and trimming
//! (to come, through the same writer), and mapping errors to wire codes.

mod epochs;
mod error;
mod format;
mod lock;
mod record;
mod tables;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;

use crate::room::state::{Changes, Kind};
use crate::value::Value;

pub use error::{StoreError, SubmitError};
pub use format::FORMAT_VERSION;
pub use record::{RecordError, MAX_RECORD_BYTES};
pub use writer::MAX_GROUP_BATCHES;

use lock::DirLock;
use writer::{Health, Job, Writer};

/// The default redb cache size.
pub const DEFAULT_CACHE_BYTES: usize = 64 * 1024 * 1024;
/// The default writer queue bound, in batches.
pub const DEFAULT_QUEUE_LEN: usize = 4096;

/// Everything [`Store::open`] needs; built from the server's `Config`.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The data dir: holds `LOCK`, `FORMAT` and `roomd.redb`. Created if missing.
    pub data_dir: PathBuf,
    /// The redb page cache, in bytes (set explicitly, as redb's default is 1 GiB).
    pub cache_bytes: usize,
    /// How many batches may wait for the writer before `submit` reports `Full`.
    pub queue_len: usize,
    /// When a commit reaches the disk.
    pub durability: Durability,
}

impl StoreConfig {
    /// A config for `data_dir` with the default cache, queue bound and `Immediate`.
    pub fn new(data_dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            data_dir: data_dir.into(),
            cache_bytes: DEFAULT_CACHE_BYTES,
            queue_len: DEFAULT_QUEUE_LEN,
            durability: Durability::Immediate,
        }
    }
}

/// When a commit reaches the disk, and so what a crash can take back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Every commit is fsync'd before its batches are answered; a crash loses nothing
    /// that was acked.
    Immediate,
    /// Commits are not fsync'd; an fsync'd commit follows within `sync_interval`, which
    /// bounds what a crash (not a clean shutdown) can lose.
    None { sync_interval: Duration },
}

/// A room's fixed facts, written with its first event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomMeta {
    pub kind: Kind,
    /// Changes only when events clients may have seen are lost, or the room is deleted
    /// and recreated; decided by the caller, stored here.
    pub epoch: u64,
}

/// One event of a room's log, with its effect recorded so recovery needs no reducer.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub seq: u64,
    pub user: String,
    pub ts_ms: i64,
    pub op: Value,
    pub changes: Changes,
}

/// A client op id remembered for dedup, and the seq of the event it became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpIdRecord {
    pub user: String,
    pub op_id: String,
    pub seq: u64,
}

/// One room's appends for one commit. `create` is Some only for the batch holding event 1.
///
/// The events must continue the room's stored head without a gap (the first one is
/// head + 1), or the writer refuses the batch whole with [`StoreError::SeqGap`].
#[derive(Debug, Clone)]
pub struct Batch {
    pub room: String,
    pub create: Option<RoomMeta>,
    pub events: Vec<EventRecord>,
    /// Op ids to remember, written after `expire_op_ids` are removed.
    pub op_ids: Vec<OpIdRecord>,
    /// `(user, op_id)` pairs to forget.
    pub expire_op_ids: Vec<(String, String)>,
}

/// A room as stored: what recovery rebuilds its state from.
#[derive(Debug, Clone)]
pub struct LoadedRoom {
    pub meta: RoomMeta,
    pub head: u64,
    /// Every stored event, in seq order, gapless, the last one at `head`.
    pub events: Vec<EventRecord>,
    /// Sorted by seq.
    pub op_ids: Vec<OpIdRecord>,
}

/// The handle to the store; cheap to clone, shared by every room.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db_path: PathBuf,
    /// Read by `load_room`; written only by the writer thread.
    /// Taken at shutdown, so the database closes (and its file is marked clean) as
    /// soon as the writer and any read in progress let go of it.
    db: RwLock<Option<Arc<redb::Database>>>,
    /// The queue's sending end. `submit` holds the read lock while it sends; `shutdown`
    /// takes it out, which closes the queue once the writer has drained it.
    queue: RwLock<Option<SyncSender<Job>>>,
    /// Joined by `shutdown`; the mutex makes a concurrent second `shutdown` wait for it.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    health: Arc<Health>,
    /// XORed into every stored epoch; changes after an unclean stop under `none`
    /// (see `epochs.rs`).
    epoch_salt: u64,
    /// Dropped last, after the database is closed, so no other process opens the dir
    /// while this one still has the file.
    _lock: DirLock,
}

impl Store {
    /// Creates the dir if needed, takes an exclusive lock (flock on DIR/LOCK; a second
    /// instance fails with a clear StoreError naming the dir), checks/writes DIR/FORMAT
    /// (format version 1; a different version fails clearly), opens DIR/roomd.redb with
    /// the cache size set explicitly, and spawns the one writer thread.
    pub fn open(config: StoreConfig) -> Result<Store, StoreError> {
        let dir = config.data_dir.as_path();
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            what: "cannot create data dir",
            path: dir.to_owned(),
            source,
        })?;
        let lock = DirLock::acquire(dir)?;
        format::check_or_write(dir)?;
        let epoch_salt = epochs::open(dir, config.durability)?;
        let db_path = dir.join(format::DB_FILE);
        let db = redb::Builder::new()
            .set_cache_size(config.cache_bytes)
            .create(&db_path)
            .map_err(|source| StoreError::Open {
                path: db_path.clone(),
                source: Box::new(source),
            })?;
        let store = Store::start(db, db_path, lock, &config, epoch_salt)?;
        tracing::info!(data_dir = %dir.display(), durability = ?config.durability, "store open");
        Ok(store)
    }

    /// Creates missing tables and spawns the writer over an open database.
    fn start(
        db: redb::Database,
        db_path: PathBuf,
        lock: DirLock,
        config: &StoreConfig,
        epoch_salt: u64,
    ) -> Result<Store, StoreError> {
        let init_error = |source: redb::Error| StoreError::Init {
            path: db_path.clone(),
            source: Box::new(source),
        };
        let txn = db.begin_write().map_err(|e| init_error(e.into()))?;
        tables::create_all(&txn).map_err(|e| init_error(e.into()))?;
        txn.commit().map_err(|e| init_error(e.into()))?;

        let db = Arc::new(db);
        let health = Arc::new(Health::default());
        // Bounded: when it is full, submit returns Full and the room nacks `unavailable`.
        // A bound of 0 would make every non-blocking send fail, so it is at least 1.
        let (queue, queue_rx) = mpsc::sync_channel(config.queue_len.max(1));
        let writer = Writer {
            db: db.clone(),
            db_path: db_path.clone(),
            queue: queue_rx,
            durability: config.durability,
            health: health.clone(),
        };
        writer.mark_running();
        let handle = std::thread::Builder::new()
            .name("roomd-store-writer".to_owned())
            .spawn(move || writer.run())
            .map_err(|source| StoreError::Spawn { source })?;
        Ok(Store {
            inner: Arc::new(Inner {
                db_path,
                db: RwLock::new(Some(db)),
                queue: RwLock::new(Some(queue)),
                writer: Mutex::new(Some(handle)),
                health,
                epoch_salt,
                _lock: lock,
            }),
        })
    }

    /// Non-blocking: queues a batch for the writer (bounded; Full when the queue is full
    /// — caller nacks `unavailable`). The receiver resolves after the batch's transaction
    /// committed (Ok) or failed (Err). If the writer thread died without answering, the
    /// receiver reports the sender dropped; treat that as a failure too.
    pub fn submit(
        &self,
        batch: Batch,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, SubmitError> {
        let mut batch = batch;
        if let Some(meta) = batch.create.as_mut() {
            meta.epoch ^= self.inner.epoch_salt;
        }
        let (reply, outcome) = oneshot::channel();
        if let Some(reason) = self.inner.health.failure() {
            // Fail-stop: answer at once instead of queueing work that cannot commit.
            let _ = reply.send(Err(StoreError::FailStopped {
                path: self.inner.db_path.clone(),
                reason,
            }));
            return Ok(outcome);
        }
        let queue = self.inner.queue.read();
        let Some(queue) = queue.as_ref() else {
            return Err(SubmitError::Stopped);
        };
        match queue.try_send(Job { batch, reply }) {
            Ok(()) => Ok(outcome),
            Err(TrySendError::Full(_)) => Err(SubmitError::Full),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }

    /// Blocking read (callers run it off the async threads): the room's meta, head seq,
    /// every event record in seq order, and its op ids. Ok(None) if the room does not
    /// exist. Sees every batch whose receiver has resolved Ok.
    pub fn load_room(&self, room: &str) -> Result<Option<LoadedRoom>, StoreError> {
        let db = self
            .inner
            .db
            .read()
            .clone()
            .ok_or_else(|| StoreError::ShutDown {
                path: self.inner.db_path.clone(),
            })?;
        let mut loaded = tables::read_room(&db, &self.inner.db_path, room)?;
        if let Some(room) = loaded.as_mut() {
            room.meta.epoch ^= self.inner.epoch_salt;
        }
        Ok(loaded)
    }

    /// Blocking: true when the store is healthy (writer alive, last commit did not fail).
    pub fn is_healthy(&self) -> bool {
        self.inner.health.is_running() && self.inner.health.failure().is_none()
    }

    /// Committed write transactions so far, including the empty ones that only sync.
    pub fn commits(&self) -> u64 {
        self.inner.health.commits()
    }

    /// The data dir's database file, for messages.
    pub fn db_path(&self) -> &Path {
        &self.inner.db_path
    }

    /// Blocking: stops taking batches, commits everything queued, makes it durable (a
    /// final Immediate commit), and joins the writer thread. Idempotent.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

impl Inner {
    fn shutdown(&self) {
        // Dropping the only sender closes the queue: the writer drains what is queued,
        // syncs, and exits. Later submits see None and return Stopped.
        drop(self.queue.write().take());
        let mut writer = self.writer.lock();
        // The writer holds its own handle to the database until it exits.
        drop(self.db.write().take());
        if let Some(handle) = writer.take() {
            match handle.join() {
                // The writer's last commit was fsync'd: the run ended cleanly.
                Ok(()) if self.health.failure().is_none() => {
                    if let Some(dir) = self.db_path.parent() {
                        if let Err(e) = epochs::clean_shutdown(dir) {
                            tracing::error!(error = %e, "cannot record the clean shutdown");
                        }
                    }
                }
                Ok(()) => {}
                Err(_) => {
                    tracing::error!(db = %self.db_path.display(), "store writer thread panicked")
                }
            }
        }
    }
}

impl Drop for Inner {
    /// The last handle going away shuts the writer down cleanly, so queued batches are
    /// committed and synced even if nobody called `shutdown`.
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests;
