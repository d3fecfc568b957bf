//! The byte-bounded outbound queue of one connection, and the response body draining it.
//!
//! Rooms and the session push frames here without waiting. The connection's response
//! body ([`OutboundBody`]) pulls them when actix-http asks for more, which it does only
//! while its write buffer is small, so the bytes charged here are what this connection
//! holds in memory (plus one write buffer and the kernel's socket buffer). That is why
//! frames do not go through `actix_ws::Session`: its channel holds 32 frames of any size
//! that no byte limit sees. Data frames are whole WebSocket frames (header included:
//! server frames are unmasked, so the bytes are the same for every receiver), encoded
//! once and shared by reference: a diff is queued to every subscriber for a refcount,
//! and the body hands the same bytes to actix-http without another copy.
//!
//! Overflow policy (PROTOCOL.md "Limits"): when a push would take the queue past its byte
//! limit, the queue is discarded and the connection is closed with 4001; the client
//! resumes from the log. Signals are dropped instead when the queue is half full. A
//! `snapshot`, `resumed` or `diff` is charged at most half the limit, so one that alone
//! exceeds the limit is still sent (a busy room's coalesced diff can be large, and a
//! client that keeps up must not be cut for it), while a client that falls two such
//! frames behind is still closed. These frames are shared `Bytes`, so the memory they
//! hold is counted once per room, not per subscriber.
//!
//! Every close is followed by a cut of the socket after a short grace ([`KillSwitch`]),
//! so a connection ends within a second even if the client never reads.

mod subscriber;

pub use subscriber::{encode, SessionRef};

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use actix_http::ws::{CloseCode, CloseReason, OpCode, Parser};
use actix_web::body::{BodySize, BoxBody, MessageBody};
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;

/// One frame waiting to be written.
#[derive(Debug, Clone)]
pub enum Frame {
    /// A whole text or binary WebSocket frame, header included ([`Frame::text`],
    /// [`Frame::binary`]).
    Data(Bytes),
    Ping,
    Pong(Bytes),
}

impl Frame {
    /// A text frame carrying `payload`, encoded now, once for every receiver.
    pub fn text(payload: impl Into<Bytes>) -> Frame {
        Frame::Data(wire(OpCode::Text, &payload.into()))
    }

    /// A binary frame carrying `payload`, encoded now, once for every receiver.
    pub fn binary(payload: impl Into<Bytes>) -> Frame {
        Frame::Data(wire(OpCode::Binary, &payload.into()))
    }

    /// Bytes charged to the queue: the whole frame for data, the payload for control.
    fn len(&self) -> usize {
        match self {
            Frame::Data(b) | Frame::Pong(b) => b.len(),
            Frame::Ping => 0,
        }
    }
}

/// One unmasked, final WebSocket frame.
fn wire(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut wire = BytesMut::with_capacity(payload.len() + 10);
    Parser::write_message(&mut wire, payload, opcode, true, false);
    wire.freeze()
}

/// How a push went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// A droppable frame (a signal) was dropped because the queue is busy.
    Dropped,
    /// The queue overflowed just now: it was discarded and the connection is closing.
    Overflowed,
    /// The connection is already closing or closed.
    Closed,
}

/// How much a frame is charged against the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// Ordinary frames: their full size.
    Full,
    /// `snapshot`, `resumed` and `diff`: at most half the limit (see the module docs).
    Bulk,
    /// Signals: dropped when the queue is half full, never an overflow.
    Droppable,
}

/// The queue shared by the session, the rooms it subscribes to, and the response body.
#[derive(Debug)]
pub struct Outbound {
    inner: Mutex<Inner>,
    limit: usize,
    /// Cuts the socket after a close's grace period.
    kill: KillSwitch,
}

#[derive(Debug, Default)]
struct Inner {
    frames: VecDeque<(Frame, usize)>,
    charged: usize,
    /// Set once: the close code and reason to send before the body ends.
    close: Option<(u16, String)>,
    /// The close frame was handed to the connection; the body ends next.
    close_sent: bool,
    /// The body waiting for a frame.
    waker: Option<Waker>,
}

/// How long a closing connection may take to finish before its socket is cut: the
/// close frame goes out at once to a client that reads, so this only bounds clients
/// that do not. Well inside the contract's 1 s.
pub const CLOSE_GRACE: Duration = Duration::from_millis(700);

impl Outbound {
    pub fn new(limit: usize, kill: KillSwitch) -> Arc<Outbound> {
        Arc::new(Outbound {
            inner: Mutex::new(Inner::default()),
            limit,
            kill,
        })
    }

    /// Queues a frame without waiting; see the module docs for the overflow policy.
    pub fn push(&self, frame: Frame, charge: Charge) -> Pushed {
        let len = frame.len();
        let (pushed, waker) = {
            let mut inner = self.inner.lock();
            if inner.close.is_some() {
                return Pushed::Closed;
            }
            let charged = match charge {
                Charge::Full => len,
                Charge::Bulk => len.min(self.limit / 2),
                Charge::Droppable if inner.charged + len > self.limit / 2 => {
                    return Pushed::Dropped;
                }
                Charge::Droppable => len,
            };
            if inner.charged + charged > self.limit {
                inner.frames.clear();
                inner.charged = 0;
                inner.close = Some((
                    crate::protocol::codes::close::SLOW_CONSUMER,
                    format!("outbound queue over its limit of {} bytes", self.limit),
                ));
                (Pushed::Overflowed, inner.waker.take())
            } else {
                inner.frames.push_back((frame, charged));
                inner.charged += charged;
                (Pushed::Queued, inner.waker.take())
            }
        };
        if pushed == Pushed::Overflowed {
            self.schedule_cut();
        }
        if let Some(waker) = waker {
            waker.wake();
        }
        pushed
    }

