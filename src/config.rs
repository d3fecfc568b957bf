//! Every setting of the server, from flags and `ROOMD_*` environment variables.
//!
//! `ServeArgs` is the clap surface (`roomd serve --help`); [`Config`] is the validated
//! result that `server::run` and everything below it receive explicitly. No other module
//! reads the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::store::Durability;

/// Flags of `roomd serve`. Each flag can also come from the environment variable named
/// next to it, or from the `--config` file; a flag on the command line wins over the
/// environment, which wins over the file.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// TOML file of settings, keyed by flag name (`bind = "0.0.0.0:8080"`,
    /// `public-read = ["poll:*"]`, `durability = "none"`); flags and ROOMD_* variables
    /// win over it.
    #[arg(long, env = "ROOMD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to listen on. Port 0 picks a free port; the bound address is printed as
    /// `roomd listening on ADDR` on stdout.
    #[arg(long, env = "ROOMD_BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,

    /// Folder for the log, snapshots and metadata (created if missing; one server at a
    /// time: a second one on the same folder refuses to start).
    #[arg(long, env = "ROOMD_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// HMAC secret for JWT auth (HS256/384/512). Auth is on when a key is configured
    /// (this, --jwt-public-key or --jwt-jwks; one of them). Without one auth is off: user
    /// ids come from `?user=` and every caller is an admin, which is only allowed on a
    /// loopback address.
    #[arg(long, env = "ROOMD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM public key verifying JWTs: RSA (RS256/384/512, PS256/384/512), EC (ES256/384)
    /// or Ed25519 (EdDSA).
    #[arg(long, env = "ROOMD_JWT_PUBLIC_KEY", value_name = "FILE")]
    pub jwt_public_key: Option<PathBuf>,

    /// JWKS document verifying JWTs; the token's `kid` picks the key. Re-read on SIGHUP.
    #[arg(long, env = "ROOMD_JWT_JWKS", value_name = "FILE")]
    pub jwt_jwks: Option<PathBuf>,

    /// When set, a token's `iss` must equal this.
    #[arg(long, env = "ROOMD_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// When set, a token's `aud` must contain this.
    #[arg(long, env = "ROOMD_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Room patterns everyone may read, callers without a token included (comma
    /// separated; `*` matches any run of characters, e.g. `poll:*`).
    #[arg(long, env = "ROOMD_PUBLIC_READ", value_delimiter = ',')]
    pub public_read: Vec<String>,

    /// Room patterns everyone may write (op, signal), callers without a token included.
    #[arg(long, env = "ROOMD_PUBLIC_WRITE", value_delimiter = ',')]
    pub public_write: Vec<String>,

    /// HTTP requests with `X-Roomd-Api-Key: <this>` act as an admin (user from
    /// `X-Roomd-User`, else `server`). HTTP only; does not turn auth on by itself.
    #[arg(long, env = "ROOMD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Reverse proxies (comma-separated addresses or CIDR blocks, e.g. `10.0.0.0/8,::1`)
    /// whose `Forwarded` / `X-Forwarded-For` headers are believed for the per-IP caps,
    /// rate limits and logs. From any other peer these headers are ignored.
    #[arg(long, env = "ROOMD_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<crate::proxy::Cidr>,

    /// Like --api-key, the key read from this file (surrounding whitespace trimmed).
    #[arg(
        long,
        env = "ROOMD_API_KEY_FILE",
        value_name = "FILE",
        conflicts_with = "api_key"
    )]
    pub api_key_file: Option<PathBuf>,

    /// PEM certificate chain (the server's certificate first, then intermediates, like
    /// Let's Encrypt's `fullchain.pem`). With --tls-key, the server speaks only HTTPS and
    /// `wss://` on --bind. Both files are re-read on SIGHUP: new connections get the new
    /// certificate, open ones continue; if the new files are unusable the old certificate
    /// stays (and an error is logged).
    #[arg(long, env = "ROOMD_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert: PKCS#8 (`PRIVATE KEY`), RSA or EC (like Let's
    /// Encrypt's `privkey.pem`).
    #[arg(long, env = "ROOMD_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// Allow running without auth on a non-loopback address (anyone can act as anyone).
    #[arg(long, env = "ROOMD_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// Browser origins allowed to upgrade and to write over HTTP (POST, DELETE) besides
    /// the server's own host (comma separated, e.g. `https://app.example.com`).
    /// Requests without Origin (non-browser clients) are allowed.
    #[arg(long, env = "ROOMD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Host names served besides the loopback ones (comma separated; `*` for any). On a
    /// loopback bind only `localhost`, `127.x.y.z` and `[::1]` (any port) are served
    /// unless listed here, which stops DNS rebinding; on other binds any Host is served
    /// unless this list is given. Other hosts get 403 `forbidden`, HTTP and upgrade alike.
    #[arg(long, env = "ROOMD_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,

    /// Open HTTP connections per client IP (a WebSocket leaves this count once
    /// upgraded; connections from --trusted-proxies are not counted). Requests on connections beyond it get 429 `rate_limited` and the
    /// connection is closed; `/healthz`, `/readyz` and upgrades are still answered, and
    /// such a connection that sends no request within 1 s is cut.
    #[arg(long, env = "ROOMD_MAX_HTTP_CONNS_PER_IP", default_value_t = 256)]
    pub max_http_conns_per_ip: usize,

    /// Time to receive a request's head; a slower one is answered 408 (no body: there
    /// is no request yet) and the connection closed.
    #[arg(long, env = "ROOMD_HEADER_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// Time to receive a request's body once its head has arrived; a slower one is
    /// answered 408 `invalid` and the connection closed.
    #[arg(long, env = "ROOMD_BODY_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub body_timeout: Duration,

    /// Room reads over HTTP (`GET /api/rooms/{room}`, `?at=`, `/events`) per second per
    /// client IP, with a burst of twice as many; more get 429 `rate_limited`.
    #[arg(long, env = "ROOMD_READ_RATE", default_value_t = 200)]
    pub read_rate: u32,

    /// Room reads built and sent at once, whatever their size; more wait up to 10 s for
    /// a turn, then get 503 `unavailable`. Each holds a copy of what it sends (up to a
    /// room's bytes), so this bounds the memory of reads.
    #[arg(long, env = "ROOMD_MAX_READS_IN_FLIGHT", default_value_t = 4)]
    pub max_reads_in_flight: usize,

    /// Time a read's reply may take to reach a client; a client that reads it slower
    /// is disconnected, so a non-reading client cannot hold a turn of
    /// --max-reads-in-flight.
    #[arg(long, env = "ROOMD_REPLY_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub reply_timeout: Duration,

    /// Ping interval; a connection silent for two intervals is closed with 4008.
    #[arg(long, env = "ROOMD_HEARTBEAT", default_value = "15s", value_parser = parse_duration)]
    pub heartbeat: Duration,

    /// Largest client message in bytes, after continuation frames are joined. A frame
    /// header declaring more is closed with 1009 before its payload is read.
    #[arg(long, env = "ROOMD_MAX_FRAME", default_value_t = 65_536)]
    pub max_frame: u32,

    /// Open WebSocket connections in total; more are closed with 4429.
    #[arg(long, env = "ROOMD_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Open WebSocket connections per client IP; more are closed with 4429.
    #[arg(long, env = "ROOMD_MAX_CONNS_PER_IP", default_value_t = 10_000)]
    pub max_conns_per_ip: usize,

    /// WebSocket handshakes per second per client IP, with a burst of ten seconds'
    /// worth; more are closed with 4429 (refused handshakes count too).
    #[arg(long, env = "ROOMD_HANDSHAKES_PER_IP", default_value_t = 1_000)]
    pub handshakes_per_ip: u32,

    /// WebSocket handshakes per second in total, with a burst of ten seconds' worth;
    /// more are closed with 4429.
    #[arg(long, env = "ROOMD_HANDSHAKES_TOTAL", default_value_t = 20_000)]
    pub handshakes_total: u32,

    /// Existing rooms one user may have created (deleted ones do not count); a `create`
    /// beyond is nacked `limit`.
    #[arg(long, env = "ROOMD_MAX_ROOMS_PER_USER", default_value_t = 1_000_000)]
    pub max_rooms_per_user: usize,

    /// Subscriptions per connection.
    #[arg(long, env = "ROOMD_MAX_SUBS", default_value_t = 100)]
    pub max_subs: usize,

    /// Sustained ops per second per connection (and per user over HTTP); `create`
    /// counts as an op. Ops over the limit are nacked `rate_limited`.
    #[arg(long, env = "ROOMD_OP_RATE", default_value_t = 200)]
    pub op_rate: u32,

    /// Burst of ops allowed above the sustained rate.
    #[arg(long, env = "ROOMD_OP_BURST", default_value_t = 400)]
    pub op_burst: u32,

    /// Bytes queued for one connection before it is closed with 4001 (slow consumer).
    #[arg(long, env = "ROOMD_OUTBOUND_QUEUE", default_value_t = 1 << 20)]
    pub outbound_queue: usize,

    /// When commits reach the disk: `immediate` fsyncs before every ack; `none` fsyncs
    /// at least every --sync-interval and can lose that window on a crash.
    #[arg(long, env = "ROOMD_DURABILITY", value_enum, default_value_t = DurabilityArg::Immediate)]
    pub durability: DurabilityArg,

    /// Longest time between fsyncs under `--durability none`.
    #[arg(long, env = "ROOMD_SYNC_INTERVAL", default_value = "100ms", value_parser = parse_duration)]
    pub sync_interval: Duration,

    /// redb page cache in MiB. Emptied (the database is closed and reopened) once no
    /// write has come for 5 s, so an idle server gives the memory back.
    #[arg(long, env = "ROOMD_CACHE_MB", default_value_t = 64)]
    pub cache_mb: usize,

    /// Keys per `state` room.
    #[arg(long, env = "ROOMD_MAX_KEYS", default_value_t = 100_000)]
    pub max_keys: usize,

    /// Bytes per room (keys plus values as JSON).
    #[arg(long, env = "ROOMD_MAX_ROOM_BYTES", default_value_t = 64 << 20)]
    pub max_room_bytes: usize,

    /// Events kept in each room's log (at least, unless --history-age trims more;
    /// trimming happens behind snapshots).
    /// Resume, the event history and time travel reach back this far; older positions
    /// get a snapshot (`resumed` impossible) or 410 `gone`.
    #[arg(long, env = "ROOMD_HISTORY_EVENTS", default_value_t = 10_000)]
    pub history_events: u64,

    /// Age limit of each room's log, e.g. `168h` for a week (default: none). Events
    /// older than this are trimmed once a snapshot covers them, in addition to the
    /// --history-events count limit, whichever trims more: an event goes when either
    /// limit lets it. A room checks its age limit while ops arrive (at most every
    /// quarter of the age, at least every minute) and when it loads; a room that went
    /// idle and stopped is trimmed when it is next loaded.
    #[arg(long, env = "ROOMD_HISTORY_AGE", value_parser = parse_duration)]
    pub history_age: Option<Duration>,

    /// A room's state is snapshotted every this many events (recovery replays at most
    /// this many events after the newest snapshot).
    #[arg(long, env = "ROOMD_SNAPSHOT_EVERY", default_value_t = 1_000)]
    pub snapshot_every: u64,

    /// ...and at least this often while events happen (and at shutdown).
    #[arg(long, env = "ROOMD_SNAPSHOT_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub snapshot_interval: Duration,

    /// A busy room (one with subscribers) sends at most one diff per interval; while
    /// ops arrive faster than commits land it also commits on that schedule, so its
    /// acks may wait up to one interval. A quiet room commits, acks and sends its diff
    /// at once.
    // 8 ms: `roomd bench fanout` F2 (1,000 subscribers, 1,000 posts/s), two 20 s runs
    // each, alternating: p99 22.5-23.1 ms and 0.76 CPU-s per 1M deliveries, against
    // 25.0 ms and 0.89-0.90 at 5 ms (fewer frames, less CPU, so less queueing).
    #[arg(long, env = "ROOMD_BATCH_INTERVAL", default_value = "8ms", value_parser = parse_duration)]
    pub batch_interval: Duration,

    /// A room with no subscribers and nothing uncommitted stops after this long without
    /// activity, freeing its memory; it reloads from the store on the next access.
    #[arg(long, env = "ROOMD_ROOM_IDLE", default_value = "60s", value_parser = parse_duration)]
    pub room_idle: Duration,

    /// Worker threads for rooms and connections (default: one per core).
    #[arg(long, env = "ROOMD_WORKERS")]
    pub workers: Option<usize>,

    /// Serve `/ws/echo`, an echo endpoint behind the same frame guard and limits (for
    /// the Autobahn conformance suite).
    #[arg(long, env = "ROOMD_ENABLE_ECHO")]
    pub enable_echo: bool,

    /// Cluster mode: a NATS server URL (`nats://127.0.0.1:4222`; repeat the flag, or
    /// separate with commas, for several servers of one NATS cluster). Without it roomd
    /// is a single node and the other --cluster-* flags and --node-id are refused.
    #[arg(
        long,
        env = "ROOMD_CLUSTER_NATS",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub cluster_nats: Vec<String>,

    /// Cluster mode: this node's id, one of --cluster-nodes (letters, digits, `_`, `-`).
    #[arg(long, env = "ROOMD_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,

    /// Cluster mode: every member's id, the same list on every node (comma separated).
    /// Each room is owned by one member, picked by rendezvous hashing of the room id over
    /// this list. A node whose list differs from a live node's refuses to start.
    #[arg(
        long,
        env = "ROOMD_CLUSTER_NODES",
        value_delimiter = ',',
        value_name = "ID,ID,..."
    )]
    pub cluster_nodes: Vec<String>,

    /// Cluster mode: the NATS subject prefix, so several clusters can share one NATS.
    #[arg(
        long,
        env = "ROOMD_CLUSTER_NAME",
        default_value = "roomd",
        value_name = "NAME"
    )]
    pub cluster_name: String,

    /// Log filter, in `tracing` syntax (e.g. `info`, `roomd=debug`).
    #[arg(long, env = "ROOMD_LOG", default_value = "info")]
    pub log: String,

    /// Log line format on stderr: `text` for people, `json` (one object per line) for
    /// log collectors. Each connection logs one line at open and one at close (user,
    /// client address, close code, duration, frames and bytes each way); tokens and API
    /// keys are never logged.
    #[arg(long, env = "ROOMD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurabilityArg {
    Immediate,
    None,
}

