//! Rebuilding a room from the log: the newest snapshot plus the recorded changes of the
//! events after it. No reducer runs (Architecture invariant 6), so recovery, `?at=` and
//! `roomd log` get exactly the state the live room had, whatever the kind's code does.

use std::sync::Arc;

use super::live::Live;
use super::op_ids::OpKey;
use crate::kind::{Kinds, RoomState};
use crate::store::{EventRecord, LoadedRoom, Snapshot};

/// The state a snapshot holds.
pub fn state_of(snapshot: &Snapshot) -> RoomState {
    RoomState::from_parts(
        snapshot.public.clone(),
        snapshot.private.clone(),
        snapshot.tombstone_floor,
    )
}

/// The state after `events` (in seq order, each after `snapshot`), applied on top of
/// `snapshot`, or of the empty room when there is none (the log starts at the creation).
pub fn replay(snapshot: Option<&Snapshot>, events: &[EventRecord]) -> RoomState {
    let mut state = match snapshot {
        Some(snapshot) => state_of(snapshot),
        None => RoomState::new(),
    };
    apply_all(&mut state, events);
    state
}

/// Applies recorded changes in order.
pub fn apply_all(state: &mut RoomState, events: &[EventRecord]) {
    for event in events {
        // Undo records are only needed for uncommitted events: the slots handed back
        // are dropped, and no key is copied for them.
        let _ = state.apply_handing_back(event.seq, &event.changes, |_, _| {});
    }
}

/// Rebuilds a room from its latest snapshot and the log after it: recorded changes are
/// applied, no reducer runs. The room's kind must be one this server knows (its rules
/// judge the room's next ops): a room of an unknown kind is an error for that room
/// alone.
pub(super) fn rebuild(room: LoadedRoom, kinds: &Kinds) -> Result<Live, String> {
    let Some(kind) = kinds.get(&room.meta.kind).cloned() else {
        return Err(format!(
            "the log names room kind \"{}\", which this server does not serve (it serves {})",
            room.meta.kind,
            kinds.names()
        ));
    };
    let snapshot_seq = room.snapshot.as_ref().map_or(0, |snapshot| snapshot.seq);
    let mut state = replay(room.snapshot.as_ref(), &room.events);
    // Deletions are remembered exactly as far back as the log reaches, so `resumed`
    // is possible exactly when the log still holds every event after `since`.
    state.prune_tombstones(room.first_retained.saturating_sub(1));
    let mut live = Live::new(kind, room.meta.epoch, state, room.head);
    live.snapshot_seq = snapshot_seq;
    for rec in room.op_ids {
        let key = OpKey::new(Arc::from(rec.user.as_str()), rec.op_id);
        live.op_ids.remember(key, rec.seq);
    }
    Ok(live)
}
