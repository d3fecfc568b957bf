//! Mirrors: this node's copy of the diff stream of each room owned elsewhere that some
//! of its connections subscribe to, fanned out to them here.
//!
//! A node joins a room's feed ([`super::feed`], `{cluster}.room.{hex id}`) once,
//! however many of its connections subscribe to the room, and leaves it with the last
//! one. Each subscriber's `snapshot` or `resumed` comes from the owner (the answer to
//! its relayed subscription, see [`super::relay`]), with the seq it brings the
//! subscriber to; from then on the subscriber gets, from the mirror, every fed diff
//! whose `from` is its last `to` + 1, in the view for its user (the public one unless
//! the diff has a view of that user's own), encoded here once per view and encoding.
//!
//! Gaps: core NATS is at-most-once, and the owner's tap drops under overload
//! (`room::tap`), so a diff may never arrive. A subscriber whose next seq is not where
//! the next buffered diff starts is stuck: the node asks the owner for a catch-up (the
//! changes since the subscriber's last seq, in every view, `room::messages::CatchUp`)
//! and delivers it as one diff before anything later; diffs keep being buffered
//! meanwhile. When the owner cannot fill the gap (it is down, the view needs a
//! snapshot, the room was recreated, no answer within the forwarder's timeout), the
//! affected clients are closed with 4001 and
//! resume from the log with `since`. One catch-up per room is in flight at a time.
//!
//! Bounds: a mirror keeps the last [`MAX_RECENT`] diffs, at most [`MAX_RECENT_BYTES`]
//! of them (so a subscriber whose answer arrives after the diffs that follow it still
//! gets them); older ones are dropped, and a subscriber that needed one catches up as
//! above. The NATS client buffers at
//! most 65,536 messages per subscription before it drops: a gap again, caught up.
//! A subscriber's outbound queue overflowing closes it with 4001, as for local rooms.
//!
//! The owner pushes a relayed subscriber no diff; presence, signals and the room's
//! errors (deletion, moving) still come through its relay, one per connection, and a
//! subscription such an error ends leaves the mirror before the client reads it
//! ([`super::remote`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;

use super::feed::{self, Fed};
use super::rpc::{Reply, Request, What};
use super::Cluster;
use crate::outbound::{encode, Charge, Frame, Pushed, SessionRef};
use crate::protocol::codes::close::SLOW_CONSUMER;
use crate::protocol::message::ServerMsg;
use crate::protocol::Encoding;

/// Fed diffs a mirror keeps for subscribers whose answer is still on its way...
pub const MAX_RECENT: usize = 256;

/// ...and the most bytes (as fed) they may hold together; the newest is always kept.
pub const MAX_RECENT_BYTES: usize = 8 << 20;

/// How long joining a feed waits for NATS to confirm the subscription.
const JOIN_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Every mirror of this process (one per room with local subscribers owned elsewhere).
pub struct Mirrors {
    client: async_nats::Client,
    cluster: String,
    /// The node's cluster, for catch-ups (they go through its forwarder, which joins
    /// an answer sent in parts); set once the cluster exists.
    node: OnceLock<Weak<Cluster>>,
    rooms: Mutex<HashMap<String, Arc<Mutex<Mirror>>>>,
}

/// One room's mirror.
struct Mirror {
    room: String,
    /// Reads the room's feed; aborted (which unsubscribes) when the mirror goes.
    reader: Option<tokio::task::JoinHandle<()>>,
    /// The reader is being started (the NATS subscription is on its way).
    starting: bool,
    /// Subscriptions asked of the owner and not answered yet: the mirror stays for them.
    joining: usize,
    subs: HashMap<u64, Sub>,
    /// The epoch of the buffered diffs.
    epoch: Option<u64>,
    /// The last fed diffs, by `from`.
    recent: BTreeMap<u64, Arc<Batch>>,
    /// The fed bytes of `recent`.
    recent_bytes: usize,
    /// The `since` of the catch-up in flight.
    catching_up: Option<u64>,
}

impl Drop for Mirror {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
    }
}

/// One local subscriber of a mirrored room.
struct Sub {
    session: SessionRef,
    /// The epoch of its answer: a diff of another epoch means the room was recreated.
    epoch: u64,
    /// The seq its next diff must start at.
    next: u64,
}

