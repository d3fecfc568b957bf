//! The messages a Room actor accepts: intents from sessions and the HTTP API.
//!
//! Replies to ops travel back through [`ReplyTo`], not through the actor response, so a
//! Room never waits on a caller and acks leave only after their commit (log before send).

use std::sync::Arc;

use actix::{Message, MessageResponse};
use tokio::sync::oneshot;

use crate::outbound::{Charge, SessionRef};
use crate::protocol::codes::Code;
use crate::protocol::message::{ServerMsg, WireEntry};
use crate::protocol::Since;
use crate::value::Value;

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
        }
    }

    pub fn http(tx: oneshot::Sender<Result<OpDone, RoomError>>) -> ReplyTo {
        ReplyTo {
            target: Some(Target::Http(tx)),
            kind: None,
        }
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

    #[test]
    fn nack_codes_are_listed_in_declaration_order() {
        for (index, code) in Code::ALL.iter().enumerate() {
            assert_eq!(*code as usize, index, "{code:?}");
        }
        assert_eq!(Code::Unavailable as usize + 1, Code::ALL.len());
    }
}
