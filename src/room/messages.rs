//! The messages a Room actor accepts: intents from sessions and the HTTP API.
//!
//! Replies to ops travel back through [`ReplyTo`], not through the actor response, so a
//! Room never waits on a caller and acks leave only after their commit (log before send).

use std::collections::HashMap;
use std::sync::Arc;

use actix::{Message, MessageResponse};
use actix_http::ws::OpCode;
use tokio::sync::oneshot;

use crate::outbound::{Charge, FrameRun, SessionRef};
use crate::protocol::codes::Code;
use crate::protocol::message::{ServerMsg, WireEntry};
use crate::protocol::{Encoding, Since};
use crate::value::Value;

use super::backlog::Slot;
use super::RoomError;

/// The wall-clock time an op is stamped with when it arrives, in ms since the epoch
/// (reducers get it as an argument; they never read a clock).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Who is waiting for an op's outcome. Every op gets exactly one answer: a `ReplyTo`
/// dropped unanswered (its room stopped with the message still queued) answers
/// `unavailable`, so a client never waits forever.
///
/// It also counts the answer in `roomd_ops_total`, with the room's kind once the room
/// has said it ([`ReplyTo::set_kind`]).
#[derive(Debug)]
pub struct ReplyTo {
    target: Option<Target>,
    /// The position of the room's kind in `OP_KINDS`.
    kind: Option<usize>,
    /// The op's place in its room's backlog (`backlog.rs`), given back with the answer.
    slot: Option<Slot>,
}

#[derive(Debug)]
enum Target {
    /// A WebSocket op with its client-chosen id.
    Session(SessionRef, String),
    /// An HTTP request; the sender is dropped if the request went away.
    Http(oneshot::Sender<Result<OpDone, RoomError>>),
}

/// A successful op or create.
#[derive(Debug, Clone, Copy)]
pub struct OpDone {
    pub seq: u64,
    pub epoch: u64,
}

impl ReplyTo {
    pub fn session(session: SessionRef, id: String) -> ReplyTo {
        ReplyTo {
            target: Some(Target::Session(session, id)),
            kind: None,
            slot: None,
        }
    }

    pub fn http(tx: oneshot::Sender<Result<OpDone, RoomError>>) -> ReplyTo {
        ReplyTo {
            target: Some(Target::Http(tx)),
            kind: None,
            slot: None,
        }
    }

    /// Holds the op's place in its room's backlog until the op is answered.
    pub fn hold(&mut self, slot: Slot) {
        self.slot = Some(slot);
    }

    /// The kind of the room answering, for `roomd_ops_total`.
    pub fn set_kind(&mut self, kind: &str) {
        self.kind = Some(kind_label(kind));
    }

    pub fn ack(mut self, done: OpDone) {
        if self.target.is_some() {
            count_op(self.kind, None);
        }
        match self.target.take() {
            Some(Target::Session(session, id)) => {
                session.send(&ServerMsg::Ack { id, seq: done.seq }, Charge::Full)
            }
            Some(Target::Http(tx)) => {
                // The HTTP caller may have gone away; the op stands either way.
                let _ = tx.send(Ok(done));
            }
            None => {}
        }
    }

    pub fn nack(mut self, error: RoomError) {
        self.nack_in_place(error);
    }

    /// As [`ack`](Self::ack), but a WebSocket connection's ack joins `frames`, which
    /// queues it with the connection's other replies of the batch.
    pub fn ack_into(mut self, done: OpDone, frames: &mut ReplyFrames) {
        match self.target.take() {
            Some(Target::Session(session, id)) => {
                count_op(self.kind, None);
                frames.ack(session, &id, done.seq);
            }
            target => {
                self.target = target;
                self.ack(done);
            }
        }
    }

    /// As [`nack`](Self::nack), but a WebSocket connection's nack joins `frames`.
    pub fn nack_into(mut self, error: RoomError, frames: &mut ReplyFrames) {
        match self.target.take() {
            Some(Target::Session(session, id)) => {
                count_op(self.kind, Some(error.code()));
                let msg = ServerMsg::Nack {
                    id,
                    code: error.code(),
                    msg: error.to_string(),
                };
                frames.message(session, &msg);
            }
            target => {
                self.target = target;
                self.nack(error);
            }
        }
    }

    fn nack_in_place(&mut self, error: RoomError) {
        if self.target.is_some() {
            count_op(self.kind, Some(error.code()));
        }
        match self.target.take() {
            Some(Target::Session(session, id)) => session.send(
                &ServerMsg::Nack {
                    id,
                    code: error.code(),
                    msg: error.to_string(),
                },
                Charge::Full,
            ),
            Some(Target::Http(tx)) => {
                let _ = tx.send(Err(error));
            }
            None => {}
        }
    }
}

