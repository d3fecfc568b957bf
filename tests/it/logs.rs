//! Operations logging: one line per connection at open and at close (user, client
//! address, close code, duration, frames and bytes each way), in JSON with
//! `--log-format json`, and never a token or an API key.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{jwt, Connect, Server};

const SECRET: &str = "log-test-secret";

/// The JSON log lines of the server so far whose message is `message`.
fn lines_with(server: &Server, message: &str) -> Vec<Value> {
    server
        .stderr_tail()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|v| v["fields"]["message"] == message)
        .collect()
}

#[tokio::test]
async fn each_connection_logs_open_and_close_in_json_without_secrets() {
    let server = Server::start(&[
        "--jwt-secret",
        SECRET,
        "--api-key",
        "very-secret-api-key",
        "--log-format",
        "json",
    ])
    .await;
    let token = jwt(
        SECRET,
        json!({"sub": "alice", "rooms": {"create": ["chat:*"], "write": ["chat:*"]}}),
    );
    let mut alice = Connect::new().token(&token).connect(&server).await;
    alice.create_ok("chat:logged", "chat", json!({})).await;
    alice
        .ack("1", "chat:logged", json!({"type": "post", "text": "hello"}))
        .await;
    let by_key = server
        .http(
            "GET",
            "/api/rooms/chat:logged",
            &[("X-Roomd-Api-Key", "very-secret-api-key")],
            None,
        )
        .await;
    assert_eq!(by_key.status, 200);
    alice.close().await;

    let deadline = Instant::now() + Duration::from_secs(5);
    let closed = loop {
        if let Some(line) = lines_with(&server, "connection closed").pop() {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "no `connection closed` line:\n{}",
            server.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let fields = &closed["fields"];
    assert_eq!(fields["user"], "alice", "{closed}");
    assert_eq!(fields["peer"], "127.0.0.1", "{closed}");
    assert_eq!(fields["close_code"], 1000, "{closed}");
    assert!(fields["duration_ms"].as_u64().is_some(), "{closed}");
    assert!(fields["frames_in"].as_u64().unwrap_or(0) >= 2, "{closed}");
    assert!(fields["bytes_in"].as_u64().unwrap_or(0) > 50, "{closed}");
    assert!(fields["frames_out"].as_u64().unwrap_or(0) >= 3, "{closed}");
    assert!(fields["bytes_out"].as_u64().unwrap_or(0) > 50, "{closed}");
    let open = lines_with(&server, "connection open");
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0]["fields"]["user"], "alice");

    let log = server.stderr_tail();
    assert!(!log.contains(&token), "the token was logged:\n{log}");
    assert!(!log.contains(SECRET), "the secret was logged");
    assert!(
        !log.contains("very-secret-api-key"),
        "the API key was logged"
    );
}

#[tokio::test]
async fn the_logged_peer_is_the_client_named_by_a_trusted_proxy_and_text_has_no_colours() {
    let server = Server::start(&["--trusted-proxies", "127.0.0.1"]).await;
    let alice = Connect::new()
        .user("alice")
        .header("X-Forwarded-For", "203.0.113.7")
        .connect(&server)
        .await;
    alice.close().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = server.stderr_tail();
        let closed = log.lines().find(|line| line.contains("connection closed"));
        if let Some(line) = closed {
            assert!(line.contains("peer=203.0.113.7"), "{line}");
            // stderr is a pipe here, as under systemd: no terminal colour codes.
            assert!(!log.contains('\u{1b}'), "colour codes in:\n{log}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no `connection closed` line:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_slow_store_commit_is_logged_with_what_it_carried() {
    // The test hook holds every group of batches 150 ms before its commit.
    let server = Server::start_with_env(
        &["--log-format", "json"],
        &[("ROOMD_TEST_COMMIT_DELAY_MS", "150")],
    )
    .await;
    let mut alice = Connect::new().user("alice").connect(&server).await;
    alice.create_ok("chat:slow", "chat", json!({})).await;
    alice
        .ack("1", "chat:slow", json!({"type": "post", "text": "hello"}))
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let slow = loop {
        let lines = lines_with(&server, "slow store commit");
        // The op's commit: one batch of one event (the creation's had no event).
        if let Some(line) = lines.into_iter().find(|l| l["fields"]["events"] == 1) {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "no `slow store commit` line for the op:\n{}",
            server.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(slow["level"], "WARN", "{slow}");
    let fields = &slow["fields"];
    assert!(fields["ms"].as_u64().unwrap() >= 150, "{slow}");
    assert_eq!(fields["batches"], 1, "{slow}");
    assert_eq!(fields["durable"], true, "{slow}");
    assert!(fields["redb_commit_ms"].as_u64().is_some(), "{slow}");
    // Each line is counted in /metrics too (the creation's commit and the op's at least).
    let logged = lines_with(&server, "slow store commit").len() as f64;
    let counted = server.metric("roomd_store_slow_commits_total").await;
    assert!(
        counted >= logged.max(2.0),
        "{counted} counted, {logged} logged"
    );
    alice.close().await;
}
