//! The connection task: the only owner of the socket and of the client's state (ops in
//! flight, subscriptions and their mirrors). Handles talk to it through [`Command`]s.
//!
//! Life of the task: connect (serving commands meanwhile), run a session until the
//! connection ends, then either reconnect after a jittered backoff or end the client.
//! On every new connection it first re-subscribes every room (`since` the mirror's
//! position) and then re-sends every unanswered op, by ascending client order, with its
//! original id. Within a session it folds `snapshot`/`resumed`/`diff` into mirrors,
//! re-subscribing when a batch does not continue a mirror (a gap or another epoch).
//!
//! Architecture invariants:
//! - Nothing here waits on a subscriber: events are delivered with `try_send`
//!   (see [`EventSink`]), so one slow reader cannot stall the socket.
//! - Server data never panics the task: frames are decoded into [`Incoming`] or
//!   rejected as a protocol error, and unknown ids or rooms are ignored.
//! - Every queue is bounded: the command channel (`Options::command_buffer`), the ops
//!   in flight (a semaphore of `Options::max_in_flight` permits, each held by its op
//!   until answered) and each subscription's events (`Options::event_buffer`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use parking_lot::RwLock;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use super::codec::{self, Incoming};
use super::error::{ClientError, OpError};
use super::mirror::{Fold, Mirror};
use super::options::{Auth, Endpoint, Options};
use super::subscription::{EventSink, RoomEvent, Subscription};
use super::{backoff, Status};
use crate::protocol::codes::{close, Code};
use crate::protocol::message::{ClientMsg, WireSince, WireValue};
use crate::protocol::{Encoding, SUBPROTOCOL_JSON, SUBPROTOCOL_RKYV};
use crate::value::Value;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// After this many failed resumes in a row (the answer did not continue the mirror),
/// the next `sub` asks for a plain snapshot, which always applies.
const MAX_RESUMES: u32 = 2;

/// A subscription whose `sub` was answered `unavailable` this many times in a row ends.
const MAX_SUB_ATTEMPTS: u32 = 5;

/// How long a re-sent op nacked `rate_limited` waits before it is sent again.
const RATE_LIMITED_RETRY: Duration = Duration::from_secs(1);

/// A request from a handle to the connection task.
pub(crate) enum Command {
    Op {
        room: String,
        body: OpBody,
        /// Held until the op is answered: bounds the ops in flight.
        permit: OwnedSemaphorePermit,
        reply: oneshot::Sender<Result<u64, OpError>>,
    },
    Subscribe {
        room: String,
        presence: bool,
        reply: oneshot::Sender<Result<Subscription, ClientError>>,
    },
    Unsubscribe {
        room: String,
        sub_id: u64,
    },
    Signal {
        room: String,
        data: Value,
    },
    Close,
}

/// What an op-like request carries.
pub(crate) enum OpBody {
    Op(Value),
    Create { kind: String, init: Value },
}

/// An op or create not answered yet.
struct PendingOp {
    id: String,
    room: String,
    body: OpBody,
    reply: oneshot::Sender<Result<u64, OpError>>,
    _permit: OwnedSemaphorePermit,
    /// Sent on the current connection (guests' sent ops cannot be re-sent safely).
    sent: bool,
    /// Sent on some connection (this one or an earlier one).
    sent_before: bool,
    /// Sent on an earlier connection too. The server answers a re-send from its op-id
    /// record before rate-limiting, so a `rate_limited` nack of a re-send means it never
    /// applied; it is retried a second later rather than reported, since the caller
    /// asked for the op before the connection was lost.
    resent: bool,
}

impl PendingOp {
    fn message(&self) -> ClientMsg {
        match &self.body {
            OpBody::Op(op) => ClientMsg::Op {
                id: self.id.clone(),
                room: self.room.clone(),
                op: WireValue::from_value(op),
            },
            OpBody::Create { kind, init } => ClientMsg::Create {
                id: self.id.clone(),
                room: self.room.clone(),
                kind: kind.clone(),
                init: WireValue::from_value(init),
            },
        }
    }
}