/// The replies of one landed batch gathered per connection: each connection's acks and
/// nacks, in the order they were added, become one
/// [`Frame::Frames`](crate::outbound::Frame::Frames) queued with one push (one lock, one
/// wake, one write on the connection's thread), where each reply used to be a frame of
/// its own. [`ReplyFrames::send`] queues them; dropping it
/// unsent loses them, so callers send it before anything else goes to those
/// connections.
#[derive(Default)]
pub struct ReplyFrames {
    runs: Vec<(SessionRef, FrameRun)>,
    /// Where each connection's run is in `runs`, by session id; empty (and `runs`
    /// scanned) until more than [`SCANNED_RUNS`] connections have replies.
    index: HashMap<u64, usize>,
}

thread_local! {
    /// Where an ack is encoded before it is framed: one per room thread, reused by every
    /// batch of every room on it. One per `ReplyFrames` was an allocation per landed
    /// batch, which at 10,000 rooms is one per op.
    static ACK_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Up to this many connections per batch, finding a connection's run is a scan of the
/// runs (a batch's replies usually go to a few connections), past it a hash lookup.
const SCANNED_RUNS: usize = 16;

impl ReplyFrames {
    fn run(&mut self, session: SessionRef) -> (Encoding, &mut FrameRun) {
        let encoding = session.encoding;
        let id = session.session_id;
        let found = if self.index.is_empty() {
            self.runs.iter().position(|(s, _)| s.session_id == id)
        } else {
            self.index.get(&id).copied()
        };
        let at = match found {
            Some(at) => at,
            None => {
                self.runs.push((session, FrameRun::default()));
                let at = self.runs.len() - 1;
                if !self.index.is_empty() {
                    self.index.insert(id, at);
                } else if self.runs.len() > SCANNED_RUNS {
                    self.index = (self.runs.iter().enumerate())
                        .map(|(at, (s, _))| (s.session_id, at))
                        .collect();
                }
                at
            }
        };
        (encoding, &mut self.runs[at].1)
    }

    fn ack(&mut self, session: SessionRef, id: &str, seq: u64) {
        let (encoding, run) = self.run(session);
        ACK_SCRATCH.with_borrow_mut(|scratch| match encoding {
            Encoding::Json => {
                scratch.clear();
                crate::protocol::json::encode_ack_into(id, seq, scratch);
                run.push(OpCode::Text, scratch);
            }
            Encoding::Rkyv => {
                let msg = ServerMsg::Ack {
                    id: id.to_owned(),
                    seq,
                };
                crate::protocol::binary::encode_into(&msg, scratch);
                run.push(OpCode::Binary, scratch);
            }
        });
    }

    fn message(&mut self, session: SessionRef, msg: &ServerMsg) {
        let (encoding, run) = self.run(session);
        match encoding {
            Encoding::Json => run.push(OpCode::Text, crate::protocol::json::encode(msg).as_bytes()),
            Encoding::Rkyv => run.push(OpCode::Binary, &crate::protocol::binary::encode(msg)),
        }
    }

    /// Queues each connection's replies.
    pub fn send(self) {
        for (session, run) in self.runs {
            session.outbound.push(run.into_frame(), Charge::Full);
        }
    }
}

impl Drop for ReplyTo {
    fn drop(&mut self) {
        self.nack_in_place(RoomError::Restarted);
    }
}

/// The `kind` label values of `roomd_ops_total`: the room kinds, then `none` (refused
/// before a room of a known kind answered).
const OP_KINDS: [&str; 5] = ["chat", "poll", "state", "custom", "none"];

/// The position in `OP_KINDS` of a kind's label: an application's kinds share
/// "custom", so the label set stays bounded whatever kinds a server serves.
fn kind_label(kind: &str) -> usize {
    match kind {
        "chat" => 0,
        "poll" => 1,
        "state" => 2,
        _ => 3,
    }
}

/// Counts one answered op or create in `roomd_ops_total`: `kind` (a position in
/// `OP_KINDS`, from [`ReplyTo::set_kind`]) None when no room of a known kind saw it, `nack` None for an ack. Also called by the session and the HTTP
/// API for what they refuse before a room sees it. Registered once: an index and an
/// atomic add per op.
pub fn count_op(kind: Option<usize>, nack: Option<Code>) {
    static OPS: std::sync::OnceLock<crate::metrics::CounterSet> = std::sync::OnceLock::new();
    let results = Code::ALL.len() + 1;
    let ops = OPS.get_or_init(|| {
        let sets = OP_KINDS.iter().flat_map(|&kind| {
            std::iter::once("ack")
                .chain(Code::ALL.iter().map(|code| code.as_str()))
                .map(move |result| [("kind", kind), ("result", result)])
        });
        crate::metrics::CounterSet::new(crate::metrics::names::OPS, sets)
    });
    let kind_index = kind.unwrap_or(OP_KINDS.len() - 1);
    let result_index = nack.map_or(0, |code| code as usize + 1);
    ops.get(kind_index * results + result_index).increment(1);
}

/// Create the room (the first event). Answered through `reply`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Create {
    pub user: Arc<str>,
    /// `(user, op id)` for dedup; None for guests and HTTP callers without identity.
    pub op_id: Option<String>,
    pub kind: String,
    pub init: Value,
    pub now_ms: i64,
    /// Refused before the room saw it (over the rate, malformed body); the room still
    /// answers a re-sent op id from its record first.
    pub refusal: Option<RoomError>,
    pub reply: ReplyTo,
}

