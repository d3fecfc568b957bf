//! Startup agreement on the member list, over NATS.
//!
//! Membership is static: every node is given the same `--cluster-nodes`. A node started
//! with a different list would compute other owners, and two nodes could then both own
//! one room. So before it serves anything, a node asks every live node for its list on
//! `{cluster}.members` and refuses to start when one disagrees (or when a live node
//! already has its id); every running node answers that subject for as long as it runs.
//!
//! The answering subscription is made (and flushed to the server) before the question is
//! asked, so of two nodes starting at the same moment at least the later one hears the
//! earlier one. A running node that hears a disagreeing announcement logs an error; the
//! announcing node is the one that refuses.

use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::config::ClusterSettings;

/// How long a starting node collects answers to its announcement. Answers from a NATS
/// on the same network arrive within milliseconds; this is the slack for a busy host.
pub const ANSWER_WINDOW: Duration = Duration::from_millis(500);

/// What a node says about itself, asked or not.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Announcement {
    pub node: String,
    /// Its `--cluster-nodes`, sorted (order does not change ownership).
    pub nodes: Vec<String>,
    /// A random number per process, so a node recognises its own messages and two
    /// processes with one node id are told apart.
    pub instance: u64,
}

impl Announcement {
    pub fn new(settings: &ClusterSettings, instance: u64) -> Announcement {
        let mut nodes = settings.nodes.clone();
        nodes.sort();
        Announcement {
            node: settings.node_id.clone(),
            nodes,
            instance,
        }
    }
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
}

/// Checks an answer (or an announcement heard) against this node's own; pure.
pub fn check(ours: &Announcement, theirs: &Announcement) -> Result<(), Disagreement> {
    if theirs.instance == ours.instance {
        return Ok(());
    }
    if theirs.node == ours.node {
        return Err(Disagreement::SameId(ours.node.clone()));
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
    ours: Announcement,
) -> Result<(), async_nats::SubscribeError> {
    let mut questions = client.subscribe(subject).await?;
    let payload = bytes::Bytes::from(serde_json::to_vec(&ours).unwrap_or_default());
    actix_rt::spawn(async move {
        while let Some(question) = questions.next().await {
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
                let _ = client.publish(reply, payload.clone()).await;
            }
        }
    });
    Ok(())
}

/// Announces this node and collects the answers of the live nodes for
/// [`ANSWER_WINDOW`]: Ok with the ids of the nodes that agree, or the first
/// disagreement.
pub async fn agree(
    client: &async_nats::Client,
    subject: String,
    ours: &Announcement,
) -> Result<Vec<String>, AgreeError> {
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
            agreeing.push(theirs.node);
        }
    }
    agreeing.sort();
    agreeing.dedup();
    Ok(agreeing)
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
}
