//! The window of op ids a room deduplicates against: `(user, op id)` -> seq, in seq
//! order so the oldest are forgotten first: the acked ids, then those of applied ops
//! still in flight.
//!
//! A re-sent op whose id is here is answered with its original seq and not applied again
//! (effectively-once, PROTOCOL.md "Ops"); the answer to an op in flight leaves when the
//! original's does. The window keeps at least `op_ids_kept` acked ids; it may grow 10%
//! past that before the oldest are forgotten, so expiry happens in bunches, in the same
//! commit that the store forgets them. The ids of ops whose commit failed are forgotten
//! with them (a re-send is a new op).

use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::sync::{Arc, OnceLock};

use indexmap::IndexMap;

/// One op id as a room knows it: the id a client chose, scoped to its user (two users'
/// `"1"` are different ops). Built once where an op enters the room, and hashed once
/// there: a room looks an id up in its window and in every batch in flight, adds it to
/// its batch and remembers it on commit, and each of those reuses this hash.
#[derive(Debug, Clone)]
pub struct OpKey {
    pub user: Arc<str>,
    pub id: String,
    /// SipHash of `(user, id)` with this process's random keys ([`op_key_hasher`]), so
    /// clients cannot choose ids that collide.
    hash: u64,
}

impl OpKey {
    pub fn new(user: Arc<str>, id: String) -> OpKey {
        let hash = op_key_hasher().hash_one((&*user, id.as_str()));
        OpKey { user, id, hash }
    }
}

impl PartialEq for OpKey {
    fn eq(&self, other: &OpKey) -> bool {
        self.hash == other.hash && self.id == other.id && self.user == other.user
    }
}

impl Eq for OpKey {}

impl Hash for OpKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// The keys of every op id hash in this process: drawn once, like a `HashMap`'s.
fn op_key_hasher() -> &'static RandomState {
    static KEYS: OnceLock<RandomState> = OnceLock::new();
    KEYS.get_or_init(RandomState::new)
}

/// Hashes an [`OpKey`] by the hash it carries: the maps of op ids do not hash again.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeyedHasher(u64);

impl Hasher for KeyedHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `OpKey` is hashed with this hasher, and it writes one u64; fold anything
        // else in anyway so a misuse degrades to a poor hash, not a wrong map.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A map keyed by op ids, hashed by [`OpKey`]'s own hash.
pub type OpKeyMap<V> = IndexMap<OpKey, V, BuildHasherDefault<KeyedHasher>>;

/// Op ids in seq order, so the oldest are forgotten first: the acked ones, then the
/// `uncommitted` newest, one map, each key stored once. An op's id goes in as the op is
/// applied, so the lookup that found it absent and the insert touch the same memory
/// once (a window of 10,000 ids per room is far out of the caches), and the commit adds
/// nothing. Who reads: every op with an id, to answer re-sends. Who writes: applied ops,
/// commits (which count their ids as acked) and failed commits (which drop theirs).
#[derive(Debug, Default)]
pub struct OpIds {
    seqs: OpKeyMap<u64>,
    /// How many of the newest ids belong to ops not committed yet.
    uncommitted: usize,
}

impl OpIds {
    /// The seq an op id was applied as, committed or not.
    pub fn get(&self, key: &OpKey) -> Option<u64> {
        self.seqs.get(key).copied()
    }

    /// Remembers a committed op id (a room being loaded, nothing in flight); ids must
    /// arrive in seq order. An id already there keeps its place.
    pub fn remember(&mut self, key: OpKey, seq: u64) {
        debug_assert_eq!(self.uncommitted, 0, "committed ids come before uncommitted");
        self.seqs.insert(key, seq);
    }

    /// Adds the id of an op just applied as `seq` (after every id there, in seq order),
    /// not committed yet. An id already there keeps its place and is not counted again
    /// (the caller looked it up first, so this does not happen).
    pub fn add_uncommitted(&mut self, key: OpKey, seq: u64) {
        if self.seqs.insert_full(key, seq).1.is_none() {
            self.uncommitted += 1;
        }
    }

    /// The oldest `n` uncommitted ids were committed (a batch landed, in seq order).
    pub fn committed(&mut self, n: usize) {
        self.uncommitted = self.uncommitted.saturating_sub(n);
    }

    /// Every uncommitted op failed (a failed commit fails all that follow it): their
    /// ids are forgotten, so a re-send is applied as a new op.
    pub fn forget_uncommitted(&mut self) {
        let committed = self.seqs.len() - self.uncommitted;
        self.seqs.truncate(committed);
        self.uncommitted = 0;
    }

