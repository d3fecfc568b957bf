//! The rock-paper-scissors example (`examples/rps.rs`, a binary built on
//! `roomd::Server` with a kind of its own): two players and a spectator play over JSON
//! and rkyv, and every read path (diff, snapshot, resumed, `GET`, `?at=`, `/events`, the
//! SSE stream) is checked for any trace of a move its viewer may not see, also across a
//! `kill -9` of the server.

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use roomd::protocol::message::{ServerMsg, WireEntry};
use roomd::protocol::{binary, SUBPROTOCOL_RKYV};

use crate::sse::Stream;
use crate::support::{Client, Connect, Event, Server, TIMEOUT};

pub(crate) const ROOM: &str = "rps:game";

/// Sends op `op` as `id` and returns the `ack` or `nack`.
async fn op(client: &mut Client, id: &str, op: Value) -> Value {
    client
        .send_json(json!({"t": "op", "id": id, "room": ROOM, "op": op}))
        .await;
    client
        .recv_until(|v| v["id"] == id && (v["t"] == "ack" || v["t"] == "nack"))
        .await
}

pub(crate) async fn acked(client: &mut Client, id: &str, body: Value) -> u64 {
    let reply = op(client, id, body).await;
    assert_eq!(reply["t"], "ack", "{reply}");
    reply["seq"].as_u64().expect("an ack carries its seq")
}

pub(crate) async fn nacked(client: &mut Client, id: &str, body: Value) -> String {
    let reply = op(client, id, body).await;
    assert_eq!(reply["t"], "nack", "{reply}");
    reply["code"].as_str().expect("a nack code").to_owned()
}

pub(crate) fn play(choice: &str) -> Value {
    json!({"type": "move", "move": choice})
}

/// Subscribes and returns the snapshot (or resumed) answer.
pub(crate) async fn sub(client: &mut Client, since: Option<Value>) -> Value {
    let mut msg = json!({"t": "sub", "room": ROOM});
    if let Some(since) = since {
        msg["since"] = since;
    }
    client.send_json(msg).await;
    client
        .recv_until(|v| v["t"] == "snapshot" || v["t"] == "resumed")
        .await
}

/// Every frame up to the diff that reaches `seq`, as text for leak checks.
pub(crate) async fn diffs_through(client: &mut Client, seq: u64) -> Vec<Value> {
    client
        .collect_until(|v| v["t"] == "diff" && v["to"].as_u64().is_some_and(|to| to >= seq))
        .await
}

/// Panics when `what` (any JSON) mentions a key or value of the hidden move.
pub(crate) fn assert_no_trace(what: &Value, hidden: &[&str], context: &str) {
    let text = what.to_string();
    for needle in hidden {
        assert!(
            !text.contains(needle),
            "{context}: found {needle:?} in {text}"
        );
    }
}

/// The entry `key` of a list of entries, if present.
pub(crate) fn entry<'a>(entries: &'a Value, key: &str) -> Option<&'a Value> {
    entries
        .as_array()
        .expect("entries are a list")
        .iter()
        .find(|e| e["k"] == key)
}

/// Reads every HTTP path as `user` and checks none shows the hidden move.
pub(crate) async fn check_http_paths(server: &Server, user: &str, at: u64, hidden: &[&str]) {
    let state = server.get(&format!("/api/rooms/{ROOM}?user={user}")).await;
    assert_eq!(state.status, 200, "{}", state.text);
    assert_no_trace(&state.body, hidden, &format!("GET as {user}"));
    let past = server
        .get(&format!("/api/rooms/{ROOM}?at={at}&user={user}"))
        .await;
    assert_eq!(past.status, 200, "{}", past.text);
    assert_no_trace(&past.body, hidden, &format!("?at={at} as {user}"));
    let events = server
        .get(&format!("/api/rooms/{ROOM}/events?after=0&user={user}"))
        .await;
    assert_eq!(events.status, 200, "{}", events.text);
    assert_no_trace(&events.body, hidden, &format!("/events as {user}"));
    let mut stream = Stream::open(
        server,
        &format!("/api/rooms/{ROOM}/stream?user={user}"),
        &[],
    )
    .await;
    assert_eq!(stream.status, 200);
    let snapshot = stream.event().await;
    assert_eq!(snapshot.event, "snapshot");
    assert_no_trace(&snapshot.data, hidden, &format!("SSE snapshot as {user}"));
}

