//! The member list: the startup agreement on it over NATS, the list in force while the
//! node runs, and the agreed list kept in the data dir.
//!
//! Every node is given the same `--cluster-nodes`. A node started with a different list
//! would compute other owners, and two nodes could then both own one room. So before it
//! serves anything, a node asks every live node for its list on `{cluster}.members` and
//! refuses to start when a live *member* disagrees (or when a live node already has its
//! id); every running node answers that subject for as long as it runs.
//!
//! The list changes only through `roomd cluster rebalance` (`rebalance`), which moves
//! the rooms whose owner changes and then commits the new list on every node with the
//! next *generation*. Each node writes the committed list to `DIR/CLUSTER` (JSON:
//! generation and nodes) before it uses it, so a node restarted later comes up with it:
//! its `--cluster-nodes` must then be that list (or the list the live cluster agrees on
//! at a newer generation), and anything else is refused with both lists named.
//!
//! A node started with a list that contains itself while the live members' list does
//! not is *outside* (joining): it adopts the live list, owns no room, serves its clients
//! by forwarding everything to the owners, and says so in `/readyz`, until a rebalance
//! adds it. A node a rebalance removed is outside too.
//!
//! The answering subscription is made (and flushed to the server) before the question is
//! asked, so of two nodes starting at the same moment at least the later one hears the
//! earlier one. A running node that hears a disagreeing announcement logs an error; the
//! announcing node is the one that refuses.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::config::ClusterSettings;

/// How long a starting node collects answers to its announcement. Answers from a NATS
/// on the same network arrive within milliseconds; this is the slack for a busy host.
pub const ANSWER_WINDOW: Duration = Duration::from_millis(500);

/// The file in the data dir that holds the agreed member list.
pub const MEMBERS_FILE: &str = "CLUSTER";

/// A member list and its generation (0 for the list every node was started with, one
/// more at each rebalance).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Members {
    pub generation: u64,
    /// Sorted (order does not change ownership).
    pub nodes: Vec<String>,
}

impl Members {
    pub fn new(generation: u64, mut nodes: Vec<String>) -> Members {
        nodes.sort();
        nodes.dedup();
        Members { generation, nodes }
    }

    pub fn contains(&self, node: &str) -> bool {
        self.nodes.iter().any(|n| n == node)
    }
}

/// What a node says about itself, asked or not.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Announcement {
    pub node: String,
    /// The member list in force on it, sorted (for an outside node: the list it
    /// adopted, without itself).
    pub nodes: Vec<String>,
    /// A random number per process, so a node recognises its own messages and two
    /// processes with one node id are told apart.
    pub instance: u64,
    /// The generation of `nodes` (absent from nodes built before rebalancing: 0).
    #[serde(default)]
    pub generation: u64,
}

impl Announcement {
    pub fn new(settings: &ClusterSettings, instance: u64) -> Announcement {
        let members = Members::new(0, settings.nodes.clone());
        Announcement::of(&settings.node_id, &members, instance)
    }

    pub fn of(node: &str, members: &Members, instance: u64) -> Announcement {
        Announcement {
            node: node.to_owned(),
            nodes: members.nodes.clone(),
            instance,
            generation: members.generation,
        }
    }

    /// Whether the announcing node is a member of its own list.
    pub fn is_member(&self) -> bool {
        self.nodes.contains(&self.node)
    }
}

/// The member list in force on this node, shared by everything that asks who owns a
/// room; replaced only by a rebalance's commit.
pub struct MemberState {
    pub node: String,
    pub instance: u64,
    members: RwLock<Members>,
    /// Where the committed list is kept; None in tests.
    data_dir: Option<PathBuf>,
}

impl MemberState {
    pub fn new(node: String, instance: u64, members: Members, data_dir: Option<PathBuf>) -> Self {
        MemberState {
            node,
            instance,
            members: RwLock::new(members),
            data_dir,
        }
    }

    pub fn members(&self) -> Members {
        self.members.read().clone()
    }

