//! The sending side of forwarded ops: a client's `op` or `create` (WebSocket or HTTP)
//! for a room this node does not own goes to the owner as an [`Request`], and the
//! owner's answer comes back as the client's `ack` or `nack`.
//!
//! Answers come back on one subscription per process
//! (`{cluster}.reply.{node}.{instance}.*`, the last token naming the request), routed to
//! the waiting request here. Every forwarded op gets exactly one answer:
//! - the owner's `ack` or `nack`;
//! - `unavailable` at once when NATS is down, when no node serves the owner's subject
//!   (the owner is not running: NATS answers "no responders"), or when this node
//!   already has [`MAX_IN_FLIGHT`] forwards waiting (the overflow policy: refuse the
//!   newest, never queue without bound; the client retries);
//! - `unavailable` after [`FORWARD_TIMEOUT`] without an answer. The op may still have
//!   been applied then (the owner was slow, or its answer was lost): a re-send with the
//!   same op id, through any node, gets the original ack.
//!
//! [`AckOrder`] keeps the contract's order: a connection's answers for one room go out
//! in the order its ops were sent, whatever order the owner's answers arrive in.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::rpc::{Forwardable, Reply, Request};
use super::Cluster;
use crate::config::ClusterSettings;
use crate::protocol::codes::Code;
use crate::protocol::ids::RoomId;
use crate::room::messages::{OpDone, ReplyTo};
use crate::room::RoomError;

/// Forwards waiting for their owner's answer on this node, all connections together.
pub const MAX_IN_FLIGHT: usize = 8_192;

/// How long a forwarded op waits for its owner's answer before it is nacked
/// `unavailable`. An ack waits for the owner's commit (an fsync under `immediate`), so
/// this is far above a healthy answer's time.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

type Answer = Result<OpDone, RoomError>;

/// Forwards waiting for an answer, by request token.
type Pending = Arc<Mutex<HashMap<u64, Waiter>>>;

/// A forward waiting for its answer.
struct Waiter {
    owner: String,
    tx: oneshot::Sender<Result<Reply, RoomError>>,
    /// The parts of an answer sent in parts (`rpc::publish_reply`) received so far,
    /// joined; freed with the waiter (answer or timeout). Bounded by
    /// `rpc::MAX_REPLY_BYTES`, and the number of waiters by [`MAX_IN_FLIGHT`].
    parts: Vec<u8>,
    /// The index of the next part expected.
    next_part: usize,
}

/// What a message on the answer subject makes of its waiter's answer.
enum Received {
    /// The whole answer is here.
    Whole(Result<Reply, RoomError>),
    /// A part of it; more are to come.
    Part,
}

/// Reads one message of a waiter's answer: the whole answer, or one part of it
/// (`{index}/{count}` in [`rpc::PART_HEADER`](super::rpc::PART_HEADER)), joined in
/// order. A part out of order (NATS lost one) fails the answer `unavailable`.
fn receive(waiter: &mut Waiter, message: &async_nats::Message) -> Received {
    let owner = &waiter.owner;
    if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
        return Received::Whole(Err(unavailable(format!(
            "node {owner}, the room's owner, is not running"
        ))));
    }
    let part = message
        .headers
        .as_ref()
        .and_then(|h| h.get(super::rpc::PART_HEADER))
        .map(|v| v.as_str().to_owned());
    let whole = match part {
        None => &message.payload[..],
        Some(part) => {
            let (index, count) = part
                .split_once('/')
                .and_then(|(i, n)| Some((i.parse::<usize>().ok()?, n.parse::<usize>().ok()?)))
                .unwrap_or((usize::MAX, 0));
            let over = waiter.parts.len() + message.payload.len() > super::rpc::MAX_REPLY_BYTES;
            if index != waiter.next_part || index >= count || over {
                return Received::Whole(Err(unavailable(format!(
                    "part {part} of the answer from node {owner} came after part {} of it: \
                     NATS lost one; retry",
                    waiter.next_part
                ))));
            }
            waiter.parts.extend_from_slice(&message.payload);
            waiter.next_part += 1;
            if waiter.next_part < count {
                return Received::Part;
            }
            &waiter.parts[..]
        }
    };
    Received::Whole(
        serde_json::from_slice::<Reply>(whole)
            .map_err(|e| unavailable(format!("unreadable answer from node {owner}: {e}"))),
    )
}