/// The patterns of a comma-separated list, without empty items.
fn non_empty(list: &[String]) -> Vec<String> {
    list.iter()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Parses `15s`, `500ms`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 15s or 500ms"))?;
    let seconds = match unit.trim() {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit `{other}` (use ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{text}`: {e}"))
}

/// The validated settings the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub bind: SocketAddr,
    pub data_dir: PathBuf,
    /// Keys, public patterns and the API key; no key: auth off (every caller an admin,
    /// user from `?user=`).
    pub auth: crate::auth::AuthSettings,
    pub allowed_origins: Vec<String>,
    /// Host names served besides the loopback ones (`*`: any). Read by `http::guard`.
    pub allowed_hosts: Vec<String>,
    /// Whether the Host header is checked at all: on a loopback bind, or when
    /// `--allowed-hosts` names hosts (and not `*`).
    pub check_host: bool,
    pub max_http_conns_per_ip: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub read_rate: u32,
    pub max_reads_in_flight: usize,
    pub reply_timeout: Duration,
    /// Peers whose forwarding headers name the client (see `proxy`).
    pub trusted_proxies: Vec<crate::proxy::Cidr>,
    pub heartbeat: Duration,
    pub max_frame: usize,
    pub max_subs: usize,
    pub max_connections: usize,
    pub max_conns_per_ip: usize,
    pub handshakes_per_ip: u32,
    pub handshakes_total: u32,
    pub max_rooms_per_user: usize,
    pub op_rate: u32,
    pub op_burst: u32,
    pub outbound_queue: usize,
    pub durability: Durability,
    pub cache_bytes: usize,
    pub limits: crate::kind::Limits,
    pub history_events: u64,
    /// None: no age limit on the log.
    pub history_age: Option<Duration>,
    pub room_idle: Duration,
    pub batch_interval: Duration,
    pub snapshot_every: u64,
    pub snapshot_interval: Duration,
    pub workers: usize,
    pub enable_echo: bool,
    /// Certificate and key when serving TLS (`server::run` loads them; SIGHUP reloads).
    pub tls: Option<crate::tls::TlsFiles>,
    /// Cluster mode (`--cluster-nats`); None: a single node, exactly as without a cluster.
    pub cluster: Option<ClusterSettings>,
}

/// How this node takes part in a cluster (read by `cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// NATS server URLs, tried in turn (one NATS cluster).
    pub nats_urls: Vec<String>,
    /// This node's id; one of `nodes`.
    pub node_id: String,
    /// Every member, in the order given (ownership does not depend on it).
    pub nodes: Vec<String>,
    /// The subject prefix of every subject the cluster uses.
    pub name: String,
}

/// A setting that cannot work, with the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "refusing to serve {0} without auth: set --jwt-secret, --jwt-public-key or \
         --jwt-jwks, bind a loopback address, or pass --insecure-no-auth"
    )]
    NoAuthOnPublicAddress(SocketAddr),
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("--max-frame of {0} bytes is below the 1024 bytes a client needs")]
    FrameTooSmall(u32),
    #[error("--history-age must be longer than 0 (leave it unset for no age limit)")]
    ZeroHistoryAge,
    #[error("cannot read --api-key-file {path}: {source}")]
    ApiKeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--api-key-file {0} is empty")]
    EmptyApiKey(PathBuf),
    #[error("{0}")]
    Cluster(String),
    #[error("{given} needs {missing} too: TLS takes a certificate chain and its private key")]
    TlsHalf {
        given: &'static str,
        missing: &'static str,
    },
}

