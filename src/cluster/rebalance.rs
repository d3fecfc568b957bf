//! Moving rooms when the member list changes (`roomd cluster rebalance --to LIST`): the
//! steps, their wire, and which rooms move.
//!
//! Adding or removing a node changes the owner of the rooms the new list hashes
//! elsewhere ([`super::hrw`]: about 1/n of them when a node is added, the leaving
//! node's rooms when one is removed; no other room moves). The operator's tool
//! ([`super::rebalance_tool`]) drives the move; each node carries out its part
//! ([`super::mover`]) on `{cluster}.node.{id}.move`. The steps, in order:
//!
//! 1. **Check.** The tool asks `{cluster}.members` who is live: every node of the old
//!    list and of the new one must answer, and the live members must agree on one list
//!    and generation. Otherwise it refuses, naming the missing node, and nothing
//!    changes. New nodes were started with the new list and wait *outside* (owning
//!    nothing, `/readyz` says `"membership": "outside"`).
//! 2. **Begin.** Every node of old ∪ new records the move (old list, new list, a move
//!    id); a node whose list is not the old one, or with another move pending, refuses.
//!    From now on an old owner refuses the *creation* of any room that leaves it, so no
//!    room appears there that the move would not copy.
//! 3. **Plan.** Each old owner lists, from its store, the rooms it owns that leave it,
//!    and to whom ([`leaves`]), a bounded page at a time; the last page adds the rooms
//!    its running actors hold that the store may not list yet (a creation accepted just
//!    before Begin, still being committed: `room::moving::Holds`).
//! 4. **Move, in batches** of at most [`ROOMS_PER_BATCH`] rooms from one node to one
//!    node:
//!    - *Freeze* on the old owner: the rooms refuse everything with `unavailable` (ops
//!      are nacked; a re-send with the same op id is answered later by whichever node
//!      owns the room then), their subscribers get `error` `unavailable` for the room
//!      and are dropped, and each actor stops once its last batch is committed, so the
//!      store holds every op that was acked;
//!    - *Pull* on the new owner: it asks the old owner for each room's export
//!      (`store::RoomExport`: snapshots, retained log, kept op ids, epoch and seq) in
//!      pieces of at most [`PIECE_BYTES`] (under NATS's 1 MiB payload limit), writes it
//!      in one transaction, checked, and reads it back (same head, same epoch). The
//!      room is not the new owner's yet: every node still routes it to the old owner,
//!      where it is frozen.
//! 5. **Verify.** Each old owner checks, as a Plan would list them, that every room
//!    leaving it is frozen; a room that appeared meanwhile is moved by another round.
//! 6. **Commit.** Every node writes the new list with the next generation to
//!    `DIR/CLUSTER` and puts it in force. From then on a node routes a moved room to its
//!    new owner; the old owner answers stale forwards `unavailable` (it owns it no
//!    more), and deletes its copy. The nodes commit one after another: meanwhile a
//!    node that has the new list forwards to a new owner that does not yet, which
//!    answers `unavailable` too (`rpc::not_owned`: every request, a `sub` included).
//!    Clients re-send and re-subscribe (with `since`) and resume gaplessly on the new
//!    owner: same epoch, same seq, same op-id window.
//!
//! A failure before the commit (a node down, a refused import, a timeout) *aborts*:
//! every node forgets the move, old owners unfreeze their rooms, new owners delete the
//! copies they imported (which nobody could have written to). Nothing acked is lost:
//! the old owner's rows were never touched. At no moment do two nodes serve one room: a
//! room is served by its old owner until frozen there, and by its new owner only after
//! the new owner committed the new list, by which time the old owner has it frozen.
//! A failure *during* the commit (a node dies between two commits) is reported with
//! what reached whom; restarting the nodes it did not reach with the new list finishes
//! it (a restarted node takes the list the live members agree on at the newer
//! generation, and a move it kept pending is then over).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::hrw;
use super::membership::Members;

/// Rooms frozen and copied together; the rest keep serving meanwhile.
pub const ROOMS_PER_BATCH: usize = 32;

/// Rooms per page of a plan.
pub const PLAN_PAGE: usize = 256;

/// The bytes of an export one message carries (before base64), well under NATS's
/// default 1 MiB payload limit.
pub const PIECE_BYTES: usize = 256 * 1024;

/// How long a step may take on a node before the tool gives up and aborts: a freeze
/// waits for in-flight commits, a pull copies a batch of rooms.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a node waits for one piece of an export.
pub const PIECE_TIMEOUT: Duration = Duration::from_secs(10);

/// `{cluster}.node.{node}.move`.
pub fn subject(cluster: &str, node: &str) -> String {
    format!("{cluster}.node.{node}.move")
}

