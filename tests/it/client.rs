//! The Rust client SDK (`roomd::client`) against the real binary in both encodings, and
//! against a scripted fake server for what a correct server never does on its own
//! (gaps in diffs, an epoch change mid-stream, chosen close codes).
//!
//! Unlike the rest of this binary, these tests use the roomd library: the client is
//! the thing under test. The fake server speaks literal JSON.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use roomd::client::{
    Auth, Client, ClientError, Encoding, Endpoint, OpError, Options, Reconnect, RoomEvent, Status,
    SubscribeOptions, Subscription,
};
use roomd::protocol::codes::Code;
use roomd::value::Value;
use serde_json::{json, Value as Json};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::support::{jwt, now_secs, Server, TIMEOUT};

/// Waits for restarts, reconnects and re-sent ops (a debug build restarting on a busy
/// machine is not instant).
const LONG: Duration = Duration::from_secs(30);

fn value(json: Json) -> Value {
    roomd::protocol::json::to_value(&json).expect("test values follow the value rules")
}

fn fast_reconnect() -> Reconnect {
    Reconnect {
        base: Duration::from_millis(20),
        cap: Duration::from_millis(300),
        max_attempts: None,
    }
}

fn options(user: &str, encoding: Encoding) -> Options {
    Options {
        encoding,
        reconnect: fast_reconnect(),
        ..Options::user(user)
    }
}

fn incr(key: &str) -> Value {
    value(json!({"type": "incr", "key": key}))
}

/// The mirror as the HTTP API writes entries: `[{"k","v","ver"}]` sorted by key.
fn mirror_json(sub: &Subscription) -> Json {
    sub.with_entries(|entries| {
        Json::Array(
            entries
                .iter()
                .map(|(k, (v, ver))| {
                    json!({"k": k, "v": roomd::protocol::json::from_value(v), "ver": ver})
                })
                .collect(),
        )
    })
}

/// Reads events until one brings the room to `seq` or beyond; returns the events read.
/// (The mirror itself may already be there: it updates whether or not events are read.)
async fn events_through(sub: &mut Subscription, seq: u64) -> Vec<RoomEvent> {
    let mut events = Vec::new();
    loop {
        let event = tokio::time::timeout(LONG, sub.next())
            .await
            .unwrap_or_else(|_| panic!("no event reached seq {seq}; got {events:?}"))
            .expect("the subscription is open");
        let end = match &event {
            RoomEvent::Snapshot { seq, .. } => Some(*seq),
            RoomEvent::Resumed { to, .. } | RoomEvent::Diff { to, .. } => Some(*to),
            _ => None,
        };
        events.push(event);
        if end.is_some_and(|end| end >= seq) {
            return events;
        }
    }
}

