//! The durable store: one redb database per data dir, written by one thread.
//!
//! Rooms hand the store one [`Batch`] per commit through [`Store::submit`], which never
//! blocks: the writer queue is bounded and a full queue is reported as
//! [`SubmitError::Full`], so the room nacks with `unavailable` instead of buffering. The
//! writer thread (`writer.rs`) commits queued batches from all rooms together (group
//! commit) and answers each batch only after its transaction committed, which is what
//! lets rooms log before they send. A plain batch is committed to the journal, in
//! commit order, and folded into its room's rows later, many commits' worth at once
//! (`journal.rs`); reads of a room with journaled batches fold it first. Maintenance goes through the same queue and thread:
//! trimming ([`Store::submit_trim`]) in bounded pieces interleaved with batches, and room
//! deletion ([`Store::submit_delete`]) in bounded pieces, in queue order with batches.
//! Reads ([`Store::load_room`], [`Store::read_events`], [`Store::read_at`] and the
//! `roomd log` tooling) block and run on whatever thread calls them, never on an async
//! worker; the server runs them through [`Store::read_blocking`], at most
//! [`MAX_CONCURRENT_READS`] at a time. Once the writer has had no job for
//! [`StoreConfig::quiet_reopen`] and every commit is durable, it closes and reopens the
//! database (no read may hold it meanwhile), which empties redb's page cache.
//!
//! Codemap: `tables.rs` owns the table layout, batch writes and room loads, `record.rs`
//! the row bytes, `writer.rs` the thread, its jobs and the durability policy,
//! `committer.rs` the thread that commits a transaction beside the writer's next groups,
//! `journal.rs` the journal's pending batches, folds and replay, `journal_file.rs` its
//! segment files,
//! `retention.rs` the trimming and deletion pieces, `reads.rs` the HTTP reads,
//! `tools.rs` listing, verifying and compacting for `roomd log`, `transfer.rs` a
//! room's export and import when it moves to another node, `checksums.rs` the page
//! checksum check `verify` runs on a copy-on-write view of the file, `listing.rs` the
//! admin room list, `lock.rs` and
//! `format.rs` the data dir's lock and format version, `epochs.rs` the epoch salt,
//! `error.rs` the error types.
//!
//! Architecture invariants:
//! - Only the writer thread writes to the database, in bounded transactions (at most
//!   [`MAX_GROUP_BATCHES`] batches plus [`MAX_PIECE_ROWS`] rows of maintenance); the
//!   committer thread only commits one the writer filled and handed it, one at a time.
//! - A room's head seq and its events change in the same transaction: in the journal
//!   (an entry holds a batch's events and says where they start), then moved together
//!   into `events` and `meta` by a fold. A batch that does not continue the room's head
//!   (its pending head when it has journaled batches) gaplessly is refused whole.
//! - Every batch answered Ok is in the rows or in the journal; an open replays the
//!   journal before the writer takes a job, and reads see a room's journaled batches
//!   (the writer folds the room for them first).
//! - A room's first retained seq moves in the same transaction as the trimming that
//!   deletes the events before it, and never past a stored snapshot: events
//!   `first_retained..=head` are always stored, and when `first_retained > 1` a snapshot
//!   at or after `first_retained - 1` is too, so the room always loads.
//! - Trimming keeps the op ids the room still dedups against (`TrimPolicy::
//!   keep_op_ids_from`), moving them from the trimmed rows to the `op_ids` table in the
//!   same transaction; deletion removes everything of the room.
//! - After a failed commit (or a failed quiet reopen) the store writes nothing more
//!   until restart (fail-stop).
//! - Rows read from disk are decoded only through validated rkyv access, size first.
//!
//! Not here: deciding epochs, when to snapshot or trim, building room state from
//! records, and mapping errors to wire codes.

mod checksums;
mod committer;
mod epochs;
mod error;
mod format;
mod guard;
mod journal;
mod journal_file;
mod listing;
mod lock;
mod probe;
mod reads;
mod record;
mod retention;
mod tables;
mod tools;
mod transfer;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;

use crate::kind::{Changes, Slot};
use crate::value::Value;

pub use error::{StoreError, SubmitError};
pub use format::FORMAT_VERSION;
pub use reads::MAX_PAGE_EVENTS;
/// A log row of consecutive events as the store writes it (one per room batch; rooms
/// encode their events in `submit`); public for the per-op benchmark
/// (`benches/ingest_op.rs`).
pub use record::encode_log_row;
pub use record::{RecordError, MAX_RECORD_BYTES, MAX_SNAPSHOT_BYTES};
/// The storage under redb, for [`Store::open_with_backend`].
pub use redb::StorageBackend;
pub use retention::{MAX_PENDING_TRIMS, MAX_PIECE_ROWS};
pub use tools::{Problem, ProblemKind, MAX_PROBLEMS};
pub use transfer::{ExportError, RoomExport, MAX_EXPORT_BYTES};
pub use writer::MAX_GROUP_BATCHES;

