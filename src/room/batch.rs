//! A room's batch of uncommitted events: what the store commits together and what goes
//! out together once it has (the acks, in arrival order, and one coalesced diff).

use super::messages::{OpDone, ReplyFrames, ReplyTo};
use super::views::{DiffChanges, Seen};
use super::RoomError;
use crate::kind::{RoomState, Slot, Undo};
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
    /// How many events the batch holds (seqs `first_seq..first_seq + n_events`).
    n_events: usize,
    /// The events' log records in seq order, moved to the store (all at once, no copy)
    /// when the batch is submitted.
    records: Vec<EventRecord>,
    /// What restores the private facts of the events that changed any, oldest first, if
    /// the commit fails (public keys are restored from [`Batch::priors`]).
    undos: Vec<Undo>,
    /// Acks and nacks in arrival order; sent after the commit.
    pub replies: Vec<Reply>,
    /// Each public key this batch changed, with its slot before the batch (None: the
    /// key did not exist). Lays the committed view over the working state, puts the
    /// keys back if the commit fails ([`Batch::fail`]), and names the keys of the
    /// batch's diff ([`Batch::take_changes`]). The slots are the ones the first apply
    /// of each key replaced, moved here, not copied.
    pub priors: BTreeMap<String, Option<Slot>>,
    /// How many of this batch's events carry an op id: the room's window holds them
    /// (`OpIds`), counted as acked when the batch lands.
    pub n_op_ids: usize,
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
            n_events: 0,
            records: Vec::with_capacity(expected),
            undos: Vec::new(),
            replies: Vec::with_capacity(expected),
            priors: BTreeMap::new(),
            n_op_ids: 0,
            bytes: 0,
            snapshot_seq: None,
            submission: None,
            outcome: None,
        }
    }

    /// A full batch takes no more events; the next one opens.
    pub fn is_full(&self) -> bool {
        self.n_events >= MAX_BATCH_EVENTS || self.bytes >= MAX_BATCH_BYTES
    }

    /// How many events the batch holds (0: only replies).
    pub fn n_events(&self) -> usize {
        self.n_events
    }

    /// Moves the log records out, for the store.
    pub fn take_records(&mut self) -> Vec<EventRecord> {
        std::mem::take(&mut self.records)
    }

    pub fn is_empty(&self) -> bool {
        self.n_events == 0 && self.replies.is_empty()
    }

    pub fn last_seq(&self) -> u64 {
        (self.first_seq + self.n_events as u64).saturating_sub(1)
    }

    /// Keeps the slot an apply of this batch replaced under `key`, if it is the
    /// batch's first change of the key (`None`: the key was absent); a later change's
    /// is dropped.
    pub fn note_prior(&mut self, key: &str, before: Option<Slot>) {
        if !self.priors.contains_key(key) {
            self.priors.insert(key.to_owned(), before);
        }
    }

    /// Adds an event applied to the working state (its public keys' slots from before
    /// noted with [`Batch::note_prior`], its op id, if any, added to the room's window)
    /// and its ack, in arrival order.
    pub fn add_event(&mut self, record: EventRecord, undo: Undo, reply: ReplyTo, epoch: u64) {
        let seq = record.seq;
        for (key, value) in &record.changes.public {
            self.bytes += key.len() + value.as_ref().map_or(4, |v| v.json_size());
        }
        if record.op_id.is_some() {
            self.n_op_ids += 1;
        }
        debug_assert_eq!(
            seq,
            self.first_seq + self.n_events as u64,
            "seqs run gaplessly"
        );
        self.n_events += 1;
        self.replies.push(Reply::Ack(reply, OpDone { seq, epoch }));
        self.records.push(record);
        if !undo.is_empty() {
            self.undos.push(undo);
        }
    }

    /// The batch's changes, each key at its last value: its part of a diff, with who
    /// could see each key that ends hidden before the batch. Taken when the batch has
    /// landed and someone is told, so a room nobody watches copies no slot per op.
    ///
    /// A key's last value in this batch is the slot before the first later batch that
    /// changed it again (its prior there), else the working state's slot: `later` are
    /// the room's uncommitted batches after this one, oldest first. Every key a batch
    /// changed holds a slot afterwards (a deletion leaves a tombstone, and a trim
    /// prunes none newer than the commit that asked for it), so both are found.
    pub fn take_changes<'a>(
        &mut self,
        later: impl Iterator<Item = &'a Batch> + Clone,
        state: &RoomState,
    ) -> DiffChanges {
        let priors = std::mem::take(&mut self.priors);
        let last_seq = self.last_seq();
        let mut slots = BTreeMap::new();
        let mut before = BTreeMap::new();
        for (key, prior) in priors {
            let last = later
                .clone()
                .find_map(|batch| batch.priors.get(&key))
                .map_or_else(|| state.get(&key), Option::as_ref)
                .cloned()
                // Not reached (see above); a tombstone is the safe reading of a key
                // that holds nothing.
                .unwrap_or_else(|| Slot::new(None, last_seq));
            if last.audience.is_some() {
                before.insert(key.clone(), Seen::of(prior.as_ref()));
            }
            slots.insert(key, last);
        }
        DiffChanges { slots, before }
    }

    /// The commit failed: undo this batch's events (their private facts newest first,
    /// their public keys from the slots before the batch) and answer every reply; acks
    /// of events that are not committed become `unavailable` nacks.
    pub fn fail(self, state: &mut RoomState, committed: u64, store_error: &str) {
        for undo in self.undos.into_iter().rev() {
            state.undo(undo);
        }
        for (key, prior) in self.priors {
            state.restore_public(&key, prior);
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
