//! Remote subscriptions, the subscriber's side: this node's connections subscribed to
//! rooms other nodes own. Their diffs come from the room's mirror here
//! ([`super::mirror`], one feed per room and node); the rest (presence changes,
//! signals, the room's errors) from the owner's relay of each connection (`relay`).
//!
//! Relay frames arrive on one NATS subscription per process,
//! `{cluster}.deliver.{node}.{instance}.{session}.{owner}`, already encoded for the
//! client; each is checked against its relay's sequence number and queued to the
//! connection's outbound queue as it is. A missing number (NATS dropped a frame) or an
//! owner's overflow closes the connection with 4001, so the client resumes from the log
//! instead of missing a frame.
//!
//! A room that ends a subscription on its own (it moves or is deleted) says so through
//! the relay ([`ENDED_HEADER`], on its `error` at the latest): the subscription ends
//! here, and leaves the room's mirror, before that frame is queued, so nothing of the
//! room reaches the client between the `error` and the answer to its next `sub`, just
//! as for a local room. A subscription whose answer is still on its way when that word
//! comes is void: the client gets the `error` alone.
//!
//! Every second this node pings each owner it has subscriptions on (which also keeps
//! its relays there alive, and so the owner's feed of the room). An owner that does not
//! answer, or answers as a new process (it restarted and its relays are gone), has its
//! subscriptions here ended with `error` `unavailable` for each room: the client
//! subscribes again (with `since`) and resumes once the owner is back.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use parking_lot::Mutex;

use super::mirror::Mirrors;
use super::relay::ENDED_HEADER;
use super::rpc::{Reply, Request, What};
use super::Cluster;
use crate::outbound::{Charge, Frame, SessionRef};
use crate::protocol::codes::close::SLOW_CONSUMER;
use crate::protocol::codes::Code;
use crate::protocol::ids::RoomId;
use crate::protocol::message::ServerMsg;
use crate::protocol::{Encoding, Since};
use crate::room::RoomError;

/// Subscribes `session` (a WebSocket connection, or an SSE stream when not a
/// `member`) to `room`, owned by another node: the room's feed is joined here first,
/// then the owner is asked through the connection's relay there; its answer (`snapshot`
/// or `resumed`, and the member list) is queued to the session and its diffs follow
/// from the room's mirror. Ok(true): subscribed; Ok(false): the room refused, or ended
/// the subscription before its answer arrived here, and its `error` frame is on its way
/// through the relay; Err: the error the caller sends the client, when the node asked
/// refused without the room (it does not own the room: the member list is changing),
/// was not reached, or answered unreadably (`unavailable`).
pub async fn subscribe(
    cluster: &Cluster,
    session: &SessionRef,
    room: &RoomId,
    presence: bool,
    since: Option<Since>,
    member: bool,
) -> Result<bool, RoomError> {
    let remote = cluster.remote();
    remote.register(session);
    let owner = cluster.owner(room).to_owned();
    let request = Request {
        room: room.to_string(),
        user: session.user.to_string(),
        op_id: None,
        now_ms: 0,
        what: What::Subscribe {
            deliver: remote.deliver_subject(session.session_id, &owner),
            node: remote.node_key().to_owned(),
            dedup: session.dedup,
            rkyv: session.encoding == Encoding::Rkyv,
            presence,
            since: since.map(|s| (s.epoch, s.seq)),
            member,
        },
        refusal: None,
    };
    // The room's feed is joined before the owner is asked, so the diffs after its
    // answer reach this node.
    remote.mirrors.join(room).await;
    remote.ask(session.session_id, room, &owner);
    let reply = match cluster.forwarder().send(&owner, &request).await {
        Ok(ticket) => ticket.reply().await,
        Err(e) => Err(e),
    };
    let unavailable = |msg: String| RoomError::Rejected(Code::Unavailable, msg);
    let answered = match reply {
        Ok(Reply::Subscribed {
            instance,
            epoch,
            seq,
            frames,
        }) => frames
            .iter()
            .map(|frame| crate::client::decode_server(frame))
            .collect::<Result<Vec<ServerMsg>, _>>()
            .map(|answer| (instance, epoch, seq, answer))
            .map_err(|e| unavailable(format!("node {owner} answered unreadably: {e}"))),
        Ok(Reply::Done { ok: false, .. }) => {
            remote.unanswered(session.session_id, room);
            remote.remove_room(session.session_id, room);
            return Ok(false);
        }
        // Refused before any relay there could carry an `error`: the client hears it
        // from here.
        Ok(Reply::Nack(refusal)) => Err(refusal.into_room_error()),
        Ok(_) => Err(unavailable(format!(
            "node {owner} answered the subscription as something else"
        ))),
        Err(e) => Err(e),
    };
    match answered {
        Ok((instance, epoch, seq, answer)) => {
            Ok(remote.answered(session, room, &owner, instance, epoch, seq, &answer))
        }
        Err(e) => {
            remote.unanswered(session.session_id, room);
            Err(e)
        }
    }
}

