//! `roomd log`: inspects and maintains the data dir of a stopped server.
//!
//! It opens the store like the server does (taking the data dir's lock, so it refuses
//! to run next to a live server) and reads through the store's validated decoding.
//! `verify` adds what only the room layer knows: that every stored snapshot, replayed
//! forward with the logged changes, matches the next snapshot and the log's head.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use crate::kind::RoomState;
use crate::protocol::ids::epoch_hex;
use crate::room::recovery::{apply_all, replay, state_of};
use crate::store::{Store, StoreConfig, StoreError};

/// `roomd log`: work on the data dir of a stopped server.
#[derive(Args, Debug)]
pub struct LogArgs {
    /// The data dir to read (the server must not be running on it).
    #[arg(long, env = "ROOMD_DATA_DIR", default_value = "./data", global = true)]
    pub data_dir: PathBuf,

    #[command(subcommand)]
    pub command: LogCommand,
}

#[derive(Subcommand, Debug)]
pub enum LogCommand {
    /// List rooms: kind, head seq, epoch, first retained seq, events and bytes stored.
    Rooms,
    /// Print a room's events as JSON lines ({"seq","user","ts","op","changes"}).
    Show {
        room: String,
        /// Start after this seq.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many events.
        #[arg(long, default_value_t = u64::MAX)]
        limit: u64,
    },
    /// Check every record: it decodes, seq is gapless within retention, and each
    /// snapshot plus the logged changes after it equals the next snapshot and the head;
    /// then every page of the file against its checksum (without writing to the file).
    /// Exits nonzero on any problem, naming it.
    Verify,
    /// Compact the database file, giving space freed by trimming back to the disk.
    Compact,
}

#[derive(Debug, thiserror::Error)]
pub enum LogToolError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
    #[error("{0} problem(s) found")]
    Problems(usize),
}

/// Runs one `roomd log` command, printing to stdout.
pub fn run(args: LogArgs) -> Result<(), LogToolError> {
    let dir = args.data_dir.as_path();
    if let LogCommand::Compact = args.command {
        let report = Store::compact(dir)?;
        println!(
            "compacted {}: {} -> {} bytes",
            dir.display(),
            report.before_bytes,
            report.after_bytes
        );
        return Ok(());
    }
    let store = open(dir)?;
    let out = std::io::stdout();
    let mut out = out.lock();
    match args.command {
        LogCommand::Rooms => {
            writeln!(
                out,
                "{:<32} {:<6} {:>10} {:<16} {:>10} {:>10} {:>12}",
                "room", "kind", "head", "epoch", "first", "events", "bytes"
            )?;
            let mut damaged = 0;
            for room in store.list_rooms()? {
                writeln!(
                    out,
                    "{:<32} {:<6} {:>10} {:<16} {:>10} {:>10} {:>12}",
                    room.room,
                    room.kind.as_str(),
                    room.head,
                    epoch_hex(room.epoch),
                    room.first_retained,
                    room.events,
                    room.bytes
                )?;
                if let Some(damage) = &room.damage {
                    damaged += 1;
                    writeln!(out, "  DAMAGED: rows cannot be read: {damage}")?;
                }
            }
            if damaged > 0 {
                eprintln!("roomd log: {damaged} damaged room(s); `roomd log verify` says more");
                return Err(LogToolError::Problems(damaged));
            }
        }
        LogCommand::Show { room, after, limit } => {
            let mut after = after;
            let mut left = limit;
            while left > 0 {
                let page = match store.read_events(&room, after, left.min(1_000) as usize)? {
                    Some(page) => page,
                    None => {
                        eprintln!("roomd log: no room {room}");
                        return Err(LogToolError::Problems(1));
                    }
                };
                if page.events.is_empty() {
                    break;
                }
                for event in &page.events {
                    let changes: serde_json::Map<String, serde_json::Value> = event
                        .changes
                        .public
                        .iter()
                        .map(|(k, v)| {
                            let v = v
                                .as_ref()
                                .map_or(serde_json::Value::Null, crate::protocol::json::from_value);
                            (k.clone(), v)
                        })
                        .collect();
                    let line = serde_json::json!({
                        "seq": event.seq,
                        "user": event.user,
                        "ts": event.ts_ms,
                        "op": crate::protocol::json::from_value(&event.op),
                        "changes": changes,
                    });
                    writeln!(out, "{line}")?;
                    after = event.seq;
                    left -= 1;
                }
            }
        }
        LogCommand::Verify => {
            let found = store.verify()?;
            // Rooms with a problem already are not replayed: the replay would only meet
            // the same damage again.
            let flawed: std::collections::BTreeSet<&str> =
                found.iter().map(|problem| problem.room.as_str()).collect();
            let rooms = match store.list_rooms() {
                Ok(rooms) => rooms,
                // A damaged meta table: `verify` reported it; nothing to replay safely.
                Err(e) if e.is_damage() => Vec::new(),
                Err(e) => return Err(e.into()),
            };
            let mut problems: Vec<String> = found.iter().map(|p| p.to_string()).collect();
            for room in rooms {
                if flawed.contains(room.room.as_str()) || room.damage.is_some() {
                    continue;
                }
                if let Err(problem) = replay_room(&store, &room.room) {
                    problems.push(format!("room {}: {problem}", room.room));
                }
            }
            for problem in &problems {
                writeln!(out, "{problem}")?;
            }
            if !problems.is_empty() {
                return Err(LogToolError::Problems(problems.len()));
            }
            writeln!(
                out,
                "ok: every record decodes, seq is gapless, snapshots agree with the log, page checksums match"
            )?;
        }
        LogCommand::Compact => unreachable!("handled above, before the store is opened"),
    }
    Ok(())
}

