//! What survives the process: a graceful restart keeps state, epoch, seq and op ids; a
//! kill -9 loses no acked op and leaves the log gapless; SIGTERM closes sessions with 4002,
//! commits and exits 0.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{entry, Server};

#[tokio::test]
async fn restart_keeps_state_epoch_seq_and_op_ids() {
    let mut server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice
        .create_ok("state:restart", "state", json!({"entries": {"a": 1}}))
        .await;
    alice
        .create_ok(
            "poll:restart",
            "poll",
            json!({"question": "q", "options": ["x", "y"]}),
        )
        .await;
    alice.create_ok("chat:restart", "chat", json!({})).await;
    let set = alice
        .ack(
            "s1",
            "state:restart",
            json!({"type": "set", "key": "b", "value": [1, 2]}),
        )
        .await;
    alice
        .ack("v1", "poll:restart", json!({"type": "vote", "option": 1}))
        .await;
    alice
        .ack(
            "p1",
            "chat:restart",
            json!({"type": "post", "text": "persisted"}),
        )
        .await;
    let mut before = BTreeMap::new();
    for room in ["state:restart", "poll:restart", "chat:restart"] {
        before.insert(room, server.room_state(room).await);
    }
    drop(alice);

    server.restart().await;
    assert_eq!(server.get("/readyz").await.status, 200);
    for (room, state) in &before {
        assert_eq!(
            &server.room_state(room).await,
            state,
            "{room} changed across a restart"
        );
    }

    let mut alice = server.client("alice").await;
    // The op id record survived: the re-sent op is answered, not applied again.
    let again = alice
        .ack(
            "s1",
            "state:restart",
            json!({"type": "set", "key": "b", "value": "twice"}),
        )
        .await;
    assert_eq!(again, set);
    // Seqs continue where they stopped.
    let next = alice
        .ack("s2", "state:restart", json!({"type": "incr", "key": "c"}))
        .await;
    assert_eq!(next, before["state:restart"]["seq"].as_u64().unwrap() + 1);
    // A client holding the old position resumes instead of starting over.
    let resumed = alice
        .sub_msg(json!({"t": "sub", "room": "state:restart",
                        "since": {"epoch": before["state:restart"]["epoch"], "seq": 1}}))
        .await;
    assert_eq!(resumed["t"], "resumed", "{resumed}");
    assert_eq!(
        resumed["changes"],
        json!([{"k": "b", "v": [1, 2], "ver": set}, {"k": "c", "v": 1, "ver": next}])
    );
}

#[tokio::test]
async fn kill_9_loses_no_acked_op_and_leaves_the_log_gapless() {
    let mut server = Server::start(&["--op-rate", "100000", "--op-burst", "100000"]).await;
    let room = "state:crash";
    let n_ops = 300;
    let mut alice = server.client("alice").await;
    alice.create_ok(room, "state", json!({})).await;
    let op = |i: usize| json!({"type": "set", "key": format!("k{i:03}"), "value": i});
    for i in 0..n_ops {
        alice.send_op(&format!("w{i}"), room, op(i)).await;
    }
    // Kill while later ops may still be in flight.
    let mut acked = BTreeMap::new();
    for i in 0..n_ops / 2 {
        let reply = alice.reply(&format!("w{i}")).await;
        assert_eq!(reply["t"], "ack", "{reply}");
        acked.insert(i, reply["seq"].as_u64().unwrap());
    }
    server.kill9().await;
    drop(alice);
    server.restart().await;

    let state = server.room_state(room).await;
    let head = state["seq"].as_u64().unwrap();
    for (i, seq) in &acked {
        let found = entry(&state["entries"], &format!("k{i:03}"))
            .unwrap_or_else(|| panic!("acked op w{i} (seq {seq}) lost in the crash"));
        assert_eq!(found["v"], *i);
        assert_eq!(found["ver"], *seq);
    }
    // Every event 2..=head created exactly one key: no gap, no duplicate.
    let mut vers: Vec<u64> = state["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ver"].as_u64().unwrap())
        .collect();
    vers.sort();
    assert_eq!(
        vers,
        (2..=head).collect::<Vec<u64>>(),
        "seqs must be gapless"
    );

    // Re-sending everything applies each op exactly once overall.
    let mut alice = server.client("alice").await;
    for i in 0..n_ops {
        alice.send_op(&format!("w{i}"), room, op(i)).await;
    }
    let mut seqs = Vec::new();
    for i in 0..n_ops {
        let reply = alice.reply(&format!("w{i}")).await;
        assert_eq!(reply["t"], "ack", "{reply}");
        let seq = reply["seq"].as_u64().unwrap();
        if let Some(original) = acked.get(&i) {
            assert_eq!(
                seq, *original,
                "w{i} was acked before the crash with another seq"
            );
        } else if let Some(durable) = entry(&state["entries"], &format!("k{i:03}")) {
            assert_eq!(
                durable["ver"], seq,
                "w{i} survived the crash unacked; its re-send is not new"
            );
        }
        seqs.push(seq);
    }
    let state = server.room_state(room).await;
    assert_eq!(state["seq"], n_ops as u64 + 1);
    assert_eq!(state["entries"].as_array().unwrap().len(), n_ops);
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), n_ops, "every op has its own seq");
}

