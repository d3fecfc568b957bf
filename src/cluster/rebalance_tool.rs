//! `roomd cluster rebalance`: the operator's side of moving rooms when the member list
//! changes. It drives the steps of [`super::rebalance`] (which says why they are safe)
//! over NATS and prints what it does; the nodes do the work ([`super::mover`]).
//!
//! `--to LIST` moves to a new list (add or remove nodes); `--abort` forgets a move left
//! pending by a tool that died (every live node unfreezes and drops its copies). The
//! tool talks to NATS only, never to a node's data dir.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use futures_util::StreamExt;

use super::membership::{Announcement, Members};
use super::rebalance::{ask, Answer, Step, ROOMS_PER_BATCH, STEP_TIMEOUT};

/// Flags of `roomd cluster`.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub command: ClusterCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum ClusterCommand {
    /// Move rooms to a new member list (add or remove nodes): every node of the old and
    /// the new list must be running, new nodes started with `--cluster-nodes` set to the
    /// new list.
    Rebalance(RebalanceArgs),
}

/// Flags of `roomd cluster rebalance`.
#[derive(Args, Debug, Clone)]
pub struct RebalanceArgs {
    /// NATS server URL, as the nodes were given it (repeatable).
    #[arg(
        long,
        required = true,
        env = "ROOMD_CLUSTER_NATS",
        value_delimiter = ','
    )]
    pub cluster_nats: Vec<String>,

    /// The cluster's `--cluster-name`.
    #[arg(long, default_value = "roomd", env = "ROOMD_CLUSTER_NAME")]
    pub cluster_name: String,

    /// The new member list, comma separated.
    #[arg(long, value_delimiter = ',', required_unless_present = "abort")]
    pub to: Vec<String>,

    /// Forget a move a failed run left pending, on every live node.
    #[arg(long, conflicts_with = "to")]
    pub abort: bool,
}

/// Why `roomd cluster rebalance` did not finish.
#[derive(Debug, thiserror::Error)]
pub enum RebalanceError {
    #[error("cannot reach NATS at {urls}: {reason}")]
    Connect { urls: String, reason: String },
    #[error("{0}; nothing changed")]
    Refused(String),
    #[error("{reason}; rolled back: the old member list stays in force and nothing was lost{}", abort_text(.abort_failures))]
    RolledBack {
        reason: String,
        abort_failures: Vec<String>,
    },
    #[error(
        "the new member list (generation {generation}) is committed on {done} but not on \
         {missing}: {reason}. Restart those nodes with --cluster-nodes {nodes}: a node \
         takes the list the live members agree on at the newer generation"
    )]
    PartialCommit {
        generation: u64,
        nodes: String,
        done: String,
        missing: String,
        reason: String,
    },
    #[error("cannot start a runtime: {0}")]
    Runtime(std::io::Error),
}

fn abort_text(failures: &[String]) -> String {
    if failures.is_empty() {
        String::new()
    } else {
        format!(
            " (but: {}; run `roomd cluster rebalance --abort`)",
            failures.join("; ")
        )
    }
}

/// How long the roll call collects answers.
const ROLL_CALL: Duration = Duration::from_secs(1);

/// Plan rounds: a second round finds a room created just before the move began.
const MAX_ROUNDS: usize = 3;

/// Runs `roomd cluster ...`.
pub fn run(args: ClusterArgs) -> Result<(), RebalanceError> {
    let ClusterCommand::Rebalance(args) = args.command;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RebalanceError::Runtime)?;
    runtime.block_on(rebalance(args))
}

