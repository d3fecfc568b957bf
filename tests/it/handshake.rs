//! The WebSocket upgrade and the first frame: welcome fields, subprotocol selection,
//! Origin checks and identities without auth.

use serde_json::json;

use crate::support::{Connect, Event, Server, TIMEOUT};

#[tokio::test]
async fn welcome_carries_protocol_session_user_and_default_limits() {
    let server = Server::start(&[]).await;
    let client = server.client("alice").await;
    let welcome = &client.welcome;
    assert_eq!(welcome["t"], "welcome");
    assert_eq!(welcome["proto"], 1);
    assert_eq!(welcome["user"], "alice");
    assert_eq!(welcome["heartbeat_ms"], 15000);
    assert_eq!(welcome["max_frame"], 65536);
    let session = welcome["session"].as_str().expect("session is a string");
    assert!(!session.is_empty(), "session id must not be empty");
}

#[tokio::test]
async fn welcome_reports_configured_heartbeat_and_max_frame() {
    let server = Server::start(&["--heartbeat", "2s", "--max-frame", "4096"]).await;
    let client = server.client("bob").await;
    assert_eq!(client.welcome["heartbeat_ms"], 2000);
    assert_eq!(client.welcome["max_frame"], 4096);
}

#[tokio::test]
async fn every_connection_gets_its_own_session_id() {
    let server = Server::start(&[]).await;
    let first = server.client("alice").await;
    let second = server.client("alice").await;
    assert_eq!(first.welcome["user"], second.welcome["user"]);
    assert_ne!(first.welcome["session"], second.welcome["session"]);
}

#[tokio::test]
async fn connection_without_user_gets_a_distinct_generated_guest_id() {
    let server = Server::start(&[]).await;
    let first = Connect::new().connect(&server).await;
    let second = Connect::new().connect(&server).await;
    let first_user = first.welcome["user"].as_str().expect("guest user id");
    let second_user = second.welcome["user"].as_str().expect("guest user id");
    assert!(!first_user.is_empty());
    assert_ne!(
        first_user, second_user,
        "two guests must not share an identity"
    );
}

#[tokio::test]
async fn no_subprotocol_offered_means_json_text_frames() {
    let server = Server::start(&[]).await;
    let mut client = Connect::new().user("alice").connect(&server).await;
    assert_eq!(
        client.subprotocol, None,
        "no subprotocol may be selected when none is offered"
    );
    // The welcome already parsed as JSON text; a request is answered in JSON too.
    client.create_ok("json-default", "chat", json!({})).await;
}

#[tokio::test]
async fn offering_the_json_subprotocol_selects_it() {
    let server = Server::start(&[]).await;
    let client = Connect::new()
        .user("alice")
        .subprotocols("roomd.v1.json")
        .connect(&server)
        .await;
    assert_eq!(client.subprotocol.as_deref(), Some("roomd.v1.json"));
    assert_eq!(client.welcome["user"], "alice");
}

#[tokio::test]
async fn json_is_selected_from_a_list_that_also_offers_foreign_protocols() {
    let server = Server::start(&[]).await;
    let client = Connect::new()
        .user("alice")
        .subprotocols("chat.example, roomd.v1.json")
        .connect(&server)
        .await;
    assert_eq!(client.subprotocol.as_deref(), Some("roomd.v1.json"));
}

#[tokio::test]
async fn offering_the_rkyv_subprotocol_gets_binary_frames() {
    let server = Server::start(&[]).await;
    let mut client = Connect::new()
        .user("alice")
        .subprotocols("roomd.v1.rkyv")
        .handshake(&server)
        .await
        .expect("the rkyv subprotocol is accepted");
    assert_eq!(client.subprotocol.as_deref(), Some("roomd.v1.rkyv"));
    match client.next_event(TIMEOUT).await {
        Event::Binary(bytes) => assert!(!bytes.is_empty(), "the welcome archive is not empty"),
        other => panic!("rkyv sessions speak binary frames, got {other:?}"),
    }
}

#[tokio::test]
async fn offering_only_foreign_subprotocols_is_refused_with_400() {
    let server = Server::start(&[]).await;
    let result = Connect::new()
        .user("alice")
        .subprotocols("chat.example, mqtt")
        .handshake(&server)
        .await;
    assert_eq!(result.err(), Some(400));
}

#[tokio::test]
async fn upgrade_from_a_foreign_origin_is_refused_with_403() {
    let server = Server::start(&[]).await;
    let result = Connect::new()
        .user("alice")
        .origin("http://evil.example")
        .handshake(&server)
        .await;
    assert_eq!(result.err(), Some(403));
}

#[tokio::test]
async fn upgrade_from_an_origin_matching_the_host_is_allowed() {
    let server = Server::start(&[]).await;
    let origin = format!("http://{}", server.host());
    let client = Connect::new()
        .user("alice")
        .origin(&origin)
        .connect(&server)
        .await;
    assert_eq!(client.welcome["user"], "alice");
}

#[tokio::test]
async fn upgrade_from_a_listed_origin_is_allowed_and_others_still_refused() {
    let server = Server::start(&[
        "--allowed-origins",
        "https://app.example,https://admin.example",
    ])
    .await;
    let client = Connect::new()
        .user("alice")
        .origin("https://admin.example")
        .connect(&server)
        .await;
    assert_eq!(client.welcome["user"], "alice");
    let refused = Connect::new()
        .user("alice")
        .origin("https://other.example")
        .handshake(&server)
        .await;
    assert_eq!(refused.err(), Some(403));
}

#[tokio::test]
async fn upgrade_without_origin_is_allowed_even_with_an_allow_list() {
    let server = Server::start(&["--allowed-origins", "https://app.example"]).await;
    let client = Connect::new().user("carol").connect(&server).await;
    assert_eq!(client.welcome["user"], "carol");
}
