//! The Room actor: the single owner and mutator of one room's state.
//!
//! A Room loads itself from the store on start (blocking reads run on the blocking pool,
//! never on its arbiter thread), validates ops through the pure reducers of
//! [`crate::kind`], assigns seq, hands the resulting events to the store writer, and only when
//! the writer confirms the commit does it send acks and the batch's diff (log before
//! send). While a batch is being committed, new ops keep being validated and applied on
//! top (the in-flight part); they form the next batch. A failed commit nacks every
//! uncommitted op `unavailable` and undoes them, in reverse order. A busy room (one
//! with subscribers that sent a diff less than `batch_interval` ago, whose last batch
//! merged several ops) holds its next batch until the interval is up, so it commits at
//! most about once per diff.
//!
//! Two views of the state: the working state (committed plus in-flight) that ops are
//! validated against, and the committed view that snapshots, `resumed` and HTTP reads
//! serve. The committed view is the working state with the in-flight keys' prior slots
//! laid over it ([`batch::Batch::priors`]), so it costs no copy of the room.
//!
//! This module knows nothing of sockets: frames go out through each subscriber's
//! byte-bounded [`Outbound`](crate::outbound::Outbound) queue.

pub mod batch;
pub mod messages;
pub mod presence;
pub mod registry;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use self::batch::Batch;
use self::messages::*;
use self::presence::Presence;
use self::registry::Registry;
use crate::kind::{Ctx, Kind, Limits, RoomState, Slot};
use crate::outbound::{encode, Charge, Frame, Pushed, SessionRef};
use crate::protocol::codes::Code;
use crate::protocol::message::{ServerMsg, WireEntry, WireValue};
use crate::protocol::Encoding;
use crate::store::{
    self, EventRecord, LoadedRoom, RoomMeta, Snapshot, Store, TrimOutcome, TrimPolicy,
};

/// Settings every room shares, from the server `Config`.
#[derive(Debug, Clone)]
pub struct RoomConfig {
    pub limits: Limits,
    /// Tombstones are kept for this many events so `resumed` can be answered in memory.
    pub history_events: u64,
    /// Events older than this are trimmed too, once a snapshot covers them (None: no
    /// age limit); tombstones follow the log as for `history_events`.
    pub history_age: Option<Duration>,
    /// Acked op ids remembered per room (at least 10,000 by the contract).
    pub op_ids_kept: usize,
    /// Largest `signal` payload, as JSON bytes.
    pub max_signal_bytes: usize,
    /// An unused room's actor stops after this long without messages.
    pub idle_timeout: Duration,
    /// A busy room sends at most one diff per this interval; while it merges ops it
    /// also holds its next batch until the interval is up (see `Room::flush`).
    pub batch_interval: Duration,
    /// A snapshot is written every this many events...
    pub snapshot_every: u64,
    /// ...or when this much time passed since the last one and events happened.
    pub snapshot_interval: Duration,
    /// Existing rooms one user may have created; a `create` beyond is nacked `limit`.
    pub max_rooms_per_user: usize,
}

impl Default for RoomConfig {
    fn default() -> Self {
        RoomConfig {
            limits: Limits::default(),
            history_events: 10_000,
            history_age: None,
            op_ids_kept: 10_000,
            max_signal_bytes: 1024,
            idle_timeout: Duration::from_secs(60),
            batch_interval: Duration::from_millis(8),
            snapshot_every: 1_000,
            snapshot_interval: Duration::from_secs(60),
            max_rooms_per_user: 1_000_000,
        }
    }
}

/// One connection subscribed to this room.
struct Subscriber {
    session: SessionRef,
    presence: bool,
}

/// A room that exists: its state and its commit pipeline.
struct Live {
    kind: Kind,
    epoch: u64,
    state: RoomState,
    /// Seq of the last event applied to `state` (committed or not).
    head: u64,
    /// Seq of the last committed event; 0 while the creation is being committed.
    committed: u64,
    /// Uncommitted batches, oldest first. The front one is being committed when
    /// `in_flight` is set (one commit per room at a time, so commits, acks and diffs
    /// happen in seq order); the others wait their turn. Each batch is capped
    /// ([`Batch::is_full`]) so a busy room's diffs stay bounded in size.
    batches: VecDeque<Batch>,
    in_flight: bool,
    /// The last batch submitted held more than one event: ops arrive faster than
    /// commits land, so a busy room holds its next batch (see `Room::flush`).
    merging: bool,
    /// Acked op ids: `(user, id)` -> seq, and their order for expiry.
    op_ids: HashMap<(Arc<str>, String), u64>,
    op_order: VecDeque<(Arc<str>, String)>,
    /// Seq and time of the newest snapshot written (0: none yet).
    snapshot_seq: u64,
    snapshot_at: Instant,
    /// A snapshot-only commit (at shutdown) is in flight.
    snapshot_in_flight: bool,
    /// A trim of the log is running in the store.
    trim_in_flight: bool,
    /// When this room last asked for a trim, so the age limit is checked at most once
    /// per [`age_check_every`] instead of after every commit.
    trim_asked_at: Option<Instant>,
    /// A `DELETE` waiting for the uncommitted batches to drain, then for the store.
    deleting: Option<oneshot::Sender<Result<(), (Code, String)>>>,
}

impl Live {
    fn new(kind: Kind, epoch: u64, state: RoomState, head: u64) -> Live {
        Live {
            kind,
            epoch,
            state,
            head,
            committed: head,
            batches: VecDeque::new(),
            in_flight: false,
            merging: false,
            op_ids: HashMap::new(),
            op_order: VecDeque::new(),
            snapshot_seq: 0,
            snapshot_at: Instant::now(),
            snapshot_in_flight: false,
            trim_in_flight: false,
            trim_asked_at: None,
            deleting: None,
        }
    }