/// Asserts that the mirror equals `GET /api/rooms/{room}` once it has reached its seq.
async fn assert_mirror_matches_room(server: &Server, sub: &Subscription) {
    let state = server.room_state(sub.room()).await;
    let head = state["seq"].as_u64().expect("the room has a seq");
    wait_for("the mirror to reach the room's head", || sub.seq() >= head).await;
    assert_eq!(sub.seq(), head, "the mirror went past the room's head");
    assert_eq!(format!("{:016x}", sub.epoch()), state["epoch"]);
    assert_eq!(mirror_json(sub), state["entries"], "mirror != room state");
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + LONG;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn client_creates_subscribes_and_ops_in_both_encodings() {
    let server = Server::start(&[]).await;
    for (encoding, room) in [
        (Encoding::Rkyv, "state:sdk-rkyv"),
        (Encoding::Json, "state:sdk-json"),
    ] {
        let client = Client::connect(server.ws_url(""), options("alice", encoding))
            .await
            .expect("the server is up");
        assert!(matches!(client.status(), Status::Connected { ref user, .. } if user == "alice"));
        let init = value(json!({"entries": {"a": 1, "blob": {"$b64": "AAE="}}}));
        assert_eq!(client.create(room, "state", init.clone()).await, Ok(1));
        let exists = client.create(room, "state", init).await;
        assert_eq!(
            exists.as_ref().map_err(OpError::code),
            Err(Some(Code::Exists))
        );

        let mut sub = client
            .subscribe(room, SubscribeOptions::default())
            .await
            .expect("the room exists");
        assert!(matches!(
            sub.next().await,
            Some(RoomEvent::Snapshot { seq: 1, .. })
        ));
        assert_eq!(sub.kind(), "state");
        assert_eq!(sub.get("blob"), Some((Value::Bytes(vec![0, 1]), 1)));

        let set = value(json!({"type": "set", "key": "b", "value": {"x": [1, 2.5, null]}}));
        let seq = client.op(room, set).await.expect("a valid set");
        assert_eq!(seq, 2);
        let conflict = value(json!({"type": "set", "key": "a", "value": 2, "if_ver": 7}));
        let nack = client.op(room, conflict).await.expect_err("a stale if_ver");
        assert!(
            matches!(
                nack,
                OpError::Nack {
                    code: Code::Conflict,
                    ..
                }
            ),
            "{nack:?}"
        );
        let bad = value(json!({"type": "explode"}));
        assert_eq!(
            client.op(room, bad).await.map_err(|e| e.code()),
            Err(Some(Code::Invalid))
        );

        let events = events_through(&mut sub, seq).await;
        assert!(
            events
                .iter()
                .any(|e| matches!(e, RoomEvent::Diff { to: 2, .. })),
            "{events:?}"
        );
        assert_mirror_matches_room(&server, &sub).await;

        let missing = client
            .subscribe("state:nowhere", SubscribeOptions::default())
            .await
            .expect_err("no such room");
        assert!(
            matches!(
                missing,
                ClientError::Room {
                    code: Code::NotFound,
                    ..
                }
            ),
            "{missing:?}"
        );
        client.close().await;
        assert_eq!(client.status(), Status::Closed(ClientError::ClientClosed));
        assert_eq!(
            client.op(room, incr("a")).await,
            Err(OpError::Client(ClientError::ClientClosed))
        );
    }
}

#[tokio::test]
async fn mirror_equals_room_state_after_a_burst_of_ops_from_another_client() {
    let server = Server::start(&[]).await;
    let room = "state:sdk-burst";
    let alice = Client::connect(server.ws_url(""), options("alice", Encoding::Rkyv))
        .await
        .expect("the server is up");
    let bob = Client::connect(server.ws_url(""), options("bob", Encoding::Json))
        .await
        .expect("the server is up");
    let doomed: serde_json::Map<String, Json> =
        (0..75).map(|x| (format!("x/{x}"), json!(x))).collect();
    alice
        .create(room, "state", value(json!({"entries": doomed})))
        .await
        .expect("a new room");
    let sub = alice
        .subscribe(room, SubscribeOptions { presence: true })
        .await
        .expect("the room exists");

    let mut tasks = Vec::new();
    for i in 0..300u32 {
        let bob = bob.clone();
        let op = match i % 4 {
            0 => json!({"type": "incr", "key": format!("n/{}", i % 7), "by": i}),
            1 => json!({"type": "set", "key": format!("s/{}", i % 11), "value": {"i": i}}),
            2 => json!({"type": "set", "key": format!("d/{i}"), "value": i}),
            // Each deletes its own key from `init`, so the ops' order does not matter.
            _ => json!({"type": "del", "key": format!("x/{}", i / 4)}),
        };
        tasks.push(tokio::spawn(async move { bob.op(room, value(op)).await }));
    }
    let mut seqs = Vec::new();
    for task in tasks {
        seqs.push(
            task.await
                .expect("the op task does not panic")
                .expect("acked"),
        );
    }
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 300, "every op has its own seq");
    assert_mirror_matches_room(&server, &sub).await;
}

