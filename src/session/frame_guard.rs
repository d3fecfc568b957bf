//! The size guard on a WebSocket connection's raw inbound bytes.
//!
//! It exists because of a trap in actix-http's WebSocket codec: the codec waits until a whole
//! *declared* frame is in its buffer before it compares the frame's length with `max_size`.
//! A client that sends a header declaring a 1 GiB payload, then trickles bytes, makes the
//! server buffer all of them; `max_frame_size` only fires once the memory is spent.
//!
//! [`FrameGuard`] wraps the raw payload stream before the codec sees it. It reads just enough
//! of each RFC 6455 frame header to learn where the frame's payload ends, and passes every
//! byte through unchanged. A frame or fragmented message declared larger than the limit
//! stops the stream at that frame's header, before any of its payload is read from the
//! socket, and leaves a [`Violation`] in the [`GuardHandle`] for the session to report
//! (close code 1009).
//!
//! Everything else about a frame (masking, reserved bits, opcodes, UTF-8, the 125-byte
//! control frame limit, continuation order) is left to the codec, which rejects bad frames
//! only after buffering them; the guard bounds that buffering but does not validate.
//!
//! The guard also owns the end of the inbound side (PROTOCOL.md 1.1, "Close and
//! disconnect"). Once the server has sent its close frame, the connection's response body
//! takes the raw stream over through a [`FrameDrain`] (as a
//! [`crate::outbound::InboundDrain`]): the codec gets no more bytes, and
//! the drain reads and discards frames, by their headers, until the client's close frame
//! has been read, the stream ends, or the body's deadline passes. Only then does the
//! socket close, so the kernel never answers a client that is still sending with a reset
//! (which would make it discard the close frame it had not read yet). The guard notes a
//! close frame passing through it to the codec too, so a close the codec buffered but the
//! session never read still counts.
//!
//! Last, the guard tells the reader when the connection is over although the raw stream
//! did not say so: when the drain takes the stream over, and when the response body (and
//! with it the [`FrameDrain`]) is dropped, the guard ends and wakes its reader. actix-http
//! drops the raw stream's sending side with the connection without waking the reader, so
//! without this a session whose connection ended by the server's close would wait for its
//! next heartbeat to notice.

use std::{
    cell::RefCell,
    fmt,
    pin::Pin,
    rc::Rc,
    sync::{Arc, OnceLock},
    task::{ready, Context, Poll, Waker},
};

use actix_http::error::PayloadError;
use bytes::{Buf, Bytes};
// `futures_util::Stream` is the `futures_core::Stream` trait, re-exported; roomd depends on
// futures-util, not on futures-core directly.
use futures_util::Stream;

/// Opcode of a continuation frame (RFC 6455 §5.2).
const OPCODE_CONTINUATION: u8 = 0x0;

/// Opcode of a close frame (RFC 6455 §5.5.1).
const OPCODE_CLOSE: u8 = 0x8;

/// Opcodes from here up are control frames (RFC 6455 §5.5).
const OPCODE_FIRST_CONTROL: u8 = 0x8;

/// Largest payload a control frame may carry (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// Longest frame header: 2 base bytes, a 64-bit extended length and a 4-byte mask key.
const MAX_HEADER_LEN: usize = 14;

/// Wraps `inner`, the raw client-to-server bytes of one WebSocket connection, so that no
/// frame or fragmented message larger than `max_message` bytes is read past its header.
///
/// The [`FrameGuard`] goes to the codec; the [`FrameDrain`] to whoever ends the
/// connection after a close (the response body); the [`GuardHandle`] to the session. The
/// first two share the stream and its parse position, on the connection's thread.
pub fn guard<S>(inner: S, max_message: usize) -> (FrameGuard<S>, FrameDrain<S>, GuardHandle) {
    let handle = GuardHandle(Arc::new(OnceLock::new()));
    let core = Rc::new(RefCell::new(Core {
        inner,
        inner_ended: false,
        violation: handle.0.clone(),
        limits: MessageLimits {
            // A usize wider than 64 bits would only make the limit unreachable.
            max_message: u64::try_from(max_message).unwrap_or(u64::MAX),
            message_total: 0,
        },
        input: Bytes::new(),
        header: HeaderBuf::default(),
        payload_left: 0,
        phase: Phase::Running,
        close_seen: false,
        draining: false,
        body_gone: false,
        reader: None,
    }));
    (FrameGuard(core.clone()), FrameDrain(core), handle)
}