    /// The working state as a snapshot at `head`; only valid when nothing is
    /// uncommitted or `head` is the last seq of the one batch being submitted.
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            seq: self.head,
            public: self
                .state
                .all_slots()
                .map(|(k, slot)| (k.to_owned(), slot.clone()))
                .collect(),
            private: self
                .state
                .private_entries()
                .map(|(k, v)| (k.to_owned(), v.clone()))
                .collect(),
            tombstone_floor: self.state.tombstone_floor(),
        }
    }
}

enum Status {
    /// Reading the store; the mailbox is paused (`ctx.wait`) until this ends.
    Loading,
    /// No such room in the store.
    Absent,
    Live(Box<Live>),
    /// The store could not be read; every request is answered `unavailable`.
    Failed(String),
}

/// The actor owning one room.
pub struct Room {
    room_id: Arc<str>,
    registry: Arc<Registry>,
    store: Store,
    config: Arc<RoomConfig>,
    status: Status,
    subscribers: HashMap<u64, Subscriber>,
    presence: Presence,
    /// Subscriptions that arrived while the creation was being committed.
    deferred_subs: Vec<Subscribe>,
    /// When the last message arrived; an unused room stops after `idle_timeout`.
    last_activity: Instant,
    /// Committed changes not yet sent as a diff: a busy room sends at most one diff per
    /// `batch_interval`, so fan-out frames do not grow with the op rate.
    unsent: Option<UnsentDiff>,
    /// When the last diff went out.
    last_diff_at: Option<Instant>,
    /// A timer will send `unsent`.
    diff_timer: bool,
}

/// Committed changes waiting for the next diff frame.
struct UnsentDiff {
    epoch: u64,
    from: u64,
    to: u64,
    changes: BTreeMap<String, Slot>,
}

impl Room {
    pub fn new(
        room_id: Arc<str>,
        registry: Arc<Registry>,
        store: Store,
        config: Arc<RoomConfig>,
    ) -> Room {
        Room {
            room_id,
            registry,
            store,
            config,
            status: Status::Loading,
            subscribers: HashMap::new(),
            presence: Presence::default(),
            deferred_subs: Vec::new(),
            last_activity: Instant::now(),
            unsent: None,
            last_diff_at: None,
            diff_timer: false,
        }
    }

    fn loaded(&mut self, loaded: Result<Option<LoadedRoom>, String>) {
        self.status = match loaded {
            Ok(None) => Status::Absent,
            Ok(Some(room)) => Status::Live(Box::new(rebuild(room))),
            Err(e) => {
                tracing::error!(room = %self.room_id, error = %e, "cannot load room");
                Status::Failed(e)
            }
        };
    }

    /// True when stopping loses nothing: no subscriber, nothing uncommitted, nobody
    /// waiting for the creation.
    fn is_unused(&self) -> bool {
        let idle_status = match &self.status {
            Status::Live(live) => {
                live.batches.is_empty()
                    && !live.snapshot_in_flight
                    && !live.trim_in_flight
                    && live.deleting.is_none()
            }
            _ => true,
        };
        idle_status && self.subscribers.is_empty() && self.deferred_subs.is_empty()
    }

    /// Stops the room after `idle` without messages and without users, freeing its
    /// memory; the registry starts it again (from the store) on the next access. Absent
    /// and failed rooms go sooner, so unknown ids cost no memory and a failed load is
    /// retried.
    fn check_idle(&mut self, ctx: &mut Context<Self>) {
        let idle = match self.status {
            Status::Live(_) => self.config.idle_timeout,
            _ => self.config.idle_timeout.min(ABSENT_IDLE),
        };
        if self.is_unused() && self.last_activity.elapsed() >= idle {
            ctx.stop();
        }
    }
}

/// How long an absent (or failed) room's actor lingers after its last message.
const ABSENT_IDLE: Duration = Duration::from_secs(10);

/// How often a busy room asks for a trim by `--history-age`: a quarter of the age, so
/// an event goes about 1.25 ages after its stamp once a snapshot covers it; at most ten
/// times a second for a tiny age, and at least once a minute for a long one.
fn age_check_every(age: Duration) -> Duration {
    (age / 4).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

/// Rebuilds a room from its latest snapshot and the log after it: recorded changes are
/// applied, no reducer runs.
fn rebuild(room: LoadedRoom) -> Live {
    let kind = room.meta.kind;
    let (mut state, snapshot_seq) = match room.snapshot {
        Some(snapshot) => (
            RoomState::from_parts(
                kind,
                snapshot.public,
                snapshot.private,
                snapshot.tombstone_floor,
            ),
            snapshot.seq,
        ),
        None => (RoomState::new(kind), 0),
    };
    for event in &room.events {
        // Undo records are only needed for uncommitted events.
        let _ = state.apply(event.seq, &event.changes);
    }
    // Deletions are remembered exactly as far back as the log reaches, so `resumed`
    // is possible exactly when the log still holds every event after `since`.
    state.prune_tombstones(room.first_retained.saturating_sub(1));
    let mut live = Live::new(kind, room.meta.epoch, state, room.head);
    live.snapshot_seq = snapshot_seq;
    for rec in room.op_ids {
        let key: (Arc<str>, String) = (Arc::from(rec.user.as_str()), rec.op_id);
        live.op_ids.insert(key.clone(), rec.seq);
        live.op_order.push_back(key);
    }
    live
}

impl Actor for Room {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Bounded: rooms answer quickly and never wait on a socket; senders that find
        // the mailbox full wait (`Addr::send`) or drop the message (signals).
        ctx.set_mailbox_capacity(256);
        let every = (self.config.idle_timeout.min(ABSENT_IDLE) / 2).max(Duration::from_millis(50));
        ctx.run_interval(every, |room, ctx| room.check_idle(ctx));
        let store = self.store.clone();
        let room_id = self.room_id.clone();
        let load = async move {
            match store
                .read_blocking(move |store| store.load_room(&room_id))
                .await
            {
                Ok(Ok(room)) => Ok(room),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("room load task failed: {e}")),
            }
        };
        // `wait` pauses the mailbox: no message is handled before the room is loaded.
        // A room stopped while idle was not trimmed meanwhile; it asks once it is back.
        ctx.wait(load.into_actor(self).map(|loaded, room, ctx| {
            room.loaded(loaded);
            room.maybe_trim(ctx, true);
        }));
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        self.registry.remove(&self.room_id, &ctx.address());
        self.registry.note_stopped();
    }
}