/// How often owners are pinged (and so how soon a dead owner's subscribers hear of it).
pub const PING_INTERVAL: Duration = Duration::from_secs(1);

/// A connection with remote subscriptions.
struct Target {
    session: SessionRef,
    /// The next frame number expected from each owner's relay.
    next_seq: HashMap<String, u64>,
    /// Subscribed rooms: room -> (owner, the owner's process instance).
    rooms: HashMap<String, (String, u64)>,
    /// Subscriptions asked of their owner and not answered yet: room -> (owner, whether
    /// the owner's relay has said meanwhile that the room ended the subscription).
    asked: HashMap<String, (String, bool)>,
}

/// This node's remote subscriptions (one per process, in `Cluster`).
pub struct Remote {
    /// `{cluster}.deliver.{node}.{instance}`.
    prefix: String,
    /// `{node}.{instance}`: how owners know this process (relay expiry).
    node_key: String,
    targets: Mutex<HashMap<u64, Target>>,
    /// The rooms mirrored here, where remote subscriptions get their diffs.
    mirrors: Arc<Mirrors>,
}

impl Remote {
    /// Subscribes to this process's frames and starts routing them.
    pub async fn start(
        client: &async_nats::Client,
        cluster_name: &str,
        node: &str,
        instance: u64,
    ) -> Result<Arc<Remote>, async_nats::SubscribeError> {
        let node_key = format!("{node}.{instance:016x}");
        let prefix = format!("{cluster_name}.deliver.{node_key}");
        let mut frames = client.subscribe(format!("{prefix}.*.*")).await?;
        let remote = Arc::new(Remote {
            prefix,
            node_key,
            targets: Mutex::default(),
            mirrors: Mirrors::new(client.clone(), cluster_name.to_owned()),
        });
        let routing = Arc::downgrade(&remote);
        actix_rt::spawn(async move {
            while let Some(message) = frames.next().await {
                let Some(remote) = routing.upgrade() else {
                    return;
                };
                remote.route(&message.subject, message.headers.as_ref(), message.payload);
            }
        });
        Ok(remote)
    }

