//! Room lifecycle: busy rooms coalesce diffs and commits per `--batch-interval`, and
//! idle rooms stop and reload from the store without anything changing for clients.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::Server;

#[tokio::test]
async fn a_busy_room_sends_at_most_one_diff_per_batch_interval() {
    // A long interval makes the coalescing visible: 20 ops sent back to back within far
    // less than 2 s produce at most two diffs (the first leaves at once, the rest wait
    // for the interval), chained and holding every change.
    let server = Server::start(&["--batch-interval", "2s", "--durability", "none"]).await;
    let room = "state:busy";
    let mut alice = server.client("alice").await;
    alice.create_ok(room, "state", json!({})).await;
    let mut bob = server.client("bob").await;
    let snapshot = bob.sub(room).await;
    assert_eq!(snapshot["seq"], 1);
    for i in 0..20 {
        let op = json!({"type": "set", "key": format!("k{i:02}"), "value": i});
        alice.send_op(&format!("o{i}"), room, op).await;
    }
    for i in 0..20 {
        let reply = alice.reply(&format!("o{i}")).await;
        assert_eq!(reply["t"], "ack", "{reply}");
    }
    let diffs = bob
        .collect_until(|v| v["t"] == "diff" && v["to"] == 21)
        .await;
    let diffs: Vec<_> = diffs.into_iter().filter(|v| v["t"] == "diff").collect();
    assert!(
        diffs.len() <= 2,
        "{} diffs for 20 quick ops: {diffs:?}",
        diffs.len()
    );
    assert_eq!(diffs[0]["from"], 2);
    let mut keys = 0;
    for pair in diffs.windows(2) {
        assert_eq!(
            pair[1]["from"].as_u64(),
            pair[0]["to"].as_u64().map(|to| to + 1)
        );
    }
    for diff in &diffs {
        keys += diff["changes"].as_array().map_or(0, Vec::len);
    }
    assert_eq!(keys, 20, "every key once, coalesced: {diffs:?}");
}

#[tokio::test]
async fn a_busy_room_commits_on_its_diff_schedule_unless_ops_come_one_at_a_time() {
    let interval = Duration::from_secs(3);
    // Durable commits (an fsync each) are slow enough that a burst read in one piece
    // lands in the room faster than its first commit.
    let server = Server::start(&["--batch-interval", "3s"]).await;
    let room = "state:aligned";
    let mut alice = server.client("alice").await;
    alice.create_ok(room, "state", json!({})).await;
    let mut bob = server.client("bob").await;
    bob.sub(room).await;
    let set = |id: String, value: u64| {
        Message::text(
            json!({"t": "op", "id": id, "room": room,
                   "op": {"type": "set", "key": "k", "value": value}})
            .to_string(),
        )
    };

    // Quiet room: the first op commits and its diff leaves at once.
    let first_sent = Instant::now();
    alice
        .ack("a0", room, json!({"type": "set", "key": "k", "value": 0}))
        .await;
    let diff = bob.recv_until(|v| v["t"] == "diff").await;
    assert_eq!(
        (diff["from"].as_u64(), diff["to"].as_u64()),
        (Some(2), Some(2))
    );
    assert!(
        first_sent.elapsed() < interval / 2,
        "a quiet room's op waited {:?} for its diff",
        first_sent.elapsed()
    );

    // Ten ops in one write arrive faster than commits land: the room merges them, and
    // from then on holds each batch for the diff timer.
    alice
        .send_all((1..=10).map(|i| set(format!("b{i}"), i)).collect())
        .await;
    for i in 1..=10 {
        let reply = alice.reply(&format!("b{i}")).await;
        assert_eq!(reply["t"], "ack", "{reply}");
    }
    bob.recv_until(|v| v["t"] == "diff" && v["to"] == 12).await;
    let busy_from = Instant::now();

    // Ten ops 20 ms apart wait for the interval, commit together, and are acked as
    // their one diff leaves.
    let commits_before = server.metric("roomd_store_batch_commits_total").await;
    for i in 1..=10 {
        alice.send(set(format!("c{i}"), 10 + i)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 1..=10 {
        let reply = alice.reply(&format!("c{i}")).await;
        assert_eq!(reply["t"], "ack", "{reply}");
    }
    let acked_after = busy_from.elapsed();
    let diff = bob.recv_until(|v| v["t"] == "diff").await;
    assert_eq!(
        (diff["from"].as_u64(), diff["to"].as_u64()),
        (Some(13), Some(22))
    );
    assert_eq!(diff["changes"][0]["v"], 20, "{diff}");
    assert!(
        acked_after >= interval - Duration::from_millis(500),
        "the busy room's ops were acked {acked_after:?} after the previous diff"
    );
    let commits = server.metric("roomd_store_batch_commits_total").await - commits_before;
    assert_eq!(commits, 1.0, "the ten held ops commit together");

    // A client awaiting each ack is not slowed to one op per interval: its first op
    // waits for the timer (the room was merging), the rest commit one by one at once.
    let started = Instant::now();
    for i in 1..=10 {
        let op = json!({"type": "set", "key": "k", "value": 20 + i});
        alice.ack(&format!("d{i}"), room, op).await;
    }
    assert!(
        started.elapsed() < interval + Duration::from_secs(2),
        "ten sequential acked ops took {:?}",
        started.elapsed()
    );

    // Without subscribers nothing waits for a diff either.
    let lonely = "state:lonely";
    alice.create_ok(lonely, "state", json!({})).await;
    let started = Instant::now();
    for i in 0..10 {
        let op = json!({"type": "set", "key": "k", "value": i});
        alice.ack(&format!("l{i}"), lonely, op).await;
    }
    assert!(
        started.elapsed() < interval,
        "ten acked ops without subscribers took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_idle_room_stops_and_reloads_with_the_same_state_epoch_and_op_ids() {
    let server = Server::start(&["--room-idle", "200ms"]).await;
    let room = "state:sleepy";
    let mut alice = server.client("alice").await;
    alice
        .create_ok(room, "state", json!({"entries": {"a": 1}}))
        .await;
    assert_eq!(
        alice
            .ack("i1", room, json!({"type": "incr", "key": "a"}))
            .await,
        2
    );
    let before = server.room_state(room).await;
    // Long enough for several idle checks; the room has no subscriber, so it stops.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let after = server.room_state(room).await;
    assert_eq!(after, before, "reloaded from the log unchanged");
    // The op id record came back with the room: a re-send is answered, not applied.
    assert_eq!(
        alice
            .ack("i1", room, json!({"type": "incr", "key": "a"}))
            .await,
        2
    );
    assert_eq!(server.room_state(room).await["entries"][0]["v"], 2);
}
