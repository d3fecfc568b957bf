//! The store's error types: [`StoreError`] for everything the store reports, and
//! [`SubmitError`] for a batch the writer queue did not take.
//!
//! Messages say what failed and where (the data dir, the room, the seq), so an operator
//! can act on the log line alone. Mapping these to wire codes (`unavailable`) is the
//! caller's job, done in one place outside the store.

use std::io;
use std::path::PathBuf;

use super::record::RecordError;

/// Why the store could not open, read, or write a batch.
///
/// redb's errors are boxed to keep this enum small: it travels in every `Result` the
/// store returns, and the error path is rare.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation on the data dir failed; `what` names the operation.
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// Another process (or another `Store` in this process) holds the data dir's lock.
    #[error("data dir {} is locked by another roomd ({})", .dir.display(), pid_text(*.pid))]
    Locked { dir: PathBuf, pid: Option<u32> },
    /// The data dir's FORMAT file names a version this build does not read.
    #[error("{} says format version {found:?}, but this roomd reads format version {expected}", .path.display())]
    FormatVersion {
        path: PathBuf,
        found: String,
        expected: u32,
    },
    /// The data dir holds a database but no FORMAT file, so its format is unknown.
    #[error("data dir {} holds roomd.redb but no FORMAT file; refusing to guess its format", .dir.display())]
    FormatMissing { dir: PathBuf },
    #[error("cannot open database {}: {source}", .path.display())]
    Open {
        path: PathBuf,
        source: Box<redb::DatabaseError>,
    },
    #[error("cannot prepare the tables of {}: {source}", .path.display())]
    Init {
        path: PathBuf,
        source: Box<redb::Error>,
    },
    #[error("cannot start the store writer thread: {source}")]
    Spawn { source: io::Error },
    #[error("reading room {room} from {}: {source}", .path.display())]
    Read {
        room: String,
        path: PathBuf,
        source: Box<redb::Error>,
    },
    /// A stored row failed to decode; `seq` is `None` for the room's metadata row.
    #[error("room {room}: stored {} is corrupt: {source}", row_text(*.seq))]
    Corrupt {
        room: String,
        seq: Option<u64>,
        source: RecordError,
    },
    /// A stored snapshot row failed to decode.
    #[error("room {room}: stored snapshot {seq} is corrupt: {source}")]
    CorruptSnapshot {
        room: String,
        seq: u64,
        source: RecordError,
    },
    /// A stored snapshot is at a seq after the room's head.
    #[error("room {room}: stored snapshot {seq} is after head {head}")]
    SnapshotPastHead { room: String, seq: u64, head: u64 },
    /// The room's log is trimmed but no stored snapshot covers the trimmed part, so its
    /// state cannot be rebuilt.
    #[error("room {room}: events before seq {first_retained} are trimmed, but no stored snapshot is at seq {} or later", .first_retained - 1)]
    NoBaseSnapshot { room: String, first_retained: u64 },
    /// The stored events of a room do not run gaplessly up to its head.
    #[error("room {room}: stored events are not gapless up to head {head}: expected seq {expected}, found {found}")]
    LogGap {
        room: String,
        head: u64,
        expected: u64,
        found: u64,
    },
    /// The journal left by the last run cannot be replayed (`journal.rs`); the store
    /// does not open rather than serve a room without events it acked.
    #[error("journal row {key} of {} cannot be replayed into room {room}: {detail}", .path.display())]
    Journal {
        path: PathBuf,
        key: u64,
        room: String,
        detail: String,
    },
    /// A read needed a pending room folded, but the writer queue stayed full.
    #[error("store {} is busy: the writer queue stayed full for {waited_ms} ms", .path.display())]
    Busy { path: PathBuf, waited_ms: u64 },
    /// A batch carried `create` for a room that already exists; nothing of it was written.
    #[error("batch creates room {room}, which already exists with head seq {head}")]
    RoomExists { room: String, head: u64 },
    /// A batch without `create` named a room that does not exist; nothing of it was written.
    #[error("batch appends to room {room}, which does not exist and the batch does not create it")]
    NoSuchRoom { room: String },
    /// A batch's events do not continue the room's stored head; nothing of it was written.
    #[error("batch for room {room} has event seq {found} where seq {expected} comes next")]
    SeqGap {
        room: String,
        expected: u64,
        found: u64,
    },
    /// A batch's snapshot is not at a seq from 1 up to the batch's last event (the stored
    /// head for a batch without events); nothing of the batch was written.
    #[error("batch for room {room} carries a snapshot at seq {seq}, outside 1..={head}")]
    SnapshotSeq { room: String, seq: u64, head: u64 },
    /// A room import (`Store::submit_import`) was refused before anything was written.
    #[error("cannot import room {room}: {reason}")]
    Import { room: String, reason: String },
    /// An event could not be encoded (too deep, too large, not finite); nothing of its
    /// batch was written.
    #[error("cannot encode event {seq} of room {room}: {source}")]
    Encode {
        room: String,
        seq: u64,
        source: RecordError,
    },
    /// Reading every room (listing or verifying the log) failed.
    #[error("scanning {}: {source}", .path.display())]
    Scan {
        path: PathBuf,
        source: Box<redb::Error>,
    },
    /// An offline compaction failed; the file is as redb left it, still a valid database.
    #[error("cannot compact database {}: {source}", .path.display())]
    Compact {
        path: PathBuf,
        source: Box<redb::CompactionError>,
    },
    /// `compact` was pointed at a data dir without a database.
    #[error("data dir {} holds no {file} to compact", .dir.display())]
    NoDatabase { dir: PathBuf, file: &'static str },
    /// The transaction holding this batch failed; the store is now fail-stopped.
    #[error("commit of {n_batches} batches to {} failed: {reason}", .path.display())]
    Commit {
        path: PathBuf,
        n_batches: usize,
        reason: String,
    },
    /// An earlier commit failed, so the store takes no more writes until restart.
    #[error("store {} stopped writing after a failed commit ({reason}); restart roomd to recover", .path.display())]
    FailStopped { path: PathBuf, reason: String },
    #[error("store {} is shut down", .path.display())]
    ShutDown { path: PathBuf },
    /// Reading the rows of `what` (a room, or a table) made redb panic or report
    /// corruption: a page of the file is damaged. A damaged room answers `unavailable`
    /// from then on, without touching the file again, until the file is restored and
    /// roomd restarted; other rooms keep serving.
    #[error("{what} in {} is damaged ({detail}); it is unavailable until the file is restored (`roomd log verify` lists every damaged room)", .path.display())]
    Damaged {
        what: String,
        path: PathBuf,
        detail: String,
    },
}

