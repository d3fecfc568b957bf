//! Cluster mode (`--cluster-nats`): several roomd nodes behind one NATS, each room owned
//! by one node.
//!
//! This module owns the node's NATS connection and everything said over it: which node
//! owns a room ([`hrw`], rendezvous hashing over the member list), the startup
//! agreement on that list and the list in force ([`membership`]), moving rooms when
//! the list changes ([`rebalance`]), and ops and creates forwarded from the node
//! a client is connected to to the room's owner ([`forward`] sends them, [`rpc`]
//! answers them through the owner's normal room path). Nothing about a room lives
//! anywhere but on its owner: its Room actor, log, op-id window and epoch. The HTTP
//! API's other calls about a room travel the same way ([`rpc::Calls`]), and an SSE
//! stream of a room owned elsewhere is a remote subscription ([`stream`]).
//!
//! Without `--cluster-nats` no [`Cluster`] exists and nothing here runs: the single
//! node is exactly as it was.
//!
//! Subjects, all under `--cluster-name` (`{cluster}` below):
//! - `{cluster}.members`: every node answers an announcement with its own (startup check,
//!   and the rebalance tool's roll call);
//! - `{cluster}.node.{id}.move` (and `.move.export`): the steps of moving rooms when the
//!   member list changes ([`rebalance`] has the design, [`mover`] the node's part,
//!   [`rebalance_tool`] the operator's `roomd cluster rebalance`);
//! - `{cluster}.node.{id}.rpc`: requests to node `id` (forwarded ops, creates, HTTP
//!   calls, and the control requests of remote subscriptions);
//! - `{cluster}.reply.{id}.{instance}.{token}`: their answers;
//! - `{cluster}.room.{hex of the room id}`: a room's diffs, published once per batch
//!   by its owner ([`feed`]) while other nodes have subscribers in it, each batch with
//!   its distinct views; every such node joins it once and fans it out ([`mirror`]);
//! - `{cluster}.deliver.{id}.{instance}.{session}.{owner}`: the rest of a remote
//!   subscription (presence changes, signals, errors), from the owner's relay of the
//!   connection ([`relay`]) to the subscriber's node ([`remote`]).

pub mod feed;
pub mod forward;
pub mod hrw;
pub mod membership;
pub mod mirror;
pub mod mover;
pub mod rebalance;
pub mod rebalance_tool;
pub mod relay;
pub mod remote;
pub mod rpc;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use crate::config::ClusterSettings;

