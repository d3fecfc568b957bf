//! The byte-bounded outbound queue of one connection, and the response body draining it.
//!
//! Rooms and the session push frames here without waiting. The connection's response
//! body ([`OutboundBody`]) pulls them when actix-http asks for more, which it does only
//! while its write buffer is small, so the bytes charged here are what this connection
//! holds in memory (plus one write buffer and the kernel's socket buffer). That is why
//! frames do not go through a channel of frames (actix-ws's holds 32 of any size, which
//! no byte limit sees). Data frames are whole WebSocket frames (header included:
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
//! Every close the server starts goes through [`Outbound::close`] (or the overflow above),
//! and ends the same way (PROTOCOL.md 1.1, "Close and disconnect", RFC 6455 §7.1.1): the
//! body sends the close frame, then keeps reading and discarding what the client still
//! sends (an [`InboundDrain`], which the session's frame guard provides) until the client's close frame has been read or
//! [`CLOSE_DRAIN`] has passed, and only then ends, which closes the TCP connection. A
//! client that pipelines frames therefore reads the close code instead of a reset.
//! A cut of the socket ([`KillSwitch`]) backs this up for clients that do not read: after
//! [`SLOW_CONSUMER_GRACE`] for 4001, after [`CLOSE_DRAIN`] plus [`CUT_MARGIN`] otherwise.

mod subscriber;

pub use subscriber::{encode, SessionRef};

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use actix_http::ws::{CloseCode, CloseReason, OpCode, Parser};
use actix_web::body::{BodySize, MessageBody};
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;

use crate::protocol::codes::close::SLOW_CONSUMER;

/// One frame waiting to be written.
#[derive(Debug, Clone)]
pub enum Frame {
    /// A whole text or binary WebSocket frame, header included ([`Frame::text`],
    /// [`Frame::binary`]).
    Data(Bytes),
    /// Several whole data frames back to back, `.1` of them: the replies of one batch to
    /// one connection, queued with one push and written with one write
    /// ([`ReplyFrames`](crate::room::messages::ReplyFrames) builds them). Only WebSocket
    /// connections get them (a relay or an SSE stream sends no op).
    Frames(Bytes, u32),
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

    /// A text or binary frame copied from a payload the caller drops next: one
    /// allocation, where turning the payload into `Bytes` first may take another.
    pub fn copied(opcode: OpCode, payload: &[u8]) -> Frame {
        Frame::Data(wire(opcode, payload))
    }

    /// Bytes charged to the queue: the whole frame for data, the payload for control.
    fn len(&self) -> usize {
        match self {
            Frame::Data(b) | Frame::Frames(b, _) | Frame::Pong(b) => b.len(),
            Frame::Ping => 0,
        }
    }

    /// How many WebSocket frames this is.
    fn count(&self) -> u64 {
        match self {
            Frame::Frames(_, n) => u64::from(*n),
            _ => 1,
        }
    }
}

/// Whole data frames appended one after another, queued as one [`Frame::Frames`].
#[derive(Debug, Default)]
pub struct FrameRun {
    wire: BytesMut,
    count: u32,
}

impl FrameRun {
    /// Appends one unmasked, final frame carrying `payload`.
    pub fn push(&mut self, opcode: OpCode, payload: &[u8]) {
        Parser::write_message(&mut self.wire, payload, opcode, true, false);
        self.count += 1;
    }

    pub fn into_frame(self) -> Frame {
        Frame::Frames(self.wire.freeze(), self.count)
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
    frames: Queue,
    charged: usize,
    /// Set once, by the first close. Boxed: an open connection never needs it, and 48
    /// bytes fewer put `Outbound` in a smaller allocation class (benches/README.md,
    /// "Idle connections").
    close: Option<Box<Closing>>,
    /// The body waiting for a frame.
    waker: Option<Waker>,
    /// Frames and wire bytes handed to the connection so far (the close frame
    /// included), for the connection's log line.
    sent_frames: u64,
    sent_bytes: u64,
}

/// A close asked for: what to send, and when.
#[derive(Debug)]
struct Closing {
    code: u16,
    reason: String,
    /// When the close was asked for; the drain after the close frame ends by
    /// `at + CLOSE_DRAIN`.
    at: Instant,
    /// The close frame was handed to the connection; the body ends next.
    sent: bool,
}

impl Closing {
    fn new(code: u16, reason: String) -> Option<Box<Closing>> {
        Some(Box::new(Closing {
            code,
            reason,
            at: Instant::now(),
            sent: false,
        }))
    }
}

/// The frames waiting, oldest first, each with what it was charged.
///
/// The oldest is kept inline: most connections, idle or not, have at most one frame
/// waiting at a time and then never allocate the queue behind it (an idle connection
/// kept a `VecDeque` of 4 slots, 192 bytes, from its `welcome` on).
#[derive(Debug, Default)]
struct Queue {
    first: Option<(Frame, usize)>,
    /// Only used while `first` is taken.
    rest: VecDeque<(Frame, usize)>,
}

impl Queue {
    fn push_back(&mut self, frame: (Frame, usize)) {
        if self.first.is_none() {
            self.first = Some(frame);
        } else {
            self.rest.push_back(frame);
        }
    }