impl Handler<Create> for Room {
    type Result = ();

    fn handle(&mut self, msg: Create, ctx: &mut Context<Self>) {
        self.last_activity = Instant::now();
        let op_key = msg.op_id.map(|id| (msg.user.clone(), id));
        match &mut self.status {
            Status::Loading => unreachable!("the mailbox is paused while loading"),
            Status::Failed(e) => msg
                .reply
                .nack(Code::Unavailable, format!("room unavailable: {e}")),
            Status::Live(live) if live.deleting.is_some() => msg.reply.nack(
                Code::Unavailable,
                format!("room {} is being deleted; retry", self.room_id),
            ),
            Status::Live(live) => {
                // A re-sent create is answered from the op-id record, with seq 1.
                if let Some(key) = &op_key {
                    if let Some(seq) = live.op_ids.get(key).copied() {
                        return live.reply_ack(msg.reply, seq);
                    }
                    if let Some(seq) = live.uncommitted_seq(key) {
                        return live.reply_later(batch::Reply::Ack(msg.reply, live.done(seq)));
                    }
                }
                let (code, text) = msg
                    .refusal
                    .unwrap_or((Code::Exists, format!("room {} exists", self.room_id)));
                live.reply_nack(msg.reply, code, text);
            }
            Status::Absent => {
                if let Some((code, text)) = msg.refusal {
                    return msg.reply.nack(code, text);
                }
                // Counted from commits, so creates of one user in flight at the same
                // moment in other rooms can pass together (at most their number over).
                let created = self.store.rooms_created_by(&msg.user);
                if created >= self.config.max_rooms_per_user {
                    msg.reply.nack(
                        Code::Limit,
                        format!(
                            "user {} already created {created} rooms, the limit",
                            msg.user
                        ),
                    );
                    return;
                }
                let Some(kind) = Kind::parse(&msg.kind) else {
                    msg.reply.nack(
                        Code::Invalid,
                        format!("unknown kind `{}` (use chat, poll or state)", msg.kind),
                    );
                    return;
                };
                let seq_ctx = Ctx {
                    user: &msg.user,
                    now_ms: msg.now_ms,
                    seq: 1,
                };
                let changes =
                    match RoomState::create(kind, &msg.init, &seq_ctx, &self.config.limits) {
                        Ok(changes) => changes,
                        Err(refusal) => {
                            msg.reply.nack(refusal.code.into(), refusal.msg);
                            return;
                        }
                    };
                let epoch = rand::random::<u64>();
                let mut live = Live::new(kind, epoch, RoomState::new(kind), 0);
                live.open_batch().create = Some(RoomMeta { kind, epoch });
                let op = crate::value::Value::map([
                    ("type", crate::value::Value::Str("create".into())),
                    ("kind", crate::value::Value::Str(kind.as_str().into())),
                    ("init", msg.init),
                ]);
                live.apply_event(&msg.user, msg.now_ms, op, changes, op_key, msg.reply);
                self.status = Status::Live(Box::new(live));
                self.flush(ctx);
            }
        }
    }
}

impl Handler<Submit> for Room {
    type Result = ();

    fn handle(&mut self, msg: Submit, ctx: &mut Context<Self>) {
        self.last_activity = Instant::now();
        let live = match &mut self.status {
            Status::Loading => unreachable!("the mailbox is paused while loading"),
            Status::Failed(e) => {
                return msg
                    .reply
                    .nack(Code::Unavailable, format!("room unavailable: {e}"));
            }
            Status::Absent => {
                let (code, text) = msg
                    .refusal
                    .unwrap_or((Code::NotFound, format!("no room {}", self.room_id)));
                return msg.reply.nack(code, text);
            }
            Status::Live(live) if live.deleting.is_some() => {
                return msg.reply.nack(
                    Code::NotFound,
                    format!("room {} is being deleted", self.room_id),
                );
            }
            Status::Live(live) if live.committed == 0 && live.in_flight => {
                // The creation is not durable yet; an op now would be a race the client
                // cannot see, so it waits in line like any other op.
                live
            }
            Status::Live(live) => live,
        };
        let op_key = msg.op_id.map(|id| (msg.user.clone(), id));
        if let Some(key) = &op_key {
            if let Some(seq) = live.op_ids.get(key).copied() {
                return live.reply_ack(msg.reply, seq);
            }
            // A re-send of an op still in flight is answered when the original is.
            if let Some(seq) = live.uncommitted_seq(key) {
                return live.reply_later(batch::Reply::Ack(msg.reply, live.done(seq)));
            }
        }
        if let Some((code, text)) = msg.refusal {
            return live.reply_nack(msg.reply, code, text);
        }
        let seq = live.head + 1;
        let seq_ctx = Ctx {
            user: &msg.user,
            now_ms: msg.now_ms,
            seq,
        };
        match live.state.reduce(&msg.op, &seq_ctx, &self.config.limits) {
            Ok(changes) => {
                live.apply_event(&msg.user, msg.now_ms, msg.op, changes, op_key, msg.reply);
                self.flush(ctx);
            }
            Err(refusal) => live.reply_nack(msg.reply, refusal.code.into(), refusal.msg),
        }
    }
}

