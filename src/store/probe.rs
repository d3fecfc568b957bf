//! Reading, before a write, the pages the write will touch, so a damaged page is found
//! by a read transaction instead of inside a write transaction.
//!
//! A redb write transaction that panics on a damaged page is dropped without its
//! rollback, and the file is then marked as needing a repair at the next open, which
//! fails while the damaged page is reachable (`guard.rs`): one room's damage would keep
//! the whole server from starting. So the writer probes first: the B-tree paths to every
//! key a batch inserts or removes (a lookup walks the same branch and leaf pages the
//! insertion does), and for maintenance every row of the room: before a deletion, and
//! before a trim unless the same room was probed for one within the last minute (its
//! pages are then in redb's cache, `TRIM_PROBE_EVERY` in `writer.rs`). Splits and
//! merges can still touch a neighbouring leaf the probe did not read; that residue is
//! fail-stop (`writer.rs`).
//!
//! Not here: what a damaged room means for its jobs (`writer.rs`), which rows exist
//! (`tables.rs`).

use redb::{ReadOnlyTable, ReadTransaction};

use super::error::redb_corruption;
use super::guard;
use super::tables::{CREATORS, DELETING, EVENTS, META, OP_IDS, SNAPSHOTS};

/// What one batch writes, as far as the pages go.
pub struct BatchKeys<'a> {
    pub room: &'a str,
    pub creates: bool,
    /// The keys (last seqs) of its first and last log row, if it has events.
    pub events: Option<(u64, u64)>,
    pub snapshot: Option<u64>,
    /// Op ids up to this seq are removed (0: none).
    pub expire_op_ids_through: u64,
}

/// One read transaction and the two tables every batch of a commit probes, opened by
/// the first batch that needs them and kept for the others: opening a table is a
/// lookup in redb's table tree, and opened per batch it cost a fifth of the probes
/// (`benches/README.md`, issue 14, fifth pass).
pub struct BatchProbe {
    txn: ReadTransaction,
    meta: Option<ReadOnlyTable<&'static str, &'static [u8]>>,
    events: Option<ReadOnlyTable<(&'static str, u64), &'static [u8]>>,
}

impl BatchProbe {
    pub fn new(txn: ReadTransaction) -> Self {
        BatchProbe {
            txn,
            meta: None,
            events: None,
        }
    }

    /// Reads the paths to every key `keys` names. `Err(detail)` when a page on them is
    /// damaged (redb panicked or reported corruption); other errors (I/O) are left for
    /// the write itself to meet and report. After an `Err` the caller drops this probe:
    /// a transaction that panicked is not reused.
    pub fn batch(&mut self, keys: &BatchKeys) -> Result<(), String> {
        let room = keys.room;
        let BatchProbe { txn, meta, events } = self;
        settle(guard::catch(|| -> Result<(), redb::Error> {
            let meta = match meta {
                Some(table) => table,
                None => meta.insert(txn.open_table(META)?),
            };
            meta.get(room)?;
            if keys.creates {
                txn.open_table(CREATORS)?.get(room)?;
            }
            if let Some((first, last)) = keys.events {
                let events = match events {
                    Some(table) => table,
                    None => events.insert(txn.open_table(EVENTS)?),
                };
                events.get((room, first))?;
                // A batch of one row (nearly all) has one key: the same path twice.
                if last != first {
                    events.get((room, last))?;
                }
            }
            if let Some(seq) = keys.snapshot {
                txn.open_table(SNAPSHOTS)?.get((room, seq))?;
            }
            if keys.expire_op_ids_through > 0 {
                let op_ids = txn.open_table(OP_IDS)?;
                for entry in op_ids.range((room, 0)..=(room, keys.expire_op_ids_through))? {
                    entry?;
                }
            }
            Ok(())
        }))
    }
}

/// Reads every row of `room` in every table, as trimming and deletion may touch any of
/// them. Costs a scan of the room's rows (keys and values stay in redb's pages).
pub fn room(txn: &ReadTransaction, room: &str) -> Result<(), String> {
    settle(guard::catch(|| -> Result<(), redb::Error> {
        txn.open_table(META)?.get(room)?;
        txn.open_table(CREATORS)?.get(room)?;
        txn.open_table(DELETING)?.get(room)?;
        for table in [EVENTS, SNAPSHOTS] {
            for entry in txn.open_table(table)?.range((room, 0)..=(room, u64::MAX))? {
                entry?;
            }
        }
        for entry in txn
            .open_table(OP_IDS)?
            .range((room, 0)..=(room, u64::MAX))?
        {
            entry?;
        }
        Ok(())
    }))
}

/// A caught panic or a corruption error is damage; anything else is not the probe's to
/// judge.
fn settle(outcome: Result<Result<(), redb::Error>, String>) -> Result<(), String> {
    match outcome {
        Err(panic) => Err(panic),
        Ok(Err(error)) => match redb_corruption(&error) {
            Some(detail) => Err(detail.to_owned()),
            None => Ok(()),
        },
        Ok(Ok(())) => Ok(()),
    }
}