/// A message that counts against its room's backlog (`backlog.rs`): an op or a create,
/// whose place is held by its `ReplyTo` until it is answered.
pub trait Queued {
    fn reply_mut(&mut self) -> &mut ReplyTo;
}

impl Queued for Create {
    fn reply_mut(&mut self) -> &mut ReplyTo {
        &mut self.reply
    }
}

impl Queued for Submit {
    fn reply_mut(&mut self) -> &mut ReplyTo {
        &mut self.reply
    }
}

/// Apply an op. Answered through `reply`, in arrival order per caller.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Submit {
    pub user: Arc<str>,
    pub op_id: Option<String>,
    pub op: Value,
    pub now_ms: i64,
    /// As for `Create`: answered unless the id is a re-send.
    pub refusal: Option<RoomError>,
    pub reply: ReplyTo,
}

/// Subscribe a connection: answered on its outbound queue with `snapshot` or `resumed`
/// (or `error`); the result says whether the subscription now exists.
#[derive(Message, Clone)]
#[rtype(result = "bool")]
pub struct Subscribe {
    pub session: SessionRef,
    pub presence: bool,
    pub since: Option<Since>,
    /// Set for a connection on another node (a cluster relay): the answer (`snapshot`
    /// or `resumed`, and the member list) goes here instead of to `session`, and the
    /// room pushes it no diffs: its node gets them once through the room's tap
    /// (`room::tap`). Presence changes, signals and errors still go to `session`.
    pub relayed: Option<RelayAnswer>,
}

/// Where a relayed subscription's answer goes (see [`Subscribe::relayed`]). Cloneable
/// with the message; the first answer wins.
#[derive(Debug, Clone)]
pub struct RelayAnswer(Arc<parking_lot::Mutex<Option<oneshot::Sender<Answered>>>>);

/// The answer to a relayed subscription.
#[derive(Debug, Clone)]
pub struct Answered {
    /// `snapshot` or `resumed`, then the member list if presence was asked for.
    pub msgs: Vec<ServerMsg>,
    pub epoch: u64,
    /// The seq the answer brings the subscriber to: its diffs continue at `seq + 1`.
    pub seq: u64,
}

impl RelayAnswer {
    pub fn new() -> (RelayAnswer, oneshot::Receiver<Answered>) {
        let (tx, rx) = oneshot::channel();
        (RelayAnswer(Arc::new(parking_lot::Mutex::new(Some(tx)))), rx)
    }

    pub fn send(&self, answer: Answered) {
        if let Some(tx) = self.0.lock().take() {
            let _ = tx.send(answer);
        }
    }
}

/// A node that mirrors this room missed diffs after `since` (or fell behind): the
/// room sends what it holds unsent first (so the answer ends where a diff ends), then
/// answers with the changes since `since` in every distinct view.
#[derive(Message)]
#[rtype(result = "Result<CaughtUp, RoomError>")]
pub struct CatchUp {
    pub since: u64,
}

/// The answer to [`CatchUp`]: the changes of events `since + 1 ..= to`.
#[derive(Debug, Clone)]
pub struct CaughtUp {
    pub epoch: u64,
    pub to: u64,
    /// The public view first (user None), then one per user named in a changed entry's
    /// audience. A view's changes are None when they cannot be told as a diff (its
    /// viewers need a snapshot); the whole list is None when the room no longer holds
    /// the tombstones that far back.
    pub views: Option<Vec<CatchUpView>>,
}

/// One view of a catch-up: its user (None: the public view) and its changes (None: its
/// viewers need a snapshot).
pub type CatchUpView = (Option<String>, Option<Vec<WireEntry>>);

/// Remove a connection's subscription (silently: the session answers `unsub` itself).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe {
    pub session_id: u64,
}

/// The `session_id` of a signal sent by the server itself (admin API): it goes to every
/// subscriber. Session ids start at 1.
pub const SERVER_SESSION: u64 = 0;