#[tokio::test]
async fn reconnect_after_kill9_resends_unacked_ops_once_and_resumes_the_mirror() {
    let mut server = Server::start(&[]).await;
    let room = "state:sdk-kill9";
    let url = Arc::new(Mutex::new(server.ws_url("")));
    let endpoint = {
        let url = url.clone();
        Endpoint::provider(move || {
            url.lock()
                .expect("a poisoned lock means the test already failed")
                .clone()
        })
    };
    let client = Client::connect(
        endpoint,
        Options {
            event_buffer: 4096,
            ..options("alice", Encoding::Rkyv)
        },
    )
    .await
    .expect("the server is up");
    client
        .create(room, "state", value(json!({})))
        .await
        .expect("a new room");
    let mut sub = client
        .subscribe(room, SubscribeOptions::default())
        .await
        .expect("the room exists");
    assert!(matches!(
        sub.next().await,
        Some(RoomEvent::Snapshot { seq: 1, .. })
    ));
    let epoch = sub.epoch();

    // A stream of ops in flight when the server dies: issued 2 ms apart, so the kill
    // (right after the first ack) lands while some are sent and unacked and most are
    // not sent yet. A burst all at once could commit and be acked in one batch before
    // the kill.
    const IN_FLIGHT: usize = 200;
    const QUEUED: usize = 50;
    let acked = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let spawn_op = |client: &Client, delay: Duration| {
        let (client, acked) = (client.clone(), acked.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let result = client.op(room, incr("count")).await;
            acked.fetch_add(1, Ordering::SeqCst);
            result
        })
    };
    for i in 0..IN_FLIGHT {
        tasks.push(spawn_op(&client, Duration::from_millis(2 * i as u64)));
    }
    wait_for("a first ack", || acked.load(Ordering::SeqCst) > 0).await;
    server.kill9().await;
    let acked_before_kill = acked.load(Ordering::SeqCst);
    // ...and ops issued while it is down.
    for _ in 0..QUEUED {
        tasks.push(spawn_op(&client, Duration::ZERO));
    }
    server.restart().await;
    *url.lock()
        .expect("a poisoned lock means the test already failed") = server.ws_url("");

    let mut seqs = Vec::new();
    for task in tasks {
        let result = tokio::time::timeout(LONG, task)
            .await
            .expect("every op is answered after the reconnect")
            .expect("the op task does not panic");
        seqs.push(result.expect("every op is acked, none refused"));
    }
    assert!(
        acked_before_kill < IN_FLIGHT,
        "the kill came too late to leave ops unacked ({acked_before_kill} acked)"
    );
    seqs.sort_unstable();
    seqs.dedup();
    let total = IN_FLIGHT + QUEUED;
    assert_eq!(seqs.len(), total, "each op has its own, original ack");

    // Applied exactly once: one event per op, and the counter counts each once.
    let state = server.room_state(room).await;
    assert_eq!(state["seq"], 1 + total as u64, "{state}");
    let count = state["entries"]
        .as_array()
        .expect("entries are a list")
        .iter()
        .find(|e| e["k"] == "count")
        .expect("the counter exists");
    assert_eq!(count["v"], total as u64);

    let events = events_through(&mut sub, 1 + total as u64).await;
    assert_eq!(
        sub.epoch(),
        epoch,
        "the epoch survives kill -9 under immediate"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, RoomEvent::Resumed { .. })),
        "the mirror resumed with since instead of a snapshot: {events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, RoomEvent::Snapshot { .. })),
        "no snapshot was needed: {events:?}"
    );
    assert_mirror_matches_room(&server, &sub).await;
    assert!(matches!(client.status(), Status::Connected { connection, .. } if connection >= 2));
}

#[tokio::test]
async fn an_epoch_change_after_an_unclean_stop_replaces_the_mirror_with_a_snapshot() {
    let mut server = Server::start(&["--durability", "none"]).await;
    let room = "state:sdk-epoch";
    let url = Arc::new(Mutex::new(server.ws_url("")));
    let endpoint = {
        let url = url.clone();
        Endpoint::provider(move || {
            url.lock()
                .expect("a poisoned lock means the test already failed")
                .clone()
        })
    };
    let client = Client::connect(endpoint, options("alice", Encoding::Json))
        .await
        .expect("the server is up");
    client
        .create(room, "state", value(json!({"entries": {"a": 1}})))
        .await
        .expect("a new room");
    let mut sub = client
        .subscribe(room, SubscribeOptions::default())
        .await
        .expect("the room exists");
    let old_epoch = sub.epoch();

    // A clean restart (close 4002) commits the room: the client resumes.
    server.restart().await;
    *url.lock()
        .expect("a poisoned lock means the test already failed") = server.ws_url("");
    let seq = client
        .op(room, incr("n"))
        .await
        .expect("acked after the reconnect");
    let events = events_through(&mut sub, seq).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, RoomEvent::Resumed { .. })),
        "{events:?}"
    );
    assert_eq!(sub.epoch(), old_epoch);

    // kill -9 under `none` changes every epoch: the resume must become a snapshot.
    server.kill9().await;
    server.restart().await;
    *url.lock()
        .expect("a poisoned lock means the test already failed") = server.ws_url("");
    let new_epoch = loop {
        let event = tokio::time::timeout(LONG, sub.next())
            .await
            .expect("a snapshot after the reconnect")
            .expect("the subscription is open");
        if let RoomEvent::Snapshot { epoch, .. } = event {
            break epoch;
        }
    };
    assert_ne!(new_epoch, old_epoch);
    assert_eq!(sub.epoch(), new_epoch);
    assert_mirror_matches_room(&server, &sub).await;
}