fn open(dir: &Path) -> Result<Store, StoreError> {
    if !dir.join("FORMAT").exists() {
        return Err(StoreError::Io {
            what: "not a roomd data dir (no FORMAT file)",
            path: dir.to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    Store::open(StoreConfig::new(dir))
}

/// Replays the room from its oldest snapshot (or its creation) through every retained
/// event, checking each later snapshot on the way, and that the result is what the
/// server would load.
fn replay_room(store: &Store, room: &str) -> Result<(), String> {
    let loaded = store
        .load_room(room)
        .map_err(|e| e.to_string())?
        .ok_or("listed but not loadable")?;
    let snapshots = store.room_snapshots(room).map_err(|e| e.to_string())?;
    let (mut state, mut seq) = match snapshots.first() {
        Some(oldest) => (state_of(oldest), oldest.seq),
        None if loaded.first_retained <= 1 => (RoomState::new(), 0),
        None => return Err("the log is trimmed but no snapshot covers its start".into()),
    };
    let mut later = snapshots.iter().skip(1).peekable();
    loop {
        let page = store
            .read_events(room, seq, 1_000)
            .map_err(|e| e.to_string())?
            .ok_or("vanished while verifying")?;
        if page.events.is_empty() {
            break;
        }
        for event in &page.events {
            if event.seq != seq + 1 {
                return Err(format!("expected seq {}, found {}", seq + 1, event.seq));
            }
            apply_all(&mut state, std::slice::from_ref(event));
            seq = event.seq;
            while let Some(snapshot) = later.next_if(|s| s.seq <= seq) {
                if snapshot.seq == seq && !same_entries(&state, &state_of(snapshot)) {
                    return Err(format!(
                        "snapshot at seq {seq} differs from the replayed log"
                    ));
                }
            }
        }
    }
    if seq != loaded.head {
        return Err(format!(
            "replay ends at seq {seq}, the head is {}",
            loaded.head
        ));
    }
    // What the server loads (newest snapshot + tail) must be the replayed state.
    let served = replay(loaded.snapshot.as_ref(), &loaded.events);
    if !same_entries(&served, &state) {
        return Err("newest snapshot plus tail differs from the full replay".into());
    }
    Ok(())
}

/// Compares the live entries and private facts (tombstones may differ by pruning).
fn same_entries(a: &RoomState, b: &RoomState) -> bool {
    a.entries().eq(b.entries()) && a.private_entries().eq(b.private_entries())
}
