//! The raw redb ceiling under roomd's store: how many commits and appends per second
//! redb itself sustains on this disk, with no queue, no group commit and no encoding,
//! so `store_append` and `roomd bench ingest` can be read against it in the same run.
//!
//! Rows are the size of roomd's event row for the event `roomd bench ingest` makes the
//! server log (`ingest_event`). The row encoding is private to the store, so the size
//! is measured through the public API first (the growth of `Store::list_rooms` bytes
//! over 1,000 such events, averaged) and the ceiling appends opaque blobs of that size.
//! Keys are `(room, seq)` in a table named `events`, as in the store, with the store's
//! cache size. Each batch of 1, 16 or 256 rows is one write transaction, under
//! `Durability::Immediate` (fsync'd) and `Durability::None` (never fsync'd: above what
//! the store's `none`, which fsyncs every 100 ms, can reach), with quick repair off
//! and on (the store runs with it on: one more fsync per durable commit). Each case runs
//! on a fresh database under `target/tmp` for `ROOMD_CEILING_SECS` seconds (default
//! 1.5) and reports commits/s, appends/s and the commit latency p50/p99, as a table and
//! one JSON line.
//!
//! `ROOMD_CEILING_SHAPES` adds cases shaped like a measured ingest run, so the ceiling
//! appends what that run's commits held: a comma-separated list of
//! `EVENTS:ROOM_BATCHES:ROOMS` (e.g. `479:42:100`: each commit appends 479 rows spread
//! evenly over 42 of 100 rooms, taken round-robin, each room's rows at its next seqs).
//! They run with quick repair on, under both durabilities. `benches/ingest/matrix.sh`
//! passes the shapes its closed-loop runs measured.
//!
//! Run: `cargo bench --bench redb_ceiling`.

mod ingest_event;

use std::error::Error;
use std::path::Path;
use std::time::{Duration, Instant};

use redb::{ReadableDatabase as _, ReadableTableMetadata as _, TableDefinition};
use roomd::store::{Batch, RoomMeta, Store, StoreConfig, DEFAULT_CACHE_BYTES, QUICK_REPAIR};
use serde_json::json;
use tempfile::TempDir;

use ingest_event::{create_event, set_event};

/// The store's event table layout: `(room, seq)` -> row.
const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
const ROOM: &str = "state:ingest-ceiling-0";
/// Events whose rows are averaged to find the row size.
const N_SIZED: u64 = 1_000;

fn scratch_dir(prefix: &str) -> Result<TempDir, Box<dyn Error>> {
    Ok(tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(Path::new(env!("CARGO_TARGET_TMPDIR")))?)
}

/// The mean stored size of an ingest event row, read through `Store::list_rooms`.
fn ingest_row_bytes() -> Result<usize, Box<dyn Error>> {
    let dir = scratch_dir("redb_ceiling-size-")?;
    let store = Store::open(StoreConfig::new(dir.path()))?;
    let commit = |batch: Batch| -> Result<(), Box<dyn Error>> {
        store.submit(batch)?.blocking_recv()??;
        Ok(())
    };
    let stored_bytes = || -> Result<u64, Box<dyn Error>> {
        let rooms = store.list_rooms()?;
        Ok(rooms.iter().map(|r| r.bytes).sum())
    };
    commit(Batch {
        create: Some(RoomMeta {
            kind: "state".to_owned(),
            epoch: 1,
        }),
        events: vec![create_event()],
        ..Batch::new(ROOM)
    })?;
    let before = stored_bytes()?;
    commit(Batch {
        events: (2..2 + N_SIZED).map(set_event).collect(),
        ..Batch::new(ROOM)
    })?;
    let after = stored_bytes()?;
    store.shutdown();
    Ok(((after - before) as f64 / N_SIZED as f64).round() as usize)
}

/// One measured case: `batch` rows per commit over `room_batches` of `rooms` rooms.
struct Case {
    durability: &'static str,
    quick_repair: bool,
    batch: u64,
    room_batches: u64,
    rooms: u64,
}

