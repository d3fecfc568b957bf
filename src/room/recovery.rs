//! Rebuilding a room from the log: the newest snapshot plus the recorded changes of the
//! events after it. No reducer runs (Architecture invariant 6), so recovery, `?at=` and
//! `roomd log` get exactly the state the live room had, whatever the kind's code does.

use std::sync::Arc;

use super::live::Live;
use super::op_ids::OpKey;
use crate::kind::{Kind, RoomState};
use crate::store::{EventRecord, LoadedRoom, Snapshot};

/// The state a snapshot holds.
pub fn state_of(kind: Kind, snapshot: &Snapshot) -> RoomState {
    RoomState::from_parts(
        kind,
        snapshot.public.clone(),
        snapshot.private.clone(),
        snapshot.tombstone_floor,
    )
}

/// The state after `events` (in seq order, each after `snapshot`), applied on top of
/// `snapshot`, or of the empty room when there is none (the log starts at the creation).
pub fn replay(kind: Kind, snapshot: Option<&Snapshot>, events: &[EventRecord]) -> RoomState {
    let mut state = match snapshot {
        Some(snapshot) => state_of(kind, snapshot),
        None => RoomState::new(kind),
    };
    apply_all(&mut state, events);
    state
}

/// Applies recorded changes in order.
pub fn apply_all(state: &mut RoomState, events: &[EventRecord]) {
    for event in events {
        // Undo records are only needed for uncommitted events.
        let _ = state.apply(event.seq, &event.changes);
    }
}

/// Rebuilds a room from its latest snapshot and the log after it: recorded changes are
/// applied, no reducer runs.
pub(super) fn rebuild(room: LoadedRoom) -> Live {
    let kind = room.meta.kind;
    let snapshot_seq = room.snapshot.as_ref().map_or(0, |snapshot| snapshot.seq);
    let mut state = replay(kind, room.snapshot.as_ref(), &room.events);
    // Deletions are remembered exactly as far back as the log reaches, so `resumed`
    // is possible exactly when the log still holds every event after `since`.
    state.prune_tombstones(room.first_retained.saturating_sub(1));
    let mut live = Live::new(kind, room.meta.epoch, state, room.head);
    live.snapshot_seq = snapshot_seq;
    for rec in room.op_ids {
        let key = OpKey::new(Arc::from(rec.user.as_str()), rec.op_id);
        live.op_ids.remember(key, rec.seq);
    }
    live
}
