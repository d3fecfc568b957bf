//! `GET /api/rooms/{room}/stream`: one room as Server-Sent Events (PROTOCOL.md 1.1).
//!
//! A stream subscribes to its room like a WebSocket session does, with a
//! [`SessionRef`] whose `member` is false (not in presence, no signals, not counted in
//! the admin list) and its own byte-bounded [`Outbound`] queue, so the room's fan-out
//! path is the same for both. The room queues JSON text frames; the response body
//! (`SseBody`) takes each frame's payload and writes it as one SSE event:
//!
//! ```text
//! event: diff
//! id: 9f2c41d0a1b2c3d4:63
//! data: {"t":"diff",...}
//! ```
//!
//! `id` is `<epoch>:<seq>` (a snapshot's `seq`, a diff's or resumed's `to`); presence
//! events carry none. A reconnect's `Last-Event-ID` (or `?since=`, which it beats) asks
//! for a resume under the WebSocket's rules.
//!
//! Overflow policy: the queue is the WebSocket's (the `--outbound-queue` byte limit,
//! `snapshot`/`diff` charged at most half of it); when it overflows the stream ends and
//! the socket is cut like a slow WebSocket's, and the client reconnects with its
//! `Last-Event-ID`. A `: ping` comment goes out when nothing was written for a
//! heartbeat. At shutdown the stream ends with the WebSocket sessions (it is in
//! `Shared::sessions`).
//!
//! Cluster mode: a stream of a room another node owns is a remote subscription on the
//! owner (`cluster::stream`), whose frames arrive on the same kind of queue, so the
//! body below does not know the difference; only its end is told elsewhere.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use actix::Addr;
use actix_web::body::{BodySize, MessageBody};
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use serde_json::Value as Json;

use crate::auth::Permission;
use crate::http::{authorize, ApiError};
use crate::outbound::{ConnSocket, KillSwitch, Outbound, SessionRef};
use crate::protocol::codes::Code;
use crate::protocol::ids::{parse_epoch, RoomId};
use crate::protocol::{Encoding, Since};
use crate::room::messages::{Subscribe, Unsubscribe};
use crate::room::Room;
use crate::shared::{LiveSession, Shared};

/// What the stream starts with: the reconnect delay EventSource should use.
const PREAMBLE: &[u8] = b"retry: 1000\n\n";

/// `GET /api/rooms/{room}/stream[?presence=1][&since=<epoch>:<seq>]`.
pub async fn stream(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let shared = shared.into_inner();
    let room = path.into_inner();
    // Read permission is checked before anything about the room (deny by default).
    let identity = authorize(&req, &shared, Permission::Read, &room)?;
    let room = RoomId::parse(&room).map_err(|e| ApiError::new(Code::Invalid, e.to_string()))?;
    if shared.shutting_down.load(Ordering::Acquire) {
        return Err(ApiError::new(Code::Unavailable, "server shutting down"));
    }
    let query =
        web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
            .map(|q| q.into_inner())
            .unwrap_or_default();
    let presence = matches!(
        query.get("presence").map(String::as_str),
        Some("1" | "true")
    );
    // `Last-Event-ID` wins over `?since=`; one that does not parse asks for nothing.
    let since = match req.headers().get("last-event-id") {
        Some(value) => value.to_str().ok().and_then(parse_since),
        None => query.get("since").and_then(|s| parse_since(s)),
    };

    let kill = KillSwitch::new(req.conn_data::<ConnSocket>().copied());
    let outbound = Outbound::new(shared.config.outbound_queue, kill);
    let session = SessionRef {
        session_id: shared.next_session_id.fetch_add(1, Ordering::Relaxed),
        user: identity.user.clone(),
        dedup: false,
        encoding: Encoding::Json,
        outbound: outbound.clone(),
        member: false,
        evicted: Default::default(),
    };
    let session_id = session.session_id;
    // Cluster mode: a room owned elsewhere is streamed from its owner (`cluster::stream`).
    if let Some(cluster) = crate::http::forwarded::elsewhere(&shared, &room).cloned() {
        let subscribed =
            crate::cluster::stream::subscribe(&cluster, &session, &room, presence, since)
                .await
                .map_err(|e| ApiError::new(e.code(), e.to_string()));
        if !matches!(subscribed, Ok(true)) {
            crate::cluster::stream::end(&cluster, session_id);
            subscribed?;
            return Err(remote_refusal(&outbound).await);
        }
        return Ok(respond(
            &shared,
            &identity.user,
            outbound,
            session_id,
            Ending::Remote(cluster),
        ));
    }
    let msg = Subscribe {
        session,
        presence,
        since,
        relayed: None,
    };
    let mut addr = shared.registry.get(&room);
    let subscribed = match addr.send(msg.clone()).await {
        Ok(ok) => ok,
        // The room stopped between lookup and send: start it again once.
        Err(_) => {
            addr = shared.registry.get(&room);
            addr.send(msg)
                .await
                .map_err(|_| ApiError::new(Code::Unavailable, "the room restarted; retry"))?
        }
    };
    if !subscribed {
        // The room answered on the queue with an `error` frame (`not_found`, ...).
        return Err(refusal(&outbound));
    }
    Ok(respond(
        &shared,
        &identity.user,
        outbound,
        session_id,
        Ending::Local(addr),
    ))
}

