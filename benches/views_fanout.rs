//! Fan-out of one diff by a room's thread, with and without per-viewer entries, in the
//! same run: a room of 2 players and 5,000 spectators (`ROOMD_VIEWS_SPECTATORS`), every
//! subscriber on JSON. Each round builds the diff of one rock-paper-scissors move the
//! way `Room::send_unsent` does (a shared diff is encoded once; a diff touching a hidden
//! entry is planned into its distinct views, each encoded once) and hands every
//! subscriber its frame (a reference-counted clone, as the outbound queues take it).
//!
//!   cargo bench --bench views_fanout
//!
//! "shared" is a diff of two public entries (`round`, `score/alice`); "per-viewer" is
//! a diff of a hidden `move/alice` (alice only) and the public `round`, which costs three
//! views. Prints diffs/s and deliveries/s for each, for `ROOMD_VIEWS_SECS` (3) seconds
//! each. No network: this is the room thread's share of fan-out, the part per-viewer
//! views change; the sockets' share is `roomd bench fanout`'s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use roomd::kind::{Audience, Slot};
use roomd::outbound::{encode, Frame};
use roomd::protocol::message::ServerMsg;
use roomd::protocol::Encoding;
use roomd::room::views::{DiffChanges, Seen};
use roomd::value::Value;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn diff_of(changes: Vec<roomd::protocol::message::WireEntry>, seq: u64) -> ServerMsg {
    ServerMsg::Diff {
        room: "rps:bench".into(),
        epoch: 7,
        from: seq,
        to: seq,
        changes,
    }
}

/// One diff to every subscriber, as the room sends it; returns the encodings made.
fn fan_out(
    changes: &DiffChanges,
    users: &[Arc<str>],
    queues: &mut [Vec<Frame>],
    seq: u64,
) -> usize {
    if changes.is_shared() {
        let frame = encode(&diff_of(changes.shared_entries(), seq), Encoding::Json);
        for queue in queues.iter_mut() {
            queue.push(frame.clone());
        }
        return 1;
    }
    let plan = changes.plan(users.iter().map(|u| &**u));
    let frames: Vec<Frame> = plan
        .views
        .into_iter()
        .map(|view| encode(&diff_of(view, seq), Encoding::Json))
        .collect();
    for (queue, view) in queues.iter_mut().zip(plan.of_subscriber) {
        queue.push(frames[view].clone());
    }
    frames.len()
}

fn run(name: &str, changes: &DiffChanges, users: &[Arc<str>], secs: u64) {
    let mut queues: Vec<Vec<Frame>> = vec![Vec::new(); users.len()];
    let start = Instant::now();
    let mut diffs = 0u64;
    let mut encodings = 0usize;
    while start.elapsed() < Duration::from_secs(secs) {
        encodings = fan_out(changes, users, &mut queues, diffs + 1);
        diffs += 1;
        // The writers take the frames off the queues in the real server.
        if diffs.is_multiple_of(16) {
            queues.iter_mut().for_each(Vec::clear);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{name:>10}: {:>8.0} diffs/s, {:>11.0} deliveries/s, {encodings} encoding(s) per diff",
        diffs as f64 / elapsed,
        diffs as f64 * users.len() as f64 / elapsed
    );
}

fn main() {
    let spectators = env_or("ROOMD_VIEWS_SPECTATORS", 5_000) as usize;
    let secs = env_or("ROOMD_VIEWS_SECS", 3);
    let mut users: Vec<Arc<str>> = vec![Arc::from("alice"), Arc::from("bob")];
    users.extend((0..spectators).map(|i| Arc::from(format!("spectator{i}").as_str())));

    let mut shared = DiffChanges::default();
    shared
        .slots
        .insert("round".into(), Slot::new(Some(Value::Int(2)), 9));
    shared
        .slots
        .insert("score/alice".into(), Slot::new(Some(Value::Int(1)), 9));

    let mut hidden = DiffChanges::default();
    let mut secret = Slot::new(Some(Value::Str("rock".into())), 9);
    secret.audience = Some(Arc::new(Audience::new(["alice"])));
    hidden.slots.insert("move/alice".into(), secret);
    hidden
        .slots
        .insert("round".into(), Slot::new(Some(Value::Int(2)), 9));
    hidden.before.insert("move/alice".into(), Seen::Nobody);

    println!(
        "{} subscribers (2 players, {spectators} spectators), JSON",
        users.len()
    );
    run("shared", &shared, &users, secs);
    run("per-viewer", &hidden, &users, secs);
}
