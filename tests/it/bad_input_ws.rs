//! Bad input on the WebSocket, sent exactly as an outside probe sends it, and the clean
//! close that must answer it (PROTOCOL.md 1.1, "Close and disconnect"): the close code
//! reaches a client that is still sending, never a TCP reset in its place, and a client
//! that never answers the close is let go after about 2 s.
//!
//! The raw client here writes frames by hand, many in one write, over a split TCP stream
//! so it can keep writing while it reads, and tells a clean end (FIN) from a reset.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::support::{masked_frame, parse_frame, RawFrame, Server, TIMEOUT};

const TEXT: u8 = 0x1;
const CLOSE: u8 = 0x8;
const PONG: u8 = 0xA;

/// What reading the server produced next.
#[derive(Debug)]
enum Next {
    Frame(RawFrame),
    /// The server closed the connection cleanly (FIN).
    Eof,
    /// The connection failed (a reset): whatever the server sent last may be lost.
    // The error text is read only through `Debug`, in failure messages.
    Reset(#[allow(dead_code)] String),
    Timeout,
}

/// A hand-made WebSocket client over a split TCP stream.
struct Raw {
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
    buf: Vec<u8>,
}

impl Raw {
    /// Writes the upgrade request and `pipelined` in one write, without waiting for the
    /// answer, then reads the 101 head.
    async fn connect_pipelined(server: &Server, query: &str, pipelined: &[u8]) -> Raw {
        let stream = TcpStream::connect(server.addr).await.expect("TCP connect");
        // Each write goes out as it is made, as a client pipelining in real time would.
        stream.set_nodelay(true).expect("TCP_NODELAY can be set");
        let (read, mut write) = stream.into_split();
        let mut bytes = format!(
            "GET /ws?{query} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n",
            server.host()
        )
        .into_bytes();
        bytes.extend_from_slice(pipelined);
        write.write_all(&bytes).await.expect("handshake write");
        let mut raw = Raw {
            read,
            write,
            buf: Vec::new(),
        };
        let deadline = Instant::now() + TIMEOUT;
        let head_end = loop {
            if let Some(pos) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos;
            }
            let mut chunk = [0u8; 16384];
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, raw.read.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => raw.buf.extend_from_slice(&chunk[..n]),
                other => panic!("no 101 head: {other:?}"),
            }
        };
        let head = String::from_utf8_lossy(&raw.buf[..head_end]).to_string();
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "expected 101, got {head:?}"
        );
        raw.buf.drain(..head_end + 4);
        raw
    }

    async fn connect(server: &Server, query: &str) -> Raw {
        let mut raw = Raw::connect_pipelined(server, query, &[]).await;
        match raw.next(TIMEOUT).await {
            Next::Frame(frame) if frame.opcode == TEXT => {}
            other => panic!("expected the welcome frame, got {other:?}"),
        }
        raw
    }

    /// Writes `bytes` at once; false once the server no longer takes them.
    async fn write(&mut self, bytes: &[u8]) -> bool {
        matches!(
            tokio::time::timeout(TIMEOUT, self.write.write_all(bytes)).await,
            Ok(Ok(()))
        )
    }

    async fn next(&mut self, timeout: Duration) -> Next {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Next::Frame(frame);
            }
            let mut chunk = [0u8; 16384];
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.read.read(&mut chunk)).await {
                Err(_) => return Next::Timeout,
                Ok(Ok(0)) => return Next::Eof,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Next::Reset(e.to_string()),
            }
        }
    }

    /// Reads until the close frame and returns its code; fails on a reset, an end
    /// without a close frame, or silence.
    async fn close_code(&mut self) -> u16 {
        loop {
            match self.next(TIMEOUT).await {
                Next::Frame(frame) if frame.opcode == CLOSE => {
                    return frame.close_code().expect("a close frame with a code")
                }
                Next::Frame(_) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Reads until the connection ends, discarding frames; fails on silence beyond
    /// `timeout`.
    async fn end(&mut self, timeout: Duration) -> Next {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Next::Frame(_) => continue,
                Next::Timeout => panic!("the connection was not ended within {timeout:?}"),
                end => return end,
            }
        }
    }
}

/// `n` text frames of about 2 KB that the server cannot parse, in one buffer: 40 of them
/// are more than the server reads at once, so most are still in its socket buffer when
/// it decides to close.
fn bad_frames(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            masked_frame(
                true,
                TEXT,
                format!("not json {i} {}", "x".repeat(2000)).as_bytes(),
            )
        })
        .collect()
}