/// A diff as fed (or as a catch-up), with its views.
pub struct Batch {
    pub epoch: u64,
    pub from: u64,
    pub to: u64,
    views: Vec<View>,
    /// Its size as fed (0 for a catch-up, which is never buffered).
    bytes: usize,
}

/// One view of a batch, encoded at most once per encoding.
struct View {
    user: Option<String>,
    /// None: this view cannot be told as a diff (its viewers need a snapshot).
    msg: Option<ServerMsg>,
    /// The rkyv encoding as fed, when it came from the feed.
    rkyv: Option<Bytes>,
    frames: [OnceLock<Frame>; 2],
}

impl View {
    fn new(user: Option<String>, msg: Option<ServerMsg>, rkyv: Option<Bytes>) -> View {
        View {
            user,
            msg,
            rkyv,
            frames: [OnceLock::new(), OnceLock::new()],
        }
    }

    fn frame(&self, encoding: Encoding) -> Option<Frame> {
        let msg = self.msg.as_ref()?;
        let slot = match encoding {
            Encoding::Json => 0,
            Encoding::Rkyv => 1,
        };
        let frame = self.frames[slot].get_or_init(|| match (encoding, &self.rkyv) {
            (Encoding::Rkyv, Some(rkyv)) => Frame::binary(rkyv.clone()),
            _ => encode(msg, encoding),
        });
        Some(frame.clone())
    }
}

impl Batch {
    /// The view `user` gets: its own if the batch has one, else the public one.
    fn view_of(&self, user: &str) -> Option<&View> {
        self.views
            .iter()
            .find(|v| v.user.as_deref() == Some(user))
            .or_else(|| self.views.iter().find(|v| v.user.is_none()))
    }
}

/// What a mirror decided about a subscriber that cannot go on.
enum Fate {
    /// Closed with 4001 (it resumes from the log), for this reason.
    Close(&'static str),
    /// Its queue overflowed or closed: already closing.
    Gone,
}

impl Mirror {
    /// Delivers what each subscriber can get from the buffered diffs; returns the
    /// `since` a catch-up is needed for (the oldest stuck subscriber's), if any.
    fn advance(&mut self) -> Option<u64> {
        let mut stuck: Option<u64> = None;
        let mut fates = Vec::new();
        let mut delivered = 0;
        for (id, sub) in &mut self.subs {
            loop {
                let next = sub.next;
                let covering = self
                    .recent
                    .range(..=next)
                    .next_back()
                    .map(|(_, b)| b)
                    .filter(|b| b.to >= next);
                let Some(batch) =
                    covering.or_else(|| self.recent.range(next + 1..).next().map(|(_, b)| b))
                else {
                    break;
                };
                if batch.epoch != sub.epoch {
                    fates.push((*id, Fate::Close("the room was deleted and created again")));
                    break;
                }
                if batch.from > next {
                    let since = next - 1;
                    stuck = Some(stuck.map_or(since, |s| s.min(since)));
                    break;
                }
                if batch.from < next {
                    // Answers and catch-ups end where a diff ends: never seen.
                    fates.push((*id, Fate::Close("a diff overlapped the last one")));
                    break;
                }
                match deliver(sub, batch) {
                    Ok(()) => delivered += 1,
                    Err(fate) => {
                        fates.push((*id, fate));
                        break;
                    }
                }
            }
        }
        crate::metrics::count_deliveries(delivered);
        self.end(fates);
        stuck.filter(|_| self.catching_up.is_none())
    }

    fn end(&mut self, fates: Vec<(u64, Fate)>) {
        for (id, fate) in fates {
            if let Some(sub) = self.subs.remove(&id) {
                if let Fate::Close(why) = fate {
                    sub.session.outbound.close(
                        SLOW_CONSUMER,
                        format!("room {}: {why}; resume with since", self.room),
                    );
                }
            }
        }
    }

    /// Buffers a fed diff, dropping the oldest past [`MAX_RECENT`] or
    /// [`MAX_RECENT_BYTES`] (a subscriber that needed one catches up).
    fn buffer(&mut self, batch: Batch) {
        if self.epoch != Some(batch.epoch) {
            self.clear_recent();
            self.epoch = Some(batch.epoch);
        }
        self.recent_bytes += batch.bytes;
        if let Some(replaced) = self.recent.insert(batch.from, Arc::new(batch)) {
            self.recent_bytes -= replaced.bytes;
        }
        while self.recent.len() > MAX_RECENT
            || (self.recent_bytes > MAX_RECENT_BYTES && self.recent.len() > 1)
        {
            if let Some((_, dropped)) = self.recent.pop_first() {
                self.recent_bytes -= dropped.bytes;
            }
        }
    }