use lock::DirLock;
use writer::{BatchJob, DbSlot, DeleteJob, FoldJob, Health, Job, TrimJob, Writer};

/// Whether write transactions save redb's allocator state ("quick repair"), so a
/// reopen after a crash needs no full repair. Measured with redb 4.6 on this project's
/// dev VM (virtio disk, 8 events per commit, Immediate durability, 3,000 commits each,
/// interleaved on one database):
///
/// | database | commit p50 / p99, off | commit p50 / p99, on |
/// |----------|-----------------------|----------------------|
/// | 64 MB    | 4.0 / 9.9 ms          | 8.0 / 16.0 ms        |
/// | 512 MB   | 4.2 / 16.4 ms         | 11.8 / 24.8 ms       |
///
/// | database | open after kill -9, off | open after kill -9, on |
/// |----------|-------------------------|------------------------|
/// | 64 MB    | 254 - 420 ms            | 1.2 - 1.5 ms           |
/// | 512 MB   | 3,068 - 3,320 ms        | 4.8 - 22 ms            |
///
/// Quick repair costs one more fsync per durable commit (two-phase commit), about 4-7 ms
/// of ack latency, which group commit amortizes under load; without it the restart
/// after a crash does a full repair that grows with the file (about 6 ms per MB here,
/// so a minute for 10 GB) while every room is down. Recovery time is what a crash-safe
/// room server is for, so it is on. Under `--durability none` only the periodic
/// fsync'd commits pay it.
pub const QUICK_REPAIR: bool = true;

/// Most blocking store reads (room loads, history and time-travel requests) running at
/// once; more wait. Reads mostly hit redb's cache, so a few threads keep 2 cores busy.
pub const MAX_CONCURRENT_READS: usize = 16;

/// The default redb cache size.
pub const DEFAULT_CACHE_BYTES: usize = 64 * 1024 * 1024;
/// The default [`StoreConfig::quiet_reopen`].
pub const DEFAULT_QUIET_REOPEN: Duration = Duration::from_secs(5);
/// How long a read that needs a fold retries a full writer queue before it answers
/// [`StoreError::Busy`] (see `Store::ensure_folded`).
pub const FOLD_QUEUE_WAIT: Duration = Duration::from_secs(1);

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
    /// How long the writer waits without a job before it closes and reopens the
    /// database, which empties redb's page cache (redb has no call to drop it), and
    /// hands its freed memory back to the OS. `None` does neither.
    pub quiet_reopen: Option<Duration>,
}

impl StoreConfig {
    /// A config for `data_dir` with the default cache, queue bound and `Immediate`.
    pub fn new(data_dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            data_dir: data_dir.into(),
            cache_bytes: DEFAULT_CACHE_BYTES,
            queue_len: DEFAULT_QUEUE_LEN,
            durability: Durability::Immediate,
            quiet_reopen: Some(DEFAULT_QUIET_REOPEN),
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomMeta {
    /// The name of the room's kind ([`crate::kind::RoomKind::name`]).
    pub kind: String,
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
    /// The client's id for the op, when it carried one: stored in the event's row, so
    /// dedup survives restarts without a row of its own.
    pub op_id: Option<String>,
}

/// A client op id remembered for dedup, and the seq of the event it became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpIdRecord {
    pub user: String,
    pub op_id: String,
    pub seq: u64,
}

/// A room's full state at `seq`, public entries with tombstones, for fast recovery and
/// time travel.
///
/// Keys of `public` and of `private` are strictly ascending (as a `BTreeMap` iterates
/// them), every slot's `ver` and the `tombstone_floor` are at most `seq`; the store
/// refuses to write or read a snapshot that breaks this.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub seq: u64,
    pub public: Vec<(String, Slot)>,
    pub private: Vec<(String, Value)>,
    pub tombstone_floor: u64,
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
    /// Forget the op ids of trimmed events up to this seq (0: forget none). Op ids of
    /// retained events live in their rows and go with them.
    pub expire_op_ids_through: u64,
    /// The room's state at some seq from 1 up to the batch's last event (the stored head
    /// when the batch has no events), written in the batch's transaction; a seq outside
    /// that range refuses the batch whole ([`StoreError::SnapshotSeq`]). `submit` encodes
    /// it on the caller's thread; one that cannot be encoded (too large for
    /// [`MAX_SNAPSHOT_BYTES`], keys out of order, a non-finite float) is logged and
    /// dropped while the rest of the batch is written: a missing snapshot only delays
    /// trimming, and retention never trims past a snapshot that is stored.
    pub snapshot: Option<Snapshot>,
}

impl Batch {
    /// An empty batch for `room`: no create, events, op ids or snapshot. Fill it with
    /// struct update syntax: `Batch { events, ..Batch::new(room) }`.
    pub fn new(room: impl Into<String>) -> Batch {
        Batch {
            room: room.into(),
            create: None,
            events: Vec::new(),
            expire_op_ids_through: 0,
            snapshot: None,
        }
    }
}