    fn route(&self, subject: &str, headers: Option<&async_nats::HeaderMap>, payload: bytes::Bytes) {
        let mut tokens = subject.rsplit('.');
        let (Some(owner), Some(session)) = (tokens.next(), tokens.next()) else {
            return;
        };
        let Ok(session_id) = session.parse::<u64>() else {
            return;
        };
        if payload.len() < 8 {
            return;
        }
        let seq = u64::from_be_bytes(payload[..8].try_into().unwrap_or([0; 8]));
        let mut targets = self.targets.lock();
        let Some(target) = targets.get_mut(&session_id) else {
            // The connection ended; its relay there is being closed.
            return;
        };
        let expected = target.next_seq.entry(owner.to_owned()).or_insert(1);
        // A relay numbers from 1: a 1 is a new relay (the owner restarted), not a gap.
        if seq != *expected && seq != 1 {
            target.session.outbound.close(
                SLOW_CONSUMER,
                format!("frames from node {owner} were lost; resume with since"),
            );
            return;
        }
        *expected = seq + 1;
        if payload.len() == 8 {
            target.session.outbound.close(
                SLOW_CONSUMER,
                "outbound queue over its limit on the room's owner",
            );
            return;
        }
        for room in headers.into_iter().flat_map(|h| h.get_all(ENDED_HEADER)) {
            let room = room.as_str();
            // Only the owner a subscription is on ends it: a late word from the old
            // owner of a moved room leaves the subscription made since on the new one.
            if target.rooms.get(room).is_some_and(|(o, _)| o == owner) {
                target.rooms.remove(room);
                self.mirrors.leave(room, session_id);
            }
            if let Some((_, ended)) = target.asked.get_mut(room).filter(|(o, _)| o == owner) {
                *ended = true;
            }
        }
        target
            .session
            .outbound
            .push(Frame::Data(payload.slice(8..)), Charge::Bulk);
    }

    /// The subject frames for `session_id` from `owner` go to.
    pub fn deliver_subject(&self, session_id: u64, owner: &str) -> String {
        format!("{}.{session_id}.{owner}", self.prefix)
    }

    /// `{node}.{instance}` of this process.
    pub fn node_key(&self) -> &str {
        &self.node_key
    }

    /// Makes `session` a receiver of frames (before its first remote subscription).
    pub fn register(&self, session: &SessionRef) {
        self.targets
            .lock()
            .entry(session.session_id)
            .or_insert_with(|| Target {
                session: session.clone(),
                next_seq: HashMap::new(),
                rooms: HashMap::new(),
                asked: HashMap::new(),
            });
    }

    /// Notes that `owner` is being asked to subscribe `session_id` to `room` (after
    /// [`Mirrors::join`]; followed by [`Remote::answered`] or [`Remote::unanswered`]).
    fn ask(&self, session_id: u64, room: &str, owner: &str) {
        if let Some(target) = self.targets.lock().get_mut(&session_id) {
            target
                .asked
                .insert(room.to_owned(), (owner.to_owned(), false));
        }
    }

    /// The owner answered the subscription: unless its relay said meanwhile that the
    /// room ended it, or the connection is gone, the answer is queued to `session`, the
    /// room's mirror gives it the diffs after `seq`, and true is returned. False: the
    /// subscription is over, and the owner's `error` told the client.
    ///
    /// Done under the lock `route` takes, so a word from the relay either finds the
    /// subscription asked or finds it in the mirror.
    #[allow(clippy::too_many_arguments)] // One answer's parts, each from the reply.
    fn answered(
        &self,
        session: &SessionRef,
        room: &str,
        owner: &str,
        instance: u64,
        epoch: u64,
        seq: u64,
        answer: &[ServerMsg],
    ) -> bool {
        let mut targets = self.targets.lock();
        let Some(target) = targets.get_mut(&session.session_id) else {
            self.mirrors.abandon(room);
            return false;
        };
        if let Some((_, true)) = target.asked.remove(room) {
            self.mirrors.abandon(room);
            return false;
        }
        self.mirrors.activate(room, session, epoch, seq, answer);
        target
            .rooms
            .insert(room.to_owned(), (owner.to_owned(), instance));
        true
    }

    /// The subscription asked with [`Remote::ask`] was not made.
    fn unanswered(&self, session_id: u64, room: &str) {
        if let Some(target) = self.targets.lock().get_mut(&session_id) {
            target.asked.remove(room);
        }
        self.mirrors.abandon(room);
    }

    /// Records a subscription the owner confirmed (without its answer: tests).
    #[cfg(test)]
    fn add_room(&self, session_id: u64, room: &str, owner: &str, instance: u64) {
        if let Some(target) = self.targets.lock().get_mut(&session_id) {
            target
                .rooms
                .insert(room.to_owned(), (owner.to_owned(), instance));
        }
    }

