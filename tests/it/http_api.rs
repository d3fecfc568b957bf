//! The HTTP API: health and readiness, room creation, room state, ops with the same
//! effectively-once rule as WebSocket, and nack codes mapped to HTTP statuses.

use serde_json::{json, Value};

use crate::support::{assert_epoch, entry, keys, sample, Server};

fn ops_path(room: &str) -> String {
    format!("/api/rooms/{room}/ops")
}

#[tokio::test]
async fn healthz_and_readyz_answer_200() {
    let server = Server::start(&[]).await;
    assert_eq!(server.get("/healthz").await.status, 200);
    assert_eq!(server.get("/readyz").await.status, 200);
}

#[tokio::test]
async fn metrics_count_connections_live_rooms_and_store_commits() {
    let server = Server::start(&[]).await;
    let before = server.get("/metrics").await;
    assert_eq!(before.status, 200, "{}", before.text);
    assert!(
        before
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{:?}",
        before.headers
    );
    assert_eq!(
        sample(&before.text, "roomd_connections"),
        Some(0.0),
        "{}",
        before.text
    );
    assert_eq!(sample(&before.text, "roomd_store_healthy"), Some(1.0));
    let events_before = sample(&before.text, "roomd_store_events_total").unwrap_or(0.0);

    let _ws = server.client("alice").await;
    let body = json!({"room": "chat:metrics", "kind": "chat", "init": {}});
    assert_eq!(
        server.post_as("alice", "/api/rooms", &body).await.status,
        201
    );
    let after = server.get("/metrics").await;
    assert_eq!(
        sample(&after.text, "roomd_connections"),
        Some(1.0),
        "{}",
        after.text
    );
    assert_eq!(sample(&after.text, "roomd_rooms_live"), Some(1.0));
    let events = sample(&after.text, "roomd_store_events_total").expect("events counter");
    assert!(events >= events_before + 1.0, "{}", after.text);
    assert!(sample(&after.text, "roomd_store_commits_total").expect("commits") >= 1.0);
    assert!(
        after.text.contains("roomd_store_commit_seconds_bucket"),
        "{}",
        after.text
    );
}

