//! Fan-out: subscriptions (answered with `snapshot` or `resumed`), diff batching (at
//! most one diff per `batch_interval` for a busy room), presence, and broadcasting a
//! message to every subscriber, encoded once per encoding.

use std::time::{Duration, Instant};

use actix::prelude::*;

use super::messages::{Answered, Subscribe};
use super::tap::{TapView, Tapped};
use super::views::DiffChanges;
use super::{batch, presence, Room, RoomError, Status};
use crate::outbound::{encode, Charge, Frame, Pushed, SessionRef};
use crate::protocol::message::ServerMsg;
use crate::protocol::Encoding;

/// One connection subscribed to this room.
pub(super) struct Subscriber {
    pub(super) session: SessionRef,
    pub(super) presence: bool,
    /// A connection on another node (a cluster relay): it gets no diff from here; its
    /// node gets the room's diffs once through the tap (`room::tap`).
    pub(super) relayed: bool,
    /// Counts this subscription in `roomd_subscriptions` for as long as it exists,
    /// whichever way it ends (unsubscribe, overflow, deletion, the room stopping).
    _counted: OpenSubscription,
}

/// One open subscription in the `roomd_subscriptions` gauge, from its creation to its
/// drop.
struct OpenSubscription;

impl OpenSubscription {
    fn new() -> OpenSubscription {
        let hot = crate::metrics::hot();
        hot.subscriptions_started.increment(1);
        hot.subscriptions.increment(1.0);
        OpenSubscription
    }
}

impl Drop for OpenSubscription {
    fn drop(&mut self) {
        crate::metrics::hot().subscriptions.decrement(1.0);
    }
}

/// Committed changes waiting for the next diff frame.
pub(super) struct UnsentDiff {
    epoch: u64,
    from: u64,
    to: u64,
    changes: DiffChanges,
}

impl Room {
    /// An `error` about this room.
    pub(super) fn error_msg(&self, e: &RoomError) -> ServerMsg {
        ServerMsg::Error {
            code: e.code(),
            room: Some(self.room_id.to_string()),
            msg: e.to_string(),
        }
    }

