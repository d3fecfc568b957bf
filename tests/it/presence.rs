//! Presence: a subscriber that asks gets the member list right after its snapshot or
//! resumed, then joins and leaves of users (not connections); others get no presence.

use serde_json::{json, Value};

use crate::support::{Client, Server};

/// Users named in a presence frame's `join` (or `leave`) list; checks the frame's shape.
fn users(frame: &Value, list: &str) -> Vec<String> {
    assert_eq!(frame["t"], "presence", "{frame}");
    let names: Vec<String> = frame[list]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|u| u.as_str().expect("a user id").to_string())
                .collect()
        })
        .unwrap_or_default();
    if frame.get("members").is_none() {
        let other = if list == "join" { "leave" } else { "join" };
        let other_empty = frame[other]
            .as_array()
            .map(|a| a.is_empty())
            .unwrap_or(true);
        assert!(
            !(names.is_empty() && other_empty),
            "a presence change lists someone: {frame}"
        );
    }
    names
}

/// The `(user, conns)` pairs of a members frame, sorted by user.
fn members(frame: &Value) -> Vec<(String, u64)> {
    assert_eq!(frame["t"], "presence", "{frame}");
    let mut out: Vec<(String, u64)> = frame["members"]
        .as_array()
        .unwrap_or_else(|| panic!("a members list: {frame}"))
        .iter()
        .map(|m| {
            (
                m["user"].as_str().expect("member user").to_string(),
                m["conns"].as_u64().expect("member conns"),
            )
        })
        .collect();
    out.sort();
    out
}

fn pairs(list: &[(&str, u64)]) -> Vec<(String, u64)> {
    list.iter().map(|(u, c)| (u.to_string(), *c)).collect()
}

/// Subscribes with presence and returns the members frame that must follow the snapshot.
async fn join_with_presence(client: &mut Client, room: &str) -> Value {
    client.sub_presence(room).await;
    let frame = client.recv_json().await;
    assert_eq!(
        frame["t"], "presence",
        "the member list comes right after the snapshot: {frame}"
    );
    assert_eq!(frame["room"], room);
    frame
}

async fn next_presence(client: &mut Client, room: &str) -> Value {
    client
        .recv_until(|v| v["t"] == "presence" && v["room"] == room)
        .await
}

#[tokio::test]
async fn presence_subscriber_gets_the_member_list_including_itself() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("chat:members", "chat", json!({})).await;
    let mut bob = server.client("bob").await;
    bob.sub("chat:members").await;
    let frame = join_with_presence(&mut alice, "chat:members").await;
    assert_eq!(members(&frame), pairs(&[("alice", 1), ("bob", 1)]));
}

#[tokio::test]
async fn presence_subscriber_sees_joins_and_leaves() {
    let server = Server::start(&[]).await;
    let room = "chat:join-leave";
    let mut alice = server.client("alice").await;
    alice.create_ok(room, "chat", json!({})).await;
    join_with_presence(&mut alice, room).await;

    let mut bob = server.client("bob").await;
    bob.sub(room).await;
    let frame = next_presence(&mut alice, room).await;
    assert_eq!(users(&frame, "join"), vec!["bob"]);
    assert!(users(&frame, "leave").is_empty());

    bob.unsub(room).await;
    let frame = next_presence(&mut alice, room).await;
    assert_eq!(users(&frame, "leave"), vec!["bob"]);

    bob.sub(room).await;
    let frame = next_presence(&mut alice, room).await;
    assert_eq!(users(&frame, "join"), vec!["bob"]);
    drop(bob); // a vanished connection leaves like an unsub
    let frame = next_presence(&mut alice, room).await;
    assert_eq!(users(&frame, "leave"), vec!["bob"]);
}

#[tokio::test]
async fn user_with_two_connections_is_one_member_until_both_leave() {
    let server = Server::start(&[]).await;
    let room = "chat:two-conns";
    let mut alice = server.client("alice").await;
    alice.create_ok(room, "chat", json!({})).await;
    join_with_presence(&mut alice, room).await;

    let mut bob1 = server.client("bob").await;
    bob1.sub(room).await;
    assert_eq!(
        users(&next_presence(&mut alice, room).await, "join"),
        vec!["bob"]
    );
    let mut bob2 = server.client("bob").await;
    bob2.sub(room).await;

    let mut carol = server.client("carol").await;
    let frame = join_with_presence(&mut carol, room).await;
    assert_eq!(
        members(&frame),
        pairs(&[("alice", 1), ("bob", 2), ("carol", 1)]),
        "bob appears once, with both connections counted"
    );
    // bob's second connection was not announced to alice: the next change she sees is carol.
    let frame = next_presence(&mut alice, room).await;
    assert_eq!(users(&frame, "join"), vec!["carol"]);

    bob1.close().await;
    let mut dave = server.client("dave").await;
    dave.sub(room).await;
    // bob still has a connection: no leave for him before dave's join.
    let frame = next_presence(&mut alice, room).await;
    assert_eq!(users(&frame, "join"), vec!["dave"]);
    assert!(
        !users(&frame, "leave").contains(&"bob".to_string()),
        "{frame}"
    );

    bob2.close().await;
    let frame = next_presence(&mut alice, room).await;
    assert_eq!(users(&frame, "leave"), vec!["bob"]);
}

#[tokio::test]
async fn subscriber_without_presence_gets_no_presence_frames_but_is_a_visible_member() {
    let server = Server::start(&[]).await;
    let room = "chat:quiet";
    let mut alice = server.client("alice").await;
    alice.create_ok(room, "chat", json!({})).await;
    join_with_presence(&mut alice, room).await;

    let mut eve = server.client("eve").await;
    eve.sub(room).await;
    assert_eq!(
        users(&next_presence(&mut alice, room).await, "join"),
        vec!["eve"]
    );

    let mut bob = server.client("bob").await;
    bob.sub(room).await;
    assert_eq!(
        users(&next_presence(&mut alice, room).await, "join"),
        vec!["bob"]
    );
    let seq = bob
        .ack("1", room, json!({"type": "post", "text": "hello"}))
        .await;
    let frames = eve
        .collect_until(|v| v["t"] == "diff" && v["to"].as_u64().unwrap_or(0) >= seq)
        .await;
    assert!(
        frames.iter().all(|f| f["t"] != "presence"),
        "a subscriber without presence got presence: {frames:?}"
    );
}

#[tokio::test]
async fn resumed_presence_subscriber_gets_the_member_list_after_resumed() {
    let server = Server::start(&[]).await;
    let room = "chat:resume-presence";
    let mut alice = server.client("alice").await;
    alice.create_ok(room, "chat", json!({})).await;
    let snapshot = alice.sub(room).await;
    let mut bob = server.client("bob").await;
    let answer = bob
        .sub_msg(json!({"t": "sub", "room": room, "presence": true,
                        "since": {"epoch": snapshot["epoch"], "seq": 1}}))
        .await;
    assert_eq!(answer["t"], "resumed", "{answer}");
    let frame = bob.recv_json().await;
    assert_eq!(members(&frame), pairs(&[("alice", 1), ("bob", 1)]));
}