    fn clear_recent(&mut self) {
        self.recent.clear();
        self.recent_bytes = 0;
    }

    fn is_unused(&self) -> bool {
        self.subs.is_empty() && self.joining == 0
    }
}

/// Queues a batch's view to one subscriber and moves it on.
fn deliver(sub: &mut Sub, batch: &Batch) -> Result<(), Fate> {
    let frame = batch
        .view_of(&sub.session.user)
        .and_then(|view| view.frame(sub.session.encoding))
        .ok_or(Fate::Close("the missed diffs need a snapshot"))?;
    match sub.session.outbound.push(frame, Charge::Bulk) {
        Pushed::Overflowed | Pushed::Closed => Err(Fate::Gone),
        Pushed::Queued | Pushed::Dropped => {
            sub.next = batch.to + 1;
            Ok(())
        }
    }
}

impl Mirrors {
    pub fn new(client: async_nats::Client, cluster: String) -> Arc<Mirrors> {
        Arc::new(Mirrors {
            client,
            cluster,
            node: OnceLock::new(),
            rooms: Mutex::default(),
        })
    }

    /// Called once the node's cluster exists.
    pub fn set_cluster(&self, cluster: Weak<Cluster>) {
        let _ = self.node.set(cluster);
    }

    fn mirror(&self, room: &str) -> Option<Arc<Mutex<Mirror>>> {
        self.rooms.lock().get(room).cloned()
    }

    /// A connection is about to ask the owner to subscribe it to `room`: the room's feed
    /// is joined first (if this node has not yet), so the diffs after the owner's
    /// answer are not missed. Every `join` is followed by one [`Mirrors::activate`] or
    /// [`Mirrors::abandon`].
    pub async fn join(self: &Arc<Self>, room: &str) {
        let created = {
            let mut rooms = self.rooms.lock();
            match rooms.get(room) {
                Some(mirror) => {
                    mirror.lock().joining += 1;
                    false
                }
                None => {
                    rooms.insert(
                        room.to_owned(),
                        Arc::new(Mutex::new(Mirror {
                            room: room.to_owned(),
                            reader: None,
                            starting: true,
                            joining: 1,
                            subs: HashMap::new(),
                            epoch: None,
                            recent: BTreeMap::new(),
                            recent_bytes: 0,
                            catching_up: None,
                        })),
                    );
                    true
                }
            }
        };
        if created {
            self.start_reader(room).await;
        }
    }

    /// Subscribes to `room`'s feed and starts reading it. Without NATS (or when the
    /// subscription fails) the mirror has no reader; the next activation tries again,
    /// and the diffs missed meanwhile are caught up when the first one arrives.
    async fn start_reader(self: &Arc<Self>, room: &str) {
        let subscribed =
            if self.client.connection_state() == async_nats::connection::State::Connected {
                let subject = feed::room_subject(&self.cluster, room);
                self.client
                    .subscribe(subject)
                    .await
                    .map_err(|e| e.to_string())
            } else {
                Err("NATS is away".to_owned())
            };
        let mut fed = match subscribed {
            Ok(fed) => fed,
            Err(e) => {
                tracing::warn!(%room, error = %e, "cluster: cannot join a room's feed yet");
                if let Some(mirror) = self.mirror(room) {
                    mirror.lock().starting = false;
                }
                return;
            }
        };
        // The subscription is registered at the NATS server before the owner is asked
        // (bounded: a NATS that went away meanwhile fails the request anyway).
        let _ = tokio::time::timeout(JOIN_FLUSH_TIMEOUT, self.client.flush()).await;
        let reading = Arc::downgrade(self);
        let room_id = room.to_owned();
        let reader = actix_rt::spawn(async move {
            while let Some(message) = fed.next().await {
                let Some(mirrors) = reading.upgrade() else {
                    return;
                };
                mirrors.fed(&room_id, &message.payload);
            }
        });
        match self.mirror(room) {
            Some(mirror) => {
                let mut mirror = mirror.lock();
                mirror.starting = false;
                if let Some(old) = mirror.reader.replace(reader) {
                    old.abort();
                }
            }
            // Everyone left meanwhile.
            None => reader.abort(),
        }
    }

