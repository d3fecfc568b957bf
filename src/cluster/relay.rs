//! Remote subscriptions, the owner's side: a connection on another node subscribes to a
//! room here through a relay, a stand-in connection that is the room's member for that
//! connection and whose frames go to that node over NATS instead of to a socket.
//!
//! A relay is one [`SessionRef`] per (remote connection, this owner), with its own
//! byte-bounded [`Outbound`]. The room treats it as a subscriber in all but two things
//! (it is *relayed*, `room::messages::Subscribe::relayed`): its answer (`snapshot` or
//! `resumed`, and the member list) comes back in the reply to the subscribe request,
//! with the seq it brings the client to, and it gets no diffs: the room publishes each
//! diff once, with all its views, on the room's feed ([`super::feed`]) for as long as
//! any of its subscribers is relayed, and the connection's node fans it out
//! ([`super::mirror`]). What still travels through the relay is per connection by
//! nature: presence changes (the relay is a member, so presence is cluster-wide),
//! signals, and the room's errors (deletion). A pump drains the relay's queue and
//! publishes each frame, already encoded for the client, to
//! `{cluster}.deliver.{node}.{instance}.{session}.{owner}`, prefixed with a sequence
//! number (8 bytes, big endian, from 1) so the receiving node detects a frame NATS
//! dropped (core NATS is at-most-once) and closes that client with 4001: the client
//! resumes from the log without a gap.
//!
//! A room that ends the relay's subscription on its own (it moves or is deleted) marks
//! the relay's session evicted before it queues the `error` saying so; the pump names
//! such rooms in the [`ENDED_HEADER`] of the next frame it publishes (that `error`, or
//! a frame queued before it), so the connection's node ends the subscription there
//! before the client reads the `error`, and the room's mirror sends it nothing more.
//!
//! Overflow policy: the relay's queue has the connection's `--outbound-queue` limit; on
//! overflow the relay closes with 4001 and the pump publishes an empty frame (the
//! sequence number alone), which closes the client with 4001 too.
//!
//! Relays of a node that stopped pinging (see `remote`) for [`RELAY_EXPIRY`] are closed,
//! so a node killed with its subscribers leaves nothing behind here, and the room stops
//! publishing its feed once its last relay is gone.
//!
//! Known cost: the owner's room keeps one relay per remote subscriber in its subscriber
//! map (skipped when it fans a diff out), so a room's memory on its owner still grows
//! with its subscribers on every node; its diffs do not.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use parking_lot::Mutex;

use crate::outbound::{KillSwitch, Outbound, SessionRef};
use crate::protocol::codes::close::SLOW_CONSUMER;
use crate::protocol::codes::Code;
use crate::protocol::ids::RoomId;
use crate::protocol::{Encoding, Since};
use crate::room::messages as room_msg;
use crate::room::registry::Registry;
use crate::room::{Room, RoomError};

/// The header naming the rooms that ended the connection's subscription (one value
/// per room), on the frame numbered after them; see the module docs.
pub const ENDED_HEADER: &str = "Roomd-Ended";

/// How long a node may go without a ping before its relays here are closed.
pub const RELAY_EXPIRY: Duration = Duration::from_secs(5);

/// How long a relayed subscription's answer may take (it waits only for a creation
/// being committed).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(4);

/// Relay session ids have the top bit set: local session ids count up from 1, so the
/// two never meet in a room's subscriber map.
const RELAY_SESSION_BIT: u64 = 1 << 63;

/// Who subscribes: the remote connection as the room must see it.
#[derive(Debug, Clone)]
pub struct RemoteConn {
    /// The subject its frames go to (unique per remote connection and owner).
    pub deliver: String,
    /// `{node}.{instance}` of the node it is connected to, for expiry.
    pub node: String,
    pub user: Arc<str>,
    pub dedup: bool,
    pub encoding: Encoding,
    /// False for an SSE stream: not in presence, not counted as a subscriber.
    pub member: bool,
}

struct Relay {
    session: SessionRef,
    node: String,
    created: Instant,
    rooms: HashMap<String, Addr<Room>>,
}

