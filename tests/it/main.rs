//! Black-box integration tests: each test starts the real `roomd` binary on an ephemeral
//! loopback port and speaks the wire contract (PROTOCOL.md) to it in literal JSON.

// Starting the server, WebSocket/raw-frame/HTTP clients, and a checking room mirror.
mod support;

// Access control: rooms claims, deny by default, guests, key types, refresh, API key, admin API.
mod access;
// Bad input on the WebSocket (pipelined bad frames, oversize, bad UTF-8, ids, identities) and clean closes.
mod bad_input_ws;
// The browser tests (tests/browser/run.mjs in headless chromium): client.js, demo, kill -9, dashboard.
mod browser;
// JWT identity on WebSocket and HTTP, and refusing to serve a public address unprotected.
mod auth;
// Bad HTTP input (issue 10): stalled bodies, connection caps, read bounds, cross-site writes, error bodies.
mod bad_input_http;
// Bad input that reaches the store: values at the depth limit, damaged bytes in the data file.
mod bad_input_store;
// The Rust client SDK: mirrors, op acks, reconnect with resume and re-sent ops.
mod client;
// Cluster mode over NATS: membership agreement, /readyz, forwarded ops.
mod cluster;
// A room's batch lost on NATS on its way to a subscribing node: caught up from the owner.
mod cluster_gap;
// Moving rooms when the member list changes (`roomd cluster rebalance`), under load.
mod cluster_rebalance;
// When an op commits: a quiet room's next op joins the next group commit.
mod commits;
// Crash loop: kill -9 under pipelined JSON and rkyv load, checked against a model of the acks.
mod crash;
// Restarts, kill -9 and SIGTERM: acked ops, epochs and op ids survive.
mod durability;
// Effectively-once ops: re-sent ids are answered from the record and applied once.
mod effectively_once;
// The WebSocket upgrade: welcome, subprotocols, Origin checks, guest ids.
mod handshake;
// The log as an API: history, time travel, retention, deletion, snapshots, `roomd log`.
mod history;
// The HTTP API: health, room creation, room state, ops and status mapping.
mod http_api;
// Connection limits: frame size, UTF-8, bad frames, rate, heartbeat, slow readers.
mod limits;
// --trusted-proxies: forwarding headers name the client only when a trusted proxy sent them.
mod proxies;
// Operations logs: one JSON line per connection at open and close, never a secret.
mod logs;
// The rock-paper-scissors example: a kind of the application's own, hidden moves on every read path.
mod rps;
// Presence: member lists, joins and leaves, only for subscribers that ask.
mod presence;
// Busy rooms coalesce diffs per interval; idle rooms stop and reload unchanged.
mod room_lifecycle;
// Resuming with `since`: gapless catch-up or a fresh snapshot.
mod resume;
// The roomd.v1.rkyv subprotocol: committed fixtures sent verbatim, replies decoded with the published types.
mod rkyv;
// Chat rooms: posts, edits, deletes, history trimming.
mod rooms_chat;
// Poll rooms: votes, retracts, close.
mod rooms_poll;
// State rooms: set/del/incr, compare-and-set, values, diff batching.
mod rooms_state;
// Server-Sent Events, CORS for --allowed-origins, and the Admin API's room list and presence.
mod sse;
// Ephemeral signals between room members.
mod signals;
// TLS: HTTPS and wss:// on one port, the client's CA, certificate reload on SIGHUP, bad files.
mod tls;
// sub/unsub bookkeeping and the error frames of messages without an id.
mod subscriptions;