    /// The owner answered `session`'s subscription: the answer is queued to it, and
    /// it gets the room's diffs from `seq + 1` on.
    pub fn activate(
        self: &Arc<Self>,
        room: &str,
        session: &SessionRef,
        epoch: u64,
        seq: u64,
        answer: &[ServerMsg],
    ) {
        let Some(mirror) = self.mirror(room) else {
            return;
        };
        let catch_up = {
            let mut mirror = mirror.lock();
            mirror.joining = mirror.joining.saturating_sub(1);
            // Pushed under the mirror's lock: no diff reaches the session between its
            // answer and the seq the answer brings it to.
            for msg in answer {
                session.send(msg, Charge::Bulk);
            }
            if mirror.epoch.is_some_and(|e| e != epoch) {
                // The answer is newer than what is buffered (the room was recreated).
                mirror.clear_recent();
                mirror.epoch = Some(epoch);
            }
            mirror.subs.insert(
                session.session_id,
                Sub {
                    session: session.clone(),
                    epoch,
                    next: seq + 1,
                },
            );
            if mirror.reader.is_none() && !mirror.starting {
                mirror.starting = true;
                let mirrors = self.clone();
                let room = room.to_owned();
                actix_rt::spawn(async move { mirrors.start_reader(&room).await });
            }
            mirror.advance()
        };
        if let Some(since) = catch_up {
            self.catch_up(&mirror, since);
        }
    }

    /// A subscription asked for with [`Mirrors::join`] did not happen.
    pub fn abandon(&self, room: &str) {
        let mut rooms = self.rooms.lock();
        let Some(mirror) = rooms.get(room).cloned() else {
            return;
        };
        let mut locked = mirror.lock();
        locked.joining = locked.joining.saturating_sub(1);
        if locked.is_unused() {
            rooms.remove(room);
        }
    }

    /// `session_id` no longer subscribes to `room` here; the last one leaves the feed.
    pub fn leave(&self, room: &str, session_id: u64) {
        let mut rooms = self.rooms.lock();
        let Some(mirror) = rooms.get(room).cloned() else {
            return;
        };
        let mut locked = mirror.lock();
        locked.subs.remove(&session_id);
        if locked.is_unused() {
            rooms.remove(room);
        }
    }