/// The session's view of its connection's guard: whether, and why, the guard stopped the
/// inbound stream.
#[derive(Clone, Debug)]
pub struct GuardHandle(Arc<OnceLock<Violation>>);

impl GuardHandle {
    /// The limit the client broke, once the guard has stopped the stream because of it.
    /// `None` while the stream is healthy, and after it ended or failed for other reasons.
    pub fn violation(&self) -> Option<Violation> {
        self.0.get().copied()
    }
}

/// A limit broken by a frame header, found before the frame's payload was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// One frame's header declared a payload longer than the limit.
    FrameTooLarge { declared: u64, limit: u64 },
    /// The frames of one fragmented message, counted up to and including the continuation
    /// that crossed the limit, declare more than the limit in total.
    MessageTooLarge { total: u64, limit: u64 },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::FrameTooLarge { declared, limit } => {
                write!(f, "frame of {declared} bytes exceeds limit of {limit}")
            }
            Violation::MessageTooLarge { total, limit } => {
                write!(f, "message of {total} bytes exceeds limit of {limit}")
            }
        }
    }
}

impl std::error::Error for Violation {}

/// The inbound byte stream of one connection, cut off at the first frame header that breaks
/// the message size limit. See the module docs for why.
///
/// Invariant: bytes leave in the order they arrived and are never altered. The guard holds
/// at most one partial frame header; payload bytes are passed on as slices of the chunks
/// they arrived in. Once draining has begun, the guard yields nothing more.
pub struct FrameGuard<S>(Rc<RefCell<Core<S>>>);

/// The raw inbound stream after the server's close frame: read and discarded until the
/// client's close frame (RFC 6455 §7.1.1). Held by the connection's response body.
pub struct FrameDrain<S>(Rc<RefCell<Core<S>>>);

/// What [`FrameGuard`] and [`FrameDrain`] share: the raw stream and where in its frames
/// the reading stands.
struct Core<S> {
    /// The raw payload stream; not polled for the codec once the guard has found a
    /// violation, only by the drain.
    inner: S,
    /// The raw stream ended or failed: nothing more will come from the client.
    inner_ended: bool,
    /// Written once, by the guard, when it stops the stream; read by the session through
    /// its [`GuardHandle`].
    violation: Arc<OnceLock<Violation>>,
    /// The running size of the message in progress, checked against the limit at each header.
    limits: MessageLimits,
    /// The part of the latest inner chunk not yet scanned and passed on (or discarded).
    input: Bytes,
    /// The start of a frame header that a chunk boundary cut; it is passed on only once it is
    /// complete and within the limits, so a rejected header never reaches the codec.
    header: HeaderBuf,
    /// Payload bytes of the current frame still to pass through (or skip) before the next
    /// header. After a violation, the refused frame's payload, which the drain skips.
    payload_left: u64,
    phase: Phase,
    /// A close frame's header has been read off the socket (passed to the codec or seen by
    /// the drain); once its payload is read too, the client has said all it will say.
    close_seen: bool,
    /// Set by the drain when it takes over; the codec gets no more bytes.
    draining: bool,
    /// Set when the [`FrameDrain`] is dropped, which the response body does when the
    /// connection ends: the guard yields nothing more.
    body_gone: bool,
    /// The guard's reader, as of its last `Pending`: woken when the drain takes over or
    /// the body is gone, which the raw stream does not signal.
    reader: Option<Waker>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// A violation was found and the bytes before its header were yielded; the error is next.
    Failing,
    /// The inner stream ended, or the guard yielded its error; the guard yields nothing more.
    Done,
}

/// What one scan of `FrameGuard::input` produced.
enum Scan {
    /// Bytes to yield, possibly empty when the whole chunk went into the header buffer.
    Pass(Bytes),
    /// A header broke a limit; `Bytes` holds what came before it in the chunk, possibly empty.
    Violation(Violation, Bytes),
}

