//! The offline `roomd log` side of the store: listing rooms, verifying every row, and
//! compacting the file after trimming and deletion freed space.
//!
//! Listing and verifying read the whole log in one read transaction, table by table in
//! key order, holding per-room counters rather than rows, so memory grows with the
//! number of rooms, not events. Verifying checks what the store itself can check; that
//! a snapshot plus the events after it replay to the same state as the full log is
//! checked by the caller, which owns room state.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use redb::{ReadableDatabase, ReadableTable};

use super::lock::DirLock;
use super::record::{decode_event, decode_meta, decode_snapshot, StoredMeta};
use super::tables::{CREATORS, EVENTS, META, OP_IDS, SNAPSHOTS};
use super::{format, open_database, CompactReport, RoomInfo, StoreError, DEFAULT_CACHE_BYTES};

/// The most problems [`Store::verify`](super::Store::verify) reports; past it, one [`ProblemKind::TooMany`] ends the
/// list and the scan stops.
pub const MAX_PROBLEMS: usize = 1_000;

/// Redb compacts in rounds, each moving what it can towards the start of the file;
/// this bounds the rounds of one [`compact`].
const MAX_COMPACT_ROUNDS: usize = 32;

/// One thing wrong with the stored log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub room: String,
    pub kind: ProblemKind,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "room {}: {}", self.room, self.kind)
    }
}

/// What [`Store::verify`](super::Store::verify) checks, one variant per way it can fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProblemKind {
    #[error("metadata row does not decode: {error}")]
    CorruptMeta { error: String },
    #[error("event {seq} does not decode: {error}")]
    CorruptEvent { seq: u64, error: String },
    #[error("snapshot {seq} does not decode: {error}")]
    CorruptSnapshot { seq: u64, error: String },
    /// Events `first_retained..=head` must all be stored.
    #[error("events are not gapless: expected seq {expected}, found {found}")]
    Gap { expected: u64, found: u64 },
    #[error("the newest stored event is {last} but the head is {head}")]
    HeadMismatch { head: u64, last: u64 },
    #[error("event {seq} is outside the retained range {first_retained}..={head}")]
    EventOutsideRetention {
        seq: u64,
        first_retained: u64,
        head: u64,
    },
    /// Trimming deletes snapshots before the newest one it kept, `first_retained - 1`.
    #[error("snapshot {seq} is outside {}..={head}", .first_retained - 1)]
    SnapshotOutsideRetention {
        seq: u64,
        first_retained: u64,
        head: u64,
    },
    #[error("events before {first_retained} are trimmed but no snapshot is at seq {} or later", .first_retained - 1)]
    NoBaseSnapshot { first_retained: u64 },
    #[error("op id ({user:?}, {op_id:?}) names seq {seq}, after the head {head}")]
    OpIdPastHead {
        user: String,
        op_id: String,
        seq: u64,
        head: u64,
    },
    #[error("{rows} {table} rows belong to a room without metadata")]
    Orphan { table: &'static str, rows: u64 },
    #[error("more than {limit} problems; the scan stopped here")]
    TooMany { limit: usize },
}

/// Every room's meta row, decoded or not, in room order.
type Metas = BTreeMap<String, Result<StoredMeta, String>>;

fn scan_error(path: &Path) -> impl Fn(redb::Error) -> StoreError + '_ {
    move |source| StoreError::Scan {
        path: path.to_owned(),
        source: Box::new(source),
    }
}

fn read_metas(txn: &redb::ReadTransaction, path: &Path) -> Result<Metas, StoreError> {
    let error = scan_error(path);
    let table = txn.open_table(META).map_err(|e| error(e.into()))?;
    let mut metas = BTreeMap::new();
    for entry in table.iter().map_err(|e| error(e.into()))? {
        let (room, row) = entry.map_err(|e| error(e.into()))?;
        let decoded = decode_meta(row.value()).map_err(|e| e.to_string());
        metas.insert(room.value().to_owned(), decoded);
    }
    Ok(metas)
}

