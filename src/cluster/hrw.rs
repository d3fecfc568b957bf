//! Which node owns a room: rendezvous (highest-random-weight) hashing of the room id
//! over the member list.
//!
//! Pure and deterministic: every node, given the same member list, computes the same
//! owner for every room, with no state and no communication. Each (node, room) pair gets
//! a pseudo-random score and the node with the highest score owns the room, so adding a
//! node moves only the rooms the new node wins (about 1/n of them) and removing one moves
//! only the rooms it owned. The hash is written out here (FNV-1a, then the SplitMix64
//! finalizer) rather than taken from `std`, whose hasher may change between Rust
//! releases: a node built with another compiler must agree on every owner.

/// The member of `nodes` that owns `room_id`, or None when `nodes` is empty. Ties (two
/// nodes with one score, astronomically rare) go to the smaller node id, so the answer
/// never depends on the list's order.
pub fn owner<'a, S: AsRef<str>>(room_id: &str, nodes: &'a [S]) -> Option<&'a str> {
    nodes
        .iter()
        .map(|node| (score(node.as_ref(), room_id), node.as_ref()))
        .max_by(|(a, a_node), (b, b_node)| a.cmp(b).then_with(|| b_node.cmp(a_node)))
        .map(|(_, node)| node)
}

/// The weight of `node` for `room_id`: a hash of both, the node first, separated by a
/// byte no id contains (ids are ASCII; 0xff is never a UTF-8 byte).
pub fn score(node: &str, room_id: &str) -> u64 {
    let mut hash = FNV_OFFSET;
    for &byte in node
        .as_bytes()
        .iter()
        .chain(&[0xff])
        .chain(room_id.as_bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    splitmix64(hash)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The SplitMix64 finalizer: spreads FNV's weak high bits over the whole word, so the
/// comparison of two scores is as good as a comparison of random numbers.
fn splitmix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rooms(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("room:{i}")).collect()
    }

    #[test]
    fn owners_are_stable_across_builds_and_list_order() {
        // Pinned (computed independently in Python): a change here changes the owner of
        // rooms in running clusters.
        assert_eq!(score("a", "chat:general"), 0xb807_1604_f2d8_88fb);
        let nodes = ["a", "b", "c"];
        let reversed = ["c", "b", "a"];
        for room in rooms(1_000) {
            assert_eq!(owner(&room, &nodes), owner(&room, &reversed), "{room}");
        }
        assert_eq!(owner("x", &[] as &[&str]), None);
        assert_eq!(owner("x", &["only"]), Some("only"));
    }

    #[test]
    fn rooms_spread_evenly_over_the_members() {
        let nodes = ["n1", "n2", "n3", "n4", "n5"];
        let n_rooms = 50_000;
        let mut counts = [0usize; 5];
        for room in rooms(n_rooms) {
            let owner = owner(&room, &nodes).expect("five members");
            counts[nodes.iter().position(|n| *n == owner).expect("a member")] += 1;
        }
        let fair = n_rooms / nodes.len();
        for (node, count) in nodes.iter().zip(counts) {
            // 10,000 expected each; the binomial standard deviation is about 90.
            assert!(
                count.abs_diff(fair) < fair / 20,
                "{node} owns {count} of {n_rooms}"
            );
        }
    }

    #[test]
    fn adding_a_node_moves_only_the_rooms_it_wins() {
        let before = ["a", "b", "c"];
        let after = ["a", "b", "c", "d"];
        let all = rooms(20_000);
        let mut moved = 0;
        for room in &all {
            let (old, new) = (owner(room, &before), owner(room, &after));
            if old != new {
                assert_eq!(new, Some("d"), "{room} moved between old members");
                moved += 1;
            }
        }
        // About a quarter moves to the new node, no more.
        assert!((4_500..5_500).contains(&moved), "{moved} of 20,000 moved");
    }

    #[test]
    fn removing_a_node_moves_only_its_rooms() {
        let before = ["a", "b", "c", "d"];
        let after = ["a", "b", "d"];
        for room in rooms(20_000) {
            let old = owner(&room, &before).expect("members");
            let new = owner(&room, &after).expect("members");
            if old != "c" {
                assert_eq!(old, new, "{room} moved though its owner stayed");
            }
        }
    }
}