impl ServeArgs {
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let api_key = match &self.api_key_file {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::ApiKeyFile {
                        path: path.clone(),
                        source,
                    })?;
                let key = text.trim().to_owned();
                if key.is_empty() {
                    return Err(ConfigError::EmptyApiKey(path.clone()));
                }
                Some(key)
            }
            None => self.api_key.clone().filter(|k| !k.is_empty()),
        };
        let auth = crate::auth::AuthSettings {
            jwt_secret: self.jwt_secret.clone().filter(|s| !s.is_empty()),
            jwt_public_key: self.jwt_public_key.clone(),
            jwt_jwks: self.jwt_jwks.clone(),
            jwt_issuer: self.jwt_issuer.clone(),
            jwt_audience: self.jwt_audience.clone(),
            public_read: non_empty(&self.public_read),
            public_write: non_empty(&self.public_write),
            api_key,
        };
        if !auth.enabled() && !self.bind.ip().is_loopback() && !self.insecure_no_auth {
            return Err(ConfigError::NoAuthOnPublicAddress(self.bind));
        }
        for (name, value) in [
            ("--op-rate", self.op_rate as usize),
            ("--op-burst", self.op_burst as usize),
            ("--outbound-queue", self.outbound_queue),
            ("--max-subs", self.max_subs),
            ("--max-http-conns-per-ip", self.max_http_conns_per_ip),
            ("--read-rate", self.read_rate as usize),
            ("--max-reads-in-flight", self.max_reads_in_flight),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.max_frame < 1024 {
            return Err(ConfigError::FrameTooSmall(self.max_frame));
        }
        if self.history_age.is_some_and(|age| age.is_zero()) {
            return Err(ConfigError::ZeroHistoryAge);
        }
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::TlsHalf {
                    given: "--tls-cert",
                    missing: "--tls-key",
                })
            }
            (None, Some(_)) => {
                return Err(ConfigError::TlsHalf {
                    given: "--tls-key",
                    missing: "--tls-cert",
                })
            }
        };
        let cluster = cluster_settings(
            &self.cluster_nats,
            self.node_id.as_deref(),
            &self.cluster_nodes,
            &self.cluster_name,
        )
        .map_err(ConfigError::Cluster)?;
        let workers = self
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1);
        Ok(Config {
            bind: self.bind,
            data_dir: self.data_dir,
            auth,
            allowed_origins: self.allowed_origins,
            check_host: !self.allowed_hosts.iter().any(|h| h == "*")
                && (self.bind.ip().is_loopback() || !self.allowed_hosts.is_empty()),
            allowed_hosts: self.allowed_hosts,
            max_http_conns_per_ip: self.max_http_conns_per_ip,
            header_timeout: self.header_timeout.max(Duration::from_millis(100)),
            body_timeout: self.body_timeout.max(Duration::from_millis(100)),
            read_rate: self.read_rate,
            max_reads_in_flight: self.max_reads_in_flight,
            reply_timeout: self.reply_timeout.max(Duration::from_secs(1)),
            trusted_proxies: self.trusted_proxies,
            heartbeat: self.heartbeat.max(Duration::from_millis(50)),
            max_frame: self.max_frame as usize,
            max_subs: self.max_subs,
            max_connections: self.max_connections.max(1),
            max_conns_per_ip: self.max_conns_per_ip.max(1),
            handshakes_per_ip: self.handshakes_per_ip.max(1),
            handshakes_total: self.handshakes_total.max(1),
            max_rooms_per_user: self.max_rooms_per_user,
            op_rate: self.op_rate,
            op_burst: self.op_burst.max(1),
            outbound_queue: self.outbound_queue,
            durability: match self.durability {
                DurabilityArg::Immediate => Durability::Immediate,
                DurabilityArg::None => Durability::None {
                    sync_interval: self.sync_interval,
                },
            },
            cache_bytes: self.cache_mb.max(1) << 20,
            limits: crate::kind::Limits {
                max_keys: self.max_keys,
                max_room_bytes: self.max_room_bytes,
                ..Default::default()
            },
            history_events: self.history_events.max(1),
            history_age: self.history_age,
            room_idle: self.room_idle.max(Duration::from_millis(100)),
            batch_interval: self.batch_interval,
            snapshot_every: self.snapshot_every.max(1),
            snapshot_interval: self.snapshot_interval,
            workers,
            enable_echo: self.enable_echo,
            tls,
            cluster,
        })
    }
}

