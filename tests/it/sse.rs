//! Server-Sent Events (`GET /api/rooms/{room}/stream`), CORS for `--allowed-origins`, and
//! the Admin API's room list and presence (PROTOCOL.md 1.1).

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{jwt, Server, TIMEOUT};

/// One SSE event as read off the wire.
#[derive(Debug, Default, Clone)]
pub(crate) struct SseEvent {
    pub(crate) event: String,
    pub(crate) id: Option<String>,
    pub(crate) data: Value,
    /// A `: ping` comment (no event).
    ping: bool,
}

/// A raw SSE reader: one request on its own connection, the chunked body parsed as it
/// arrives.
pub(crate) struct Stream {
    tcp: tokio::net::TcpStream,
    pub(crate) status: u16,
    head: String,
    /// Body bytes received but not yet parsed into events.
    buf: Vec<u8>,
    /// The chunked decoder's leftover raw bytes.
    raw: Vec<u8>,
}

impl Stream {
    pub(crate) async fn open(server: &Server, path: &str, headers: &[(&str, &str)]) -> Stream {
        Self::open_with(server, path, headers, None).await
    }

    /// As `open`, with the socket's receive buffer set first (a reader that stalls).
    async fn open_with(
        server: &Server,
        path: &str,
        headers: &[(&str, &str)],
        recv_buffer: Option<u32>,
    ) -> Stream {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        if let Some(bytes) = recv_buffer {
            socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        }
        let mut tcp = socket.connect(server.addr).await.expect("connect");
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n",
            server.host()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        tcp.write_all(request.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        let head_end = loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(TIMEOUT, tcp.read(&mut chunk))
                .await
                .expect("response head in time")
                .expect("read");
            assert!(n > 0, "connection closed before the response head");
            raw.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status");
        Stream {
            tcp,
            status,
            head,
            buf: Vec::new(),
            raw: raw[head_end + 4..].to_vec(),
        }
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.split("\r\n").find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    /// Moves whole chunks from `raw` to `buf`; false once the terminating chunk came.
    fn dechunk(&mut self) -> bool {
        loop {
            let Some(end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return true;
            };
            let size = usize::from_str_radix(String::from_utf8_lossy(&self.raw[..end]).trim(), 16)
                .expect("a hex chunk size");
            if size == 0 {
                return false;
            }
            if self.raw.len() < end + 2 + size + 2 {
                return true;
            }
            self.buf
                .extend_from_slice(&self.raw[end + 2..end + 2 + size]);
            self.raw.drain(..end + 2 + size + 2);
        }
    }

    /// The next event or ping; None when the stream ended or nothing came in `timeout`.
    async fn next(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let open = self.dechunk();
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block = String::from_utf8_lossy(&self.buf[..end]).to_string();
                self.buf.drain(..end + 2);
                let mut event = SseEvent::default();
                for line in block.lines() {
                    if line == ": ping" {
                        event.ping = true;
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event.event = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        event.id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        event.data = serde_json::from_str(v).expect("data is one JSON line");
                    }
                }
                if block.starts_with("retry:") {
                    continue;
                }
                return Some(event);
            }
            if !open {
                return None;
            }
            let mut chunk = [0u8; 65536];
            let read = tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk)).await;
            match read {
                Ok(Ok(n)) if n > 0 => self.raw.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// The next event that is not a ping, failing the test if none comes.
    pub(crate) async fn event(&mut self) -> SseEvent {
        loop {
            let event = self.next(TIMEOUT).await.expect("an SSE event in time");
            if !event.ping {
                return event;
            }
        }
    }
}

async fn create_poll(server: &Server, room: &str) -> String {
    let created = server
        .post_as(
            "alice",
            "/api/rooms",
            &json!({"room": room, "kind": "poll", "init": {"question": "Lunch?", "options": ["pizza", "sushi"]}}),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    created.body["epoch"].as_str().expect("epoch").to_owned()
}

async fn vote(server: &Server, user: &str, room: &str, option: u64) -> u64 {
    let reply = server
        .post_as(
            user,
            &format!("/api/rooms/{room}/ops"),
            &json!({"id": format!("{user}-{option}"), "op": {"type": "vote", "option": option}}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    reply.body["seq"].as_u64().expect("seq")
}

#[tokio::test]
async fn stream_sends_snapshot_then_diffs_with_epoch_seq_ids() {
    let server = Server::start(&[]).await;
    let epoch = create_poll(&server, "poll:sse").await;
    let mut stream = Stream::open(&server, "/api/rooms/poll:sse/stream", &[]).await;
    assert_eq!(stream.status, 200, "{}", stream.head);
    assert_eq!(
        stream.header("content-type").as_deref(),
        Some("text/event-stream")
    );
    let snapshot = stream.event().await;
    assert_eq!(snapshot.event, "snapshot");
    assert_eq!(snapshot.id, Some(format!("{epoch}:1")));
    assert_eq!(snapshot.data["t"], "snapshot");
    assert_eq!(snapshot.data["seq"], 1);
    let seq = vote(&server, "bob", "poll:sse", 1).await;
    let diff = stream.event().await;
    assert_eq!(diff.event, "diff");
    assert_eq!(diff.id, Some(format!("{epoch}:{seq}")));
    assert_eq!(diff.data["from"], 2);
    assert_eq!(diff.data["to"], seq);
}

#[tokio::test]
async fn last_event_id_resumes_and_wins_over_since() {
    let server = Server::start(&[]).await;
    let epoch = create_poll(&server, "poll:resume").await;
    vote(&server, "bob", "poll:resume", 0).await;
    let head = vote(&server, "carol", "poll:resume", 1).await;
    let header = format!("{epoch}:2");
    let mut stream = Stream::open(
        &server,
        &format!("/api/rooms/poll:resume/stream?since={epoch}:1"),
        &[("Last-Event-ID", &header)],
    )
    .await;
    let resumed = stream.event().await;
    assert_eq!(resumed.event, "resumed", "{resumed:?}");
    assert_eq!(resumed.data["from"], 3, "Last-Event-ID wins: {resumed:?}");
    assert_eq!(resumed.id, Some(format!("{epoch}:{head}")));
    // `?since=` alone resumes too; a position of another epoch gets a snapshot.
    let mut by_query = Stream::open(
        &server,
        &format!("/api/rooms/poll:resume/stream?since={epoch}:1"),
        &[],
    )
    .await;
    assert_eq!(by_query.event().await.data["from"], 2);
    let mut stale = Stream::open(
        &server,
        "/api/rooms/poll:resume/stream",
        &[("Last-Event-ID", "00000000000000ff:2")],
    )
    .await;
    assert_eq!(stale.event().await.event, "snapshot");
}

#[tokio::test]
async fn missing_room_is_404_json() {
    let server = Server::start(&[]).await;
    let stream = Stream::open(&server, "/api/rooms/poll:none/stream", &[]).await;
    assert_eq!(stream.status, 404, "{}", stream.head);
    let response = server.get("/api/rooms/poll:none/stream").await;
    assert_eq!(response.code(), "not_found");
}

#[tokio::test]
async fn stream_is_not_a_member_and_pings_when_idle() {
    let server = Server::start(&["--heartbeat", "300ms"]).await;
    create_poll(&server, "poll:quiet").await;
    let mut watcher = server.client("watcher").await;
    watcher.sub_presence("poll:quiet").await;
    let members = watcher.recv_json().await;
    assert_eq!(members["members"], json!([{"user": "watcher", "conns": 1}]));
    let mut stream = Stream::open(
        &server,
        "/api/rooms/poll:quiet/stream?presence=1&user=streamer",
        &[],
    )
    .await;
    assert_eq!(stream.event().await.event, "snapshot");
    let presence = stream.event().await;
    assert_eq!(presence.event, "presence");
    assert_eq!(presence.id, None, "presence events carry no id");
    assert_eq!(
        presence.data["members"],
        json!([{"user": "watcher", "conns": 1}])
    );
    // Idle for a heartbeat: a ping comment, and nobody was told the stream joined.
    let ping = stream.next(Duration::from_secs(3)).await.expect("a ping");
    assert!(ping.ping, "{ping:?}");
    watcher.expect_silence(Duration::from_millis(200)).await;
    let listed = server.get("/api/rooms?prefix=poll:quiet").await;
    assert_eq!(listed.body["rooms"][0]["subscribers"], 1, "{}", listed.text);
    let presence = server.get("/api/rooms/poll:quiet/presence").await;
    assert_eq!(
        presence.body,
        json!({"room": "poll:quiet", "members": [{"user": "watcher", "conns": 1}]})
    );
}

#[tokio::test]
async fn a_stream_that_falls_behind_ends() {
    let server = Server::start(&["--outbound-queue", "65536", "--durability", "none"]).await;
    let mut writer = server.client("alice").await;
    writer.create_ok("state:big", "state", json!({})).await;
    // A reader that never reads: its socket buffers fill, then the queue overflows.
    let mut stream =
        Stream::open_with(&server, "/api/rooms/state:big/stream", &[], Some(4096)).await;
    let big = "x".repeat(30_000);
    // Batches of 20 pipelined 30 KB sets, each awaited (a loaded machine is slow), until
    // the stream is cut: the socket's pending error (SO_ERROR) reports the reset at once,
    // while reads would first return the data still buffered.
    let mut cut = false;
    for batch in 0..40 {
        for i in batch * 20..(batch + 1) * 20 {
            writer
                .send_op(
                    &format!("s{i}"),
                    "state:big",
                    json!({"type": "set", "key": format!("k{}", i % 50), "value": big}),
                )
                .await;
        }
        let last = writer.reply(&format!("s{}", batch * 20 + 19)).await;
        assert_eq!(last["t"], "ack", "{last}");
        if !matches!(stream.tcp.take_error(), Ok(None)) {
            cut = true;
            break;
        }
    }
    if !cut {
        // Read what is buffered: a cut stream then ends in a reset or EOF, a live one
        // just goes quiet.
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let mut chunk = vec![0u8; 65536];
        cut = loop {
            match tokio::time::timeout_at(deadline, stream.tcp.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(_)) => continue,
                Err(_) => break false,
            }
        };
    }
    assert!(
        cut,
        "a stream that never read was not cut after 800 large diffs"
    );
}

#[tokio::test]
async fn cors_answers_listed_origins_only() {
    let server = Server::start(&["--allowed-origins", "https://app.example"]).await;
    create_poll(&server, "poll:cors").await;
    let preflight = server
        .http(
            "OPTIONS",
            "/api/rooms/poll:cors/ops",
            &[
                ("Origin", "https://app.example"),
                ("Access-Control-Request-Method", "POST"),
                (
                    "Access-Control-Request-Headers",
                    "content-type, x-roomd-user",
                ),
            ],
            None,
        )
        .await;
    assert_eq!(preflight.status, 204, "{}", preflight.text);
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let methods = preflight
        .header("access-control-allow-methods")
        .unwrap_or_default();
    assert!(methods.contains("POST"), "{methods}");
    let allowed_headers = preflight
        .header("access-control-allow-headers")
        .unwrap_or_default();
    assert!(
        allowed_headers.contains("x-roomd-user"),
        "{allowed_headers}"
    );

    let get = server
        .http(
            "GET",
            "/api/rooms/poll:cors",
            &[("Origin", "https://app.example")],
            None,
        )
        .await;
    assert_eq!(get.status, 200);
    assert_eq!(
        get.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let stream = Stream::open(
        &server,
        "/api/rooms/poll:cors/stream",
        &[("Origin", "https://app.example")],
    )
    .await;
    assert_eq!(
        stream.header("access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );

    let evil = server
        .http(
            "OPTIONS",
            "/api/rooms/poll:cors/ops",
            &[
                ("Origin", "https://evil.example"),
                ("Access-Control-Request-Method", "POST"),
            ],
            None,
        )
        .await;
    assert_eq!(evil.status, 403);
    assert_eq!(evil.header("access-control-allow-origin"), None);
    let evil_get = server
        .http(
            "GET",
            "/api/rooms/poll:cors",
            &[("Origin", "https://evil.example")],
            None,
        )
        .await;
    assert_eq!(evil_get.header("access-control-allow-origin"), None);
}

#[tokio::test]
async fn admin_room_list_pages_in_id_order_with_subscribers() {
    let server = Server::start(&[]).await;
    for room in ["poll:a", "poll:b", "poll:c", "other:x"] {
        create_poll(&server, room).await;
    }
    // Two connections of one user count 2.
    let mut one = server.client("dana").await;
    let mut two = server.client("dana").await;
    one.sub("poll:b").await;
    two.sub("poll:b").await;
    let first = server.get("/api/rooms?prefix=poll:&limit=2").await;
    assert_eq!(first.status, 200, "{}", first.text);
    let rooms: Vec<&str> = first.body["rooms"]
        .as_array()
        .expect("rooms")
        .iter()
        .map(|r| r["room"].as_str().expect("room"))
        .collect();
    assert_eq!(rooms, ["poll:a", "poll:b"]);
    assert_eq!(first.body["next"], "poll:b");
    assert_eq!(first.body["rooms"][1]["subscribers"], 2);
    assert_eq!(first.body["rooms"][1]["kind"], "poll");
    assert_eq!(first.body["rooms"][1]["seq"], 1);
    assert_eq!(
        first.body["rooms"][1]["epoch"].as_str().map(str::len),
        Some(16)
    );
    let rest = server.get("/api/rooms?prefix=poll:&after=poll:b").await;
    assert_eq!(rest.body["rooms"].as_array().map(Vec::len), Some(1));
    assert_eq!(rest.body["rooms"][0]["room"], "poll:c");
    assert_eq!(rest.body["next"], Value::Null);
    let all = server.get("/api/rooms").await;
    assert_eq!(all.body["rooms"].as_array().map(Vec::len), Some(4));
    assert_eq!(all.body["rooms"][0]["room"], "other:x");
    assert_eq!(server.get("/api/rooms/poll:zz/presence").await.status, 404);
}

#[tokio::test]
async fn admin_api_takes_an_admin_token_when_auth_is_on() {
    let server = Server::start(&["--jwt-secret", "s3cret"]).await;
    let user = jwt("s3cret", json!({"sub": "eve"}));
    let admin = jwt("s3cret", json!({"sub": "root", "admin": true}));
    let as_user = format!("Bearer {user}");
    let as_admin = format!("Bearer {admin}");
    let refused = server
        .http("GET", "/api/rooms", &[("Authorization", &as_user)], None)
        .await;
    assert_eq!(refused.status, 403, "{}", refused.text);
    assert_eq!(server.get("/api/rooms").await.status, 401);
    let listed = server
        .http("GET", "/api/rooms", &[("Authorization", &as_admin)], None)
        .await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    assert_eq!(listed.body["rooms"], json!([]));
    let presence = server
        .http(
            "GET",
            "/api/rooms/poll:x/presence",
            &[("Authorization", &as_user)],
            None,
        )
        .await;
    assert_eq!(presence.status, 403);
}
