//! The window of acked op ids a room deduplicates against: `(user, op id)` -> seq, in
//! commit order so the oldest are forgotten first.
//!
//! A re-sent op whose id is here is answered with its original seq and not applied again
//! (effectively-once, PROTOCOL.md "Ops"). The window keeps at least `op_ids_kept` ids;
//! it may grow 10% past that before the oldest are forgotten, so expiry happens in
//! bunches, in the same commit that the store forgets them.

use std::sync::Arc;

use indexmap::IndexMap;

/// One op id as a room knows it: the id a client chose, scoped to its user (two users'
/// `"1"` are different ops). Built once where an op enters the room.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OpKey {
    pub user: Arc<str>,
    pub id: String,
}

impl OpKey {
    pub fn new(user: Arc<str>, id: String) -> OpKey {
        OpKey { user, id }
    }
}

/// Acked op ids in the order they were committed (which is seq order), so the oldest
/// are forgotten first: one map, each key stored once. Who reads: every op with an id,
/// to answer re-sends. Who writes: commits.
#[derive(Debug, Default)]
pub struct OpIds {
    seqs: IndexMap<OpKey, u64>,
}

impl OpIds {
    /// The seq an op id was committed as.
    pub fn get(&self, key: &OpKey) -> Option<u64> {
        self.seqs.get(key).copied()
    }

    /// Remembers a committed op id; ids must arrive in seq order. An id already there
    /// keeps its place.
    pub fn remember(&mut self, key: OpKey, seq: u64) {
        self.seqs.insert(key, seq);
    }

    /// Forgets the oldest ids so that, with `adding` more, at most `kept` plus a tenth
    /// remain; returns the seq of the newest id forgotten (0: none), so the store forgets
    /// the same ids in the same commit.
    pub fn expire(&mut self, adding: usize, kept: usize) -> u64 {
        let excess = (self.seqs.len() + adding)
            .saturating_sub(kept + kept / 10)
            .min(self.seqs.len());
        // One drain of the oldest: the survivors' index is rebuilt from stored hashes,
        // no key is hashed or compared again.
        self.seqs
            .drain(..excess)
            .map(|(_, seq)| seq)
            .max()
            .unwrap_or(0)
    }

    /// The seq of the oldest id still remembered (`u64::MAX`: none): log trims keep the
    /// ids of events from there on.
    pub fn oldest_seq(&self) -> u64 {
        self.seqs.first().map_or(u64::MAX, |(_, seq)| *seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(user: &str, id: &str) -> OpKey {
        OpKey::new(Arc::from(user), id.to_owned())
    }

    #[test]
    fn the_same_id_of_two_users_is_two_ops() {
        let mut ids = OpIds::default();
        ids.remember(key("alice", "1"), 2);
        assert_eq!(ids.get(&key("alice", "1")), Some(2));
        assert_eq!(ids.get(&key("bob", "1")), None);
    }

    #[test]
    fn expiry_forgets_the_oldest_only_past_a_tenth_over_the_window() {
        let mut ids = OpIds::default();
        for seq in 1..=11 {
            ids.remember(key("u", &seq.to_string()), seq);
        }
        // 11 ids, window 10: 10 + 1 is allowed, nothing goes.
        assert_eq!(ids.expire(0, 10), 0);
        // One more coming makes 12, one over: the oldest goes.
        assert_eq!(ids.expire(1, 10), 1);
        assert_eq!(ids.get(&key("u", "1")), None);
        assert_eq!(ids.get(&key("u", "2")), Some(2));
        assert_eq!(ids.oldest_seq(), 2);
    }

    #[test]
    fn an_empty_window_keeps_every_trimmed_event_free_of_ids() {
        assert_eq!(OpIds::default().oldest_seq(), u64::MAX);
    }

    #[test]
    fn remembering_an_id_twice_keeps_one_entry() {
        let mut ids = OpIds::default();
        ids.remember(key("u", "a"), 3);
        ids.remember(key("u", "a"), 3);
        assert_eq!(ids.expire(0, 0), 3);
        assert_eq!(ids.oldest_seq(), u64::MAX);
    }
}
