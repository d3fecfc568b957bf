//! Wires the store, the room registry, HTTP and WebSocket together, and owns the
//! shutdown order.
//!
//! Shutdown (SIGTERM/SIGINT, or the future passed to [`run`]), in this order:
//! 1. stop accepting connections;
//! 2. close every session with 4002 (their writers send the close frame);
//! 3. wait for every room's uncommitted ops to commit, then flush and close the store;
//! 4. wait for the WebSocket connections to end (each client answers the close, or its
//!    2 s drain passes), then stop the HTTP server and return (the process exits 0).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Arbiter;
use actix_tls::accept::rustls_0_23::TlsStream;
use actix_web::{web, App, HttpServer};
use dashmap::DashMap;
use governor::{Quota, RateLimiter};

use crate::auth::Auth;
use crate::config::Config;
use crate::kind::Kinds;
use crate::outbound::{ConnSocket, CLOSE_DRAIN, CUT_MARGIN};
use crate::protocol::codes::close;
use crate::room::messages::Drain;
use crate::room::registry::Registry;
use crate::room::RoomConfig;
use crate::shared::Shared;
use crate::store::{Store, StoreConfig, StoreError};
use crate::tls::CertStore;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] crate::auth::KeyError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("cannot start the HTTP server: {0}")]
    Io(#[from] std::io::Error),
}

/// How long shutdown waits for sessions to close and rooms to commit.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Runs the server with the three built-in kinds (see [`run_with_kinds`]).
pub async fn run(
    config: Config,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    run_with_kinds(config, Kinds::builtin(), listener, shutdown).await
}