#[tokio::test]
async fn a_full_event_channel_drops_events_but_not_mirror_updates() {
    let server = Server::start(&[]).await;
    let room = "state:sdk-lagged";
    let client = Client::connect(
        server.ws_url(""),
        Options {
            event_buffer: 2,
            ..options("alice", Encoding::Rkyv)
        },
    )
    .await
    .expect("the server is up");
    client
        .create(room, "state", value(json!({})))
        .await
        .expect("a new room");
    let mut sub = client
        .subscribe(room, SubscribeOptions::default())
        .await
        .expect("the room exists");
    let mut last = 0;
    for _ in 0..30 {
        last = client.op(room, incr("n")).await.expect("acked");
    }
    wait_for("the mirror to catch up", || sub.seq() == last).await;
    assert_eq!(sub.get("n"), Some((Value::Int(30), last)));

    // The channel holds the snapshot and one diff; the rest were dropped.
    assert!(matches!(sub.try_next(), Some(RoomEvent::Snapshot { .. })));
    assert!(matches!(sub.try_next(), Some(RoomEvent::Diff { .. })));
    assert_eq!(sub.try_next(), None);
    // The next event that fits comes after a marker counting what was dropped.
    let next = client.op(room, incr("n")).await.expect("acked");
    let event = tokio::time::timeout(TIMEOUT, sub.next())
        .await
        .expect("an event");
    assert!(
        matches!(event, Some(RoomEvent::Lagged { missed }) if missed >= 1),
        "{event:?}"
    );
    let event = tokio::time::timeout(TIMEOUT, sub.next())
        .await
        .expect("an event");
    assert!(
        matches!(event, Some(RoomEvent::Diff { to, .. }) if to == next),
        "{event:?}"
    );
}

#[tokio::test]
async fn tokens_authenticate_and_a_bad_token_is_an_auth_error_without_retry() {
    let server = Server::start(&["--jwt-secret", "sdk-secret"]).await;
    let token = jwt(
        "sdk-secret",
        json!({"sub": "carol", "exp": now_secs() + 600}),
    );
    let client = Client::connect(
        server.ws_url(""),
        Options {
            auth: Auth::Token(token),
            ..Options::default()
        },
    )
    .await
    .expect("a valid token");
    assert!(matches!(client.status(), Status::Connected { ref user, .. } if user == "carol"));

    let refused = Client::connect(
        server.ws_url(""),
        Options {
            auth: Auth::Token("not-a-jwt".into()),
            ..Options::default()
        },
    )
    .await
    .expect_err("a bad token");
    assert!(
        matches!(refused, ClientError::Unauthorized { .. }),
        "{refused:?}"
    );
}

#[tokio::test]
async fn an_idle_client_answers_heartbeats_and_stays_connected() {
    // 1 s, not less: with every black-box test running at once on a 2-core machine, a
    // 100 ms beat left the client's answers late often enough to close it (2 runs in
    // 8), and a 500 ms one still did in 3 of about 10 full runs (the server allows two
    // beats of silence, the client two and a half); it passed alone every time.
    let server = Server::start(&["--heartbeat", "1s"]).await;
    let client = Client::connect(server.ws_url(""), options("alice", Encoding::Rkyv))
        .await
        .expect("the server is up");
    // A missing 4008 can only be seen over time: six heartbeats, three times the limit.
    tokio::time::sleep(Duration::from_millis(6000)).await;
    assert!(
        matches!(client.status(), Status::Connected { connection: 1, .. }),
        "{:?}",
        client.status()
    );
    let created = client.create("chat:idle", "chat", value(json!({}))).await;
    assert_eq!(created, Ok(1));
}

/// A scripted server speaking `roomd.v1.json` on a loopback port.
struct FakeServer {
    listener: TcpListener,
    url: String,
}

struct FakeConn {
    ws: WebSocketStream<TcpStream>,
}

impl FakeServer {
    async fn start() -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        FakeServer {
            listener,
            url: format!("ws://{addr}/ws"),
        }
    }

    /// Accepts the next connection, selects JSON and sends `welcome`.
    async fn accept(&self) -> FakeConn {
        let (stream, _) = tokio::time::timeout(LONG, self.listener.accept())
            .await
            .expect("the client (re)connects")
            .expect("accept works on loopback");
        // The signature is tungstenite's `Callback`, large error type included.
        #[allow(clippy::result_large_err)]
        let select_json = |_: &Request, mut response: Response| {
            response.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                "roomd.v1.json".parse().expect("a valid header value"),
            );
            Ok::<_, ErrorResponse>(response)
        };
        let ws = tokio_tungstenite::accept_hdr_async(stream, select_json)
            .await
            .expect("the client's upgrade is valid");
        let mut conn = FakeConn { ws };
        conn.send(
            json!({"t": "welcome", "proto": 1, "session": "s1", "user": "alice",
                         "heartbeat_ms": 15000, "max_frame": 65536}),
        )
        .await;
        conn
    }
}