    /// The member of the list in force that owns `room_id`.
    pub fn owner(&self, room_id: &str) -> String {
        let members = self.members.read();
        super::hrw::owner(room_id, &members.nodes)
            .unwrap_or(self.node.as_str())
            .to_owned()
    }

    pub fn is_member(&self) -> bool {
        self.members.read().contains(&self.node)
    }

    pub fn announcement(&self) -> Announcement {
        Announcement::of(&self.node, &self.members.read(), self.instance)
    }

    /// Where the committed list is kept (None in tests).
    pub fn data_dir(&self) -> Option<&Path> {
        self.data_dir.as_deref()
    }

    /// Puts `members` in force without writing it (the startup decision).
    pub fn adopt(&self, members: Members) {
        *self.members.write() = members;
    }

    /// Writes `members` to the data dir (durably), then puts it in force. Err: nothing
    /// changed.
    pub fn commit(&self, members: Members) -> std::io::Result<()> {
        if let Some(dir) = &self.data_dir {
            persist(dir, &members)?;
        }
        *self.members.write() = members;
        Ok(())
    }
}

/// The agreed list kept in `dir`, if one was ever committed there.
pub fn load(dir: &Path) -> Result<Option<Members>, String> {
    let path = dir.join(MEMBERS_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(|m: Members| Some(Members::new(m.generation, m.nodes)))
            .map_err(|e| format!("{} is not a member list: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Writes `members` to `dir` durably: a temporary file, fsync'd, renamed over the old
/// one, and the dir fsync'd, so a crash leaves the old list or the new one.
pub fn persist(dir: &Path, members: &Members) -> std::io::Result<()> {
    // Integers and strings: always serializable.
    write_durably(
        dir,
        MEMBERS_FILE,
        &serde_json::to_vec(members).unwrap_or_default(),
    )
}

/// Writes `bytes` to `dir/name` durably (a temporary file, fsync'd, renamed over the
/// old one, the dir fsync'd): a crash leaves the old contents or the new ones.
pub fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Why a node must not start with its member list.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Disagreement {
    #[error(
        "live node `{node}` has --cluster-nodes {theirs}, this node {ours}: refusing to start \
         (two nodes could own one room); give every node the same list"
    )]
    OtherList {
        node: String,
        theirs: String,
        ours: String,
    },
    #[error("node id `{0}` is already live in this cluster: refusing to start a second one")]
    SameId(String),
    #[error(
        "the data dir keeps the member list {kept} (generation {generation}, committed by \
         `roomd cluster rebalance`), but --cluster-nodes is {flag}: refusing to start; \
         start with --cluster-nodes {kept}"
    )]
    Kept {
        kept: String,
        generation: u64,
        flag: String,
    },
}

/// Checks an answer (or an announcement heard) against this node's own; pure.
pub fn check(ours: &Announcement, theirs: &Announcement) -> Result<(), Disagreement> {
    if theirs.instance == ours.instance {
        return Ok(());
    }
    if theirs.node == ours.node {
        return Err(Disagreement::SameId(ours.node.clone()));
    }
    // An outside node (joining, or removed) owns nothing: it takes the members' list.
    // One of two nodes outside the other's list is settled by [`decide`].
    let knows = |a: &Announcement, b: &Announcement| a.nodes.contains(&b.node);
    if !theirs.is_member() || !ours.is_member() || !knows(ours, theirs) || !knows(theirs, ours) {
        return Ok(());
    }
    if theirs.nodes != ours.nodes {
        return Err(Disagreement::OtherList {
            node: theirs.node.clone(),
            theirs: theirs.nodes.join(","),
            ours: ours.nodes.join(","),
        });
    }
    Ok(())
}