/// An ephemeral message to the room's other subscribers.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Signal {
    /// The sender (not sent its own signal; must be a subscriber), or [`SERVER_SESSION`].
    pub session_id: u64,
    pub user: Arc<str>,
    pub data: Value,
}

/// Read the committed state (HTTP `GET /api/rooms/{room}`): the entries `viewer` may
/// see.
#[derive(Message)]
#[rtype(result = "Result<RoomView, RoomError>")]
pub struct Read {
    pub viewer: Arc<str>,
}

/// A room's committed state.
#[derive(Debug, Clone)]
pub struct RoomView {
    pub kind: String,
    pub epoch: u64,
    pub seq: u64,
    pub entries: Vec<WireEntry>,
}

/// Shutdown: how much this room holds that is not yet durable (waited on until 0); a
/// room with nothing uncommitted writes a final snapshot first.
#[derive(Message)]
#[rtype(result = "Drained")]
pub struct Drain;

/// What a room still has to make durable at shutdown.
#[derive(Debug, Clone, Copy, MessageResponse)]
pub struct Drained {
    /// Accepted ops not yet committed: shutdown waits for these.
    pub ops: usize,
    /// A final snapshot is being written: best effort within the drain deadline.
    pub snapshot: bool,
}

/// Delete the room (HTTP `DELETE`): once its uncommitted ops are committed, its log,
/// snapshots and op ids are removed, its subscribers get `error` `not_found` and are
/// unsubscribed, and it is absent (a later create gets a new epoch).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Delete {
    pub reply: oneshot::Sender<Result<(), RoomError>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: u64, encoding: Encoding) -> SessionRef {
        SessionRef {
            session_id: id,
            user: "u".into(),
            dedup: true,
            encoding,
            outbound: crate::outbound::Outbound::new(
                1 << 20,
                crate::outbound::KillSwitch::new(None),
            ),
            member: true,
            evicted: Default::default(),
        }
    }

    /// What `outbound` holds, as one byte string, and how many frames it was queued as.
    fn queued(outbound: &crate::outbound::Outbound) -> (Vec<u8>, usize) {
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let (mut bytes, mut pushes) = (Vec::new(), 0);
        while let std::task::Poll::Ready(Some(wire)) = outbound.poll_frame(&mut cx) {
            bytes.extend_from_slice(&wire);
            pushes += 1;
        }
        (bytes, pushes)
    }

    #[test]
    fn a_batch_s_replies_reach_each_connection_as_one_push_of_the_same_frames() {
        let (a, b) = (session(1, Encoding::Json), session(2, Encoding::Rkyv));
        let (a_alone, b_alone) = (session(3, Encoding::Json), session(4, Encoding::Rkyv));
        let mut frames = ReplyFrames::default();
        let done = |seq| OpDone { seq, epoch: 9 };
        ReplyTo::session(a.clone(), "a1".into()).ack_into(done(5), &mut frames);
        ReplyTo::session(b.clone(), "b1".into()).ack_into(done(6), &mut frames);
        ReplyTo::session(a.clone(), "a \"2\"".into())
            .nack_into(RoomError::Rejected(Code::Invalid, "no".into()), &mut frames);
        ReplyTo::session(a.clone(), "a3".into()).ack_into(done(7), &mut frames);
        ReplyTo::session(b.clone(), "b2".into()).ack_into(done(8), &mut frames);
        // Nothing leaves before `send`.
        assert_eq!(a.outbound.charged(), 0);
        frames.send();
        // The same replies one by one, as before.
        ReplyTo::session(a_alone.clone(), "a1".into()).ack(done(5));
        ReplyTo::session(b_alone.clone(), "b1".into()).ack(done(6));
        ReplyTo::session(a_alone.clone(), "a \"2\"".into())
            .nack(RoomError::Rejected(Code::Invalid, "no".into()));
        ReplyTo::session(a_alone.clone(), "a3".into()).ack(done(7));
        ReplyTo::session(b_alone.clone(), "b2".into()).ack(done(8));
        let (a_bytes, a_pushes) = queued(&a.outbound);
        let (b_bytes, b_pushes) = queued(&b.outbound);
        assert_eq!((a_pushes, b_pushes), (1, 1));
        assert_eq!(queued(&a_alone.outbound), (a_bytes, 3));
        assert_eq!(queued(&b_alone.outbound), (b_bytes, 2));
        // Counted as the frames they hold.
        assert_eq!(a.outbound.sent().frames, 3);
    }

    #[test]
    fn nack_codes_are_listed_in_declaration_order() {
        for (index, code) in Code::ALL.iter().enumerate() {
            assert_eq!(*code as usize, index, "{code:?}");
        }
        assert_eq!(Code::Unavailable as usize + 1, Code::ALL.len());
    }
}