/// Whether `id` can be a node id or a token of the cluster name: it becomes part of NATS
/// subjects, so letters, digits, `_` and `-` only, at most 64 bytes.
fn is_subject_token(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The cluster flags checked together: None without --cluster-nats (and then no other
/// cluster flag may be given), else the settings, or why they cannot work.
fn cluster_settings(
    nats_urls: &[String],
    node_id: Option<&str>,
    nodes: &[String],
    name: &str,
) -> Result<Option<ClusterSettings>, String> {
    let nats_urls = non_empty(nats_urls);
    let nodes = non_empty(nodes);
    if nats_urls.is_empty() {
        return match (node_id, nodes.is_empty()) {
            (None, true) => Ok(None),
            _ => Err("--node-id and --cluster-nodes need --cluster-nats (cluster mode)".into()),
        };
    }
    let Some(node_id) = node_id.map(str::trim).filter(|id| !id.is_empty()) else {
        return Err("--cluster-nats needs --node-id: this node's id in --cluster-nodes".into());
    };
    if nodes.is_empty() {
        return Err(
            "--cluster-nats needs --cluster-nodes: every member's id, the same list on every node"
                .into(),
        );
    }
    for id in nodes.iter().map(String::as_str).chain([node_id]) {
        if !is_subject_token(id) {
            return Err(format!(
                "node id `{id}`: use 1 to 64 letters, digits, `_` or `-`"
            ));
        }
    }
    let mut sorted: Vec<&String> = nodes.iter().collect();
    sorted.sort();
    if let Some(twice) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("--cluster-nodes names `{}` twice", twice[0]));
    }
    if !nodes.iter().any(|id| id == node_id) {
        return Err(format!(
            "--node-id `{node_id}` is not in --cluster-nodes ({})",
            nodes.join(",")
        ));
    }
    if !name.split('.').all(is_subject_token) {
        return Err(format!(
            "--cluster-name `{name}`: use letters, digits, `_` or `-` (dots between words)"
        ));
    }
    Ok(Some(ClusterSettings {
        nats_urls,
        node_id: node_id.to_owned(),
        nodes,
        name: name.to_owned(),
    }))
}

