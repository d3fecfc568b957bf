//! The messages a Room accepts, each a thin handler over the status ladder
//! and the live room's methods.

use std::time::Instant;

use actix::prelude::*;

use super::live::Live;
use super::messages::*;
use super::op_ids::OpKey;
use super::{Room, RoomError, Status};
use crate::kind::{catch_panic, Ctx, RoomState};
use crate::outbound::{encode, Charge, Frame, Pushed};
use crate::protocol::message::{ServerMsg, WireValue};
use crate::protocol::Encoding;
use crate::store::{self, RoomMeta};

impl Handler<Create> for Room {
    type Result = ();

    fn handle(&mut self, mut msg: Create, ctx: &mut Context<Self>) {
        self.last_activity = Instant::now();
        let op_key = msg.op_id.take().map(|id| OpKey::new(msg.user.clone(), id));
        let live = match self.status.standing(
            &self.room_id,
            self.registry.moving().is_frozen(&self.room_id),
        ) {
            Err(RoomError::Deleting(room_id)) => {
                return msg.reply.nack(RoomError::CreateWhileDeleting(room_id))
            }
            Err(e) => return msg.reply.nack(e),
            Ok(Some(live)) => live,
            Ok(None) if self.registry.moving().refuses_create(&self.room_id) => {
                return msg.reply.nack(RoomError::Moving(self.room_id.clone()))
            }
            Ok(None) => return self.create(msg, op_key, ctx),
        };
        msg.reply.set_kind(live.kind.name());
        // A re-sent create is answered from the op-id record, with seq 1 (after the
        // creation's own ack if it is still in flight).
        if let Some(key) = &op_key {
            if let Some(seq) = live.op_ids.get(key) {
                return live.reply_ack(msg.reply, seq);
            }
        }
        let refusal = msg
            .refusal
            .unwrap_or_else(|| RoomError::Exists(self.room_id.clone()));
        live.reply_nack(msg.reply, refusal);
    }
}

impl Room {
    /// Creates the absent room: its creation event is the first of the log.
    fn create(&mut self, msg: Create, op_key: Option<OpKey>, ctx: &mut Context<Self>) {
        let Create {
            user,
            kind,
            init,
            now_ms,
            refusal,
            mut reply,
            ..
        } = msg;
        if self.config.kinds.get(&kind).is_some() {
            reply.set_kind(&kind);
        }
        if let Some(refusal) = refusal {
            return reply.nack(refusal);
        }
        // Counted from commits, so creates of one user in flight at the same moment in
        // other rooms can pass together (at most their number over).
        let created = self.store.rooms_created_by(&user);
        if created >= self.config.max_rooms_per_user {
            return reply.nack(RoomError::TooManyRooms {
                user: user.to_string(),
                created,
            });
        }
        let Some(kind) = self.config.kinds.get(&kind).cloned() else {
            let known = self.config.kinds.names();
            return reply.nack(RoomError::UnknownKind(kind, known));
        };
        let seq_ctx = Ctx {
            user: &user,
            now_ms,
            seq: 1,
        };
        let limits = &self.config.limits;
        let changes = match catch_panic(|| kind.init(&init, &seq_ctx, limits)) {
            Ok(Ok(changes)) => changes,
            Ok(Err(refusal)) => return reply.nack(RoomError::Refused(refusal)),
            Err(panic) => {
                tracing::error!(room = %self.room_id, kind = kind.name(), op = "create", %panic, "room kind code panicked; nacked unavailable");
                return reply.nack(RoomError::KindPanicked);
            }
        };
        let epoch = rand::random::<u64>();
        let name = kind.name().to_owned();
        let mut live = Live::new(kind, epoch, RoomState::new(), 0);
        live.open_batch().create = Some(RoomMeta {
            kind: name.clone(),
            epoch,
        });
        let op = crate::value::Value::map([
            ("type", crate::value::Value::Str("create".into())),
            ("kind", crate::value::Value::Str(name)),
            ("init", init),
        ]);
        live.apply_event(&user, now_ms, op, changes, op_key, reply);
        self.status = Status::Live(Box::new(live));
        self.flush(ctx);
    }
}

impl Handler<Submit> for Room {
    type Result = ();

