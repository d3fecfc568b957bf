//! The Room actor: the single owner and mutator of one room's state.
//!
//! A Room loads itself from the store on start (blocking reads run on the blocking pool,
//! never on its arbiter thread), validates ops through the pure reducers of
//! [`crate::kind`], assigns seq, hands the resulting events to the store writer, and only when
//! the writer confirms the commit does it send acks and the batch's diff (log before
//! send). While a batch is being committed, new ops keep being validated and applied on
//! top (the in-flight part); they form the next batch, which goes to the writer while
//! the first is still committing once it is full, or at once when the room's batches
//! are small (`live::PIPELINE_DEPTH`), so the writer commits the room's batches back to
//! back. A failed commit nacks every
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
//!
//! The room's files, one concept each: `handlers` (the messages it accepts, over one
//! status ladder), `idle` (one timer per room thread that asks each of its rooms
//! whether it is unused), `live` (the working state and its committed view), [`op_ids`] (the
//! window of op ids, acked and in flight), `commit` (batches to the store and back,
//! trims, deletion), `fanout` (subscriptions, diff batching, presence), [`tap`] (diffs
//! handed to other nodes once per batch, in cluster mode), [`moving`] (a room on its
//! way to another node: refusals and the freeze before its rows are copied) and
//! [`recovery`] (rebuilding a room from the log without running a reducer, also used by
//! `?at=` and `roomd log`).

pub mod admin;
pub mod backlog;
pub mod batch;
mod commit;
pub mod error;
mod fanout;
mod handlers;
mod idle;
mod live;
pub mod messages;
pub mod moving;
pub mod op_ids;
pub mod presence;
pub mod recovery;
pub mod registry;
pub mod tap;
pub mod views;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use self::fanout::{Subscriber, UnsentDiff};
use self::live::Live;
use self::messages::Subscribe;
use self::presence::Presence;
use self::registry::Registry;
use crate::kind::{Kinds, Limits};
use crate::protocol::ids::RoomId;
use crate::store::{LoadedRoom, Store};

pub use self::error::RoomError;
pub use self::live::wire_entry;

/// Settings every room shares, from the server `Config`.
#[derive(Debug, Clone)]
pub struct RoomConfig {
    pub limits: Limits,
    /// The room kinds this server serves, by name: `create` picks one, and a loaded
    /// room's kind judges its next ops.
    pub kinds: Kinds,
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
            kinds: Kinds::builtin(),
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

enum Status {
    /// Reading the store; the mailbox is paused (`ctx.wait`) until this ends.
    Loading,
    /// No such room in the store.
    Absent,
    Live(Box<Live>),
    /// The store could not be read; every request is answered `unavailable`.
    Failed(String),
}

impl Status {
    /// The status ladder every request climbs, written once: a failed load refuses
    /// everything, an absent room is `Ok(None)` (only `create` goes on), a room being
    /// deleted is as good as gone, and a live room goes on.
    /// A frozen room (on its way to another node, [`moving`]) refuses everything first.
    fn standing(&mut self, room_id: &RoomId, frozen: bool) -> Result<Option<&mut Live>, RoomError> {
        if frozen {
            return Err(RoomError::Moving(room_id.clone()));
        }
        match self {
            Status::Loading => unreachable!("the mailbox is paused while loading"),
            Status::Failed(e) => Err(RoomError::LoadFailed(e.clone())),
            Status::Absent => Ok(None),
            Status::Live(live) if live.deleting.is_some() => {
                Err(RoomError::Deleting(room_id.clone()))
            }
            Status::Live(live) => Ok(Some(live)),
        }
    }
}

/// The actor owning one room.
pub struct Room {
    room_id: RoomId,
    registry: Arc<Registry>,
    store: Store,
    config: Arc<RoomConfig>,
    status: Status,
    subscribers: HashMap<u64, Subscriber>,
    /// How many of `subscribers` are relayed (on other nodes): while any is, diffs also
    /// go to the registry's tap.
    n_relayed: usize,
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

impl Room {
    pub fn new(
        room_id: RoomId,
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
            n_relayed: 0,
            presence: Presence::default(),
            deferred_subs: Vec::new(),
            last_activity: Instant::now(),
            unsent: None,
            last_diff_at: None,
            diff_timer: false,
        }
    }

    /// Takes the store's answer; `started` is when the load began (for its metrics).
    fn loaded(&mut self, loaded: Result<Option<LoadedRoom>, String>, started: Instant) {
        let hot = crate::metrics::hot();
        self.status = match loaded {
            Ok(None) => {
                hot.room_loads_absent.increment(1);
                Status::Absent
            }
            Ok(Some(room)) => match recovery::rebuild(room, &self.config.kinds) {
                Ok(live) => {
                    hot.room_loads_live.increment(1);
                    Status::Live(Box::new(live))
                }
                Err(e) => {
                    hot.room_loads_failed.increment(1);
                    tracing::error!(room = %self.room_id, error = %e, "cannot load room");
                    Status::Failed(e)
                }
            },
            Err(e) => {
                hot.room_loads_failed.increment(1);
                tracing::error!(room = %self.room_id, error = %e, "cannot load room");
                Status::Failed(e)
            }
        };
        hot.room_load_seconds
            .record(started.elapsed().as_secs_f64());
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

impl Actor for Room {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The capacity the idle checks and signals test (they skip or drop when it is
        // reached). Ops and creates are bounded by the room's backlog instead
        // (`backlog.rs`): actix queues a `try_send` over capacity anyway.
        ctx.set_mailbox_capacity(256);
        let every = (self.config.idle_timeout.min(ABSENT_IDLE) / 2).max(Duration::from_millis(50));
        idle::register(ctx.address().downgrade(), every);
        let store = self.store.clone();
        let room_id = self.room_id.clone();
        let started = Instant::now();
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
        ctx.wait(load.into_actor(self).map(move |loaded, room, ctx| {
            room.loaded(loaded, started);
            room.maybe_trim(ctx, true);
        }));
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        self.registry.remove(&self.room_id, &ctx.address());
        self.registry.note_stopped();
    }
}
