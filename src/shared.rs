//! The state every HTTP handler and WebSocket session shares: the configuration, the
//! room registry, the store, authentication, rate limiters and connection caps.
//!
//! `server` builds it once at startup and owns the shutdown that reads it;
//! `http` and `session` only read it (and the atomics and maps it holds).

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use dashmap::DashMap;
use governor::DefaultKeyedRateLimiter;

use crate::auth::Auth;
use crate::config::Config;
use crate::outbound::Outbound;
use crate::room::registry::Registry;
use crate::room::RoomConfig;
use crate::store::Store;

/// What every handler and session shares.
pub struct Shared {
    pub config: Config,
    pub room_config: RoomConfig,
    pub registry: Arc<Registry>,
    pub store: Store,
    pub auth: Auth,
    /// Open sessions, for the 4002 at shutdown and the admin disconnect (4403). Written
    /// by sessions on start and stop.
    pub sessions: DashMap<u64, LiveSession>,
    /// Upgraded WebSocket connections whose response body still runs (closing ones
    /// included, until their drain ends), so shutdown waits for its close frames to
    /// reach the clients. Counted by [`crate::outbound::OpenConnection`].
    pub open_connections: Arc<std::sync::atomic::AtomicUsize>,
    pub next_session_id: AtomicU64,
    /// HTTP ops per user (per IP for guests).
    pub http_limiter: DefaultKeyedRateLimiter<String>,
    /// Set at shutdown: new upgrades are refused.
    pub shutting_down: AtomicBool,
    /// The clock every rate limiter reads (see `Session::new`).
    pub clock: governor::clock::DefaultClock,
    /// The connection caps (total and per client IP).
    pub admission: Arc<crate::admission::Admission>,
    /// Open HTTP connections per client IP; slots are taken in `server`'s `on_connect`.
    pub http_conns: Arc<crate::admission::http_conns::HttpConns>,
    /// The rate and turns of HTTP room reads.
    pub reads: crate::admission::read_gate::ReadGate,
    /// Cluster mode's membership and NATS connection; None on a single node.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// What the server keeps of an open WebSocket connection.
#[derive(Debug, Clone)]
pub struct LiveSession {
    /// Who is connected (the admin disconnect closes every connection of a user).
    pub user: Arc<str>,
    /// Closing it ends the connection (the Session actor stops when its stream ends).
    pub outbound: Arc<Outbound>,
}