    fn handle(&mut self, mut msg: Submit, ctx: &mut Context<Self>) {
        self.last_activity = Instant::now();
        // A live room whose creation is not durable yet takes ops too: they wait in line
        // behind it like any other op, so the client sees no race.
        let live = match self.status.standing(
            &self.room_id,
            self.registry.moving().is_frozen(&self.room_id),
        ) {
            Err(e) => return msg.reply.nack(e),
            Ok(None) => {
                let refusal = msg
                    .refusal
                    .unwrap_or_else(|| RoomError::NotFound(self.room_id.clone()));
                return msg.reply.nack(refusal);
            }
            Ok(Some(live)) => live,
        };
        msg.reply.set_kind(live.kind.name());
        let op_key = msg.op_id.map(|id| OpKey::new(msg.user.clone(), id));
        if let Some(key) = &op_key {
            // A re-send of an op still in flight is answered when the original is: its
            // reply waits behind the original's.
            if let Some(seq) = live.op_ids.get(key) {
                return live.reply_ack(msg.reply, seq);
            }
        }
        if let Some(refusal) = msg.refusal {
            return live.reply_nack(msg.reply, refusal);
        }
        let seq = live.head + 1;
        let seq_ctx = Ctx {
            user: &msg.user,
            now_ms: msg.now_ms,
            seq,
        };
        let limits = &self.config.limits;
        let (kind, state) = (&live.kind, &live.state);
        match catch_panic(|| kind.reduce(state, &msg.op, &seq_ctx, limits)) {
            Err(panic) => {
                tracing::error!(room = %self.room_id, user = %msg.user, op = ?msg.op, %panic, "room kind code panicked; op nacked unavailable");
                live.reply_nack(msg.reply, RoomError::KindPanicked);
            }
            Ok(Ok(changes)) => {
                live.apply_event(&msg.user, msg.now_ms, msg.op, changes, op_key, msg.reply);
                self.flush(ctx);
            }
            Ok(Err(refusal)) => live.reply_nack(msg.reply, RoomError::Refused(refusal)),
        }
    }
}

impl Handler<super::idle::CheckIdle> for Room {
    type Result = ();

    fn handle(&mut self, _: super::idle::CheckIdle, ctx: &mut Context<Self>) {
        self.check_idle(ctx);
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
        if msg.session_id != SERVER_SESSION && !self.subscribers.contains_key(&msg.session_id) {
            return;
        }
        let signal = ServerMsg::Signal {
            room: self.room_id.to_string(),
            user: msg.user.to_string(),
            data: WireValue::from_value(&msg.data),
        };
        let mut encoded: [Option<Frame>; 2] = [None, None];
        for (id, sub) in &self.subscribers {
            // Signals go to the other members; an SSE stream is not one.
            if *id == msg.session_id || !sub.session.member {
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
            if sub.session.outbound.push(frame, Charge::Droppable) == Pushed::Dropped {
                crate::metrics::hot()
                    .signals_dropped_queue_full
                    .increment(1);
            }
        }
    }
}

impl Handler<Read> for Room {
    type Result = Result<RoomView, RoomError>;

    fn handle(&mut self, msg: Read, _ctx: &mut Context<Self>) -> Self::Result {
        self.last_activity = Instant::now();
        match self.status.standing(
            &self.room_id,
            self.registry.moving().is_frozen(&self.room_id),
        ) {
            Ok(Some(live)) if live.committed > 0 => Ok(RoomView {
                kind: live.kind.name().to_owned(),
                epoch: live.epoch,
                seq: live.committed,
                entries: live.committed_entries(&msg.viewer),
            }),
            Err(e @ RoomError::LoadFailed(_)) => Err(e),
            // Being created or being deleted: not there for a reader.
            _ => Err(RoomError::NotFound(self.room_id.clone())),
        }
    }
}

impl Handler<CatchUp> for Room {
    type Result = Result<CaughtUp, RoomError>;

    fn handle(&mut self, msg: CatchUp, _ctx: &mut Context<Self>) -> Self::Result {
        self.last_activity = Instant::now();
        // What is committed but unsent leaves first, so the answer ends where a diff
        // ends and the node's next diff starts right after it.
        self.send_unsent();
        match self.status.standing(
            &self.room_id,
            self.registry.moving().is_frozen(&self.room_id),
        ) {
            Ok(Some(live)) if live.committed > 0 => Ok(CaughtUp {
                epoch: live.epoch,
                to: live.committed,
                views: if msg.since > live.committed {
                    None
                } else {
                    live.committed_views_since(msg.since)
                },
            }),
            Err(e) => Err(e),
            _ => Err(RoomError::NotFound(self.room_id.clone())),
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
        let uncommitted: usize = live.batches.iter().map(|b| b.n_events()).sum();
        if uncommitted > 0 || live.in_flight > 0 {
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
        match self.status.standing(
            &self.room_id,
            self.registry.moving().is_frozen(&self.room_id),
        ) {
            Err(e) => {
                let _ = msg.reply.send(Err(e));
            }
            Ok(None) => {
                let _ = msg
                    .reply
                    .send(Err(RoomError::NotFound(self.room_id.clone())));
            }
            Ok(Some(live)) => {
                live.deleting = Some(msg.reply);
                self.flush(ctx);
            }
        }
    }
}
