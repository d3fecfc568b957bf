//! JWT identity (HS256, `sub` is the user, `exp` honoured) on the WebSocket upgrade and
//! the HTTP API, and the refusal to serve a non-loopback address without auth.

use std::time::Duration;

use serde_json::json;

use crate::support::{entry, jwt, now_secs, Connect, Server};

const SECRET: &str = "integration-test-secret";

/// A token that may do everything on every room (access control is `access.rs`).
fn token_for(user: &str) -> String {
    jwt(
        SECRET,
        json!({"sub": user, "exp": now_secs() + 3600,
               "rooms": {"read": ["*"], "write": ["*"], "create": ["*"]}}),
    )
}

async fn auth_server() -> Server {
    Server::start(&["--jwt-secret", SECRET]).await
}

#[tokio::test]
async fn token_in_query_sets_the_user_from_sub() {
    let server = auth_server().await;
    let mut client = Connect::new()
        .token(&token_for("alice"))
        .connect(&server)
        .await;
    assert_eq!(client.welcome["user"], "alice");
    client.create_ok("chat:auth-query", "chat", json!({})).await;
}

#[tokio::test]
async fn bearer_header_sets_the_user_from_sub() {
    let server = auth_server().await;
    let client = Connect::new()
        .bearer(&token_for("bob"))
        .connect(&server)
        .await;
    assert_eq!(client.welcome["user"], "bob");
}

#[tokio::test]
async fn user_query_parameter_is_ignored_when_auth_is_on() {
    let server = auth_server().await;
    let client = Connect::new()
        .user("mallory")
        .token(&token_for("alice"))
        .connect(&server)
        .await;
    assert_eq!(client.welcome["user"], "alice");
}

#[tokio::test]
async fn missing_token_is_closed_with_4401() {
    let server = auth_server().await;
    let mut client = Connect::new()
        .user("mallory")
        .handshake(&server)
        .await
        .expect("the upgrade itself succeeds");
    client.expect_close(4401).await;
}

#[tokio::test]
async fn token_signed_with_another_secret_is_closed_with_4401() {
    let server = auth_server().await;
    let forged = jwt(
        "not-the-secret",
        json!({"sub": "alice", "exp": now_secs() + 3600}),
    );
    let mut client = Connect::new()
        .token(&forged)
        .handshake(&server)
        .await
        .expect("upgrade");
    client.expect_close(4401).await;
    let mut client = Connect::new()
        .bearer("not.a.jwt")
        .handshake(&server)
        .await
        .expect("upgrade");
    client.expect_close(4401).await;
}

#[tokio::test]
async fn expired_token_is_closed_with_4401() {
    let server = auth_server().await;
    let expired = jwt(SECRET, json!({"sub": "alice", "exp": now_secs() - 3600}));
    let mut client = Connect::new()
        .token(&expired)
        .handshake(&server)
        .await
        .expect("upgrade");
    client.expect_close(4401).await;
}

#[tokio::test]
async fn user_id_longer_than_128_bytes_is_closed_with_4401() {
    let server = auth_server().await;
    let long = jwt(
        SECRET,
        json!({"sub": "u".repeat(129), "exp": now_secs() + 3600}),
    );
    let mut client = Connect::new()
        .token(&long)
        .handshake(&server)
        .await
        .expect("upgrade");
    client.expect_close(4401).await;
    let max = "u".repeat(128);
    let client = Connect::new()
        .token(&token_for(&max))
        .connect(&server)
        .await;
    assert_eq!(client.welcome["user"], max.as_str());
}

#[tokio::test]
async fn open_connection_is_closed_with_4401_when_its_token_expires() {
    let server = auth_server().await;
    let short = jwt(
        SECRET,
        json!({"sub": "alice", "exp": now_secs() + 2, "rooms": {"create": ["chat:*"]}}),
    );
    let mut client = Connect::new().token(&short).connect(&server).await;
    client
        .create_ok("chat:auth-expiry", "chat", json!({}))
        .await;
    // Time passing is the point: the token runs out within 2 s.
    assert_eq!(
        client.close_code_within(Duration::from_secs(8)).await,
        Some(4401)
    );
}

#[tokio::test]
async fn http_requires_a_valid_token_and_takes_the_user_from_it() {
    let server = auth_server().await;
    let body = json!({"room": "chat:auth-http", "kind": "chat", "init": {}});
    let missing = server.post_as("alice", "/api/rooms", &body).await;
    assert_eq!(
        missing.status, 401,
        "X-Roomd-User is no identity when auth is on"
    );
    let forged = jwt("wrong", json!({"sub": "alice", "exp": now_secs() + 3600}));
    let bad = server
        .http(
            "POST",
            "/api/rooms",
            &[("Authorization", &format!("Bearer {forged}"))],
            Some(&body),
        )
        .await;
    assert_eq!(bad.status, 401);
    let expired = jwt(SECRET, json!({"sub": "alice", "exp": now_secs() - 3600}));
    let stale = server
        .http(
            "POST",
            "/api/rooms",
            &[("Authorization", &format!("Bearer {expired}"))],
            Some(&body),
        )
        .await;
    assert_eq!(stale.status, 401);

    let alice = format!("Bearer {}", token_for("alice"));
    let created = server
        .http(
            "POST",
            "/api/rooms",
            &[("Authorization", &alice)],
            Some(&body),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let posted = server
        .http(
            "POST",
            &format!("/api/rooms/chat:auth-http/ops?token={}", token_for("bob")),
            &[("X-Roomd-User", "mallory")],
            Some(&json!({"id": "1", "op": {"type": "post", "text": "signed"}})),
        )
        .await;
    assert_eq!(posted.status, 200, "{}", posted.text);
    let state = server
        .http(
            "GET",
            "/api/rooms/chat:auth-http",
            &[("Authorization", &alice)],
            None,
        )
        .await;
    assert_eq!(state.status, 200, "{}", state.text);
    assert_eq!(
        entry(&state.body["entries"], "msg/2").unwrap()["v"]["user"],
        "bob"
    );
}

#[tokio::test]
async fn health_endpoints_need_no_token() {
    let server = auth_server().await;
    assert_eq!(server.get("/healthz").await.status, 200);
    assert_eq!(server.get("/readyz").await.status, 200);
}

#[tokio::test]
async fn serving_a_public_address_without_secret_or_insecure_flag_is_refused() {
    let status = Server::run_expecting_exit("0.0.0.0:0", &[]).await;
    assert!(!status.success(), "roomd must exit nonzero: {status}");
}
