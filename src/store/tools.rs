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

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::checksums;
use super::error::redb_corruption;
use super::guard;
use super::lock::DirLock;
use super::record::{decode_meta, decode_snapshot, log_row, StoredMeta};
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
        if self.room == DATABASE {
            write!(f, "database: {}", self.kind)
        } else {
            write!(f, "room {}: {}", self.room, self.kind)
        }
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
    /// A page on the way to these rows is damaged: redb panicked or reported corruption
    /// reading it (it checks page checksums only when it repairs, so damage shows here
    /// when it breaks a page's structure or a row's bytes).
    #[error("{table} rows cannot be read, a page of the file is damaged: {detail}")]
    Unreadable { table: &'static str, detail: String },
    /// Pages of the file fail their checksums (redb's integrity check, run on a
    /// copy-on-write view of the file): a byte changed outside redb. The rows may still
    /// decode, holding changed data; the check does not say which room's.
    #[error("page checksums do not match, the file was changed outside roomd: {detail}")]
    Checksums { detail: String },
    #[error("more than {limit} problems; the scan stopped here")]
    TooMany { limit: usize },
}

/// Every room's meta row, decoded or not, in room order.
type Metas = BTreeMap<String, Result<StoredMeta, String>>;

/// A table of `(room, seq)` -> row bytes.
type RowTable = TableDefinition<'static, (&'static str, u64), &'static [u8]>;

/// The name under which a problem outside any room is reported.
pub const DATABASE: &str = "";

fn scan_error(path: &Path) -> impl Fn(redb::Error) -> StoreError + '_ {
    move |source| StoreError::Scan {
        path: path.to_owned(),
        source: Box::new(source),
    }
}

/// How a guarded scan of one table (or one room's rows in it) ended.
enum Scanned {
    Done,
    /// A page could not be read: redb panicked or reported corruption.
    Damaged(String),
}

/// Runs `scan` guarded: a panic or a corruption error is damage, another redb error
/// (I/O) fails the whole listing or check.
fn guarded(
    path: &Path,
    scan: impl FnOnce() -> Result<(), redb::Error>,
) -> Result<Scanned, StoreError> {
    match guard::catch(scan) {
        Ok(Ok(())) => Ok(Scanned::Done),
        Ok(Err(error)) => match redb_corruption(&error) {
            Some(detail) => Ok(Scanned::Damaged(detail.to_owned())),
            None => Err(scan_error(path)(error)),
        },
        Err(panic) => Ok(Scanned::Damaged(panic)),
    }
}

/// Reads every meta row it can. A damaged page of the meta table ends the scan there:
/// the rooms read so far are returned with the damage.
fn read_metas(db: &redb::Database, path: &Path) -> Result<(Metas, Option<String>), StoreError> {
    let mut metas = BTreeMap::new();
    let scanned = guarded(path, || {
        let txn = db.begin_read()?;
        let table = txn.open_table(META)?;
        for entry in table.iter()? {
            let (room, row) = entry?;
            let decoded = decode_meta(row.value()).map_err(|e| e.to_string());
            metas.insert(room.value().to_owned(), decoded);
        }
        Ok(())
    })?;
    Ok(match scanned {
        Scanned::Done => (metas, None),
        Scanned::Damaged(detail) => (metas, Some(detail)),
    })
}

/// Every room with its counts and sizes, in room order. A room whose meta row does not
/// decode is left out (with a warning); `verify` reports it. A room whose rows cannot be
/// read is listed with what was found in `damage`; a damaged meta table fails the
/// listing, naming the last room it could read.
pub fn list_rooms(db: &redb::Database, path: &Path) -> Result<Vec<RoomInfo>, StoreError> {
    let (metas, meta_damage) = read_metas(db, path)?;
    if let Some(detail) = meta_damage {
        return Err(StoreError::Damaged {
            what: meta_scope(&metas),
            path: path.to_owned(),
            detail,
        });
    }
    let mut rooms = Vec::with_capacity(metas.len());
    for (room, meta) in &metas {
        let stored = match meta {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(room = %room, error = %e, "room metadata does not decode");
                continue;
            }
        };
        let mut info = RoomInfo {
            room: room.clone(),
            kind: stored.meta.kind.clone(),
            epoch: stored.meta.epoch,
            head: stored.head,
            first_retained: stored.first_retained,
            events: 0,
            bytes: 0,
            snapshots: 0,
            damage: None,
        };
        let scanned = guarded(path, || {
            let txn = db.begin_read()?;
            for entry in txn
                .open_table(EVENTS)?
                .range((room.as_str(), 0)..=(room.as_str(), u64::MAX))?
            {
                let (key, row) = entry?;
                // A row holds a batch's events; one that does not decode counts as
                // one (`verify` says what is wrong with it).
                info.events += log_row(key.value().1, row.value()).map_or(1, |row| row.len());
                info.bytes += row.value().len() as u64;
            }
            for entry in txn
                .open_table(SNAPSHOTS)?
                .range((room.as_str(), 0)..=(room.as_str(), u64::MAX))?
            {
                entry?;
                info.snapshots += 1;
            }
            Ok(())
        })?;
        if let Scanned::Damaged(detail) = scanned {
            info.damage = Some(detail);
        }
        rooms.push(info);
    }
    Ok(rooms)
}