/// Every room with its counts and sizes, in room order. A room whose meta row does not
/// decode is left out (with a warning); `verify` reports it.
pub fn list_rooms(db: &redb::Database, path: &Path) -> Result<Vec<RoomInfo>, StoreError> {
    let error = scan_error(path);
    let txn = db.begin_read().map_err(|e| error(e.into()))?;
    let metas = read_metas(&txn, path)?;
    let mut rooms: BTreeMap<&str, RoomInfo> = BTreeMap::new();
    for (room, meta) in &metas {
        match meta {
            Ok(stored) => {
                let info = RoomInfo {
                    room: room.clone(),
                    kind: stored.meta.kind,
                    epoch: stored.meta.epoch,
                    head: stored.head,
                    first_retained: stored.first_retained,
                    events: 0,
                    bytes: 0,
                    snapshots: 0,
                };
                rooms.insert(room, info);
            }
            Err(e) => tracing::warn!(room = %room, error = %e, "room metadata does not decode"),
        }
    }
    let events = txn.open_table(EVENTS).map_err(|e| error(e.into()))?;
    for entry in events.iter().map_err(|e| error(e.into()))? {
        let (key, row) = entry.map_err(|e| error(e.into()))?;
        if let Some(info) = rooms.get_mut(key.value().0) {
            info.events += 1;
            info.bytes += row.value().len() as u64;
        }
    }
    let snapshots = txn.open_table(SNAPSHOTS).map_err(|e| error(e.into()))?;
    for entry in snapshots.iter().map_err(|e| error(e.into()))? {
        let (key, _) = entry.map_err(|e| error(e.into()))?;
        if let Some(info) = rooms.get_mut(key.value().0) {
            info.snapshots += 1;
        }
    }
    Ok(rooms.into_values().collect())
}

/// Collects problems up to [`MAX_PROBLEMS`].
struct Problems {
    list: Vec<Problem>,
    full: bool,
}

impl Problems {
    /// Records a problem; false once the list is full and the scan should stop.
    fn push(&mut self, room: &str, kind: ProblemKind) -> bool {
        if self.full {
            return false;
        }
        if self.list.len() == MAX_PROBLEMS {
            self.list.push(Problem {
                room: room.to_owned(),
                kind: ProblemKind::TooMany {
                    limit: MAX_PROBLEMS,
                },
            });
            self.full = true;
            return false;
        }
        self.list.push(Problem {
            room: room.to_owned(),
            kind,
        });
        true
    }
}

/// What the scan of one room has seen so far.
#[derive(Default)]
struct RoomScan {
    /// The next seq the retained events must hold.
    next_event: u64,
    /// Whether a snapshot at or after `first_retained - 1` is stored.
    has_base: bool,
    orphan_events: u64,
    orphan_snapshots: u64,
    orphan_op_ids: u64,
    orphan_creators: u64,
}