/// Subscribes to `{cluster}.members` and answers every announcement with ours, for as
/// long as the connection lives (run before [`agree`], see the module docs).
pub async fn answer(
    client: async_nats::Client,
    subject: String,
    state: Arc<MemberState>,
) -> Result<(), async_nats::SubscribeError> {
    let mut questions = client.subscribe(subject).await?;
    actix_rt::spawn(async move {
        while let Some(question) = questions.next().await {
            let ours = state.announcement();
            let payload = bytes::Bytes::from(serde_json::to_vec(&ours).unwrap_or_default());
            let Ok(theirs) = serde_json::from_slice::<Announcement>(&question.payload) else {
                tracing::warn!(subject = %question.subject, "cluster: unreadable announcement ignored");
                continue;
            };
            if theirs.instance == ours.instance {
                continue;
            }
            if let Err(e) = check(&ours, &theirs) {
                tracing::error!(node = %theirs.node, "cluster: a node announced a disagreement and should refuse to start: {e}");
            }
            if let Some(reply) = question.reply {
                // Best effort: a lost answer only weakens this one startup check.
                let _ = client.publish(reply, payload).await;
            }
        }
    });
    Ok(())
}

/// Announces this node and collects the answers of the live nodes for
/// [`ANSWER_WINDOW`]: Ok with their announcements, or the first disagreement.
pub async fn agree(
    client: &async_nats::Client,
    subject: String,
    ours: &Announcement,
) -> Result<Vec<Announcement>, AgreeError> {
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await?;
    let payload = bytes::Bytes::from(serde_json::to_vec(ours).unwrap_or_default());
    client.publish_with_reply(subject, inbox, payload).await?;
    client.flush().await?;
    let mut agreeing = Vec::new();
    let deadline = tokio::time::Instant::now() + ANSWER_WINDOW;
    while let Ok(Some(answer)) = tokio::time::timeout_at(deadline, answers.next()).await {
        // No responders (a status message) just means nobody else is up.
        let Ok(theirs) = serde_json::from_slice::<Announcement>(&answer.payload) else {
            continue;
        };
        check(ours, &theirs)?;
        if theirs.instance != ours.instance {
            agreeing.push(theirs);
        }
    }
    agreeing.sort_by(|a, b| a.node.cmp(&b.node));
    agreeing.dedup_by(|a, b| a.node == b.node);
    Ok(agreeing)
}

/// The list this node starts with, from its `--cluster-nodes` (`flag`), the list kept in
/// its data dir (`kept`) and the live nodes' answers; pure. See the module docs.
pub fn decide(
    node: &str,
    flag: &Members,
    kept: Option<&Members>,
    live: &[Announcement],
) -> Result<Members, Disagreement> {
    let members: Vec<&Announcement> = live.iter().filter(|a| a.is_member()).collect();
    let live_list = match members.first() {
        Some(first) => {
            if let Some(other) = members.iter().find(|a| a.nodes != first.nodes) {
                return Err(Disagreement::OtherList {
                    node: other.node.clone(),
                    theirs: other.nodes.join(","),
                    ours: first.nodes.join(","),
                });
            }
            let generation = members.iter().map(|a| a.generation).max().unwrap_or(0);
            Some(Members::new(generation, first.nodes.clone()))
        }
        None => None,
    };
    let newer_live = live_list
        .as_ref()
        .filter(|l| l.nodes == flag.nodes && kept.is_none_or(|k| l.generation > k.generation));
    if let Some(kept) = kept {
        if kept.nodes != flag.nodes && newer_live.is_none() {
            return Err(Disagreement::Kept {
                kept: kept.nodes.join(","),
                generation: kept.generation,
                flag: flag.nodes.join(","),
            });
        }
    }
    let ours = Members::new(
        kept.filter(|k| k.nodes == flag.nodes)
            .map_or(0, |k| k.generation),
        flag.nodes.clone(),
    );
    match live_list {
        None => Ok(ours),
        Some(live) if live.nodes == ours.nodes => Ok(Members::new(
            live.generation.max(ours.generation),
            live.nodes,
        )),
        // Outside the live list: adopt it and wait for a rebalance.
        Some(live) if !live.contains(node) => Ok(live),
        Some(live) => Err(Disagreement::OtherList {
            node: members.first().map(|a| a.node.clone()).unwrap_or_default(),
            theirs: live.nodes.join(","),
            ours: ours.nodes.join(","),
        }),
    }
}