fn close_frame(code: u16) -> Vec<u8> {
    masked_frame(true, CLOSE, &code.to_be_bytes())
}

#[tokio::test]
async fn forty_pipelined_bad_frames_read_close_4400_twenty_times_in_a_row() {
    let server = Server::start(&[]).await;
    for round in 0..20 {
        let mut raw = Raw::connect(&server, &format!("user=prober{round}")).await;
        assert!(raw.write(&bad_frames(40)).await);
        let mut errors = 0;
        let code = loop {
            match raw.next(TIMEOUT).await {
                Next::Frame(frame) if frame.opcode == CLOSE => break frame.close_code(),
                Next::Frame(frame) => {
                    let reply: Value = serde_json::from_slice(&frame.payload).expect("JSON");
                    assert_eq!(reply["code"], "bad_frame", "{reply}");
                    errors += 1;
                }
                other => panic!("round {round}: {errors} errors, then {other:?}"),
            }
        };
        assert_eq!(code, Some(4400), "round {round}");
        // Error frames still queued when the close is decided may be discarded with it.
        assert!(
            errors <= 9,
            "the 10th bad frame closes, {errors} errors came first"
        );
        // The client answers the close; the server then ends the connection cleanly.
        assert!(raw.write(&close_frame(4400)).await);
        match raw.end(TIMEOUT).await {
            Next::Eof => {}
            other => panic!("round {round}: expected a clean end, got {other:?}"),
        }
    }
    assert_eq!(server.get("/healthz").await.status, 200);
}

#[tokio::test]
async fn pipelined_oversize_frame_with_frames_behind_it_reads_1009() {
    let server = Server::start(&[]).await;
    let mut raw = Raw::connect(&server, "user=prober").await;
    // A frame of 70,000 bytes (the limit is 65,536), whole, then 20 more frames.
    let mut bytes = masked_frame(true, TEXT, &vec![b' '; 70_000]);
    bytes.extend(bad_frames(20));
    assert!(raw.write(&bytes).await);
    assert_eq!(raw.close_code().await, 1009);
    assert!(raw.write(&close_frame(1009)).await);
    assert!(matches!(raw.end(TIMEOUT).await, Next::Eof));
}

#[tokio::test]
async fn pipelined_invalid_utf8_reads_1007() {
    let server = Server::start(&[]).await;
    let mut raw = Raw::connect(&server, "user=prober").await;
    let mut bytes = masked_frame(true, TEXT, b"{\"t\":\"sub\",\"room\":\"\xff\xfe\"}");
    bytes.extend(bad_frames(20));
    assert!(raw.write(&bytes).await);
    assert_eq!(raw.close_code().await, 1007);
}

#[tokio::test]
async fn pipelining_client_over_the_connection_cap_reads_4429() {
    let server = Server::start(&["--max-conns-per-ip", "1"]).await;
    let _first = Raw::connect(&server, "user=first").await;
    // The handshake and 40 frames in one write, before the server has answered.
    let mut raw = Raw::connect_pipelined(&server, "user=second", &bad_frames(40)).await;
    assert_eq!(raw.close_code().await, 4429);
}

#[tokio::test]
async fn pipelining_client_with_a_refused_token_reads_4401() {
    let secret = "pipelined-secret";
    let server = Server::start(&["--jwt-secret", secret]).await;
    let forged = crate::support::jwt("another-secret", json!({"sub": "mallory"}));
    // The handshake and 40 frames in one write: the token is refused on the socket.
    let mut raw =
        Raw::connect_pipelined(&server, &format!("token={forged}"), &bad_frames(40)).await;
    assert_eq!(raw.close_code().await, 4401);
    assert!(raw.write(&close_frame(4401)).await);
    assert!(matches!(raw.end(TIMEOUT).await, Next::Eof));
}

