//! The Session actor: one per WebSocket connection.
//!
//! It decodes and validates client frames, enforces the per-connection limits (bad
//! frames, op rate, subscriptions, heartbeat, token expiry), decides each request's
//! permission from the connection's [`Identity`] (once per `sub`, `op`, `create` or
//! `signal`, before anything about the room is looked at), routes requests to rooms,
//! and feeds the connection's byte-bounded [`Outbound`](crate::outbound::Outbound)
//! queue, which a writer task drains into the socket. It holds no room state: only the addresses of the rooms
//! it subscribes to.
//!
//! Requests to rooms are awaited one at a time (`ctx.wait`), so ops from one connection
//! reach each room in the order they arrived, and a client that floods requests is
//! slowed to the rooms' pace instead of growing a queue.

mod forwarding;
pub mod frame_guard;
mod heartbeat;
pub mod messages;
pub mod upgrade;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::ws::ProtocolError;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use self::frame_guard::GuardHandle;
use self::messages::ClientMessage;
use crate::auth::{Identity, Permission};
use crate::outbound::{Charge, Frame, SessionRef};
use crate::protocol::codes::{close, Code};
use crate::protocol::ids::{self, RoomId};
use crate::protocol::message::ServerMsg;
use crate::protocol::{Encoding, Inbound};
use crate::room::messages::{self as room_msg, Queued, ReplyTo};
use crate::room::registry::Delivery;
use crate::room::{Room, RoomError};
use crate::shared::Shared;
use crate::value::Value;

/// Bad frames tolerated within [`BAD_FRAME_WINDOW`]; the next one closes with 4400.
const MAX_BAD_FRAMES: usize = 10;
const BAD_FRAME_WINDOW: Duration = Duration::from_secs(60);

/// The actor owning one connection.
pub struct Session {
    /// This connection's frames; shared with every room it subscribes to.
    session: SessionRef,
    shared: Arc<Shared>,
    /// Rooms this connection subscribes to (address kept for unsubscribe on close).
    subs: HashMap<String, Addr<Room>>,
    /// The op rate limit; made at the first op (see the note after this struct).
    limiter: Option<Box<DefaultDirectRateLimiter>>,
    /// Times of recent bad frames, oldest first, at most [`MAX_BAD_FRAMES`].
    bad_frames: VecDeque<Instant>,
    /// Last time the client sent anything (a pong counts).
    last_seen: Instant,
    /// Reports a frame the guard refused (1009).
    guard: GuardHandle,
    /// Who is connected and what it may do; replaced by a token refresh (`auth`).
    identity: Identity,
    /// The timer that closes the connection with 4401 when the token expires.
    expiry: Option<SpawnHandle>,
    /// This connection's slot under the connection caps, given back when the actor ends.
    _permit: crate::admission::Permit,
    /// For the connection's log lines: the client's address (through trusted proxies),
    /// when it opened, and what it sent (frames, payload bytes).
    peer: Option<std::net::IpAddr>,
    opened: Instant,
    frames_in: u64,
    bytes_in: u64,
    /// Cluster mode: this connection's ops forwarded to other nodes, awaiting answers;
    /// made at the first forwarded op.
    forwards: Option<Box<crate::cluster::forward::AckOrder>>,
}

// Idle memory: the Session lives in every connection's actor task, so what only a busy
// client needs (the op limiter, 72 bytes; cluster mode's forwarded ops, 56) is boxed and
// made on first use, which keeps 112 bytes out of each idle connection
// (benches/README.md, "Idle connections").

impl Session {
    pub fn new(
        session: SessionRef,
        shared: Arc<Shared>,
        guard: GuardHandle,
        identity: Identity,
        permit: crate::admission::Permit,
        peer: Option<std::net::IpAddr>,
    ) -> Session {
        Session {
            session,
            limiter: None,
            shared,
            subs: HashMap::new(),
            bad_frames: VecDeque::new(),
            last_seen: Instant::now(),
            guard,
            identity,
            expiry: None,
            _permit: permit,
            peer,
            opened: Instant::now(),
            frames_in: 0,
            bytes_in: 0,
            forwards: None,
        }
    }