/// One room this client subscribes to.
struct Sub {
    /// Tells this subscription from an earlier one to the same room.
    sub_id: u64,
    presence: bool,
    state: SubState,
    /// A `sub` was sent on the current connection and not answered yet.
    awaiting: bool,
    /// `sub`s sent since the last one that succeeded.
    attempts: u32,
}

enum SubState {
    /// Waiting for the first snapshot; `subscribe()` is still waiting.
    Pending {
        reply: oneshot::Sender<Result<Subscription, ClientError>>,
    },
    Live {
        mirror: Arc<RwLock<Mirror>>,
        sink: EventSink,
    },
}

/// Why a connection (or a connection attempt) ended.
enum End {
    /// Lost or closed with a code that asks for a reconnect.
    Retry(String),
    /// The client cannot go on (auth, protocol violation, …).
    Fatal(ClientError),
    /// Closed on purpose: `close()` or every handle dropped.
    Quit,
}

/// What the server said in `welcome`.
struct Welcome {
    session: String,
    user: String,
    heartbeat_ms: u64,
}

pub(crate) struct Driver {
    endpoint: Endpoint,
    options: Options,
    commands: mpsc::Receiver<Command>,
    /// For the `Subscription`s the task creates. Weak, so the channel still closes
    /// (and the task ends) once every `Client` and `Subscription` is dropped.
    weak_commands: mpsc::WeakSender<Command>,
    status: watch::Sender<Status>,
    /// Closed when the client ends, so callers waiting for an in-flight slot wake up.
    in_flight: Arc<Semaphore>,
    /// Op ids are `<id_prefix><counter>`: random per client, so ids stay unique per
    /// user across clients and process restarts.
    id_prefix: String,
    next_op: u64,
    /// Unanswered ops by client order (the order they are re-sent in).
    ops: BTreeMap<u64, PendingOp>,
    op_order: HashMap<String, u64>,
    /// When to send again the re-sent ops that were nacked `rate_limited`.
    retry_unsent_at: Option<tokio::time::Instant>,
    subs: HashMap<String, Sub>,
    next_sub_id: u64,
    connections: u64,
    /// Built at the first `wss://` attempt from `options.tls_roots`, then reused.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Driver {
    pub(crate) fn new(
        endpoint: Endpoint,
        options: Options,
        commands: mpsc::Receiver<Command>,
        weak_commands: mpsc::WeakSender<Command>,
        status: watch::Sender<Status>,
        in_flight: Arc<Semaphore>,
    ) -> Driver {
        Driver {
            endpoint,
            options,
            commands,
            weak_commands,
            status,
            in_flight,
            id_prefix: format!("{:016x}-", rand::random::<u64>()),
            next_op: 1,
            ops: BTreeMap::new(),
            op_order: HashMap::new(),
            retry_unsent_at: None,
            subs: HashMap::new(),
            next_sub_id: 1,
            connections: 0,
            tls: None,
        }
    }

    /// How to dial `url`: over TLS for `wss://`, with the configuration built once.
    fn connector(&mut self, url: &str) -> Result<Connector, ClientError> {
        if !super::tls::is_tls(url) {
            return Ok(Connector::Plain);
        }
        let config = match &self.tls {
            Some(config) => config.clone(),
            None => {
                let config =
                    super::tls::client_config(&self.options.tls_roots).map_err(ClientError::Tls)?;
                self.tls = Some(config.clone());
                config
            }
        };
        Ok(Connector::Rustls(config))
    }