/// Sends forwarded ops and routes their answers (one per process, in [`Cluster`]).
pub struct Forwarder {
    client: async_nats::Client,
    cluster_name: String,
    /// `{cluster}.reply.{node}.{instance}`: answers arrive on `{reply_prefix}.{token}`.
    reply_prefix: String,
    pending: Pending,
    next_token: AtomicU64,
    in_flight: Arc<Semaphore>,
}

/// A forward sent and not yet answered; [`Ticket::answer`] waits for it.
pub struct Ticket {
    token: u64,
    owner: String,
    rx: oneshot::Receiver<Result<Reply, RoomError>>,
    pending: Pending,
    /// Given back when the answer (or the timeout) comes.
    _permit: OwnedSemaphorePermit,
}

fn unavailable(msg: String) -> RoomError {
    RoomError::Rejected(Code::Unavailable, msg)
}

impl Forwarder {
    /// Subscribes to this process's answers and starts routing them.
    pub async fn start(
        client: &async_nats::Client,
        settings: &ClusterSettings,
        instance: u64,
    ) -> Result<Forwarder, async_nats::SubscribeError> {
        let reply_prefix = format!(
            "{}.reply.{}.{instance:016x}",
            settings.name, settings.node_id
        );
        let mut answers = client.subscribe(format!("{reply_prefix}.*")).await?;
        let pending: Pending = Arc::default();
        let routing = pending.clone();
        actix_rt::spawn(async move {
            while let Some(message) = answers.next().await {
                let token = message
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|t| t.parse::<u64>().ok());
                let Some(token) = token else {
                    continue;
                };
                let mut pending = routing.lock();
                // None: answered after its timeout; the client already got `unavailable`.
                let Some(waiter) = pending.get_mut(&token) else {
                    continue;
                };
                if let Received::Whole(answer) = receive(waiter, &message) {
                    if let Some(waiter) = pending.remove(&token) {
                        let _ = waiter.tx.send(answer);
                    }
                }
            }
        });
        Ok(Forwarder {
            client: client.clone(),
            cluster_name: settings.name.clone(),
            reply_prefix,
            pending,
            next_token: AtomicU64::new(1),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        })
    }

    /// Publishes `request` to `owner`. Returns once the request is handed to the NATS
    /// client, so requests sent one after another reach the owner in that order; the
    /// answer is [`Ticket::answer`]. Err: refused at once (see the module docs).
    pub async fn send(&self, owner: &str, request: &Request) -> Result<Ticket, RoomError> {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            return Err(unavailable(format!(
                "{MAX_IN_FLIGHT} ops are already waiting for other nodes; retry"
            )));
        };
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(unavailable(format!(
                "NATS is unreachable, so node {owner} (the room's owner) is too"
            )));
        }
        let payload = serde_json::to_vec(request).unwrap_or_default();
        let max_payload = self.client.max_payload();
        if payload.len() > max_payload.saturating_sub(1024) {
            return Err(RoomError::Rejected(
                Code::TooLarge,
                format!(
                    "the request is {} bytes; NATS carries at most {max_payload} between nodes",
                    payload.len()
                ),
            ));
        }
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(
            token,
            Waiter {
                owner: owner.to_owned(),
                tx,
                parts: Vec::new(),
                next_part: 0,
            },
        );
        let subject = super::rpc_subject(&self.cluster_name, owner);
        let reply = format!("{}.{token}", self.reply_prefix);
        if let Err(e) = self
            .client
            .publish_with_reply(subject, reply, payload.into())
            .await
        {
            self.pending.lock().remove(&token);
            return Err(unavailable(format!("cannot reach node {owner}: {e}")));
        }
        Ok(Ticket {
            token,
            owner: owner.to_owned(),
            rx,
            pending: self.pending.clone(),
            _permit: permit,
        })
    }
}