    /// Whether the op rate limit lets one more op through now.
    fn op_allowed(&mut self) -> bool {
        let shared = &self.shared;
        let limiter = self.limiter.get_or_insert_with(|| {
            let config = &shared.config;
            let quota = Quota::per_second(
                std::num::NonZeroU32::new(config.op_rate).unwrap_or(std::num::NonZeroU32::MIN),
            )
            .allow_burst(
                std::num::NonZeroU32::new(config.op_burst).unwrap_or(std::num::NonZeroU32::MIN),
            );
            // One clock for every session: building a clock per connection costs a CPUID
            // instruction, measured at 18% of the server's CPU in a connect storm.
            Box::new(RateLimiter::direct_with_clock(quota, shared.clock.clone()))
        });
        limiter.check().is_ok()
    }

    /// This connection's forwarded ops awaiting answers (cluster mode).
    fn forwards(&mut self) -> &mut crate::cluster::forward::AckOrder {
        self.forwards.get_or_insert_with(Default::default)
    }

    fn send(&self, msg: &ServerMsg) {
        self.session.send(msg, Charge::Full);
    }

    fn error(&self, code: Code, room: Option<&str>, msg: impl Into<String>) {
        self.send(&ServerMsg::Error {
            code,
            room: room.map(str::to_owned),
            msg: msg.into(),
        });
    }

    /// Nacks an op or create refused here, before any room saw it.
    fn nack(&self, id: String, code: Code, msg: impl Into<String>) {
        room_msg::count_op(None, Some(code));
        self.send(&ServerMsg::Nack {
            id,
            code,
            msg: msg.into(),
        });
    }

    /// Closes the connection with `code` and stops the actor.
    fn close(&mut self, ctx: &mut Context<Self>, code: u16, reason: impl Into<String>) {
        self.session.outbound.close(code, reason);
        ctx.stop();
    }

    fn bad_frame(&mut self, ctx: &mut Context<Self>, why: String) {
        let now = Instant::now();
        let bad_frames = &mut self.bad_frames;
        while bad_frames
            .front()
            .is_some_and(|t| now.duration_since(*t) > BAD_FRAME_WINDOW)
        {
            bad_frames.pop_front();
        }
        if bad_frames.len() + 1 >= MAX_BAD_FRAMES {
            return self.close(ctx, close::PROTOCOL_VIOLATION, "too many bad frames");
        }
        bad_frames.push_back(now);
        self.error(Code::BadFrame, None, why);
    }

    fn user_ref(&self) -> Arc<str> {
        self.session.user.clone()
    }

    /// The op id used for dedup: guests' ops are never deduplicated.
    fn op_key(&self, id: &str) -> Option<String> {
        self.session.dedup.then(|| id.to_owned())
    }