    /// Forgets a subscription (and its place in the room's mirror); the owner it was
    /// on, if it existed.
    pub fn remove_room(&self, session_id: u64, room: &str) -> Option<String> {
        self.mirrors.leave(room, session_id);
        let mut targets = self.targets.lock();
        let target = targets.get_mut(&session_id)?;
        target.rooms.remove(room).map(|(owner, _)| owner)
    }

    /// The rooms mirrored here.
    pub fn mirrors(&self) -> &Arc<Mirrors> {
        &self.mirrors
    }

    pub fn is_subscribed(&self, session_id: u64, room: &str) -> bool {
        self.targets
            .lock()
            .get(&session_id)
            .is_some_and(|t| t.rooms.contains_key(room))
    }

    /// The rooms a connection subscribes to remotely.
    pub fn rooms(&self, session_id: u64) -> Vec<String> {
        self.targets
            .lock()
            .get(&session_id)
            .map_or_else(Vec::new, |t| t.rooms.keys().cloned().collect())
    }

    /// Remote subscriptions of a connection.
    pub fn count(&self, session_id: u64) -> usize {
        self.targets
            .lock()
            .get(&session_id)
            .map_or(0, |t| t.rooms.len())
    }

    /// The connection ended: forgotten here; the owners it had relays on are returned
    /// (to be told).
    pub fn drop_session(&self, session_id: u64) -> Vec<String> {
        let Some(target) = self.targets.lock().remove(&session_id) else {
            return Vec::new();
        };
        for room in target.rooms.keys() {
            self.mirrors.leave(room, session_id);
        }
        target.next_seq.into_keys().collect()
    }

    /// The owners this process has relays on (to ping).
    pub fn owners(&self) -> HashSet<String> {
        self.targets
            .lock()
            .values()
            .flat_map(|t| t.next_seq.keys().chain(t.rooms.values().map(|(o, _)| o)))
            .cloned()
            .collect()
    }