/// Checks every row: meta rows, event rows and snapshot rows decode; each room's events
/// are gapless over `first_retained..=head` with nothing outside it; snapshots lie in
/// `first_retained - 1..=head` and one covers a trimmed log; op ids name seqs up to the
/// head; no row belongs to a room without metadata.
pub fn verify(db: &redb::Database, path: &Path) -> Result<Vec<Problem>, StoreError> {
    let error = scan_error(path);
    let txn = db.begin_read().map_err(|e| error(e.into()))?;
    let metas = read_metas(&txn, path)?;
    let mut problems = Problems {
        list: Vec::new(),
        full: false,
    };
    let mut scans: BTreeMap<&str, RoomScan> = BTreeMap::new();
    for (room, meta) in &metas {
        match meta {
            Ok(stored) => {
                scans.insert(
                    room,
                    RoomScan {
                        next_event: stored.first_retained,
                        has_base: stored.first_retained <= 1,
                        ..RoomScan::default()
                    },
                );
            }
            Err(e) => {
                if !problems.push(room, ProblemKind::CorruptMeta { error: e.clone() }) {
                    return Ok(problems.list);
                }
            }
        }
    }
    // Rows of a room whose meta does not decode are neither checked nor orphans.
    let known = |room: &str| metas.contains_key(room);
    let stored = |room: &str| metas.get(room).and_then(|meta| meta.as_ref().ok());
    let mut orphans: BTreeMap<String, RoomScan> = BTreeMap::new();

    let events = txn.open_table(EVENTS).map_err(|e| error(e.into()))?;
    for entry in events.iter().map_err(|e| error(e.into()))? {
        let (key, row) = entry.map_err(|e| error(e.into()))?;
        let (room, seq) = key.value();
        let Some(meta) = stored(room) else {
            if !known(room) {
                orphans.entry(room.to_owned()).or_default().orphan_events += 1;
            }
            continue;
        };
        let mut found = Vec::new();
        if let Err(e) = decode_event(seq, row.value()) {
            found.push(ProblemKind::CorruptEvent {
                seq,
                error: e.to_string(),
            });
        }
        if seq < meta.first_retained || seq > meta.head {
            found.push(ProblemKind::EventOutsideRetention {
                seq,
                first_retained: meta.first_retained,
                head: meta.head,
            });
        } else if let Some(scan) = scans.get_mut(room) {
            if seq != scan.next_event {
                found.push(ProblemKind::Gap {
                    expected: scan.next_event,
                    found: seq,
                });
            }
            scan.next_event = seq.saturating_add(1);
        }
        for kind in found {
            if !problems.push(room, kind) {
                return Ok(problems.list);
            }
        }
    }

    let snapshots = txn.open_table(SNAPSHOTS).map_err(|e| error(e.into()))?;
    for entry in snapshots.iter().map_err(|e| error(e.into()))? {
        let (key, row) = entry.map_err(|e| error(e.into()))?;
        let (room, seq) = key.value();
        let Some(meta) = stored(room) else {
            if !known(room) {
                orphans.entry(room.to_owned()).or_default().orphan_snapshots += 1;
            }
            continue;
        };
        let mut found = Vec::new();
        let decoded = decode_snapshot(seq, row.value());
        if let Err(e) = &decoded {
            found.push(ProblemKind::CorruptSnapshot {
                seq,
                error: e.to_string(),
            });
        }
        if seq.saturating_add(1) < meta.first_retained || seq > meta.head {
            found.push(ProblemKind::SnapshotOutsideRetention {
                seq,
                first_retained: meta.first_retained,
                head: meta.head,
            });
        } else if decoded.is_ok() {
            if let Some(scan) = scans.get_mut(room) {
                scan.has_base = true;
            }
        }
        for kind in found {
            if !problems.push(room, kind) {
                return Ok(problems.list);
            }
        }
    }

    let op_ids = txn.open_table(OP_IDS).map_err(|e| error(e.into()))?;
    for entry in op_ids.iter().map_err(|e| error(e.into()))? {
        let (key, value) = entry.map_err(|e| error(e.into()))?;
        let (room, seq) = key.value();
        let (user, op_id) = value.value();
        let Some(meta) = stored(room) else {
            if !known(room) {
                orphans.entry(room.to_owned()).or_default().orphan_op_ids += 1;
            }
            continue;
        };
        if seq > meta.head {
            let kind = ProblemKind::OpIdPastHead {
                user: user.to_owned(),
                op_id: op_id.to_owned(),
                seq,
                head: meta.head,
            };
            if !problems.push(room, kind) {
                return Ok(problems.list);
            }
        }
    }

    // A creator row goes in the same transaction as its room's meta row.
    let creators = txn.open_table(CREATORS).map_err(|e| error(e.into()))?;
    for entry in creators.iter().map_err(|e| error(e.into()))? {
        let (key, _) = entry.map_err(|e| error(e.into()))?;
        let room = key.value();
        if !known(room) {
            orphans.entry(room.to_owned()).or_default().orphan_creators += 1;
        }
    }

    for (room, scan) in &scans {
        let Some(meta) = stored(room) else {
            continue;
        };
        let last = scan.next_event - 1;
        if last != meta.head {
            let kind = ProblemKind::HeadMismatch {
                head: meta.head,
                last,
            };
            if !problems.push(room, kind) {
                return Ok(problems.list);
            }
        }
        if !scan.has_base {
            let kind = ProblemKind::NoBaseSnapshot {
                first_retained: meta.first_retained,
            };
            if !problems.push(room, kind) {
                return Ok(problems.list);
            }
        }
    }
    for (room, scan) in &orphans {
        let counts = [
            ("event", scan.orphan_events),
            ("snapshot", scan.orphan_snapshots),
            ("op id", scan.orphan_op_ids),
            ("creator", scan.orphan_creators),
        ];
        for (table, rows) in counts {
            if rows > 0 && !problems.push(room, ProblemKind::Orphan { table, rows }) {
                return Ok(problems.list);
            }
        }
    }
    // Each table's pass pushed in room order; one sort groups a room's problems.
    problems.list.sort_by(|a, b| a.room.cmp(&b.room));
    Ok(problems.list)
}

/// Compacts `dir`'s database offline, holding the dir lock; see `Store::compact`.
pub fn compact(dir: &Path) -> Result<CompactReport, StoreError> {
    let db_path = dir.join(format::DB_FILE);
    if !db_path.exists() {
        return Err(StoreError::NoDatabase {
            dir: dir.to_owned(),
            file: format::DB_FILE,
        });
    }
    let _lock = DirLock::acquire(dir)?;
    format::check_or_write(dir)?;
    let size = || {
        std::fs::metadata(&db_path)
            .map(|m| m.len())
            .map_err(|source| StoreError::Io {
                what: "cannot read the size of",
                path: db_path.clone(),
                source,
            })
    };
    let before_bytes = size()?;
    let mut db = open_database(&db_path, DEFAULT_CACHE_BYTES)?;
    for _ in 0..MAX_COMPACT_ROUNDS {
        match db.compact() {
            Ok(true) => {}
            Ok(false) => break,
            Err(source) => {
                return Err(StoreError::Compact {
                    path: db_path.clone(),
                    source: Box::new(source),
                })
            }
        }
    }
    // Closing the database is what lets the file shrink to its compacted length.
    drop(db);
    let after_bytes = size()?;
    tracing::info!(db = %db_path.display(), before_bytes, after_bytes, "compacted");
    Ok(CompactReport {
        before_bytes,
        after_bytes,
    })
}
