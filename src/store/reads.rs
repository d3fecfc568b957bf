//! The blocking reads behind the HTTP event history and time travel: a page of a
//! room's retained events, and what rebuilds its state at one seq.
//!
//! Each read runs in one read transaction, so it sees one commit: the head, the first
//! retained seq, the snapshot and the events it returns belong together. Deciding what
//! to answer (`gone`, `invalid`) from them is the caller's business; this file only
//! returns what is retained, bounded.

use std::path::Path;

use super::tables::RoomReads;
use super::{AtSeq, EventsPage, Snapshot, StoreError};

/// The most events one [`Store::read_events`](super::Store::read_events) page holds, whatever limit the caller asks for.
pub const MAX_PAGE_EVENTS: usize = 10_000;

/// The retained events after `after`, at most `min(limit, MAX_PAGE_EVENTS)`, with the
/// head and first retained seq. `Ok(None)` if the room does not exist.
pub fn read_events(
    db: &redb::Database,
    path: &Path,
    room: &str,
    after: u64,
    limit: usize,
) -> Result<Option<EventsPage>, StoreError> {
    let reads = RoomReads::open(db, path, room)?;
    let Some(stored) = reads.meta()? else {
        return Ok(None);
    };
    let from = after.saturating_add(1).max(stored.first_retained);
    let limit = limit.min(MAX_PAGE_EVENTS);
    let events = reads.events(from, stored.head, limit, stored.head)?;
    Ok(Some(EventsPage {
        head: stored.head,
        first_retained: stored.first_retained,
        events,
    }))
}

/// What rebuilds the room's state at `seq` (the cases are on [`AtSeq`]). `Ok(None)` if
/// the room does not exist.
pub fn read_at(
    db: &redb::Database,
    path: &Path,
    room: &str,
    seq: u64,
) -> Result<Option<AtSeq>, StoreError> {
    let reads = RoomReads::open(db, path, room)?;
    let Some(stored) = reads.meta()? else {
        return Ok(None);
    };
    let mut at = AtSeq {
        meta: stored.meta,
        head: stored.head,
        first_retained: stored.first_retained,
        snapshot: None,
        events: Vec::new(),
    };
    if seq > stored.head {
        return Ok(Some(at));
    }
    // A snapshot is usable when every event after it up to `seq` is retained
    // (`first_retained` is at least 1: meta rows are checked on decode).
    let oldest_usable = stored.first_retained - 1;
    match reads.latest_snapshot(oldest_usable, seq)? {
        Some(snapshot) => {
            at.events =
                reads.events(snapshot.seq.saturating_add(1), seq, usize::MAX, stored.head)?;
            at.snapshot = Some(snapshot);
        }
        None if stored.first_retained <= 1 => {
            at.events = reads.events(1, seq, usize::MAX, stored.head)?;
        }
        // Neither a snapshot nor the whole log reaches back to `seq`.
        None => {}
    }
    Ok(Some(at))
}

/// Every stored snapshot of the room, oldest first; empty for an absent room.
pub fn room_snapshots(
    db: &redb::Database,
    path: &Path,
    room: &str,
) -> Result<Vec<Snapshot>, StoreError> {
    RoomReads::open(db, path, room)?.snapshots()
}