    fn handle_inbound(&mut self, inbound: Inbound, ctx: &mut Context<Self>) {
        for room in std::mem::take(&mut *self.session.evicted.lock()) {
            self.subs.remove(&room);
        }
        match inbound {
            Inbound::Create {
                id,
                room,
                kind,
                init,
            } => {
                if !self.identity.may(Permission::Create, &room) {
                    return self.nack(id, Code::Forbidden, "no create permission on this room");
                }
                let Some((room, rate_limited)) = self.check_op(&id, &room) else {
                    return;
                };
                let (init, refusal) = refusal_of(init, "init", rate_limited);
                let msg = room_msg::Create {
                    user: self.user_ref(),
                    op_id: self.op_key(&id),
                    kind,
                    init,
                    now_ms: room_msg::now_ms(),
                    refusal,
                    reply: ReplyTo::session(self.session.clone(), id),
                };
                self.route(ctx, room, msg);
            }
            Inbound::Op { id, room, op } => {
                if !self.identity.may(Permission::Write, &room) {
                    return self.nack(id, Code::Forbidden, "no write permission on this room");
                }
                let Some((room, rate_limited)) = self.check_op(&id, &room) else {
                    return;
                };
                let (op, refusal) = refusal_of(op, "op", rate_limited);
                let msg = room_msg::Submit {
                    user: self.user_ref(),
                    op_id: self.op_key(&id),
                    op,
                    now_ms: room_msg::now_ms(),
                    refusal,
                    reply: ReplyTo::session(self.session.clone(), id),
                };
                self.route(ctx, room, msg);
            }
            Inbound::Sub {
                room,
                presence,
                since,
            } => {
                if !self.identity.may(Permission::Read, &room) {
                    return self.error(
                        Code::Forbidden,
                        Some(&room),
                        "no read permission on this room",
                    );
                }
                let room_id = match RoomId::parse(&room) {
                    Ok(room_id) => room_id,
                    Err(e) => return self.error(Code::Invalid, Some(&room), e.to_string()),
                };
                if !self.subs.contains_key(&room)
                    && self.subs.len() + self.n_remote_subs() >= self.shared.config.max_subs
                {
                    let limit = self.shared.config.max_subs;
                    return self.error(
                        Code::Limit,
                        Some(&room),
                        format!("subscriptions limited to {limit} per connection"),
                    );
                }
                if let Some(cluster) = self.shared.cluster.clone().filter(|c| !c.owns(&room_id)) {
                    return self.sub_remote(ctx, cluster, room_id, presence, since);
                }
                let registry = self.shared.registry.clone();
                let msg = room_msg::Subscribe {
                    session: self.session.clone(),
                    presence,
                    since,
                    relayed: None,
                };
                let fut = async move {
                    let addr = registry.get(&room_id);
                    match addr.send(msg.clone()).await {
                        Ok(ok) => (addr, Ok(ok)),
                        // The room stopped between lookup and send: start it again once.
                        Err(_) => {
                            let addr = registry.get(&room_id);
                            let result = addr.send(msg).await.map_err(|_| ());
                            (addr, result)
                        }
                    }
                };
                ctx.wait(fut.into_actor(self).map(
                    move |(addr, result), session, _ctx| match result {
                        Ok(true) => {
                            session.subs.insert(room, addr);
                        }
                        Ok(false) => {
                            session.subs.remove(&room);
                        }
                        Err(()) => session.error(
                            Code::Unavailable,
                            Some(&room),
                            "room restarted, subscribe again",
                        ),
                    },
                ));
            }
            Inbound::Unsub { room } => match self.subs.remove(&room) {
                Some(addr) => {
                    // Rare, small lifecycle message: `do_send` is fine here.
                    addr.do_send(room_msg::Unsubscribe {
                        session_id: self.session.session_id,
                    });
                }
                None if self.unsub_remote(ctx, &room) => {}
                None => self.error(Code::NotFound, Some(&room), "not subscribed to this room"),
            },
            Inbound::Signal { room, data } => {
                if !self.identity.may(Permission::Write, &room) {
                    return self.error(
                        Code::Forbidden,
                        Some(&room),
                        "no write permission on this room",
                    );
                }
                let addr = self.subs.get(&room).cloned();
                if addr.is_none() && !self.is_remote_sub(&room) {
                    return self.error(
                        Code::NotFound,
                        Some(&room),
                        "signal to a room not subscribed",
                    );
                }
                let data = match data {
                    Ok(data) => data,
                    Err(why) => {
                        return self.error(Code::Invalid, Some(&room), format!("data: {why}"))
                    }
                };
                let size = data.json_size();
                let limit = self.shared.room_config.max_signal_bytes;
                if size > limit {
                    return self.error(
                        Code::TooLarge,
                        Some(&room),
                        format!("signal of {size} bytes exceeds limit of {limit}"),
                    );
                }
                let Some(addr) = addr else {
                    return self.signal_remote(ctx, &room, &data);
                };
                // Signals are dropped first under load: a full room mailbox drops it.
                let sent = addr.try_send(room_msg::Signal {
                    session_id: self.session.session_id,
                    user: self.user_ref(),
                    data,
                });
                if let Err(SendError::Full(_)) = sent {
                    crate::metrics::hot().signals_dropped_room_busy.increment(1);
                }
            }
            Inbound::Auth { token } => self.refresh(&token, ctx),
        }
    }