    /// Once `adding` more would take the acked ids past `kept` plus a tenth, forgets the
    /// oldest acked ids down to `kept` (or further if `adding` alone is more than the
    /// tenth), so at most `kept` plus a tenth remain (uncommitted ids are neither counted
    /// nor forgotten); returns the seq of the newest id forgotten (0: none), so the store
    /// forgets the same ids in the same commit.
    ///
    /// A drain shifts every surviving id and rebuilds the index (the cost of the whole
    /// window, ~11,000 ids), so it happens once per tenth of a window, not once per
    /// batch: trimmed to `kept + kept / 10 - adding` instead, a full window paid that
    /// cost on every commit (a third of the room threads at 10 busy rooms,
    /// benches/README.md, "Sixth pass").
    pub fn expire(&mut self, adding: usize, kept: usize) -> u64 {
        let acked = self.seqs.len() - self.uncommitted;
        let most = kept + kept / 10;
        if acked + adding <= most {
            return 0;
        }
        let excess = (acked.saturating_sub(kept))
            .max(acked + adding - most)
            .min(acked);
        // One drain of the oldest: the survivors' index is rebuilt from stored hashes,
        // no key is hashed or compared again.
        self.seqs
            .drain(..excess)
            .map(|(_, seq)| seq)
            .max()
            .unwrap_or(0)
    }

    /// The seq of the oldest acked id still remembered (`u64::MAX`: none): log trims
    /// keep the ids of events from there on.
    pub fn oldest_seq(&self) -> u64 {
        if self.seqs.len() == self.uncommitted {
            return u64::MAX;
        }
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
    fn a_full_window_forgets_a_tenth_at_once_then_nothing_until_full_again() {
        let mut ids = OpIds::default();
        for seq in 1..=110 {
            ids.remember(key("u", &seq.to_string()), seq);
        }
        // 110 acked, window 100 with a tenth of slack: full, nothing goes yet.
        assert_eq!(ids.expire(0, 100), 0);
        // One more coming: back down to 100 at once (the oldest 10).
        assert_eq!(ids.expire(1, 100), 10);
        assert_eq!(ids.get(&key("u", "10")), None);
        assert_eq!(ids.get(&key("u", "11")), Some(11));
        ids.add_uncommitted(key("u", "111"), 111);
        ids.committed(1);
        // The next ten ids fit in the slack: no drain per batch.
        for seq in 112..=120 {
            assert_eq!(ids.expire(1, 100), 0, "seq {seq}");
            ids.add_uncommitted(key("u", &seq.to_string()), seq);
            ids.committed(1);
        }
        assert_eq!(ids.oldest_seq(), 11);
        // A batch larger than the slack still leaves at most the window plus its tenth.
        assert_eq!(ids.expire(30, 100), 40);
        assert_eq!(ids.oldest_seq(), 41);
    }

    #[test]
    fn an_empty_window_keeps_every_trimmed_event_free_of_ids() {
        assert_eq!(OpIds::default().oldest_seq(), u64::MAX);
    }

    #[test]
    fn keys_are_equal_exactly_when_user_and_id_are() {
        assert_eq!(key("u", "a"), key("u", "a"));
        assert_ne!(key("u", "a"), key("u", "b"));
        assert_ne!(key("u", "a"), key("v", "a"));
        // The pair is hashed as a pair: moving a byte across the boundary is another key.
        assert_ne!(key("ab", "c"), key("a", "bc"));
        let mut ids = OpIds::default();
        ids.remember(key("ab", "c"), 1);
        assert_eq!(ids.get(&key("a", "bc")), None);
        assert_eq!(ids.get(&key("ab", "c")), Some(1));
    }

    #[test]
    fn uncommitted_ids_answer_re_sends_and_are_forgotten_if_their_commit_fails() {
        let mut ids = OpIds::default();
        ids.remember(key("u", "1"), 1);
        ids.add_uncommitted(key("u", "2"), 2);
        ids.add_uncommitted(key("u", "3"), 3);
        assert_eq!(ids.get(&key("u", "2")), Some(2));
        // The batch of 2 landed; 3 failed with the batch after it.
        ids.committed(1);
        ids.forget_uncommitted();
        assert_eq!(ids.get(&key("u", "2")), Some(2));
        assert_eq!(ids.get(&key("u", "3")), None);
        ids.add_uncommitted(key("u", "3"), 4);
        assert_eq!(ids.get(&key("u", "3")), Some(4));
    }

    #[test]
    fn expiry_counts_and_forgets_acked_ids_only() {
        let mut ids = OpIds::default();
        for seq in 1..=3 {
            ids.add_uncommitted(key("u", &seq.to_string()), seq);
        }
        assert_eq!(ids.oldest_seq(), u64::MAX, "nothing acked yet");
        // Nothing acked: nothing to forget, however many are in flight.
        assert_eq!(ids.expire(1, 0), 0);
        ids.committed(2);
        assert_eq!(ids.oldest_seq(), 1);
        // Window 1 (and no tenth): of the 2 acked ids with 1 more coming, both go.
        assert_eq!(ids.expire(1, 1), 2);
        assert_eq!(ids.get(&key("u", "2")), None);
        assert_eq!(ids.get(&key("u", "3")), Some(3), "in flight: kept");
        assert_eq!(ids.oldest_seq(), u64::MAX);
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