    /// `owner` answered a ping as process `alive` (None: it did not answer): the
    /// subscriptions made on another process of it are gone, and their clients are told.
    pub fn owner_is(&self, owner: &str, alive: Option<u64>) {
        let mut targets = self.targets.lock();
        for target in targets.values_mut() {
            let lost: Vec<String> = target
                .rooms
                .iter()
                .filter(|(_, (o, instance))| o == owner && Some(*instance) != alive)
                .map(|(room, _)| room.clone())
                .collect();
            if lost.is_empty() {
                continue;
            }
            target.next_seq.remove(owner);
            for room in lost {
                target.rooms.remove(&room);
                self.mirrors.leave(&room, target.session.session_id);
                target.session.send(
                    &ServerMsg::Error {
                        code: Code::Unavailable,
                        room: Some(room.clone()),
                        msg: format!(
                            "node {owner}, the room's owner, is down or restarted; \
                             subscribe again (with since) to resume"
                        ),
                    },
                    Charge::Full,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::{KillSwitch, Outbound};
    use crate::protocol::Encoding;

    /// A Remote whose NATS client never connects (nothing here publishes).
    async fn remote() -> Remote {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("127.0.0.1:1")
            .await
            .expect("retry_on_initial_connect returns at once");
        Remote {
            prefix: "c.deliver.a.1".into(),
            node_key: "a.1".into(),
            targets: Mutex::default(),
            mirrors: Mirrors::new(client, "c".into()),
        }
    }

    fn session(id: u64) -> SessionRef {
        SessionRef {
            session_id: id,
            user: "u".into(),
            dedup: true,
            encoding: Encoding::Json,
            outbound: Outbound::new(1 << 20, KillSwitch::new(None)),
            member: true,
            evicted: Default::default(),
        }
    }

    fn numbered(seq: u64, frame: &[u8]) -> bytes::Bytes {
        let mut payload = seq.to_be_bytes().to_vec();
        payload.extend_from_slice(frame);
        payload.into()
    }

    #[tokio::test]
    async fn a_lost_frame_or_an_owner_overflow_closes_with_4001() {
        let remote = remote().await;
        let (gappy, overflowed) = (session(1), session(2));
        remote.register(&gappy);
        remote.register(&overflowed);
        remote.route("c.deliver.a.1.1.b", None, numbered(1, b"one"));
        remote.route("c.deliver.a.1.1.b", None, numbered(2, b"two"));
        assert_eq!(gappy.outbound.charged(), 6);
        assert!(!gappy.outbound.is_closing());
        // Frames from another owner are numbered on their own.
        remote.route("c.deliver.a.1.1.c", None, numbered(1, b"x"));
        assert!(!gappy.outbound.is_closing());
        // 3 is missing.
        remote.route("c.deliver.a.1.1.b", None, numbered(4, b"four"));
        assert_eq!(gappy.outbound.sent().close_code, Some(SLOW_CONSUMER));

        remote.route("c.deliver.a.1.2.b", None, numbered(1, b"one"));
        remote.route("c.deliver.a.1.2.b", None, numbered(2, b""));
        assert_eq!(overflowed.outbound.sent().close_code, Some(SLOW_CONSUMER));
    }

    fn ended(rooms: &[&str]) -> async_nats::HeaderMap {
        let mut headers = async_nats::HeaderMap::new();
        for room in rooms {
            headers.append(ENDED_HEADER, *room);
        }
        headers
    }

    #[tokio::test]
    async fn a_subscription_its_owner_says_ended_ends_here_before_the_frame_is_queued() {
        let remote = remote().await;
        let conn = session(1);
        remote.register(&conn);
        remote.add_room(1, "r1", "b", 7);
        remote.add_room(1, "r2", "c", 9);
        // A word from b about a room subscribed on c (b owned it before a move): ignored.
        remote.route(
            "c.deliver.a.1.1.b",
            Some(&ended(&["r2"])),
            numbered(1, b"x"),
        );
        assert!(remote.is_subscribed(1, "r2"));
        remote.route(
            "c.deliver.a.1.1.b",
            Some(&ended(&["r1"])),
            numbered(2, b"error"),
        );
        assert!(!remote.is_subscribed(1, "r1"));
        assert_eq!(conn.outbound.charged(), 1 + 5, "both frames are passed on");
        assert_eq!(remote.rooms(1), vec!["r2".to_owned()]);

        // A subscription being answered when the word comes is void; one that is not,
        // is made.
        remote.ask(1, "r3", "c");
        remote.ask(1, "r4", "c");
        remote.route(
            "c.deliver.a.1.1.c",
            Some(&ended(&["r3"])),
            numbered(1, b"error"),
        );
        assert!(!remote.answered(&conn, "r3", "c", 9, 7, 4, &[]));
        assert!(remote.answered(&conn, "r4", "c", 9, 7, 4, &[]));
        assert!(!remote.is_subscribed(1, "r3"));
        assert!(remote.is_subscribed(1, "r4"));
        // Nothing is left asked: a later word about r3 or r4 from c ends only r4.
        remote.route(
            "c.deliver.a.1.1.c",
            Some(&ended(&["r3", "r4"])),
            numbered(2, b"e"),
        );
        assert_eq!(remote.rooms(1), vec!["r2".to_owned()]);
        assert!(remote.targets.lock()[&1].asked.is_empty());
    }

    #[tokio::test]
    async fn an_owner_restarted_or_gone_ends_its_subscriptions_with_unavailable() {
        let remote = remote().await;
        let conn = session(1);
        remote.register(&conn);
        remote.add_room(1, "r1", "b", 7);
        remote.add_room(1, "r2", "c", 9);
        remote.owner_is("b", Some(7));
        assert!(remote.is_subscribed(1, "r1"));
        assert_eq!(conn.outbound.charged(), 0);
        remote.owner_is("b", Some(8));
        assert!(!remote.is_subscribed(1, "r1"));
        assert!(conn.outbound.charged() > 0, "the client is told");
        assert!(remote.is_subscribed(1, "r2"));
        remote.owner_is("c", None);
        assert_eq!(remote.count(1), 0);
        assert_eq!(remote.drop_session(1), Vec::<String>::new());
    }
}