impl<S> Core<S> {
    /// Moves through `input` by frame headers and payload lengths, and returns the next piece
    /// to yield: everything up to the end of the chunk, the header completed by it, or the
    /// bytes before a violating header.
    fn scan(&mut self) -> Scan {
        let mut pos = 0;
        while pos < self.input.len() {
            if self.payload_left > 0 {
                let available = self.input.len() - pos;
                // A payload remainder too large for usize is certainly larger than the chunk.
                let step = usize::try_from(self.payload_left)
                    .map_or(available, |left| left.min(available));
                pos += step;
                self.payload_left -= step as u64;
                continue;
            }

            // The header buffer is only non-empty when this chunk began mid-header, in which
            // case `header_start` is 0 and no bytes of this chunk come before the header.
            let resumed = !self.header.is_empty();
            let header_start = pos;
            pos += self.header.fill(&self.input[pos..]);
            let Some(header) = self.header.parse() else {
                // The chunk ended inside the header: keep it until the next chunk completes it.
                let before = self.input.split_to(header_start);
                self.input.clear();
                return Scan::Pass(before);
            };

            if let Err(violation) = self.limits.admit(&header) {
                let before = self.input.split_to(header_start);
                // The refused header is dropped; its payload and what follows stay for
                // the drain, which skips them by their lengths.
                self.input.advance(pos - header_start);
                self.header.clear();
                self.payload_left = header.payload_len;
                return Scan::Violation(violation, before);
            }
            self.close_seen |= header.opcode == OPCODE_CLOSE;
            self.payload_left = header.payload_len;
            if resumed {
                // Part of this header came from an earlier chunk, so it cannot be a slice of
                // this one; its at most 14 bytes are copied and yielded on their own.
                let header_bytes = Bytes::copy_from_slice(self.header.as_slice());
                self.header.clear();
                self.input.advance(pos);
                return Scan::Pass(header_bytes);
            }
            self.header.clear();
        }
        Scan::Pass(self.input.split_to(pos))
    }

    fn stop(&mut self, violation: Violation) {
        // The guard stops at its first violation, so nothing has been set before.
        let _first = self.violation.set(violation);
    }

    /// Discards `input` frame by frame, with no limits, up to the end of the client's
    /// close frame or of the chunk.
    fn skip(&mut self) {
        while !self.input.is_empty() && !self.client_done() {
            if self.payload_left > 0 {
                // A payload remainder too large for usize is certainly larger than the chunk.
                let step = usize::try_from(self.payload_left)
                    .map_or(self.input.len(), |left| left.min(self.input.len()));
                self.input.advance(step);
                self.payload_left -= step as u64;
                continue;
            }
            let taken = self.header.fill(&self.input);
            self.input.advance(taken);
            let Some(header) = self.header.parse() else {
                continue;
            };
            self.header.clear();
            self.close_seen |= header.opcode == OPCODE_CLOSE;
            self.payload_left = header.payload_len;
        }
    }

    /// The client's close frame has been read whole: nothing more is owed to it.
    fn client_done(&self) -> bool {
        self.close_seen && self.payload_left == 0
    }
}

impl<S> crate::outbound::InboundDrain for FrameDrain<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    /// Takes the stream over from the codec (which gets nothing more) and reads and
    /// discards it; ready once the client's close frame has been read or the stream ended.
    /// The caller bounds how long it waits.
    fn poll_drain(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut core = self.0.borrow_mut();
        if !core.draining {
            core.draining = true;
            // The reader gets nothing more: let it see its end now.
            if let Some(reader) = core.reader.take() {
                reader.wake();
            }
        }
        loop {
            core.skip();
            if core.client_done() || core.inner_ended {
                return Poll::Ready(());
            }
            if !core.input.is_empty() {
                continue;
            }
            match ready!(Pin::new(&mut core.inner).poll_next(cx)) {
                Some(Ok(chunk)) => core.input = chunk,
                // A failed read (the peer reset, the dispatcher gave up) ends it like EOF.
                Some(Err(_)) | None => core.inner_ended = true,
            }
        }
    }
}

