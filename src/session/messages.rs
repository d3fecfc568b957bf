//! A WebSocket connection's inbound messages: the raw client bytes, through the
//! [`frame_guard`](super::frame_guard), decoded by actix-http's WebSocket codec into whole
//! messages, fragments joined.
//!
//! This is the part of actix-ws roomd used (its `MessageStream` and
//! `AggregatedMessageStream`), owned here because actix-ws also gives every connection
//! a 32-slot frame channel, a response body and a oneshot that roomd never used (frames
//! go out through [`crate::outbound`]): about 2 KiB of each idle connection
//! (benches/README.md, "Idle connections"). The codec is actix-http's, unchanged: it
//! checks masking, opcodes, reserved bits, control frame sizes and the order of
//! fragments; here only the fragments are joined and text is checked for UTF-8.
//!
//! The stream ends after its first error, when the raw bytes end, or when the guard says
//! the connection is over (the server's close is draining the socket, or the response
//! body is gone). Bytes are held only while a frame is incomplete: an idle connection
//! holds no read buffer here.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use actix_codec::Decoder;
use actix_http::error::PayloadError;
use actix_http::ws::{CloseReason, Codec, Frame, Item, ProtocolError};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures_util::Stream;

use super::frame_guard::FrameGuard;

/// One whole message from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientMessage {
    Text(ByteString),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    Close(Option<CloseReason>),
}

/// The client's messages on one connection; see the module docs.
pub struct ClientMessages<S> {
    raw: FrameGuard<S>,
    /// Bytes read but not yet decoded: the start of an incomplete frame, at most one
    /// frame's worth (the guard refuses larger ones before their payload is read).
    buf: BytesMut,
    codec: Codec,
    /// The fragments of the message in progress, their total length, and whether it is
    /// text.
    fragments: Vec<Bytes>,
    fragments_len: usize,
    fragments_text: bool,
    /// Largest frame, and largest message once its fragments are joined.
    max_message: usize,
    /// No more messages: the raw stream ended or an error was yielded.
    done: bool,
}

impl<S> ClientMessages<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    pub fn new(raw: FrameGuard<S>, max_message: usize) -> ClientMessages<S> {
        ClientMessages {
            raw,
            buf: BytesMut::new(),
            codec: Codec::new().max_size(max_message),
            fragments: Vec::new(),
            fragments_len: 0,
            fragments_text: false,
            max_message,
            done: false,
        }
    }

    /// The message a decoded frame completes, if it completes one.
    fn assemble(&mut self, frame: Frame) -> Result<Option<ClientMessage>, ProtocolError> {
        let (bytes, last) = match frame {
            Frame::Text(bytes) => return text(bytes).map(Some),
            Frame::Binary(bytes) => return Ok(Some(ClientMessage::Binary(bytes))),
            Frame::Ping(bytes) => return Ok(Some(ClientMessage::Ping(bytes))),
            Frame::Pong(bytes) => return Ok(Some(ClientMessage::Pong(bytes))),
            Frame::Close(reason) => return Ok(Some(ClientMessage::Close(reason))),
            // The codec rejects fragments out of order, so a first one starts afresh.
            Frame::Continuation(Item::FirstText(bytes)) => {
                self.fragments_text = true;
                (bytes, false)
            }
            Frame::Continuation(Item::FirstBinary(bytes)) => {
                self.fragments_text = false;
                (bytes, false)
            }
            Frame::Continuation(Item::Continue(bytes)) => (bytes, false),
            Frame::Continuation(Item::Last(bytes)) => (bytes, true),
        };
        self.fragments_len += bytes.len();
        if self.fragments_len > self.max_message {
            // The guard refuses such a message at the header that crosses the limit, so
            // this only backs it up.
            return Err(ProtocolError::Overflow);
        }
        // Empty fragments are not kept, so a stream of them cannot grow the list.
        if !bytes.is_empty() {
            self.fragments.push(bytes);
        }
        if !last {
            return Ok(None);
        }
        let mut joined = BytesMut::with_capacity(self.fragments_len);
        for fragment in self.fragments.drain(..) {
            joined.extend_from_slice(&fragment);
        }
        self.fragments = Vec::new();
        self.fragments_len = 0;
        let joined = joined.freeze();
        if self.fragments_text {
            text(joined).map(Some)
        } else {
            Ok(Some(ClientMessage::Binary(joined)))
        }
    }

    /// Decodes the next whole message from `buf`, if one is there.
    fn decode(&mut self) -> Result<Option<ClientMessage>, ProtocolError> {
        while let Some(frame) = self.codec.decode(&mut self.buf)? {
            if let Some(message) = self.assemble(frame)? {
                return Ok(Some(message));
            }
        }
        if self.buf.is_empty() {
            // What is left is an empty view of the last chunk: let it go.
            self.buf = BytesMut::new();
        }
        Ok(None)
    }
}

/// A text message: its payload must be UTF-8 (1007 otherwise, see `upgrade::close_for`).
fn text(bytes: Bytes) -> Result<ClientMessage, ProtocolError> {
    ByteString::try_from(bytes)
        .map(ClientMessage::Text)
        .map_err(|err| ProtocolError::Io(io::Error::new(io::ErrorKind::InvalidData, err)))
}