/// A room as stored: what recovery rebuilds its state from.
#[derive(Debug, Clone)]
pub struct LoadedRoom {
    pub meta: RoomMeta,
    pub head: u64,
    /// The oldest seq whose event is stored; 1 until the room is first trimmed.
    pub first_retained: u64,
    /// The newest stored snapshot; `None` only while the log still starts at seq 1.
    pub snapshot: Option<Snapshot>,
    /// The events after the snapshot (every event without one), in seq order, gapless
    /// from the snapshot's seq + 1 (from 1) up to `head`.
    pub events: Vec<EventRecord>,
    /// The op ids kept for trimmed events, those of the events after the snapshot, and
    /// those of the newest retained events before it (up to
    /// `MAX_LOADED_OP_IDS`, 11,000, in all), sorted by seq.
    pub op_ids: Vec<OpIdRecord>,
}

/// One page of a room's retained events, for the HTTP event history.
#[derive(Debug, Clone, PartialEq)]
pub struct EventsPage {
    pub head: u64,
    /// Events before this seq were trimmed: a reader asking for `after + 1 <
    /// first_retained` has lost events (the caller answers `gone`).
    pub first_retained: u64,
    /// The retained events after `after`, in seq order, gapless, at most the limit.
    pub events: Vec<EventRecord>,
}

/// What rebuilds a room's state at one seq, for time travel: `snapshot` (if any) with
/// `events` applied on top, in order.
///
/// - `seq > head`: nothing is read; `snapshot` is `None` and `events` empty. The caller
///   checks `seq > head` first (`invalid`).
/// - Rebuildable ([`AtSeq::can_rebuild`]): the newest snapshot at or before `seq` whose
///   following events are retained, with the events (snapshot.seq, seq]; or, when none
///   is usable and the log still starts at 1, no snapshot and events 1..=seq.
/// - Not rebuildable: `snapshot` is `None`, `events` empty and `first_retained > 1`
///   (the caller answers `gone`).
#[derive(Debug, Clone, PartialEq)]
pub struct AtSeq {
    pub meta: RoomMeta,
    pub head: u64,
    pub first_retained: u64,
    pub snapshot: Option<Snapshot>,
    pub events: Vec<EventRecord>,
}

impl AtSeq {
    /// True when `snapshot` plus `events` rebuild the state at a seq up to `head`: there
    /// is a snapshot, or the log still starts at seq 1.
    pub fn can_rebuild(&self) -> bool {
        self.snapshot.is_some() || self.first_retained <= 1
    }
}

/// What the store holds for one room, for `roomd log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomInfo {
    pub room: String,
    pub kind: String,
    pub epoch: u64,
    pub head: u64,
    pub first_retained: u64,
    /// Stored events (a row holds one room batch's).
    pub events: u64,
    /// The sum of the stored event rows' sizes, in bytes.
    pub bytes: u64,
    /// Stored snapshot rows.
    pub snapshots: u64,
    /// Set when the room's rows could not all be read (a damaged page): what was found.
    /// The counts then hold what was read before it.
    pub damage: Option<String>,
}

/// One room of the admin room list ([`Store::rooms_page`]).
#[derive(Debug, Clone)]
pub struct ListedRoom {
    pub room: String,
    pub kind: String,
    pub epoch: u64,
    /// Seq of the last committed event.
    pub head: u64,
}

/// What one trim may delete. An event is due when it is not among the newest
/// `history_events` events, or (with an age limit) when it and every retained event
/// before it are stamped before `older_than_ms`; the trim deletes the due events up to
/// the newest stored snapshot among them. Whichever limit reaches further wins: each
/// alone is a floor on what stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrimPolicy {
    /// The newest this many events are kept whatever their age.
    pub history_events: u64,
    /// Events with `ts_ms` below this (ms since the Unix epoch) are old enough to go;
    /// None means no age limit. The caller reads the clock, so the store never does.
    pub older_than_ms: Option<i64>,
    /// Op ids live in their events' rows; a trimmed event with a seq at or above this
    /// keeps its op id in the `op_ids` table (the caller still dedups against it).
    /// 0 keeps every trimmed event's id; `u64::MAX` none.
    pub keep_op_ids_from: u64,
}

impl TrimPolicy {
    /// The count limit alone: keep at least the last `history_events` events, and the
    /// op id of every trimmed event.
    pub fn history_events(history_events: u64) -> TrimPolicy {
        TrimPolicy {
            history_events,
            older_than_ms: None,
            keep_op_ids_from: 0,
        }
    }
}

/// How the trimming of one room ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrimOutcome {
    /// The trim ran to its end; all counts zero means nothing was due.
    Done(TrimReport),
    /// A trim of this room was already running; that one carries on, this one did nothing.
    AlreadyRunning,
    /// The room does not exist, was deleted while trimming, or the store shut down
    /// first; what the trim had deleted stays deleted.
    Cancelled,
}

/// What one finished trim did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrimReport {
    /// The room's first retained seq afterwards.
    pub first_retained: u64,
    pub events_deleted: u64,
    pub snapshots_deleted: u64,
    /// The write transactions in which the trim scanned or deleted rows.
    pub pieces: u64,
}

