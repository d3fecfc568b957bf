//! Quiet, bounded logging of what actix-http reports about a client's malformed request.
//!
//! actix-http's HTTP/1 dispatcher answers a request it cannot parse (a head over its
//! 128 KiB buffer: 431; a malformed head: 400) by itself, then logs the parse error at
//! ERROR, once per request: any client could fill the log at will, and an operator
//! paging on ERROR would be woken by strangers. Those events are not the server's
//! errors, so [`PeerErrors`] keeps them out of the normal log output (see
//! [`is_peer_error`]) and writes one WARN summary at most every [`SUMMARY_EVERY`],
//! counting them and quoting the latest. The 431 itself keeps actix-http's empty body:
//! the dispatcher builds it without reaching any roomd code.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// The target of actix-http's HTTP/1 dispatcher events.
pub const DISPATCHER_TARGET: &str = "actix_http::h1::dispatcher";

/// Shortest time between two summaries.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// Whether an event is actix-http reporting a client's bad request (for the log
/// output's filter: such events go to [`PeerErrors`] only).
pub fn is_peer_error(metadata: &Metadata<'_>) -> bool {
    metadata.target() == DISPATCHER_TARGET && *metadata.level() == Level::ERROR
}

/// Counts actix-http's per-request errors and logs a summary now and then.
#[derive(Debug, Default)]
pub struct PeerErrors {
    /// Events since the last summary.
    count: AtomicU64,
    /// When the last summary was written (None: never), and the latest event's message.
    state: Mutex<(Option<Instant>, String)>,
}

impl<S: Subscriber> Layer<S> for PeerErrors {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if !is_peer_error(event.metadata()) {
            return;
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut message = Message::default();
        event.record(&mut message);
        let due = {
            let mut state = self.state.lock();
            state.1 = message.0;
            let due = state.0.is_none_or(|at| at.elapsed() >= SUMMARY_EVERY);
            if due {
                state.0 = Some(Instant::now());
            }
            due.then(|| state.1.clone())
        };
        // The lock is released: the summary goes through the subscriber like any event.
        if let Some(latest) = due {
            let refused = self.count.swap(0, Ordering::Relaxed);
            tracing::warn!(
                target: "roomd::http",
                refused,
                latest = %latest,
                "malformed or oversized HTTP requests refused by the HTTP layer (at most one such line per minute)"
            );
        }
    }
}

/// The `message` field of an event, as text.
#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}