impl<S> Drop for FrameDrain<S> {
    fn drop(&mut self) {
        let reader = {
            let mut core = self.0.borrow_mut();
            core.body_gone = true;
            core.reader.take()
        };
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

impl<S> Stream for FrameGuard<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut core = self.0.borrow_mut();
        let this = &mut *core;
        if this.draining || this.body_gone {
            return Poll::Ready(None);
        }
        loop {
            match this.phase {
                Phase::Running => {}
                Phase::Failing => {
                    this.phase = Phase::Done;
                    return Poll::Ready(Some(Err(PayloadError::Overflow)));
                }
                Phase::Done => return Poll::Ready(None),
            }

            if !this.input.is_empty() {
                match this.scan() {
                    Scan::Pass(bytes) if bytes.is_empty() => {}
                    Scan::Pass(bytes) => return Poll::Ready(Some(Ok(bytes))),
                    Scan::Violation(violation, before) => {
                        this.stop(violation);
                        if before.is_empty() {
                            this.phase = Phase::Done;
                            return Poll::Ready(Some(Err(PayloadError::Overflow)));
                        }
                        this.phase = Phase::Failing;
                        return Poll::Ready(Some(Ok(before)));
                    }
                }
                // The rest of the chunk went into the header buffer; more input is needed.
                continue;
            }

            let polled = Pin::new(&mut this.inner).poll_next(cx);
            if polled.is_pending()
                && !this
                    .reader
                    .as_ref()
                    .is_some_and(|r| r.will_wake(cx.waker()))
            {
                this.reader = Some(cx.waker().clone());
            }
            match ready!(polled) {
                Some(Ok(chunk)) => this.input = chunk,
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => {
                    this.inner_ended = true;
                    this.phase = Phase::Done;
                    return Poll::Ready(None);
                }
            }
        }
    }
}

/// The size rules, applied to each frame header in turn.
#[derive(Debug)]
struct MessageLimits {
    /// Largest payload of a data frame, and of a whole fragmented message.
    max_message: u64,
    /// Declared bytes of the fragmented message in progress; 0 between messages.
    message_total: u64,
}

impl MessageLimits {
    /// Checks one header against the limits and, if it passes, counts it toward its message.
    fn admit(&mut self, header: &FrameHeader) -> Result<(), Violation> {
        let declared = header.payload_len;
        if header.opcode >= OPCODE_FIRST_CONTROL {
            // Control frames may interleave with a fragmented message and do not count toward
            // it. The codec rejects those over 125 bytes with its own protocol error (close
            // 1002), but only after buffering them, so the guard still bounds them: by
            // `max_message`, and never below the 125 bytes a legal control frame may carry.
            let limit = self.max_message.max(MAX_CONTROL_PAYLOAD);
            if declared > limit {
                return Err(Violation::FrameTooLarge { declared, limit });
            }
            return Ok(());
        }

        let limit = self.max_message;
        if declared > limit {
            return Err(Violation::FrameTooLarge { declared, limit });
        }
        // A text or binary frame starts a message; a continuation adds to the current one.
        // Out-of-order frames are the codec's to reject; counting them either way is safe.
        let total = if header.opcode == OPCODE_CONTINUATION {
            self.message_total.saturating_add(declared)
        } else {
            declared
        };
        if total > limit {
            return Err(Violation::MessageTooLarge { total, limit });
        }
        self.message_total = if header.fin { 0 } else { total };
        Ok(())
    }
}

/// The parts of a frame header the guard acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameHeader {
    fin: bool,
    opcode: u8,
    payload_len: u64,
}

/// A frame header being assembled, possibly across chunks.
#[derive(Debug, Default)]
struct HeaderBuf {
    bytes: [u8; MAX_HEADER_LEN],
    len: usize,
}

impl HeaderBuf {
    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// The full length of the header being assembled, once its second byte says how long
    /// the extended length is and whether a mask key follows.
    fn needed(&self) -> usize {
        if self.len < 2 {
            return 2;
        }
        let second = self.bytes[1];
        let extended = match second & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask_key = if second & 0x80 != 0 { 4 } else { 0 };
        2 + extended + mask_key
    }

    /// Copies from `src` only as many bytes as the header still needs; returns how many.
    fn fill(&mut self, src: &[u8]) -> usize {
        let mut taken = 0;
        // Two rounds at most: the base bytes, then the rest they announce.
        while self.len < self.needed() && taken < src.len() {
            let n = (self.needed() - self.len).min(src.len() - taken);
            self.bytes[self.len..self.len + n].copy_from_slice(&src[taken..taken + n]);
            self.len += n;
            taken += n;
        }
        taken
    }