/// Every relay on this owner.
pub struct Relays {
    client: async_nats::Client,
    registry: Arc<Registry>,
    queue_limit: usize,
    next_id: AtomicU64,
    /// By deliver subject.
    relays: Mutex<HashMap<String, Relay>>,
    /// Last ping per `{node}.{instance}`.
    seen: Mutex<HashMap<String, Instant>>,
}

impl Relays {
    pub fn new(
        client: async_nats::Client,
        registry: Arc<Registry>,
        queue_limit: usize,
    ) -> Arc<Relays> {
        let relays = Arc::new(Relays {
            client,
            registry,
            queue_limit,
            next_id: AtomicU64::new(1),
            relays: Mutex::default(),
            seen: Mutex::default(),
        });
        let sweeping = Arc::downgrade(&relays);
        actix_rt::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(relays) = sweeping.upgrade() else {
                    return;
                };
                relays.expire();
            }
        });
        relays
    }

    /// Subscribes `conn` to `room`: the room's answer (snapshot or resumed, and the
    /// member list); Err(None) when the room refused it (its `error` went through the
    /// relay), Err(Some) when nothing told the client (the room could not be reached or
    /// did not answer in time): the caller's reply must.
    pub async fn subscribe(
        &self,
        conn: RemoteConn,
        room: &RoomId,
        presence: bool,
        since: Option<Since>,
    ) -> Result<room_msg::Answered, Option<RoomError>> {
        let untold = |why: &str| {
            Some(RoomError::Rejected(
                Code::Unavailable,
                format!("room {room} {why}; subscribe again (with since)"),
            ))
        };
        self.seen.lock().insert(conn.node.clone(), Instant::now());
        let session = self.relay(&conn);
        let (answer_to, answer) = room_msg::RelayAnswer::new();
        let msg = room_msg::Subscribe {
            session,
            presence,
            since,
            relayed: Some(answer_to),
        };
        let mut addr = self.registry.get(room);
        let ok = match addr.send(msg.clone()).await {
            Ok(ok) => ok,
            // The room stopped between lookup and send: start it again once.
            Err(_) => {
                addr = self.registry.get(room);
                match addr.send(msg).await {
                    Ok(ok) => ok,
                    Err(_) => return Err(untold("stopped twice while subscribing")),
                }
            }
        };
        if !ok {
            return Err(None);
        }
        if let Some(relay) = self.relays.lock().get_mut(&conn.deliver) {
            relay.rooms.insert(room.to_string(), addr.clone());
        }
        // Answered at once, or once the room's creation is durable (a subscription
        // that arrived while it was being committed).
        match tokio::time::timeout(ANSWER_TIMEOUT, answer).await {
            Ok(Ok(answered)) => Ok(answered),
            // Dropped unanswered: the room sent its `error` instead (the creation failed,
            // or the room is moving).
            Ok(Err(_)) => {
                self.unsubscribe(&conn.deliver, room);
                Err(None)
            }
            Err(_) => {
                self.unsubscribe(&conn.deliver, room);
                Err(untold(&format!(
                    "did not answer within {ANSWER_TIMEOUT:?} (its creation is still being committed)"
                )))
            }
        }
    }

    /// The relay of `conn`, made (with its pump) on its first subscription.
    fn relay(&self, conn: &RemoteConn) -> SessionRef {
        let mut relays = self.relays.lock();
        if let Some(relay) = relays.get(&conn.deliver) {
            return relay.session.clone();
        }
        let outbound = Outbound::new(self.queue_limit, KillSwitch::new(None));
        let session = SessionRef {
            session_id: RELAY_SESSION_BIT | self.next_id.fetch_add(1, Ordering::Relaxed),
            user: conn.user.clone(),
            dedup: conn.dedup,
            encoding: conn.encoding,
            outbound: outbound.clone(),
            member: conn.member,
            evicted: Default::default(),
        };
        relays.insert(
            conn.deliver.clone(),
            Relay {
                session: session.clone(),
                node: conn.node.clone(),
                created: Instant::now(),
                rooms: HashMap::new(),
            },
        );
        actix_rt::spawn(pump(
            self.client.clone(),
            conn.deliver.clone(),
            outbound,
            session.evicted.clone(),
        ));
        session
    }

    /// Ends `deliver`'s subscription to `room` (`unsub`).
    pub fn unsubscribe(&self, deliver: &str, room: &str) {
        let mut relays = self.relays.lock();
        let Some(relay) = relays.get_mut(deliver) else {
            return;
        };
        if let Some(addr) = relay.rooms.remove(room) {
            // Rare lifecycle message: `do_send` is fine.
            addr.do_send(room_msg::Unsubscribe {
                session_id: relay.session.session_id,
            });
        }
    }

    /// The remote connection ended: every subscription of its relay ends.
    pub fn close(&self, deliver: &str) {
        let relay = self.relays.lock().remove(deliver);
        if let Some(relay) = relay {
            end(relay);
        }
    }

    /// A signal from the remote connection to `room`'s other members.
    pub fn signal(&self, deliver: &str, room: &str, data: crate::value::Value) {
        let relays = self.relays.lock();
        let Some(relay) = relays.get(deliver) else {
            return;
        };
        if let Some(addr) = relay.rooms.get(room) {
            // Signals are dropped first under load: a full room mailbox drops it.
            let _ = addr.try_send(room_msg::Signal {
                session_id: relay.session.session_id,
                user: relay.session.user.clone(),
                data,
            });
        }
    }

    /// A node's ping: its relays here stay.
    pub fn ping(&self, node: &str) {
        self.seen.lock().insert(node.to_owned(), Instant::now());
    }

    /// Closes the relays of nodes silent for [`RELAY_EXPIRY`].
    fn expire(&self) {
        let now = Instant::now();
        let fresh = |at: &Instant| now.duration_since(*at) < RELAY_EXPIRY;
        let mut seen = self.seen.lock();
        seen.retain(|_, at| fresh(at));
        let expired: Vec<Relay> = {
            let mut relays = self.relays.lock();
            let gone: Vec<String> = relays
                .iter()
                .filter(|(_, r)| !fresh(&r.created) && !seen.contains_key(&r.node))
                .map(|(deliver, _)| deliver.clone())
                .collect();
            gone.iter().filter_map(|d| relays.remove(d)).collect()
        };
        drop(seen);
        for relay in expired {
            tracing::info!(node = %relay.node, rooms = relay.rooms.len(), "cluster: a node stopped pinging; its subscriptions here end");
            end(relay);
        }
    }
}