impl Live {
    /// Applies an accepted event to the working state and adds it to the pending batch.
    fn apply_event(
        &mut self,
        user: &Arc<str>,
        now_ms: i64,
        op: crate::value::Value,
        changes: crate::kind::Changes,
        op_key: Option<(Arc<str>, String)>,
        reply: ReplyTo,
    ) {
        // The batch opens before head moves: a new batch's first seq is head + 1.
        self.open_batch();
        self.head += 1;
        let seq = self.head;
        if let Some(batch) = self.batches.back_mut() {
            batch.note_priors(&self.state, &changes);
        }
        let undo = self.state.apply(seq, &changes);
        let record = EventRecord {
            seq,
            user: user.to_string(),
            ts_ms: now_ms,
            op,
            changes,
            op_id: op_key.as_ref().map(|(_, id)| id.clone()),
        };
        let epoch = self.epoch;
        if let Some(batch) = self.batches.back_mut() {
            batch.add_event(record, undo, op_key, reply, epoch);
        }
    }

    fn done(&self, seq: u64) -> OpDone {
        OpDone {
            seq,
            epoch: self.epoch,
        }
    }

    /// The batch new events and replies join: the newest one, unless it is being
    /// committed or is full.
    fn open_batch(&mut self) -> &mut Batch {
        let usable = match self.batches.back() {
            Some(last) => !(last.is_full() || self.in_flight && self.batches.len() == 1),
            None => false,
        };
        if !usable {
            self.batches.push_back(Batch::new(self.head + 1));
        }
        // Just ensured non-empty.
        self.batches.back_mut().expect("a batch was just pushed")
    }

    /// The seq of an op id that is applied but not yet committed.
    fn uncommitted_seq(&self, key: &(Arc<str>, String)) -> Option<u64> {
        self.batches.iter().find_map(|batch| batch.seq_of(key))
    }

    /// Sends a reply now if nothing is in line before it, else after the newest batch.
    fn reply_later(&mut self, reply: batch::Reply) {
        if self.batches.is_empty() {
            reply.send();
        } else {
            self.open_batch().replies.push(reply);
        }
    }

    fn reply_ack(&mut self, reply: ReplyTo, seq: u64) {
        let done = self.done(seq);
        self.reply_later(batch::Reply::Ack(reply, done));
    }

    fn reply_nack(&mut self, reply: ReplyTo, code: Code, msg: String) {
        self.reply_later(batch::Reply::Nack(reply, code, msg));
    }

    /// The committed value of every public key, sorted: the working state with the
    /// uncommitted keys' prior slots laid over it.
    fn committed_entries(&self) -> Vec<WireEntry> {
        let overlay = self.overlay();
        let mut out = Vec::new();
        let mut overlay_iter = overlay.iter().peekable();
        for (key, slot) in self.state.entries() {
            while let Some((okey, oslot)) = overlay_iter.peek() {
                if okey.as_str() < key {
                    push_live(&mut out, okey, oslot);
                    overlay_iter.next();
                } else {
                    break;
                }
            }
            if overlay.contains_key(key) {
                continue;
            }
            out.push(wire_entry(key, slot));
        }
        for (okey, oslot) in overlay_iter {
            push_live(&mut out, okey, oslot);
        }
        // Overlay keys equal to a working key were skipped above and are pushed here or
        // in the loop; sort once to keep the contract's key order.
        out.sort_by(|a, b| a.k.cmp(&b.k));
        out.dedup_by(|a, b| a.k == b.k);
        out
    }

    /// Committed entries and tombstones with ver > since, or None when tombstones that
    /// old are gone (the caller answers with a snapshot).
    fn committed_changes_since(&self, since: u64) -> Option<Vec<WireEntry>> {
        let overlay = self.overlay();
        let working = self.state.changed_since(since)?;
        let mut out: Vec<WireEntry> = working
            .into_iter()
            .filter(|(k, _)| !overlay.contains_key(*k))
            .map(|(k, slot)| wire_entry(k, slot))
            .collect();
        for (key, prior) in &overlay {
            if let Some(slot) = prior {
                if slot.ver > since {
                    out.push(wire_entry(key, slot));
                }
            }
        }
        out.sort_by(|a, b| a.k.cmp(&b.k));
        Some(out)
    }

    /// For each key changed by uncommitted events, its committed slot (None: absent).
    fn overlay(&self) -> BTreeMap<String, Option<Slot>> {
        let mut overlay = BTreeMap::new();
        for batch in &self.batches {
            for (key, prior) in &batch.priors {
                overlay.entry(key.clone()).or_insert_with(|| prior.clone());
            }
        }
        overlay
    }

    /// Remembers a committed op id (expiry happens when batches are submitted).
    fn remember_op_id(&mut self, key: (Arc<str>, String), seq: u64) {
        if self.op_ids.insert(key.clone(), seq).is_none() {
            self.op_order.push_back(key);
        }
    }
}

fn push_live(out: &mut Vec<WireEntry>, key: &str, prior: &Option<Slot>) {
    if let Some(slot) = prior {
        if slot.value.is_some() {
            out.push(wire_entry(key, slot));
        }
    }
}