    /// Sends a close frame next and ends the connection; frames still queued are
    /// discarded. The first close wins.
    pub fn close(&self, code: u16, reason: impl Into<String>) {
        let waker = {
            let mut inner = self.inner.lock();
            if inner.close.is_some() {
                return;
            }
            inner.frames.clear();
            inner.charged = 0;
            inner.close = Some((code, reason.into()));
            inner.waker.take()
        };
        self.schedule_cut();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn schedule_cut(&self) {
        let kill = self.kill.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    tokio::time::sleep(CLOSE_GRACE).await;
                    kill.kill();
                });
            }
            // Every caller runs on an actix thread; without a runtime, cut at once.
            Err(_) => kill.kill(),
        }
    }

    /// True once a close was asked for (by overflow, the session or shutdown).
    pub fn is_closing(&self) -> bool {
        self.inner.lock().close.is_some()
    }

    /// Bytes currently charged.
    pub fn charged(&self) -> usize {
        self.inner.lock().charged
    }

    /// The body side: the next frame's wire bytes, None once the close was sent.
    fn poll_frame(&self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let mut inner = self.inner.lock();
        if inner.close_sent {
            return Poll::Ready(None);
        }
        if let Some((code, reason)) = &inner.close {
            let mut wire = BytesMut::new();
            let reason = CloseReason {
                code: CloseCode::from(*code),
                description: (!reason.is_empty()).then(|| truncate(reason, 123)),
            };
            Parser::write_close(&mut wire, Some(reason), false);
            inner.close_sent = true;
            return Poll::Ready(Some(wire.freeze()));
        }
        let Some((frame, charged)) = inner.frames.pop_front() else {
            inner.waker = Some(cx.waker().clone());
            return Poll::Pending;
        };
        inner.charged -= charged;
        drop(inner);
        Poll::Ready(Some(match frame {
            Frame::Data(wire) => wire,
            Frame::Ping => self::wire(OpCode::Ping, b""),
            Frame::Pong(payload) => self::wire(OpCode::Pong, &payload),
        }))
    }
}

/// A close reason fits a control frame (125 bytes with the code): cut at a char boundary.
fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The upgrade response body: frames pulled from the [`Outbound`] queue.
///
/// It also keeps actix-ws's own response body alive, unpolled: dropping that body is
/// how actix-ws tells its message stream that the connection ended.
pub struct OutboundBody {
    outbound: Arc<Outbound>,
    _actix_ws_body: BoxBody,
}

impl OutboundBody {
    pub fn new(outbound: Arc<Outbound>, actix_ws_body: BoxBody) -> OutboundBody {
        OutboundBody {
            outbound,
            _actix_ws_body: actix_ws_body,
        }
    }
}

impl MessageBody for OutboundBody {
    type Error = std::convert::Infallible;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        self.outbound.poll_frame(cx).map(|frame| frame.map(Ok))
    }
}

/// The TCP socket under a connection, recorded when it was accepted (see
/// `server::run`'s `on_connect`), so a close can be forced on a client that never reads.
#[derive(Clone, Copy, Debug)]
pub struct ConnSocket {
    pub fd: std::os::fd::RawFd,
    pub local: std::net::SocketAddr,
    pub peer: std::net::SocketAddr,
}

/// Cuts a connection that did not close in time.
///
/// actix-http stops polling a response body while its write buffer is full, so a client
/// that stops reading could hold a connection open forever, close frame and all. Cutting
/// the socket (linger 0, then shutdown) makes the dispatcher fail its next read or write
/// and drop the connection, and the kernel answers the peer with a reset.
#[derive(Clone, Debug, Default)]
pub struct KillSwitch(Option<ConnSocket>);

impl KillSwitch {
    pub fn new(socket: Option<ConnSocket>) -> KillSwitch {
        KillSwitch(socket)
    }

    pub fn kill(&self) {
        let Some(conn) = self.0 else { return };
        // SAFETY: the fd is only borrowed for these calls. It may have been closed and
        // reused since it was recorded, so the socket's addresses are checked first: a
        // live TCP socket with the same local and peer address is this connection.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(conn.fd) };
        let socket = socket2::SockRef::from(&fd);
        let same = socket.local_addr().ok().and_then(|a| a.as_socket()) == Some(conn.local)
            && socket.peer_addr().ok().and_then(|a| a.as_socket()) == Some(conn.peer);
        if same {
            let _ = socket.set_linger(Some(Duration::ZERO));
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Frame {
        Frame::text(vec![b'x'; n])
    }

    #[test]
    fn overflow_discards_the_queue_and_closes_with_4001() {
        let q = Outbound::new(100, KillSwitch::default());
        assert_eq!(q.push(text(60), Charge::Full), Pushed::Queued);
        assert_eq!(q.push(text(60), Charge::Full), Pushed::Overflowed);
        assert_eq!(q.charged(), 0);
        assert!(q.is_closing());
        assert_eq!(q.push(text(1), Charge::Full), Pushed::Closed);
    }

    #[test]
    fn signals_are_dropped_when_half_full() {
        let q = Outbound::new(100, KillSwitch::default());
        assert_eq!(q.push(text(45), Charge::Full), Pushed::Queued);
        assert_eq!(q.push(text(10), Charge::Droppable), Pushed::Dropped);
        assert!(!q.is_closing());
    }

    #[test]
    fn an_oversized_snapshot_is_still_sent() {
        let q = Outbound::new(100, KillSwitch::default());
        assert_eq!(q.push(text(1000), Charge::Bulk), Pushed::Queued);
        assert_eq!(q.push(text(40), Charge::Full), Pushed::Queued);
        assert_eq!(q.push(text(1000), Charge::Bulk), Pushed::Overflowed);
    }
}
