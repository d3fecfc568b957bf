//! The cost of making events durable: `Store::submit` of batches of 1, 16 and 256 event
//! records, for one room and for 100 rooms at once, under `Durability::Immediate` and
//! `Durability::None` (sync interval 100 ms, the server's default), on a fresh data dir
//! under `target/tmp` (the project's disk, not a tmpfs).
//!
//! One iteration is one round: one batch per room is submitted, and the clock stops only
//! when every batch's receiver has answered Ok, i.e. after the writer queue drained and
//! the transaction that holds the round committed. With one room the time per iteration
//! is the commit latency of one batch; with 100 rooms it is the latency of the last of
//! 100 batches the writer group-commits together. Throughput is appends (events) per
//! second. The records are built before the clock starts; encoding them into rows is
//! the writer's job and is timed.
//!
//! Each event is what `roomd bench ingest` makes the server log (`ingest_event`), so
//! these numbers sit between `redb_ceiling` (raw redb, same row size) and the server's
//! `roomd bench ingest`.
//!
//! Run: `cargo bench --bench store_append` (add `-- --quick` for a shorter run).

mod ingest_event;

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use roomd::store::{Batch, Durability, RoomMeta, Store, StoreConfig};
use tempfile::TempDir;

use ingest_event::{create_event, set_event};

/// An open store with `rooms` created, and the head seq of each.
struct Log {
    /// Dropped before `_dir`: shutting down commits, syncs and closes the file first.
    store: Store,
    rooms: Vec<String>,
    heads: Vec<u64>,
    _dir: TempDir,
}

impl Log {
    fn open(durability: Durability, n_rooms: usize) -> Log {
        let dir = tempfile::Builder::new()
            .prefix("store_append-")
            .tempdir_in(Path::new(env!("CARGO_TARGET_TMPDIR")))
            .expect("target/tmp is writable");
        let store = Store::open(StoreConfig {
            durability,
            ..StoreConfig::new(dir.path())
        })
        .expect("a fresh data dir opens");
        let rooms: Vec<String> = (0..n_rooms).map(|r| format!("state:bench-{r}")).collect();
        let mut log = Log {
            store,
            heads: vec![0; n_rooms],
            rooms,
            _dir: dir,
        };
        let creates = log
            .rooms
            .iter()
            .map(|room| Batch {
                create: Some(RoomMeta {
                    kind: "state".to_owned(),
                    epoch: 1,
                }),
                events: vec![create_event()],
                ..Batch::new(room.clone())
            })
            .collect();
        log.commit(creates);
        log.heads.fill(1);
        log
    }

    /// Submits `batches` and waits for every one of them to be committed.
    fn commit(&self, batches: Vec<Batch>) {
        let receivers: Vec<_> = batches
            .into_iter()
            .map(|batch| {
                self.store
                    .submit(batch)
                    .expect("the writer queue (4,096 batches) holds a round of 100")
            })
            .collect();
        for receiver in receivers {
            receiver
                .blocking_recv()
                .expect("the writer answers every batch")
                .expect("the commit succeeds on a healthy disk");
        }
    }

    /// One round: a batch of `batch_len` events for every room, committed. Returns the
    /// time from the first submit to the last answer.
    fn round(&mut self, batch_len: u64) -> Duration {
        let batches: Vec<Batch> = self
            .rooms
            .iter()
            .zip(&self.heads)
            .map(|(room, head)| Batch {
                events: (head + 1..=head + batch_len).map(set_event).collect(),
                ..Batch::new(room.clone())
            })
            .collect();
        let start = Instant::now();
        self.commit(batches);
        let elapsed = start.elapsed();
        for head in &mut self.heads {
            *head += batch_len;
        }
        elapsed
    }
}

fn store_append(c: &mut Criterion) {
    let durabilities = [
        ("immediate", Durability::Immediate),
        (
            "none",
            Durability::None {
                sync_interval: Duration::from_millis(100),
            },
        ),
    ];
    let mut group = c.benchmark_group("store_append");
    // Rounds take milliseconds (an fsync) to a second (25,600 appends): few samples of
    // equal length rather than criterion's linear ramp.
    group.sampling_mode(SamplingMode::Flat).sample_size(10);
    for (durability_name, durability) in durabilities {
        for n_rooms in [1usize, 100] {
            for batch_len in [1u64, 16, 256] {
                let mut log = Log::open(durability, n_rooms);
                group.throughput(Throughput::Elements(n_rooms as u64 * batch_len));
                group.bench_function(
                    BenchmarkId::new(format!("{durability_name}/rooms_{n_rooms}"), batch_len),
                    |b| b.iter_custom(|iters| (0..iters).map(|_| log.round(batch_len)).sum()),
                );
            }
        }
    }
    group.finish();
}

criterion_group! {
    name = store_append_benches;
    // Short defaults for a 2-core dev machine; command-line flags still override them.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = store_append
}
criterion_main!(store_append_benches);