/// The sizes of the database file around an offline [`Store::compact`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactReport {
    pub before_bytes: u64,
    pub after_bytes: u64,
}

/// The handle to the store; cheap to clone, shared by every room.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db_path: PathBuf,
    /// Read by `load_room`; swapped by the writer thread when it reopens the database.
    /// Taken at shutdown, so the database closes (and its file is marked clean) as
    /// soon as the writer and any read in progress let go of it.
    db: Arc<DbSlot>,
    /// The queue's sending end. `submit` holds the read lock while it sends; `shutdown`
    /// takes it out, which closes the queue once the writer has drained it.
    queue: RwLock<Option<SyncSender<Job>>>,
    /// Joined by `shutdown`; the mutex makes a concurrent second `shutdown` wait for it.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    health: Arc<Health>,
    /// Permits for blocking reads run through [`Store::read_blocking`]: at most
    /// [`MAX_CONCURRENT_READS`] at a time, the rest wait their turn (FIFO).
    reads: Arc<tokio::sync::Semaphore>,
    /// XORed into every stored epoch; changes after an unclean stop under `none`
    /// (see `epochs.rs`).
    epoch_salt: u64,
    /// Dropped last, after the database is closed, so no other process opens the dir
    /// while this one still has the file. None for a store over a backend
    /// ([`Store::open_with_backend`]), which has no data dir.
    lock: Option<DirLock>,
}

