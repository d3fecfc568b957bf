//! The HTTP findings of the outside bad-input battery (issue 10), each sent exactly as
//! found: bodies that never end, more connections than one address may hold, reads
//! beyond the read rate and the read turns, cross-site writes and DNS rebinding with
//! auth off, and the smaller ones (`limit=0`, `after=u64::MAX`, error bodies that were
//! not `{"code","msg"}`).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{HttpResponse, Server, NACK_CODES, TIMEOUT};

/// How long a test waits for something the server does on its own schedule (a body
/// deadline, a reply timeout) on a loaded two-core machine.
const SLOW: Duration = Duration::from_secs(30);

/// Sends `request` verbatim on a fresh connection and reads one response: up to its
/// `Content-Length`, or until the server closes.
async fn raw_http(server: &Server, request: &str) -> HttpResponse {
    raw_http_from(server, None, request).await
}

/// A TCP connection to the server from the loopback address `source`.
async fn connect_from(server: &Server, source: Ipv4Addr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
    socket
        .bind(SocketAddr::from((source, 0)))
        .expect("any 127.x.y.z address can be bound");
    socket.connect(server.addr).await.expect("TCP connect")
}

/// [`raw_http`], sent from the loopback address `source` when given.
async fn raw_http_from(server: &Server, source: Option<Ipv4Addr>, request: &str) -> HttpResponse {
    let exchange = async {
        let mut stream = match source {
            Some(source) => connect_from(server, source).await,
            None => TcpStream::connect(server.addr).await.expect("HTTP connect"),
        };
        stream
            .write_all(request.as_bytes())
            .await
            .expect("HTTP write");
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if response_complete(&raw) {
                break;
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
        raw
    };
    let raw = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("no HTTP response within {TIMEOUT:?} to {request:?}"));
    HttpResponse::parse(&raw)
}

/// Whether `raw` holds a response head and the whole body its `Content-Length` names.
fn response_complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    head.lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|len| len.trim().parse::<usize>().ok())
        .is_some_and(|len| raw.len() >= end + 4 + len)
}

/// Asserts the contract's error body: exactly `{"code","msg"}` with a contract code.
fn assert_error_body(response: &HttpResponse, status: u16, code: &str) {
    assert_eq!(response.status, status, "{}", response.text);
    assert_eq!(response.code(), code, "{}", response.text);
    assert!(NACK_CODES.contains(&code));
    assert!(response.body["msg"].is_string(), "{}", response.text);
    assert_eq!(
        response.body.as_object().map(|o| o.len()),
        Some(2),
        "{}",
        response.text
    );
    assert!(
        response
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{:?}",
        response.headers
    );
}

async fn create_chat(server: &Server, room: &str) {
    let created = server
        .post_as(
            "alice",
            "/api/rooms",
            &json!({"room": room, "kind": "chat", "init": {}}),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
}

async fn head_of(server: &Server, room: &str) -> u64 {
    let page = server
        .get(&format!("/api/rooms/{room}/events?limit=0"))
        .await;
    assert_eq!(page.status, 200, "{}", page.text);
    page.body["head"].as_u64().expect("head is a number")
}

/// A POST whose head promises 1,000 bytes and whose body never comes: the battery's
/// stalled request.
fn stalled_post(server: &Server) -> String {
    format!(
        "POST /api/rooms HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: 1000\r\n\r\n{{\"room\":",
        server.host()
    )
}

/// Reads what the server sends on `stream` until it closes (or resets) the connection.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut raw = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read)
        .await
        .unwrap_or_else(|_| panic!("the server kept the connection open beyond {within:?}"));
    raw
}

/// The address the stalled connections come from: loopback, but not the 127.0.0.1 of the
/// harness's own requests, whose slots the server gives back a moment after the client
/// has its answer (on a loaded machine, sometimes after the next connection arrives).
const PROBER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// A `Connection: close` request as `alice` for `path`, with `body` as JSON if any.
fn request(server: &Server, method: &str, path: &str, body: Option<&Value>) -> String {
    let body = body.map(Value::to_string).unwrap_or_default();
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
         X-Roomd-User: alice\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        server.host(),
        body.len()
    )
}