    /// Token refresh: a valid token for the same user replaces the connection's
    /// permissions and expiry, and each subscription it cannot read ends with `error`
    /// `forbidden` for that room. Anything else is `error` `forbidden` (no room) and the
    /// old token stays, expiring on time.
    fn refresh(&mut self, token: &str, ctx: &mut Context<Self>) {
        let identity = match self.shared.auth.verify_token(token) {
            Ok(identity) if identity.user == self.identity.user => identity,
            Ok(_) => {
                return self.error(
                    Code::Forbidden,
                    None,
                    "the token is for another user; the old token stays",
                )
            }
            Err(e) => {
                return self.error(Code::Forbidden, None, format!("{e}; the old token stays"))
            }
        };
        self.send(&ServerMsg::Authed {
            exp: identity.expires_at,
        });
        self.identity = identity;
        self.schedule_expiry(ctx);
        let lost: Vec<String> = self
            .subs
            .keys()
            .cloned()
            .chain(self.remote_rooms())
            .filter(|room| !self.identity.may(Permission::Read, room))
            .collect();
        for room in lost {
            if let Some(addr) = self.subs.remove(&room) {
                // Rare, small lifecycle message: `do_send` is fine here.
                addr.do_send(room_msg::Unsubscribe {
                    session_id: self.session.session_id,
                });
            } else {
                self.unsub_remote(ctx, &room);
            }
            self.error(
                Code::Forbidden,
                Some(&room),
                "the refreshed token cannot read this room",
            );
        }
    }

    /// (Re)arms the 4401 close at the current token's `exp`.
    fn schedule_expiry(&mut self, ctx: &mut Context<Self>) {
        if let Some(old) = self.expiry.take() {
            ctx.cancel_future(old);
        }
        if let Some(exp) = self.identity.expires_at {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.expiry = Some(ctx.run_later(
                Duration::from_secs(exp.saturating_sub(now)),
                |session, ctx| {
                    session.close(ctx, close::UNAUTHORIZED, "token expired");
                },
            ));
        }
    }

    /// Checks an op or create before it goes to a room: None when its op id or room id
    /// is bad (nacked `invalid` here), else whether it is over the rate limit. An op over the limit still
    /// goes to its room, which answers a re-sent id from its record and nacks anything
    /// else `rate_limited`: a re-send must get its original ack whatever the rate.
    fn check_op(&mut self, id: &str, room: &str) -> Option<(RoomId, Option<String>)> {
        if let Err(e) = ids::check_op_id(id) {
            // The id is echoed so the client can match the nack; it is not kept.
            self.nack(id.to_owned(), Code::Invalid, e.to_string());
            return None;
        }
        let room = match RoomId::parse(room) {
            Ok(room) => room,
            Err(e) => {
                self.nack(id.to_owned(), Code::Invalid, e.to_string());
                return None;
            }
        };
        if !self.op_allowed() {
            let (rate, burst) = (self.shared.config.op_rate, self.shared.config.op_burst);
            return Some((
                room,
                Some(format!("ops limited to {rate}/s with burst {burst}")),
            ));
        }
        Some((room, None))
    }