/// The stream's response, its body reading `outbound`.
fn respond(
    shared: &Arc<Shared>,
    user: &Arc<str>,
    outbound: Arc<Outbound>,
    session_id: u64,
    ending: Ending,
) -> HttpResponse {
    // Listed with the WebSocket sessions: shutdown and the admin disconnect end it too.
    shared.sessions.insert(
        session_id,
        LiveSession {
            user: user.clone(),
            outbound: outbound.clone(),
        },
    );
    let body = SseBody {
        outbound,
        shared: shared.clone(),
        ending,
        session_id,
        preamble: true,
        heartbeat: shared.config.heartbeat,
        idle: Box::pin(tokio::time::sleep(shared.config.heartbeat)),
        ended: false,
    };
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        // Proxies that buffer responses (nginx) would hold events back.
        .insert_header(("x-accel-buffering", "no"))
        .body(body)
}

/// Who is told when a stream ends.
enum Ending {
    /// The room, on this node.
    Local(Addr<Room>),
    /// The room's owner, through the cluster.
    Remote(Arc<crate::cluster::Cluster>),
}

/// How long a refused remote stream waits for the owner's `error` frame, which travels
/// apart from the owner's answer.
const REFUSAL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// [`refusal`] for a stream the room's owner refused: its `error` frame may arrive after
/// the owner's answer did.
async fn remote_refusal(outbound: &Outbound) -> ApiError {
    let arrived = tokio::time::timeout(
        REFUSAL_WAIT,
        futures_util::future::poll_fn(|cx| outbound.poll_frame(cx)),
    )
    .await;
    match arrived {
        Ok(Some(frame)) => error_of(&frame),
        _ => None,
    }
    .unwrap_or_else(|| ApiError::new(Code::Unavailable, "the room's owner refused the stream"))
}

/// `<epoch hex>:<seq>`, as in an event's `id`.
fn parse_since(text: &str) -> Option<Since> {
    let (epoch, seq) = text.trim().split_once(':')?;
    Some(Since {
        epoch: Some(parse_epoch(epoch)?),
        seq: Some(seq.parse().ok()?),
    })
}

/// The error a refused subscription left on the queue, as an HTTP error.
fn refusal(outbound: &Outbound) -> ApiError {
    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    if let Poll::Ready(Some(frame)) = outbound.poll_frame(&mut cx) {
        if let Some(error) = error_of(&frame) {
            return error;
        }
    }
    ApiError::new(Code::Unavailable, "the room refused the subscription")
}

/// The `error` message in a server frame, as an HTTP error.
fn error_of(frame: &[u8]) -> Option<ApiError> {
    let Some(Ok(Json::Object(error))) = ws_text_payload(frame).map(serde_json::from_slice::<Json>)
    else {
        return None;
    };
    let code = error
        .get("code")
        .and_then(Json::as_str)
        .and_then(parse_code)
        .unwrap_or(Code::Unavailable);
    let msg = error.get("msg").and_then(Json::as_str).unwrap_or_default();
    Some(ApiError::new(code, msg))
}

/// A code by its wire name (only the ones a refused `sub` can carry need to match).
fn parse_code(name: &str) -> Option<Code> {
    [
        Code::Invalid,
        Code::NotFound,
        Code::Forbidden,
        Code::Limit,
        Code::Unavailable,
    ]
    .into_iter()
    .find(|code| code.as_str() == name)
}

/// The payload of an unmasked, final server text frame; None for any other frame.
fn ws_text_payload(frame: &[u8]) -> Option<&[u8]> {
    let (&first, rest) = frame.split_first()?;
    if first & 0x0f != 0x1 {
        return None;
    }
    let (&len7, rest) = rest.split_first()?;
    let (len, rest) = match len7 & 0x7f {
        126 => (
            u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize,
            &rest[2..],
        ),
        127 => (
            usize::try_from(u64::from_be_bytes(rest.get(..8)?.try_into().ok()?)).ok()?,
            &rest[8..],
        ),
        n => (n as usize, rest),
    };
    rest.get(..len)
}