/// How long a node waits for NATS at startup before giving up (it cannot check the
/// member list without it, so it does not start).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// This node's membership and NATS connection. Built once at startup by [`Cluster::join`]
/// and shared (read-only) by sessions and HTTP handlers through `Shared`.
pub struct Cluster {
    settings: ClusterSettings,
    /// The member list in force (who owns what); a rebalance's commit replaces it.
    members: Arc<membership::MemberState>,
    client: async_nats::Client,
    /// Random per process: tells this process's NATS messages from a restarted one's.
    instance: u64,
    /// Sends ops to their owners and routes the answers back.
    forwarder: forward::Forwarder,
    /// This node's subscriptions to rooms owned elsewhere.
    remote: Arc<remote::Remote>,
}

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "cannot reach NATS at {urls} within {timeout:?}: {reason} (cluster mode checks the \
         member list over NATS before it serves)"
    )]
    Connect {
        urls: String,
        timeout: Duration,
        reason: String,
    },
    #[error("cluster membership check: {0}")]
    Membership(#[from] membership::AgreeError),
    #[error("cluster membership: {0}")]
    Members(String),
    #[error("cannot subscribe on NATS: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("cannot flush to NATS: {0}")]
    Flush(#[from] async_nats::client::FlushError),
}

impl Cluster {
    /// Connects to NATS, starts answering the member-list question, checks that every
    /// live node agrees on the list, and starts routing the answers of forwarded ops.
    /// The owner side of forwarding starts later ([`rpc::serve`]), once the registry
    /// exists.
    ///
    /// `data_dir` keeps the member list a rebalance committed (`membership`).
    pub async fn join(
        settings: ClusterSettings,
        data_dir: &std::path::Path,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let node = settings.node_id.clone();
        let options = async_nats::ConnectOptions::new()
            .name(format!("roomd {}.{node}", settings.name))
            .connection_timeout(CONNECT_TIMEOUT)
            // Reconnect for ever: while NATS is away, locally owned rooms keep working
            // and everything else is `unavailable` (see `forward`).
            .max_reconnects(None)
            .event_callback(move |event| {
                let node = node.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!(%node, "cluster: NATS connected")
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!(%node, "cluster: NATS disconnected; rooms owned elsewhere are unavailable until it returns")
                        }
                        other => tracing::warn!(%node, "cluster: NATS {other}"),
                    }
                }
            });
        let urls = settings.nats_urls.join(",");
        let client =
            tokio::time::timeout(CONNECT_TIMEOUT, options.connect(settings.nats_urls.clone()))
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|connected| connected.map_err(|e| e.to_string()))
                .map_err(|reason| ClusterError::Connect {
                    urls,
                    timeout: CONNECT_TIMEOUT,
                    reason,
                })?;
        let instance = rand::random::<u64>();
        let kept = membership::load(data_dir).map_err(ClusterError::Members)?;
        let flag = membership::Members::new(0, settings.nodes.clone());
        let members = Arc::new(membership::MemberState::new(
            settings.node_id.clone(),
            instance,
            kept.clone()
                .filter(|k| k.nodes == flag.nodes)
                .unwrap_or_else(|| flag.clone()),
            Some(data_dir.to_owned()),
        ));
        let ours = members.announcement();
        let subject = format!("{}.members", settings.name);
        membership::answer(client.clone(), subject.clone(), members.clone()).await?;
        let live = membership::agree(&client, subject, &ours).await?;
        let decided = membership::decide(&settings.node_id, &flag, kept.as_ref(), &live)
            .map_err(|e| ClusterError::Membership(e.into()))?;
        // Only a rebalance's list is kept (generation 0 is the flag's own).
        if decided.generation > 0
            && decided.contains(&settings.node_id)
            && kept.as_ref() != Some(&decided)
        {
            members.commit(decided.clone()).map_err(|e| {
                ClusterError::Members(format!(
                    "cannot keep the member list in {}: {e}",
                    data_dir.display()
                ))
            })?;
        } else {
            members.adopt(decided.clone());
        }
        let live: Vec<&str> = live.iter().map(|a| a.node.as_str()).collect();
        if decided.contains(&settings.node_id) {
            tracing::info!(
                node = %settings.node_id,
                members = %decided.nodes.join(","),
                generation = decided.generation,
                live = %live.join(","),
                "cluster: joined; the live nodes agree on the member list"
            );
        } else {
            tracing::warn!(
                node = %settings.node_id,
                members = %decided.nodes.join(","),
                generation = decided.generation,
                "cluster: this node is outside the live member list: it owns no room and forwards everything until `roomd cluster rebalance --to` adds it"
            );
        }
        let forwarder = forward::Forwarder::start(&client, &settings, instance).await?;
        let remote =
            remote::Remote::start(&client, &settings.name, &settings.node_id, instance).await?;
        let cluster = Arc::new(Cluster {
            settings,
            members,
            client,
            instance,
            forwarder,
            remote,
        });
        cluster
            .remote
            .mirrors()
            .set_cluster(Arc::downgrade(&cluster));
        let pinging = Arc::downgrade(&cluster);
        actix_rt::spawn(async move {
            loop {
                tokio::time::sleep(remote::PING_INTERVAL).await;
                let Some(cluster) = pinging.upgrade() else {
                    return;
                };
                cluster.ping_owners().await;
            }
        });
        Ok(cluster)
    }

    pub fn node_id(&self) -> &str {
        &self.settings.node_id
    }

    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    /// The node that owns `room_id` under the member list in force.
    pub fn owner(&self, room_id: &str) -> String {
        self.members.owner(room_id)
    }

    /// Whether this node owns `room_id` (its ops and subscriptions are served here).
    pub fn owns(&self, room_id: &str) -> bool {
        self.owner(room_id) == self.settings.node_id
    }

    /// The member list in force and its keeper.
    pub fn members(&self) -> &Arc<membership::MemberState> {
        &self.members
    }

    /// Whether the NATS connection is up now.
    pub fn nats_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn instance(&self) -> u64 {
        self.instance
    }

    pub fn forwarder(&self) -> &forward::Forwarder {
        &self.forwarder
    }

    pub fn remote(&self) -> &Arc<remote::Remote> {
        &self.remote
    }

    /// Pings every owner this node has remote subscriptions on (see [`remote`]).
    async fn ping_owners(&self) {
        for owner in self.remote.owners() {
            let request = rpc::Request {
                room: String::new(),
                user: String::new(),
                op_id: None,
                now_ms: 0,
                what: rpc::What::Ping {
                    node: self.remote.node_key().to_owned(),
                },
                refusal: None,
            };
            let reply = match self.forwarder.send(&owner, &request).await {
                Ok(ticket) => ticket.reply().await,
                Err(e) => Err(e),
            };
            let alive = match reply {
                Ok(rpc::Reply::Done { instance, .. }) => Some(instance),
                _ => None,
            };
            self.remote.owner_is(&owner, alive);
        }
    }

    /// What `/readyz` says about the cluster.
    pub fn status(&self) -> serde_json::Value {
        let members = self.members.members();
        serde_json::json!({
            "node": self.settings.node_id,
            "members": members.nodes,
            "generation": members.generation,
            // "outside": not in the member list (joining, or removed): owns no room.
            "membership": if members.contains(&self.settings.node_id) { "member" } else { "outside" },
            "nats": if self.nats_connected() { "connected" } else { "disconnected" },
        })
    }
}

/// `{cluster}.node.{node}.rpc`.
pub fn rpc_subject(cluster: &str, node: &str) -> String {
    format!("{cluster}.node.{node}.rpc")
}
