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
/// from the room's mirror. Ok(true): subscribed; Ok(false): the owner refused, and its
/// `error` frame is on its way through the relay; Err: the owner was not reached or
/// answered unreadably (`unavailable`).
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
    let reply = match cluster.forwarder().send(&owner, &request).await {
        Ok(ticket) => ticket.reply().await,
        Err(e) => Err(e),
    };
    let unavailable = |msg: String| RoomError::Rejected(Code::Unavailable, msg);
    let (instance, epoch, seq, frames) = match reply {
        Ok(Reply::Subscribed {
            instance,
            epoch,
            seq,
            frames,
        }) => (instance, epoch, seq, frames),
        Ok(Reply::Done { ok: false, .. }) => {
            remote.mirrors.abandon(room);
            remote.remove_room(session.session_id, room);
            return Ok(false);
        }
        Ok(_) => {
            remote.mirrors.abandon(room);
            return Err(unavailable(format!(
                "node {owner} answered the subscription as something else"
            )));
        }
        Err(e) => {
            remote.mirrors.abandon(room);
            return Err(e);
        }
    };
    let answer: Result<Vec<ServerMsg>, _> = frames
        .iter()
        .map(|frame| crate::client::decode_server(frame))
        .collect();
    match answer {
        Ok(answer) => {
            remote.mirrors.activate(room, session, epoch, seq, &answer);
            remote.add_room(session.session_id, room, &owner, instance);
            Ok(true)
        }
        Err(e) => {
            remote.mirrors.abandon(room);
            Err(unavailable(format!(
                "node {owner} answered unreadably: {e}"
            )))
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
                remote.route(&message.subject, message.payload);
            }
        });
        Ok(remote)
    }

    fn route(&self, subject: &str, payload: bytes::Bytes) {
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
            });
    }

    /// Records a subscription the owner confirmed.
    pub fn add_room(&self, session_id: u64, room: &str, owner: &str, instance: u64) {
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
        remote.route("c.deliver.a.1.1.b", numbered(1, b"one"));
        remote.route("c.deliver.a.1.1.b", numbered(2, b"two"));
        assert_eq!(gappy.outbound.charged(), 6);
        assert!(!gappy.outbound.is_closing());
        // Frames from another owner are numbered on their own.
        remote.route("c.deliver.a.1.1.c", numbered(1, b"x"));
        assert!(!gappy.outbound.is_closing());
        // 3 is missing.
        remote.route("c.deliver.a.1.1.b", numbered(4, b"four"));
        assert_eq!(gappy.outbound.sent().close_code, Some(SLOW_CONSUMER));

        remote.route("c.deliver.a.1.2.b", numbered(1, b"one"));
        remote.route("c.deliver.a.1.2.b", numbered(2, b""));
        assert_eq!(overflowed.outbound.sent().close_code, Some(SLOW_CONSUMER));
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
