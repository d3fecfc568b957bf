//! Requests between nodes: the wire of a forwarded op or create, and the owner's side
//! that runs them through its normal room path. The requests of remote subscriptions
//! (subscribe, unsubscribe, signal, close, ping) travel the same way and are answered
//! by the owner's relays (`relay`); the HTTP API's other calls (time travel, events,
//! delete, signal, presence, each node's own rooms) travel as [`What::Call`] and are
//! answered by the HTTP API's code on the owner ([`Calls`], handed in at startup);
//! the catch-ups of nodes that missed part of a room's feed (`mirror`) are answered
//! by the room.
//!
//! A request that reaches a node that does not own its room (the nodes route by two
//! member lists: between two nodes' commits of a rebalance, or after one that did not
//! reach every node) is refused `unavailable` ([`not_owned`]), whatever it is: an op is
//! nacked, a subscription or a read refused, so the client always hears an answer and
//! retries as for a moving room. Only a subscription the room itself refused is
//! answered [`Reply::Done`] `false`: the room's `error` went to the client through
//! its relay.
//!
//! A reply larger than the NATS server's `max_payload` goes in numbered parts
//! ([`publish_reply`]); the sender joins them or fails the call `unavailable` when
//! one is lost, so a body is never cut short. A request larger than `max_payload` is
//! refused `too_large` before it is sent.
//!
//! A node that does not own a room sends the room's owner a [`Request`] on
//! `{cluster}.node.{owner}.rpc` ([`super::forward`] does that); the owner hands it to
//! the room as an ordinary `Submit` or `Create`, so its op-id window, its commit and its
//! ordering apply unchanged (a re-send through another node gets the original ack), and
//! answers with a [`Reply`] once the room has answered (after the commit: log before
//! send). Both are JSON: small, and readable with `nats sub` when something goes wrong.
//!
//! The owner reads its requests in arrival order and hands each to its room before it
//! reads the next, so ops from one connection (published in order on one NATS
//! connection) reach their room in order. A room that holds its most unanswered ops
//! (`room/backlog.rs`) therefore holds up this node's requests for other rooms until
//! one of them is answered; that is the same back-pressure a local connection meets,
//! shared by the node (every room's commits go through the one store writer, so when
//! one room is that far behind the others mostly are too). Requests NATS could
//! not hand over while this loop waits are buffered by the NATS client (65,536 messages
//! per subscription); past that NATS drops them, and their senders time out with
//! `unavailable` (see `forward::FORWARD_TIMEOUT`).

use std::sync::Arc;

use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::relay::{Relays, RemoteConn};
use super::{Cluster, ClusterError};
use crate::protocol::codes::Code;
use crate::protocol::ids::RoomId;
use crate::protocol::{Encoding, Since};
use crate::room::messages::{self as room_msg, OpDone, ReplyTo};
use crate::room::registry::Registry;
use crate::room::{Room, RoomError};

/// A forwarded op or create: everything the owner's room needs, and nothing of the
/// client's connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    pub room: String,
    pub user: String,
    /// The client's op id (None for guests: never deduplicated).
    pub op_id: Option<String>,
    /// When the op arrived at the node the client is connected to (ms since 1970).
    pub now_ms: i64,
    pub what: What,
    /// Refused before it was forwarded (over the rate, malformed); the owner still
    /// answers a re-sent op id from its record first.
    pub refusal: Option<WireError>,
}