#[tokio::test]
async fn sigterm_4002_reaches_a_client_that_keeps_sending() {
    let mut server = Server::start(&[]).await;
    let raw = Raw::connect(&server, "user=chatty").await;
    let Raw {
        mut read,
        mut write,
        buf,
    } = raw;
    // Unsolicited pongs are legal and answered by nothing: the client sends them
    // nonstop until the server stops taking them.
    let writer = tokio::spawn(async move {
        let pongs: Vec<u8> = (0..50)
            .flat_map(|_| masked_frame(true, PONG, b""))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if write.write_all(&pongs).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    let mut raw_read = RawReader {
        read: &mut read,
        buf,
    };
    // Wait until the writer is in full flow before the signal.
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.terminate();
    let code = raw_read.close_code().await;
    assert_eq!(code, 4002);
    let status = server.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{status}");
    writer.abort();
}

/// A client that keeps writing `frame(i)` every 5 ms (at most 2,000 times) until told
/// (through the returned sender) that its reader has the server's close frame; it then
/// writes 20 more at once, as a client does whose frames were already on their way, and
/// its own close. The task answers whether the server took every write: during its
/// close drain (PROTOCOL.md 1.1: until the client's close or 2 s) it must keep reading.
fn keep_sending(
    mut write: OwnedWriteHalf,
    frame: impl Fn(usize) -> Vec<u8> + Send + 'static,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<bool>,
) {
    let (seen_close, mut closed) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(async move {
        for i in 0..2000 {
            if write.write_all(&frame(i)).await.is_err() {
                return false;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                _ = closed.wait_for(|seen| *seen) => break,
            }
        }
        let mut last: Vec<u8> = (2000..2020).flat_map(&frame).collect();
        last.extend(close_frame(1000));
        write.write_all(&last).await.is_ok()
    });
    (seen_close, writer)
}

/// The reading half of a [`Raw`] client whose writing half is busy elsewhere.
struct RawReader<'a> {
    read: &'a mut OwnedReadHalf,
    buf: Vec<u8>,
}

impl RawReader<'_> {
    /// Reads until the connection ends, discarding frames; fails on silence beyond
    /// `timeout`.
    async fn end(&mut self, timeout: Duration) -> Next {
        let deadline = Instant::now() + timeout;
        loop {
            let mut chunk = [0u8; 16384];
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.read.read(&mut chunk)).await {
                Err(_) => panic!("the connection was not ended within {timeout:?}"),
                Ok(Ok(0)) => return Next::Eof,
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return Next::Reset(e.to_string()),
            }
        }
    }

    async fn close_code(&mut self) -> u16 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                if frame.opcode == CLOSE {
                    return frame.close_code().expect("a close frame with a code");
                }
                continue;
            }
            let mut chunk = [0u8; 16384];
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.read.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn client_that_never_answers_the_close_is_let_go_after_about_two_seconds() {
    let server = Server::start(&[]).await;
    let mut raw = Raw::connect(&server, "user=mute").await;
    assert!(raw.write(&bad_frames(10)).await);
    assert_eq!(raw.close_code().await, 4400);
    let closed_at = Instant::now();
    // The server keeps reading for the client's close: these frames are taken and
    // discarded, and the connection still ends cleanly.
    assert!(raw.write(&bad_frames(20)).await);
    let end = raw.end(Duration::from_secs(10)).await;
    let waited = closed_at.elapsed();
    assert!(
        matches!(end, Next::Eof),
        "expected a clean end, got {end:?}"
    );
    assert!(
        waited >= Duration::from_millis(1500),
        "the server waited only {waited:?} for the client's close"
    );
    assert!(
        waited <= Duration::from_secs(6),
        "the server held the connection {waited:?}"
    );
}

#[tokio::test]
async fn client_close_after_pipelined_frames_ends_the_connection_without_waiting() {
    let server = Server::start(&[]).await;
    let mut raw = Raw::connect(&server, "user=polite").await;
    // Ten bad frames, more frames, and the client's own close, all in one write: the
    // server closes with 4400 and, having read the client's close, ends at once.
    let mut bytes = bad_frames(30);
    bytes.extend(close_frame(1000));
    let sent_at = Instant::now();
    assert!(raw.write(&bytes).await);
    assert_eq!(raw.close_code().await, 4400);
    assert!(matches!(raw.end(TIMEOUT).await, Next::Eof));
    let waited = sent_at.elapsed();
    assert!(
        waited < Duration::from_millis(1500),
        "the server waited {waited:?} though the client's close had arrived"
    );
    // The session really ended: the server still serves.
    let mut alice = server.client("alice").await;
    alice.create_ok("chat:after", "chat", json!({})).await;
}

