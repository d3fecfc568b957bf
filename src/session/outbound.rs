//! The byte-bounded outbound queue of one connection, and the writer task draining it.
//!
//! Rooms and the session push frames here without waiting; the writer task owns the
//! `actix_ws::Session` and writes them to the socket in order. Frames are `Bytes` shared
//! by reference: a diff encoded once is queued to every subscriber for a refcount.
//!
//! Overflow policy (PROTOCOL.md "Limits"): when a push would take the queue past its byte
//! limit, the queue is discarded and the connection is closed with 4001; the client
//! resumes from the log. Signals are dropped instead when the queue is half full. A
//! `snapshot` or `resumed` is charged at most half the limit, so one that alone exceeds
//! the limit is still sent, while repeated ones still close a client that never reads.
//! A close is best effort for one second; after that the connection is cut (see
//! [`KillSwitch`]) even if the client never reads.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::{BodySize, BoxBody, MessageBody};
use bytes::Bytes;
use bytestring::ByteString;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::sync::Notify;

/// One frame waiting to be written.
#[derive(Debug, Clone)]
pub enum Frame {
    Text(Bytes),
    Binary(Bytes),
    Ping,
    Pong(Bytes),
}

impl Frame {
    fn len(&self) -> usize {
        match self {
            Frame::Text(b) | Frame::Binary(b) | Frame::Pong(b) => b.len(),
            Frame::Ping => 0,
        }
    }
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
    /// `snapshot` and `resumed`: at most half the limit (see the module docs).
    Catchup,
    /// Signals: dropped when the queue is half full, never an overflow.
    Droppable,
}

/// The queue shared by the session, the rooms it subscribes to, and the writer task.
#[derive(Debug)]
pub struct Outbound {
    inner: Mutex<Inner>,
    /// Wakes the writer when a frame or a close arrives.
    notify: Notify,
    limit: usize,
}

#[derive(Debug, Default)]
struct Inner {
    frames: VecDeque<(Frame, usize)>,
    charged: usize,
    /// Set once: the close code and reason the writer sends before cutting.
    close: Option<(u16, String)>,
}

impl Outbound {
    pub fn new(limit: usize) -> Arc<Outbound> {
        Arc::new(Outbound {
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            limit,
        })
    }

    /// Queues a frame without waiting; see the module docs for the overflow policy.
    pub fn push(&self, frame: Frame, charge: Charge) -> Pushed {
        let len = frame.len();
        let pushed = {
            let mut inner = self.inner.lock();
            if inner.close.is_some() {
                return Pushed::Closed;
            }
            let charged = match charge {
                Charge::Full => len,
                Charge::Catchup => len.min(self.limit / 2),
                Charge::Droppable if inner.charged + len > self.limit / 2 => {
                    return Pushed::Dropped;
                }
                Charge::Droppable => len,
            };
            if inner.charged + charged > self.limit {
                inner.frames.clear();
                inner.charged = 0;
                inner.close = Some((
                    super::super::protocol::codes::close::SLOW_CONSUMER,
                    format!("outbound queue over its limit of {} bytes", self.limit),
                ));
                Pushed::Overflowed
            } else {
                inner.frames.push_back((frame, charged));
                inner.charged += charged;
                Pushed::Queued
            }
        };
        self.notify.notify_one();
        pushed
    }

    /// Asks the writer to send a close frame and end the connection. The first close
    /// wins; frames still queued are discarded.
    pub fn close(&self, code: u16, reason: impl Into<String>) {
        {
            let mut inner = self.inner.lock();
            if inner.close.is_some() {
                return;
            }
            inner.frames.clear();
            inner.charged = 0;
            inner.close = Some((code, reason.into()));
        }
        self.notify.notify_one();
    }

    /// True once a close was asked for (by overflow, the session or shutdown).
    pub fn is_closing(&self) -> bool {
        self.inner.lock().close.is_some()
    }

    /// Bytes currently charged.
    pub fn charged(&self) -> usize {
        self.inner.lock().charged
    }

    /// The writer side: the next frame, or the close to send.
    async fn next(&self) -> Next {
        loop {
            let notified = self.notify.notified();
            {
                let mut inner = self.inner.lock();
                if let Some((code, reason)) = &inner.close {
                    return Next::Close(*code, reason.clone());
                }
                if let Some((frame, charged)) = inner.frames.pop_front() {
                    inner.charged -= charged;
                    return Next::Frame(frame);
                }
            }
            notified.await;
        }
    }