/// What a [`Request`] asks of the room.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum What {
    /// An op, as the JSON of the contract (`$b64` for bytes).
    Submit {
        op: serde_json::Value,
    },
    Create {
        kind: String,
        init: serde_json::Value,
    },
    /// Subscribe a remote connection (`relay`): its frames go to `deliver`.
    Subscribe {
        deliver: String,
        /// `{node}.{instance}` of the subscriber's node.
        node: String,
        dedup: bool,
        rkyv: bool,
        presence: bool,
        /// `since` as the client sent it (None: no `since`).
        since: Option<(Option<u64>, Option<u64>)>,
        /// False for an SSE stream (not a room member); absent (older nodes): true.
        #[serde(default = "member_default")]
        member: bool,
    },
    Unsubscribe {
        deliver: String,
    },
    /// The remote connection ended.
    Close {
        deliver: String,
    },
    Signal {
        deliver: String,
        data: serde_json::Value,
    },
    /// A subscriber's node is alive (`remote`); answered with this process's instance.
    Ping {
        node: String,
    },
    /// A node mirroring the room missed diffs after `since` (`mirror`): answered with
    /// [`Reply::CaughtUp`].
    CatchUp {
        since: u64,
    },
    /// `GET /api/rooms/{room}` for `user` (the viewer): answered with [`Reply::View`].
    Read,
    /// Any other HTTP call of the room's owner (time travel, events, delete, signal,
    /// presence) or of every node (its own rooms for the cluster-wide list, the admin
    /// disconnect of a user's connections), for `user`.
    /// What `call` holds is the HTTP API's business ([`Calls`] answers it there): this
    /// module only carries it.
    Call {
        call: serde_json::Value,
    },
}

fn member_default() -> bool {
    true
}

/// A refusal's contract code and message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WireError {
    pub code: String,
    pub msg: String,
}

/// The owner's answer to a [`Request`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ack {
        seq: u64,
        epoch: u64,
    },
    Nack(WireError),
    /// The answer to the requests of remote subscriptions: whether it worked, and
    /// which process of the owner answered.
    Done {
        ok: bool,
        instance: u64,
    },
    /// A remote subscription made: its answer (`snapshot` or `resumed`, then the
    /// member list if asked for), each as the contract's JSON, and the epoch and seq it
    /// brings the subscriber to; the subscriber's diffs come from the room's feed.
    Subscribed {
        instance: u64,
        epoch: u64,
        seq: u64,
        frames: Vec<String>,
    },
    /// The changes since a catch-up's `since`, up to `to`: each view's `diff` as the
    /// contract's JSON, public first (user None); a view None needs a snapshot; `views`
    /// None when the room's history no longer reaches back.
    CaughtUp {
        epoch: u64,
        to: u64,
        views: Option<Vec<(Option<String>, Option<String>)>>,
    },
    /// A room's committed state as `user` may see it (entries as the contract's JSON).
    View {
        kind: String,
        epoch: u64,
        seq: u64,
        entries: Vec<serde_json::Value>,
    },
    /// The answer to a [`What::Call`]: the HTTP status and body the owner's HTTP API
    /// gave (no body for a 204). Refusals travel as [`Reply::Nack`].
    Http {
        status: u16,
        body: Option<serde_json::Value>,
    },
}

/// Answers [`What::Call`] requests on this node. The HTTP API implements it (it sits
/// above this module in the codemap, so the owner's side of its calls is handed in at
/// startup rather than called from here).
pub trait Calls: 'static {
    /// The reply to `call` for `user` about `room` (empty for calls about no room).
    fn answer(
        &self,
        room: String,
        user: String,
        call: serde_json::Value,
    ) -> LocalBoxFuture<'static, Reply>;
}

impl WireError {
    pub fn of(error: &RoomError) -> WireError {
        WireError {
            code: error.code().as_str().to_owned(),
            msg: error.to_string(),
        }
    }

    /// The refusal as the room error it stands for (same code, same message); an
    /// unknown code (a newer node) is `unavailable`.
    pub fn into_room_error(self) -> RoomError {
        let code = Code::from_name(&self.code).unwrap_or(Code::Unavailable);
        RoomError::Rejected(code, self.msg)
    }
}

impl Reply {
    pub fn of(answer: &Result<OpDone, RoomError>) -> Reply {
        match answer {
            Ok(done) => Reply::Ack {
                seq: done.seq,
                epoch: done.epoch,
            },
            Err(e) => Reply::Nack(WireError::of(e)),
        }
    }