#[tokio::test]
async fn client_still_sending_after_the_close_reads_4400_and_a_clean_end() {
    let server = Server::start(&[]).await;
    let raw = Raw::connect(&server, "user=chatty").await;
    let Raw {
        mut read,
        write,
        buf,
    } = raw;
    // Bad frames, each its own write, 5 ms apart: the server decides to close after the
    // 10th while the rest are still arriving.
    let (seen_close, writer) = keep_sending(write, |i| {
        masked_frame(true, TEXT, format!("not json {i}").as_bytes())
    });
    let mut reader = RawReader {
        read: &mut read,
        buf,
    };
    assert_eq!(reader.close_code().await, 4400);
    seen_close.send_replace(true);
    let end = reader.end(Duration::from_secs(10)).await;
    assert!(
        matches!(end, Next::Eof),
        "expected a clean end, got {end:?}"
    );
    assert!(
        writer.await.expect("the writer task ends"),
        "the server stopped taking the client's frames before the client's close"
    );
}

// Op ids, duplicate keys, identities and oversized headers: each probe sends exactly
// the bad input an outside battery sent, and gets a clear, bounded answer.

#[tokio::test]
async fn op_id_over_256_bytes_is_nacked_invalid_on_json_and_refused_400_over_http() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("state:ids", "state", json!({})).await;

    let long = "i".repeat(60_000);
    let nack = alice
        .op(&long, "state:ids", json!({"type": "incr", "key": "n"}))
        .await;
    assert_eq!(nack["t"], "nack", "{} {}", nack["t"], nack["seq"]);
    assert_eq!(nack["code"], "invalid");
    assert_eq!(nack["msg"], "op id of 60000 bytes exceeds limit of 256");
    // A create with an over-long id is refused the same way.
    alice
        .send_json(
            json!({"t": "create", "id": "c".repeat(257), "room": "chat:long-id",
                          "kind": "chat", "init": {}}),
        )
        .await;
    let nack = alice.reply(&"c".repeat(257)).await;
    assert_eq!(nack["code"], "invalid", "{nack}");
    // 256 bytes is within the limit.
    alice
        .ack(
            &"k".repeat(256),
            "state:ids",
            json!({"type": "incr", "key": "n"}),
        )
        .await;

    let response = server
        .post_as(
            "bob",
            "/api/rooms/state:ids/ops",
            &json!({"id": long, "op": {"type": "incr", "key": "n"}}),
        )
        .await;
    assert_eq!(response.status, 400, "{}", response.text);
    assert_eq!(response.code(), "invalid");

    let state = server.room_state("state:ids").await;
    assert_eq!(
        state["seq"], 2,
        "only the op with a 256-byte id was applied"
    );
    assert_eq!(server.get("/api/rooms/chat:long-id").await.status, 404);
}

/// The committed fixture `client/op_incr.bin` (an `incr` on `state:game`, id `c6`) with
/// its id replaced by `id`, which must be over 8 bytes (an out-of-line string, format in
/// `tests/fixtures/rkyv/README.md`). The id's bytes go first: every relative pointer of
/// the archive keeps its target, and only the id's own repr changes: a length (first
/// byte `0b10` and the low 6 bits, the next three bytes the rest, little-endian), then
/// the i32 offset from the repr back to the bytes.
fn op_incr_with_id(id: &str) -> Vec<u8> {
    let base = include_bytes!("../fixtures/rkyv/client/op_incr.bin");
    let inline = b"c6\xff\xff\xff\xff\xff\xff";
    let at = base
        .windows(inline.len())
        .position(|window| window == inline)
        .expect("the fixture's inline id `c6`")
        + id.len();
    let len = u32::try_from(id.len()).expect("an id under 4 GiB");
    let offset = -i32::try_from(at).expect("a frame under 2 GiB");
    let mut frame = id.as_bytes().to_vec();
    frame.extend_from_slice(base);
    frame[at] = 0x80 | (len & 0x3f) as u8;
    frame[at + 1..at + 4].copy_from_slice(&(len >> 6).to_le_bytes()[..3]);
    frame[at + 4..at + 8].copy_from_slice(&offset.to_le_bytes());
    frame
}