/// One server message as an SSE event; the second value is true for an `error`
/// (the room dropped the subscription: the stream ends after it).
fn sse_event(payload: &[u8]) -> (Bytes, bool) {
    let parsed: Option<serde_json::Map<String, Json>> = serde_json::from_slice(payload).ok();
    let field = |name: &str| parsed.as_ref().and_then(|m| m.get(name));
    let kind = field("t").and_then(Json::as_str).unwrap_or("message");
    let seq = match kind {
        "snapshot" => field("seq"),
        "diff" | "resumed" => field("to"),
        _ => None,
    }
    .and_then(Json::as_u64);
    let epoch = field("epoch").and_then(Json::as_str);
    let mut out = BytesMut::with_capacity(payload.len() + 64);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\n");
    if let (Some(epoch), Some(seq)) = (epoch, seq) {
        out.extend_from_slice(format!("id: {epoch}:{seq}\n").as_bytes());
    }
    // Server JSON is one line (serde_json escapes control characters in strings).
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\n\n");
    (out.freeze(), kind == "error")
}

/// The response body of a stream: the room's frames as events, pings when idle.
struct SseBody {
    outbound: Arc<Outbound>,
    shared: Arc<Shared>,
    /// Told when the stream ends.
    ending: Ending,
    session_id: u64,
    /// `retry:` not yet written.
    preamble: bool,
    heartbeat: std::time::Duration,
    /// Fires when nothing was written for a heartbeat.
    idle: Pin<Box<tokio::time::Sleep>>,
    /// The stream is over (overflow, shutdown or the room went away).
    ended: bool,
}

impl SseBody {
    fn wrote(&mut self) {
        let next = tokio::time::Instant::now() + self.heartbeat;
        self.idle.as_mut().reset(next);
    }
}

impl MessageBody for SseBody {
    type Error = std::convert::Infallible;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if this.preamble {
            this.preamble = false;
            this.wrote();
            return Poll::Ready(Some(Ok(Bytes::from_static(PREAMBLE))));
        }
        loop {
            match this.outbound.poll_frame(cx) {
                Poll::Ready(None) => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(frame)) => {
                    let Some(payload) = ws_text_payload(&frame) else {
                        if frame.first().is_some_and(|b| b & 0x0f == 0x8) {
                            // A close frame: overflow (4001) or shutdown (4002).
                            this.ended = true;
                            return Poll::Ready(None);
                        }
                        continue; // pings and pongs are WebSocket-only
                    };
                    let (event, last) = sse_event(payload);
                    this.ended = last;
                    this.wrote();
                    return Poll::Ready(Some(Ok(event)));
                }
                Poll::Pending => break,
            }
        }
        if this.idle.as_mut().poll(cx).is_ready() {
            this.wrote();
            return Poll::Ready(Some(Ok(Bytes::from_static(b": ping\n\n"))));
        }
        Poll::Pending
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        self.shared.sessions.remove(&self.session_id);
        match &self.ending {
            // One per stream when it ends: a rare lifecycle message, so `do_send` is fine.
            Ending::Local(room) => room.do_send(Unsubscribe {
                session_id: self.session_id,
            }),
            Ending::Remote(cluster) => crate::cluster::stream::end(cluster, self.session_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_epoch_and_seq_ids_except_presence() {
        let (snapshot, last) = sse_event(
            br#"{"t":"snapshot","room":"r","kind":"state","epoch":"00000000000000ab","seq":5,"entries":[],"recovered":false}"#,
        );
        assert!(!last);
        let text = std::str::from_utf8(&snapshot).unwrap_or_default();
        assert!(text.starts_with("event: snapshot\nid: 00000000000000ab:5\ndata: {"));
        assert!(text.ends_with("}\n\n"));
        let (diff, _) = sse_event(
            br#"{"t":"diff","room":"r","epoch":"00000000000000ab","from":6,"to":9,"changes":[]}"#,
        );
        assert!(std::str::from_utf8(&diff)
            .unwrap_or_default()
            .contains("id: 00000000000000ab:9\n"));
        let (presence, _) = sse_event(br#"{"t":"presence","room":"r","join":["a"],"leave":[]}"#);
        assert!(!std::str::from_utf8(&presence)
            .unwrap_or_default()
            .contains("id:"));
        let (_, last) = sse_event(br#"{"t":"error","code":"not_found","room":"r","msg":"x"}"#);
        assert!(last);
    }

    #[test]
    fn since_parses_epoch_and_seq() {
        let since = parse_since("00000000000000ab:41");
        assert_eq!(since.and_then(|s| s.seq), Some(41));
        assert_eq!(since.and_then(|s| s.epoch), Some(0xab));
        assert!(parse_since("nope").is_none());
        assert!(parse_since("00000000000000ab:x").is_none());
    }

    #[test]
    fn text_payloads_come_out_of_server_frames() {
        for len in [5usize, 300, 70_000] {
            let payload = vec![b'x'; len];
            let frame = crate::outbound::Frame::text(payload.clone());
            let crate::outbound::Frame::Data(wire) = frame else {
                unreachable!("Frame::text builds a data frame")
            };
            assert_eq!(ws_text_payload(&wire), Some(&payload[..]));
        }
    }
}