/// Why a `--config` file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read --config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--config {path} is not TOML: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("--config {path}: unknown setting `{key}` (settings are named like the flags of `roomd serve`)")]
    Unknown { path: PathBuf, key: String },
    #[error("--config {path}: `{key}` must be a string, number, boolean or list of those")]
    BadValue { path: PathBuf, key: String },
}

/// The `--config FILE` named on the command line (`--config F`, `--config=F`) or in
/// `ROOMD_CONFIG`, if any.
pub fn config_file_named(args: &[std::ffi::OsString]) -> Option<PathBuf> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let arg = arg.to_string_lossy();
        if arg == "--config" {
            return iter.next().map(PathBuf::from);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os("ROOMD_CONFIG").map(PathBuf::from)
}

/// The settings of a `--config` file as `(ROOMD_* variable, value)` pairs, for every
/// setting whose variable is not already set: the file then sits below flags and the
/// environment and above the defaults, with the same parsing as both.
pub fn config_file_env(path: &std::path::Path) -> Result<Vec<(String, String)>, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigFileError::Parse {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    let command = ServeArgs::augment_args(clap::Command::new("roomd"));
    let mut pairs = Vec::new();
    for (key, value) in &table {
        let flag = key.replace('_', "-");
        let env = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(flag.as_str()) && flag != "config")
            .and_then(|arg| arg.get_env())
            .ok_or_else(|| ConfigFileError::Unknown {
                path: path.to_owned(),
                key: key.clone(),
            })?
            .to_string_lossy()
            .into_owned();
        let scalar = |value: &toml::Value| match value {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(n) => Some(n.to_string()),
            toml::Value::Float(f) => Some(f.to_string()),
            toml::Value::Boolean(b) => Some(b.to_string()),
            _ => None,
        };
        let text = match value {
            toml::Value::Array(items) => items
                .iter()
                .map(scalar)
                .collect::<Option<Vec<_>>>()
                .map(|v| v.join(",")),
            other => scalar(other),
        }
        .ok_or_else(|| ConfigFileError::BadValue {
            path: path.to_owned(),
            key: key.clone(),
        })?;
        if std::env::var_os(&env).is_none() {
            pairs.push((env, text));
        }
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_files_name_settings_like_flags() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("roomd.toml");
        std::fs::write(
            &path,
            "max_subs = 7\npublic-read = [\"poll:*\", \"chat:lobby\"]\ndurability = \"none\"\n",
        )
        .expect("writable");
        let mut pairs = config_file_env(&path).expect("a valid file");
        pairs.sort();
        assert_eq!(
            pairs,
            vec![
                ("ROOMD_DURABILITY".to_owned(), "none".to_owned()),
                ("ROOMD_MAX_SUBS".to_owned(), "7".to_owned()),
                (
                    "ROOMD_PUBLIC_READ".to_owned(),
                    "poll:*,chat:lobby".to_owned()
                ),
            ]
        );
        std::fs::write(&path, "no_such_flag = 1\n").expect("writable");
        assert!(matches!(
            config_file_env(&path),
            Err(ConfigFileError::Unknown { .. })
        ));
        std::fs::write(&path, "bind = { a = 1 }\n").expect("writable");
        assert!(matches!(
            config_file_env(&path),
            Err(ConfigFileError::BadValue { .. })
        ));
    }

    #[test]
    fn durations_accept_common_units() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 days").is_err());
    }

    fn serve_args(flags: &[&str]) -> ServeArgs {
        use clap::{Args, FromArgMatches};
        let matches = ServeArgs::augment_args(clap::Command::new("roomd"))
            .try_get_matches_from(std::iter::once("roomd").chain(flags.iter().copied()))
            .expect("the flags parse");
        ServeArgs::from_arg_matches(&matches).expect("the matches fit ServeArgs")
    }

    #[test]
    fn tls_takes_both_files_or_neither() {
        assert_eq!(serve_args(&[]).into_config().unwrap().tls, None);
        let config = serve_args(&["--tls-cert", "c.pem", "--tls-key", "k.pem"])
            .into_config()
            .unwrap();
        assert_eq!(
            config.tls,
            Some(crate::tls::TlsFiles {
                cert: "c.pem".into(),
                key: "k.pem".into()
            })
        );
        assert!(matches!(
            serve_args(&["--tls-key", "k.pem"]).into_config(),
            Err(ConfigError::TlsHalf {
                given: "--tls-key",
                ..
            })
        ));
    }

    #[test]
    fn cluster_flags_are_checked_together() {
        assert_eq!(serve_args(&[]).into_config().unwrap().cluster, None);
        let config = serve_args(&[
            "--cluster-nats",
            "nats://127.0.0.1:4222",
            "--cluster-nats",
            "nats://127.0.0.1:4223",
            "--node-id",
            "b",
            "--cluster-nodes",
            "a,b,c",
        ])
        .into_config()
        .unwrap();
        assert_eq!(
            config.cluster,
            Some(ClusterSettings {
                nats_urls: vec![
                    "nats://127.0.0.1:4222".into(),
                    "nats://127.0.0.1:4223".into()
                ],
                node_id: "b".into(),
                nodes: vec!["a".into(), "b".into(), "c".into()],
                name: "roomd".into(),
            })
        );
        let refused = |flags: &[&str]| match serve_args(flags).into_config() {
            Err(ConfigError::Cluster(why)) => why,
            other => panic!("{flags:?} gave {other:?}"),
        };
        let nats = ["--cluster-nats", "nats://127.0.0.1:4222"];
        let with_nats = |more: &[&'static str]| -> Vec<&'static str> {
            nats.iter().chain(more).copied().collect()
        };
        assert!(refused(&["--node-id", "a"]).contains("need --cluster-nats"));
        assert!(refused(&with_nats(&["--cluster-nodes", "a,b"])).contains("needs --node-id"));
        assert!(refused(&with_nats(&["--node-id", "a"])).contains("needs --cluster-nodes"));
        assert!(
            refused(&with_nats(&["--node-id", "d", "--cluster-nodes", "a,b"]))
                .contains("`d` is not in --cluster-nodes (a,b)")
        );
        assert!(
            refused(&with_nats(&["--node-id", "a", "--cluster-nodes", "a,b,a"]))
                .contains("names `a` twice")
        );
        assert!(
            refused(&with_nats(&["--node-id", "a", "--cluster-nodes", "a,b.c"]))
                .contains("node id `b.c`")
        );
        assert!(refused(&with_nats(&[
            "--node-id",
            "a",
            "--cluster-nodes",
            "a",
            "--cluster-name",
            "x.>"
        ]))
        .contains("--cluster-name `x.>`"));
    }

    #[test]
    fn history_age_is_off_by_default_and_zero_is_refused() {
        let config = serve_args(&[]).into_config().unwrap();
        assert_eq!(config.history_age, None);
        let config = serve_args(&["--history-age", "90m"]).into_config().unwrap();
        assert_eq!(config.history_age, Some(Duration::from_secs(5_400)));
        assert!(matches!(
            serve_args(&["--history-age", "0s"]).into_config(),
            Err(ConfigError::ZeroHistoryAge)
        ));
    }
}