/// Runs the server, serving rooms of `kinds`, on `listener` until `shutdown` resolves,
/// then shuts down in order. Must be called inside an actix `System`.
pub async fn run_with_kinds(
    config: Config,
    kinds: Kinds,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let store_config = StoreConfig {
        data_dir: config.data_dir.clone(),
        cache_bytes: config.cache_bytes,
        queue_len: 4096,
        durability: config.durability,
        quiet_reopen: Some(crate::store::DEFAULT_QUIET_REOPEN),
    };
    // Keys first: a bad key file should stop the start before the store is touched.
    let auth = Auth::new(config.auth.clone())?;
    let certs = match config.tls.clone() {
        Some(files) => Some(Arc::new(CertStore::open(files)?)),
        None => None,
    };
    // Cluster mode: NATS reached and the member list agreed before this node opens its
    // store, so a node that would disagree on who owns a room never serves one.
    let cluster = match config.cluster.clone() {
        Some(settings) => Some(crate::cluster::Cluster::join(settings, &config.data_dir).await?),
        None => None,
    };
    // Opening takes the lock and may repair the file: blocking work, off this thread.
    // Installed before the store opens, so the writer's first commits are counted.
    crate::metrics::handle();
    let store = tokio::task::spawn_blocking(move || Store::open(store_config))
        .await
        .map_err(|e| std::io::Error::other(format!("store open task failed: {e}")))??;

    let arbiters: Vec<Arbiter> = (0..config.workers).map(|_| Arbiter::new()).collect();
    // Named so a profile or `top -H` tells room threads from the HTTP workers (actix
    // names both `actix-rt|system…`, and Linux keeps only 15 bytes of a name).
    for (i, arbiter) in arbiters.iter().enumerate() {
        arbiter.spawn_fn(move || name_this_thread(&format!("roomd-room-{i}")));
    }
    let room_config = RoomConfig {
        limits: config.limits.clone(),
        kinds,
        history_events: config.history_events,
        history_age: config.history_age,
        idle_timeout: config.room_idle,
        batch_interval: config.batch_interval,
        snapshot_every: config.snapshot_every,
        snapshot_interval: config.snapshot_interval,
        max_rooms_per_user: config.max_rooms_per_user,
        ..RoomConfig::default()
    };
    let registry = Registry::new(
        arbiters.iter().map(|a| a.handle()).collect(),
        store.clone(),
        room_config.clone(),
    );
    let http_quota = Quota::per_second(
        std::num::NonZeroU32::new(config.op_rate).unwrap_or(std::num::NonZeroU32::MIN),
    )
    .allow_burst(std::num::NonZeroU32::new(config.op_burst).unwrap_or(std::num::NonZeroU32::MIN));
    let shared = web::Data::new(Shared {
        auth,
        room_config,
        registry: registry.clone(),
        store: store.clone(),
        sessions: DashMap::new(),
        open_connections: Arc::default(),
        next_session_id: AtomicU64::new(1),
        http_limiter: RateLimiter::keyed(http_quota),
        shutting_down: AtomicBool::new(false),
        clock: governor::clock::DefaultClock::default(),
        admission: crate::admission::Admission::new(crate::admission::Caps {
            max_total: config.max_connections,
            max_per_ip: config.max_conns_per_ip,
            handshakes_total: config.handshakes_total,
            handshakes_per_ip: config.handshakes_per_ip,
        }),
        http_conns: crate::admission::http_conns::HttpConns::new(config.max_http_conns_per_ip),
        reads: crate::admission::read_gate::ReadGate::new(
            config.read_rate,
            config.max_reads_in_flight,
            config.reply_timeout,
        ),
        config: config.clone(),
        cluster,
    });

    // Cluster mode: this node answers the ops other nodes forward to the rooms it owns.
    if let Some(cluster) = &shared.cluster {
        crate::cluster::rpc::serve(
            cluster.clone(),
            registry.clone(),
            config.outbound_queue,
            Arc::new(crate::http::forwarded::OwnerCalls::new(
                shared.clone().into_inner(),
            )),
        )
        .await?;
        crate::cluster::mover::serve(cluster.clone(), registry.clone(), store.clone()).await?;
    }

    // The room threads and (as each builds its app) the HTTP workers.
    let quiet_threads = Arc::new(crate::memory::QuietThreads::default());
    for arbiter in registry.arbiters() {
        quiet_threads.register(arbiter.clone());
    }
    let app_shared = shared.clone();
    let enable_echo = config.enable_echo;
    let worker_threads = quiet_threads.clone();
    let http_conns = shared.http_conns.clone();
    let trusted_proxies = config.trusted_proxies.clone();
    let server = HttpServer::new(move || {
        // Runs once on each worker thread, as it starts.
        worker_threads.register_current();
        let mut app = App::new()
            .wrap(actix_web::middleware::from_fn(crate::http::guard::check))
            .app_data(app_shared.clone())
            .app_data(web::PayloadConfig::new(app_shared.config.max_frame))
            .configure(crate::http::routes)
            .configure(crate::web::routes)
            .route("/ws", web::get().to(crate::session::upgrade::ws_rooms))
            .wrap(actix_web::middleware::from_fn(crate::cors::cors));
        if enable_echo {
            app = app.route("/ws/echo", web::get().to(crate::session::upgrade::ws_echo));
        }
        app
    })
    .on_connect(move |conn, data| {
        // Remember the socket so a session can cut a client that never reads, and
        // count the connection against its address's cap (`admission::http_conns`).
        // Under TLS the TCP stream is inside the TLS one.
        let tcp = conn.downcast_ref::<actix_rt::net::TcpStream>().or_else(|| {
            conn.downcast_ref::<TlsStream<actix_rt::net::TcpStream>>()
                .map(|tls| tls.get_ref().0)
        });
        if let Some(tcp) = tcp {
            use std::os::fd::AsRawFd;
            if let (Ok(local), Ok(peer)) = (tcp.local_addr(), tcp.peer_addr()) {
                let socket = ConnSocket {
                    fd: tcp.as_raw_fd(),
                    local,
                    peer,
                };
                data.insert(socket);
                // A trusted proxy carries many clients' connections: it is not capped
                // per address (the clients behind it are, by the rate limits).
                if trusted_proxies.iter().any(|c| c.contains(peer.ip())) {
                    return;
                }
                let slot = http_conns.connect(peer.ip());
                if slot.refused() {
                    // Over its address's cap: answered if it asks at once, else cut.
                    let requested = slot.requested();
                    actix_rt::spawn(async move {
                        tokio::time::sleep(crate::admission::http_conns::REFUSED_GRACE).await;
                        if !requested.get() {
                            crate::outbound::KillSwitch::new(Some(socket)).kill();
                        }
                    });
                }
                data.insert(slot);
            }
        }
    })
    // A request head must arrive within this (actix answers a late one 408 and closes);
    // bodies have their own deadline (`http::guard`).
    .client_request_timeout(config.header_timeout)
    .workers(config.workers)
    // Diffs are small frames sent as they happen: with Nagle on, one sent while the
    // previous is unacknowledged waits for the client's delayed ACK (40 ms here, the
    // p90 of `roomd bench fanout` with only 100 subscribers).
    .tcp_nodelay(true)
    // We run the shutdown order ourselves (actix's own never sends 4002).
    .disable_signals()
    // 0: a closed WebSocket's TCP connection ends at once instead of lingering 1 s.
    .client_disconnect_timeout(Duration::ZERO)
    .shutdown_timeout(1)
    // The sessions' own caps (4429) are below this; it only bounds what actix accepts.
    .max_connections(config.max_connections.saturating_add(1_024));
    let server = match &certs {
        Some(certs) => {
            server.listen_rustls_0_23(listener, crate::tls::server_config(certs.clone()))?
        }
        None => server.listen(listener)?,
    }
    .run();
    let handle = server.handle();
    let served = actix_rt::spawn(server);

    let addr = config.bind;
    tracing::info!(%addr, data_dir = %config.data_dir.display(), auth = shared.auth.enabled(), tls = certs.is_some(), "roomd serving");

    // Prune idle HTTP rate-limit keys now and then so the map stays bounded.
    let pruning = shared.clone();
    actix_rt::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            pruning.http_limiter.retain_recent();
            pruning.http_limiter.shrink_to_fit();
            pruning.admission.prune();
            pruning.reads.prune();
        }
    });
    // Allocators keep freed memory (glibc in arenas, mimalloc per thread); after idle
    // rooms stopped, hand it back so resident memory follows the rooms actually loaded
    // (measured: 100,000 idle rooms left RSS 30x a fresh server's without this).
    let trimming = registry.clone();
    actix_rt::spawn(async move {
        let mut trimmed_at = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let stopped = trimming.stopped_count();
            if stopped != trimmed_at {
                trimmed_at = stopped;
                trimming.shrink();
                quiet_threads.release_all();
                let _ = tokio::task::spawn_blocking(crate::memory::release_free_memory).await;
            }
        }
    });

    // SIGHUP re-reads what can change under a running server: the JWKS and the TLS
    // certificate. Open connections are untouched by either.
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hangup) => {
            let reloading = shared.clone();
            let certs = certs.clone();
            actix_rt::spawn(async move {
                while hangup.recv().await.is_some() {
                    match reloading.auth.reload() {
                        Ok(keys) => tracing::info!(keys, "SIGHUP: keys reloaded"),
                        Err(e) => tracing::error!(error = %e, "SIGHUP: keys kept: {e}"),
                    }
                    if let Some(certs) = &certs {
                        // Reading two small files: not worth a blocking-pool hop.
                        match certs.reload() {
                            Ok(()) => tracing::info!(
                                cert = %certs.files().cert.display(),
                                "SIGHUP: TLS certificate reloaded"
                            ),
                            Err(e) => tracing::error!(
                                error = %e,
                                "SIGHUP: TLS certificate kept: {e}"
                            ),
                        }
                    }
                }
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP; keys and certificates reload only on restart")
        }
    }

    shutdown.await;
    tracing::info!("shutting down: no new connections");
    shared.shutting_down.store(true, Ordering::Release);
    handle.pause().await;

    tracing::info!(
        sessions = shared.sessions.len(),
        "closing sessions with 4002"
    );
    for entry in shared.sessions.iter() {
        entry
            .value()
            .outbound
            .close(close::SHUTTING_DOWN, "server shutting down");
    }
    // A connection ends once its client answered the close (or 2 s passed, or its socket
    // was cut); stopping the server before that would reset clients still sending.
    let connections_deadline = Instant::now() + CLOSE_DRAIN + CUT_MARGIN + CUT_MARGIN;
    let deadline = Instant::now() + DRAIN_DEADLINE;
    while !shared.sessions.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Rooms keep committing what they accepted, then write a final snapshot; wait
    // until none has anything left.
    // Final snapshots are best effort: a room without one loads from the log.
    loop {
        let (mut ops, mut snapshots) = (0, 0);
        for room in registry.all() {
            if let Ok(drained) = room.send(Drain).await {
                ops += drained.ops;
                snapshots += usize::from(drained.snapshot);
            }
        }
        if ops + snapshots == 0 || Instant::now() >= deadline {
            if ops > 0 {
                tracing::warn!(ops, "shutdown deadline passed with ops uncommitted");
            } else if snapshots > 0 {
                tracing::info!(
                    rooms = snapshots,
                    "final snapshots unfinished at the deadline; those rooms load from the log"
                );
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let closing = store.clone();
    let _ = tokio::task::spawn_blocking(move || closing.shutdown()).await;
    tracing::info!("store flushed and closed");

    while shared.open_connections.load(Ordering::Acquire) > 0
        && Instant::now() < connections_deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.stop(false).await;
    let _ = served.await;
    for arbiter in arbiters {
        arbiter.stop();
    }
    Ok(())
}

/// Installs the SIGTERM/SIGINT handlers now; the future resolves on either signal.
/// Must be called inside the runtime.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
    })
}

/// Renames the calling thread as the kernel sees it (`comm`, at most 15 bytes), for
/// profilers and `top -H`. Best effort: a name that does not fit is cut.
fn name_this_thread(name: &str) {
    let mut bytes = [0u8; 16];
    let len = name.len().min(15);
    bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from a
    // buffer that outlives the call; the last byte is always 0.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, bytes.as_ptr() as libc::c_ulong, 0, 0, 0);
    }
}
