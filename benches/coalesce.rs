//! The cost of coalescing a batch's diff: N accepted events (N = 1, 16, 256), each a
//! `set` of a small map to one of K keys (K = 1, 16, N, up to N), applied to the room's
//! state with `RoomState::apply_handing_back` (each key's slot from before the batch
//! kept by `Batch::note_prior`) and added to a room batch with `Batch::add_event`, then
//! `Batch::take_changes` builds the K-entry diff from the priors' keys and the state.
//!
//! This is the per-event bookkeeping of a Room between the reducer and the commit: the
//! apply, the priors (the batch's undo and the keys of its diff), the batch byte count
//! and the reply list, and the diff built once the batch lands (only when someone is
//! told). The event records, the state and the reply handles are built before the
//! clock starts (in the room they already exist by then), and the batch and state are
//! dropped after it stops. Throughput is in events.
//!
//! Run: `cargo bench --bench coalesce` (add `-- --quick` for a shorter run).

// Each bench uses part of the shared rooms.
#[allow(dead_code)]
mod rooms;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use roomd::kind::{Changes, RoomState};
use roomd::room::batch::Batch;
use roomd::room::messages::ReplyTo;
use roomd::store::EventRecord;
use tokio::sync::oneshot;

use rooms::{object_key, set_op, small_map, user};

const EPOCH: u64 = 0x9f3c_51a2_0b7e_d4c8;
/// The first seq of the batch: the room already holds 1,000 events.
const FIRST_SEQ: u64 = 1_001;

/// One accepted event as the room hands it to its batch.
struct Event {
    record: EventRecord,
    reply: ReplyTo,
}

/// `n_events` events writing keys `0..n_keys` round robin.
fn events(n_events: u64, n_keys: u64) -> Vec<Event> {
    (0..n_events)
        .map(|i| {
            let key = object_key(i % n_keys);
            let value = small_map(i % n_keys, i);
            let user = user(i);
            let (reply, _) = oneshot::channel();
            Event {
                record: EventRecord {
                    seq: FIRST_SEQ + i,
                    user,
                    ts_ms: 1_750_000_000_000 + i as i64,
                    op: set_op(&key, value.clone()),
                    changes: Changes {
                        public: vec![(key, Some(value))],
                        private: vec![],
                    },
                    op_id: Some(format!("c{i}")),
                },
                reply: ReplyTo::http(reply),
            }
        })
        .collect()
}

fn coalesce(c: &mut Criterion) {
    let mut group = c.benchmark_group("coalesce");
    for n_events in [1u64, 16, 256] {
        let mut key_counts = vec![1u64, 16, n_events];
        key_counts.retain(|k| *k <= n_events);
        key_counts.dedup();
        for n_keys in key_counts {
            group.throughput(Throughput::Elements(n_events));
            group.bench_function(
                BenchmarkId::new(format!("events_{n_events}"), format!("keys_{n_keys}")),
                |b| {
                    b.iter_batched(
                        // An empty room: every key of the batch is new to it.
                        || (events(n_events, n_keys), RoomState::new()),
                        |(events, mut state)| {
                            let mut batch = Batch::new(FIRST_SEQ, 0);
                            for e in events {
                                let undo = state.apply_handing_back(
                                    e.record.seq,
                                    &e.record.changes,
                                    |key, before| batch.note_prior(key, before),
                                );
                                batch.add_event(e.record, undo, e.reply, EPOCH);
                            }
                            // No batch after this one changed a key again.
                            let diff = batch.take_changes(std::iter::empty(), &state);
                            assert_eq!(diff.len() as u64, n_keys);
                            (batch, diff, state)
                        },
                        BatchSize::SmallInput,
                    )
                },
            );
        }
    }
    group.finish();
}

criterion_group! {
    name = coalesce_benches;
    // Short defaults for a 2-core dev machine; command-line flags still override them.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = coalesce
}
criterion_main!(coalesce_benches);