impl Ticket {
    /// The owner's answer to an op, or `unavailable` after [`FORWARD_TIMEOUT`].
    pub async fn answer(self) -> Answer {
        self.reply().await.and_then(Reply::into_answer)
    }

    /// The owner's reply, or `unavailable` after [`FORWARD_TIMEOUT`].
    pub async fn reply(self) -> Result<Reply, RoomError> {
        match tokio::time::timeout(FORWARD_TIMEOUT, self.rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) | Err(_) => {
                self.pending.lock().remove(&self.token);
                Err(unavailable(format!(
                    "no answer from node {} (the room's owner) within {FORWARD_TIMEOUT:?}; \
                     re-send with the same id to learn the outcome",
                    self.owner
                )))
            }
        }
    }
}

/// Forwards one message to its room's owner and gives the answer to the message's
/// `ReplyTo` (the HTTP API's path: one request, one answer).
pub async fn forward_one<M: Forwardable>(cluster: &Cluster, room: &RoomId, msg: M) {
    let (request, reply) = msg.into_request(room);
    let answer = match cluster
        .forwarder()
        .send(&cluster.owner(room), &request)
        .await
    {
        Ok(ticket) => ticket.answer().await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(done) => reply.ack(done),
        Err(e) => reply.nack(e),
    }
}

/// A room's state read on its owner (`GET /api/rooms/{room}` on another node).
#[derive(Debug)]
pub struct RemoteView {
    pub kind: String,
    pub epoch: u64,
    pub seq: u64,
    /// The entries `viewer` may see, as the contract's JSON.
    pub entries: Vec<serde_json::Value>,
}

/// Reads `room`'s committed state on its owner, as `viewer` may see it.
pub async fn read(cluster: &Cluster, room: &RoomId, viewer: &str) -> Result<RemoteView, RoomError> {
    let request = Request {
        room: room.to_string(),
        user: viewer.to_owned(),
        op_id: None,
        now_ms: 0,
        what: super::rpc::What::Read,
        refusal: None,
    };
    let ticket = cluster
        .forwarder()
        .send(&cluster.owner(room), &request)
        .await?;
    match ticket.reply().await? {
        Reply::View {
            kind,
            epoch,
            seq,
            entries,
        } => Ok(RemoteView {
            kind,
            epoch,
            seq,
            entries,
        }),
        other => Err(other
            .into_answer()
            .err()
            .unwrap_or_else(|| unavailable("the owner answered a read as an op".into()))),
    }
}

/// One connection's forwarded ops awaiting answers, per room in the order sent: an
/// answer is given only once every earlier op of that room has been answered. Bounded
/// by the connection's op rate and [`MAX_IN_FLIGHT`].
#[derive(Debug, Default)]
pub struct AckOrder {
    rooms: HashMap<String, VecDeque<Waiting>>,
    next_slot: u64,
}

#[derive(Debug)]
struct Waiting {
    slot: u64,
    reply: ReplyTo,
    answer: Option<Answer>,
}

impl AckOrder {
    /// Records an op sent for `room`; its answer is later given with the returned slot.
    pub fn push(&mut self, room: &str, reply: ReplyTo) -> u64 {
        let slot = self.next_slot;
        self.next_slot += 1;
        self.rooms
            .entry(room.to_owned())
            .or_default()
            .push_back(Waiting {
                slot,
                reply,
                answer: None,
            });
        slot
    }