    /// Rooms mirrored now (for tests and the node's status).
    pub fn len(&self) -> usize {
        self.rooms.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One message of a room's feed.
    fn fed(self: &Arc<Self>, room: &str, payload: &Bytes) {
        let fed = match feed::decode(payload) {
            Ok(fed) => fed,
            Err(e) => {
                tracing::warn!(%room, error = %e, "cluster: unreadable feed message dropped");
                return;
            }
        };
        let Some(mirror) = self.mirror(room) else {
            return;
        };
        let catch_up = {
            let mut mirror = mirror.lock();
            match fed {
                Fed::Deleted { .. } => {
                    // Each subscriber was told through its relay (`error`, `not_found`).
                    mirror.subs.clear();
                    mirror.clear_recent();
                    None
                }
                Fed::Diff {
                    room: fed_room,
                    epoch,
                    from,
                    to,
                    views,
                } if fed_room == room => {
                    let views = views
                        .into_iter()
                        .map(|v| View::new(v.user, Some(v.msg), Some(v.rkyv)))
                        .collect();
                    mirror.buffer(Batch {
                        epoch,
                        from,
                        to,
                        views,
                        bytes: payload.len(),
                    });
                    mirror.advance()
                }
                Fed::Diff { .. } => None,
            }
        };
        if let Some(since) = catch_up {
            self.catch_up(&mirror, since);
        }
    }

    /// Asks the owner for the changes since `since` and delivers them to the
    /// subscribers stuck there (see the module docs).
    fn catch_up(self: &Arc<Self>, mirror: &Arc<Mutex<Mirror>>, since: u64) {
        let room = {
            let mut locked = mirror.lock();
            if locked.catching_up.is_some() {
                return;
            }
            locked.catching_up = Some(since);
            locked.room.clone()
        };
        crate::metrics::hot().cluster_catchups.increment(1);
        tracing::debug!(%room, since, "cluster: a gap in the room's feed; catching up");
        let node = self.node.get().cloned();
        let mirrors = Arc::downgrade(self);
        let mirror = mirror.clone();
        actix_rt::spawn(async move {
            let caught_up = match node.and_then(|n| n.upgrade()) {
                // The owner in force now (a rebalance may have moved the room).
                Some(cluster) => ask_catch_up(&cluster, &cluster.owner(&room), &room, since).await,
                None => Err("the node is shutting down".into()),
            };
            let Some(mirrors) = mirrors.upgrade() else {
                return;
            };
            let again = caught_up_with(&mut mirror.lock(), since, caught_up);
            if let Some(since) = again {
                mirrors.catch_up(&mirror, since);
            }
        });
    }
}

/// The owner's catch-up, read: (epoch, to, views); Err when it cannot be had.
type CaughtUp = Result<(u64, u64, Vec<View>), String>;

async fn ask_catch_up(cluster: &Cluster, owner: &str, room: &str, since: u64) -> CaughtUp {
    let request = Request {
        room: room.to_owned(),
        user: String::new(),
        op_id: None,
        now_ms: 0,
        what: What::CatchUp { since },
        refusal: None,
    };
    let ticket = cluster
        .forwarder()
        .send(owner, &request)
        .await
        .map_err(|e| e.to_string())?;
    // The forwarder gives up after its own timeout (`unavailable`).
    match ticket.reply().await.map_err(|e| e.to_string())? {
        Reply::CaughtUp {
            epoch,
            to,
            views: Some(views),
        } => {
            let mut read = Vec::with_capacity(views.len());
            for (user, diff) in views {
                let msg = match diff {
                    Some(json) => {
                        Some(crate::client::decode_server(&json).map_err(|e| e.to_string())?)
                    }
                    None => None,
                };
                read.push(View::new(user, msg, None));
            }
            Ok((epoch, to, read))
        }
        Reply::CaughtUp { views: None, .. } => {
            Err("the room's history no longer reaches back".into())
        }
        Reply::Nack(e) => Err(e.msg),
        _ => Err("the owner answered something else".into()),
    }
}

/// Delivers a catch-up to the subscribers stuck at `since` (closing them when it
/// cannot be had), then whatever is buffered after it; returns the next catch-up needed.
fn caught_up_with(mirror: &mut Mirror, since: u64, caught_up: CaughtUp) -> Option<u64> {
    mirror.catching_up = None;
    let stuck: Vec<u64> = mirror
        .subs
        .iter()
        .filter(|(_, sub)| sub.next == since + 1)
        .map(|(id, _)| *id)
        .collect();
    let mut fates = Vec::new();
    match caught_up {
        Ok((epoch, to, views)) => {
            let batch = Batch {
                epoch,
                from: since + 1,
                to,
                views,
                bytes: 0,
            };
            for id in stuck {
                let Some(sub) = mirror.subs.get_mut(&id) else {
                    continue;
                };
                if sub.epoch != epoch {
                    fates.push((id, Fate::Close("the room was deleted and created again")));
                } else if to > since {
                    if let Err(fate) = deliver(sub, &batch) {
                        fates.push((id, fate));
                    }
                }
            }
        }
        Err(why) => {
            tracing::info!(room = %mirror.room, since, %why, "cluster: a feed gap could not be filled");
            for id in stuck {
                fates.push((id, Fate::Close("diffs were lost between nodes")));
            }
        }
    }
    mirror.end(fates);
    mirror.advance()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::{KillSwitch, Outbound};
    use crate::protocol::message::{WireEntry, WireValue};

    fn session(id: u64, user: &str) -> SessionRef {
        SessionRef {
            session_id: id,
            user: user.into(),
            dedup: true,
            encoding: Encoding::Json,
            outbound: Outbound::new(1 << 20, KillSwitch::new(None)),
            member: true,
            evicted: Default::default(),
        }
    }

    fn mirror() -> Mirror {
        Mirror {
            room: "r".into(),
            reader: None,
            starting: false,
            joining: 0,
            subs: HashMap::new(),
            epoch: None,
            recent: BTreeMap::new(),
            recent_bytes: 0,
            catching_up: None,
        }
    }

    fn diff(from: u64, to: u64, key: &str) -> ServerMsg {
        ServerMsg::Diff {
            room: "r".into(),
            epoch: 7,
            from,
            to,
            changes: vec![WireEntry {
                k: key.into(),
                v: Some(WireValue::from_value(&crate::value::Value::Int(to as i64))),
                ver: to,
            }],
        }
    }

    fn batch(from: u64, to: u64) -> Batch {
        Batch {
            epoch: 7,
            bytes: 100,
            from,
            to,
            views: vec![
                View::new(None, Some(diff(from, to, "public")), None),
                View::new(Some("alice".into()), Some(diff(from, to, "alice")), None),
            ],
        }
    }

    fn add(mirror: &mut Mirror, session: &SessionRef, seq: u64) {
        mirror.subs.insert(
            session.session_id,
            Sub {
                session: session.clone(),
                epoch: 7,
                next: seq + 1,
            },
        );
    }

    #[test]
    fn a_gap_holds_later_diffs_until_the_catch_up_fills_it() {
        let mut mirror = mirror();
        let (alice, bob) = (session(1, "alice"), session(2, "bob"));
        add(&mut mirror, &alice, 3);
        add(&mut mirror, &bob, 3);
        mirror.buffer(batch(4, 5));
        assert_eq!(mirror.advance(), None);
        let after_first = (alice.outbound.charged(), bob.outbound.charged());
        assert!(after_first.0 > 0 && after_first.1 > 0);
        // 6..=7 is lost; 8..=9 arrives: nobody gets it before the gap is filled.
        mirror.buffer(batch(8, 9));
        assert_eq!(mirror.advance(), Some(5), "a catch-up since 5");
        mirror.catching_up = Some(5);
        assert_eq!(mirror.advance(), None, "one catch-up at a time");
        assert_eq!(
            (alice.outbound.charged(), bob.outbound.charged()),
            after_first
        );
        let caught = Ok((
            7,
            7,
            vec![
                View::new(None, Some(diff(6, 7, "public")), None),
                View::new(Some("alice".into()), Some(diff(6, 7, "alice")), None),
            ],
        ));
        assert_eq!(caught_up_with(&mut mirror, 5, caught), None);
        assert_eq!(mirror.subs[&1].next, 10, "the catch-up, then 8..=9");
        assert_eq!(mirror.subs[&2].next, 10);
        assert!(!alice.outbound.is_closing() && !bob.outbound.is_closing());
        // A subscriber whose answer came at 9 skips what it already has.
        let carol = session(3, "carol");
        add(&mut mirror, &carol, 9);
        assert_eq!(mirror.advance(), None);
        assert_eq!(carol.outbound.charged(), 0);
    }

    #[test]
    fn an_unfillable_gap_closes_the_stuck_clients_with_4001() {
        let mut mirror = mirror();
        let (alice, bob) = (session(1, "alice"), session(2, "bob"));
        add(&mut mirror, &alice, 3);
        add(&mut mirror, &bob, 5);
        mirror.buffer(batch(6, 6));
        assert_eq!(mirror.advance(), Some(3));
        assert_eq!(mirror.subs[&2].next, 7, "bob was not behind");
        assert_eq!(
            caught_up_with(&mut mirror, 3, Err("owner down".into())),
            None
        );
        assert_eq!(alice.outbound.sent().close_code, Some(SLOW_CONSUMER));
        assert!(!mirror.subs.contains_key(&1));
        assert!(!bob.outbound.is_closing());
        // A view that needs a snapshot closes only its own viewers.
        let alice = session(1, "alice");
        add(&mut mirror, &alice, 6);
        mirror.buffer(batch(8, 8));
        assert_eq!(mirror.advance(), Some(6));
        let caught = Ok((
            7,
            7,
            vec![
                View::new(None, Some(diff(7, 7, "public")), None),
                View::new(Some("alice".into()), None, None),
            ],
        ));
        assert_eq!(caught_up_with(&mut mirror, 6, caught), None);
        assert!(alice.outbound.is_closing());
        assert_eq!(mirror.subs[&2].next, 9);
    }

    #[test]
    fn each_subscriber_gets_the_view_for_its_user() {
        let mut mirror = mirror();
        let (alice, bob) = (session(1, "alice"), session(2, "bob"));
        add(&mut mirror, &alice, 0);
        add(&mut mirror, &bob, 0);
        mirror.buffer(batch(1, 1));
        mirror.advance();
        let alice_frame = batch(1, 1).views[1].frame(Encoding::Json);
        let public_frame = batch(1, 1).views[0].frame(Encoding::Json);
        let len = |f: Option<Frame>| match f {
            Some(Frame::Data(b)) => b.len(),
            _ => 0,
        };
        assert_eq!(alice.outbound.charged(), len(alice_frame));
        assert_eq!(bob.outbound.charged(), len(public_frame));
    }
}