    /// Runs until the client ends. `first` learns how the first connection went.
    pub(crate) async fn run(mut self, first: oneshot::Sender<Result<(), ClientError>>) {
        let mut first = Some(first);
        let mut failures: u32 = 0;
        let end = loop {
            self.status.send_replace(Status::Connecting);
            let url = self.endpoint.url();
            let connector = match self.connector(&url) {
                Ok(connector) => connector,
                Err(e) => break e,
            };
            let attempt = open(url.clone(), self.options.clone(), connector);
            let Some(opened) = self.serve_offline(attempt).await else {
                break ClientError::ClientClosed;
            };
            let why = match opened {
                Ok((ws, welcome)) => {
                    failures = 0;
                    self.connections += 1;
                    tracing::debug!(session = %welcome.session, user = %welcome.user, "roomd client connected");
                    // Before `connect` returns, so its caller sees `Connected`.
                    self.status.send_replace(Status::Connected {
                        session: welcome.session,
                        user: welcome.user,
                        connection: self.connections,
                    });
                    if let Some(first) = first.take() {
                        let _ = first.send(Ok(()));
                    }
                    let end = self.session(ws, welcome.heartbeat_ms).await;
                    self.on_disconnect();
                    match end {
                        End::Retry(why) => why,
                        End::Fatal(e) => break e,
                        End::Quit => break ClientError::ClientClosed,
                    }
                }
                // The first connection fails fast: the caller of `connect` decides.
                Err(End::Retry(reason)) if first.is_some() => {
                    break ClientError::Connect { url, reason };
                }
                Err(End::Retry(why)) => why,
                Err(End::Fatal(e)) => break e,
                Err(End::Quit) => break ClientError::ClientClosed,
            };
            failures = failures.saturating_add(1);
            if self
                .options
                .reconnect
                .max_attempts
                .is_some_and(|max| failures > max)
            {
                break ClientError::GaveUp {
                    attempts: failures - 1,
                    last: why,
                };
            }
            let delay = backoff::delay(&self.options.reconnect, failures);
            tracing::debug!(%why, ?delay, attempt = failures, "roomd client reconnecting");
            if self
                .serve_offline(tokio::time::sleep(delay))
                .await
                .is_none()
            {
                break ClientError::ClientClosed;
            }
        };
        if let Some(first) = first.take() {
            let _ = first.send(Err(end.clone()));
        }
        self.finish(end);
    }