/// One step of a move, sent to one node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", tag = "step")]
pub enum Step {
    Begin {
        move_id: u64,
        from: Members,
        to: Members,
    },
    /// A page of the rooms leaving this node, after `after` (room order).
    Plan {
        move_id: u64,
        after: Option<String>,
    },
    Freeze {
        move_id: u64,
        rooms: Vec<String>,
    },
    /// Bytes `offset..` of a frozen room's export (asked by the new owner).
    Export {
        move_id: u64,
        room: String,
        offset: u64,
    },
    /// Copy `rooms` from node `from`.
    Pull {
        move_id: u64,
        from: String,
        rooms: Vec<String>,
    },
    Verify {
        move_id: u64,
    },
    Commit {
        move_id: u64,
    },
    /// Forget the move (`None`: whatever move is pending).
    Abort {
        move_id: Option<u64>,
    },
}

/// A node's answer to a [`Step`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", tag = "answer")]
pub enum Answer {
    Done,
    Refused {
        msg: String,
    },
    /// A page of a plan: `(room, new owner)`, and where the next page starts.
    Rooms {
        rooms: Vec<(String, String)>,
        next: Option<String>,
    },
    /// A piece of an export: `total` bytes in all, these (base64) from the offset asked.
    Piece {
        total: u64,
        bytes: String,
    },
}

/// Whether `room` leaves `node` when the list changes from `from` to `to`: `node`
/// owns it under `from` and not under `to`. Pure.
pub fn leaves(room: &str, node: &str, from: &[String], to: &[String]) -> bool {
    hrw::owner(room, from) == Some(node) && hrw::owner(room, to) != Some(node)
}

/// The owner of `room` under `to`, if `to` is not empty.
pub fn new_owner<'a>(room: &str, to: &'a [String]) -> Option<&'a str> {
    hrw::owner(room, to)
}

/// Sends `step` to `node` and waits up to `timeout` for its answer.
pub async fn ask(
    client: &async_nats::Client,
    cluster: &str,
    node: &str,
    step: &Step,
    timeout: Duration,
) -> Result<Answer, String> {
    // Integers, strings and lists: always serializable.
    let payload = serde_json::to_vec(step).unwrap_or_default();
    let request = async_nats::Request::new()
        .payload(payload.into())
        .timeout(Some(timeout));
    let reply = client
        .send_request(subject(cluster, node), request)
        .await
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => format!("node {node} is not running"),
            async_nats::RequestErrorKind::TimedOut => {
                format!("node {node} did not answer within {timeout:?}")
            }
            _ => format!("cannot reach node {node}: {e}"),
        })?;
    serde_json::from_slice(&reply.payload)
        .map_err(|e| format!("unreadable answer from node {node}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(nodes: &[&str]) -> Vec<String> {
        nodes.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn adding_a_node_moves_only_the_rooms_it_wins_from_their_old_owners() {
        let (from, to) = (list(&["a", "b"]), list(&["a", "b", "c"]));
        let rooms: Vec<String> = (0..3_000).map(|i| format!("room:{i}")).collect();
        let mut moving = 0;
        for room in &rooms {
            let old = hrw::owner(room, &from).expect("members");
            let leaving: Vec<&str> = ["a", "b", "c"]
                .into_iter()
                .filter(|n| leaves(room, n, &from, &to))
                .collect();
            match new_owner(room, &to) {
                Some("c") => {
                    assert_eq!(leaving, vec![old], "{room} leaves its old owner only");
                    moving += 1;
                }
                Some(new) => {
                    assert_eq!(new, old, "{room} moved between old members");
                    assert!(leaving.is_empty(), "{room} stays");
                }
                None => panic!("three members"),
            }
        }
        // About a third goes to the new node.
        assert!((850..1_150).contains(&moving), "{moving} of 3,000 move");
    }

    #[test]
    fn removing_a_node_moves_its_rooms_and_nothing_else() {
        let (from, to) = (list(&["a", "b", "c"]), list(&["a", "b"]));
        for i in 0..3_000 {
            let room = format!("room:{i}");
            let old = hrw::owner(&room, &from).expect("members");
            assert_eq!(leaves(&room, "c", &from, &to), old == "c", "{room}");
            assert!(!leaves(&room, "a", &from, &to) && !leaves(&room, "b", &from, &to));
            if old != "c" {
                assert_eq!(new_owner(&room, &to), Some(old));
            }
        }
        // The same list moves nothing.
        assert!((0..1_000).all(|i| !leaves(&format!("r{i}"), "a", &from, &from)));
    }

    #[test]
    fn steps_and_answers_read_back_as_written() {
        let steps = [
            Step::Begin {
                move_id: 7,
                from: Members::new(0, list(&["a", "b"])),
                to: Members::new(1, list(&["a", "b", "c"])),
            },
            Step::Export {
                move_id: 7,
                room: "chat:x".into(),
                offset: 262_144,
            },
            Step::Abort { move_id: None },
        ];
        for step in steps {
            let bytes = serde_json::to_vec(&step).unwrap();
            assert_eq!(serde_json::from_slice::<Step>(&bytes).unwrap(), step);
        }
        let answer = Answer::Rooms {
            rooms: vec![("chat:x".into(), "c".into())],
            next: Some("chat:x".into()),
        };
        let bytes = serde_json::to_vec(&answer).unwrap();
        assert_eq!(serde_json::from_slice::<Answer>(&bytes).unwrap(), answer);
    }
}
