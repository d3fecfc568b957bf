//! The commit pipeline: the oldest batches go to the store writer (a second one only
//! when full, see [`PIPELINE_DEPTH`]), their acks and diff leave when their commit
//! lands, in seq order (log before send), a failed commit undoes every uncommitted
//! event; plus the log trims and the deletion that ride on it.

use std::time::{Duration, Instant};

use actix::prelude::*;

use super::batch::Batch;
use super::live::{FULL_PIPELINE_DEPTH, PIPELINE_DEPTH, SMALL_BATCH_EVENTS};
use super::messages::ReplyFrames;
use super::presence::Presence;
use super::views::DiffChanges;
use super::{messages, Room, RoomError, Status};
use crate::outbound::Charge;
use crate::store::{self, TrimOutcome, TrimPolicy};

/// How often a busy room asks for a trim by `--history-age`: a quarter of the age, so
/// an event goes about 1.25 ages after its stamp once a snapshot covers it; at most ten
/// times a second for a tiny age, and at least once a minute for a long one.
fn age_check_every(age: Duration) -> Duration {
    (age / 4).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

impl Room {
    /// Hands the next batches to the store writer (see [`PIPELINE_DEPTH`]), first
    /// answering batches that hold only replies (nacks, answers to re-sent ids) when
    /// nothing is in flight before them.
    pub(super) fn flush(&mut self, ctx: &mut Context<Self>) {
        self.submit_batches(ctx, true);
    }

    /// Submits the oldest unsubmitted batch while the pipeline has room; with
    /// `answer_replies`, also answers the reply-only batches at the front and starts a
    /// pending delete once nothing is left. Without it (a batch just landed, its replies
    /// not sent yet) it only submits, so no reply overtakes that batch's.
    fn submit_batches(&mut self, ctx: &mut Context<Self>, answer_replies: bool) {
        loop {
            let Status::Live(live) = &mut self.status else {
                return;
            };
            if answer_replies && live.in_flight == 0 {
                while live.batches.front().is_some_and(|b| b.n_events() == 0) {
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
            }
            let index = live.in_flight;
            let Some(next) = live.batches.get(index) else {
                return;
            };
            // Replies behind a batch in flight wait for it; so does a batch of replies;
            // nothing goes behind a batch already refused.
            if next.n_events() == 0
                || live
                    .batches
                    .iter()
                    .take(index)
                    .any(|b| matches!(b.outcome, Some(Err(_))))
            {
                return;
            }
            // Behind a batch in flight only a full batch goes, or any batch of a room
            // whose batches are small (see PIPELINE_DEPTH), and not behind the creation
            // or while a delete waits.
            if index > 0
                && (index >= PIPELINE_DEPTH
                    || live.committed == 0
                    || live.deleting.is_some()
                    || !((next.is_full() && index < FULL_PIPELINE_DEPTH)
                        || live.last_batch_events <= SMALL_BATCH_EVENTS))
            {
                return;
            }
            // A busy room that is merging ops commits on its diffs' schedule: the batch
            // waits for the diff timer, commits, and its diff leaves as the commit lands
            // (`diff_due`). Subscribers get the changes when they would have anyway (a
            // diff could not leave before the timer); the room pays one commit per
            // interval instead of one per store round, and its acks wait up to one
            // interval. A room whose last batch held a single op (one client awaiting
            // each ack, or a trickle) does not wait, so a sequential client is not slowed
            // to one op per interval; nor does a full batch or a pending delete.
            let holds = live.merging && live.deleting.is_none() && !next.is_full();
            if let Some(wait) = self.diff_wait().filter(|_| holds) {
                self.arm_diff_timer(wait, ctx);
                return;
            }
            let Status::Live(live) = &mut self.status else {
                return;
            };
            // A snapshot rides with the batch when it is the last uncommitted one (so
            // the working state is exactly the state at its last seq) and no snapshot is
            // in flight already.
            let snapshot_due = live.batches.len() == index + 1
                && !live
                    .batches
                    .iter()
                    .take(index)
                    .any(|b| b.snapshot_seq.is_some())
                && {
                    let last = live.head;
                    last >= live.snapshot_seq + self.config.snapshot_every
                        || (last > live.snapshot_seq
                            && live.snapshot_at.elapsed() >= self.config.snapshot_interval)
                };
            let snapshot = snapshot_due.then(|| live.snapshot());
            let id = live.next_submission;
            live.next_submission += 1;
            let Some(batch) = live.batches.get_mut(index) else {
                return;
            };
            batch.snapshot_seq = snapshot.as_ref().map(|s| s.seq);
            batch.submission = Some(id);
            // Expiry is decided at submit time so the store forgets ids in the same
            // commit.
            let expire_through = live.op_ids.expire(batch.n_op_ids, self.config.op_ids_kept);
            live.merging = batch.n_events() > 1;
            live.last_batch_events = batch.n_events();
            let store_batch = store::Batch {
                // A plain copy: `to_string` goes through the formatter, a per-batch cost
                // that shows at 10,000 rooms (one op per batch).
                room: self.room_id.as_str().to_owned(),
                create: batch.create.take(),
                events: batch.take_records(),
                expire_op_ids_through: expire_through,
                snapshot,
            };
            live.in_flight += 1;
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
                            .map(move |result, room, ctx| room.committed(id, result, ctx)),
                    );
                }
                // Refused at once (queue full, writer stopped): the batch's outcome,
                // taken in its turn like any other.
                Err(e) => return self.committed(id, Err(e.to_string()), ctx),
            }
        }
    }

    /// The store answered for the batch submitted as `id`: the outcome waits in the
    /// batch until the batches before it have landed. A batch no longer there (failed
    /// with an earlier one) is ignored.
    pub(super) fn committed(
        &mut self,
        id: u64,
        result: Result<(), String>,
        ctx: &mut Context<Self>,
    ) {
        let Status::Live(live) = &mut self.status else {
            return;
        };
        let in_flight = live.in_flight;
        let Some(batch) = live
            .batches
            .iter_mut()
            .take(in_flight)
            .find(|b| b.submission == Some(id))
        else {
            return;
        };
        batch.outcome = Some(result);
        self.land(ctx);
    }

    /// Takes the answered batches at the front, oldest first: a committed one sends its
    /// acks and diff (after the next batch went to the writer, so the writer does not
    /// wait for them); a failed one undoes every uncommitted event.
    fn land(&mut self, ctx: &mut Context<Self>) {
        loop {
            let Status::Live(live) = &mut self.status else {
                return;
            };
            if live.in_flight == 0 || live.batches.front().is_none_or(|b| b.outcome.is_none()) {
                break;
            }
            let Some(mut batch) = live.batches.pop_front() else {
                return;
            };
            live.in_flight -= 1;
            match batch.outcome.take().unwrap_or(Ok(())) {
                Ok(()) => {
                    live.committed = batch.last_seq();
                    live.op_ids.committed(batch.n_op_ids);
                    let epoch = live.epoch;
                    if let Some(seq) = batch.snapshot_seq {
                        live.snapshot_seq = seq;
                        live.snapshot_at = Instant::now();
                    }
                    self.submit_batches(ctx, false);
                    // One push per connection for the batch's replies, before its diff.
                    let mut frames = ReplyFrames::default();
                    for reply in batch.replies.drain(..) {
                        reply.send_into(&mut frames);
                    }
                    frames.send();
                    self.maybe_trim(ctx, batch.snapshot_seq.is_some());
                    let Status::Live(live) = &mut self.status else {
                        return;
                    };
                    let to = live.committed;
                    // Changes nobody is told of (no subscriber here, none relayed to
                    // another node) are not built: `send_unsent` would drop them.
                    let changes = if self.subscribers.is_empty() && self.n_relayed == 0 {
                        DiffChanges::default()
                    } else {
                        batch.take_changes(live.batches.iter(), &live.state)
                    };
                    self.queue_diff(epoch, batch.first_seq, to, changes, ctx);
                    if !self.deferred_subs.is_empty() {
                        for sub in std::mem::take(&mut self.deferred_subs) {
                            let _ = self.subscribe(sub, ctx);
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(room = %self.room_id, error = %e, "commit failed; nacking uncommitted ops");
                    // Undo newest first: later batches were applied on top of earlier
                    // ones. Batches still with the writer fail there too (see
                    // PIPELINE_DEPTH); their answers find no batch and are ignored.
                    let mut failed: Vec<Batch> = live.batches.drain(..).collect();
                    failed.insert(0, batch);
                    live.in_flight = 0;
                    // Their ops are nacked: a re-send is a new op.
                    live.op_ids.forget_uncommitted();
                    for batch in failed.into_iter().rev() {
                        batch.fail(&mut live.state, live.committed, &e);
                    }
                    live.head = live.committed;
                    if live.committed == 0 {
                        // The creation itself failed: the room does not exist.
                        self.status = Status::Absent;
                        let failed = self.error_msg(&RoomError::CommitFailed(e));
                        for sub in std::mem::take(&mut self.deferred_subs) {
                            sub.session.send(&failed, Charge::Full);
                        }
                        return;
                    }
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
    pub(super) fn maybe_trim(&mut self, ctx: &mut Context<Self>, snapshot_moved: bool) {
        // A frozen room's rows are being copied: nothing of them changes now.
        if self.registry.moving().is_frozen(&self.room_id) {
            return;
        }
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
        // keep their ids apart.
        let keep_op_ids_from = live.op_ids.oldest_seq();
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
    pub(super) fn start_delete(&mut self, ctx: &mut Context<Self>) {
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
                    let _ = reply.send(Err(RoomError::DeleteRefused(e.to_string())));
                }
            }
        }
    }

    /// The store removed the room: its subscribers are told and dropped, and the room
    /// is absent (a later create gets a new epoch).
    pub(super) fn deleted(&mut self, result: Result<(), String>) {
        let Status::Live(live) = &mut self.status else {
            return;
        };
        let reply = live.deleting.take();
        if let Err(e) = result {
            if let Some(reply) = reply {
                let _ = reply.send(Err(RoomError::DeleteFailed(e)));
            }
            return;
        }
        let gone = self.error_msg(&RoomError::Deleted(self.room_id.clone()));
        for (_, sub) in self.subscribers.drain() {
            sub.session.evict(&self.room_id);
            sub.session.send(&gone, Charge::Full);
        }
        if std::mem::take(&mut self.n_relayed) > 0 {
            if let Some(tap) = self.registry.tap() {
                tap.send(super::tap::Tapped::Deleted {
                    room: self.room_id.clone(),
                });
            }
        }
        self.presence = Presence::default();
        self.unsent = None;
        self.status = Status::Absent;
        tracing::info!(room = %self.room_id, "room deleted");
        if let Some(reply) = reply {
            let _ = reply.send(Ok(()));
        }
    }
}