/// A state slot as a wire entry (`v: None` is a deleted key).
pub fn wire_entry(key: &str, slot: &Slot) -> WireEntry {
    WireEntry {
        k: key.to_owned(),
        v: slot.value.as_ref().map(WireValue::from_value),
        ver: slot.ver,
    }
}

impl Room {
    /// Submits the oldest batch if no commit is in flight, first answering batches that
    /// hold only replies (nacks, answers to re-sent ids).
    fn flush(&mut self, ctx: &mut Context<Self>) {
        let Status::Live(live) = &mut self.status else {
            return;
        };
        if live.in_flight {
            return;
        }
        while live.batches.front().is_some_and(|b| b.events.is_empty()) {
            if let Some(batch) = live.batches.pop_front() {
                for reply in batch.replies {
                    reply.send();
                }
            }
        }
        if live.batches.is_empty() {
            if live.deleting.is_some() && !live.snapshot_in_flight {
                self.start_delete(ctx);
            }
            return;
        }
        // A busy room that is merging ops commits on its diffs' schedule: the batch
        // waits for the diff timer, commits, and its diff leaves as the commit lands
        // (`diff_due`). Subscribers get the changes when they would have anyway (a diff
        // could not leave before the timer); the room pays one commit per interval
        // instead of one per store round, and its acks wait up to one interval. A room
        // whose last batch held a single op (one client awaiting each ack, or a
        // trickle) does not wait, so a sequential client is not slowed to one op per
        // interval; nor does a full batch or a pending delete.
        let holds = live.merging
            && live.deleting.is_none()
            && live.batches.front().is_some_and(|b| !b.is_full());
        if let Some(wait) = self.diff_wait().filter(|_| holds) {
            self.arm_diff_timer(wait, ctx);
            return;
        }
        let Status::Live(live) = &mut self.status else {
            return;
        };
        // A snapshot rides with the batch when it is the only uncommitted one, so the
        // working state is exactly the state at the batch's last seq.
        let snapshot_due = live.batches.len() == 1 && {
            let last = live.head;
            last >= live.snapshot_seq + self.config.snapshot_every
                || (last > live.snapshot_seq
                    && live.snapshot_at.elapsed() >= self.config.snapshot_interval)
        };
        let snapshot = snapshot_due.then(|| live.snapshot());
        let Some(batch) = live.batches.front_mut() else {
            return;
        };
        batch.snapshot_seq = snapshot.as_ref().map(|s| s.seq);
        // Expiry is decided at submit time so the store forgets ids in the same commit.
        // `op_order` is in seq order (ids are remembered as their batches commit), so the
        // ids forgotten are exactly those of the events up to the last one popped.
        let mut expire_through = 0;
        let kept = self.config.op_ids_kept;
        let excess = (live.op_order.len() + batch.op_ids.len()).saturating_sub(kept + kept / 10);
        for _ in 0..excess {
            if let Some(old) = live.op_order.pop_front() {
                if let Some(seq) = live.op_ids.remove(&old) {
                    expire_through = expire_through.max(seq);
                }
            }
        }
        live.merging = batch.events.len() > 1;
        let store_batch = store::Batch {
            room: self.room_id.to_string(),
            create: batch.create,
            events: batch.take_records(),
            expire_op_ids_through: expire_through,
            snapshot,
        };
        live.in_flight = true;
        match self.store.submit(store_batch) {
            Ok(done) => {
                let wait = async move {
                    match done.await {
                        Ok(result) => result.map_err(|e| e.to_string()),
                        Err(_) => Err("the store writer stopped".to_owned()),
                    }
                };
                ctx.spawn(
                    wait.into_actor(self)
                        .map(|result, room, ctx| room.committed(result, ctx)),
                );
            }
            Err(e) => self.committed(Err(e.to_string()), ctx),
        }
    }

    /// The store answered for the batch in flight.
    fn committed(&mut self, result: Result<(), String>, ctx: &mut Context<Self>) {
        let Status::Live(live) = &mut self.status else {
            return;
        };
        if !live.in_flight {
            return;
        }
        live.in_flight = false;
        let Some(mut batch) = live.batches.pop_front() else {
            return;
        };
        match result {
            Ok(()) => {
                live.committed = batch.last_seq();
                for (user, id, seq) in std::mem::take(&mut batch.op_ids) {
                    live.remember_op_id((user, id), seq);
                }
                let epoch = live.epoch;
                for reply in batch.replies.drain(..) {
                    reply.send();
                }
                if let Some(seq) = batch.snapshot_seq {
                    live.snapshot_seq = seq;
                    live.snapshot_at = Instant::now();
                }
                self.maybe_trim(ctx, batch.snapshot_seq.is_some());
                let Status::Live(live) = &mut self.status else {
                    return;
                };
                let to = live.committed;
                self.queue_diff(epoch, batch.first_seq, to, batch.take_coalesced(), ctx);
                if !self.deferred_subs.is_empty() {
                    for sub in std::mem::take(&mut self.deferred_subs) {
                        let _ = self.subscribe(sub, ctx);
                    }
                }
            }
            Err(e) => {
                tracing::error!(room = %self.room_id, error = %e, "commit failed; nacking uncommitted ops");
                let msg = format!("store failure, nothing applied: {e}");
                // Undo newest first: later batches were applied on top of earlier ones.
                let mut failed: Vec<Batch> = live.batches.drain(..).collect();
                failed.insert(0, batch);
                for batch in failed.into_iter().rev() {
                    batch.fail(&mut live.state, live.committed, &msg);
                }
                live.head = live.committed;
                if live.committed == 0 {
                    // The creation itself failed: the room does not exist.
                    self.status = Status::Absent;
                    for sub in std::mem::take(&mut self.deferred_subs) {
                        sub.session.send(
                            &ServerMsg::Error {
                                code: Code::Unavailable,
                                room: Some(self.room_id.to_string()),
                                msg: msg.clone(),
                            },
                            Charge::Full,
                        );
                    }
                    return;
                }
            }
        }
        self.flush(ctx);
    }