#[tokio::test]
async fn op_id_over_256_bytes_is_nacked_invalid_on_rkyv() {
    use roomd::protocol::message::ServerMsg;
    use tokio_tungstenite::tungstenite::Message;

    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("state:game", "state", json!({})).await;
    let mut client = crate::support::Connect::new()
        .user("bob")
        .subprotocols(roomd::protocol::SUBPROTOCOL_RKYV)
        .handshake(&server)
        .await
        .expect("the rkyv upgrade is accepted");
    // The same patch at 256 bytes is a valid op: the frame itself is sound.
    for (id, accepted) in [("k".repeat(256), true), ("i".repeat(60_000), false)] {
        client.send(Message::binary(op_incr_with_id(&id))).await;
        let reply = loop {
            match client.next_event(TIMEOUT).await {
                crate::support::Event::Binary(bytes) => {
                    match roomd::protocol::binary::decode_server(&bytes).expect("a server frame") {
                        msg @ ServerMsg::Nack { .. } | msg @ ServerMsg::Ack { .. } => break msg,
                        _ => continue,
                    }
                }
                other => panic!("expected a binary reply, got {other:?}"),
            }
        };
        match reply {
            ServerMsg::Ack { id: got, .. } if accepted => assert!(got == id),
            ServerMsg::Nack { id: got, code, msg } if !accepted => {
                assert!(got == id, "the nack echoes the id ({} bytes)", got.len());
                assert_eq!(code, roomd::protocol::codes::Code::Invalid);
                assert!(msg.contains("exceeds limit of 256"), "{msg}");
            }
            other => panic!("an id of {} bytes was answered {other:?}", id.len()),
        }
    }
    assert_eq!(server.room_state("state:game").await["seq"], 2);
}