    async fn closing(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_closing() {
                return;
            }
            notified.await;
        }
    }
}

enum Next {
    Frame(Frame),
    Close(u16, String),
}

/// How long a close handshake may take before the connection is cut.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Drains `outbound` into the socket until a close, a write error or a cut.
pub async fn run_writer(outbound: Arc<Outbound>, mut session: actix_ws::Session, kill: KillSwitch) {
    loop {
        let frame = match outbound.next().await {
            Next::Frame(frame) => frame,
            Next::Close(code, reason) => {
                let reason = actix_ws::CloseReason {
                    code: actix_ws::CloseCode::from(code),
                    description: Some(reason),
                };
                let _ = tokio::time::timeout(CLOSE_GRACE, session.close(Some(reason))).await;
                break;
            }
        };
        let write = async {
            match frame {
                Frame::Text(bytes) => match ByteString::try_from(bytes) {
                    Ok(text) => session.text(text).await,
                    // Text frames are built from `String`s; this cannot happen.
                    Err(_) => Ok(()),
                },
                Frame::Binary(bytes) => session.binary(bytes).await,
                Frame::Ping => session.ping(b"").await,
                Frame::Pong(bytes) => session.pong(&bytes).await,
            }
        };
        // A client that stops reading blocks the write; a close must still get through.
        let written = tokio::select! {
            written = write => written.is_ok(),
            () = outbound.closing() => true,
        };
        if !written {
            break;
        }
    }
    // Whatever ended the writer, the connection ends within the grace period.
    tokio::time::sleep(Duration::from_millis(50)).await;
    kill.kill();
}

/// Cuts a WebSocket connection: the response body wrapped by [`KillableBody`] fails,
/// and actix-http drops the TCP connection instead of waiting for the peer.
#[derive(Clone, Debug, Default)]
pub struct KillSwitch(Arc<KillState>);

#[derive(Debug, Default)]
struct KillState {
    killed: AtomicBool,
    waker: AtomicWaker,
}

impl KillSwitch {
    pub fn kill(&self) {
        self.0.killed.store(true, Ordering::Release);
        self.0.waker.wake();
    }
}

/// The upgrade response body (actix-ws's frame stream) with a [`KillSwitch`].
pub struct KillableBody {
    inner: BoxBody,
    kill: KillSwitch,
}

impl KillableBody {
    pub fn new(inner: BoxBody, kill: KillSwitch) -> KillableBody {
        KillableBody { inner, kill }
    }
}

impl MessageBody for KillableBody {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.inner.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        this.kill.0.waker.register(cx.waker());
        if this.kill.0.killed.load(Ordering::Acquire) {
            return Poll::Ready(Some(Err("connection cut by roomd".into())));
        }
        Pin::new(&mut this.inner).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Frame {
        Frame::Text(Bytes::from(vec![b'x'; n]))
    }

    #[test]
    fn overflow_discards_the_queue_and_closes_with_4001() {
        let q = Outbound::new(100);
        assert_eq!(q.push(text(60), Charge::Full), Pushed::Queued);
        assert_eq!(q.push(text(60), Charge::Full), Pushed::Overflowed);
        assert_eq!(q.charged(), 0);
        assert!(q.is_closing());
        assert_eq!(q.push(text(1), Charge::Full), Pushed::Closed);
    }

    #[test]
    fn signals_are_dropped_when_half_full() {
        let q = Outbound::new(100);
        assert_eq!(q.push(text(45), Charge::Full), Pushed::Queued);
        assert_eq!(q.push(text(10), Charge::Droppable), Pushed::Dropped);
        assert!(!q.is_closing());
    }

    #[test]
    fn an_oversized_snapshot_is_still_sent() {
        let q = Outbound::new(100);
        assert_eq!(q.push(text(1000), Charge::Catchup), Pushed::Queued);
        assert_eq!(q.push(text(40), Charge::Full), Pushed::Queued);
        assert_eq!(q.push(text(1000), Charge::Catchup), Pushed::Overflowed);
    }
}
