//! A client's copy of one room's entries at a position `{epoch, seq}`, and the rule for
//! folding `snapshot`, `resumed` and `diff` into it.
//!
//! Pure data: the connection task decides what to do about a [`Fold::Gap`] or an
//! [`Fold::EpochChanged`] (re-subscribe with `since`); this file only knows that a
//! batch can be applied exactly when it continues the mirror's position.

use std::collections::BTreeMap;

use super::subscription::Change;
use crate::value::Value;

/// One room's entries at `seq` of `epoch`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    /// The room kind from the last snapshot (`chat`, `poll`, `state`).
    pub kind: String,
    pub epoch: u64,
    /// The last event folded in; the mirror equals the room's state at this seq.
    pub seq: u64,
    /// Key -> (value, ver), where `ver` is the seq that last changed the key.
    pub entries: BTreeMap<String, (Value, u64)>,
}

/// What folding a batch into a mirror did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    /// The batch continued the mirror; it is now at the batch's `to`.
    Continued,
    /// Everything in the batch is already in the mirror (`to <= seq`); nothing changed.
    Stale,
    /// The batch starts after `seq + 1` (or is malformed): events are missing.
    Gap,
    /// The batch belongs to another epoch: the mirror's seq means nothing there.
    EpochChanged,
}

impl Mirror {
    /// The mirror a snapshot describes; it replaces whatever was there.
    pub fn from_snapshot(kind: String, epoch: u64, seq: u64, entries: Vec<Change>) -> Mirror {
        let entries = entries
            .into_iter()
            .filter_map(|c| Some((c.key, (c.value?, c.ver))))
            .collect();
        Mirror {
            kind,
            epoch,
            seq,
            entries,
        }
    }

    /// Folds the coalesced changes of events `from..=to` of `epoch` into the mirror.
    ///
    /// A batch with `from <= seq + 1 < to + 1` applies exactly even when it overlaps
    /// what the mirror has: a coalesced batch holds every key changed in `from..=to` at
    /// its value as of `to`, so laying it over state at `seq >= from - 1` gives the state
    /// at `to`.
    pub fn apply(&mut self, epoch: u64, from: u64, to: u64, changes: &[Change]) -> Fold {
        if epoch != self.epoch {
            return Fold::EpochChanged;
        }
        if from == 0 || from > self.seq.saturating_add(1) || to.saturating_add(1) < from {
            return Fold::Gap;
        }
        if to <= self.seq {
            return Fold::Stale;
        }
        for change in changes {
            match &change.value {
                Some(value) => {
                    self.entries
                        .insert(change.key.clone(), (value.clone(), change.ver));
                }
                None => {
                    self.entries.remove(&change.key);
                }
            }
        }
        self.seq = to;
        Fold::Continued
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(key: &str, v: i64, ver: u64) -> Change {
        Change {
            key: key.into(),
            value: Some(Value::Int(v)),
            ver,
        }
    }

    fn del(key: &str, ver: u64) -> Change {
        Change {
            key: key.into(),
            value: None,
            ver,
        }
    }

    fn mirror() -> Mirror {
        Mirror::from_snapshot("state".into(), 7, 3, vec![set("a", 1, 1), set("b", 2, 3)])
    }

    #[test]
    fn contiguous_batches_apply_and_deletions_remove_keys() {
        let mut m = mirror();
        assert_eq!(
            m.apply(7, 4, 5, &[set("a", 9, 5), del("b", 4)]),
            Fold::Continued
        );
        assert_eq!(m.seq, 5);
        assert_eq!(m.entries.get("a"), Some(&(Value::Int(9), 5)));
        assert!(!m.entries.contains_key("b"));
    }

    #[test]
    fn a_batch_after_a_missing_event_is_a_gap_and_changes_nothing() {
        let mut m = mirror();
        let before = m.clone();
        assert_eq!(m.apply(7, 5, 6, &[set("a", 9, 6)]), Fold::Gap);
        assert_eq!(m, before);
        // Malformed ranges are gaps too, never applied.
        assert_eq!(m.apply(7, 4, 2, &[]), Fold::Gap);
        assert_eq!(m.apply(7, 0, 9, &[]), Fold::Gap);
    }

    #[test]
    fn another_epoch_is_never_applied() {
        let mut m = mirror();
        assert_eq!(m.apply(8, 4, 4, &[set("a", 9, 4)]), Fold::EpochChanged);
        assert_eq!(m, mirror());
    }

    #[test]
    fn old_and_overlapping_batches() {
        let mut m = mirror();
        assert_eq!(m.apply(7, 2, 3, &[set("a", 5, 2)]), Fold::Stale);
        assert_eq!(m, mirror());
        // An empty `resumed` at the head (from = seq + 1, to = seq) is stale, not a gap.
        assert_eq!(m.apply(7, 4, 3, &[]), Fold::Stale);
        // Overlap: events 2..=4 coalesced, applied over state at 3.
        assert_eq!(m.apply(7, 2, 4, &[set("b", 4, 4)]), Fold::Continued);
        assert_eq!(m.seq, 4);
        assert_eq!(m.entries.get("b"), Some(&(Value::Int(4), 4)));
    }
}