/// Names the part of the meta table a damaged page cut off.
fn meta_scope(metas: &Metas) -> String {
    match metas.keys().next_back() {
        Some(last) => format!("the meta table after room {last}"),
        None => "the meta table".to_owned(),
    }
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

/// Checks every row: meta rows, event rows and snapshot rows decode; each room's events
/// are gapless over `first_retained..=head` with nothing outside it; snapshots lie in
/// `first_retained - 1..=head` and one covers a trimmed log; op ids name seqs up to the
/// head; no row belongs to a room without metadata. Every page is read under a guard,
/// room by room: a page redb cannot read is reported as [`ProblemKind::Unreadable`] for
/// the room (or table) being read, and the check goes on with the next room.
pub fn verify(db: &redb::Database, path: &Path) -> Result<Vec<Problem>, StoreError> {
    let mut problems = Problems {
        list: Vec::new(),
        full: false,
    };
    let (metas, meta_damage) = read_metas(db, path)?;
    if let Some(detail) = meta_damage {
        let kind = ProblemKind::Unreadable {
            table: "meta",
            detail: format!("{}: {detail}", meta_scope(&metas)),
        };
        if !problems.push(DATABASE, kind) {
            return Ok(problems.list);
        }
    }
    for (room, meta) in &metas {
        let kinds = match meta {
            Ok(stored) => check_room(db, path, room, stored)?,
            Err(e) => vec![ProblemKind::CorruptMeta { error: e.clone() }],
        };
        for kind in kinds {
            if !problems.push(room, kind) {
                return Ok(problems.list);
            }
        }
    }
    // Rows of rooms without metadata. A damaged page in a table that no room's check
    // already reported is reported once, for the table.
    let damaged_tables: std::collections::BTreeSet<&'static str> = problems
        .list
        .iter()
        .filter_map(|p| match &p.kind {
            ProblemKind::Unreadable { table, .. } => Some(*table),
            _ => None,
        })
        .collect();
    let mut orphans: BTreeMap<String, RoomScan> = BTreeMap::new();
    let known = |room: &str| metas.contains_key(room);
    let tables: [(&'static str, RowTable); 2] = [("events", EVENTS), ("snapshots", SNAPSHOTS)];
    let mut table_damage = Vec::new();
    for (name, table) in tables {
        let scanned = guarded(path, || {
            let txn = db.begin_read()?;
            for entry in txn.open_table(table)?.iter()? {
                let (key, _) = entry?;
                let room = key.value().0;
                if !known(room) {
                    let scan = orphans.entry(room.to_owned()).or_default();
                    match name {
                        "events" => scan.orphan_events += 1,
                        _ => scan.orphan_snapshots += 1,
                    }
                }
            }
            Ok(())
        })?;
        table_damage.push((name, scanned));
    }
    let scanned = guarded(path, || {
        let txn = db.begin_read()?;
        for entry in txn.open_table(OP_IDS)?.iter()? {
            let (key, _) = entry?;
            let room = key.value().0;
            if !known(room) {
                orphans.entry(room.to_owned()).or_default().orphan_op_ids += 1;
            }
        }
        Ok(())
    })?;
    table_damage.push(("op_ids", scanned));
    // A creator row goes in the same transaction as its room's meta row.
    let scanned = guarded(path, || {
        let txn = db.begin_read()?;
        for entry in txn.open_table(CREATORS)?.iter()? {
            let (key, _) = entry?;
            let room = key.value();
            if !known(room) {
                orphans.entry(room.to_owned()).or_default().orphan_creators += 1;
            }
        }
        Ok(())
    })?;
    table_damage.push(("creators", scanned));
    for (table, scanned) in table_damage {
        if let Scanned::Damaged(detail) = scanned {
            if !damaged_tables.contains(table)
                && !problems.push(DATABASE, ProblemKind::Unreadable { table, detail })
            {
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
    if let Some(detail) = checksums::check(path)? {
        problems.push(DATABASE, ProblemKind::Checksums { detail });
    }
    // Rooms were checked in order, then tables; one stable sort groups a room's problems.
    problems.list.sort_by(|a, b| a.room.cmp(&b.room));
    Ok(problems.list)
}

/// What the scan of one room has seen so far, and the orphan rows of a room without
/// metadata.
#[derive(Default)]
struct RoomScan {
    orphan_events: u64,
    orphan_snapshots: u64,
    orphan_op_ids: u64,
    orphan_creators: u64,
}

/// Checks one room's rows in its own read transaction, guarded table by table: a page
/// that cannot be read ends the check of that table with [`ProblemKind::Unreadable`].
fn check_room(
    db: &redb::Database,
    path: &Path,
    room: &str,
    meta: &StoredMeta,
) -> Result<Vec<ProblemKind>, StoreError> {
    let mut found = Vec::new();
    // Events `first_retained..=head`, gapless, decoding.
    let mut next_event = meta.first_retained;
    let scanned = guarded(path, || {
        let txn = db.begin_read()?;
        for entry in txn
            .open_table(EVENTS)?
            .range((room, 0)..=(room, u64::MAX))?
        {
            let (key, row) = entry?;
            let last = key.value().1;
            // A row holds the events `first..=last`; one that does not decode is
            // taken as ending where its key says, so the scan goes on after it.
            let first = match log_row(last, row.value()) {
                Ok(row) => {
                    for seq in row.first()..=last {
                        if let Err(e) = row.event(seq) {
                            found.push(ProblemKind::CorruptEvent {
                                seq,
                                error: e.to_string(),
                            });
                        }
                    }
                    row.first()
                }
                Err(e) => {
                    found.push(ProblemKind::CorruptEvent {
                        seq: last,
                        error: e.to_string(),
                    });
                    next_event.clamp(meta.first_retained, last.max(meta.first_retained))
                }
            };
            if first < meta.first_retained || last > meta.head {
                found.push(ProblemKind::EventOutsideRetention {
                    seq: if first < meta.first_retained {
                        first
                    } else {
                        last
                    },
                    first_retained: meta.first_retained,
                    head: meta.head,
                });
            } else {
                if first != next_event {
                    found.push(ProblemKind::Gap {
                        expected: next_event,
                        found: first,
                    });
                }
                next_event = last.saturating_add(1);
            }
        }
        Ok(())
    })?;
    let events_read = match scanned {
        Scanned::Done => true,
        Scanned::Damaged(detail) => {
            let detail = match next_event.checked_sub(1) {
                Some(last) if last >= meta.first_retained => {
                    format!("after event {last}: {detail}")
                }
                _ => detail,
            };
            found.push(ProblemKind::Unreadable {
                table: "events",
                detail,
            });
            false
        }
    };
    // Snapshots in `first_retained - 1..=head`, decoding; one is the base of a trimmed log.
    let mut has_base = meta.first_retained <= 1;
    let scanned = guarded(path, || {
        let txn = db.begin_read()?;
        for entry in txn
            .open_table(SNAPSHOTS)?
            .range((room, 0)..=(room, u64::MAX))?
        {
            let (key, row) = entry?;
            let seq = key.value().1;
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
                has_base = true;
            }
        }
        Ok(())
    })?;
    let snapshots_read = match scanned {
        Scanned::Done => true,
        Scanned::Damaged(detail) => {
            found.push(ProblemKind::Unreadable {
                table: "snapshots",
                detail,
            });
            false
        }
    };
    // Op ids kept for trimmed events name seqs up to the head.
    let scanned = guarded(path, || {
        let txn = db.begin_read()?;
        for entry in txn
            .open_table(OP_IDS)?
            .range((room, 0)..=(room, u64::MAX))?
        {
            let (key, value) = entry?;
            let seq = key.value().1;
            if seq > meta.head {
                let (user, op_id) = value.value();
                found.push(ProblemKind::OpIdPastHead {
                    user: user.to_owned(),
                    op_id: op_id.to_owned(),
                    seq,
                    head: meta.head,
                });
            }
        }
        Ok(())
    })?;
    if let Scanned::Damaged(detail) = scanned {
        found.push(ProblemKind::Unreadable {
            table: "op_ids",
            detail,
        });
    }
    if events_read {
        let last = next_event - 1;
        if last != meta.head {
            found.push(ProblemKind::HeadMismatch {
                head: meta.head,
                last,
            });
        }
    }
    if snapshots_read && !has_base {
        found.push(ProblemKind::NoBaseSnapshot {
            first_retained: meta.first_retained,
        });
    }
    Ok(found)
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