impl<S> Stream for ClientMessages<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<ClientMessage, ProtocolError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.decode() {
                Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(None) => {}
                Err(err) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(err)));
                }
            }
            match Pin::new(&mut this.raw).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    if this.buf.is_empty() {
                        // No copy when nothing is pending and the chunk is not shared.
                        this.buf = BytesMut::from(chunk);
                    } else {
                        this.buf.extend_from_slice(&chunk);
                    }
                }
                Poll::Ready(Some(Err(err))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(ProtocolError::Io(io::Error::other(err)))));
                }
                // What is buffered is an incomplete frame: it is dropped with the stream.
                Poll::Ready(None) => this.done = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    use actix_http::ws::{OpCode, Parser};

    use super::*;
    use crate::session::frame_guard::{self, FrameDrain};

    /// The raw stream: its chunks in order, then `Pending` for ever.
    struct Chunks(VecDeque<Bytes>);

    impl Stream for Chunks {
        type Item = Result<Bytes, PayloadError>;

        fn poll_next(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            match self.get_mut().0.pop_front() {
                Some(chunk) => Poll::Ready(Some(Ok(chunk))),
                None => Poll::Pending,
            }
        }
    }

    /// Counts its wake-ups.
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A masked client frame.
    fn frame(opcode: OpCode, fin: bool, payload: &[u8]) -> Bytes {
        let mut wire = BytesMut::new();
        Parser::write_message(&mut wire, payload, opcode, fin, true);
        wire.freeze()
    }

    fn messages(chunks: Vec<Bytes>) -> (ClientMessages<Chunks>, FrameDrain<Chunks>) {
        let (guarded, drain, _handle) = frame_guard::guard(Chunks(chunks.into()), 1024);
        (ClientMessages::new(guarded, 1024), drain)
    }

    /// Polls until `Pending` or the end, collecting what came.
    fn poll_all(
        stream: &mut ClientMessages<Chunks>,
        waker: &Waker,
    ) -> (Vec<Result<ClientMessage, String>>, bool) {
        let mut cx = Context::from_waker(waker);
        let mut out = Vec::new();
        loop {
            match Pin::new(&mut *stream).poll_next(&mut cx) {
                Poll::Ready(Some(item)) => out.push(item.map_err(|e| e.to_string())),
                Poll::Ready(None) => return (out, true),
                Poll::Pending => return (out, false),
            }
        }
    }

    #[test]
    fn fragments_are_joined_around_an_interleaved_ping() {
        let mut wire = BytesMut::new();
        for part in [
            frame(OpCode::Text, false, b"he"),
            frame(OpCode::Continue, false, b"l"),
            frame(OpCode::Ping, true, b"p"),
            frame(OpCode::Continue, true, b"lo"),
            frame(OpCode::Binary, true, &[1, 2]),
        ] {
            wire.extend_from_slice(&part);
        }
        // Split mid-frame so the decoder waits for the rest of one.
        let wire = wire.freeze();
        let (mut stream, _drain) = messages(vec![wire.slice(..5), wire.slice(5..)]);
        let (got, ended) = poll_all(&mut stream, Waker::noop());
        assert_eq!(
            got,
            vec![
                Ok(ClientMessage::Ping(Bytes::from_static(b"p"))),
                Ok(ClientMessage::Text(ByteString::from_static("hello"))),
                Ok(ClientMessage::Binary(Bytes::from_static(&[1, 2]))),
            ]
        );
        assert!(!ended);
        assert_eq!(
            stream.buf.capacity(),
            0,
            "an idle connection holds no read bytes"
        );
    }

    #[test]
    fn invalid_utf8_is_invalid_data_and_ends_the_stream() {
        let (mut stream, _drain) = messages(vec![
            frame(OpCode::Text, false, b"ok "),
            frame(OpCode::Continue, true, &[0xff, 0xfe]),
            frame(OpCode::Text, true, b"never read"),
        ]);
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut stream).poll_next(&mut cx) {
            Poll::Ready(Some(Err(ProtocolError::Io(e)))) => {
                assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            }
            other => panic!("expected an InvalidData error, got {other:?}"),
        }
        assert!(matches!(
            Pin::new(&mut stream).poll_next(&mut cx),
            Poll::Ready(None)
        ));
    }

    #[test]
    fn a_dropped_body_ends_the_stream_and_wakes_its_reader() {
        let (mut stream, drain) = messages(vec![frame(OpCode::Pong, true, b"")]);
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let (got, ended) = poll_all(&mut stream, &waker);
        assert_eq!(got, vec![Ok(ClientMessage::Pong(Bytes::new()))]);
        assert!(!ended);
        assert_eq!(counter.0.load(Ordering::SeqCst), 0);
        // The response body drops its drain when the connection ends.
        drop(drain);
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        let (got, ended) = poll_all(&mut stream, &waker);
        assert!(got.is_empty());
        assert!(ended);
    }

    #[test]
    fn the_drain_taking_over_ends_the_stream_and_wakes_its_reader() {
        use crate::outbound::InboundDrain as _;
        let (mut stream, drain) = messages(vec![]);
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        assert!(!poll_all(&mut stream, &waker).1);
        let _ = drain.poll_drain(&mut Context::from_waker(Waker::noop()));
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        assert!(poll_all(&mut stream, &waker).1);
    }
}