#[tokio::test]
async fn sigterm_closes_sessions_with_4002_and_exits_0() {
    let mut server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("chat:shutdown", "chat", json!({})).await;
    alice.sub("chat:shutdown").await;
    let mut bob = server.client("bob").await;
    server.terminate();
    alice.expect_close(4002).await;
    bob.expect_close(4002).await;
    let status = server.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "graceful shutdown exits 0: {status}"
    );
}

#[tokio::test]
async fn sigterm_commits_acked_ops_even_without_fsync_per_op() {
    let mut server = Server::start(&["--durability", "none"]).await;
    let mut alice = server.client("alice").await;
    alice
        .create_ok("state:sigterm-commit", "state", json!({}))
        .await;
    let mut last = 0;
    for i in 0..20 {
        last = alice
            .ack(
                &format!("i{i}"),
                "state:sigterm-commit",
                json!({"type": "incr", "key": "n"}),
            )
            .await;
    }
    let before: Value = server.room_state("state:sigterm-commit").await;
    drop(alice);
    server.restart().await;
    let after = server.room_state("state:sigterm-commit").await;
    assert_eq!(after, before);
    assert_eq!(after["seq"], last);
    assert_eq!(entry(&after["entries"], "n").unwrap()["v"], 20);
}

/// Once no write has come for 5 s the store closes and reopens its database (to empty
/// redb's page cache). The reopened database takes reads and writes, and what is acked
/// after the reopen survives kill -9 like the rest.
#[tokio::test]
async fn writes_after_the_quiet_reopen_survive_kill_9() {
    let mut server = Server::start(&["--log", "info,roomd::store=debug"]).await;
    let room = "state:reopen";
    let mut alice = server.client("alice").await;
    alice.create_ok(room, "state", json!({})).await;
    let op = |i: u64| json!({"type": "set", "key": format!("k{i}"), "value": i});
    let mut acked = Vec::new();
    for i in 0..5 {
        acked.push((i, alice.ack(&format!("a{i}"), room, op(i)).await));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !server.stderr_tail().contains("database reopened") {
        assert!(
            std::time::Instant::now() < deadline,
            "no quiet reopen within 20 s; log:\n{}",
            server.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 5..10 {
        acked.push((i, alice.ack(&format!("a{i}"), room, op(i)).await));
    }
    assert_eq!(server.get("/readyz").await.status, 200);
    let before = server.room_state(room).await;
    assert_eq!(before["seq"], 11);

    server.kill9().await;
    drop(alice);
    server.restart().await;
    assert_eq!(server.room_state(room).await, before);
    for (i, seq) in acked {
        let found = entry(&before["entries"], &format!("k{i}")).expect("acked key");
        assert_eq!(found["ver"], seq);
    }
}