    /// Records the answer for `slot`, then answers, in order, every op of `room` whose
    /// turn has come.
    pub fn answer(&mut self, room: &str, slot: u64, answer: Answer) {
        let Some(queue) = self.rooms.get_mut(room) else {
            return;
        };
        if let Some(waiting) = queue.iter_mut().find(|w| w.slot == slot) {
            waiting.answer = Some(answer);
        }
        while queue.front().is_some_and(|w| w.answer.is_some()) {
            let Some(Waiting {
                reply,
                answer: Some(answer),
                ..
            }) = queue.pop_front()
            else {
                break;
            };
            match answer {
                Ok(done) => reply.ack(done),
                Err(e) => reply.nack(e),
            }
        }
        if queue.is_empty() {
            self.rooms.remove(room);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter() -> (Waiter, oneshot::Receiver<Result<Reply, RoomError>>) {
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter {
            owner: "b".into(),
            tx,
            parts: Vec::new(),
            next_part: 0,
        };
        (waiter, rx)
    }

    fn message(part: Option<&str>, payload: &[u8]) -> async_nats::Message {
        let headers = part.map(|part| {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(super::super::rpc::PART_HEADER, part);
            headers
        });
        async_nats::Message {
            subject: "r.1".into(),
            reply: None,
            payload: bytes::Bytes::copy_from_slice(payload),
            headers,
            status: None,
            description: None,
            length: payload.len(),
        }
    }

    #[test]
    fn an_answer_in_parts_is_joined_in_order_and_a_lost_part_fails_it() {
        let reply = Reply::Http {
            status: 200,
            body: Some(serde_json::json!({"entries": ["x".repeat(100)]})),
        };
        let text = serde_json::to_vec(&reply).expect("serializable");
        let thirds: Vec<&[u8]> = text.chunks(text.len().div_ceil(3)).collect();
        assert_eq!(thirds.len(), 3);

        let (mut whole, _rx) = waiter();
        assert!(
            matches!(receive(&mut whole, &message(None, &text)), Received::Whole(Ok(r)) if r == reply)
        );

        let (mut joined, _rx) = waiter();
        assert!(matches!(
            receive(&mut joined, &message(Some("0/3"), thirds[0])),
            Received::Part
        ));
        assert!(matches!(
            receive(&mut joined, &message(Some("1/3"), thirds[1])),
            Received::Part
        ));
        assert!(matches!(
            receive(&mut joined, &message(Some("2/3"), thirds[2])),
            Received::Whole(Ok(r)) if r == reply
        ));

        // Part 1 lost: part 2 fails the answer instead of joining a cut body.
        let (mut gappy, _rx) = waiter();
        assert!(matches!(
            receive(&mut gappy, &message(Some("0/3"), thirds[0])),
            Received::Part
        ));
        match receive(&mut gappy, &message(Some("2/3"), thirds[2])) {
            Received::Whole(Err(e)) => {
                assert_eq!(e.code(), Code::Unavailable);
                assert!(e.to_string().contains("NATS lost one"), "{e}");
            }
            _ => panic!("a gap must fail the answer"),
        }
    }

    #[test]
    fn answers_go_out_in_the_order_the_ops_were_sent() {
        let mut order = AckOrder::default();
        let mut receivers = Vec::new();
        let mut slots = Vec::new();
        for _ in 0..3 {
            let (tx, rx) = oneshot::channel();
            slots.push(order.push("r", ReplyTo::http(tx)));
            receivers.push(rx);
        }
        let (tx, mut other_room) = oneshot::channel();
        let other = order.push("s", ReplyTo::http(tx));
        let done = |seq| Ok(OpDone { seq, epoch: 1 });
        // The third answer first: held back behind the first two.
        order.answer("r", slots[2], done(12));
        assert!(receivers[2].try_recv().is_err());
        // Another room is not held up by this one.
        order.answer("s", other, done(5));
        assert!(matches!(
            other_room.try_recv(),
            Ok(Ok(OpDone { seq: 5, .. }))
        ));
        order.answer("r", slots[0], done(10));
        assert!(matches!(
            receivers[0].try_recv(),
            Ok(Ok(OpDone { seq: 10, .. }))
        ));
        assert!(receivers[2].try_recv().is_err());
        order.answer(
            "r",
            slots[1],
            Err(RoomError::Rejected(Code::Conflict, "if_ver".into())),
        );
        assert!(matches!(receivers[1].try_recv(), Ok(Err(_))));
        assert!(matches!(
            receivers[2].try_recv(),
            Ok(Ok(OpDone { seq: 12, .. }))
        ));
        assert!(order.rooms.is_empty());
    }
}
