//! Resuming a subscription with `since`: `resumed` with the coalesced changes after
//! since.seq when the epoch matches and the log reaches back, else a fresh snapshot.

use serde_json::{json, Value};

use crate::support::{entry, Client, Mirror, Server};

/// A state room at seq 1 (init {"a": 0, "b": 0}) with alice's snapshot of it.
async fn room_at_seq_1(server: &Server, room: &str) -> (Client, Value) {
    let mut alice = server.client("alice").await;
    alice
        .create_ok(room, "state", json!({"entries": {"a": 0, "b": 0}}))
        .await;
    let snapshot = alice.sub(room).await;
    assert_eq!(snapshot["seq"], 1);
    (alice, snapshot)
}

fn since(epoch: &Value, seq: u64) -> Value {
    json!({"epoch": epoch, "seq": seq})
}

#[tokio::test]
async fn resume_returns_coalesced_changes_after_since_including_deletions() {
    let server = Server::start(&[]).await;
    let room = "state:resume";
    let (alice, snapshot) = room_at_seq_1(&server, room).await;
    drop(alice);
    let mut mirror = Mirror::from_snapshot(&snapshot);

    let mut bob = server.client("bob").await;
    bob.ack("1", room, json!({"type": "set", "key": "a", "value": 1}))
        .await; // 2
    bob.ack("2", room, json!({"type": "set", "key": "a", "value": 2}))
        .await; // 3
    bob.ack("3", room, json!({"type": "del", "key": "b"})).await; // 4
    bob.ack(
        "4",
        room,
        json!({"type": "set", "key": "c", "value": "new"}),
    )
    .await; // 5
    bob.ack("5", room, json!({"type": "set", "key": "gone", "value": 1}))
        .await; // 6
    let head = bob
        .ack("6", room, json!({"type": "del", "key": "gone"}))
        .await; // 7
    assert_eq!(head, 7);

    let mut alice = server.client("alice").await;
    let resumed = alice
        .sub_msg(json!({"t": "sub", "room": room, "since": since(&snapshot["epoch"], 1)}))
        .await;
    assert_eq!(resumed["t"], "resumed", "{resumed}");
    assert_eq!(resumed["room"], room);
    assert_eq!(resumed["epoch"], snapshot["epoch"]);
    assert_eq!(resumed["from"], 2, "from is since.seq + 1");
    assert_eq!(resumed["to"], head);
    // Each changed key once, at its latest value; keys created and deleted after `since`
    // are still sent as deletions.
    assert_eq!(
        resumed["changes"],
        json!([
            {"k": "a", "v": 2, "ver": 3},
            {"k": "b", "ver": 4, "del": true},
            {"k": "c", "v": "new", "ver": 5},
            {"k": "gone", "ver": 7, "del": true},
        ])
    );
    mirror.apply(&resumed);
    assert_eq!(mirror.seq, head);
    let state = server.room_state(room).await;
    let expected = Mirror::from_snapshot(&json!({
        "t": "snapshot", "room": room, "epoch": state["epoch"], "seq": state["seq"],
        "entries": state["entries"]
    }));
    assert_eq!(
        mirror.entries, expected.entries,
        "the resumed mirror equals the room"
    );

    // Live diffs continue right after the resumed range.
    let next = bob
        .ack("7", room, json!({"type": "incr", "key": "a"}))
        .await;
    for diff in alice.diffs_until(room, next).await {
        mirror.apply(&diff);
    }
    assert_eq!(mirror.value("a"), Some(&json!(3)));
}

#[tokio::test]
async fn resume_at_head_is_resumed_with_no_changes() {
    let server = Server::start(&[]).await;
    let room = "state:resume-head";
    let (mut alice, snapshot) = room_at_seq_1(&server, room).await;
    let head = alice
        .ack("1", room, json!({"type": "set", "key": "a", "value": 5}))
        .await;
    let mut other = server.client("alice").await;
    let resumed = other
        .sub_msg(json!({"t": "sub", "room": room, "since": since(&snapshot["epoch"], head)}))
        .await;
    assert_eq!(resumed["t"], "resumed", "{resumed}");
    assert_eq!(resumed["from"], head + 1);
    assert_eq!(resumed["to"], head);
    assert_eq!(resumed["changes"], json!([]));
}