    /// Asks the store to trim the log behind the newest snapshot (see
    /// `Store::submit_trim`) when a limit may have made events due: the count limit when
    /// the snapshot moved (or the room loaded) and the log is longer than
    /// `history_events`; the age limit after a commit or load, at most once per
    /// [`age_check_every`], as time alone makes events due. A room that is not loaded
    /// asks nothing; it asks when it loads again. When the trim is done, deletions older
    /// than the log are forgotten too, so `resumed` answers exactly what the log can. A
    /// full queue skips this round; the next commit asks again (for the count limit
    /// alone, the next snapshot).
    fn maybe_trim(&mut self, ctx: &mut Context<Self>, snapshot_moved: bool) {
        let Status::Live(live) = &mut self.status else {
            return;
        };
        // Without a snapshot nothing can be trimmed.
        if live.trim_in_flight || live.snapshot_seq == 0 {
            return;
        }
        let count_due = snapshot_moved && live.committed > self.config.history_events;
        let age_due = self.config.history_age.is_some_and(|age| {
            live.trim_asked_at
                .is_none_or(|asked| asked.elapsed() >= age_check_every(age))
        });
        if !count_due && !age_due {
            return;
        }
        // The oldest op id the room still dedups against: trimmed events from there on
        // keep their ids apart (`op_order` is in seq order).
        let keep_op_ids_from = live
            .op_order
            .front()
            .and_then(|key| live.op_ids.get(key).copied())
            .unwrap_or(u64::MAX);
        let policy = TrimPolicy {
            history_events: self.config.history_events,
            older_than_ms: self.config.history_age.map(|age| {
                let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
                messages::now_ms().saturating_sub(age_ms)
            }),
            keep_op_ids_from,
        };
        let Ok(done) = self.store.submit_trim(&self.room_id, policy) else {
            return;
        };
        live.trim_in_flight = true;
        live.trim_asked_at = Some(Instant::now());
        ctx.spawn(done.into_actor(self).map(|outcome, room, _ctx| {
            let Status::Live(live) = &mut room.status else {
                return;
            };
            live.trim_in_flight = false;
            match outcome {
                Ok(Ok(TrimOutcome::Done(report))) => {
                    live.state
                        .prune_tombstones(report.first_retained.saturating_sub(1));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(room = %room.room_id, error = %e, "trim failed"),
                Err(_) => {}
            }
        }));
    }

    /// Submits the deletion once nothing is uncommitted; see [`Delete`].
    fn start_delete(&mut self, ctx: &mut Context<Self>) {
        let Status::Live(live) = &mut self.status else {
            return;
        };
        match self.store.submit_delete(&self.room_id) {
            Ok(done) => {
                ctx.spawn(done.into_actor(self).map(|result, room, _ctx| {
                    let result = match result {
                        Ok(result) => result.map_err(|e| e.to_string()),
                        Err(_) => Err("the store writer stopped".to_owned()),
                    };
                    room.deleted(result);
                }));
            }
            Err(e) => {
                if let Some(reply) = live.deleting.take() {
                    let _ = reply.send(Err((Code::Unavailable, format!("cannot delete now: {e}"))));
                }
            }
        }
    }

    /// The store removed the room: its subscribers are told and dropped, and the room
    /// is absent (a later create gets a new epoch).
    fn deleted(&mut self, result: Result<(), String>) {
        let Status::Live(live) = &mut self.status else {
            return;
        };
        let reply = live.deleting.take();
        if let Err(e) = result {
            if let Some(reply) = reply {
                let _ = reply.send(Err((Code::Unavailable, format!("store failure: {e}"))));
            }
            return;
        }
        let gone = ServerMsg::Error {
            code: Code::NotFound,
            room: Some(self.room_id.to_string()),
            msg: format!("room {} was deleted", self.room_id),
        };
        for (_, sub) in self.subscribers.drain() {
            sub.session.evict(&self.room_id);
            sub.session.send(&gone, Charge::Full);
        }
        self.presence = Presence::default();
        self.unsent = None;
        self.status = Status::Absent;
        tracing::info!(room = %self.room_id, "room deleted");
        if let Some(reply) = reply {
            let _ = reply.send(Ok(()));
        }
    }

    /// Adds a committed batch's changes to the next diff, and sends it now if the room
    /// has been quiet for `batch_interval` (an idle room's diff leaves right after its
    /// commit), else when the interval is up. A diff that grew past the batch byte cap
    /// leaves at once.
    fn queue_diff(
        &mut self,
        epoch: u64,
        from: u64,
        to: u64,
        changes: BTreeMap<String, Slot>,
        ctx: &mut Context<Self>,
    ) {
        match &mut self.unsent {
            Some(unsent) => {
                unsent.to = to;
                unsent.changes.extend(changes);
            }
            None => {
                self.unsent = Some(UnsentDiff {
                    epoch,
                    from,
                    to,
                    changes,
                })
            }
        }
        let big = self
            .unsent
            .as_ref()
            .is_some_and(|u| u.changes.len() >= batch::MAX_BATCH_EVENTS);
        match self.diff_wait() {
            Some(wait) if !big => self.arm_diff_timer(wait, ctx),
            _ => self.send_unsent(),
        }
    }

    /// How long until the next diff may leave: `None` if it may leave now, or if there
    /// is nobody to send it to (then nothing waits for it either).
    fn diff_wait(&self) -> Option<Duration> {
        if self.subscribers.is_empty() {
            return None;
        }
        let elapsed = self.last_diff_at?.elapsed();
        self.config
            .batch_interval
            .checked_sub(elapsed)
            .filter(|wait| !wait.is_zero())
    }

    fn arm_diff_timer(&mut self, wait: Duration, ctx: &mut Context<Self>) {
        if !self.diff_timer {
            self.diff_timer = true;
            ctx.run_later(wait, |room, ctx| {
                room.diff_timer = false;
                room.diff_due(ctx);
            });
        }
    }

    /// The interval since the last diff is over: a batch held for it is submitted (its
    /// commit sends the diff, with whatever committed meanwhile); with no commit coming,
    /// what committed meanwhile leaves now.
    fn diff_due(&mut self, ctx: &mut Context<Self>) {
        self.flush(ctx);
        let commit_coming = matches!(&self.status, Status::Live(live) if live.in_flight);
        if !commit_coming {
            self.send_unsent();
        }
    }

    /// Sends the committed-but-unsent changes as one diff.
    fn send_unsent(&mut self) {
        let Some(unsent) = self.unsent.take() else {
            return;
        };
        let diff = ServerMsg::Diff {
            room: self.room_id.to_string(),
            epoch: unsent.epoch,
            from: unsent.from,
            to: unsent.to,
            changes: unsent
                .changes
                .iter()
                .map(|(k, slot)| wire_entry(k, slot))
                .collect(),
        };
        // A diff to nobody does not count: the first subscriber's first diff leaves at
        // once.
        if !self.subscribers.is_empty() {
            self.last_diff_at = Some(Instant::now());
        }
        self.broadcast(&diff, Charge::Bulk, None);
    }

    /// Queues one message to every subscriber (or those wanting presence), encoding it
    /// once per encoding in use. Subscribers whose queue overflowed are dropped.
    fn broadcast(
        &mut self,
        msg: &ServerMsg,
        charge: Charge,
        only: Option<fn(&Subscriber) -> bool>,
    ) {
        let mut encoded: [Option<Frame>; 2] = [None, None];
        let mut gone = Vec::new();
        for (id, sub) in &self.subscribers {
            if let Some(only) = only {
                if !only(sub) {
                    continue;
                }
            }
            let slot = match sub.session.encoding {
                Encoding::Json => 0,
                Encoding::Rkyv => 1,
            };
            let frame = encoded[slot]
                .get_or_insert_with(|| encode(msg, sub.session.encoding))
                .clone();
            if matches!(
                sub.session.outbound.push(frame, charge),
                Pushed::Overflowed | Pushed::Closed
            ) {
                gone.push(*id);
            }
        }
        for id in gone {
            self.remove_subscriber(id);
        }
    }

    fn remove_subscriber(&mut self, session_id: u64) {
        if let Some(sub) = self.subscribers.remove(&session_id) {
            self.presence.leave(&sub.session.user);
        }
    }
}

impl Handler<Subscribe> for Room {
    type Result = bool;