    /// Drives `work` to completion while taking commands (queued for the next
    /// connection). `None` when the client is closed meanwhile.
    async fn serve_offline<F: std::future::Future>(&mut self, work: F) -> Option<F::Output> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return Some(out),
                command = self.commands.recv() => match command {
                    None | Some(Command::Close) => return None,
                    Some(command) => {
                        // Offline: nothing to send now, the next connection sends it.
                        let _ = self.accept(command, false);
                    }
                },
            }
        }
    }

    /// One connection from `welcome` (already announced in the status) to its end.
    async fn session(&mut self, mut ws: Ws, heartbeat_ms: u64) -> End {
        let encoding = self.options.encoding;
        // The server pings every heartbeat; this much silence means the link is dead.
        // Clamped, so that no `heartbeat_ms` a server sends can overflow a deadline.
        let heartbeat = Duration::from_millis(heartbeat_ms.min(3_600_000));
        let silence = (heartbeat * 2 + heartbeat / 2).max(Duration::from_secs(1));

        // Re-subscribe first, then re-send ops in their original order.
        let rooms: Vec<String> = self.subs.keys().cloned().collect();
        for room in rooms {
            if let Some(msg) = self.resubscribe(&room, true) {
                if let Err(end) = send(&mut ws, encoding, &msg).await {
                    return end;
                }
            }
        }
        for op in self.ops.values_mut() {
            // Not sent before means queued while offline: a first send, not a re-send.
            op.resent |= op.sent_before;
            op.sent_before = true;
            op.sent = true;
            if let Err(end) = send(&mut ws, encoding, &op.message()).await {
                return end;
            }
        }

        let quiet = tokio::time::sleep(silence);
        tokio::pin!(quiet);
        loop {
            let retry_at = self.retry_unsent_at;
            let retry = async move {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let reply = tokio::select! {
                frame = ws.next() => {
                    quiet.as_mut().reset(tokio::time::Instant::now() + silence);
                    match frame {
                        None => return End::Retry("the connection ended".into()),
                        Some(Err(e)) => return read_error(e),
                        Some(Ok(Message::Close(frame))) => {
                            return match frame {
                                Some(frame) => classify_close(u16::from(frame.code), frame.reason.as_str()),
                                None => End::Retry("closed without a code".into()),
                            };
                        }
                        Some(Ok(message)) => match Incoming::decode(&message) {
                            Ok(Some(incoming)) => self.on_incoming(incoming),
                            Ok(None) => None,
                            Err(bad) => {
                                let _ = ws.close(None).await;
                                return End::Fatal(ClientError::Protocol(format!(
                                    "undecodable server frame: {bad}"
                                )));
                            }
                        },
                    }
                }
                command = self.commands.recv() => match command {
                    None | Some(Command::Close) => {
                        // A polite close; the server's reply is not worth waiting long for.
                        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                        return End::Quit;
                    }
                    Some(command) => self.accept(command, true),
                },
                () = &mut quiet => {
                    return End::Retry(format!("nothing from the server for {silence:?}"));
                }
                () = retry => {
                    self.retry_unsent_at = None;
                    for op in self.ops.values_mut().filter(|op| !op.sent) {
                        op.sent = true;
                        if let Err(end) = send(&mut ws, encoding, &op.message()).await {
                            return end;
                        }
                    }
                    None
                }
            };
            if let Some(msg) = reply {
                if let Err(end) = send(&mut ws, encoding, &msg).await {
                    return end;
                }
            }
        }
    }

    /// Records a command; returns the frame to send now when `online`.
    fn accept(&mut self, command: Command, online: bool) -> Option<ClientMsg> {
        match command {
            Command::Op {
                room,
                body,
                permit,
                reply,
            } => {
                let n = self.next_op;
                self.next_op += 1;
                let op = PendingOp {
                    id: format!("{}{n}", self.id_prefix),
                    room,
                    body,
                    reply,
                    _permit: permit,
                    sent: online,
                    sent_before: online,
                    resent: false,
                };
                let msg = online.then(|| op.message());
                self.op_order.insert(op.id.clone(), n);
                self.ops.insert(n, op);
                msg
            }
            Command::Subscribe {
                room,
                presence,
                reply,
            } => {
                if let Some(existing) = self.subs.get(&room) {
                    let gone = match &existing.state {
                        SubState::Pending { reply } => reply.is_closed(),
                        SubState::Live { sink, .. } => sink.is_closed(),
                    };
                    if !gone {
                        let _ = reply.send(Err(ClientError::AlreadySubscribed(room)));
                        return None;
                    }
                }
                let sub_id = self.next_sub_id;
                self.next_sub_id += 1;
                self.subs.insert(
                    room.clone(),
                    Sub {
                        sub_id,
                        presence,
                        state: SubState::Pending { reply },
                        awaiting: online,
                        attempts: u32::from(online),
                    },
                );
                online.then_some(ClientMsg::Sub {
                    room,
                    presence,
                    since: None,
                })
            }
            Command::Unsubscribe { room, sub_id } => {
                if self.subs.get(&room).is_none_or(|sub| sub.sub_id != sub_id) {
                    return None;
                }
                self.subs.remove(&room);
                online.then_some(ClientMsg::Unsub { room })
            }
            Command::Signal { room, data } => {
                // Signals are ephemeral: offline, or for a room not subscribed, they
                // are dropped here rather than queued.
                let live = self
                    .subs
                    .get(&room)
                    .is_some_and(|sub| matches!(sub.state, SubState::Live { .. }));
                (online && live).then(|| ClientMsg::Signal {
                    room,
                    data: WireValue::from_value(&data),
                })
            }
            // Handled by the callers, which own the socket.
            Command::Close => None,
        }
    }

    /// The `sub` that (re)starts `room`: `since` the mirror's position while resumes
    /// keep working, else a plain `sub` (answered by a snapshot). `None` when the
    /// subscription has no holder any more (it is dropped here).
    fn resubscribe(&mut self, room: &str, fresh_connection: bool) -> Option<ClientMsg> {
        let sub = self.subs.get_mut(room)?;
        let holder_gone = match &sub.state {
            SubState::Pending { reply } => reply.is_closed(),
            SubState::Live { sink, .. } => sink.is_closed(),
        };
        if holder_gone {
            self.subs.remove(room);
            return None;
        }
        if fresh_connection {
            sub.attempts = 0;
        }
        sub.attempts += 1;
        sub.awaiting = true;
        let since = match &sub.state {
            SubState::Live { mirror, .. } if sub.attempts <= MAX_RESUMES => {
                let mirror = mirror.read();
                Some(WireSince {
                    epoch: mirror.epoch,
                    seq: mirror.seq,
                })
            }
            _ => None,
        };
        Some(ClientMsg::Sub {
            room: room.to_owned(),
            presence: sub.presence,
            since,
        })
    }

    /// Handles one server message; returns a frame to send in response, if any.
    fn on_incoming(&mut self, incoming: Incoming) -> Option<ClientMsg> {
        match incoming {
            Incoming::Welcome { .. } | Incoming::Authed => None,
            Incoming::Ack { id, seq } => {
                self.answer(&id, Ok(seq));
                None
            }
            Incoming::Nack { id, code, msg } => {
                if code == Code::RateLimited && self.hold_for_retry(&id) {
                    return None;
                }
                self.answer(&id, Err(OpError::Nack { code, msg }));
                None
            }
            Incoming::Snapshot {
                room,
                kind,
                epoch,
                seq,
                entries,
                recovered,
            } => {
                let mirror = Mirror::from_snapshot(kind, epoch, seq, entries);
                self.on_snapshot(room, mirror, recovered)
            }
            Incoming::Resumed {
                room,
                epoch,
                from,
                to,
                changes,
            } => {
                let Some(SubState::Live { mirror, .. }) = self.subs.get(&room).map(|s| &s.state)
                else {
                    return None;
                };
                let (applied, seq) = {
                    let mut mirror = mirror.write();
                    (mirror.apply(epoch, from, to, &changes), mirror.seq)
                };
                let event = match applied {
                    Fold::Continued => RoomEvent::Resumed {
                        epoch,
                        from,
                        to,
                        changes,
                    },
                    // Nothing newer than the mirror: caught up, nothing to report but that.
                    Fold::Stale => RoomEvent::Resumed {
                        epoch,
                        from: seq.saturating_add(1),
                        to: seq,
                        changes: Vec::new(),
                    },
                    Fold::Gap | Fold::EpochChanged => {
                        tracing::debug!(%room, ?applied, "resume did not continue the mirror");
                        return self.resubscribe(&room, false);
                    }
                };
                if let Some(sub) = self.subs.get_mut(&room) {
                    sub.awaiting = false;
                    sub.attempts = 0;
                }
                self.deliver(&room, event)
            }
            Incoming::Diff {
                room,
                epoch,
                from,
                to,
                changes,
            } => {
                let sub = self.subs.get(&room)?;
                let SubState::Live { mirror, .. } = &sub.state else {
                    return None;
                };
                let applied = mirror.write().apply(epoch, from, to, &changes);
                let awaiting = sub.awaiting;
                match applied {
                    Fold::Continued => self.deliver(&room, RoomEvent::Diff { from, to, changes }),
                    Fold::Stale => None,
                    // A `sub` is already on its way: its answer covers this batch.
                    Fold::Gap | Fold::EpochChanged if awaiting => None,
                    Fold::Gap | Fold::EpochChanged => {
                        tracing::debug!(%room, ?applied, from, to, "re-subscribing");
                        self.resubscribe(&room, false)
                    }
                }
            }
            Incoming::Presence { room, presence } => {
                self.deliver(&room, RoomEvent::Presence(presence))
            }
            Incoming::Signal { room, user, data } => {
                self.deliver(&room, RoomEvent::Signal { user, data })
            }
            Incoming::Error {
                code,
                room: Some(room),
                msg,
            } => self.on_room_error(room, code, msg),
            Incoming::Error {
                code,
                room: None,
                msg,
            } => {
                // Only `bad_frame` comes without a room: a bug in this client.
                tracing::warn!(code = code.as_str(), %msg, "roomd refused a frame");
                None
            }
        }
    }

    fn on_snapshot(&mut self, room: String, mirror: Mirror, recovered: bool) -> Option<ClientMsg> {
        let event_buffer = self.options.event_buffer.max(2);
        let sub = self.subs.get_mut(&room)?;
        sub.awaiting = false;
        sub.attempts = 0;
        let event = RoomEvent::Snapshot {
            epoch: mirror.epoch,
            seq: mirror.seq,
            recovered,
        };
        match &mut sub.state {
            SubState::Live { mirror: shared, .. } => {
                *shared.write() = mirror;
                self.deliver(&room, event)
            }
            SubState::Pending { .. } => {
                let Some(commands) = self.weak_commands.upgrade() else {
                    // Every handle is gone: the client is closing.
                    self.subs.remove(&room);
                    return None;
                };
                let (tx, rx) = mpsc::channel(event_buffer);
                let shared = Arc::new(RwLock::new(mirror));
                let mut sink = EventSink::new(tx);
                sink.deliver(event);
                let subscription = Subscription {
                    room: room.clone(),
                    sub_id: sub.sub_id,
                    mirror: shared.clone(),
                    events: rx,
                    commands,
                    unsubscribed: false,
                };
                let state = std::mem::replace(
                    &mut sub.state,
                    SubState::Live {
                        mirror: shared,
                        sink,
                    },
                );
                if let SubState::Pending { reply } = state {
                    // If the caller stopped waiting, the returned subscription drops
                    // here and its drop unsubscribes.
                    let _ = reply.send(Ok(subscription));
                }
                None
            }
        }
    }

    fn on_room_error(&mut self, room: String, code: Code, msg: String) -> Option<ClientMsg> {
        let sub = self.subs.get(&room)?;
        // "room restarted, subscribe again": the contract's answer to a `sub` that
        // raced a room stopping.
        if code == Code::Unavailable && sub.awaiting && sub.attempts < MAX_SUB_ATTEMPTS {
            return self.resubscribe(&room, false);
        }
        // Refusals of our `sub` end the subscription; `not_found` for a live one means
        // the room was deleted (the server unsubscribed us). Others (a signal that was
        // too large) are reported and the subscription goes on.
        let ends = code == Code::NotFound
            || (sub.awaiting
                && matches!(
                    code,
                    Code::Limit | Code::Invalid | Code::Forbidden | Code::Unavailable | Code::Gone
                ));
        if !ends {
            return self.deliver(&room, RoomEvent::Error { code, msg });
        }
        let sub = self.subs.remove(&room)?;
        match sub.state {
            SubState::Pending { reply } => {
                let _ = reply.send(Err(ClientError::Room { room, code, msg }));
            }
            SubState::Live { mut sink, .. } => {
                sink.deliver(RoomEvent::Error { code, msg });
            }
        }
        None
    }

    /// Gives `event` to the room's live subscription; a subscription whose holder is
    /// gone is dropped and unsubscribed.
    fn deliver(&mut self, room: &str, event: RoomEvent) -> Option<ClientMsg> {
        let sub = self.subs.get_mut(room)?;
        let SubState::Live { sink, .. } = &mut sub.state else {
            return None;
        };
        if sink.deliver(event) {
            return None;
        }
        self.subs.remove(room);
        Some(ClientMsg::Unsub {
            room: room.to_owned(),
        })
    }

    /// Keeps a re-sent op that was nacked `rate_limited` for a later send (see
    /// `PendingOp::resent`); false for an op sent once, whose nack is final.
    fn hold_for_retry(&mut self, id: &str) -> bool {
        let Some(op) = self.op_order.get(id).and_then(|n| self.ops.get_mut(n)) else {
            return false;
        };
        if !op.resent {
            return false;
        }
        op.sent = false;
        self.retry_unsent_at
            .get_or_insert_with(|| tokio::time::Instant::now() + RATE_LIMITED_RETRY);
        true
    }

    fn answer(&mut self, id: &str, result: Result<u64, OpError>) {
        let Some(n) = self.op_order.remove(id) else {
            return;
        };
        if let Some(op) = self.ops.remove(&n) {
            // The caller may have stopped waiting; the answer is then only dropped.
            let _ = op.reply.send(result);
        }
    }

    /// The connection is gone: what was sent on it is unanswered.
    fn on_disconnect(&mut self) {
        if self.options.auth == Auth::Guest {
            // A guest's op is not deduplicated: re-sending could apply it twice.
            let sent: Vec<u64> = self
                .ops
                .iter()
                .filter(|(_, op)| op.sent)
                .map(|(n, _)| *n)
                .collect();
            for n in sent {
                if let Some(op) = self.ops.remove(&n) {
                    self.op_order.remove(&op.id);
                    let _ = op.reply.send(Err(OpError::Interrupted));
                }
            }
        }
        for op in self.ops.values_mut() {
            op.sent = false;
        }
        self.retry_unsent_at = None;
        for sub in self.subs.values_mut() {
            sub.awaiting = false;
        }
    }

    /// The client ends: every waiter learns why, every subscription's stream ends.
    fn finish(mut self, end: ClientError) {
        tracing::debug!(%end, "roomd client ended");
        self.status.send_replace(Status::Closed(end.clone()));
        self.in_flight.close();
        self.commands.close();
        for (_, op) in std::mem::take(&mut self.ops) {
            let _ = op.reply.send(Err(OpError::Client(end.clone())));
        }
        for (_, sub) in self.subs.drain() {
            if let SubState::Pending { reply } = sub.state {
                let _ = reply.send(Err(end.clone()));
            }
        }
        // Commands still queued hold repliers; dropping them answers their callers,
        // who then read the reason from the status.
        while self.commands.try_recv().is_ok() {}
    }
}

