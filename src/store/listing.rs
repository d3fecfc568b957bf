//! The admin room list: one page of rooms in room-id order, read from the meta table
//! alone (no event rows), so a page costs `limit` rows whatever the log's size.

use std::path::Path;

use redb::ReadableDatabase;

use super::record::decode_meta;
use super::tables::META;
use super::{ListedRoom, StoreError};

/// Rooms after `after` (exclusive) whose id starts with `prefix`, at most `limit`,
/// and whether more follow. A room whose meta row does not decode is left out.
pub(super) fn rooms_page(
    db: &redb::Database,
    path: &Path,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<ListedRoom>, bool), StoreError> {
    let error = |source: redb::Error| StoreError::Scan {
        path: path.to_owned(),
        source: Box::new(source),
    };
    let txn = db.begin_read().map_err(|e| error(e.into()))?;
    let table = txn.open_table(META).map_err(|e| error(e.into()))?;
    let start = match after {
        Some(after) if after > prefix => after,
        _ => prefix,
    };
    let mut rooms = Vec::new();
    for entry in table.range::<&str>(start..).map_err(|e| error(e.into()))? {
        let (room, row) = entry.map_err(|e| error(e.into()))?;
        let room = room.value();
        if Some(room) == after {
            continue;
        }
        if !room.starts_with(prefix) {
            break;
        }
        if rooms.len() == limit {
            return Ok((rooms, true));
        }
        match decode_meta(row.value()) {
            Ok(stored) => rooms.push(ListedRoom {
                room: room.to_owned(),
                kind: stored.meta.kind,
                epoch: stored.meta.epoch,
                head: stored.head,
            }),
            Err(e) => tracing::warn!(room = %room, error = %e, "room metadata does not decode"),
        }
    }
    Ok((rooms, false))
}