#[tokio::test]
async fn resume_from_seq_0_replays_the_whole_room() {
    let server = Server::start(&[]).await;
    let room = "state:resume-zero";
    let (mut alice, snapshot) = room_at_seq_1(&server, room).await;
    let head = alice
        .ack("1", room, json!({"type": "set", "key": "b", "value": 9}))
        .await;
    let mut other = server.client("carol").await;
    let resumed = other
        .sub_msg(json!({"t": "sub", "room": room, "since": since(&snapshot["epoch"], 0)}))
        .await;
    assert_eq!(resumed["t"], "resumed", "{resumed}");
    assert_eq!(resumed["from"], 1);
    assert_eq!(resumed["to"], head);
    assert_eq!(
        resumed["changes"],
        json!([{"k": "a", "v": 0, "ver": 1}, {"k": "b", "v": 9, "ver": head}])
    );
}

#[tokio::test]
async fn resume_with_a_foreign_epoch_gets_a_snapshot_not_recovered() {
    let server = Server::start(&[]).await;
    let room = "state:resume-epoch";
    let (mut alice, snapshot) = room_at_seq_1(&server, room).await;
    let head = alice
        .ack("1", room, json!({"type": "set", "key": "a", "value": 1}))
        .await;
    let epoch = snapshot["epoch"].as_str().unwrap();
    let foreign = format!(
        "{}{}",
        if epoch.starts_with('0') { "1" } else { "0" },
        &epoch[1..]
    );
    let mut other = server.client("alice").await;
    let answer = other
        .sub_msg(json!({"t": "sub", "room": room, "since": {"epoch": foreign, "seq": 1}}))
        .await;
    assert_eq!(answer["t"], "snapshot", "{answer}");
    assert_eq!(answer["recovered"], false);
    assert_eq!(answer["epoch"], snapshot["epoch"]);
    assert_eq!(answer["seq"], head);
    assert_eq!(entry(&answer["entries"], "a").unwrap()["v"], 1);
}

#[tokio::test]
async fn resume_beyond_head_gets_a_snapshot_not_recovered() {
    let server = Server::start(&[]).await;
    let room = "state:resume-ahead";
    let (_alice, snapshot) = room_at_seq_1(&server, room).await;
    let mut other = server.client("alice").await;
    let answer = other
        .sub_msg(json!({"t": "sub", "room": room, "since": since(&snapshot["epoch"], 50)}))
        .await;
    assert_eq!(answer["t"], "snapshot", "{answer}");
    assert_eq!(answer["recovered"], false);
    assert_eq!(answer["seq"], 1);
    Mirror::from_snapshot(&answer);
}

#[tokio::test]
async fn resumed_subscriber_receives_the_next_diff_chained_to_it() {
    let server = Server::start(&[]).await;
    let room = "chat:resume-live";
    let mut alice = server.client("alice").await;
    alice.create_ok(room, "chat", json!({})).await;
    let snapshot = alice.sub(room).await;
    let mut mirror = Mirror::from_snapshot(&snapshot);
    let posted = alice
        .ack("1", room, json!({"type": "post", "text": "before"}))
        .await;
    for diff in alice.diffs_until(room, posted).await {
        mirror.apply(&diff);
    }
    // Reconnect and resume from the mirror's position.
    drop(alice);
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    let missed = bob
        .ack("1", room, json!({"type": "post", "text": "missed"}))
        .await;
    let resumed = alice
        .sub_msg(json!({"t": "sub", "room": room, "since": since(&snapshot["epoch"], mirror.seq)}))
        .await;
    assert_eq!(resumed["t"], "resumed", "{resumed}");
    mirror.apply(&resumed);
    assert_eq!(
        mirror.value(&format!("msg/{missed}")).unwrap()["text"],
        "missed"
    );
    let live = bob
        .ack("2", room, json!({"type": "post", "text": "live"}))
        .await;
    for diff in alice.diffs_until(room, live).await {
        mirror.apply(&diff);
    }
    assert_eq!(mirror.entries.len(), 3);
}