/// `/events` of round 1 (alice's move at `first`, bob's at `second`) as each player and
/// a spectator. Alice may see everything both events changed, so she gets them whole.
/// Bob and carol get alice's move as `hidden` and the move that ends the round as the
/// changes they may see, without author or op (the deletion of alice's hidden move is
/// not among them).
pub(crate) async fn check_round_events(server: &Server, joined: u64, first: u64, second: u64) {
    let last = json!({"round": 1, "moves": {"alice": "rock", "bob": "paper"}, "winner": "bob"});
    let whole = |seq: u64, user: &str, choice: &str| json!({"seq": seq, "user": user, "op": {"type": "move", "move": choice}});
    let redacted = json!({"seq": second, "changes": [
        {"k": "last", "v": last, "ver": second},
        {"k": "round", "v": 2, "ver": second},
        {"k": "score/bob", "v": 1, "ver": second},
    ]});
    let hidden = json!({"seq": first, "hidden": true});
    for (user, expected) in [
        (
            "alice",
            [whole(first, "alice", "rock"), whole(second, "bob", "paper")],
        ),
        ("bob", [hidden.clone(), redacted.clone()]),
        ("carol", [hidden.clone(), redacted.clone()]),
    ] {
        let events = server
            .get(&format!(
                "/api/rooms/{ROOM}/events?after={joined}&user={user}"
            ))
            .await;
        assert_eq!(events.status, 200, "{}", events.text);
        let mut expected = expected;
        for (i, event) in expected.iter_mut().enumerate() {
            event["ts"] = events.body["events"][i]["ts"].clone();
        }
        assert_eq!(
            events.body["events"],
            json!(expected),
            "/events of round 1 as {user}"
        );
    }
}