/// The labelled sample `name{labels}` in Prometheus text (0 when absent).
fn labelled(text: &str, name: &str, labels: &str) -> f64 {
    sample(text, &format!("{name}{{{labels}}}")).unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_ops_by_kind_and_result_frames_closes_subscriptions_and_loads() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("chat:m", "chat", json!({})).await;
    alice.sub("chat:m").await;
    alice
        .ack("m1", "chat:m", json!({"type": "post", "text": "hi"}))
        .await;
    assert_eq!(
        alice
            .nack("m2", "chat:m", json!({"type": "no-such-op"}))
            .await,
        "invalid"
    );
    assert_eq!(
        alice
            .nack("m3", "chat:absent", json!({"type": "post", "text": "hi"}))
            .await,
        "not_found"
    );
    let text = server.get("/metrics").await.text;
    let ops = |kind: &str, result: &str| {
        labelled(
            &text,
            "roomd_ops_total",
            &format!("kind=\"{kind}\",result=\"{result}\""),
        )
    };
    assert_eq!(ops("chat", "ack"), 2.0, "the create and m1: {text}");
    assert_eq!(ops("chat", "invalid"), 1.0, "{text}");
    assert_eq!(ops("none", "not_found"), 1.0, "{text}");
    assert_eq!(sample(&text, "roomd_subscriptions"), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "roomd_subscriptions_started_total"),
        Some(1.0)
    );
    // welcome, 3 acks/nacks, snapshot, diff at least.
    assert!(
        sample(&text, "roomd_frames_sent_total").unwrap_or(0.0) >= 6.0,
        "{text}"
    );
    assert!(sample(&text, "roomd_bytes_sent_total").unwrap_or(0.0) >= 100.0);
    assert!(
        labelled(&text, "roomd_room_loads_total", "result=\"absent\"") >= 2.0,
        "chat:m before its creation and chat:absent: {text}"
    );
    assert!(text.contains("roomd_room_load_seconds_bucket"), "{text}");
    assert!(text.contains("roomd_outbound_queue_bytes_bucket"), "{text}");

    alice.close().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = server.get("/metrics").await.text;
        let closed = labelled(&text, "roomd_connections_closed_total", "code=\"1000\"");
        if closed == 1.0 && sample(&text, "roomd_subscriptions") == Some(0.0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn http_ops_refused_before_a_room_count_with_kind_none() {
    let server = Server::start(&[]).await;
    let body = json!({"op": {"type": "post", "text": "hi"}, "id": 7});
    let refused = server.post_as("alice", &ops_path("chat:h"), &body).await;
    assert_eq!(refused.status, 400, "{}", refused.text);
    let text = server.get("/metrics").await.text;
    assert_eq!(
        labelled(&text, "roomd_ops_total", "kind=\"none\",result=\"invalid\""),
        1.0,
        "{text}"
    );
}

#[tokio::test]
async fn create_room_is_201_with_seq_1_and_epoch_then_409_exists() {
    let server = Server::start(&[]).await;
    let body = json!({"room": "poll:http", "kind": "poll",
                      "init": {"question": "Tea?", "options": ["yes", "no"]}});
    let created = server.post_as("alice", "/api/rooms", &body).await;
    assert_eq!(created.status, 201, "{}", created.text);
    assert_eq!(created.body["seq"], 1);
    assert_epoch(created.body["epoch"].as_str().expect("epoch"));

    let again = server.post_as("bob", "/api/rooms", &body).await;
    assert_eq!(again.status, 409);
    assert_eq!(again.code(), "exists");
    assert!(again.body["msg"].is_string(), "{}", again.text);
}

#[tokio::test]
async fn create_room_with_bad_kind_init_or_id_is_400_invalid() {
    let server = Server::start(&[]).await;
    let bodies = [
        json!({"room": "x:kind", "kind": "wiki", "init": {}}),
        json!({"room": "x:init", "kind": "poll", "init": {"question": "q", "options": ["one"]}}),
        json!({"room": "bad room", "kind": "chat", "init": {}}),
        json!({"room": "..", "kind": "chat", "init": {}}),
    ];
    for body in bodies {
        let response = server.post_as("alice", "/api/rooms", &body).await;
        assert_eq!(response.status, 400, "{body}: {}", response.text);
        assert_eq!(response.code(), "invalid", "{body}");
    }
}

#[tokio::test]
async fn get_room_returns_kind_epoch_seq_and_sorted_entries() {
    let server = Server::start(&[]).await;
    let created = server
        .post_as(
            "alice",
            "/api/rooms",
            &json!({"room": "state:get", "kind": "state",
                                               "init": {"entries": {"b": 2, "a": 1}}}),
        )
        .await;
    assert_eq!(created.status, 201);
    let state = server.room_state("state:get").await;
    assert_eq!(state["room"], "state:get");
    assert_eq!(state["kind"], "state");
    assert_eq!(state["epoch"], created.body["epoch"]);
    assert_eq!(state["seq"], 1);
    assert_eq!(
        state["entries"],
        json!([{"k": "a", "v": 1, "ver": 1}, {"k": "b", "v": 2, "ver": 1}])
    );
}

#[tokio::test]
async fn get_missing_room_is_404_not_found() {
    let server = Server::start(&[]).await;
    let response = server.get("/api/rooms/chat:absent").await;
    assert_eq!(response.status, 404);
    assert_eq!(response.code(), "not_found");
}

#[tokio::test]
async fn post_op_returns_200_with_seq_and_subscribers_get_the_diff() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("chat:http-op", "chat", json!({})).await;
    alice.sub("chat:http-op").await;
    let response = server
        .post_as(
            "bob",
            &ops_path("chat:http-op"),
            &json!({"id": "h1", "op": {"type": "post", "text": "via http"}}),
        )
        .await;
    assert_eq!(response.status, 200, "{}", response.text);
    let seq = response.body["seq"].as_u64().expect("seq");
    assert_eq!(seq, 2);
    let diffs = alice.diffs_until("chat:http-op", seq).await;
    let message = diffs
        .iter()
        .find_map(|d| entry(&d["changes"], "msg/2"))
        .expect("the HTTP op reached the subscriber");
    assert_eq!(message["v"]["user"], "bob", "X-Roomd-User sets the author");
    assert_eq!(message["v"]["text"], "via http");
}

#[tokio::test]
async fn user_query_parameter_sets_the_http_identity() {
    let server = Server::start(&[]).await;
    let created = server
        .post(
            "/api/rooms?user=carol",
            &json!({"room": "chat:query-user", "kind": "chat", "init": {}}),
        )
        .await;
    assert_eq!(created.status, 201);
    let response = server
        .post(
            "/api/rooms/chat:query-user/ops?user=carol",
            &json!({"id": "q1", "op": {"type": "post", "text": "hey"}}),
        )
        .await;
    assert_eq!(response.status, 200, "{}", response.text);
    let state = server.room_state("chat:query-user").await;
    assert_eq!(
        entry(&state["entries"], "msg/2").unwrap()["v"]["user"],
        "carol"
    );
}