impl FakeConn {
    async fn send(&mut self, frame: Json) {
        self.ws
            .send(Message::text(frame.to_string()))
            .await
            .expect("the client is connected");
    }

    async fn recv(&mut self) -> Json {
        loop {
            let message = tokio::time::timeout(TIMEOUT, self.ws.next())
                .await
                .expect("the client sends a frame")
                .expect("the client is connected")
                .expect("a valid frame");
            if let Message::Text(text) = message {
                return serde_json::from_str(text.as_str()).expect("the client sends JSON");
            }
        }
    }

    async fn close(&mut self, code: u16) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "scripted".into(),
        };
        let _ = self.ws.close(Some(frame)).await;
    }
}

async fn fake_pair(fake: &FakeServer) -> (Client, FakeConn) {
    let options = options("alice", Encoding::Json);
    let (client, conn) = tokio::join!(Client::connect(fake.url.as_str(), options), fake.accept());
    (client.expect("the fake server welcomes"), conn)
}

#[tokio::test]
async fn a_gap_or_an_epoch_change_in_diffs_makes_the_client_resubscribe_since_its_mirror() {
    let fake = FakeServer::start().await;
    let (client, mut conn) = fake_pair(&fake).await;
    let room = "state:fake";
    let epoch = "00000000000000aa";
    let subscribing = tokio::spawn({
        let client = client.clone();
        async move { client.subscribe(room, SubscribeOptions::default()).await }
    });
    assert_eq!(conn.recv().await, json!({"t": "sub", "room": room}));
    conn.send(
        json!({"t": "snapshot", "room": room, "kind": "state", "epoch": epoch, "seq": 3,
                     "entries": [{"k": "a", "v": 1, "ver": 2}], "recovered": false}),
    )
    .await;
    let mut sub = subscribing
        .await
        .expect("the subscribe task does not panic")
        .expect("the snapshot answers the sub");
    assert!(matches!(
        sub.next().await,
        Some(RoomEvent::Snapshot { seq: 3, .. })
    ));

    conn.send(
        json!({"t": "diff", "room": room, "epoch": epoch, "from": 4, "to": 4,
                     "changes": [{"k": "a", "v": 2, "ver": 4}]}),
    )
    .await;
    assert!(matches!(
        sub.next().await,
        Some(RoomEvent::Diff { from: 4, to: 4, .. })
    ));
    // Event 5 never arrives: the client must not apply 6 and must ask to resume at 4.
    conn.send(
        json!({"t": "diff", "room": room, "epoch": epoch, "from": 6, "to": 6,
                     "changes": [{"k": "b", "v": 6, "ver": 6}]}),
    )
    .await;
    assert_eq!(
        conn.recv().await,
        json!({"t": "sub", "room": room, "since": {"epoch": epoch, "seq": 4}})
    );
    assert_eq!(sub.seq(), 4);
    assert_eq!(sub.get("b"), None);
    conn.send(
        json!({"t": "resumed", "room": room, "epoch": epoch, "from": 5, "to": 6,
                     "changes": [{"k": "a", "ver": 5, "del": true}, {"k": "b", "v": 6, "ver": 6}]}),
    )
    .await;
    assert!(matches!(
        sub.next().await,
        Some(RoomEvent::Resumed { from: 5, to: 6, .. })
    ));
    assert_eq!(sub.seq(), 6);
    assert_eq!(sub.get("a"), None);
    assert_eq!(sub.get("b"), Some((Value::Int(6), 6)));

    // A diff from another epoch: resubscribe since the mirror; the snapshot replaces it.
    let new_epoch = "00000000000000bb";
    conn.send(
        json!({"t": "diff", "room": room, "epoch": new_epoch, "from": 2, "to": 2,
                     "changes": [{"k": "c", "v": 1, "ver": 2}]}),
    )
    .await;
    assert_eq!(
        conn.recv().await,
        json!({"t": "sub", "room": room, "since": {"epoch": epoch, "seq": 6}})
    );
    conn.send(
        json!({"t": "snapshot", "room": room, "kind": "state", "epoch": new_epoch,
                     "seq": 2, "entries": [{"k": "c", "v": 1, "ver": 2}], "recovered": false}),
    )
    .await;
    assert!(matches!(
        sub.next().await,
        Some(RoomEvent::Snapshot {
            epoch: 0xbb,
            seq: 2,
            ..
        })
    ));
    assert_eq!(sub.epoch(), 0xbb);
    assert_eq!(sub.entries().len(), 1);
    assert_eq!(sub.get("c"), Some((Value::Int(1), 2)));
}

