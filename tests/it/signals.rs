//! Signals: ephemeral messages to a room's other members, never logged or acked, at most
//! 1 KiB, and only from a subscribed member.

use serde_json::json;

use crate::support::{Server, NACK_CODES};

#[tokio::test]
async fn signal_reaches_other_members_with_the_sender_id() {
    let server = Server::start(&[]).await;
    let room = "chat:signal";
    let mut alice = server.client("alice").await;
    alice.create_ok(room, "chat", json!({})).await;
    alice.sub(room).await;
    let mut bob = server.client("bob").await;
    bob.sub(room).await;
    let mut carol = server.client("carol").await;
    carol.sub_presence(room).await;

    let data = json!({"cursor": {"x": 3, "y": 4}, "bytes": {"$b64": "AQI="}});
    alice
        .send_json(json!({"t": "signal", "room": room, "data": data}))
        .await;
    for member in [&mut bob, &mut carol] {
        let signal = member.recv_until(|v| v["t"] == "signal").await;
        assert_eq!(
            signal,
            json!({"t": "signal", "room": room, "user": "alice", "data": data})
        );
    }
}

#[tokio::test]
async fn sender_does_not_get_its_own_signal() {
    let server = Server::start(&[]).await;
    let room = "chat:signal-self";
    let mut alice = server.client("alice").await;
    alice.create_ok(room, "chat", json!({})).await;
    alice.sub(room).await;
    let mut bob = server.client("bob").await;
    bob.sub(room).await;
    alice
        .send_json(json!({"t": "signal", "room": room, "data": {"ping": 1}}))
        .await;
    bob.recv_until(|v| v["t"] == "signal").await;
    // An op after the signal: its diff comes after anything the signal could have caused.
    let seq = alice
        .ack("1", room, json!({"type": "post", "text": "after"}))
        .await;
    let frames = alice
        .collect_until(|v| v["t"] == "diff" && v["to"].as_u64().unwrap_or(0) >= seq)
        .await;
    assert!(frames.iter().all(|f| f["t"] != "signal"), "{frames:?}");
}

#[tokio::test]
async fn signals_are_not_logged() {
    let server = Server::start(&[]).await;
    let room = "state:signal-log";
    let mut alice = server.client("alice").await;
    alice.create_ok(room, "state", json!({})).await;
    alice.sub(room).await;
    let mut bob = server.client("bob").await;
    bob.sub(room).await;
    alice
        .send_json(json!({"t": "signal", "room": room, "data": "hi"}))
        .await;
    let signal = bob.recv_until(|v| v["t"] == "signal").await;
    assert_eq!(signal["data"], "hi");
    let state = server.room_state(room).await;
    assert_eq!(state["seq"], 1, "a signal is not an event");
}

#[tokio::test]
async fn signal_over_1_kib_is_an_error_too_large_and_not_delivered() {
    let server = Server::start(&[]).await;
    let room = "chat:signal-big";
    let mut alice = server.client("alice").await;
    alice.create_ok(room, "chat", json!({})).await;
    alice.sub(room).await;
    let mut bob = server.client("bob").await;
    bob.sub(room).await;
    alice
        .send_json(json!({"t": "signal", "room": room, "data": "x".repeat(2048)}))
        .await;
    let error = alice.recv_until(|v| v["t"] == "error").await;
    assert_eq!(error["code"], "too_large");
    assert_eq!(error["room"], room);
    // A small signal sent after the big one is the first that bob sees.
    alice
        .send_json(json!({"t": "signal", "room": room, "data": "small"}))
        .await;
    let signal = bob.recv_until(|v| v["t"] == "signal").await;
    assert_eq!(signal["data"], "small");
}

#[tokio::test]
async fn signal_to_a_room_not_subscribed_is_an_error() {
    let server = Server::start(&[]).await;
    let room = "chat:signal-outsider";
    let mut alice = server.client("alice").await;
    alice.create_ok(room, "chat", json!({})).await;
    let mut bob = server.client("bob").await;
    bob.sub(room).await;
    alice
        .send_json(json!({"t": "signal", "room": room, "data": "psst"}))
        .await;
    let error = alice.recv_until(|v| v["t"] == "error").await;
    assert_eq!(error["room"], room);
    let code = error["code"].as_str().expect("error code");
    assert!(NACK_CODES.contains(&code), "{error}");
    // Bob got nothing from the outsider: his next frame is the member's signal.
    let mut carol = server.client("carol").await;
    carol.sub(room).await;
    carol
        .send_json(json!({"t": "signal", "room": room, "data": "member"}))
        .await;
    let signal = bob.recv_until(|v| v["t"] == "signal").await;
    assert_eq!(signal["user"], "carol");

    let missing = alice
        .sub_msg(json!({"t": "signal", "room": "chat:no-such-room", "data": 1}))
        .await;
    assert_eq!(missing["t"], "error");
}