    fn handle(&mut self, msg: Subscribe, ctx: &mut Context<Self>) -> bool {
        self.last_activity = Instant::now();
        let ok = self.subscribe(msg, ctx);
        self.schedule_presence(ctx);
        ok
    }
}

impl Room {
    fn subscribe(&mut self, msg: Subscribe, _ctx: &mut Context<Self>) -> bool {
        // Existing subscribers get what is committed but unsent first, so the new
        // subscriber's snapshot and everyone's next diff start at the same seq.
        self.send_unsent();
        let error = |code: Code, text: String| ServerMsg::Error {
            code,
            room: Some(self.room_id.to_string()),
            msg: text,
        };
        let live = match &self.status {
            Status::Loading => unreachable!("the mailbox is paused while loading"),
            Status::Failed(e) => {
                msg.session.send(
                    &error(Code::Unavailable, format!("room unavailable: {e}")),
                    Charge::Full,
                );
                return false;
            }
            Status::Absent => {
                msg.session.send(
                    &error(Code::NotFound, format!("no room {}", self.room_id)),
                    Charge::Full,
                );
                return false;
            }
            Status::Live(live) if live.deleting.is_some() => {
                msg.session.send(
                    &error(
                        Code::NotFound,
                        format!("room {} is being deleted", self.room_id),
                    ),
                    Charge::Full,
                );
                return false;
            }
            Status::Live(live) if live.committed == 0 => {
                // The creation is being committed: answer once it is durable.
                self.deferred_subs.push(msg);
                return true;
            }
            Status::Live(live) => live,
        };
        let resumed = msg.since.and_then(|since| {
            let (Some(epoch), Some(seq)) = (since.epoch, since.seq) else {
                return None;
            };
            if epoch != live.epoch || seq > live.committed {
                return None;
            }
            live.committed_changes_since(seq)
                .map(|changes| ServerMsg::Resumed {
                    room: self.room_id.to_string(),
                    epoch: live.epoch,
                    from: seq + 1,
                    to: live.committed,
                    changes,
                })
        });
        let reply = resumed.unwrap_or_else(|| ServerMsg::Snapshot {
            room: self.room_id.to_string(),
            kind: live.kind.as_str().to_owned(),
            epoch: live.epoch,
            seq: live.committed,
            entries: live.committed_entries(),
            recovered: false,
        });
        if matches!(
            msg.session
                .outbound
                .push(encode(&reply, msg.session.encoding), Charge::Bulk),
            Pushed::Overflowed | Pushed::Closed
        ) {
            self.remove_subscriber(msg.session.session_id);
            return false;
        }
        let session_id = msg.session.session_id;
        let user = msg.session.user.clone();
        let is_new = !self.subscribers.contains_key(&session_id);
        if is_new {
            self.presence.join(&user);
        }
        if msg.presence {
            // Announce what others have not heard yet before this subscriber's list, so
            // every presence subscriber's view is its list plus later changes.
            self.flush_presence();
            let members = ServerMsg::PresenceMembers {
                room: self.room_id.to_string(),
                members: self.presence.members(),
            };
            msg.session.send(&members, Charge::Full);
        }
        self.subscribers.insert(
            session_id,
            Subscriber {
                session: msg.session,
                presence: msg.presence,
            },
        );
        true
    }