#[tokio::test]
async fn after_a_4001_close_unacked_ops_are_resent_with_their_original_ids_in_order() {
    let fake = FakeServer::start().await;
    let (client, mut conn) = fake_pair(&fake).await;
    let room = "state:fake";
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.op(room, incr("a")).await }
    });
    let sent_a = conn.recv().await;
    let second = tokio::spawn({
        let client = client.clone();
        async move { client.op(room, incr("b")).await }
    });
    let sent_b = conn.recv().await;
    assert_eq!(sent_a["t"], "op");
    assert_eq!(sent_a["op"], json!({"type": "incr", "key": "a"}));
    assert_ne!(sent_a["id"], sent_b["id"], "op ids are unique");

    conn.close(4001).await;
    let mut conn = fake.accept().await;
    assert_eq!(conn.recv().await, sent_a, "re-sent first, unchanged");
    assert_eq!(conn.recv().await, sent_b, "then the second, unchanged");
    conn.send(json!({"t": "ack", "id": sent_a["id"], "seq": 7}))
        .await;
    conn.send(json!({"t": "nack", "id": sent_b["id"], "code": "conflict", "msg": "ver"}))
        .await;
    assert_eq!(first.await.expect("no panic"), Ok(7));
    let refused = second.await.expect("no panic");
    assert_eq!(refused.map_err(|e| e.code()), Err(Some(Code::Conflict)));
    assert!(matches!(
        client.status(),
        Status::Connected { connection: 2, .. }
    ));
}

#[tokio::test]
async fn a_resent_op_nacked_rate_limited_is_sent_again_instead_of_reported() {
    let fake = FakeServer::start().await;
    let (client, mut conn) = fake_pair(&fake).await;
    let pending = tokio::spawn({
        let client = client.clone();
        async move { client.op("state:fake", incr("a")).await }
    });
    let sent = conn.recv().await;
    conn.close(4001).await;
    let mut conn = fake.accept().await;
    assert_eq!(conn.recv().await, sent);
    // The original may have applied: this nack must not reach the caller.
    conn.send(json!({"t": "nack", "id": sent["id"], "code": "rate_limited", "msg": "slow"}))
        .await;
    assert_eq!(conn.recv().await, sent, "sent again with the same id");
    conn.send(json!({"t": "ack", "id": sent["id"], "seq": 9}))
        .await;
    assert_eq!(pending.await.expect("no panic"), Ok(9));

    // An op sent once is refused for real by `rate_limited`: nothing reached the room.
    let first_try = tokio::spawn({
        let client = client.clone();
        async move { client.op("state:fake", incr("b")).await }
    });
    let sent = conn.recv().await;
    conn.send(json!({"t": "nack", "id": sent["id"], "code": "rate_limited", "msg": "slow"}))
        .await;
    let refused = first_try.await.expect("no panic");
    assert_eq!(refused.map_err(|e| e.code()), Err(Some(Code::RateLimited)));
}

#[tokio::test]
async fn close_codes_4401_and_4400_end_the_client_without_a_retry() {
    for (code, expected) in [
        (
            4401u16,
            ClientError::Unauthorized {
                reason: "closed with 4401: scripted".into(),
            },
        ),
        (
            4400,
            ClientError::Closed {
                code: 4400,
                reason: "scripted".into(),
            },
        ),
    ] {
        let fake = FakeServer::start().await;
        let (client, mut conn) = fake_pair(&fake).await;
        let pending = tokio::spawn({
            let client = client.clone();
            async move { client.op("state:fake", incr("a")).await }
        });
        conn.recv().await;
        conn.close(code).await;
        let result = tokio::time::timeout(TIMEOUT, pending)
            .await
            .expect("the op is answered when the client ends")
            .expect("no panic");
        assert_eq!(result, Err(OpError::Client(expected.clone())));
        // Closed is final: the connection task has ended, so nothing reconnects.
        assert_eq!(client.status(), Status::Closed(expected));
    }
}