async fn send(ws: &mut Ws, encoding: Encoding, msg: &ClientMsg) -> Result<(), End> {
    ws.send(codec::encode(msg, encoding))
        .await
        .map_err(|e| End::Retry(format!("send failed: {e}")))
}

/// What a close code asks the client to do (PROTOCOL.md "Close codes").
fn classify_close(code: u16, reason: &str) -> End {
    match code {
        close::UNAUTHORIZED => End::Fatal(ClientError::Unauthorized {
            reason: format!("closed with 4401: {reason}"),
        }),
        close::PROTOCOL_VIOLATION
        | close::TOO_LARGE
        | close::INVALID_UTF8
        | close::PROTOCOL_ERROR => End::Fatal(ClientError::Closed {
            code,
            reason: reason.to_owned(),
        }),
        // 4001 slow consumer, 4002 shutdown, 4008 heartbeat, 4429 too many
        // connections, 1000/1001 and anything unknown: come back after a backoff.
        _ => End::Retry(format!("closed with {code}: {reason}")),
    }
}

fn read_error(e: tungstenite::Error) -> End {
    match e {
        // Reconnecting would bring the same message again.
        tungstenite::Error::Capacity(e) => End::Fatal(ClientError::Protocol(format!(
            "server message over the client's limit: {e}"
        ))),
        e => End::Retry(format!("read failed: {e}")),
    }
}

