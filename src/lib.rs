//! roomd: durable, authoritative real-time rooms over WebSocket.
//!
//! One process keeps rooms (chat, polls, key-value state) authoritative on the server,
//! pushes every committed change to subscribers, and keeps an append-only log in redb
//! so a client resumes exactly where it left off, even after `kill -9`.
//!
//! # Bird's-eye view
//!
//! ```text
//! client ──ws──> Session actor ──op──> Room actor ──batch──> store writer thread (redb)
//!    ^               (one per              (one per room:           │ group commit:
//!    │                connection)           state, seq, reducers)   │ one journal append,
//!    │                                                              │ one fsync
//!    └── response body <── byte-bounded queue <── diff, encoded once <── commit confirmed
//! ```
//!
//! # Codemap
//!
//! Top-level modules from the top of the stack to the bottom. A module uses only modules
//! listed below it, in the order they are first named here, one line's included
//! (Architecture invariant: the import graph has no upward edge; `.ci/import_graph.py`
//! checks it from the `crate::` paths and prints the graph with `--list`).
//! With `default-features = false, features = ["client"]` only [`client`],
//! [`protocol`], [`kind`] and [`value`] are built: no actix, no redb.
//!
//! - `main.rs` (`roomd::Server::new().main()`) and [`builder`]: [`Server`], the builder an
//!   application uses to be its own roomd with its kinds added (command line, logging,
//!   socket, signals), and the tools it dispatches to: [`bench`](mod@bench) (`roomd
//!   bench`, the load generator), [`log_tool`] (`roomd log`), [`token_tool`] (`roomd
//!   token`), and the rebalance tool of the cluster module below (`roomd cluster
//!   rebalance`).
//! - [`server`]: wires the store, registry, HTTP and WebSocket; owns the shutdown order.
//! - [`web`]: the browser side: `/client.js`, the demo at `/`, `/dashboard`;
//!   [`sse`]: `GET /api/rooms/{room}/stream`, a room as Server-Sent Events; [`cors`]:
//!   CORS for `--allowed-origins`.
//! - [`http`]: the HTTP API, admin endpoints included ([`http::require_admin`];
//!   [`http::admin`]: the room list and presence the dashboard reads);
//!   [`http::guard`]: what every request passes first (per-IP connection cap, Host and
//!   Origin rules, JSON bodies, body deadline) and the `{"code","msg"}` shape of every
//!   error; [`http::reads`]: a read's streamed reply; [`http::forwarded`]: cluster
//!   mode's calls about a room another node owns, answered there as if local.
//!   [`session`]: the Session actor, the upgrade, the frame guard and the decoder of
//!   the client's messages (actix-http's WebSocket codec; no actix-ws), the heartbeat
//!   (one timer per worker thread). `vendor/actix-http` is actix-http with one change:
//!   an idle connection holds no read or write buffer (`vendor/README.md`).
//! - [`shared`]: the state handlers and sessions share (config, registry, store, limiters).
//! - [`cluster`]: cluster mode (`--cluster-nats`): the NATS connection, which node owns
//!   a room ([`cluster::hrw`], rendezvous hashing), the startup agreement on the
//!   member list and the list in force ([`cluster::membership`]), moving rooms when it
//!   changes ([`cluster::rebalance`], [`cluster::mover`]), ops forwarded to a room's owner
//!   ([`cluster::forward`] sends, [`cluster::rpc`] answers on the owner through its
//!   normal room path), and subscriptions to rooms owned elsewhere: the owner publishes
//!   each batch of such a room once on the room's subject ([`cluster::feed`], fed by
//!   [`room::tap`]), each node with subscribers joins it once and fans it out
//!   ([`cluster::mirror`], catching up from the owner after a gap), and a relay per
//!   remote connection on the owner ([`cluster::relay`]) answers the subscription and
//!   carries presence and signals to [`cluster::remote`]. Absent without
//!   `--cluster-nats`.
//! - [`config`]: every flag and `ROOMD_*` variable, validated into one `Config`;
//!   [`auth`]: who a caller is (JWT with a secret, a PEM key or a JWKS; the API key;
//!   `?user=`) and what it may do (`rooms` patterns compiled once per token), and the
//!   Origin rule; [`admission`]: what is let in and how much at once: the WebSocket
//!   caps (4429), [`admission::http_conns`] (open HTTP connections per IP) and
//!   [`admission::read_gate`] (the rate and turns of room reads); [`proxy`]: the
//!   client's address through `--trusted-proxies`.
//! - [`tls`]: the server's certificate (`--tls-cert`, `--tls-key`): loading and checking
//!   it, and the rustls resolver that swaps it on SIGHUP under open connections.
//! - [`room`]: the Room actor, its batches, presence and the registry;
//!   [`room::backlog`]: the bound on a room's unanswered ops, which its senders wait on;
//!   [`room::views`]: a diff's per-viewer views, planned once per distinct view.
//! - [`outbound`]: a connection's byte-bounded outbound queue (its response body) and the
//!   handle rooms push frames through; it knows nothing of sessions or rooms. Every close
//!   the server starts is `Outbound::close`: the close frame, then the client's remaining
//!   frames read and discarded until its close frame (or 2 s), then a clean TCP close.
//! - [`store`]: redb and the journal's segment files: the writer thread (group commit
//!   to the journal, folded into the rooms' rows in redb later, snapshots, trimming,
//!   deletion in bounded pieces) and its committer (a fold's redb commit beside the
//!   next journal groups), record formats,
//!   reads for recovery, history and time travel.
//! - [`client`]: the Rust client SDK (reconnect, resume, re-sent op ids, `wss://`).
//! - [`protocol`]: the wire boundary: published message types, JSON and rkyv codecs,
//!   codes, room ids and epochs. Nothing else serializes a wire message.
//! - [`kind`]: room state, the room-kind API ([`kind::RoomKind`], the [`kind::Kinds`]
//!   registry), the built-in kinds (chat, poll, state) written on that API alone, and
//!   entry audiences ([`kind::audience`]: who may see an entry, recorded in the changes).
//! - [`value`]: the domain `Value`, free of any serialization; [`metrics`]: `GET /metrics`
//!   (every figure's name, the recorder, its upkeep, handles registered once);
//!   [`memory`]: quiet threads hand freed memory back to the OS (mimalloc, glibc);
//!   [`peer_errors`]: actix-http's per-request parse errors as a once-a-minute summary.
//!   [`ticker`]: one timer per thread for every actor of a kind on it (connection
//!   heartbeats, room idle checks), beats spread over the period.
//!
//! # Architecture invariants
//!
//! 1. Only a Room actor mutates its room's state; everything else holds an `Addr`. The
//!    registry holds addresses (and each room's backlog semaphore, flow control that
//!    no reader sees) and never room state; no map guard lives across an await or a
//!    send.
//! 2. Log before send: acks and diffs leave from the commit callback, never before.
//! 3. Seq is gapless per room and survives restarts; the epoch changes only when events
//!    a client may have seen are lost (deletion, unclean stop under `--durability none`).
//! 4. Every queue is bounded and says what happens when it is full (outbound bytes:
//!    close 4001; writer queue: nack `unavailable`; mailboxes: wait, or drop signals).
//! 5. Untrusted bytes (network and disk) are decoded only through validated paths with
//!    a size bound first; rkyv is always validated and values are flat on the wire.
//! 6. Reducers are pure: (state, op, user, time, seq) in, changes out. Recovery applies
//!    recorded changes and never re-runs them; the log names each room's kind, and a
//!    room whose kind the server does not serve fails to load alone.
//! 10. Every read path filters by the viewer: an entry with an audience reaches its
//!     audience only (snapshot, diff, resumed, `GET`, `?at=`, `/events`, the stream),
//!     and the audience is in the recorded changes, so no read runs kind code.
//! 7. Blocking IO never runs on an actix thread: the writer has its own thread, reads
//!    run on the blocking pool, at most `store::MAX_CONCURRENT_READS` at a time.
//! 8. Bad input from one client never harms another client, a room or the log.
//! 9. Permissions are decided at the edge (session, HTTP handler), once per request and
//!    before anything about the room is looked at; the Room actor and the delivery of
//!    diffs know nothing of them.
//!
//! Deliberately absent: `kind` knows nothing of actix, redb or rkyv; `protocol`
//! knows nothing of rooms' internals; nothing uses anyhow (errors are thiserror enums).

#[cfg(feature = "server")]
pub mod admission;
#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod bench;
#[cfg(feature = "server")]
pub mod builder;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
pub mod cluster;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod cors;
#[cfg(feature = "server")]
pub mod http;
pub mod kind;
#[cfg(feature = "server")]
pub mod log_tool;
#[cfg(feature = "server")]
pub mod memory;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod outbound;
#[cfg(feature = "server")]
pub mod peer_errors;
pub mod protocol;
#[cfg(feature = "server")]
pub mod proxy;
#[cfg(feature = "server")]
pub mod room;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod session;
#[cfg(feature = "server")]
pub mod shared;
#[cfg(feature = "server")]
pub mod sse;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod ticker;
#[cfg(feature = "server")]
pub mod tls;
#[cfg(feature = "server")]
pub mod token_tool;
pub mod value;
#[cfg(feature = "server")]
pub mod web;

#[cfg(feature = "server")]
pub use builder::Server;