#[tokio::test]
async fn stalled_bodies_time_out_and_connections_over_the_per_ip_cap_are_refused() {
    const CAP: usize = 4;
    const EXTRA: usize = 3;
    let server = Server::start(&["--max-http-conns-per-ip", "4", "--body-timeout", "3s"]).await;
    assert_eq!(server.get("/healthz").await.status, 200);

    // More stalled POSTs from one address than it may hold.
    let mut stalled = Vec::new();
    for _ in 0..CAP + EXTRA {
        let mut stream = connect_from(&server, PROBER).await;
        stream
            .write_all(stalled_post(&server).as_bytes())
            .await
            .expect("the head is sent");
        stalled.push(stream);
    }
    // The extra ones are refused at once (429, closed), the others wait for their body
    // deadline (408, closed).
    let (answered, mut answers) = tokio::sync::mpsc::unbounded_channel();
    for mut stream in stalled {
        let answered = answered.clone();
        tokio::spawn(async move {
            let raw = read_until_closed(&mut stream, SLOW).await;
            let _ = answered.send(HttpResponse::parse(&raw));
        });
    }
    let mut statuses = Vec::new();
    for n in 0..CAP + EXTRA {
        let response = tokio::time::timeout(SLOW, answers.recv())
            .await
            .expect("every stalled connection is answered")
            .expect("a reader task answers");
        match response.status {
            429 => assert_error_body(&response, 429, "rate_limited"),
            // The ones that held a slot: their body never came, so they time out.
            408 => assert_error_body(&response, 408, "invalid"),
            other => panic!("unexpected {other}: {}", response.text),
        }
        statuses.push(response.status);
        if n + 1 == EXTRA {
            // /healthz answers meanwhile, on a connection from the same address that is
            // itself over the cap (sent only now: actix's workers take connections in no
            // set order, so one sent earlier could take a slot before a stalled POST).
            let health = request(&server, "GET", "/healthz", None);
            let health = raw_http_from(&server, Some(PROBER), &health).await;
            assert_eq!(health.status, 200, "{}", health.text);
            assert_eq!(server.get("/healthz").await.status, 200);
        }
    }
    statuses.sort_unstable();
    let mut expected = vec![408; CAP];
    expected.extend([429; EXTRA]);
    assert_eq!(statuses, expected);

    // The server stayed healthy and the address got its slots back.
    assert_eq!(server.get("/healthz").await.status, 200);
    let create = json!({"room": "chat:after-stall", "kind": "chat", "init": {}});
    let create = request(&server, "POST", "/api/rooms", Some(&create));
    let deadline = Instant::now() + SLOW;
    loop {
        let created = raw_http_from(&server, Some(PROBER), &create).await;
        if created.status == 201 {
            break;
        }
        assert_error_body(&created, 429, "rate_limited");
        assert!(Instant::now() < deadline, "the slots never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A connection that surely holds one of the address's slots: it got a keep-alive answer
/// (one over the cap is closed after its answer), then sent a body that never comes.
async fn hold_a_slot(server: &Server) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).await.expect("TCP connect");
    let health = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", server.host());
    stream
        .write_all(health.as_bytes())
        .await
        .expect("the request is sent");
    let mut raw = Vec::new();
    let mut buf = [0u8; 1024];
    while !response_complete(&raw) {
        let n = tokio::time::timeout(TIMEOUT, stream.read(&mut buf))
            .await
            .expect("/healthz answers")
            .expect("the answer is read");
        assert!(n > 0, "closed before answering");
        raw.extend_from_slice(&buf[..n]);
    }
    let response = HttpResponse::parse(&raw);
    assert_eq!(response.status, 200, "{}", response.text);
    assert_ne!(
        response.header("connection"),
        Some("close"),
        "not over the cap"
    );
    stream
        .write_all(stalled_post(server).as_bytes())
        .await
        .expect("the head is sent");
    stream
}

#[tokio::test]
async fn a_trusted_proxy_is_not_held_to_the_per_ip_connection_cap() {
    let server = Server::start(&[
        "--max-http-conns-per-ip",
        "1",
        "--trusted-proxies",
        "127.0.0.1",
        "--body-timeout",
        "120s",
    ])
    .await;
    let _held = hold_a_slot(&server).await;
    // A second connection from the proxy's address is served, not refused.
    create_chat(&server, "chat:behind-proxy").await;
}

#[tokio::test]
async fn idle_connections_over_the_per_ip_cap_are_cut_quickly() {
    // A head deadline far beyond the wait below: only the cap's own grace can end them.
    let server = Server::start(&[
        "--max-http-conns-per-ip",
        "2",
        "--header-timeout",
        "120s",
        "--body-timeout",
        "120s",
    ])
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(hold_a_slot(&server).await);
    }
    // Connections that only connect, over the cap: the server closes them on its own.
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(TcpStream::connect(server.addr).await.expect("TCP connect"));
    }
    for mut stream in idle {
        let sent = read_until_closed(&mut stream, SLOW).await;
        assert!(sent.is_empty(), "{:?}", String::from_utf8_lossy(&sent));
    }
    assert_eq!(server.get("/healthz").await.status, 200);
    drop(held);
}