    fn schedule_presence(&mut self, ctx: &mut Context<Self>) {
        if self.presence.needs_flush() && self.presence.schedule() {
            ctx.run_later(presence::FLUSH_DELAY, |room, _ctx| {
                room.presence.unschedule();
                room.flush_presence();
            });
        }
    }

    /// Sends the coalesced member changes to presence subscribers.
    fn flush_presence(&mut self) {
        let Some((join, leave)) = self.presence.take_changes() else {
            return;
        };
        let change = ServerMsg::PresenceChange {
            room: self.room_id.to_string(),
            join,
            leave,
        };
        self.broadcast(&change, Charge::Full, Some(|sub| sub.presence));
    }
}

impl Handler<Unsubscribe> for Room {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, ctx: &mut Context<Self>) {
        self.last_activity = Instant::now();
        self.remove_subscriber(msg.session_id);
        self.schedule_presence(ctx);
    }
}

impl Handler<Signal> for Room {
    type Result = ();

    fn handle(&mut self, msg: Signal, _ctx: &mut Context<Self>) {
        self.last_activity = Instant::now();
        if !self.subscribers.contains_key(&msg.session_id) {
            return;
        }
        let signal = ServerMsg::Signal {
            room: self.room_id.to_string(),
            user: msg.user.to_string(),
            data: WireValue::from_value(&msg.data),
        };
        let mut encoded: [Option<Frame>; 2] = [None, None];
        for (id, sub) in &self.subscribers {
            if *id == msg.session_id {
                continue;
            }
            let slot = match sub.session.encoding {
                Encoding::Json => 0,
                Encoding::Rkyv => 1,
            };
            let frame = encoded[slot]
                .get_or_insert_with(|| encode(&signal, sub.session.encoding))
                .clone();
            // Signals are the first thing dropped under load.
            sub.session.outbound.push(frame, Charge::Droppable);
        }
    }
}

impl Handler<Read> for Room {
    type Result = Result<RoomView, (Code, String)>;

    fn handle(&mut self, _msg: Read, _ctx: &mut Context<Self>) -> Self::Result {
        self.last_activity = Instant::now();
        match &self.status {
            Status::Live(live) if live.committed > 0 && live.deleting.is_none() => Ok(RoomView {
                kind: live.kind.as_str(),
                epoch: live.epoch,
                seq: live.committed,
                entries: live.committed_entries(),
            }),
            Status::Failed(e) => Err((Code::Unavailable, format!("room unavailable: {e}"))),
            _ => Err((Code::NotFound, format!("no room {}", self.room_id))),
        }
    }
}

impl Handler<Drain> for Room {
    type Result = Drained;

    /// Shutdown: reports what is not yet durable, and once everything is committed,
    /// writes a final snapshot so the next start loads fast.
    fn handle(&mut self, _msg: Drain, ctx: &mut Context<Self>) -> Drained {
        const DONE: Drained = Drained {
            ops: 0,
            snapshot: false,
        };
        let Status::Live(live) = &mut self.status else {
            return DONE;
        };
        let uncommitted: usize = live.batches.iter().map(|b| b.events.len()).sum();
        if uncommitted > 0 || live.in_flight {
            return Drained {
                ops: uncommitted.max(1),
                snapshot: false,
            };
        }
        if live.snapshot_in_flight {
            return Drained {
                ops: 0,
                snapshot: true,
            };
        }
        if live.committed == 0 || live.head <= live.snapshot_seq || live.deleting.is_some() {
            return DONE;
        }
        let batch = store::Batch {
            snapshot: Some(live.snapshot()),
            ..store::Batch::new(self.room_id.to_string())
        };
        let Ok(done) = self.store.submit(batch) else {
            return DONE;
        };
        live.snapshot_in_flight = true;
        let seq = live.head;
        ctx.spawn(done.into_actor(self).map(move |result, room, _ctx| {
            if let Status::Live(live) = &mut room.status {
                live.snapshot_in_flight = false;
                if matches!(result, Ok(Ok(()))) {
                    live.snapshot_seq = seq;
                }
            }
        }));
        Drained {
            ops: 0,
            snapshot: true,
        }
    }
}

impl Handler<Delete> for Room {
    type Result = ();

    fn handle(&mut self, msg: Delete, ctx: &mut Context<Self>) {
        self.last_activity = Instant::now();
        match &mut self.status {
            Status::Loading => unreachable!("the mailbox is paused while loading"),
            Status::Failed(e) => {
                let _ = msg
                    .reply
                    .send(Err((Code::Unavailable, format!("room unavailable: {e}"))));
            }
            Status::Absent => {
                let _ = msg
                    .reply
                    .send(Err((Code::NotFound, format!("no room {}", self.room_id))));
            }
            Status::Live(live) if live.deleting.is_some() => {
                let _ = msg.reply.send(Err((
                    Code::NotFound,
                    format!("room {} is being deleted", self.room_id),
                )));
            }
            Status::Live(live) => {
                live.deleting = Some(msg.reply);
                self.flush(ctx);
            }
        }
    }
}