fn end(relay: Relay) {
    for addr in relay.rooms.values() {
        addr.do_send(room_msg::Unsubscribe {
            session_id: relay.session.session_id,
        });
    }
    relay.session.outbound.close(1000, "");
}

/// Publishes the relay's frames, numbered, until it closes, each with the rooms that
/// ended the subscription since the last one; see the module docs.
async fn pump(
    client: async_nats::Client,
    deliver: String,
    outbound: Arc<Outbound>,
    evicted: Arc<Mutex<Vec<String>>>,
) {
    let mut seq: u64 = 0;
    while let Some(frame) = std::future::poll_fn(|cx| outbound.poll_frame(cx)).await {
        seq += 1;
        if outbound.is_closing() {
            // This is the relay's close frame, not the client's: only an overflow is
            // passed on (as the empty frame); an ended subscription says nothing.
            if outbound.sent().close_code == Some(SLOW_CONSUMER) {
                let _ = client
                    .publish(deliver.clone(), seq.to_be_bytes().to_vec().into())
                    .await;
            }
            break;
        }
        let mut payload = Vec::with_capacity(8 + frame.len());
        payload.extend_from_slice(&seq.to_be_bytes());
        payload.extend_from_slice(&frame);
        // Taken after the frame: a room marks the eviction before it queues its `error`,
        // so the mark rides on that `error` at the latest.
        let ended = std::mem::take(&mut *evicted.lock());
        // A publish fails only while NATS is away; the receiver sees the gap.
        let _ = if ended.is_empty() {
            client.publish(deliver.clone(), payload.into()).await
        } else {
            let mut headers = async_nats::HeaderMap::new();
            for room in ended {
                // Room ids are letters, digits and `_.:-`: a valid header value.
                headers.append(ENDED_HEADER, room);
            }
            client
                .publish_with_headers(deliver.clone(), headers, payload.into())
                .await
        };
    }
}