#[tokio::test]
async fn a_websocket_does_not_count_against_the_http_connection_cap() {
    let server = Server::start(&["--max-http-conns-per-ip", "2"]).await;
    let _first = server.client("alice").await;
    let _second = server.client("bob").await;
    let _third = server.client("carol").await;
    create_chat(&server, "chat:ws-cap").await;
    assert_eq!(head_of(&server, "chat:ws-cap").await, 1);
}

#[tokio::test]
async fn reads_over_the_per_ip_rate_get_429_rate_limited() {
    let server = Server::start(&["--read-rate", "1"]).await;
    create_chat(&server, "chat:reads").await;
    // A burst of two, then one per second: twenty reads in a row cannot all pass.
    let mut refused = 0;
    for i in 0..20 {
        let path = if i % 2 == 0 {
            "/api/rooms/chat:reads".to_owned()
        } else {
            "/api/rooms/chat:reads/events".to_owned()
        };
        let response = server.get(&path).await;
        if response.status == 429 {
            assert_error_body(&response, 429, "rate_limited");
            refused += 1;
        } else {
            assert_eq!(response.status, 200, "{}", response.text);
        }
    }
    assert!(refused >= 10, "only {refused} of 20 reads were refused");
    // Health checks and writes are not reads.
    assert_eq!(server.get("/healthz").await.status, 200);
    let posted = server
        .post_as(
            "alice",
            "/api/rooms/chat:reads/ops",
            &json!({"id": "p1", "op": {"type": "post", "text": "hi"}}),
        )
        .await;
    assert_eq!(posted.status, 200, "{}", posted.text);
}

#[tokio::test]
async fn a_read_not_taken_holds_its_turn_until_the_reply_timeout_cuts_it() {
    let server = Server::start(&[
        "--max-reads-in-flight",
        "1",
        "--reply-timeout",
        "3s",
        "--op-rate",
        "100000",
        "--op-burst",
        "100000",
        // 768 commits, each waiting for a sync on a disk other builds share, would make
        // the filling the slow part; what is kept on disk is not what this test checks.
        "--durability",
        "none",
    ])
    .await;
    // A room far larger than the loopback socket buffers: 768 values of 30,000 bytes.
    let big = server
        .post_as(
            "alice",
            "/api/rooms",
            &json!({"room": "state:big", "kind": "state", "init": {}}),
        )
        .await;
    assert_eq!(big.status, 201, "{}", big.text);
    create_chat(&server, "chat:small").await;
    let value = "x".repeat(30_000);
    for i in 0..768 {
        // A write that lands on the room's snapshot waits for it (seconds for a room this
        // size in a debug build on a loaded machine): more than the harness's timeout.
        let op = json!({"id": format!("s{i}"), "op": {"type": "set", "key": format!("k{i:04}"), "value": value}});
        let set = request(&server, "POST", "/api/rooms/state:big/ops", Some(&op));
        let mut stream = TcpStream::connect(server.addr).await.expect("TCP connect");
        stream
            .write_all(set.as_bytes())
            .await
            .expect("request sent");
        let set = HttpResponse::parse(&read_until_closed(&mut stream, SLOW).await);
        assert_eq!(set.status, 200, "{}", set.text);
    }

    // A client asks for the big room and reads only the first bytes.
    let mut reader = TcpStream::connect(server.addr).await.expect("TCP connect");
    let request = format!(
        "GET /api/rooms/state:big HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.host()
    );
    reader
        .write_all(request.as_bytes())
        .await
        .expect("request sent");
    let mut first = [0u8; 12];
    tokio::time::timeout(SLOW, reader.read_exact(&mut first))
        .await
        .expect("the reply starts")
        .expect("the status line arrives");
    assert_eq!(&first, b"HTTP/1.1 200");

    // The only turn is held, so this read waits until the stalled reply is cut (3 s,
    // and more on a loaded machine: longer than the harness's request timeout).
    let mut small = TcpStream::connect(server.addr).await.expect("TCP connect");
    let request = format!(
        "GET /api/rooms/chat:small HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.host()
    );
    small
        .write_all(request.as_bytes())
        .await
        .expect("request sent");
    let small = HttpResponse::parse(&read_until_closed(&mut small, SLOW).await);
    assert_eq!(small.status, 200, "{}", small.text);

    // By then the reader was disconnected with its reply unfinished.
    let rest = read_until_closed(&mut reader, SLOW).await;
    assert!(
        rest.len() < 768 * 30_000,
        "the whole reply ({} bytes) arrived: nothing cut the client that did not read",
        rest.len()
    );
    assert_eq!(server.get("/healthz").await.status, 200);
}