#[tokio::test]
async fn duplicate_json_keys_are_refused_on_the_websocket_and_over_http() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("state:dup", "state", json!({})).await;

    // A key repeated in the message itself: the frame cannot be used.
    alice
        .send_text(r#"{"t":"op","id":"d1","room":"state:dup","room":"state:other","op":{"type":"incr","key":"n"}}"#)
        .await;
    let error = alice.recv_until(|v| v["t"] == "error").await;
    assert_eq!(error["code"], "bad_frame", "{error}");
    assert!(
        error["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("duplicate key `room`"),
        "{error}"
    );

    // A key repeated inside the op: the op is invalid, nacked under its id.
    alice
        .send_text(
            r#"{"t":"op","id":"d2","room":"state:dup","op":{"type":"incr","key":"n","key":"m"}}"#,
        )
        .await;
    let nack = alice.reply("d2").await;
    assert_eq!(nack["t"], "nack", "{nack}");
    assert_eq!(nack["code"], "invalid");
    assert!(
        nack["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("duplicate key `key`"),
        "{nack}"
    );

    // Deeper inside a value, and in a create's init.
    alice
        .send_text(r#"{"t":"op","id":"d3","room":"state:dup","op":{"type":"set","key":"k","value":{"a":[{"x":1,"x":2}]}}}"#)
        .await;
    assert_eq!(alice.reply("d3").await["code"], "invalid");
    alice
        .send_text(r#"{"t":"create","id":"d4","room":"poll:dup","kind":"poll","init":{"question":"q","options":["a","b"],"question":"r"}}"#)
        .await;
    assert_eq!(alice.reply("d4").await["code"], "invalid");

    // Over HTTP: 400 invalid, for ops and for room creation.
    let response = server
        .http_raw(
            "POST",
            "/api/rooms/state:dup/ops",
            &[("X-Roomd-User", "bob")],
            r#"{"id":"h1","op":{"type":"incr","key":"n"},"op":{"type":"del","key":"n"}}"#,
        )
        .await;
    assert_eq!(response.status, 400, "{}", response.text);
    assert_eq!(response.code(), "invalid");
    assert!(
        response.text.contains("duplicate key `op`"),
        "{}",
        response.text
    );
    let response = server
        .http_raw(
            "POST",
            "/api/rooms",
            &[],
            r#"{"room":"state:dup2","kind":"state","init":{"entries":{"a":1,"a":2}}}"#,
        )
        .await;
    assert_eq!(response.status, 400, "{}", response.text);
    assert_eq!(response.code(), "invalid");

    // Nothing of it was applied.
    assert_eq!(server.room_state("state:dup").await["seq"], 1);
    assert_eq!(server.get("/api/rooms/state:dup2").await.status, 404);
    assert_eq!(server.get("/api/rooms/poll:dup").await.status, 404);
}

#[tokio::test]
async fn user_ids_with_control_characters_or_bad_utf8_are_refused() {
    let server = Server::start(&[]).await;
    for query in [
        "user=%FF",
        "user=al%C3",
        "user=a%01b",
        "user=a%0Ab",
        "user=%7F",
    ] {
        let refused = crate::support::Connect::new()
            .raw_query(query)
            .handshake(&server)
            .await;
        assert_eq!(
            refused.err(),
            Some(400),
            "?{query} is refused at the upgrade"
        );
        let response = server.get(&format!("/api/rooms/state:x?{query}")).await;
        assert_eq!(response.status, 400, "?{query}: {}", response.text);
        assert_eq!(response.code(), "invalid");
    }
    let response = server
        .http(
            "GET",
            "/api/rooms/state:x",
            &[("X-Roomd-User", "a\tb")],
            None,
        )
        .await;
    assert_eq!(response.status, 400, "{}", response.text);
    assert_eq!(response.code(), "invalid");
    // Percent-encoded UTF-8 is a fine user id.
    let mut client = crate::support::Connect::new()
        .raw_query("user=%C3%A9l%C3%A8ve")
        .connect(&server)
        .await;
    assert_eq!(client.user(), "élève");
    client.create_ok("chat:utf8", "chat", json!({})).await;
}

#[tokio::test]
async fn token_not_valid_before_a_future_time_is_refused() {
    let secret = "nbf-secret";
    let server = Server::start(&["--jwt-secret", secret]).await;
    let now = crate::support::now_secs();
    let early = crate::support::jwt(
        secret,
        json!({"sub": "alice", "admin": true, "nbf": now + 300}),
    );
    let mut client = crate::support::Connect::new()
        .token(&early)
        .handshake(&server)
        .await
        .expect("the upgrade itself succeeds; the refusal is on the socket");
    client.expect_close(4401).await;
    let response = server
        .http(
            "GET",
            "/api/rooms/state:x",
            &[("Authorization", &format!("Bearer {early}"))],
            None,
        )
        .await;
    assert_eq!(response.status, 401, "{}", response.text);

    // Within the 30 s leeway (clock skew), and in the past, the token is good.
    for nbf in [now + 10, now - 60] {
        let token = crate::support::jwt(secret, json!({"sub": "alice", "admin": true, "nbf": nbf}));
        let client = crate::support::Connect::new()
            .token(&token)
            .connect(&server)
            .await;
        assert_eq!(client.user(), "alice");
    }
}

#[tokio::test]
async fn oversized_request_headers_are_refused_without_an_error_per_request() {
    let server = Server::start(&[]).await;
    let big = "x".repeat(200 * 1024);
    for _ in 0..5 {
        let request = format!(
            "GET /healthz HTTP/1.1\r\nHost: {}\r\nX-Big: {big}\r\n\r\n",
            server.host()
        );
        let mut stream = TcpStream::connect(server.addr).await.expect("TCP connect");
        // The server may stop reading (and reset the connection) once the head is too
        // large, so neither the write nor the read has to complete.
        let _ = tokio::time::timeout(TIMEOUT, stream.write_all(request.as_bytes())).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut answer)).await;
        if !answer.is_empty() {
            let head = String::from_utf8_lossy(&answer);
            assert!(head.starts_with("HTTP/1.1 431"), "{head}");
        }
    }
    assert_eq!(server.get("/healthz").await.status, 200);
    let log = server.stderr_tail();
    assert!(
        !log.contains("ERROR"),
        "an oversized head is not a server error:\n{log}"
    );
    let summaries = log.matches("malformed or oversized HTTP requests").count();
    assert!(summaries <= 1, "at most one summary a minute:\n{log}");
}

#[tokio::test]
async fn admin_disconnect_4403_reaches_a_client_that_keeps_sending() {
    let server = Server::start(&[]).await;
    let raw = Raw::connect(&server, "user=victim").await;
    let Raw {
        mut read,
        write,
        buf,
    } = raw;
    // Pongs, 20 at a time every 5 ms: the close comes while they flow.
    let (seen_close, writer) = keep_sending(write, |_| {
        (0..20)
            .flat_map(|_| masked_frame(true, PONG, b""))
            .collect()
    });
    let mut reader = RawReader {
        read: &mut read,
        buf,
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Auth is off, so every caller is an admin.
    let response = server
        .post_as("admin", "/api/users/victim/disconnect", &json!({}))
        .await;
    assert_eq!(response.status, 200, "{}", response.text);
    assert_eq!(reader.close_code().await, 4403);
    seen_close.send_replace(true);
    let end = reader.end(Duration::from_secs(10)).await;
    assert!(
        matches!(end, Next::Eof),
        "expected a clean end, got {end:?}"
    );
    assert!(
        writer.await.expect("the writer task ends"),
        "the server stopped taking the client's frames before the client's close"
    );
}