/// One commit shape: `(events, room_batches, rooms)`.
type Shape = (u64, u64, u64);

/// Parses `ROOMD_CEILING_SHAPES` (see the header).
fn shapes() -> Result<Vec<Shape>, Box<dyn Error>> {
    let Ok(list) = std::env::var("ROOMD_CEILING_SHAPES") else {
        return Ok(Vec::new());
    };
    let mut shapes = Vec::new();
    for shape in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let parts: Vec<u64> = shape
            .split(':')
            .map(|n| n.trim().parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("ROOMD_CEILING_SHAPES: {shape:?}: {e}"))?;
        let [events, room_batches, rooms] = parts[..] else {
            return Err(format!(
                "ROOMD_CEILING_SHAPES: {shape:?} is not EVENTS:ROOM_BATCHES:ROOMS"
            )
            .into());
        };
        if events == 0 || room_batches == 0 || room_batches > rooms || room_batches > events {
            return Err(format!(
                "ROOMD_CEILING_SHAPES: {shape:?} needs 0 < ROOM_BATCHES <= ROOMS and <= EVENTS"
            )
            .into());
        }
        shapes.push((events, room_batches, rooms));
    }
    Ok(shapes)
}

struct Outcome {
    commits: u64,
    elapsed: Duration,
    /// Every commit's latency, sorted.
    latencies: Vec<Duration>,
}

impl Outcome {
    fn commits_per_s(&self) -> f64 {
        self.commits as f64 / self.elapsed.as_secs_f64()
    }

    fn quantile_us(&self, q: f64) -> f64 {
        let i = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        self.latencies[i].as_secs_f64() * 1e6
    }
}

/// Appends `case.batch` rows of `row_bytes` per write transaction for `run_for`, spread
/// over `case.room_batches` rooms per commit (round-robin over `case.rooms`).
fn run(case: &Case, row_bytes: usize, run_for: Duration) -> Result<Outcome, Box<dyn Error>> {
    let dir = scratch_dir("redb_ceiling-")?;
    let db = redb::Builder::new()
        .set_cache_size(DEFAULT_CACHE_BYTES)
        .create(dir.path().join("ceiling.redb"))?;
    let setup = db.begin_write()?;
    setup.open_table(EVENTS)?;
    setup.commit()?;

    // Not constant bytes, in case a layer below redb compresses or deduplicates.
    let row: Vec<u8> = (0..row_bytes).map(|i| (i * 131 % 251) as u8).collect();
    let durability = match case.durability {
        "immediate" => redb::Durability::Immediate,
        _ => redb::Durability::None,
    };
    let room_ids: Vec<String> = (0..case.rooms).map(|r| format!("{ROOM}-{r:05}")).collect();
    let mut heads = vec![0u64; room_ids.len()];
    let mut next_room = 0usize;
    let mut seq = 0u64;
    let mut latencies = Vec::new();
    let start = Instant::now();
    while start.elapsed() < run_for {
        let began = Instant::now();
        let mut txn = db.begin_write()?;
        txn.set_durability(durability)?;
        txn.set_quick_repair(case.quick_repair);
        {
            let mut events = txn.open_table(EVENTS)?;
            for b in 0..case.room_batches {
                // Even shares; the first `batch % room_batches` rooms take one more.
                let share =
                    case.batch / case.room_batches + u64::from(b < case.batch % case.room_batches);
                let room = next_room;
                next_room = (next_room + 1) % room_ids.len();
                for _ in 0..share {
                    heads[room] += 1;
                    seq += 1;
                    events.insert((room_ids[room].as_str(), heads[room]), row.as_slice())?;
                }
            }
        }
        txn.commit()?;
        latencies.push(began.elapsed());
    }
    let elapsed = start.elapsed();
    // Every row is there: the ceiling measured real appends.
    let rows = db.begin_read()?.open_table(EVENTS)?.len()?;
    assert_eq!(rows, seq, "every appended row is stored");
    latencies.sort();
    Ok(Outcome {
        commits: latencies.len() as u64,
        elapsed,
        latencies,
    })
}