    /// Sends an op or a create to its room. When the room holds its most unanswered
    /// ops (`room/backlog.rs`), the session waits for a slot and reads nothing from the
    /// socket meanwhile, so TCP pushes back on the client and arrival order holds.
    /// The client's silence during the wait is the server's doing: the heartbeat's
    /// silence check counts from the wait's end (a beat queued meanwhile runs before
    /// the frames the client sent during it are read).
    fn deliver<M>(&mut self, ctx: &mut Context<Self>, room: RoomId, msg: M)
    where
        M: Message<Result = ()> + Queued + Send + 'static,
        Room: Handler<M>,
    {
        if let Delivery::Wait(wait) = self.shared.registry.deliver(&room, msg) {
            ctx.wait(
                wait.into_actor(self)
                    .map(|(), session, _| session.last_seen = Instant::now()),
            );
        }
    }
}

/// Splits a decoded op body into the value to apply and the refusal the room answers
/// unless the op id is a re-send (which gets its original ack whatever the body).
fn refusal_of(
    value: Result<Value, String>,
    what: &str,
    rate_limited: Option<String>,
) -> (Value, Option<RoomError>) {
    match (value, rate_limited) {
        (Err(why), _) => (
            Value::Null,
            Some(RoomError::Rejected(Code::Invalid, format!("{what}: {why}"))),
        ),
        (Ok(value), Some(why)) => (value, Some(RoomError::Rejected(Code::RateLimited, why))),
        (Ok(value), None) => (value, None),
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        tracing::info!(
            session = self.session.session_id,
            user = %self.session.user,
            peer = %LogPeer(self.peer),
            encoding = ?self.session.encoding,
            "connection open"
        );
        // Control messages only (heartbeats, close requests at shutdown); frames never go
        // through it.
        ctx.set_mailbox_capacity(16);
        let config = &self.shared.config;
        self.send(&ServerMsg::Welcome {
            proto: crate::protocol::PROTO_VERSION,
            session: format!("{:016x}", self.session.session_id),
            user: self.session.user.to_string(),
            heartbeat_ms: config.heartbeat.as_millis() as u64,
            max_frame: config.max_frame as u32,
        });
        heartbeat::register(ctx.address().downgrade(), config.heartbeat);
        self.schedule_expiry(ctx);
        self.shared.sessions.insert(
            self.session.session_id,
            crate::shared::LiveSession {
                user: self.session.user.clone(),
                outbound: self.session.outbound.clone(),
            },
        );
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // The one log line of a connection's end. Never the token: only who and how much.
        let sent = self.session.outbound.sent();
        tracing::info!(
            session = self.session.session_id,
            user = %self.session.user,
            peer = %LogPeer(self.peer),
            close_code = sent.close_code.map_or(-1, i32::from),
            duration_ms = self.opened.elapsed().as_millis() as u64,
            frames_in = self.frames_in,
            bytes_in = self.bytes_in,
            frames_out = sent.frames,
            bytes_out = sent.bytes,
            "connection closed"
        );
        count_close(sent.close_code);
        self.end_remote();
        for addr in self.subs.values() {
            // One per subscription when a connection ends: a rare lifecycle message.
            addr.do_send(room_msg::Unsubscribe {
                session_id: self.session.session_id,
            });
        }
        self.shared.sessions.remove(&self.session.session_id);
        // If the actor stopped for any other reason, the connection ends too.
        self.session.outbound.close(1000, "");
    }
}