#[tokio::test]
async fn rps_plays_over_json_and_hides_the_first_move_on_every_read_path() {
    let mut server = Server::start_example("rps", None, &[]).await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    let mut carol = server.client("carol").await;

    alice
        .send_json(json!({"t": "create", "id": "c", "room": ROOM, "kind": "rps", "init": {}}))
        .await;
    let created = alice.recv_until(|v| v["id"] == "c").await;
    assert_eq!(created["t"], "ack", "{created}");
    for client in [&mut alice, &mut bob, &mut carol] {
        let snapshot = sub(client, None).await;
        assert_eq!(snapshot["kind"], "rps");
        assert_eq!(entry(&snapshot["entries"], "round").unwrap()["v"], 1);
        assert_eq!(
            entry(&snapshot["entries"], "players").unwrap()["v"],
            json!([])
        );
    }
    acked(&mut alice, "j1", json!({"type": "join"})).await;
    let joined = acked(&mut bob, "j1", json!({"type": "join"})).await;
    assert_eq!(
        nacked(&mut carol, "j1", json!({"type": "join"})).await,
        "forbidden"
    );
    assert_eq!(nacked(&mut carol, "m1", play("rock")).await, "forbidden");
    assert_eq!(nacked(&mut alice, "m0", play("lizard")).await, "invalid");

    // Round 1: alice moves first. Only she sees it.
    let first = acked(&mut alice, "m1", play("rock")).await;
    assert_eq!(nacked(&mut alice, "m2", play("paper")).await, "conflict");
    let seen = diffs_through(&mut alice, first).await;
    let mine = seen.last().unwrap();
    assert_eq!(entry(&mine["changes"], "move/alice").unwrap()["v"], "rock");
    let hidden = ["move/alice", "rock"];
    for (name, client) in [("bob", &mut bob), ("carol", &mut carol)] {
        let frames = diffs_through(client, first).await;
        assert_no_trace(&Value::Array(frames), &hidden, &format!("diffs to {name}"));
        // A new subscription and a resume from before the move show nothing either.
        let snapshot = sub(client, None).await;
        assert_no_trace(&snapshot, &hidden, &format!("snapshot to {name}"));
        let epoch = snapshot["epoch"].clone();
        let resumed = sub(client, Some(json!({"epoch": epoch, "seq": joined}))).await;
        assert_eq!(resumed["t"], "resumed", "{resumed}");
        assert_no_trace(&resumed, &hidden, &format!("resumed to {name}"));
        check_http_paths(&server, name, first, &hidden).await;
    }
    let own = server.get(&format!("/api/rooms/{ROOM}?user=alice")).await;
    assert_eq!(
        entry(&own.body["entries"], "move/alice").unwrap()["v"],
        "rock"
    );
    let events = server
        .get(&format!(
            "/api/rooms/{ROOM}/events?after={joined}&user=carol"
        ))
        .await;
    assert_eq!(
        events.body["events"],
        json!([{"seq": first, "ts": events.body["events"][0]["ts"], "hidden": true}]),
        "the event is there, redacted"
    );

    // Bob's move ends the round, in one event, seen by all.
    let second = acked(&mut bob, "m1", play("paper")).await;
    for client in [&mut alice, &mut bob, &mut carol] {
        let frames = diffs_through(client, second).await;
        let diff = frames.last().unwrap();
        let changes = &diff["changes"];
        assert_eq!(
            entry(changes, "last").unwrap()["v"],
            json!({"round": 1, "moves": {"alice": "rock", "bob": "paper"}, "winner": "bob"})
        );
        assert_eq!(entry(changes, "round").unwrap()["v"], 2);
        assert_eq!(entry(changes, "score/bob").unwrap()["v"], 1);
    }
    check_round_events(&server, joined, first, second).await;
    let state = server.room_state(ROOM).await;
    let entries = &state["entries"];
    assert!(entry(entries, "move/alice").is_none() && entry(entries, "move/bob").is_none());
    assert_eq!(entry(entries, "score/alice").unwrap()["v"], 0);

    // Round 2: bob moves first, then the server is killed.
    let hidden = ["move/bob", "scissors"];
    let third = acked(&mut bob, "m2", play("scissors")).await;
    let _ = diffs_through(&mut bob, third).await;
    server.kill9().await;
    server.restart().await;
    for name in ["alice", "carol"] {
        check_http_paths(&server, name, third, &hidden).await;
    }
    let mut bob = server.client("bob").await;
    let snapshot = sub(&mut bob, None).await;
    assert_eq!(
        entry(&snapshot["entries"], "move/bob").unwrap()["v"],
        "scissors"
    );
    let mut alice = server.client("alice").await;
    let snapshot = sub(&mut alice, None).await;
    assert_no_trace(&snapshot, &hidden, "snapshot to alice after kill -9");
    assert_eq!(nacked(&mut bob, "m3", play("rock")).await, "conflict");
    let fourth = acked(&mut alice, "m2", play("rock")).await;
    let frames = diffs_through(&mut alice, fourth).await;
    let changes = &frames.last().unwrap()["changes"];
    assert_eq!(
        entry(changes, "last").unwrap()["v"],
        json!({"round": 2, "moves": {"alice": "rock", "bob": "scissors"}, "winner": "alice"})
    );
    assert_eq!(entry(changes, "round").unwrap()["v"], 3);
    assert_eq!(entry(changes, "score/alice").unwrap()["v"], 1);
}

#[tokio::test]
async fn a_room_of_a_kind_the_server_does_not_serve_is_unavailable_alone() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut server = Server::start_example("rps", Some(dir.path()), &[]).await;
    let created = server
        .post(
            "/api/rooms",
            &json!({"room": ROOM, "kind": "rps", "init": {}}),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let other = server
        .post(
            "/api/rooms",
            &json!({"room": "state:s", "kind": "state", "init": {}}),
        )
        .await;
    assert_eq!(other.status, 201, "{}", other.text);
    server.kill9().await;
    // The plain `roomd` binary does not serve kind `rps`.
    let plain = Server::start_in(dir.path(), &[]).await;
    let rps = plain.get(&format!("/api/rooms/{ROOM}")).await;
    assert_eq!(
        (rps.status, rps.code()),
        (503, "unavailable"),
        "{}",
        rps.text
    );
    assert_eq!(plain.get("/api/rooms/state:s").await.status, 200);
    let unknown = plain
        .post(
            "/api/rooms",
            &json!({"room": "rps:new", "kind": "rps", "init": {}}),
        )
        .await;
    assert_eq!((unknown.status, unknown.code()), (400, "invalid"));
    assert!(
        plain.stderr_tail().contains("does not serve"),
        "the load failure names the kind: {}",
        plain.stderr_tail()
    );
}

/// The committed bytes of client fixture `$name`.
macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!("../fixtures/rkyv/client/", $name, ".bin")).as_slice()
    };
}