    pub fn into_answer(self) -> Result<OpDone, RoomError> {
        match self {
            Reply::Ack { seq, epoch } => Ok(OpDone { seq, epoch }),
            Reply::Nack(e) => Err(e.into_room_error()),
            Reply::Done { .. }
            | Reply::View { .. }
            | Reply::Http { .. }
            | Reply::Subscribed { .. }
            | Reply::CaughtUp { .. } => Err(RoomError::Rejected(
                Code::Unavailable,
                "the owner answered an op as something else".into(),
            )),
        }
    }
}

/// A room message that can be forwarded: split into the request for the owner and the
/// `ReplyTo` the owner's answer is given to.
pub trait Forwardable: Sized {
    fn into_request(self, room: &RoomId) -> (Request, ReplyTo);
}

impl Forwardable for room_msg::Submit {
    fn into_request(self, room: &RoomId) -> (Request, ReplyTo) {
        let request = Request {
            room: room.to_string(),
            user: self.user.to_string(),
            op_id: self.op_id,
            now_ms: self.now_ms,
            what: What::Submit {
                op: crate::protocol::json::from_value(&self.op),
            },
            refusal: self.refusal.as_ref().map(WireError::of),
        };
        (request, self.reply)
    }
}

impl Forwardable for room_msg::Create {
    fn into_request(self, room: &RoomId) -> (Request, ReplyTo) {
        let request = Request {
            room: room.to_string(),
            user: self.user.to_string(),
            op_id: self.op_id,
            now_ms: self.now_ms,
            what: What::Create {
                kind: self.kind,
                init: crate::protocol::json::from_value(&self.init),
            },
            refusal: self.refusal.as_ref().map(WireError::of),
        };
        (request, self.reply)
    }
}

/// Serves this node's requests (`{cluster}.node.{id}.rpc`) for as long as the NATS
/// connection lives; see the module docs for the order and the bounds. `queue_limit`
/// bounds each remote connection's relay like a local connection's queue; `calls`
/// answers the HTTP API's other calls.
pub async fn serve(
    cluster: Arc<Cluster>,
    registry: Arc<Registry>,
    queue_limit: usize,
    calls: Arc<dyn Calls>,
) -> Result<(), ClusterError> {
    let subject = super::rpc_subject(&cluster.settings().name, cluster.node_id());
    let mut requests = cluster.client().subscribe(subject).await?;
    // Subscribed at the server before this node says it listens: a forward sent once
    // it is up finds it.
    cluster.client().flush().await?;
    let relays = Relays::new(cluster.client().clone(), registry.clone(), queue_limit);
    super::feed::start(
        cluster.client().clone(),
        cluster.settings().name.clone(),
        &registry,
    );
    actix_rt::spawn(async move {
        while let Some(message) = requests.next().await {
            let Some(reply_to) = message.reply.clone() else {
                continue;
            };
            let answer = match serde_json::from_slice::<Request>(&message.payload) {
                Ok(request) => match request.what {
                    What::Submit { .. } | What::Create { .. } => {
                        Answer::Later(run(&cluster, &registry, request).await)
                    }
                    What::Read => Answer::Now(read(&cluster, &registry, request).await),
                    // Answered beside this loop: a call may read the store for a while.
                    What::Call { call } => {
                        Answer::Task(calls.answer(request.room, request.user, call))
                    }
                    What::CatchUp { since } => {
                        Answer::Now(catch_up(&cluster, &registry, &request.room, since).await)
                    }
                    _ => Answer::Now(control(&cluster, &relays, request).await),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: unreadable request refused");
                    Answer::Now(Reply::Nack(WireError {
                        code: Code::Invalid.as_str().into(),
                        msg: format!("unreadable cluster request: {e}"),
                    }))
                }
            };
            let client = cluster.client().clone();
            actix_rt::spawn(async move {
                let reply = match answer {
                    // The room drops its `ReplyTo` only by answering `unavailable`.
                    Answer::Later(rx) => Reply::of(&rx.await.unwrap_or(Err(RoomError::Restarted))),
                    Answer::Now(reply) => reply,
                    Answer::Task(task) => task.await,
                };
                // A lost reply times out at the sender (`unavailable`); a re-send of the
                // op id is then answered from the room's record.
                publish_reply(&client, reply_to, &reply).await;
            });
        }
    });
    Ok(())
}

