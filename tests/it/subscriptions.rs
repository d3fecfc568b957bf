//! sub and unsub bookkeeping, and the `error` frames that answer messages without an id
//! (sub, unsub) when they cannot be served.

use serde_json::json;

use crate::support::{Server, NACK_CODES};

#[tokio::test]
async fn second_sub_to_the_same_room_is_answered_again() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("chat:resub", "chat", json!({})).await;
    let first = alice.sub("chat:resub").await;
    let seq = alice
        .ack("1", "chat:resub", json!({"type": "post", "text": "x"}))
        .await;
    let second = alice.sub("chat:resub").await;
    assert_eq!(second["epoch"], first["epoch"]);
    assert!(second["seq"].as_u64().unwrap() >= seq, "{second}");
    assert_eq!(second["entries"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn sub_to_a_missing_room_is_an_error_not_found() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    let answer = alice
        .sub_msg(json!({"t": "sub", "room": "chat:missing"}))
        .await;
    assert_eq!(answer["t"], "error");
    assert_eq!(answer["code"], "not_found");
    assert_eq!(answer["room"], "chat:missing");
    assert!(answer["msg"].is_string(), "{answer}");
}

#[tokio::test]
async fn sub_with_a_malformed_room_id_is_an_error_invalid() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    let answer = alice
        .sub_msg(json!({"t": "sub", "room": "no spaces allowed"}))
        .await;
    assert_eq!(answer["t"], "error");
    assert_eq!(answer["code"], "invalid");
}

#[tokio::test]
async fn unsub_of_a_room_not_subscribed_is_an_error() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice
        .create_ok("chat:never-subbed", "chat", json!({}))
        .await;
    alice.unsub("chat:never-subbed").await;
    let answer = alice
        .recv_until(|v| v["t"] == "error" && v["room"] == "chat:never-subbed")
        .await;
    let code = answer["code"].as_str().expect("error code");
    assert!(
        NACK_CODES.contains(&code),
        "error codes are nack codes: {answer}"
    );
}

#[tokio::test]
async fn unsub_stops_diffs_for_that_room() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    alice.create_ok("chat:unsub", "chat", json!({})).await;
    alice.sub("chat:unsub").await;
    alice.unsub("chat:unsub").await;
    // A second unsub is refused, which proves the first one was processed.
    alice.unsub("chat:unsub").await;
    let frames = alice
        .collect_until(|v| v["t"] == "error" && v["room"] == "chat:unsub")
        .await;
    assert_eq!(frames.len(), 1, "nothing but the error: {frames:?}");

    let seq = bob
        .ack("1", "chat:unsub", json!({"type": "post", "text": "unseen"}))
        .await;
    // Subscribe again: everything before the new snapshot would be a leaked diff.
    alice
        .send_json(json!({"t": "sub", "room": "chat:unsub"}))
        .await;
    let frames = alice.collect_until(|v| v["t"] == "snapshot").await;
    assert_eq!(
        frames.len(),
        1,
        "no diff may reach an unsubscribed client: {frames:?}"
    );
    assert!(frames[0]["seq"].as_u64().unwrap() >= seq);
}

#[tokio::test]
async fn subscriptions_beyond_max_subs_are_an_error_limit() {
    let server = Server::start(&["--max-subs", "2"]).await;
    let mut alice = server.client("alice").await;
    for room in ["chat:s1", "chat:s2", "chat:s3"] {
        alice.create_ok(room, "chat", json!({})).await;
    }
    alice.sub("chat:s1").await;
    alice.sub("chat:s2").await;
    let answer = alice.sub_msg(json!({"t": "sub", "room": "chat:s3"})).await;
    assert_eq!(answer["t"], "error");
    assert_eq!(answer["code"], "limit");
    assert_eq!(answer["room"], "chat:s3");
    // Re-subscribing to a room already held takes no extra slot.
    alice.sub("chat:s2").await;
    // Freeing a slot makes room for the third.
    alice.unsub("chat:s1").await;
    alice.sub("chat:s3").await;
    // And the limit still holds.
    let answer = alice.sub_msg(json!({"t": "sub", "room": "chat:s1"})).await;
    assert_eq!(answer["code"], "limit", "{answer}");
}

#[tokio::test]
async fn max_subs_is_per_connection() {
    let server = Server::start(&["--max-subs", "1"]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("chat:per-conn-a", "chat", json!({})).await;
    alice.create_ok("chat:per-conn-b", "chat", json!({})).await;
    alice.sub("chat:per-conn-a").await;
    let mut second = server.client("alice").await;
    second.sub("chat:per-conn-b").await;
}