    /// The header, once all of its bytes are in.
    fn parse(&self) -> Option<FrameHeader> {
        if self.len < self.needed() {
            return None;
        }
        let [first, second, ..] = self.bytes;
        let payload_len = match second & 0x7F {
            126 => u64::from(u16::from_be_bytes([self.bytes[2], self.bytes[3]])),
            127 => {
                let mut be = [0; 8];
                be.copy_from_slice(&self.bytes[2..10]);
                u64::from_be_bytes(be)
            }
            short => u64::from(short),
        };
        Some(FrameHeader {
            fin: first & 0x80 != 0,
            opcode: first & 0x0F,
            payload_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        sync::atomic::{AtomicUsize, Ordering},
        task::Waker,
    };

    use super::*;
    use crate::outbound::InboundDrain as _;

    const TEXT: u8 = 0x1;
    const BINARY: u8 = 0x2;
    const PING: u8 = 0x9;

    /// A masked client frame header declaring `payload_len` bytes, using the shortest length
    /// encoding unless `force_64` asks for the 64-bit one.
    fn header(fin: bool, opcode: u8, payload_len: u64, force_64: bool) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        if force_64 || payload_len > u64::from(u16::MAX) {
            out.push(0x80 | 127);
            out.extend_from_slice(&payload_len.to_be_bytes());
        } else if payload_len > 125 {
            out.push(0x80 | 126);
            out.extend_from_slice(&(payload_len as u16).to_be_bytes());
        } else {
            out.push(0x80 | payload_len as u8);
        }
        out.extend_from_slice(&[0x37, 0xfa, 0x21, 0x3d]);
        out
    }

    /// A whole masked client frame; the payload bytes are arbitrary, the guard never reads them.
    fn frame(fin: bool, opcode: u8, payload_len: usize) -> Vec<u8> {
        let mut out = header(fin, opcode, payload_len as u64, false);
        out.extend((0..payload_len).map(|i| i as u8));
        out
    }

    enum Step {
        Chunk(Bytes),
        Error,
        Pending,
    }

    /// The inner stream: plays its steps in order, then ends, counting every poll it receives.
    struct Script {
        steps: VecDeque<Step>,
        polls: Arc<AtomicUsize>,
    }

    impl Stream for Script {
        type Item = Result<Bytes, PayloadError>;

        fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            match self.steps.pop_front() {
                Some(Step::Chunk(bytes)) => Poll::Ready(Some(Ok(bytes))),
                Some(Step::Error) => Poll::Ready(Some(Err(PayloadError::Incomplete(None)))),
                Some(Step::Pending) => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    /// What the guard did with one script.
    #[derive(Debug)]
    struct Outcome {
        /// Every chunk the guard yielded, in order.
        chunks: Vec<Bytes>,
        /// Debug text of every error the guard yielded, in order.
        errors: Vec<String>,
        /// Whether any error came after the last chunk (so the reader saw the bytes first).
        error_last: bool,
        violation: Option<Violation>,
        /// Polls the inner stream received, including any after the guard stopped.
        inner_polls: usize,
    }

    impl Outcome {
        fn passed(&self) -> Vec<u8> {
            self.chunks.concat()
        }
    }

    /// Runs the guard over `steps` until it ends, then polls it three more times to check it
    /// stays ended without touching the inner stream.
    fn run(steps: Vec<Step>, max_message: usize) -> Outcome {
        // One step makes the guard yield at most three items (a header it completes, the rest
        // of the chunk, an error), so running out of this budget means it never ended.
        let poll_budget = 3 * steps.len() + 2;
        let polls = Arc::new(AtomicUsize::new(0));
        let script = Script {
            steps: steps.into(),
            polls: polls.clone(),
        };
        let (mut frame_guard, _drain, handle) = guard(script, max_message);
        let mut cx = Context::from_waker(Waker::noop());
        let (mut chunks, mut errors, mut error_last) = (Vec::new(), Vec::new(), false);
        let mut ended = false;
        for _ in 0..poll_budget {
            match Pin::new(&mut frame_guard).poll_next(&mut cx) {
                Poll::Ready(Some(Ok(bytes))) => {
                    assert!(!bytes.is_empty(), "the guard yields no empty chunks");
                    chunks.push(bytes);
                    error_last = false;
                }
                Poll::Ready(Some(Err(err))) => {
                    errors.push(format!("{err:?}"));
                    error_last = true;
                }
                Poll::Pending => {}
                Poll::Ready(None) => {
                    ended = true;
                    break;
                }
            }
        }
        assert!(ended, "the guard ends within {poll_budget} polls");
        let polls_at_end = polls.load(Ordering::SeqCst);
        for _ in 0..3 {
            let after = Pin::new(&mut frame_guard).poll_next(&mut cx);
            assert!(matches!(after, Poll::Ready(None)), "the guard stays ended");
        }
        assert_eq!(
            polls.load(Ordering::SeqCst),
            polls_at_end,
            "no polls after the end"
        );
        Outcome {
            chunks,
            errors,
            error_last,
            violation: handle.violation(),
            inner_polls: polls_at_end,
        }
    }

    fn chunks(parts: &[&[u8]]) -> Vec<Step> {
        parts
            .iter()
            .map(|part| Step::Chunk(Bytes::copy_from_slice(part)))
            .collect()
    }

    #[test]
    fn frame_split_byte_by_byte_passes_through_unchanged() {
        let mut wire = frame(true, BINARY, 300);
        wire.extend(frame(true, PING, 4));
        wire.extend(frame(false, TEXT, 10));
        wire.extend(frame(true, OPCODE_CONTINUATION, 70_000));
        let steps = wire
            .iter()
            .map(|byte| Step::Chunk(Bytes::copy_from_slice(&[*byte])))
            .collect();

        let outcome = run(steps, 100_000);

        assert_eq!(outcome.passed(), wire);
        assert!(outcome.errors.is_empty());
        assert_eq!(outcome.violation, None);
    }

    #[test]
    fn pending_inner_between_header_bytes_keeps_the_parse() {
        let wire = frame(true, BINARY, 200);
        let mut steps = Vec::new();
        for part in [&wire[..1], &wire[1..3], &wire[3..6], &wire[6..]] {
            steps.push(Step::Pending);
            steps.push(Step::Chunk(Bytes::copy_from_slice(part)));
        }

        let outcome = run(steps, 200);

        assert_eq!(outcome.passed(), wire);
        assert_eq!(outcome.violation, None);
    }

    #[test]
    fn small_frames_in_one_chunk_pass_as_that_chunk() {
        let mut wire = frame(true, TEXT, 5);
        wire.extend(frame(true, PING, 0));
        wire.extend(frame(true, BINARY, 125));
        wire.extend(frame(true, BINARY, 126));

        let outcome = run(chunks(&[&wire]), 1024);

        assert_eq!(outcome.chunks, vec![Bytes::from(wire)]);
        assert!(outcome.errors.is_empty());
    }

    #[test]
    fn one_gib_frame_fails_at_its_header_without_reading_further() {
        let declared = 1 << 30;
        let steps = chunks(&[
            &header(true, BINARY, declared, true),
            &[0u8; 4096],
            &[0u8; 4096],
        ]);

        let outcome = run(steps, 65_536);

        assert!(outcome.chunks.is_empty(), "the header itself is withheld");
        assert_eq!(outcome.errors, vec!["Overflow".to_owned()]);
        assert_eq!(
            outcome.violation,
            Some(Violation::FrameTooLarge {
                declared,
                limit: 65_536
            })
        );
        assert_eq!(outcome.inner_polls, 1, "no payload chunk is polled");
    }

    #[test]
    fn bytes_before_a_violating_header_are_yielded_before_the_error() {
        let ok = frame(true, TEXT, 10);
        let mut wire = ok.clone();
        wire.extend(header(true, BINARY, 1 << 30, true));
        wire.extend([0u8; 100]);

        let outcome = run(chunks(&[&wire, &[0u8; 100]]), 1024);

        assert_eq!(outcome.passed(), ok);
        assert_eq!(outcome.errors.len(), 1);
        assert!(outcome.error_last);
        assert_eq!(outcome.inner_polls, 1);
    }

    #[test]
    fn violating_header_split_across_chunks_is_never_passed_on() {
        let ok = frame(true, TEXT, 10);
        let big = header(true, BINARY, 1 << 30, true);
        let mut first = ok.clone();
        first.extend(&big[..5]);

        let outcome = run(chunks(&[&first, &big[5..], &[0u8; 100]]), 1024);

        assert_eq!(outcome.passed(), ok);
        assert_eq!(outcome.errors.len(), 1);
        assert_eq!(outcome.inner_polls, 2);
    }

    #[test]
    fn sixteen_bit_length_at_limit_passes() {
        let wire = frame(true, BINARY, 1000);

        let outcome = run(chunks(&[&wire[..500], &wire[500..]]), 1000);

        assert_eq!(outcome.passed(), wire);
        assert_eq!(outcome.violation, None);
    }

    #[test]
    fn sixteen_bit_length_one_over_limit_fails() {
        let wire = frame(true, BINARY, 1001);

        let outcome = run(chunks(&[&wire[..500], &wire[500..]]), 1000);

        assert!(outcome.chunks.is_empty());
        assert_eq!(outcome.errors.len(), 1);
        assert_eq!(
            outcome.violation,
            Some(Violation::FrameTooLarge {
                declared: 1001,
                limit: 1000
            })
        );
        assert_eq!(outcome.inner_polls, 1);
    }

    #[test]
    fn fragmented_message_fails_on_the_continuation_that_crosses_the_limit() {
        let first = frame(false, TEXT, 400);
        let ping = frame(true, PING, 20);
        let second = frame(false, OPCODE_CONTINUATION, 400);
        let crossing = frame(true, OPCODE_CONTINUATION, 201);
        let accepted = [first.clone(), ping.clone(), second.clone()].concat();

        let outcome = run(chunks(&[&first, &ping, &second, &crossing, &[0; 8]]), 1000);

        assert_eq!(
            outcome.passed(),
            accepted,
            "pings do not count toward the message"
        );
        assert_eq!(outcome.errors.len(), 1);
        assert_eq!(
            outcome.violation,
            Some(Violation::MessageTooLarge {
                total: 1001,
                limit: 1000
            })
        );
        assert_eq!(outcome.inner_polls, 4);
    }

    #[test]
    fn message_total_restarts_after_fin() {
        let wire = [
            frame(false, BINARY, 600),
            frame(true, OPCODE_CONTINUATION, 400),
            frame(false, BINARY, 600),
            frame(true, OPCODE_CONTINUATION, 400),
        ]
        .concat();

        let outcome = run(chunks(&[&wire]), 1000);

        assert_eq!(outcome.passed(), wire);
        assert_eq!(outcome.violation, None);
    }

    #[test]
    fn control_frame_declaring_more_than_the_limit_fails() {
        // The codec would reject it, but only after buffering the declared gigabyte.
        let outcome = run(chunks(&[&header(true, PING, 1 << 30, true)]), 1000);

        assert_eq!(
            outcome.violation,
            Some(Violation::FrameTooLarge {
                declared: 1 << 30,
                limit: 1000
            })
        );
    }

    #[test]
    fn control_frames_up_to_125_bytes_pass_under_a_smaller_limit() {
        let wire = frame(true, PING, 125);

        let outcome = run(chunks(&[&wire]), 16);

        assert_eq!(outcome.passed(), wire);
        assert_eq!(outcome.violation, None);
    }

    #[test]
    fn inner_errors_pass_through_and_the_stream_continues() {
        let wire = frame(true, TEXT, 3);
        let steps = vec![
            Step::Chunk(Bytes::copy_from_slice(&wire[..4])),
            Step::Error,
            Step::Chunk(Bytes::copy_from_slice(&wire[4..])),
        ];

        let outcome = run(steps, 1000);

        assert_eq!(outcome.passed(), wire);
        assert_eq!(outcome.errors, vec!["Incomplete(None)".to_owned()]);
        assert_eq!(outcome.violation, None);
    }

    #[test]
    fn end_of_inner_ends_the_guard_even_mid_header() {
        let wire = frame(true, TEXT, 3);

        let outcome = run(chunks(&[&wire[..3]]), 1000);

        assert!(
            outcome.chunks.is_empty(),
            "a partial header is never passed on"
        );
        assert!(outcome.errors.is_empty());
        assert_eq!(outcome.inner_polls, 2);
    }

    /// Polls `drain` once with a no-op waker.
    fn poll_drain_once(drain: &FrameDrain<Script>) -> Poll<()> {
        drain.poll_drain(&mut Context::from_waker(Waker::noop()))
    }

    fn script(parts: &[&[u8]]) -> (Script, Arc<AtomicUsize>) {
        let polls = Arc::new(AtomicUsize::new(0));
        let script = Script {
            steps: chunks(parts).into(),
            polls: polls.clone(),
        };
        (script, polls)
    }

    #[test]
    fn drain_after_a_violation_skips_the_refused_payload_and_stops_after_the_close_frame() {
        let ok = frame(true, TEXT, 10);
        let big = frame(true, BINARY, 2_000);
        let close = frame(true, OPCODE_CLOSE, 2);
        let after = frame(true, TEXT, 5);
        let first = [ok.clone(), big[..100].to_vec()].concat();
        let second = [big[100..].to_vec(), close].concat();
        let (script, polls) = script(&[&first, &second, &after]);
        let (mut frame_guard, drain, handle) = guard(script, 1_000);
        let mut cx = Context::from_waker(Waker::noop());

        let passed = Pin::new(&mut frame_guard).poll_next(&mut cx);
        assert!(matches!(passed, Poll::Ready(Some(Ok(ref b))) if b[..] == ok[..]));
        let failed = Pin::new(&mut frame_guard).poll_next(&mut cx);
        assert!(matches!(
            failed,
            Poll::Ready(Some(Err(PayloadError::Overflow)))
        ));
        assert!(handle.violation().is_some());

        assert_eq!(poll_drain_once(&drain), Poll::Ready(()));
        assert_eq!(
            polls.load(Ordering::SeqCst),
            2,
            "nothing after the close is read"
        );
        let ended = Pin::new(&mut frame_guard).poll_next(&mut cx);
        assert!(
            matches!(ended, Poll::Ready(None)),
            "the codec gets nothing more"
        );
    }

    #[test]
    fn close_frame_passed_to_the_codec_ends_the_drain_without_reading_more() {
        let wire = [frame(true, TEXT, 3), frame(true, OPCODE_CLOSE, 2)].concat();
        let (script, polls) = script(&[&wire, &frame(true, TEXT, 3)]);
        let (mut frame_guard, drain, _handle) = guard(script, 1_000);
        let mut cx = Context::from_waker(Waker::noop());

        let passed = Pin::new(&mut frame_guard).poll_next(&mut cx);
        assert!(matches!(passed, Poll::Ready(Some(Ok(ref b))) if b[..] == wire[..]));

        assert_eq!(poll_drain_once(&drain), Poll::Ready(()));
        assert_eq!(polls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn drain_discards_frames_until_the_stream_ends_or_waits_for_more() {
        let data = [frame(true, TEXT, 300), frame(false, BINARY, 70_000)].concat();
        let polls = Arc::new(AtomicUsize::new(0));
        let script = Script {
            steps: vec![
                Step::Chunk(Bytes::copy_from_slice(&data[..1_000])),
                Step::Pending,
                Step::Chunk(Bytes::copy_from_slice(&data[1_000..])),
            ]
            .into(),
            polls: polls.clone(),
        };
        let (_frame_guard, drain, _handle) = guard(script, 1_000);

        assert_eq!(poll_drain_once(&drain), Poll::Pending, "no close yet");
        assert_eq!(poll_drain_once(&drain), Poll::Ready(()), "the stream ended");
        assert_eq!(polls.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn violation_messages_state_the_numbers() {
        let frame = Violation::FrameTooLarge {
            declared: 70_000,
            limit: 65_536,
        };
        let message = Violation::MessageTooLarge {
            total: 131_072,
            limit: 65_536,
        };

        assert_eq!(
            frame.to_string(),
            "frame of 70000 bytes exceeds limit of 65536"
        );
        assert_eq!(
            message.to_string(),
            "message of 131072 bytes exceeds limit of 65536"
        );
    }
}