    /// Adds a committed batch's changes to the next diff, and sends it now if the room
    /// has been quiet for `batch_interval` (an idle room's diff leaves right after its
    /// commit), else when the interval is up. A diff that grew past the batch byte cap
    /// leaves at once.
    pub(super) fn queue_diff(
        &mut self,
        epoch: u64,
        from: u64,
        to: u64,
        changes: DiffChanges,
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
    pub(super) fn diff_wait(&self) -> Option<Duration> {
        if self.subscribers.is_empty() {
            return None;
        }
        let elapsed = self.last_diff_at?.elapsed();
        self.config
            .batch_interval
            .checked_sub(elapsed)
            .filter(|wait| !wait.is_zero())
    }

    pub(super) fn arm_diff_timer(&mut self, wait: Duration, ctx: &mut Context<Self>) {
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
    pub(super) fn diff_due(&mut self, ctx: &mut Context<Self>) {
        self.flush(ctx);
        let commit_coming = matches!(&self.status, Status::Live(live) if live.in_flight > 0);
        if !commit_coming {
            self.send_unsent();
        }
    }

    /// Sends the committed-but-unsent changes as one diff.
    pub(super) fn send_unsent(&mut self) {
        let Some(unsent) = self.unsent.take() else {
            return;
        };
        // Nobody to tell (no subscriber here, none relayed to another node): the changes
        // are dropped unencoded; a later subscriber starts from a snapshot of them.
        if self.subscribers.is_empty() && self.n_relayed == 0 {
            return;
        }
        let room = self.room_id.to_string();
        let diff = |changes| ServerMsg::Diff {
            room: room.clone(),
            epoch: unsent.epoch,
            from: unsent.from,
            to: unsent.to,
            changes,
        };
        // A diff to nobody does not count: the first subscriber's first diff leaves at
        // once.
        if !self.subscribers.is_empty() {
            self.last_diff_at = Some(Instant::now());
        }
        if unsent.changes.is_shared() {
            // Every viewer sees the same diff: encoded once per encoding.
            let msg = diff(unsent.changes.shared_entries());
            self.broadcast(&msg, Charge::Bulk, Some(|sub| !sub.relayed));
            if self.n_relayed > 0 {
                let views = vec![TapView { user: None, msg }];
                self.tap_diff(&unsent, views);
            }
            return;
        }
        let ids: Vec<u64> = self
            .subscribers
            .iter()
            .filter(|(_, sub)| !sub.relayed)
            .map(|(id, _)| *id)
            .collect();
        let plan = unsent
            .changes
            .plan(ids.iter().map(|id| &*self.subscribers[id].session.user));
        let msgs: Vec<ServerMsg> = plan.views.into_iter().map(diff).collect();
        // Each view is encoded once per encoding in use, however many share it.
        let mut encoded: Vec<[Option<Frame>; 2]> = vec![[None, None]; msgs.len()];
        let mut gone = Vec::new();
        for (id, view) in ids.iter().zip(plan.of_subscriber) {
            let sub = &self.subscribers[id];
            let slot = match sub.session.encoding {
                Encoding::Json => 0,
                Encoding::Rkyv => 1,
            };
            let frame = encoded[view][slot]
                .get_or_insert_with(|| encode(&msgs[view], sub.session.encoding))
                .clone();
            if matches!(
                sub.session.outbound.push(frame, Charge::Bulk),
                Pushed::Overflowed | Pushed::Closed
            ) {
                gone.push(*id);
            }
        }
        crate::metrics::count_deliveries(ids.len() - gone.len());
        for id in gone {
            self.remove_subscriber(id);
        }
        if self.n_relayed > 0 {
            let views = unsent
                .changes
                .all_views()
                .into_iter()
                .map(|(user, changes)| TapView {
                    user,
                    msg: diff(changes),
                })
                .collect();
            self.tap_diff(&unsent, views);
        }
    }

    /// Hands a diff, in all its views, to the tap for the nodes of relayed subscribers.
    fn tap_diff(&self, unsent: &UnsentDiff, views: Vec<TapView>) {
        if let Some(tap) = self.registry.tap() {
            tap.send(Tapped::Diff {
                room: self.room_id.clone(),
                epoch: unsent.epoch,
                from: unsent.from,
                to: unsent.to,
                views,
            });
        }
    }

    /// Queues one message to every subscriber (or those wanting presence), encoding it
    /// once per encoding in use. Subscribers whose queue overflowed are dropped.
    pub(super) fn broadcast(
        &mut self,
        msg: &ServerMsg,
        charge: Charge,
        only: Option<fn(&Subscriber) -> bool>,
    ) {
        let mut encoded: [Option<Frame>; 2] = [None, None];
        let mut gone = Vec::new();
        let mut pushed = 0;
        for (id, sub) in &self.subscribers {
            if let Some(only) = only {
                if !only(sub) {
                    continue;
                }
            }
            pushed += 1;
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
        crate::metrics::count_deliveries(pushed - gone.len());
        for id in gone {
            self.remove_subscriber(id);
        }
    }

    pub(super) fn remove_subscriber(&mut self, session_id: u64) {
        if let Some(sub) = self.subscribers.remove(&session_id) {
            if sub.relayed {
                self.n_relayed -= 1;
            }
            if sub.session.member {
                self.presence.leave(&sub.session.user);
            }
        }
    }
}

impl Room {
    pub(super) fn subscribe(&mut self, msg: Subscribe, _ctx: &mut Context<Self>) -> bool {
        // Existing subscribers get what is committed but unsent first, so the new
        // subscriber's snapshot and everyone's next diff start at the same seq.
        self.send_unsent();
        let live = match self.status.standing(
            &self.room_id,
            self.registry.moving().is_frozen(&self.room_id),
        ) {
            Err(e) => {
                msg.session.send(&self.error_msg(&e), Charge::Full);
                return false;
            }
            Ok(None) => {
                let e = RoomError::NotFound(self.room_id.clone());
                msg.session.send(&self.error_msg(&e), Charge::Full);
                return false;
            }
            Ok(Some(live)) if live.committed == 0 => {
                // The creation is being committed: answer once it is durable.
                self.deferred_subs.push(msg);
                return true;
            }
            Ok(Some(live)) => live,
        };
        let resumed = msg.since.and_then(|since| {
            let (Some(epoch), Some(seq)) = (since.epoch, since.seq) else {
                return None;
            };
            if epoch != live.epoch || seq > live.committed {
                return None;
            }
            live.committed_changes_since(seq, &msg.session.user)
                .map(|changes| ServerMsg::Resumed {
                    room: self.room_id.to_string(),
                    epoch: live.epoch,
                    from: seq + 1,
                    to: live.committed,
                    changes,
                })
        });
        let (epoch, seq) = (live.epoch, live.committed);
        let reply = resumed.unwrap_or_else(|| ServerMsg::Snapshot {
            room: self.room_id.to_string(),
            kind: live.kind.name().to_owned(),
            epoch: live.epoch,
            seq: live.committed,
            entries: live.committed_entries(&msg.session.user),
            recovered: false,
        });
        let mut answer = Vec::new();
        match &msg.relayed {
            Some(_) => answer.push(reply),
            None => {
                if matches!(
                    msg.session
                        .outbound
                        .push(encode(&reply, msg.session.encoding), Charge::Bulk),
                    Pushed::Overflowed | Pushed::Closed
                ) {
                    self.remove_subscriber(msg.session.session_id);
                    return false;
                }
            }
        }
        let session_id = msg.session.session_id;
        let user = msg.session.user.clone();
        let is_new = !self.subscribers.contains_key(&session_id);
        if is_new && msg.session.member {
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
            match &msg.relayed {
                Some(_) => answer.push(members),
                None => msg.session.send(&members, Charge::Full),
            }
        }
        let relayed = msg.relayed.is_some();
        if let Some(to) = &msg.relayed {
            to.send(Answered {
                msgs: answer,
                epoch,
                seq,
            });
        }
        let replaced = self.subscribers.insert(
            session_id,
            Subscriber {
                session: msg.session,
                presence: msg.presence,
                relayed,
                _counted: OpenSubscription::new(),
            },
        );
        if replaced.is_some_and(|old| old.relayed) {
            self.n_relayed -= 1;
        }
        if relayed {
            self.n_relayed += 1;
        }
        true
    }

    pub(super) fn schedule_presence(&mut self, ctx: &mut Context<Self>) {
        if self.presence.needs_flush() && self.presence.schedule() {
            ctx.run_later(presence::FLUSH_DELAY, |room, _ctx| {
                room.presence.unschedule();
                room.flush_presence();
            });
        }
    }

    /// Sends the coalesced member changes to presence subscribers.
    pub(super) fn flush_presence(&mut self) {
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
