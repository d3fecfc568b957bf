//! Effectively-once ops: a re-sent `(user, id)` is answered with the original ack and
//! applied once, whatever its body; a nacked id is evaluated again.

use serde_json::json;

use crate::support::{entry, Server};

async fn counter(server: &Server, room: &str) -> serde_json::Value {
    let state = server.room_state(room).await;
    entry(&state["entries"], "n")
        .map(|e| e["v"].clone())
        .unwrap_or(json!(null))
}

#[tokio::test]
async fn resent_op_gets_the_original_ack_and_applies_once() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("state:once", "state", json!({})).await;
    let first = alice
        .ack("inc-1", "state:once", json!({"type": "incr", "key": "n"}))
        .await;
    let again = alice
        .ack("inc-1", "state:once", json!({"type": "incr", "key": "n"}))
        .await;
    assert_eq!(first, again);
    assert_eq!(counter(&server, "state:once").await, 1);
}

#[tokio::test]
async fn resent_op_after_reconnect_gets_the_original_ack() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice
        .create_ok("state:once-reconnect", "state", json!({}))
        .await;
    let first = alice
        .ack(
            "inc-1",
            "state:once-reconnect",
            json!({"type": "incr", "key": "n"}),
        )
        .await;
    alice.close().await;
    let mut alice = server.client("alice").await;
    let again = alice
        .ack(
            "inc-1",
            "state:once-reconnect",
            json!({"type": "incr", "key": "n"}),
        )
        .await;
    assert_eq!(first, again);
    assert_eq!(counter(&server, "state:once-reconnect").await, 1);
}

#[tokio::test]
async fn resent_id_is_answered_from_the_record_whatever_the_body() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("state:once-body", "state", json!({})).await;
    let first = alice
        .ack(
            "x",
            "state:once-body",
            json!({"type": "incr", "key": "n", "by": 5}),
        )
        .await;
    let again = alice
        .ack(
            "x",
            "state:once-body",
            json!({"type": "set", "key": "other", "value": true}),
        )
        .await;
    assert_eq!(first, again);
    let state = server.room_state("state:once-body").await;
    assert_eq!(state["seq"], 2);
    assert_eq!(state["entries"], json!([{"k": "n", "v": 5, "ver": 2}]));
}

#[tokio::test]
async fn resent_create_gets_its_ack_with_seq_1_not_exists() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    let create =
        json!({"t": "create", "id": "mk", "room": "chat:once-create", "kind": "chat", "init": {}});
    alice.send_json(create.clone()).await;
    let first = alice.reply("mk").await;
    assert_eq!(first["t"], "ack");
    assert_eq!(first["seq"], 1);
    alice.send_json(create).await;
    let again = alice.reply("mk").await;
    assert_eq!(again["t"], "ack", "{again}");
    assert_eq!(again["seq"], 1);
    // A different id for the same room is a new request, and the room exists.
    let other = alice
        .reply_to(json!({"t": "create", "id": "mk2", "room": "chat:once-create", "kind": "chat", "init": {}}))
        .await;
    assert_eq!(other["code"], "exists");
}

#[tokio::test]
async fn nacked_id_is_evaluated_again_when_resent() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("state:once-nack", "state", json!({})).await;
    // "if_ver": 2 fails while the key is missing...
    let op = json!({"type": "set", "key": "k", "value": "late", "if_ver": 2});
    assert_eq!(
        alice.nack("cas", "state:once-nack", op.clone()).await,
        "conflict"
    );
    // ...and holds once another op has set the key at seq 2.
    let mut bob = server.client("bob").await;
    assert_eq!(
        bob.ack(
            "b",
            "state:once-nack",
            json!({"type": "set", "key": "k", "value": "early"})
        )
        .await,
        2
    );
    let seq = alice.ack("cas", "state:once-nack", op).await;
    assert_eq!(seq, 3);
    let state = server.room_state("state:once-nack").await;
    assert_eq!(entry(&state["entries"], "k").unwrap()["v"], "late");
}

#[tokio::test]
async fn same_id_from_different_users_are_different_ops() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    alice
        .create_ok("state:once-users", "state", json!({}))
        .await;
    let a = alice
        .ack("1", "state:once-users", json!({"type": "incr", "key": "n"}))
        .await;
    let b = bob
        .ack("1", "state:once-users", json!({"type": "incr", "key": "n"}))
        .await;
    assert_ne!(a, b);
    assert_eq!(counter(&server, "state:once-users").await, 2);
}

#[tokio::test]
async fn resend_while_the_original_is_in_flight_gets_the_same_ack() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    let mut alice2 = server.client("alice").await;
    alice
        .create_ok("state:once-flight", "state", json!({}))
        .await;
    let op = json!({"type": "incr", "key": "n"});
    // Back to back on one connection and on a second connection of the same user.
    alice.send_op("dup", "state:once-flight", op.clone()).await;
    alice.send_op("dup", "state:once-flight", op.clone()).await;
    alice2.send_op("dup", "state:once-flight", op).await;
    let first = alice.reply("dup").await;
    let second = alice.reply("dup").await;
    let third = alice2.reply("dup").await;
    for reply in [&first, &second, &third] {
        assert_eq!(reply["t"], "ack", "{reply}");
    }
    assert_eq!(first["seq"], second["seq"]);
    assert_eq!(first["seq"], third["seq"]);
    assert_eq!(counter(&server, "state:once-flight").await, 1);
}

#[tokio::test]
async fn resent_op_over_the_rate_limit_still_gets_its_original_ack() {
    let server = Server::start(&["--op-rate", "1", "--op-burst", "3"]).await;
    let room = "state:rated-resend";
    let mut alice = server.client("alice").await;
    alice.create_ok(room, "state", json!({})).await;
    let seq = alice
        .ack("once", room, json!({"type": "incr", "key": "n"}))
        .await;
    // Use up the burst, then re-send: the re-send is answered from the record.
    for i in 0..3 {
        alice
            .send_op(&format!("x{i}"), room, json!({"type": "incr", "key": "m"}))
            .await;
    }
    let again = alice
        .op("once", room, json!({"type": "incr", "key": "n"}))
        .await;
    assert_eq!(again["t"], "ack", "{again}");
    assert_eq!(again["seq"], seq);
    // A new id over the limit is refused.
    let fresh = alice
        .op("fresh", room, json!({"type": "incr", "key": "n"}))
        .await;
    assert_eq!(fresh["t"], "nack", "{fresh}");
    assert_eq!(fresh["code"], "rate_limited");
}

#[tokio::test]
async fn resent_op_with_a_malformed_body_still_gets_its_original_ack() {
    let server = Server::start(&[]).await;
    let room = "state:malformed-resend";
    let mut alice = server.client("alice").await;
    alice.create_ok(room, "state", json!({})).await;
    let seq = alice
        .ack("o1", room, json!({"type": "set", "key": "k", "value": 1}))
        .await;
    let deep = (0..40).fold(json!(1), |v, _| json!([v]));
    let again = alice.op("o1", room, deep).await;
    assert_eq!(again["t"], "ack", "{again}");
    assert_eq!(again["seq"], seq);
}