impl Store {
    /// Creates the dir if needed, takes an exclusive lock (flock on DIR/LOCK; a second
    /// instance fails with a clear StoreError naming the dir), checks/writes DIR/FORMAT
    /// ([`FORMAT_VERSION`]; a version 2, 3 or 4 dir is read and upgraded, any other fails
    /// clearly), opens DIR/roomd.redb with the cache size set explicitly, finishes any
    /// room deletion a crash interrupted, replays the journal (the batches acked but not
    /// yet folded into their rooms' rows when the last run stopped), and spawns the one
    /// writer thread.
    ///
    /// `roomd log` opens the store this way too: a running server holds the lock, so
    /// the tool fails clearly instead of reading a log that is being written.
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
        // redb panics on some damaged pages instead of returning an error; the guard
        // turns that into an error naming the file.
        let damaged = |detail| StoreError::Damaged {
            what: "the database".to_owned(),
            path: db_path.clone(),
            detail,
        };
        let db =
            guard::catch(|| open_database(&db_path, config.cache_bytes)).map_err(damaged)??;
        let store = guard::catch(|| {
            let journal_dir = dir.join(journal_file::DIR);
            Store::start(
                db,
                db_path.clone(),
                Some(lock),
                Some(journal_dir),
                &config,
                epoch_salt,
            )
        })
        .map_err(damaged)??;
        tracing::info!(data_dir = %dir.display(), durability = ?config.durability, "store open");
        Ok(store)
    }

    /// Creates missing tables, finishes interrupted deletions, replays the journal and
    /// spawns the writer over an open database. `journal_dir` holds the journal's
    /// segment files (None: journal rows go to the `journal` table, for a store over a
    /// backend).
    fn start(
        db: redb::Database,
        db_path: PathBuf,
        lock: Option<DirLock>,
        journal_dir: Option<PathBuf>,
        config: &StoreConfig,
        epoch_salt: u64,
    ) -> Result<Store, StoreError> {
        let init_error = |source: redb::Error| StoreError::Init {
            path: db_path.clone(),
            source: Box::new(source),
        };
        let mut txn = db.begin_write().map_err(|e| init_error(e.into()))?;
        txn.set_quick_repair(QUICK_REPAIR);
        tables::create_all(&txn).map_err(|e| init_error(e.into()))?;
        txn.commit().map_err(|e| init_error(e.into()))?;
        retention::finish_deletions(&db, QUICK_REPAIR).map_err(init_error)?;
        let (journal_key, journal_file) =
            journal::replay(&db, &db_path, journal_dir.as_deref(), QUICK_REPAIR)?;

        // The counts only bound rooms per user: a damaged `creators` table costs that
        // bound (logged), not the rooms.
        let counts = match guard::catch(|| tables::count_creators(&db)) {
            Ok(Ok(counts)) => counts,
            Ok(Err(error)) if error::redb_corruption(&error).is_none() => {
                return Err(init_error(error))
            }
            Ok(Err(error)) => {
                tracing::error!(db = %db_path.display(), %error, "cannot count rooms per creator; the limit on rooms per user starts from zero");
                Default::default()
            }
            Err(panic) => {
                tracing::error!(db = %db_path.display(), error = %panic, "cannot count rooms per creator, a page is damaged; the limit on rooms per user starts from zero");
                Default::default()
            }
        };
        let db = Arc::new(db);
        let slot = Arc::new(RwLock::new(Some(db.clone())));
        let health = Arc::new(Health::default());
        health.set_rooms_by_creator(counts);
        // Bounded: when it is full, submit returns Full and the room nacks `unavailable`.
        // A bound of 0 would make every non-blocking send fail, so it is at least 1.
        let (queue, queue_rx) = mpsc::sync_channel(config.queue_len.max(1));
        let writer = Writer::new(
            writer::Opened {
                db,
                slot: slot.clone(),
                journal_key,
                journal_file,
                cache_bytes: config.cache_bytes,
                quiet_reopen: config.quiet_reopen,
            },
            db_path.clone(),
            queue_rx,
            config.durability,
            health.clone(),
            QUICK_REPAIR,
        );
        writer.mark_running();
        let handle = std::thread::Builder::new()
            .name("roomd-store-writer".to_owned())
            .spawn(move || writer.run())
            .map_err(|source| StoreError::Spawn { source })?;
        Ok(Store {
            inner: Arc::new(Inner {
                db_path,
                db: slot,
                queue: RwLock::new(Some(queue)),
                writer: Mutex::new(Some(handle)),
                health,
                reads: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_READS)),
                epoch_salt,
                lock,
            }),
        })
    }

    /// Opens a store over `backend` instead of a data dir: no lock, no FORMAT file, no
    /// epoch salt (stored epochs are returned as written), no quiet reopen. For the fuzz
    /// target and tests that put faults under redb (`fuzz/checks.rs`,
    /// `check_store_faults`); the server always uses [`Store::open`].
    pub fn open_with_backend(
        backend: impl StorageBackend,
        durability: Durability,
    ) -> Result<Store, StoreError> {
        let db_path = PathBuf::from("(in-memory backend)");
        let damaged = |detail| StoreError::Damaged {
            what: "the database".to_owned(),
            path: db_path.clone(),
            detail,
        };
        let config = StoreConfig {
            durability,
            quiet_reopen: None,
            ..StoreConfig::new("(in-memory backend)")
        };
        let db = guard::catch(|| {
            redb::Builder::new()
                .set_cache_size(config.cache_bytes)
                .create_with_backend(backend)
                .map_err(|source| StoreError::Open {
                    path: db_path.clone(),
                    source: Box::new(source),
                })
        })
        .map_err(damaged)??;
        guard::catch(|| Store::start(db, db_path.clone(), None, None, &config, 0))
            .map_err(damaged)?
    }

    /// Non-blocking: queues a batch for the writer (bounded; Full when the queue is full
    /// — caller nacks `unavailable`). The receiver resolves after the batch's transaction
    /// committed (Ok) or failed (Err). If the writer thread died without answering, the
    /// receiver reports the sender dropped; treat that as a failure too.
    ///
    /// The batch's events and snapshot are encoded here, on the caller's thread, so the
    /// one writer thread only copies their bytes. Events that cannot be encoded (a row
    /// over [`MAX_RECORD_BYTES`], a non-finite float) or that
    /// do not run gaplessly refuse the batch whole: the receiver resolves to that error
    /// at once and the writer never sees the batch.
    pub fn submit(
        &self,
        batch: Batch,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, SubmitError> {
        let mut batch = batch;
        if let Some(meta) = batch.create.as_mut() {
            meta.epoch ^= self.inner.epoch_salt;
        }
        let snapshot =
            batch
                .snapshot
                .take()
                .and_then(|snapshot| match record::encode_snapshot(&snapshot) {
                    Ok(row) => Some((snapshot.seq, row)),
                    Err(error) => {
                        tracing::error!(
                            room = %batch.room,
                            seq = snapshot.seq,
                            %error,
                            "cannot encode snapshot; writing the batch without it"
                        );
                        None
                    }
                });
        let (reply, outcome) = oneshot::channel();
        // The events are encoded and dropped here, off the writer thread. A batch whose
        // events cannot be encoded is refused whole without reaching the writer.
        let rows = match tables::encode_events(&batch.room, &batch.events) {
            Ok(rows) => rows,
            Err(refusal) => {
                // The receiver is returned below, so it is still there to take this.
                let _ = reply.send(Err(refusal));
                return Ok(outcome);
            }
        };
        let creator = batch
            .create
            .as_ref()
            .and(batch.events.first())
            .map(|event| event.user.clone());
        batch.events = Vec::new();
        self.send(Job::Batch(BatchJob {
            batch,
            rows,
            creator,
            snapshot,
            reply,
        }))?;
        Ok(outcome)
    }

    /// Non-blocking: queues a trim of `room` by `policy`. With head H, the events due
    /// are those up to H - history_events and, with an age limit, the run of events
    /// after them stamped before `older_than_ms`. `base` is the newest snapshot seq
    /// among the due events; events up to `base` and snapshots before it are deleted,
    /// in pieces of at most [`MAX_PIECE_ROWS`] rows per transaction interleaved with
    /// batch commits, and the first retained seq becomes base + 1. The op ids of deleted
    /// events from `keep_op_ids_from` on move to the `op_ids` table in the same
    /// transaction. With no such snapshot there is nothing to do.
    ///
    /// The age run is found by reading events oldest first, no further than the newest
    /// snapshot, and ends at the first event not old enough, so the log stays gapless
    /// even where timestamps are out of seq order; those reads count against the piece
    /// bound like deletions.
    ///
    /// At most [`MAX_PENDING_TRIMS`] trims are queued or running at once; beyond that,
    /// or when the writer queue is full, this returns Full and the room retries later.
    /// The receiver resolves when the trim ends; a room may drop it.
    pub fn submit_trim(
        &self,
        room: &str,
        policy: TrimPolicy,
    ) -> Result<oneshot::Receiver<Result<TrimOutcome, StoreError>>, SubmitError> {
        let slot = self
            .inner
            .health
            .take_trim_slot()
            .ok_or(SubmitError::Full)?;
        let (reply, outcome) = oneshot::channel();
        self.send(Job::Trim(TrimJob {
            room: room.to_owned(),
            policy,
            reply,
            _slot: slot,
        }))?;
        Ok(outcome)
    }

    /// Non-blocking: queues the deletion of `room`: its meta, events, snapshots and op
    /// ids. It runs in queue order with batches (batches queued before it commit first;
    /// batches after it find the room absent), in pieces of at most [`MAX_PIECE_ROWS`]
    /// rows, back to back before the writer takes its next job; the receiver resolves
    /// after the last piece committed. Deleting an absent room is Ok. A room created
    /// later under the same name starts at head 0; its epoch is the caller's choice and
    /// gets the data dir's epoch salt like any other.
    ///
    /// The first piece removes the meta row and marks the room as being deleted, in one
    /// transaction, so a crash midway leaves an absent room whose leftovers the next
    /// `open` removes before taking any batch.
    pub fn submit_delete(
        &self,
        room: &str,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, SubmitError> {
        let (reply, outcome) = oneshot::channel();
        self.send(Job::Delete(DeleteJob {
            room: room.to_owned(),
            reply,
        }))?;
        Ok(outcome)
    }

    /// Queues `job`, or answers it at once with the fail-stop error.
    fn send(&self, job: Job) -> Result<(), SubmitError> {
        if let Some(detail) = self.inner.health.damage_of(job.room()) {
            // The room's pages cannot be read: nothing of it is written again.
            let error = self.damaged(job.room(), detail);
            job.fail(error);
            return Ok(());
        }
        if let Some(reason) = self.inner.health.failure() {
            // Fail-stop: answer at once instead of queueing work that cannot commit.
            job.fail(StoreError::FailStopped {
                path: self.inner.db_path.clone(),
                reason,
            });
            return Ok(());
        }
        let queue = self.inner.queue.read();
        let Some(queue) = queue.as_ref() else {
            return Err(SubmitError::Stopped);
        };
        match queue.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(SubmitError::Full),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }

    /// Runs a blocking read (`load_room`, `read_events`, ...) on tokio's blocking
    /// threads, at most [`MAX_CONCURRENT_READS`] at a time across the process. Without
    /// the bound, a burst of room loads started one thread each (about 400 while 100,000
    /// rooms were created), and each thread's allocations outlived it as fragmentation.
    /// Err only if `read` panicked.
    pub async fn read_blocking<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Store) -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        // The semaphore is never closed, so acquiring only fails if it was; then the
        // read runs unbounded rather than not at all.
        let permit = self.inner.reads.clone().acquire_owned().await.ok();
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let value = read(&store);
            drop(permit);
            value
        })
        .await
    }

    /// The open database, for a blocking read.
    /// None in the slot is a shutdown, or a failed quiet reopen (then reads report the
    /// failure, as writes do).
    fn db(&self) -> Result<Arc<redb::Database>, StoreError> {
        self.inner.db.read().clone().ok_or_else(|| {
            let path = self.inner.db_path.clone();
            match self.inner.health.failure() {
                Some(reason) => StoreError::FailStopped { path, reason },
                None => StoreError::ShutDown { path },
            }
        })
    }

    /// Blocking read (callers run it off the async threads): the room's meta, head seq,
    /// first retained seq, newest snapshot, the events after it (all events when there
    /// is none) in seq order, and its op ids. Ok(None) if the room does not exist. Sees
    /// every batch whose receiver has resolved Ok.
    pub fn load_room(&self, room: &str) -> Result<Option<LoadedRoom>, StoreError> {
        self.ensure_folded(Some(room))?;
        let path = &self.inner.db_path;
        let mut loaded = self.guarded_read(room, |db| tables::read_room(db, path, room))?;
        if let Some(room) = loaded.as_mut() {
            room.meta.epoch ^= self.inner.epoch_salt;
        }
        Ok(loaded)
    }

    /// Blocking: the retained events after `after`, at most `min(limit,
    /// MAX_PAGE_EVENTS)` of them, with the head and first retained seq. Ok(None) if the
    /// room does not exist. When `after + 1 < first_retained` the events start at
    /// `first_retained`; the caller answers `gone`.
    pub fn read_events(
        &self,
        room: &str,
        after: u64,
        limit: usize,
    ) -> Result<Option<EventsPage>, StoreError> {
        self.ensure_folded(Some(room))?;
        let path = &self.inner.db_path;
        self.guarded_read(room, |db| reads::read_events(db, path, room, after, limit))
    }

    /// Blocking: what rebuilds the room's state at `seq` (see [`AtSeq`] for the three
    /// cases). Ok(None) if the room does not exist.
    pub fn read_at(&self, room: &str, seq: u64) -> Result<Option<AtSeq>, StoreError> {
        self.ensure_folded(Some(room))?;
        let path = &self.inner.db_path;
        let mut at = self.guarded_read(room, |db| reads::read_at(db, path, room, seq))?;
        if let Some(at) = at.as_mut() {
            at.meta.epoch ^= self.inner.epoch_salt;
        }
        Ok(at)
    }

    /// Blocking: every stored snapshot of `room`, oldest first (empty for an absent
    /// room). Each holds a whole room, so this is for `roomd log verify`, not serving.
    pub fn room_snapshots(&self, room: &str) -> Result<Vec<Snapshot>, StoreError> {
        self.ensure_folded(Some(room))?;
        let path = &self.inner.db_path;
        self.guarded_read(room, |db| reads::room_snapshots(db, path, room))
    }

    /// Blocking: when `room` (None: any room) has journaled batches not yet folded into
    /// its rows, asks the writer to fold them and waits until that committed, so the
    /// read that follows sees every batch answered before it was called. Reads of
    /// rooms with nothing pending (nearly all) only look the room up in memory.
    ///
    /// A full writer queue is retried for [`FOLD_QUEUE_WAIT`], then answered
    /// [`StoreError::Busy`], which callers answer `unavailable` like any store failure
    /// of a read: a read must not see the room without its acked events, and blocking
    /// without bound would hold a read permit while the writer is behind. After a
    /// failed commit a room with journaled batches answers the failure (its batches
    /// are in the journal, and the restart replays them).
    fn ensure_folded(&self, room: Option<&str>) -> Result<(), StoreError> {
        let health = &self.inner.health;
        let needed = match room {
            Some(room) => health.is_journaled(room),
            None => health.any_journaled(),
        };
        if !needed {
            return Ok(());
        }
        let (reply, answer) = mpsc::sync_channel(1);
        let mut job = Job::Fold(FoldJob {
            room: room.map(str::to_owned),
            reply,
        });
        let started = std::time::Instant::now();
        loop {
            if let Some(reason) = health.failure() {
                return Err(StoreError::FailStopped {
                    path: self.inner.db_path.clone(),
                    reason,
                });
            }
            let queue = self.inner.queue.read();
            let Some(sender) = queue.as_ref() else {
                return Err(StoreError::ShutDown {
                    path: self.inner.db_path.clone(),
                });
            };
            match sender.try_send(job) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if started.elapsed() < FOLD_QUEUE_WAIT => {
                    job = back;
                    drop(queue);
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(TrySendError::Full(_)) => {
                    return Err(StoreError::Busy {
                        path: self.inner.db_path.clone(),
                        waited_ms: FOLD_QUEUE_WAIT.as_millis() as u64,
                    })
                }
                Err(TrySendError::Disconnected(_)) => {
                    return Err(StoreError::ShutDown {
                        path: self.inner.db_path.clone(),
                    })
                }
            }
        }
        // The writer answers every job it takes, and answers queued ones before it
        // exits; a closed channel means it died.
        answer.recv().unwrap_or_else(|_| {
            Err(StoreError::ShutDown {
                path: self.inner.db_path.clone(),
            })
        })
    }

    /// Runs a blocking read of `room`'s rows. A room already known damaged is refused at
    /// once, without touching the file; a read that makes redb panic, or finds a row or
    /// page damaged, marks the room damaged (logged once) and returns the error.
    fn guarded_read<T>(
        &self,
        room: &str,
        read: impl FnOnce(&redb::Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if let Some(detail) = self.inner.health.damage_of(room) {
            return Err(self.damaged(room, detail));
        }
        let db = self.db()?;
        match guard::catch(|| read(&db)) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                if error.is_damage() {
                    self.note_damage(room, &error.to_string());
                }
                Err(error)
            }
            Err(panic) => {
                self.note_damage(room, &panic);
                Err(self.damaged(room, panic))
            }
        }
    }

    fn note_damage(&self, room: &str, detail: &str) {
        writer::note_damage(&self.inner.health, &self.inner.db_path, room, detail);
    }

    fn damaged(&self, room: &str, detail: String) -> StoreError {
        StoreError::Damaged {
            what: format!("room {room}"),
            path: self.inner.db_path.clone(),
            detail,
        }
    }

    /// Every room found damaged so far (by a read, a load or a write), in room order, with
    /// what was found. Damage is found when a room's pages are read, so a room nobody
    /// has touched since the start is not listed even if damaged; `roomd log verify`
    /// reads everything.
    pub fn damaged_rooms(&self) -> Vec<(String, String)> {
        self.inner.health.damaged()
    }

    /// Blocking: every room with its counts and sizes, in room order, for `roomd log`.
    /// Reads every event row's size, so its cost grows with the whole log.
    pub fn list_rooms(&self) -> Result<Vec<RoomInfo>, StoreError> {
        self.ensure_folded(None)?;
        let mut rooms = tools::list_rooms(&*self.db()?, &self.inner.db_path)?;
        for room in &mut rooms {
            room.epoch ^= self.inner.epoch_salt;
        }
        Ok(rooms)
    }

    /// Blocking: one page of the admin room list (ids after `after` starting with
    /// `prefix`, at most `limit`), and whether more follow. Reads meta rows only, and
    /// takes a room's head from the writer's journaled heads when it has batches not
    /// yet folded (creations are never journaled, so every room has its meta row); it
    /// asks for no fold, so a dashboard refreshing the list every second does not make
    /// the writer fold every room each time.
    pub fn rooms_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<ListedRoom>, bool), StoreError> {
        let db = self.db()?;
        let path = &self.inner.db_path;
        // A damaged meta page makes redb panic: answered as damage, never unwound.
        let page = guard::catch(|| listing::rooms_page(&db, path, prefix, after, limit)).map_err(
            |detail| StoreError::Damaged {
                what: "the room list".to_owned(),
                path: path.clone(),
                detail,
            },
        )?;
        let (mut rooms, more) = page?;
        for room in &mut rooms {
            room.epoch ^= self.inner.epoch_salt;
            // The larger of the two is the head. A fold committed between the meta
            // read and this one leaves the meta row's older head: a head the room had
            // a moment ago, never one it did not have (the next page is current).
            if let Some(head) = self.inner.health.journaled_head(&room.room) {
                room.head = room.head.max(head);
            }
        }
        Ok((rooms, more))
    }

    /// Blocking: checks every row of the log (see [`ProblemKind`] for what) and returns
    /// what is wrong, at most [`MAX_PROBLEMS`] of it; empty means the log is sound.
    pub fn verify(&self) -> Result<Vec<Problem>, StoreError> {
        self.ensure_folded(None)?;
        tools::verify(&*self.db()?, &self.inner.db_path)
    }

    /// Offline: compacts DIR/roomd.redb so the space freed by trimming and deletion
    /// goes back to the filesystem. Takes the dir lock, so it fails clearly while a
    /// server (or another `Store`) has the dir open.
    pub fn compact(dir: &Path) -> Result<CompactReport, StoreError> {
        tools::compact(dir)
    }

    /// How many existing rooms `user` created: creations and deletions count once they
    /// commit, so creations still in flight are not included. Non-blocking (memory).
    pub fn rooms_created_by(&self, user: &str) -> usize {
        self.inner.health.rooms_created_by(user)
    }

    /// Blocking: true when the store is healthy (writer alive, last commit did not fail).
    pub fn is_healthy(&self) -> bool {
        self.inner.health.is_running() && self.inner.health.failure().is_none()
    }

    /// Committed write transactions so far, including the empty ones that only sync.
    pub fn commits(&self) -> u64 {
        self.inner.health.commits()
    }

    /// Times the writer closed and reopened the database to empty its page cache (see
    /// [`StoreConfig::quiet_reopen`]).
    pub fn reopens(&self) -> u64 {
        self.inner.health.reopens()
    }

    /// Groups of batches the writer wrote to the journal while the committer thread
    /// committed an earlier group's redb transaction (`committer.rs`).
    pub fn beside_commits(&self) -> u64 {
        self.inner.health.beside_commits()
    }

    /// Trimming and deletion pieces committed so far (each at most [`MAX_PIECE_ROWS`]
    /// row deletions).
    pub fn maintenance_pieces(&self) -> u64 {
        self.inner.health.pieces()
    }

    /// The data dir's database file, for messages.
    pub fn db_path(&self) -> &Path {
        &self.inner.db_path
    }

    /// Blocking: stops taking batches, commits everything queued, makes it durable (a
    /// final Immediate commit), and joins the writer thread. Trims still running are
    /// answered `Cancelled`. Idempotent.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

/// Opens (or creates) the database file with the cache size set explicitly, logging the
/// progress of a full repair if the last run did not close it cleanly.
pub(crate) fn open_database(
    db_path: &Path,
    cache_bytes: usize,
) -> Result<redb::Database, StoreError> {
    let shown = db_path.display().to_string();
    redb::Builder::new()
        .set_cache_size(cache_bytes)
        .set_repair_callback(move |session| {
            tracing::warn!(
                db = %shown,
                progress = session.progress(),
                "repairing the database after an unclean stop"
            );
        })
        .create(db_path)
        .map_err(|source| StoreError::Open {
            path: db_path.to_owned(),
            source: Box::new(source),
        })
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
                Ok(()) if self.health.failure().is_none() && self.lock.is_some() => {
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
#[cfg(test)]
mod tests_journal;
#[cfg(test)]
mod tests_maintenance;