    fn pop_front(&mut self) -> Option<(Frame, usize)> {
        let first = self.first.take()?;
        self.first = self.rest.pop_front();
        Some(first)
    }

    fn clear(&mut self) {
        self.first = None;
        self.rest.clear();
    }
}

/// What a connection has sent, for its log line at close.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SentStats {
    pub frames: u64,
    pub bytes: u64,
    /// The close code asked for, if the server closed (or answered a close).
    pub close_code: Option<u16>,
}

/// How long a slow consumer's connection (4001) may take to finish before its socket is
/// cut: the close frame goes out at once to a client that reads, so this only bounds
/// clients that do not. Well inside the contract's 1 s.
pub const SLOW_CONSUMER_GRACE: Duration = Duration::from_millis(700);

/// How long, after a close, the server keeps reading what the client still sends while it
/// waits for the client's close frame (PROTOCOL.md 1.1: 2 s).
pub const CLOSE_DRAIN: Duration = Duration::from_secs(2);

/// How long after [`CLOSE_DRAIN`] the socket of a connection that has not ended is cut:
/// the body ends at the drain's deadline on its own, so only a client that stopped reading
/// (the close frame stuck behind a full socket) is still there.
pub const CUT_MARGIN: Duration = Duration::from_millis(500);

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
        let mut queued = 0;
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
                inner.close = Closing::new(
                    SLOW_CONSUMER,
                    format!("outbound queue over its limit of {} bytes", self.limit),
                );
                (Pushed::Overflowed, inner.waker.take())
            } else {
                inner.frames.push_back((frame, charged));
                inner.charged += charged;
                queued = inner.charged;
                (Pushed::Queued, inner.waker.take())
            }
        };
        if pushed == Pushed::Queued {
            crate::metrics::hot()
                .outbound_queue_bytes
                .record(queued as f64);
        }
        if pushed == Pushed::Overflowed {
            self.schedule_cut(SLOW_CONSUMER_GRACE);
        }
        if let Some(waker) = waker {
            waker.wake();
        }
        pushed
    }

    /// The one way the server ends a connection: sends a close frame next, then reads
    /// and discards what the client still sends until its close frame or [`CLOSE_DRAIN`]
    /// (see the module docs), then ends. Frames still queued are discarded. The first
    /// close wins.
    pub fn close(&self, code: u16, reason: impl Into<String>) {
        let waker = {
            let mut inner = self.inner.lock();
            if inner.close.is_some() {
                return;
            }
            inner.frames.clear();
            inner.charged = 0;
            inner.close = Closing::new(code, reason.into());
            inner.waker.take()
        };
        self.schedule_cut(if code == SLOW_CONSUMER {
            SLOW_CONSUMER_GRACE
        } else {
            CLOSE_DRAIN + CUT_MARGIN
        });
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn schedule_cut(&self, after: Duration) {
        let kill = self.kill.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    tokio::time::sleep(after).await;
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

    /// When the drain after the close frame gives up on the client's close frame; None
    /// while no close was asked for.
    fn drain_deadline(&self) -> Option<Instant> {
        self.inner.lock().close.as_ref().map(|c| c.at + CLOSE_DRAIN)
    }

    /// Frames and bytes sent so far, and the close code.
    pub fn sent(&self) -> SentStats {
        let inner = self.inner.lock();
        SentStats {
            frames: inner.sent_frames,
            bytes: inner.sent_bytes,
            close_code: inner.close.as_ref().map(|c| c.code),
        }
    }

    /// Bytes currently charged.
    pub fn charged(&self) -> usize {
        self.inner.lock().charged
    }

    /// The body side: the next frame's wire bytes, None once the close was sent. Also
    /// read by the SSE stream's body (`sse.rs`), which re-frames the text payloads.
    pub(crate) fn poll_frame(&self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        self.poll_frames(cx).map(|next| next.map(|(wire, _)| wire))
    }

    /// As [`poll_frame`](Self::poll_frame), with how many WebSocket frames the bytes hold.
    fn poll_frames(&self, cx: &mut Context<'_>) -> Poll<Option<(Bytes, u64)>> {
        let mut inner = self.inner.lock();
        if let Some(closing) = &mut inner.close {
            if closing.sent {
                return Poll::Ready(None);
            }
            let mut wire = BytesMut::new();
            let reason = CloseReason {
                code: CloseCode::from(closing.code),
                description: (!closing.reason.is_empty()).then(|| truncate(&closing.reason, 123)),
            };
            Parser::write_close(&mut wire, Some(reason), false);
            closing.sent = true;
            inner.sent_frames += 1;
            inner.sent_bytes += wire.len() as u64;
            return Poll::Ready(Some((wire.freeze(), 1)));
        }
        let Some((frame, charged)) = inner.frames.pop_front() else {
            inner.waker = Some(cx.waker().clone());
            return Poll::Pending;
        };
        inner.charged -= charged;
        let count = frame.count();
        inner.sent_frames += count;
        inner.sent_bytes += frame.len() as u64;
        drop(inner);
        let wire = match frame {
            Frame::Data(wire) | Frame::Frames(wire, _) => wire,
            Frame::Ping => self::wire(OpCode::Ping, b""),
            Frame::Pong(payload) => self::wire(OpCode::Pong, &payload),
        };
        Poll::Ready(Some((wire, count)))
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

/// The upgrade response body: frames pulled from the [`Outbound`] queue, then, after the
/// close frame, the drain of the inbound side (see the module docs). Ending the body is
/// what closes the TCP connection; dropping it drops the drain, which tells the inbound
/// side's reader that the connection is over.
pub struct OutboundBody<D> {
    outbound: Arc<Outbound>,
    /// The connection's raw inbound side, shared with the frame guard in front of the
    /// codec.
    inbound: D,
    /// The drain's deadline, armed when the close frame has been handed over.
    drain_until: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Counts this connection among the open ones until the body is dropped.
    _open: OpenConnection,
}

impl<D: InboundDrain> OutboundBody<D> {
    pub fn new(outbound: Arc<Outbound>, inbound: D, open: OpenConnection) -> OutboundBody<D> {
        OutboundBody {
            outbound,
            inbound,
            drain_until: None,
            _open: open,
        }
    }
}

impl<D: InboundDrain + Unpin> MessageBody for OutboundBody<D> {
    type Error = std::convert::Infallible;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        match this.outbound.poll_frames(cx) {
            Poll::Ready(Some((frame, count))) => {
                let hot = crate::metrics::hot();
                hot.frames_sent.increment(count);
                hot.bytes_sent.increment(frame.len() as u64);
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Pending => return Poll::Pending,
            // The close frame went out: drain until the client's close or the deadline.
            Poll::Ready(None) => {}
        }
        let outbound = &this.outbound;
        let deadline = this.drain_until.get_or_insert_with(|| {
            // The close was asked for before its frame could be handed over.
            let at = outbound.drain_deadline().unwrap_or_else(Instant::now);
            Box::pin(tokio::time::sleep_until(at.into()))
        });
        if deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        this.inbound.poll_drain(cx).map(|()| None)
    }
}

/// A connection's inbound side once the server has sent its close frame: read and
/// discarded until the client's close frame (RFC 6455 §7.1.1). The body holds it for the
/// connection's life; dropping it is how the inbound side's reader learns that the
/// connection is over.
pub trait InboundDrain {
    /// Reads and discards what the client sends; ready once its close frame has been read
    /// or the stream ended. The caller bounds how long it waits.
    fn poll_drain(&self, cx: &mut Context<'_>) -> Poll<()>;
}

/// Counts a WebSocket connection as open from its upgrade until its response body is
/// dropped (after the close and the drain), so shutdown can wait for the close frames
/// to reach their clients before it stops the server.
#[derive(Debug)]
pub struct OpenConnection(Arc<std::sync::atomic::AtomicUsize>);

impl OpenConnection {
    pub fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> OpenConnection {
        count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        OpenConnection(count.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
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
    fn frames_leave_in_the_order_they_were_queued() {
        let q = Outbound::new(1000, KillSwitch::default());
        let mut cx = Context::from_waker(Waker::noop());
        let mut next = || match q.poll_frame(&mut cx) {
            Poll::Ready(Some(wire)) => Some(wire.len()),
            _ => None,
        };
        for n in [1, 2, 3] {
            q.push(text(n), Charge::Full);
        }
        assert_eq!(next(), Some(3));
        q.push(text(4), Charge::Full);
        assert_eq!(
            [next(), next(), next(), next()],
            [Some(4), Some(5), Some(6), None]
        );
        q.push(text(5), Charge::Full);
        assert_eq!(next(), Some(7));
        assert_eq!(q.charged(), 0);
    }

    #[test]
    fn an_oversized_snapshot_is_still_sent() {
        let q = Outbound::new(100, KillSwitch::default());
        assert_eq!(q.push(text(1000), Charge::Bulk), Pushed::Queued);
        assert_eq!(q.push(text(40), Charge::Full), Pushed::Queued);
        assert_eq!(q.push(text(1000), Charge::Bulk), Pushed::Overflowed);
    }
}
