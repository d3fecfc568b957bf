//! A live room's state: the working state (committed plus in-flight events) that ops
//! are validated against, the uncommitted batches, and the committed view that
//! snapshots, `resumed` and HTTP reads serve.
//!
//! The committed view is the working state with the in-flight keys' prior slots laid
//! over it ([`Batch::priors`]), so it costs no copy of the room.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use super::batch::{self, Batch};
use super::messages::{OpDone, ReplyTo};
use super::op_ids::{OpIds, OpKey};
use super::RoomError;
use crate::kind::{Changes, KindRef, RoomState, Slot};
use crate::protocol::message::{WireEntry, WireValue};
use crate::store::{EventRecord, Snapshot};

/// The most batches of one room with the store writer at once. A batch goes to the
/// writer behind one being committed in two cases:
/// - it is full (a busy room): the writer commits the room's batches back to back
///   instead of waiting for the room to hear of each commit before it gets the next;
/// - the room's last batch was small (at most [`SMALL_BATCH_EVENTS`]: ops arrive a few
///   at a time, as in a burst from several clients): such a room's latency is its
///   commits', so its next op goes to the writer at once and joins the next commit,
///   instead of waiting for the room to hear of the one running (a whole commit cycle
///   more) and then for the commit after.
///
/// A room whose batches are larger (ops arrive faster than commits land, a closed loop)
/// keeps one in flight so its next batch grows and its per-batch cost stays spread over
/// many ops; a small room's extra batches fill the pipeline and then grow the same way.
/// The store refuses a batch that does not continue its room's stored head
/// (`StoreError::SeqGap`) and stops all writes after a failed commit, so a batch behind
/// a failed one never lands: the log stays gapless.
pub(super) const PIPELINE_DEPTH: usize = 4;

/// The most batches in flight with a full one among them: two keep the writer
/// committing a busy room's batches back to back, each as large as a batch gets.
pub(super) const FULL_PIPELINE_DEPTH: usize = 2;

/// A room whose last batch held at most this many events sends its next one without
/// waiting for the one in flight (see [`PIPELINE_DEPTH`]).
pub(super) const SMALL_BATCH_EVENTS: usize = 4;

/// A room that exists: its state and its commit pipeline.
pub(super) struct Live {
    /// The room's kind: its rules judge every op.
    pub(super) kind: KindRef,
    pub(super) epoch: u64,
    pub(super) state: RoomState,
    /// Seq of the last event applied to `state` (committed or not).
    pub(super) head: u64,
    /// Seq of the last committed event; 0 while the creation is being committed.
    pub(super) committed: u64,
    /// Uncommitted batches, oldest first. The first `in_flight` of them are with the
    /// store writer (at most [`PIPELINE_DEPTH`]: the writer commits them in order, and
    /// their outcomes are taken in seq order, so acks and diffs leave in seq order); the
    /// others wait their turn. Each batch is capped ([`Batch::is_full`]) so a busy room's
    /// diffs stay bounded in size.
    pub(super) batches: VecDeque<Batch>,
    pub(super) in_flight: usize,
    /// The id the next batch handed to the store gets, so an answer finds its batch
    /// (and the answer of a batch already failed finds none).
    pub(super) next_submission: u64,
    /// The last batch submitted held more than one event: ops arrive faster than
    /// commits land, so a busy room holds its next batch (see `Room::flush`).
    pub(super) merging: bool,
    /// Events in the last batch submitted: the room a new batch makes for events up
    /// front, so a busy room's batches do not grow step by step.
    pub(super) last_batch_events: usize,
    /// Acked op ids, to answer re-sent ops.
    pub(super) op_ids: OpIds,
    /// Seq and time of the newest snapshot written (0: none yet).
    pub(super) snapshot_seq: u64,
    pub(super) snapshot_at: Instant,
    /// A snapshot-only commit (at shutdown) is in flight.
    pub(super) snapshot_in_flight: bool,
    /// A trim of the log is running in the store.
    pub(super) trim_in_flight: bool,
    /// When this room last asked for a trim, so the age limit is checked at most once
    /// per [`age_check_every`] instead of after every commit.
    pub(super) trim_asked_at: Option<Instant>,
    /// A `DELETE` waiting for the uncommitted batches to drain, then for the store.
    pub(super) deleting: Option<oneshot::Sender<Result<(), RoomError>>>,
}

