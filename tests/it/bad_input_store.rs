//! Bad input that reaches the store: values at the nesting limit (accepted, and durable),
//! one level deeper (`invalid`, never `unavailable`), and a data file with damaged bytes
//! (the damaged room answers `unavailable`, every other room keeps serving, `roomd log
//! verify` names the damage and exits 1, and nothing panics).

use serde_json::{json, Value};

use crate::support::Server;

/// The deepest value the contract accepts: a scalar is depth 0, `[1]` depth 1.
const MAX_DEPTH: usize = 32;

/// `depth` lists around the integer 1.
fn nested(depth: usize) -> Value {
    (0..depth).fold(json!(1), |inner, _| json!([inner]))
}

/// A `state` init of exactly `depth` levels: `{"entries": {"deep": nested(depth - 2)}}`.
fn init_of_depth(depth: usize) -> Value {
    json!({"entries": {"deep": nested(depth - 2)}})
}

/// A `set` op of exactly `depth` levels: `{"type":"set","key":"deep","value":nested(depth - 1)}`.
fn set_of_depth(depth: usize) -> Value {
    json!({"type": "set", "key": "deep", "value": nested(depth - 1)})
}

/// The value of `key` in the room's state read over HTTP.
async fn entry_value(server: &Server, room: &str, key: &str) -> Value {
    let state = server.room_state(room).await;
    let entries = state["entries"].as_array().expect("entries is a list");
    entries
        .iter()
        .find(|entry| entry["k"] == key)
        .map(|entry| entry["v"].clone())
        .unwrap_or_else(|| panic!("no entry {key} in {state}"))
}

#[tokio::test]
async fn init_and_set_at_depth_32_are_accepted_and_durable_and_33_is_invalid() {
    let mut server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;

    // WebSocket JSON.
    alice
        .create_ok("deep:ws", "state", init_of_depth(MAX_DEPTH))
        .await;
    let refused = alice
        .create("deeper:ws", "state", init_of_depth(MAX_DEPTH + 1))
        .await;
    assert_eq!(refused["t"], "nack", "{refused}");
    assert_eq!(refused["code"], "invalid", "{refused}");
    alice
        .ack("set-32", "deep:ws", set_of_depth(MAX_DEPTH))
        .await;
    let code = alice
        .nack("set-33", "deep:ws", set_of_depth(MAX_DEPTH + 1))
        .await;
    assert_eq!(code, "invalid");

    // HTTP.
    let created = server
        .post(
            "/api/rooms",
            &json!({"room": "deep:http", "kind": "state", "init": init_of_depth(MAX_DEPTH)}),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let refused = server
        .post(
            "/api/rooms",
            &json!({"room": "deeper:http", "kind": "state", "init": init_of_depth(MAX_DEPTH + 1)}),
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.text);
    assert_eq!(refused.body["code"], "invalid", "{}", refused.text);
    let set = server
        .post(
            "/api/rooms/deep:http/ops",
            &json!({"id": "h-32", "op": set_of_depth(MAX_DEPTH)}),
        )
        .await;
    assert_eq!(set.status, 200, "{}", set.text);
    let refused = server
        .post(
            "/api/rooms/deep:http/ops",
            &json!({"id": "h-33", "op": set_of_depth(MAX_DEPTH + 1)}),
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.text);
    assert_eq!(refused.body["code"], "invalid", "{}", refused.text);

    // The refused rooms do not exist; the accepted values survive a restart whole.
    drop(alice);
    server.restart().await;
    for room in ["deeper:ws", "deeper:http"] {
        let missing = server.get(&format!("/api/rooms/{room}")).await;
        assert_eq!(missing.status, 404, "{room}: {}", missing.text);
    }
    for room in ["deep:ws", "deep:http"] {
        assert_eq!(
            entry_value(&server, room, "deep").await,
            nested(MAX_DEPTH - 1)
        );
        let events = server.get(&format!("/api/rooms/{room}/events")).await;
        assert_eq!(events.status, 200, "{}", events.text);
        assert_eq!(
            events.body["events"][0]["op"]["init"],
            init_of_depth(MAX_DEPTH),
            "the creation is logged with its whole init"
        );
    }
    assert!(
        !server.stderr_tail().contains("commit failed"),
        "{}",
        server.stderr_tail()
    );
}
