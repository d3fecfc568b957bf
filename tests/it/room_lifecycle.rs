//! Room lifecycle: busy rooms coalesce diffs per `--batch-interval`, and idle rooms stop
//! and reload from the store without anything changing for clients.

use serde_json::json;

use crate::support::Server;

#[tokio::test]
async fn a_busy_room_sends_at_most_one_diff_per_batch_interval() {
    // A long interval makes the coalescing visible: 20 ops committed one after another
    // within far less than 2 s can produce at most two diffs (the first leaves at once,
    // the rest wait for the interval), chained and holding every change.
    let server = Server::start(&["--batch-interval", "2s", "--durability", "none"]).await;
    let room = "state:busy";
    let mut alice = server.client("alice").await;
    alice.create_ok(room, "state", json!({})).await;
    let mut bob = server.client("bob").await;
    let snapshot = bob.sub(room).await;
    assert_eq!(snapshot["seq"], 1);
    for i in 0..20 {
        let op = json!({"type": "set", "key": format!("k{i:02}"), "value": i});
        alice.ack(&format!("o{i}"), room, op).await;
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