/// Why the startup agreement did not pass.
#[derive(Debug, thiserror::Error)]
pub enum AgreeError {
    #[error(transparent)]
    Disagree(#[from] Disagreement),
    #[error("cannot subscribe on NATS: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("cannot publish on NATS: {0}")]
    Publish(#[from] async_nats::PublishError),
    #[error("cannot flush to NATS: {0}")]
    Flush(#[from] async_nats::client::FlushError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announcement(node: &str, nodes: &[&str], instance: u64) -> Announcement {
        let settings = ClusterSettings {
            nats_urls: vec![],
            node_id: node.into(),
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            name: "roomd".into(),
        };
        Announcement::new(&settings, instance)
    }

    #[test]
    fn a_node_refuses_another_list_or_its_own_id_live() {
        let ours = announcement("a", &["a", "b", "c"], 1);
        // The same list in another order agrees.
        assert_eq!(
            check(&ours, &announcement("b", &["c", "b", "a"], 2)),
            Ok(())
        );
        // Our own message, heard back.
        assert_eq!(check(&ours, &ours.clone()), Ok(()));
        assert_eq!(
            check(&ours, &announcement("a", &["a", "b", "c"], 3)),
            Err(Disagreement::SameId("a".into()))
        );
        let other = check(&ours, &announcement("b", &["a", "b"], 2)).unwrap_err();
        assert_eq!(
            other.to_string(),
            "live node `b` has --cluster-nodes a,b, this node a,b,c: refusing to start \
             (two nodes could own one room); give every node the same list"
        );
    }

    fn members(generation: u64, nodes: &[&str]) -> Members {
        Members::new(generation, nodes.iter().map(|n| n.to_string()).collect())
    }

    fn live(node: &str, generation: u64, nodes: &[&str]) -> Announcement {
        Announcement::of(node, &members(generation, nodes), 9)
    }

    #[test]
    fn a_node_starts_with_the_kept_list_or_waits_outside_the_live_one() {
        let abc = members(0, &["a", "b", "c"]);
        // Alone: the flag's list.
        assert_eq!(decide("a", &abc, None, &[]), Ok(abc.clone()));
        // The kept list of a rebalance, with its generation.
        let kept = members(2, &["a", "b", "c"]);
        assert_eq!(decide("a", &abc, Some(&kept), &[]), Ok(kept.clone()));
        // A flag other than the kept list is refused, naming both.
        let refused = decide("a", &members(0, &["a", "b"]), Some(&kept), &[]).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("keeps the member list a,b,c (generation 2")
                && refused.to_string().contains("--cluster-nodes is a,b"),
            "{refused}"
        );
        // ...unless the live members agree on the flag's list at a newer generation (the
        // node was down while the list was committed).
        let newer = [live("b", 3, &["a", "b"]), live("d", 3, &["a", "b"])];
        assert_eq!(
            decide("a", &members(0, &["a", "b"]), Some(&kept), &newer),
            Ok(members(3, &["a", "b"]))
        );
        // A new node whose list holds itself waits outside the live list.
        let live_abc = [
            live("a", 1, &["a", "b", "c"]),
            live("b", 1, &["a", "b", "c"]),
        ];
        assert_eq!(
            decide("d", &members(0, &["a", "b", "c", "d"]), None, &live_abc),
            Ok(members(1, &["a", "b", "c"]))
        );
        // A member started with another list than the live members' is refused.
        assert!(matches!(
            decide("c", &members(0, &["a", "b", "c", "d"]), None, &live_abc),
            Err(Disagreement::OtherList { .. })
        ));
        // An outside node's answer does not count as a member's.
        let with_outsider = [
            live("a", 1, &["a", "b", "c"]),
            live("d", 1, &["a", "b", "c"]),
        ];
        assert_eq!(
            decide("b", &abc, None, &with_outsider),
            Ok(members(1, &["a", "b", "c"]))
        );
    }
}
