//! The cost of one accepted op inside a Room: `RoomState::reduce` (validate, compute the
//! changes) plus `RoomState::apply` (write them, keep the undo), for each room kind on a
//! room of realistic size:
//!
//! - `chat_post`: a post to a chat room holding its full history of 500 messages, so
//!   every post also evicts the oldest one.
//! - `poll_vote`: a voter of a 4-option poll with 10,000 voters changes their vote.
//! - `state_set`: a `set` of a small map over one of 1,000 such keys.
//! - `state_incr`: an `incr` of one of 64 counters in that same 1,000-key room.
//!
//! Each iteration is the next event of one long-lived room (its seq grows), and the ops
//! are built before the clock starts; dropping the undo is timed, as the room drops it
//! once the event is committed.
//!
//! Run: `cargo bench --bench reducers` (add `-- --quick` for a shorter run).

// Each bench uses part of the shared rooms.
#[allow(dead_code)]
mod rooms;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use roomd::kind::Limits;
use roomd::value::Value;

use rooms::{
    chat_room, ctx, incr_op, message_text, object_key, poll_room, post_op, set_op, small_map,
    state_room, user, vote_op, voter, Room,
};

const N_VOTERS: u64 = 10_000;
const N_OPTIONS: u64 = 4;
const N_COUNTERS: u64 = 64;

/// Times reduce + apply of `op_of(n)` by `user_of(n)` as the room's next event, n = 0, 1, ...
fn bench_op<'a>(
    c: &mut Criterion,
    name: &str,
    mut room: Room,
    user_of: impl Fn(u64) -> &'a str,
    op_of: impl Fn(u64) -> &'a Value,
) {
    let limits = Limits::default();
    let mut n = 0u64;
    c.benchmark_group("reduce_apply")
        .throughput(Throughput::Elements(1))
        .bench_function(name, |b| {
            b.iter(|| {
                let seq = room.head + 1;
                let changes = room
                    .kind
                    .reduce(
                        &room.state,
                        black_box(op_of(n)),
                        &ctx(user_of(n), seq),
                        &limits,
                    )
                    .expect("every op of these benches is accepted");
                let undo = room.state.apply(seq, &changes);
                room.head = seq;
                n += 1;
                undo
            })
        });
}

fn chat(c: &mut Criterion) {
    let users: Vec<String> = (0..50).map(user).collect();
    let ops: Vec<Value> = (500..564).map(|i| post_op(message_text(i))).collect();
    bench_op(
        c,
        "chat_post",
        chat_room(500),
        |n| &users[(n % 50) as usize],
        |n| &ops[(n % 64) as usize],
    );
}

fn poll(c: &mut Criterion) {
    let voters: Vec<String> = (0..N_VOTERS).map(voter).collect();
    let ops: Vec<Value> = (0..N_OPTIONS).map(|o| vote_op(o as i64)).collect();
    // `poll_room` gives voter i option i % 4; pass r moves everyone to (i + r) % 4, so
    // every vote changes two counts.
    bench_op(
        c,
        "poll_vote",
        poll_room(N_VOTERS, N_OPTIONS),
        |n| &voters[(n % N_VOTERS) as usize],
        |n| {
            let (i, pass) = (n % N_VOTERS, n / N_VOTERS + 1);
            &ops[((i + pass) % N_OPTIONS) as usize]
        },
    );
}

fn state(c: &mut Criterion) {
    let users: Vec<String> = (0..50).map(user).collect();
    // Two rounds of values, so each set really changes the key it writes.
    let sets: Vec<Value> = (0..2_000)
        .map(|n| set_op(&object_key(n % 1_000), small_map(n % 1_000, 1 + n / 1_000)))
        .collect();
    bench_op(
        c,
        "state_set",
        state_room(1_000),
        |n| &users[(n % 50) as usize],
        |n| &sets[(n % 2_000) as usize],
    );

    let counter = |i: u64| format!("score/{i:02}");
    let mut room = state_room(1_000);
    for i in 0..N_COUNTERS {
        room.submit(&user(i), &incr_op(&counter(i), 1));
    }
    let incrs: Vec<Value> = (0..N_COUNTERS).map(|i| incr_op(&counter(i), 3)).collect();
    bench_op(
        c,
        "state_incr",
        room,
        |n| &users[(n % 50) as usize],
        |n| &incrs[(n % N_COUNTERS) as usize],
    );
}

criterion_group! {
    name = reducers;
    // Short defaults for a 2-core dev machine; command-line flags still override them.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = chat, poll, state
}
criterion_main!(reducers);