#[tokio::test]
async fn a_large_room_reads_whole_and_in_key_order() {
    let server = Server::start(&["--op-rate", "100000", "--op-burst", "100000"]).await;
    let created = server
        .post_as(
            "alice",
            "/api/rooms",
            &json!({"room": "state:stream", "kind": "state", "init": {}}),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let value = "y".repeat(20_000);
    for i in 0..40 {
        let set = server
            .post_as(
                "alice",
                "/api/rooms/state:stream/ops",
                &json!({"id": format!("s{i}"), "op": {"type": "set", "key": format!("k{i:02}"), "value": value}}),
            )
            .await;
        assert_eq!(set.status, 200, "{}", set.text);
    }
    for path in ["/api/rooms/state:stream", "/api/rooms/state:stream?at=41"] {
        let state = server.get(path).await;
        assert_eq!(state.status, 200, "{}", state.text);
        assert_eq!(state.body["seq"], 41);
        assert_eq!(state.body["kind"], "state");
        let entries = state.body["entries"].as_array().expect("entries");
        assert_eq!(entries.len(), 40);
        for (i, entry) in entries.iter().enumerate() {
            assert_eq!(entry["k"], format!("k{i:02}"));
            assert_eq!(entry["v"], Value::String(value.clone()));
            assert_eq!(entry["ver"], i as u64 + 2);
        }
    }
}

#[tokio::test]
async fn cross_site_writes_are_refused_with_auth_off() {
    let server = Server::start(&[]).await;
    create_chat(&server, "chat:xsite").await;
    let host = server.host();

    // The battery's cross-site form post: text/plain, no preflight.
    let body = r#"{"id":"x1","op":{"type":"post","text":"from evil"}}"#;
    let text_plain = raw_http(
        &server,
        &format!(
            "POST /api/rooms/chat:xsite/ops HTTP/1.1\r\nHost: {host}\r\nOrigin: http://evil.example\r\n\
             Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert_eq!(text_plain.status, 403, "{}", text_plain.text);
    assert_error_body(&text_plain, 403, "forbidden");
    // The same without Origin (a non-browser client) still needs JSON.
    let no_origin = raw_http(
        &server,
        &format!(
            "POST /api/rooms/chat:xsite/ops HTTP/1.1\r\nHost: {host}\r\n\
             Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert_error_body(&no_origin, 415, "invalid");
    // A JSON post from another origin.
    let evil_json = server
        .http(
            "POST",
            "/api/rooms/chat:xsite/ops",
            &[("Origin", "http://evil.example")],
            Some(&json!({"id": "x2", "op": {"type": "post", "text": "from evil"}})),
        )
        .await;
    assert_error_body(&evil_json, 403, "forbidden");
    let evil_delete = server
        .http(
            "DELETE",
            "/api/rooms/chat:xsite",
            &[("Origin", "http://evil.example")],
            None,
        )
        .await;
    assert_error_body(&evil_delete, 403, "forbidden");
    assert_eq!(
        head_of(&server, "chat:xsite").await,
        1,
        "nothing was written"
    );

    // Same-origin pages and non-browser clients write as before.
    let same_origin = server
        .http(
            "POST",
            "/api/rooms/chat:xsite/ops",
            &[("Origin", &format!("http://{host}"))],
            Some(&json!({"id": "ok1", "op": {"type": "post", "text": "hi"}})),
        )
        .await;
    assert_eq!(same_origin.status, 200, "{}", same_origin.text);
    assert_eq!(head_of(&server, "chat:xsite").await, 2);
}

#[tokio::test]
async fn dns_rebinding_is_refused_on_a_loopback_bind() {
    let server = Server::start(&[]).await;
    create_chat(&server, "chat:rebind").await;
    let port = server.addr.port();

    // The battery's rebinding: Origin and Host agree, and both name the attacker.
    let delete = raw_http(
        &server,
        "DELETE /api/rooms/chat:rebind HTTP/1.1\r\nHost: evil.example\r\n\
         Origin: http://evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_error_body(&delete, 403, "forbidden");
    let upgrade = raw_http(
        &server,
        "GET /ws HTTP/1.1\r\nHost: evil.example\r\nOrigin: http://evil.example\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert_error_body(&upgrade, 403, "forbidden");
    let read = raw_http(
        &server,
        "GET /api/rooms/chat:rebind HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_error_body(&read, 403, "forbidden");
    assert_eq!(
        head_of(&server, "chat:rebind").await,
        1,
        "the room is still there"
    );

    // Loopback names, with or without a port, are served.
    for host in [
        format!("localhost:{port}"),
        "localhost".to_owned(),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ] {
        let read = raw_http(
            &server,
            &format!(
                "GET /api/rooms/chat:rebind HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(read.status, 200, "Host {host}: {}", read.text);
    }
}

#[tokio::test]
async fn allowed_hosts_serve_a_named_host_on_a_loopback_bind() {
    let server = Server::start(&["--allowed-hosts", "app.example"]).await;
    create_chat(&server, "chat:named").await;
    let read = raw_http(
        &server,
        "GET /api/rooms/chat:named HTTP/1.1\r\nHost: app.example:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(read.status, 200, "{}", read.text);
    let other = raw_http(
        &server,
        "GET /api/rooms/chat:named HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_error_body(&other, 403, "forbidden");
}

#[tokio::test]
async fn events_limit_0_is_an_empty_page_and_after_beyond_the_head_is_not_gone() {
    let server = Server::start(&[]).await;
    create_chat(&server, "chat:pages").await;
    let zero = server.get("/api/rooms/chat:pages/events?limit=0").await;
    assert_eq!(zero.status, 200, "{}", zero.text);
    assert_eq!(zero.body, json!({"head": 1, "events": []}));
    let max = server
        .get("/api/rooms/chat:pages/events?after=18446744073709551615")
        .await;
    assert_eq!(max.status, 200, "{}", max.text);
    assert_eq!(max.body, json!({"head": 1, "events": []}));
    let beyond_u64 = server
        .get("/api/rooms/chat:pages/events?after=18446744073709551616")
        .await;
    assert_error_body(&beyond_u64, 400, "invalid");
}

#[tokio::test]
async fn every_error_body_is_code_and_msg() {
    let server = Server::start(&[]).await;
    let host = server.host();
    assert_error_body(&server.get("/no/such/path").await, 404, "not_found");
    assert_error_body(
        &server.http("POST", "/healthz", &[], Some(&json!({}))).await,
        404,
        "not_found",
    );
    // A body over --max-frame (65,536 bytes).
    let big = json!({"room": "chat:big", "kind": "chat", "init": {"x": "z".repeat(70_000)}});
    assert_error_body(&server.post("/api/rooms", &big).await, 413, "too_large");
    // Malformed JSON.
    let broken = raw_http(
        &server,
        &format!(
            "POST /api/rooms HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Content-Length: 1\r\nConnection: close\r\n\r\n{{"
        ),
    )
    .await;
    assert_error_body(&broken, 400, "invalid");
    // A WebSocket handshake actix refuses (no Sec-WebSocket-Key).
    let bad_upgrade = raw_http(
        &server,
        &format!(
            "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        ),
    )
    .await;
    assert_error_body(&bad_upgrade, 400, "invalid");
}