/// `url` with the identity of `auth` in its query (`?user=`); tokens go in a header.
fn url_with_identity(url: &str, auth: &Auth) -> String {
    match auth {
        Auth::User(user) => {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}user={}", percent_encode(user))
        }
        Auth::Token(_) | Auth::Guest => url.to_owned(),
    }
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Connects, upgrades with the chosen subprotocol and reads the `welcome`.
async fn open(url: String, options: Options, connector: Connector) -> Result<(Ws, Welcome), End> {
    let bad_endpoint = |reason: String| {
        End::Fatal(ClientError::BadEndpoint {
            url: url.clone(),
            reason,
        })
    };
    let mut request = url_with_identity(&url, &options.auth)
        .into_client_request()
        .map_err(|e| bad_endpoint(e.to_string()))?;
    let subprotocol = match options.encoding {
        Encoding::Json => SUBPROTOCOL_JSON,
        Encoding::Rkyv => SUBPROTOCOL_RKYV,
    };
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(subprotocol),
    );
    if let Auth::Token(token) = &options.auth {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| bad_endpoint("the token is not a valid header value".into()))?;
        request.headers_mut().insert("Authorization", value);
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(options.max_message_bytes))
        .max_frame_size(Some(options.max_message_bytes));
    let handshake = async {
        let (mut ws, _response) = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(config),
            true,
            Some(connector),
        )
        .await
        .map_err(|e| connect_error(e, &url))?;
        loop {
            let message = match ws.next().await {
                None => return Err(End::Retry("closed before welcome".into())),
                Some(Err(e)) => return Err(read_error(e)),
                Some(Ok(Message::Close(Some(frame)))) => {
                    return Err(classify_close(u16::from(frame.code), frame.reason.as_str()))
                }
                Some(Ok(Message::Close(None))) => {
                    return Err(End::Retry("closed before welcome".into()))
                }
                Some(Ok(message)) => message,
            };
            match Incoming::decode(&message) {
                Ok(None) => continue,
                Ok(Some(Incoming::Welcome {
                    session,
                    user,
                    heartbeat_ms,
                })) => {
                    return Ok((
                        ws,
                        Welcome {
                            session,
                            user,
                            heartbeat_ms,
                        },
                    ))
                }
                Ok(Some(other)) => {
                    return Err(End::Fatal(ClientError::Protocol(format!(
                        "expected welcome first, got {other:?}"
                    ))))
                }
                Err(bad) => {
                    return Err(End::Fatal(ClientError::Protocol(format!(
                        "undecodable welcome: {bad}"
                    ))))
                }
            }
        }
    };
    match tokio::time::timeout(options.connect_timeout, handshake).await {
        Ok(result) => result,
        Err(_) => Err(End::Retry(format!(
            "no welcome within {:?}",
            options.connect_timeout
        ))),
    }
}