impl StreamHandler<Result<ClientMessage, ProtocolError>> for Session {
    fn handle(&mut self, item: Result<ClientMessage, ProtocolError>, ctx: &mut Context<Self>) {
        self.last_seen = Instant::now();
        self.frames_in += 1;
        self.bytes_in += match &item {
            Ok(ClientMessage::Text(text)) => text.len() as u64,
            Ok(ClientMessage::Binary(bytes)) => bytes.len() as u64,
            Ok(ClientMessage::Ping(bytes) | ClientMessage::Pong(bytes)) => bytes.len() as u64,
            _ => 0,
        };
        let msg = match item {
            Ok(msg) => msg,
            Err(err) => {
                let (code, reason) =
                    upgrade::close_for(&err, &self.guard, self.shared.config.max_frame);
                return self.close(ctx, code, reason);
            }
        };
        match msg {
            ClientMessage::Text(text) => match self.session.encoding {
                Encoding::Json => match crate::protocol::json::decode(&text) {
                    Ok(inbound) => self.handle_inbound(inbound, ctx),
                    Err(bad) => self.bad_frame(ctx, bad.0),
                },
                Encoding::Rkyv => self.bad_frame(
                    ctx,
                    "this connection speaks roomd.v1.rkyv: send binary frames".into(),
                ),
            },
            ClientMessage::Binary(bytes) => match self.session.encoding {
                Encoding::Rkyv => match crate::protocol::binary::decode(&bytes) {
                    Ok(inbound) => self.handle_inbound(inbound, ctx),
                    Err(bad) => self.bad_frame(ctx, bad.0),
                },
                Encoding::Json => self.bad_frame(
                    ctx,
                    "this connection speaks roomd.v1.json: send text frames".into(),
                ),
            },
            ClientMessage::Ping(bytes) => {
                self.session.outbound.push(Frame::Pong(bytes), Charge::Full);
            }
            ClientMessage::Pong(_) => {}
            ClientMessage::Close(reason) => {
                self.close(ctx, upgrade::reply_close_code(reason.as_ref()), "");
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        if let Some(violation) = self.guard.violation() {
            return self.close(ctx, close::TOO_LARGE, violation.to_string());
        }
        ctx.stop();
    }
}

/// The client's address in a log line: the IP alone (`203.0.113.7`), or `unknown` when
/// the connection had no socket address.
struct LogPeer(Option<std::net::IpAddr>);

impl std::fmt::Display for LogPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(ip) => ip.fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

/// The `code` label values of `roomd_connections_closed_total`: the codes the server
/// sends, the codes a client's close is commonly echoed with, then `other` (any other
/// valid code a client chose) and `none` (ended without a close frame).
const CLOSE_CODES: [&str; 18] = [
    "1000", "1001", "1002", "1003", "1007", "1008", "1009", "1011", "4001", "4002", "4008", "4400",
    "4401", "4403", "4429", "3000", "other", "none",
];

/// Counts a WebSocket connection ended with `code` (None: without a close frame).
pub fn count_close(code: Option<u16>) {
    static CLOSED: std::sync::OnceLock<crate::metrics::CounterSet> = std::sync::OnceLock::new();
    let closed = CLOSED.get_or_init(|| {
        crate::metrics::CounterSet::new(
            crate::metrics::names::CONNECTIONS_CLOSED,
            CLOSE_CODES.map(|code| [("code", code)]),
        )
    });
    let known = &CLOSE_CODES[..CLOSE_CODES.len() - 2];
    let index = match code {
        None => CLOSE_CODES.len() - 1,
        Some(code) => known
            .iter()
            .position(|label| label.parse() == Ok(code))
            .unwrap_or(known.len()),
    };
    closed.get(index).increment(1);
}

impl Handler<heartbeat::Heartbeat> for Session {
    type Result = ();

    /// Once per interval: close a client silent for two intervals (4008), else ping it.
    fn handle(&mut self, _: heartbeat::Heartbeat, ctx: &mut Context<Self>) {
        if self.last_seen.elapsed() >= self.shared.config.heartbeat * 2 {
            return self.close(ctx, close::HEARTBEAT_TIMEOUT, "heartbeat timeout");
        }
        self.session.outbound.push(Frame::Ping, Charge::Full);
    }
}

/// Asks a session to close (shutdown: 4002).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseSession(pub u16, pub &'static str);

impl Handler<CloseSession> for Session {
    type Result = ();

    fn handle(&mut self, msg: CloseSession, ctx: &mut Context<Self>) {
        self.close(ctx, msg.0, msg.1);
    }
}
