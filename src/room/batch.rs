//! A room's batch of uncommitted events: what the store commits together and what goes
//! out together once it has (the acks, in arrival order, and one coalesced diff).

use super::messages::{OpDone, ReplyFrames, ReplyTo};
use super::op_ids::{OpKey, OpKeyMap};
use super::views::{DiffChanges, Seen};
use super::RoomError;
use crate::kind::{Changes, RoomState, Slot, Undo};
use crate::store::{EventRecord, RoomMeta};
use std::collections::BTreeMap;

/// A reply held back until the batch it follows is committed, so replies to one caller
/// leave in the order its ops arrived.
#[derive(Debug)]
pub enum Reply {
    Ack(ReplyTo, OpDone),
    Nack(ReplyTo, RoomError),
}

impl Reply {
    pub fn send(self) {
        match self {
            Reply::Ack(to, done) => to.ack(done),
            Reply::Nack(to, error) => to.nack(error),
        }
    }

    /// Sends the reply, a WebSocket connection's through `frames` (see [`ReplyFrames`]).
    pub fn send_into(self, frames: &mut ReplyFrames) {
        match self {
            Reply::Ack(to, done) => to.ack_into(done, frames),
            Reply::Nack(to, error) => to.nack_into(error, frames),
        }
    }
}

/// One accepted event waiting for its commit.
pub struct BatchEvent {
    pub seq: u64,
    /// The log record; moved to the store when the batch is submitted.
    pub record: Option<EventRecord>,
    /// Restores the working state if the commit fails.
    pub undo: Undo,
}

/// Most events in one batch.
pub const MAX_BATCH_EVENTS: usize = 1024;
/// Most bytes of changed values (as JSON) in one batch, which bounds a diff frame.
pub const MAX_BATCH_BYTES: usize = 512 * 1024;

/// The most events a new batch makes room for up front: a busy room's batches grow past
/// it as they would have anyway, and a room whose last batch was large does not hold a
/// large allocation for a batch of one op.
pub const EXPECTED_EVENTS_CAP: usize = 64;

/// Events applied to the working state and not yet committed.
pub struct Batch {
    /// Seq of the first event (the previous batch's last + 1).
    pub first_seq: u64,
    /// Set in the batch that creates the room.
    pub create: Option<RoomMeta>,
    pub events: Vec<BatchEvent>,
    /// Acks and nacks in arrival order; sent after the commit.
    pub replies: Vec<Reply>,
    /// Each public key this batch changed, with its slot before the batch (None: the
    /// key did not exist). Lays the committed view over the working state.
    pub priors: BTreeMap<String, Option<Slot>>,
    /// Each public key this batch changed, at its last value: the batch's diff.
    pub coalesced: BTreeMap<String, Slot>,
    /// Op ids of this batch's events with their seqs, in seq order, remembered once
    /// committed. Indexed: every op with an id asks whether its id is in flight, and a
    /// scan would cost as many comparisons as a busy room has ops in flight.
    pub op_ids: OpKeyMap<u64>,
    /// Approximate JSON size of the changed values, for [`MAX_BATCH_BYTES`].
    bytes: usize,
    /// Set when a snapshot at this seq was submitted with the batch.
    pub snapshot_seq: Option<u64>,
    /// Set when the batch went to the store: the id its answer comes back with.
    pub submission: Option<u64>,
    /// The store's answer, kept until every batch before it has landed.
    pub outcome: Option<Result<(), String>>,
}

impl Batch {
    /// An empty batch with room for `expected` events without growing (the room's
    /// previous batch size, see [`EXPECTED_EVENTS_CAP`]).
    pub fn new(first_seq: u64, expected: usize) -> Batch {
        let expected = expected.min(EXPECTED_EVENTS_CAP);
        Batch {
            first_seq,
            create: None,
            events: Vec::with_capacity(expected),
            replies: Vec::with_capacity(expected),
            priors: BTreeMap::new(),
            coalesced: BTreeMap::new(),
            op_ids: OpKeyMap::with_capacity_and_hasher(expected, Default::default()),
            bytes: 0,
            snapshot_seq: None,
            submission: None,
            outcome: None,
        }
    }

    /// A full batch takes no more events; the next one opens.
    pub fn is_full(&self) -> bool {
        self.events.len() >= MAX_BATCH_EVENTS || self.bytes >= MAX_BATCH_BYTES
    }

    /// Moves the log records out, for the store.
    pub fn take_records(&mut self) -> Vec<EventRecord> {
        let mut records = Vec::with_capacity(self.events.len());
        records.extend(self.events.iter_mut().filter_map(|e| e.record.take()));
        records
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.replies.is_empty()
    }

    pub fn last_seq(&self) -> u64 {
        self.events
            .last()
            .map_or(self.first_seq.saturating_sub(1), |e| e.seq)
    }

    /// Records the prior slot of every public key `changes` touches, before they apply.
    pub fn note_priors(&mut self, state: &RoomState, changes: &Changes) {
        for (key, _) in &changes.public {
            if !self.priors.contains_key(key) {
                self.priors.insert(key.clone(), state.get(key).cloned());
            }
        }
    }

    /// Adds an event applied to `state`, its ack (in arrival order) and its op id.
    pub fn add_event(
        &mut self,
        record: EventRecord,
        undo: Undo,
        op_key: Option<OpKey>,
        reply: ReplyTo,
        epoch: u64,
        state: &RoomState,
    ) {
        let seq = record.seq;
        for (key, value) in &record.changes.public {
            self.bytes += key.len() + value.as_ref().map_or(4, |v| v.json_size());
            // The slot as `apply` left it, audience included.
            let slot = state
                .get(key)
                .cloned()
                .unwrap_or_else(|| Slot::new(value.clone(), seq));
            // A key the batch already changed keeps its entry (no second copy of it).
            match self.coalesced.get_mut(key) {
                Some(coalesced) => *coalesced = slot,
                None => {
                    self.coalesced.insert(key.clone(), slot);
                }
            }
        }
        if let Some(key) = op_key {
            self.op_ids.insert(key, seq);
        }
        self.replies.push(Reply::Ack(reply, OpDone { seq, epoch }));
        self.events.push(BatchEvent {
            seq,
            record: Some(record),
            undo,
        });
    }

    /// The seq of an uncommitted event carrying this op id.
    pub fn seq_of(&self, key: &OpKey) -> Option<u64> {
        self.op_ids.get(key).copied()
    }

    /// Moves out the batch's changes, each key at its last value: its part of a diff,
    /// with who could see each key that ends hidden before the batch.
    pub fn take_coalesced(&mut self) -> DiffChanges {
        let slots = std::mem::take(&mut self.coalesced);
        let before = slots
            .iter()
            .filter(|(_, slot)| slot.audience.is_some())
            .map(|(key, _)| {
                let prior = self.priors.get(key).and_then(Option::as_ref);
                (key.clone(), Seen::of(prior))
            })
            .collect();
        DiffChanges { slots, before }
    }

    /// The commit failed: undo this batch's events (newest first) and answer every
    /// reply; acks of events that are not committed become `unavailable` nacks.
    pub fn fail(self, state: &mut RoomState, committed: u64, store_error: &str) {
        for event in self.events.into_iter().rev() {
            state.undo(event.undo);
        }
        for reply in self.replies {
            match reply {
                Reply::Ack(to, done) if done.seq > committed => {
                    to.nack(RoomError::CommitFailed(store_error.to_owned()));
                }
                other => other.send(),
            }
        }
    }
}