impl StoreError {
    /// True when the error says the stored data is damaged (a row that does not decode,
    /// a log with a gap, a page redb cannot read), as opposed to the store failing to do
    /// its work (I/O, shutdown, a full queue) or refusing a batch.
    pub fn is_damage(&self) -> bool {
        match self {
            StoreError::Corrupt { .. }
            | StoreError::CorruptSnapshot { .. }
            | StoreError::SnapshotPastHead { .. }
            | StoreError::NoBaseSnapshot { .. }
            | StoreError::LogGap { .. }
            | StoreError::Damaged { .. } => true,
            StoreError::Read { source, .. } | StoreError::Scan { source, .. } => {
                redb_corruption(source).is_some()
            }
            _ => false,
        }
    }
}

/// The message of a redb error that reports a corrupted file, if it is one.
pub(crate) fn redb_corruption(error: &redb::Error) -> Option<&str> {
    match error {
        redb::Error::Corrupted(detail) => Some(detail),
        _ => None,
    }
}

/// Why [`Store::submit`](super::Store::submit) did not queue a batch. Either way the
/// caller nacks the batch's ops with `unavailable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The writer queue is at its bound; the writer is behind.
    #[error("store writer queue is full")]
    Full,
    /// The store is shut down (or its writer thread is gone).
    #[error("store is shut down")]
    Stopped,
}

fn pid_text(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid}"),
        None => "pid unknown".to_owned(),
    }
}

fn row_text(seq: Option<u64>) -> String {
    match seq {
        Some(seq) => format!("event {seq}"),
        None => "metadata".to_owned(),
    }
}