/// A request's answer: now, once its room has answered, or once a call is done.
enum Answer {
    Now(Reply),
    Later(oneshot::Receiver<Result<OpDone, RoomError>>),
    Task(LocalBoxFuture<'static, Reply>),
}

/// The header of a reply sent in parts: `{index}/{count}`, from `0/{count}`.
pub const PART_HEADER: &str = "Roomd-Part";

/// Room for the headers and framing NATS counts against `max_payload` besides the
/// payload itself.
const HEADROOM: usize = 4 * 1024;

/// The largest reply sent at all (in parts): a room holds at most 64 MiB, and its
/// entries as JSON (`$b64` bytes, keys and versions) stay well below this.
pub const MAX_REPLY_BYTES: usize = 256 * 1024 * 1024;

/// Sends `reply` to `reply_to`. A reply larger than the NATS server's `max_payload`
/// (1 MiB by default: a big room's state or a page of large events) goes in parts of at
/// most that size, numbered in [`PART_HEADER`] and published in order on this one
/// connection, which NATS keeps in order; the sender joins them (`forward`), and a lost
/// part fails the whole call `unavailable` there, never a truncated body. A reply over
/// [`MAX_REPLY_BYTES`] is refused `too_large` instead.
pub async fn publish_reply(
    client: &async_nats::Client,
    reply_to: async_nats::Subject,
    reply: &Reply,
) {
    let mut payload = serde_json::to_vec(reply).unwrap_or_default();
    if payload.len() > MAX_REPLY_BYTES {
        let refused = Reply::Nack(WireError {
            code: Code::TooLarge.as_str().into(),
            msg: format!(
                "the answer is {} bytes, over the {MAX_REPLY_BYTES} a node sends another",
                payload.len()
            ),
        });
        payload = serde_json::to_vec(&refused).unwrap_or_default();
    }
    let part_bytes = client.max_payload().saturating_sub(HEADROOM).max(HEADROOM);
    if payload.len() <= part_bytes {
        let _ = client.publish(reply_to, payload.into()).await;
        return;
    }
    let payload = bytes::Bytes::from(payload);
    let count = payload.len().div_ceil(part_bytes);
    for index in 0..count {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(PART_HEADER, format!("{index}/{count}"));
        let end = ((index + 1) * part_bytes).min(payload.len());
        let part = payload.slice(index * part_bytes..end);
        if client
            .publish_with_headers(reply_to.clone(), headers, part)
            .await
            .is_err()
        {
            // The sender times out (`unavailable`) without the rest.
            return;
        }
    }
}

/// Why this node refuses a request about `room`, which it does not own by its member
/// list (`unavailable`: the client retries, as for a moving room).
pub fn not_owned(cluster: &Cluster, room: &RoomId) -> RoomError {
    RoomError::Rejected(
        Code::Unavailable,
        format!(
            "node {} does not own room {room} (its member list gives it to node {}): the \
             nodes' member lists differ while `roomd cluster rebalance` commits a new one; \
             retry in a moment (same op id, or sub with since)",
            cluster.node_id(),
            cluster.owner(room)
        ),
    )
}

/// The requests of remote subscriptions, answered by the relays.
async fn control(cluster: &Cluster, relays: &Relays, request: Request) -> Reply {
    let instance = cluster.instance();
    let done = |ok| Reply::Done { ok, instance };
    let refused = |e: RoomError| Reply::Nack(WireError::of(&e));
    match request.what {
        What::Subscribe {
            deliver,
            node,
            dedup,
            rkyv,
            presence,
            since,
            member,
        } => {
            // Refused here, the subscription has no relay to carry an `error`: the
            // refusal is the reply, and the subscriber's node tells the client.
            let room = match RoomId::parse(&request.room) {
                Ok(room) if cluster.owns(&room) => room,
                Ok(room) => return refused(not_owned(cluster, &room)),
                Err(e) => return refused(RoomError::Rejected(Code::Invalid, e.to_string())),
            };
            let conn = RemoteConn {
                deliver,
                node,
                user: request.user.into(),
                dedup,
                encoding: if rkyv { Encoding::Rkyv } else { Encoding::Json },
                member,
            };
            let since = since.map(|(epoch, seq)| Since { epoch, seq });
            match relays.subscribe(conn, &room, presence, since).await {
                Ok(answered) => Reply::Subscribed {
                    instance,
                    epoch: answered.epoch,
                    seq: answered.seq,
                    frames: answered
                        .msgs
                        .iter()
                        .map(crate::protocol::json::encode)
                        .collect(),
                },
                // The room's `error` is on its way through the relay.
                Err(None) => done(false),
                Err(Some(e)) => refused(e),
            }
        }
        What::Unsubscribe { deliver } => {
            relays.unsubscribe(&deliver, &request.room);
            done(true)
        }
        What::Close { deliver } => {
            relays.close(&deliver);
            done(true)
        }
        What::Signal { deliver, data } => {
            if let Ok(data) = crate::protocol::json::to_value(&data) {
                relays.signal(&deliver, &request.room, data);
            }
            done(true)
        }
        What::Ping { node } => {
            relays.ping(&node);
            done(true)
        }
        What::Submit { .. }
        | What::Create { .. }
        | What::Read
        | What::Call { .. }
        | What::CatchUp { .. } => done(false),
    }
}

/// A catch-up for a node whose feed of `room` has a gap after `since`.
async fn catch_up(cluster: &Cluster, registry: &Arc<Registry>, room: &str, since: u64) -> Reply {
    let refused = |e: RoomError| Reply::Nack(WireError::of(&e));
    let room = match RoomId::parse(room) {
        Ok(room) if cluster.owns(&room) => room,
        Ok(room) => return refused(not_owned(cluster, &room)),
        Err(e) => return refused(RoomError::Rejected(Code::Invalid, e.to_string())),
    };
    let result = match registry.get(&room).send(room_msg::CatchUp { since }).await {
        Ok(result) => result,
        Err(_) => registry
            .get(&room)
            .send(room_msg::CatchUp { since })
            .await
            .unwrap_or(Err(RoomError::Restarted)),
    };
    match result {
        Ok(caught_up) => {
            let diff = |changes| {
                crate::protocol::json::encode(&crate::protocol::message::ServerMsg::Diff {
                    room: room.to_string(),
                    epoch: caught_up.epoch,
                    from: since + 1,
                    to: caught_up.to,
                    changes,
                })
            };
            Reply::CaughtUp {
                epoch: caught_up.epoch,
                to: caught_up.to,
                views: caught_up.views.map(|views| {
                    views
                        .into_iter()
                        .map(|(user, changes)| (user, changes.map(diff)))
                        .collect()
                }),
            }
        }
        Err(e) => refused(e),
    }
}

/// A forwarded `GET /api/rooms/{room}`: the room's committed state for the viewer.
async fn read(cluster: &Cluster, registry: &Arc<Registry>, request: Request) -> Reply {
    let refused = |e: RoomError| Reply::Nack(WireError::of(&e));
    let room = match RoomId::parse(&request.room) {
        Ok(room) if cluster.owns(&room) => room,
        Ok(room) => return refused(not_owned(cluster, &room)),
        Err(e) => return refused(RoomError::Rejected(Code::Invalid, e.to_string())),
    };
    let read = || room_msg::Read {
        viewer: request.user.as_str().into(),
    };
    let result = match registry.get(&room).send(read()).await {
        Ok(result) => result,
        // The room stopped between lookup and send: start it again once.
        Err(_) => registry
            .get(&room)
            .send(read())
            .await
            .unwrap_or(Err(RoomError::Restarted)),
    };
    match result {
        Ok(view) => Reply::View {
            kind: view.kind,
            epoch: view.epoch,
            seq: view.seq,
            entries: view
                .entries
                .iter()
                .map(crate::protocol::json::entry_json)
                .collect(),
        },
        Err(e) => refused(e),
    }
}

/// Hands one request to its room (waiting while the room holds its most unanswered
/// ops); the receiver gets the room's answer.
async fn run(
    cluster: &Cluster,
    registry: &Arc<Registry>,
    request: Request,
) -> oneshot::Receiver<Result<OpDone, RoomError>> {
    let (tx, rx) = oneshot::channel();
    let reply = ReplyTo::http(tx);
    let room = match RoomId::parse(&request.room) {
        Ok(room) => room,
        Err(e) => {
            reply.nack(RoomError::Rejected(Code::Invalid, e.to_string()));
            return rx;
        }
    };
    if !cluster.owns(&room) {
        reply.nack(not_owned(cluster, &room));
        return rx;
    }
    let refusal = request.refusal.map(WireError::into_room_error);
    let user: Arc<str> = request.user.into();
    match request.what {
        What::Submit { op } => {
            let (op, refusal) = value_of(&op, "op", refusal);
            let msg = room_msg::Submit {
                user,
                op_id: request.op_id,
                op,
                now_ms: request.now_ms,
                refusal,
                reply,
            };
            deliver(registry, &room, msg).await;
        }
        What::Create { kind, init } => {
            let (init, refusal) = value_of(&init, "init", refusal);
            let msg = room_msg::Create {
                user,
                op_id: request.op_id,
                kind,
                init,
                now_ms: request.now_ms,
                refusal,
                reply,
            };
            deliver(registry, &room, msg).await;
        }
        // Answered by `control`.
        _ => reply.nack(RoomError::Rejected(Code::Invalid, "not an op".into())),
    }
    rx
}

/// The value of a forwarded body; one that does not read back (a sender's bug) is a
/// refusal, after any refusal the sender already made.
fn value_of(
    json: &serde_json::Value,
    what: &str,
    refusal: Option<RoomError>,
) -> (crate::value::Value, Option<RoomError>) {
    match crate::protocol::json::to_value(json) {
        Ok(value) => (value, refusal),
        Err(why) => (
            crate::value::Value::Null,
            refusal.or(Some(RoomError::Rejected(
                Code::Invalid,
                format!("{what}: {why}"),
            ))),
        ),
    }
}

/// Sends an op or a create to its room, starting the room if it stopped meanwhile, and
/// waiting while the room holds its most unanswered ops (`room/backlog.rs`); a message
/// that cannot be delivered answers `unavailable` through its `ReplyTo`.
async fn deliver<M>(registry: &Arc<Registry>, room: &RoomId, msg: M)
where
    M: actix::Message<Result = ()> + crate::room::messages::Queued + Send + 'static,
    Room: actix::Handler<M>,
{
    if let crate::room::registry::Delivery::Wait(wait) = registry.deliver(room, msg) {
        wait.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_read_back_as_written() {
        let request = Request {
            room: "poll:lunch".into(),
            user: "alice".into(),
            op_id: Some("c2".into()),
            now_ms: 1_767_225_600_000,
            what: What::Submit {
                op: serde_json::json!({"type": "vote", "option": 1, "blob": {"$b64": "AAE="}}),
            },
            refusal: Some(WireError {
                code: "rate_limited".into(),
                msg: "ops limited".into(),
            }),
        };
        let bytes = serde_json::to_vec(&request).expect("serializable");
        assert_eq!(
            serde_json::from_slice::<Request>(&bytes).expect("readable"),
            request
        );
        let refused = Reply::of(&Err(RoomError::Rejected(Code::Conflict, "if_ver".into())));
        match refused.into_answer() {
            Err(e) => {
                assert_eq!(e.code(), Code::Conflict);
                assert_eq!(e.to_string(), "if_ver");
            }
            Ok(done) => panic!("a nack read back as {done:?}"),
        }
        let unknown = WireError {
            code: "from_the_future".into(),
            msg: "?".into(),
        };
        assert_eq!(unknown.into_room_error().code(), Code::Unavailable);
        let acked = Reply::of(&Ok(OpDone { seq: 58, epoch: 7 })).into_answer();
        assert!(matches!(acked, Ok(OpDone { seq: 58, epoch: 7 })));
    }
}