fn main() -> Result<(), Box<dyn Error>> {
    let run_for = match std::env::var("ROOMD_CEILING_SECS") {
        Ok(secs) => Duration::from_secs_f64(secs.parse()?),
        Err(_) => Duration::from_millis(1_500),
    };
    let row_bytes = ingest_row_bytes()?;
    println!(
        "redb ceiling: rows of {row_bytes} B (roomd's row of an ingest `set`), key (room, seq), \
         one write transaction per batch, cache {} MiB, {:.1} s per case; \
         the store runs with quick_repair = {QUICK_REPAIR}",
        DEFAULT_CACHE_BYTES >> 20,
        run_for.as_secs_f64()
    );
    println!(
        "{:<10} {:>12} {:>6} {:>11} {:>12} {:>14} {:>14}",
        "durability",
        "quick_repair",
        "batch",
        "commits/s",
        "appends/s",
        "commit p50 us",
        "commit p99 us"
    );
    let mut results = Vec::new();
    for quick_repair in [false, true] {
        for durability in ["immediate", "none"] {
            for batch in [1u64, 16, 256] {
                let case = Case {
                    durability,
                    quick_repair,
                    batch,
                    room_batches: 1,
                    rooms: 1,
                };
                let outcome = run(&case, row_bytes, run_for)?;
                let commits_per_s = outcome.commits_per_s();
                let appends_per_s = commits_per_s * batch as f64;
                let (p50, p99) = (outcome.quantile_us(0.5), outcome.quantile_us(0.99));
                println!(
                    "{durability:<10} {quick_repair:>12} {batch:>6} {commits_per_s:>11.0} \
                     {appends_per_s:>12.0} {p50:>14.0} {p99:>14.0}"
                );
                results.push(json!({
                    "durability": durability,
                    "quick_repair": quick_repair,
                    "batch": batch,
                    "commits": outcome.commits,
                    "commits_per_s": commits_per_s.round(),
                    "appends_per_s": appends_per_s.round(),
                    "commit_p50_us": p50.round(),
                    "commit_p99_us": p99.round(),
                }));
            }
        }
    }
    let shaped = shapes()?;
    if !shaped.is_empty() {
        println!("shaped like the ingest runs (quick_repair = true):");
        println!(
            "{:<10} {:>7} {:>13} {:>6} {:>11} {:>12} {:>14} {:>14}",
            "durability",
            "events",
            "room_batches",
            "rooms",
            "commits/s",
            "appends/s",
            "commit p50 us",
            "commit p99 us"
        );
    }
    let mut shaped_results = Vec::new();
    for &(batch, room_batches, rooms) in &shaped {
        for durability in ["immediate", "none"] {
            let case = Case {
                durability,
                quick_repair: true,
                batch,
                room_batches,
                rooms,
            };
            let outcome = run(&case, row_bytes, run_for)?;
            let commits_per_s = outcome.commits_per_s();
            let appends_per_s = commits_per_s * batch as f64;
            let (p50, p99) = (outcome.quantile_us(0.5), outcome.quantile_us(0.99));
            println!(
                "{durability:<10} {batch:>7} {room_batches:>13} {rooms:>6} {commits_per_s:>11.0} \
                 {appends_per_s:>12.0} {p50:>14.0} {p99:>14.0}"
            );
            shaped_results.push(json!({
                "durability": durability,
                "events": batch,
                "room_batches": room_batches,
                "rooms": rooms,
                "commits_per_s": commits_per_s.round(),
                "appends_per_s": appends_per_s.round(),
                "commit_p50_us": p50.round(),
                "commit_p99_us": p99.round(),
            }));
        }
    }
    println!(
        "{}",
        json!({
            "bench": "redb_ceiling",
            "row_bytes": row_bytes,
            "secs_per_case": run_for.as_secs_f64(),
            "results": results,
            "shaped": shaped_results,
        })
    );
    Ok(())
}