async fn rkyv_client(server: &Server, user: &str) -> Client {
    let mut client = Connect::new()
        .user(user)
        .subprotocols(SUBPROTOCOL_RKYV)
        .handshake(server)
        .await
        .unwrap_or_else(|status| panic!("the rkyv upgrade was refused with HTTP {status}"));
    let welcome = recv(&mut client).await;
    assert!(matches!(welcome, ServerMsg::Welcome { .. }), "{welcome:?}");
    client
}

async fn recv(client: &mut Client) -> ServerMsg {
    match client.next_event(TIMEOUT).await {
        Event::Binary(bytes) => binary::decode_server(&bytes)
            .unwrap_or_else(|e| panic!("the server sent an invalid frame: {e}")),
        other => panic!("expected a binary frame, got {other:?}"),
    }
}

/// Sends fixture `frame` and returns every frame up to its `ack`/`nack` (id `id`).
async fn send_until_reply(client: &mut Client, frame: &[u8], id: &str) -> Vec<ServerMsg> {
    client.send(Message::binary(frame.to_vec())).await;
    let mut seen = Vec::new();
    loop {
        let msg = recv(client).await;
        let done = matches!(&msg, ServerMsg::Ack { id: got, .. } | ServerMsg::Nack { id: got, .. } if got == id);
        seen.push(msg);
        if done {
            return seen;
        }
    }
}

/// Frames until a diff reaching `seq`; returns every diff's entries.
async fn diff_entries_through(client: &mut Client, seq: u64) -> Vec<WireEntry> {
    let mut entries = Vec::new();
    loop {
        if let ServerMsg::Diff { to, changes, .. } = recv(client).await {
            entries.extend(changes);
            if to >= seq {
                return entries;
            }
        }
    }
}

fn ack_seq(frames: &[ServerMsg]) -> u64 {
    match frames.last() {
        Some(ServerMsg::Ack { seq, .. }) => *seq,
        other => panic!("expected an ack, got {other:?}"),
    }
}

#[tokio::test]
async fn rps_plays_over_rkyv_from_the_committed_fixtures() {
    let server = Server::start_example("rps", None, &[]).await;
    let mut alice = rkyv_client(&server, "alice").await;
    let mut bob = rkyv_client(&server, "bob").await;
    let mut carol = rkyv_client(&server, "carol").await;
    ack_seq(&send_until_reply(&mut alice, fixture!("create_rps"), "r1").await);
    for client in [&mut alice, &mut bob, &mut carol] {
        client
            .send(Message::binary(fixture!("sub_rps").to_vec()))
            .await;
        match recv(client).await {
            ServerMsg::Snapshot { kind, .. } => assert_eq!(kind, "rps"),
            other => panic!("expected a snapshot, got {other:?}"),
        }
    }
    ack_seq(&send_until_reply(&mut alice, fixture!("op_rps_join"), "r2").await);
    ack_seq(&send_until_reply(&mut bob, fixture!("op_rps_join"), "r2").await);
    let refused = send_until_reply(&mut carol, fixture!("op_rps_join"), "r2").await;
    assert!(
        matches!(refused.last(), Some(ServerMsg::Nack { code, .. }) if code.as_str() == "forbidden"),
        "{refused:?}"
    );
    let first = ack_seq(&send_until_reply(&mut alice, fixture!("op_rps_rock"), "r3").await);
    let seen = diff_entries_through(&mut alice, first).await;
    assert!(seen.iter().any(|e| e.k == "move/alice" && e.v.is_some()));
    for client in [&mut bob, &mut carol] {
        let seen = diff_entries_through(client, first).await;
        assert!(
            seen.iter().all(|e| !e.k.starts_with("move/")),
            "a hidden move leaked: {seen:?}"
        );
    }
    let second = ack_seq(&send_until_reply(&mut bob, fixture!("op_rps_paper"), "r4").await);
    for client in [&mut alice, &mut bob, &mut carol] {
        let seen = diff_entries_through(client, second).await;
        let last = seen.iter().rev().find(|e| e.k == "last").expect("last");
        let value = roomd::protocol::json::from_value(
            &last
                .v
                .clone()
                .expect("a live entry")
                .to_value()
                .expect("a valid value"),
        );
        assert_eq!(
            value,
            json!({"round": 1, "moves": {"alice": "rock", "bob": "paper"}, "winner": "bob"})
        );
    }
}