impl Live {
    pub(super) fn new(kind: KindRef, epoch: u64, state: RoomState, head: u64) -> Live {
        Live {
            kind,
            epoch,
            state,
            head,
            committed: head,
            batches: VecDeque::new(),
            in_flight: 0,
            next_submission: 0,
            merging: false,
            last_batch_events: 0,
            op_ids: OpIds::default(),
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
    pub(super) fn snapshot(&self) -> Snapshot {
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

impl Live {
    /// Applies an accepted event to the working state and adds it to the pending batch.
    pub(super) fn apply_event(
        &mut self,
        user: &Arc<str>,
        now_ms: i64,
        op: crate::value::Value,
        mut changes: Changes,
        op_key: Option<OpKey>,
        reply: ReplyTo,
    ) {
        // The batch opens before head moves: a new batch's first seq is head + 1.
        self.open_batch();
        self.head += 1;
        let seq = self.head;
        self.state.complete_audiences(&mut changes);
        // `open_batch` just made sure there is one.
        let batch = self.batches.back_mut().expect("a batch is open");
        // The slots the apply replaces become the batch's priors (moved, not copied),
        // which also undo its public keys if the commit fails.
        let undo = self
            .state
            .apply_handing_back(seq, &changes, |key, before| batch.note_prior(key, before));
        let record = EventRecord {
            seq,
            user: String::from(&**user),
            ts_ms: now_ms,
            op,
            changes,
            op_id: op_key.as_ref().map(|key| key.id.clone()),
        };
        batch.add_event(record, undo, reply, self.epoch);
        if let Some(key) = op_key {
            self.op_ids.add_uncommitted(key, seq);
        }
    }

    pub(super) fn done(&self, seq: u64) -> OpDone {
        OpDone {
            seq,
            epoch: self.epoch,
        }
    }

    /// The batch new events and replies join: the newest one, unless it is with the
    /// store writer or is full.
    pub(super) fn open_batch(&mut self) -> &mut Batch {
        let usable = match self.batches.back() {
            Some(last) => !last.is_full() && self.batches.len() > self.in_flight,
            None => false,
        };
        if !usable {
            self.batches
                .push_back(Batch::new(self.head + 1, self.last_batch_events));
        }
        // Just ensured non-empty.
        self.batches.back_mut().expect("a batch was just pushed")
    }

    /// Sends a reply now if nothing is in line before it, else after the newest batch.
    pub(super) fn reply_later(&mut self, reply: batch::Reply) {
        if self.batches.is_empty() {
            reply.send();
        } else {
            self.open_batch().replies.push(reply);
        }
    }

    pub(super) fn reply_ack(&mut self, reply: ReplyTo, seq: u64) {
        let done = self.done(seq);
        self.reply_later(batch::Reply::Ack(reply, done));
    }

    pub(super) fn reply_nack(&mut self, reply: ReplyTo, error: RoomError) {
        self.reply_later(batch::Reply::Nack(reply, error));
    }

    /// The committed live entries `viewer` may see, sorted by key.
    pub(super) fn committed_entries(&self, viewer: &str) -> Vec<WireEntry> {
        let overlay = self.overlay();
        let mut out = Vec::new();
        let mut overlay_iter = overlay.iter().peekable();
        for (key, slot) in self.state.entries() {
            while let Some((okey, oslot)) = overlay_iter.peek() {
                if okey.as_str() < key {
                    push_live(&mut out, okey, oslot, viewer);
                    overlay_iter.next();
                } else {
                    break;
                }
            }
            if overlay.contains_key(key) || !slot.visible_to(viewer) {
                continue;
            }
            out.push(wire_entry(key, slot));
        }
        for (okey, oslot) in overlay_iter {
            push_live(&mut out, okey, oslot, viewer);
        }
        // Overlay keys equal to a working key were skipped above and are pushed here or
        // in the loop; sort once to keep the contract's key order.
        out.sort_by(|a, b| a.k.cmp(&b.k));
        out.dedup_by(|a, b| a.k == b.k);
        out
    }

    /// Committed entries and tombstones with ver > since that `viewer` may see, or None
    /// when tombstones that old may be pruned, or when an entry hidden from `viewer` was
    /// taken from some viewers after `since` (`viewer` may have held it, and only a
    /// snapshot can tell it the entry is gone). Entries hidden from `viewer` all along
    /// since `since` leave no trace.
    pub(super) fn committed_changes_since(
        &self,
        since: u64,
        viewer: &str,
    ) -> Option<Vec<WireEntry>> {
        self.with_changed_since(since, |changed| view_since(changed, since, Some(viewer)))?
    }

    /// The committed changes since `since` in every distinct view (a catch-up for a
    /// node that mirrors the room): the public view (a viewer named in no changed
    /// entry's audience) first, then one per user named in one. Each view is what
    /// [`Live::committed_changes_since`] answers its viewers; None when tombstones that
    /// old may be pruned.
    pub(super) fn committed_views_since(
        &self,
        since: u64,
    ) -> Option<Vec<super::messages::CatchUpView>> {
        self.with_changed_since(since, |changed| {
            let mut named = std::collections::BTreeSet::new();
            for (_, slot) in changed {
                if let Some(audience) = &slot.audience {
                    named.extend(audience.users().iter().cloned());
                }
            }
            let mut views = vec![(None, view_since(changed, since, None))];
            for user in named {
                let view = view_since(changed, since, Some(&user));
                views.push((Some(user), view));
            }
            views
        })
    }

    /// Calls `f` with the committed entries and tombstones with ver > since, or None
    /// when tombstones that old may be pruned.
    fn with_changed_since<R>(
        &self,
        since: u64,
        f: impl FnOnce(&[(&str, &Slot)]) -> R,
    ) -> Option<R> {
        let overlay = self.overlay();
        let working = self.state.changed_since(since)?;
        let mut changed: Vec<(&str, &Slot)> = working
            .into_iter()
            .filter(|(k, _)| !overlay.contains_key(*k))
            .collect();
        for (key, prior) in &overlay {
            if let Some(slot) = prior {
                if slot.ver > since {
                    changed.push((key, slot));
                }
            }
        }
        Some(f(&changed))
    }

    /// For each key changed by uncommitted events, its committed slot (None: absent).
    pub(super) fn overlay(&self) -> BTreeMap<String, Option<Slot>> {
        let mut overlay = BTreeMap::new();
        for batch in &self.batches {
            for (key, prior) in &batch.priors {
                overlay.entry(key.clone()).or_insert_with(|| prior.clone());
            }
        }
        overlay
    }
}

/// What `viewer` (None: a viewer named in no audience) may be told of `changed` since
/// `since`, sorted by key; None when an entry hidden from it was taken from some viewers
/// after `since` (only a snapshot can tell it the entry is gone).
fn view_since(
    changed: &[(&str, &Slot)],
    since: u64,
    viewer: Option<&str>,
) -> Option<Vec<WireEntry>> {
    let mut out = Vec::with_capacity(changed.len());
    for (key, slot) in changed {
        match &slot.audience {
            Some(audience) if !viewer.is_some_and(|v| audience.contains(v)) => {
                if audience.narrowed_after(since) {
                    return None;
                }
            }
            _ => out.push(wire_entry(key, slot)),
        }
    }
    out.sort_by(|a, b| a.k.cmp(&b.k));
    Some(out)
}

fn push_live(out: &mut Vec<WireEntry>, key: &str, prior: &Option<Slot>, viewer: &str) {
    if let Some(slot) = prior {
        if slot.value.is_some() && slot.visible_to(viewer) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::StateKind;
    use crate::value::Value;

    /// A live room whose events 1..=n made these changes, all committed.
    fn room(events: &[Changes]) -> Live {
        let mut state = RoomState::new();
        for (seq, changes) in (1u64..).zip(events) {
            let mut changes = changes.clone();
            state.complete_audiences(&mut changes);
            state.apply(seq, &changes);
        }
        Live::new(Arc::new(StateKind), 1, state, events.len() as u64)
    }

    /// Applies `changes` as the room's next event, in its open batch.
    fn apply(live: &mut Live, changes: Changes) {
        let (reply, _answer) = oneshot::channel();
        let user: Arc<str> = Arc::from("u");
        live.apply_event(&user, 0, Value::Null, changes, None, ReplyTo::http(reply));
    }

    fn slot_of(changes: &crate::room::views::DiffChanges, key: &str) -> (Option<Value>, u64) {
        let slot = &changes.slots[key];
        (slot.value.clone(), slot.ver)
    }

    #[test]
    fn a_landed_batchs_diff_holds_its_own_last_values_not_a_later_batchs() {
        let mut live = room(&[
            Changes::default().put("a", Value::Int(0)),
            Changes::default().put("b", Value::Int(0)),
        ]);
        apply(&mut live, Changes::default().put("a", Value::Int(1)));
        apply(
            &mut live,
            Changes::default()
                .put("a", Value::Int(2))
                .put("c", Value::Int(2)),
        );
        // The first batch is with the writer: the next event opens a second one.
        live.in_flight = 1;
        apply(
            &mut live,
            Changes::default().put("a", Value::Int(3)).delete("b"),
        );
        assert_eq!(live.batches.len(), 2);
        let mut first = live.batches.pop_front().expect("two batches");
        let changes = first.take_changes(live.batches.iter(), &live.state);
        assert_eq!(changes.len(), 2, "a and c, each once");
        assert_eq!(slot_of(&changes, "a"), (Some(Value::Int(2)), 4));
        assert_eq!(slot_of(&changes, "c"), (Some(Value::Int(2)), 4));
        assert!(changes.is_shared());
        let mut second = live.batches.pop_front().expect("the second batch");
        let changes = second.take_changes(live.batches.iter(), &live.state);
        assert_eq!(slot_of(&changes, "a"), (Some(Value::Int(3)), 5));
        assert_eq!(
            slot_of(&changes, "b"),
            (None, 5),
            "a deletion is a tombstone"
        );
    }

    #[test]
    fn failed_batches_put_back_every_public_key_and_private_fact() {
        let mut live = room(&[
            Changes::default().put("a", Value::Int(0)),
            Changes::default().put("msg/1", Value::Int(0)),
            Changes::default().put_for("hand", Value::Int(0), ["alice"]),
        ]);
        let before = live.state.clone();
        apply(
            &mut live,
            Changes::default()
                .put("a", Value::Int(1))
                .delete("msg/1")
                .put("msg/2", Value::Int(1))
                .put_private("x", Value::Int(1)),
        );
        apply(&mut live, Changes::default().put("hand", Value::Int(1)));
        live.in_flight = 1;
        apply(
            &mut live,
            Changes::default()
                .put("a", Value::Int(2))
                .delete("msg/2")
                .put_for("new", Value::Int(2), ["bob"])
                .delete_private("x"),
        );
        assert_ne!(live.state, before);
        let committed = live.committed;
        for batch in live.batches.drain(..).rev() {
            batch.fail(&mut live.state, committed, "disk gone");
        }
        assert_eq!(live.state, before);
        assert_eq!(format!("{:?}", live.state), format!("{before:?}"));
    }

    /// The same room rebuilt from a snapshot of it (after a restart).
    fn rebuilt(live: &Live) -> Live {
        let snapshot = live.snapshot();
        let state =
            RoomState::from_parts(snapshot.public, snapshot.private, snapshot.tombstone_floor);
        Live::new(live.kind.clone(), live.epoch, state, live.head)
    }

    fn keys(entries: Option<Vec<WireEntry>>) -> Option<Vec<(String, bool)>> {
        entries.map(|entries| entries.into_iter().map(|e| (e.k, e.v.is_some())).collect())
    }

    /// `hand` public at 1, narrowed to alice at 2, rewritten for alice alone at 3.
    fn narrowed_then_rewritten() -> Live {
        room(&[
            Changes::default().put("hand", Value::Int(1)),
            Changes::default().put_for("hand", Value::Int(2), ["alice"]),
            Changes::default().put_for("hand", Value::Int(3), ["alice"]),
        ])
    }

    #[test]
    fn a_resume_across_a_narrowing_then_a_rewrite_learns_the_entry_is_gone() {
        let live = narrowed_then_rewritten();
        assert_eq!(
            keys(live.committed_changes_since(1, "carol")),
            None,
            "carol held `hand` at 1: only a snapshot tells her it is gone"
        );
        assert_eq!(
            keys(live.committed_changes_since(2, "carol")),
            Some(vec![]),
            "from 2 on carol never saw `hand`: no trace"
        );
        assert_eq!(
            keys(live.committed_changes_since(1, "alice")),
            Some(vec![("hand".into(), true)])
        );
    }

    #[test]
    fn a_deletion_after_a_narrowing_is_no_trace_for_who_never_saw_the_entry() {
        let live = room(&[
            Changes::default().put("hand", Value::Int(1)),
            Changes::default().put_for("hand", Value::Int(2), ["alice"]),
            Changes::default().delete("hand"),
            Changes::default().put("round", Value::Int(2)),
        ]);
        assert_eq!(keys(live.committed_changes_since(1, "carol")), None);
        assert_eq!(
            keys(live.committed_changes_since(2, "carol")),
            Some(vec![("round".into(), true)])
        );
        assert_eq!(
            keys(live.committed_changes_since(2, "alice")),
            Some(vec![("hand".into(), false), ("round".into(), true)])
        );
    }

    #[test]
    fn a_widened_audience_still_tells_who_lost_the_entry_before() {
        let live = room(&[
            Changes::default().put("hand", Value::Int(1)),
            Changes::default().put_for("hand", Value::Int(2), ["alice"]),
            Changes::default().put_for("hand", Value::Int(3), ["alice", "bob"]),
        ]);
        assert_eq!(keys(live.committed_changes_since(1, "carol")), None);
        assert_eq!(keys(live.committed_changes_since(2, "carol")), Some(vec![]));
        assert_eq!(
            keys(live.committed_changes_since(2, "bob")),
            Some(vec![("hand".into(), true)])
        );
    }

    #[test]
    fn a_hidden_entry_over_a_public_tombstone_is_news_only_to_who_missed_the_deletion() {
        // An rps round: `move/bob` deleted for all at 2, then bob's hidden move at 3.
        let live = room(&[
            Changes::default().put("move/bob", Value::Int(1)),
            Changes::default().delete("move/bob"),
            Changes::default().put_for("move/bob", Value::Int(2), ["bob"]),
        ]);
        assert_eq!(keys(live.committed_changes_since(1, "carol")), None);
        assert_eq!(
            keys(live.committed_changes_since(2, "carol")),
            Some(vec![]),
            "carol saw the deletion: bob's move leaves her no trace"
        );
    }

    #[test]
    fn a_rebuilt_room_resumes_across_a_narrowing_by_snapshot() {
        let live = rebuilt(&narrowed_then_rewritten());
        assert_eq!(
            keys(live.committed_changes_since(1, "carol")),
            None,
            "how `hand` got its audience is not in a snapshot: a resume from before \
             its last write cannot be told apart from one across the narrowing"
        );
        assert_eq!(keys(live.committed_changes_since(3, "carol")), Some(vec![]));
    }
}