async fn rebalance(args: RebalanceArgs) -> Result<(), RebalanceError> {
    let urls = args.cluster_nats.join(",");
    let client = tokio::time::timeout(
        super::CONNECT_TIMEOUT,
        async_nats::ConnectOptions::new()
            .name("roomd cluster rebalance")
            .connect(args.cluster_nats.clone()),
    )
    .await
    .map_err(|_| "timed out".to_owned())
    .and_then(|c| c.map_err(|e| e.to_string()))
    .map_err(|reason| RebalanceError::Connect { urls, reason })?;
    let cluster = args.cluster_name.as_str();
    let live = roll_call(&client, cluster).await?;
    if args.abort {
        for node in live.keys() {
            match ask(
                &client,
                cluster,
                node,
                &Step::Abort { move_id: None },
                STEP_TIMEOUT,
            )
            .await
            {
                Ok(Answer::Done) => println!("{node}: no move pending"),
                Ok(other) => println!("{node}: {other:?}"),
                Err(e) => println!("{node}: {e}"),
            }
        }
        return Ok(());
    }
    let from = current_list(&live)?;
    let to = Members::new(from.generation + 1, args.to.clone());
    if to.nodes.iter().any(|n| n.is_empty() || n.contains('.')) {
        return Err(RebalanceError::Refused(format!(
            "--to {}: node ids are non-empty and have no dots",
            to.nodes.join(",")
        )));
    }
    if to.nodes == from.nodes {
        println!(
            "the member list is already {} (generation {}): nothing to move",
            from.nodes.join(","),
            from.generation
        );
        return Ok(());
    }
    let mut everyone: Vec<String> = from.nodes.iter().chain(&to.nodes).cloned().collect();
    everyone.sort();
    everyone.dedup();
    let missing: Vec<&str> = everyone
        .iter()
        .filter(|n| !live.contains_key(*n))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(RebalanceError::Refused(format!(
            "node {} not running (every node of the old list {} and the new list {} must \
             be; start new nodes with --cluster-nodes {})",
            missing.join(", "),
            from.nodes.join(","),
            to.nodes.join(","),
            to.nodes.join(",")
        )));
    }
    println!(
        "moving from {} (generation {}) to {} (generation {})",
        from.nodes.join(","),
        from.generation,
        to.nodes.join(","),
        to.generation
    );
    let started = Instant::now();
    let move_id = rand::random::<u64>();
    let mover = Move {
        client: &client,
        cluster,
        move_id,
        from: &from,
        to: &to,
        everyone: &everyone,
    };
    let moved = match mover.prepare().await {
        Ok(moved) => moved,
        Err(reason) => {
            let abort_failures = mover.abort().await;
            return Err(RebalanceError::RolledBack {
                reason,
                abort_failures,
            });
        }
    };
    mover.commit().await?;
    println!(
        "committed generation {} ({}): {moved} rooms moved in {:.1} s",
        to.generation,
        to.nodes.join(","),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Every live node's announcement, by node id.
async fn roll_call(
    client: &async_nats::Client,
    cluster: &str,
) -> Result<BTreeMap<String, Announcement>, RebalanceError> {
    let inbox = client.new_inbox();
    let nats = |e: String| RebalanceError::Connect {
        urls: "NATS".into(),
        reason: e,
    };
    let mut answers = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| nats(e.to_string()))?;
    // Not a member of any list: nodes answer without taking it for a disagreement.
    let question = Announcement {
        node: String::new(),
        nodes: Vec::new(),
        instance: rand::random(),
        generation: 0,
    };
    let payload = serde_json::to_vec(&question).unwrap_or_default();
    client
        .publish_with_reply(format!("{cluster}.members"), inbox, payload.into())
        .await
        .map_err(|e| nats(e.to_string()))?;
    client.flush().await.map_err(|e| nats(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + ROLL_CALL;
    let mut live = BTreeMap::new();
    while let Ok(Some(answer)) = tokio::time::timeout_at(deadline, answers.next()).await {
        if let Ok(theirs) = serde_json::from_slice::<Announcement>(&answer.payload) {
            live.insert(theirs.node.clone(), theirs);
        }
    }
    Ok(live)
}

/// The list the live members agree on.
fn current_list(live: &BTreeMap<String, Announcement>) -> Result<Members, RebalanceError> {
    let members: Vec<&Announcement> = live.values().filter(|a| a.is_member()).collect();
    let Some(first) = members.first() else {
        return Err(RebalanceError::Refused(
            "no member node answered on NATS (check --cluster-nats and --cluster-name)".into(),
        ));
    };
    if let Some(other) = members
        .iter()
        .find(|a| a.nodes != first.nodes || a.generation != first.generation)
    {
        return Err(RebalanceError::Refused(format!(
            "live members disagree: {} has {} (generation {}), {} has {} (generation {})",
            first.node,
            first.nodes.join(","),
            first.generation,
            other.node,
            other.nodes.join(","),
            other.generation
        )));
    }
    Ok(Members::new(first.generation, first.nodes.clone()))
}

/// One move, as the tool drives it.
struct Move<'a> {
    client: &'a async_nats::Client,
    cluster: &'a str,
    move_id: u64,
    from: &'a Members,
    to: &'a Members,
    /// Every node of the old list and the new one.
    everyone: &'a [String],
}

impl Move<'_> {
    async fn ask(&self, node: &str, step: Step) -> Result<Answer, String> {
        match ask(self.client, self.cluster, node, &step, STEP_TIMEOUT).await? {
            Answer::Refused { msg } => Err(msg),
            answer => Ok(answer),
        }
    }

    /// Begin, plan, freeze and copy, verify; Ok with the number of rooms moved. Err:
    /// the caller aborts.
    async fn prepare(&self) -> Result<usize, String> {
        let move_id = self.move_id;
        for node in self.everyone {
            let step = Step::Begin {
                move_id,
                from: self.from.clone(),
                to: self.to.clone(),
            };
            self.ask(node, step).await?;
        }
        let mut moved = 0;
        for round in 0..MAX_ROUNDS {
            let plan = self.plan().await?;
            if plan.is_empty() {
                if self.verify().await? {
                    return Ok(moved);
                }
                continue;
            }
            for ((source, target), rooms) in plan {
                for batch in rooms.chunks(ROOMS_PER_BATCH) {
                    let rooms = batch.to_vec();
                    let freeze = Step::Freeze {
                        move_id,
                        rooms: rooms.clone(),
                    };
                    self.ask(&source, freeze).await?;
                    let pull = Step::Pull {
                        move_id,
                        from: source.clone(),
                        rooms,
                    };
                    self.ask(&target, pull).await?;
                    moved += batch.len();
                    println!(
                        "round {}: {} rooms {source} -> {target} ({moved} moved)",
                        round + 1,
                        batch.len()
                    );
                }
            }
            if self.verify().await? {
                return Ok(moved);
            }
        }
        Err(format!(
            "rooms kept appearing on their old owners after {MAX_ROUNDS} rounds"
        ))
    }

    /// The rooms leaving each old owner, by (old owner, new owner).
    async fn plan(&self) -> Result<BTreeMap<(String, String), Vec<String>>, String> {
        let mut plan: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        let mut seen = std::collections::HashSet::new();
        for node in &self.from.nodes {
            let mut after = None;
            loop {
                let step = Step::Plan {
                    move_id: self.move_id,
                    after: after.take(),
                };
                match self.ask(node, step).await? {
                    Answer::Rooms { rooms, next } => {
                        for (room, target) in rooms {
                            // A room may be named twice (stored, and held by its actor).
                            if seen.insert(room.clone()) {
                                plan.entry((node.clone(), target)).or_default().push(room);
                            }
                        }
                        match next {
                            Some(next) => after = Some(next),
                            None => break,
                        }
                    }
                    other => return Err(format!("node {node} answered a plan with {other:?}")),
                }
            }
        }
        Ok(plan)
    }

    /// True when every old owner has every leaving room frozen.
    async fn verify(&self) -> Result<bool, String> {
        for node in &self.from.nodes {
            let step = Step::Verify {
                move_id: self.move_id,
            };
            if let Err(msg) = self.ask(node, step).await {
                if msg.contains("not moved") {
                    println!("{msg}; another round");
                    return Ok(false);
                }
                return Err(msg);
            }
        }
        Ok(true)
    }

    /// Commits on every node, retrying each a few times.
    async fn commit(&self) -> Result<(), RebalanceError> {
        let mut done = Vec::new();
        let mut missing = Vec::new();
        let mut reason = String::new();
        for node in self.everyone {
            let mut result = Err(String::new());
            for _ in 0..3 {
                result = self
                    .ask(
                        node,
                        Step::Commit {
                            move_id: self.move_id,
                        },
                    )
                    .await;
                if result.is_ok() {
                    break;
                }
            }
            match result {
                Ok(_) => done.push(node.clone()),
                Err(e) => {
                    reason = e;
                    missing.push(node.clone());
                }
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(RebalanceError::PartialCommit {
            generation: self.to.generation,
            nodes: self.to.nodes.join(","),
            done: done.join(","),
            missing: missing.join(","),
            reason,
        })
    }

    /// Tells every node to forget the move; what could not be told.
    async fn abort(&self) -> Vec<String> {
        let mut failures = Vec::new();
        for node in self.everyone {
            let step = Step::Abort {
                move_id: Some(self.move_id),
            };
            if let Err(e) = self.ask(node, step).await {
                failures.push(format!("node {node}: {e}"));
            }
        }
        failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_list_is_the_live_members_one() {
        let at = |node: &str, generation, nodes: &[&str]| {
            let members = Members::new(generation, nodes.iter().map(|n| n.to_string()).collect());
            (node.to_owned(), Announcement::of(node, &members, 1))
        };
        let live: BTreeMap<_, _> = [
            at("a", 2, &["a", "b"]),
            at("b", 2, &["a", "b"]),
            // A node waiting outside, with the list it adopted.
            at("c", 2, &["a", "b"]),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            current_list(&live).unwrap(),
            Members::new(2, vec!["a".into(), "b".into()])
        );
        let split: BTreeMap<_, _> = [at("a", 2, &["a", "b"]), at("b", 3, &["a", "b"])]
            .into_iter()
            .collect();
        assert!(current_list(&split)
            .unwrap_err()
            .to_string()
            .contains("live members disagree"));
        assert!(current_list(&BTreeMap::new()).is_err());
    }
}