#[tokio::test]
async fn op_errors_map_to_http_statuses() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("chat:status", "chat", json!({})).await;
    alice
        .create_ok(
            "poll:status",
            "poll",
            json!({"question": "q", "options": ["a", "b"]}),
        )
        .await;
    alice
        .create_ok("state:status", "state", json!({"entries": {"k": 1}}))
        .await;
    let posted = alice
        .ack("p", "chat:status", json!({"type": "post", "text": "mine"}))
        .await;
    alice
        .ack("c", "poll:status", json!({"type": "close"}))
        .await;

    let cases: [(&str, Value, u16, &str); 6] = [
        ("state:status", json!({"type": "nope"}), 400, "invalid"),
        (
            "chat:status",
            json!({"type": "edit", "msg": posted, "text": "theirs"}),
            403,
            "forbidden",
        ),
        (
            "chat:nowhere",
            json!({"type": "post", "text": "x"}),
            404,
            "not_found",
        ),
        (
            "state:status",
            json!({"type": "set", "key": "k", "value": 2, "if_ver": 0}),
            409,
            "conflict",
        ),
        (
            "poll:status",
            json!({"type": "vote", "option": 0}),
            409,
            "closed",
        ),
        (
            "state:status",
            json!({"type": "set", "key": "big", "value": "x".repeat(40 * 1024)}),
            413,
            "too_large",
        ),
    ];
    for (i, (room, op, status, code)) in cases.into_iter().enumerate() {
        let response = server
            .post_as(
                "bob",
                &ops_path(room),
                &json!({"id": format!("e{i}"), "op": op}),
            )
            .await;
        assert_eq!(response.status, status, "{code}: {}", response.text);
        assert_eq!(response.code(), code);
        assert!(
            response.body["msg"].is_string(),
            "errors carry a msg: {}",
            response.text
        );
    }
    let state = server.room_state("state:status").await;
    assert_eq!(state["seq"], 1, "refused ops changed nothing");
    assert_eq!(keys(&state["entries"]), vec!["k"]);
}

#[tokio::test]
async fn malformed_http_body_is_400() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("state:http-body", "state", json!({})).await;
    let response = server
        .http(
            "POST",
            &ops_path("state:http-body"),
            &[("X-Roomd-User", "bob")],
            Some(&json!({"nothing": true})),
        )
        .await;
    assert_eq!(response.status, 400, "{}", response.text);
}

#[tokio::test]
async fn http_op_resent_with_the_same_id_returns_the_same_seq_and_applies_once() {
    let server = Server::start(&[]).await;
    let created = server
        .post_as(
            "alice",
            "/api/rooms",
            &json!({"room": "state:http-once", "kind": "state", "init": {}}),
        )
        .await;
    assert_eq!(created.status, 201);
    let body = json!({"id": "same", "op": {"type": "incr", "key": "n"}});
    let first = server
        .post_as("bob", &ops_path("state:http-once"), &body)
        .await;
    let second = server
        .post_as("bob", &ops_path("state:http-once"), &body)
        .await;
    assert_eq!(first.status, 200);
    assert_eq!(second.status, 200);
    assert_eq!(first.body["seq"], second.body["seq"]);
    let state = server.room_state("state:http-once").await;
    assert_eq!(entry(&state["entries"], "n").unwrap()["v"], 1);
    assert_eq!(state["seq"], 2);
}

#[tokio::test]
async fn http_op_without_a_user_identity_is_never_deduplicated() {
    let server = Server::start(&[]).await;
    let created = server
        .post(
            "/api/rooms",
            &json!({"room": "state:http-guest", "kind": "state", "init": {}}),
        )
        .await;
    assert_eq!(created.status, 201);
    let body = json!({"id": "guest-1", "op": {"type": "incr", "key": "n"}});
    let first = server.post(&ops_path("state:http-guest"), &body).await;
    let second = server.post(&ops_path("state:http-guest"), &body).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(second.status, 200, "{}", second.text);
    assert_ne!(first.body["seq"], second.body["seq"]);
    let state = server.room_state("state:http-guest").await;
    assert_eq!(entry(&state["entries"], "n").unwrap()["v"], 2);
}

#[tokio::test]
async fn websocket_and_http_share_the_op_id_record_of_a_user() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice
        .create_ok("state:shared-ids", "state", json!({}))
        .await;
    let seq = alice
        .ack(
            "op-7",
            "state:shared-ids",
            json!({"type": "incr", "key": "n"}),
        )
        .await;
    let response = server
        .post_as(
            "alice",
            &ops_path("state:shared-ids"),
            &json!({"id": "op-7", "op": {"type": "incr", "key": "n"}}),
        )
        .await;
    assert_eq!(response.status, 200, "{}", response.text);
    assert_eq!(response.body["seq"], seq);
    let state = server.room_state("state:shared-ids").await;
    assert_eq!(entry(&state["entries"], "n").unwrap()["v"], 1);
}