fn connect_error(e: tungstenite::Error, url: &str) -> End {
    match e {
        tungstenite::Error::Http(response) => match response.status().as_u16() {
            status @ (401 | 403) => End::Fatal(ClientError::Unauthorized {
                reason: format!("upgrade refused with HTTP {status}"),
            }),
            // 429 and 5xx are worth another try; other refusals will not change.
            status @ (429 | 500..=599) => End::Retry(format!("upgrade refused with HTTP {status}")),
            status => End::Fatal(ClientError::UpgradeRefused { status }),
        },
        tungstenite::Error::Url(e) => End::Fatal(ClientError::BadEndpoint {
            url: String::new(),
            reason: e.to_string(),
        }),
        // A TLS server answers a plaintext request with a TLS alert, which is not HTTP.
        tungstenite::Error::Protocol(e @ tungstenite::error::ProtocolError::HttparseError(_))
            if !super::tls::is_tls(url) =>
        {
            End::Fatal(ClientError::Protocol(format!(
                "upgrade failed: {e} (if the server serves TLS, use a wss:// URL)"
            )))
        }
        tungstenite::Error::Protocol(e) => {
            End::Fatal(ClientError::Protocol(format!("upgrade failed: {e}")))
        }
        e => End::Retry(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_map_to_the_contract_advice() {
        for code in [4001, 4002, 4008, 4429, 1000, 1001, 1011] {
            assert!(matches!(classify_close(code, ""), End::Retry(_)), "{code}");
        }
        assert!(matches!(
            classify_close(4401, "expired"),
            End::Fatal(ClientError::Unauthorized { .. })
        ));
        for code in [4400, 1009, 1007, 1002] {
            assert!(
                matches!(classify_close(code, ""), End::Fatal(ClientError::Closed { code: c, .. }) if c == code),
                "{code}"
            );
        }
    }

    #[test]
    fn user_ids_are_percent_encoded_into_the_query() {
        let user = Auth::User("a b&c/é".into());
        assert_eq!(
            url_with_identity("ws://h/ws", &user),
            "ws://h/ws?user=a%20b%26c%2F%C3%A9"
        );
        assert_eq!(
            url_with_identity("ws://h/ws?x=1", &Auth::User("u".into())),
            "ws://h/ws?x=1&user=u"
        );
        assert_eq!(url_with_identity("ws://h/ws", &Auth::Guest), "ws://h/ws");
    }
}
