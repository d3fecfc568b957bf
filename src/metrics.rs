//! `GET /metrics`: the server's figures in the Prometheus text format, all through the
//! `metrics` facade and `metrics-exporter-prometheus` (no exposition text is written by
//! hand).
//!
//! Three kinds of figures:
//! - counters and histograms recorded where things happen (see [`names`]); the ones on
//!   hot paths (every frame, every delivery, every op) go through handles registered
//!   once ([`hot`], [`CounterSet`]), so recording is an atomic add (a histogram sample:
//!   a timestamp and a slot in a lock-free bucket), with no key built or looked up;
//! - gauges kept up to date where they change (open subscriptions);
//! - gauges set when the endpoint is scraped (open connections, live rooms, store
//!   health), so nothing on a hot path keeps them up to date.
//!
//! The recorder is process-global (`metrics` allows one); the first server to start
//! installs it and later ones in the same process (tests) share it, so figures then add
//! up across those servers. Histogram samples are buffered by the recorder until its
//! upkeep (every [`UPKEEP_INTERVAL`], on its own thread) or a scrape folds them into
//! their buckets, so an unscraped server holds at most an interval's worth of samples.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, Label};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The metric names, in one place so the README and the code agree.
pub mod names {
    /// Write transactions committed by the store writer (sync-only ones included).
    pub const STORE_COMMITS: &str = "roomd_store_commits_total";
    /// Commits that carried room batches (the rest carry only trimming, deletion or a
    /// sync).
    pub const STORE_BATCH_COMMITS: &str = "roomd_store_batch_commits_total";
    /// Room batches written (one per room per commit at most).
    pub const STORE_BATCHES: &str = "roomd_store_batches_total";
    /// Events appended to room logs.
    pub const STORE_EVENTS: &str = "roomd_store_events_total";
    /// Seconds from beginning a write transaction to its commit returning (fsync
    /// included under `immediate`), for commits that carry batches.
    pub const STORE_COMMIT_SECONDS: &str = "roomd_store_commit_seconds";
    /// Bytes of room batches in the store's journal not yet folded into their rooms'
    /// rows (bounded by the fold policy, `store/journal.rs`); what a restart replays.
    pub const STORE_JOURNAL_BYTES: &str = "roomd_store_journal_bytes";
    /// Rooms folded out of the journal (one per room per fold).
    pub const STORE_FOLDS: &str = "roomd_store_folds_total";
    /// Store group commits (journal appends, folds, snapshots, trim pieces) and syncs
    /// (the durable commit after unsynced ones) that took `store::writer::SLOW_COMMIT`
    /// or more; each also logs `slow store commit`. A room deletion's pieces and a
    /// cluster import are not counted.
    pub const STORE_SLOW_COMMITS: &str = "roomd_store_slow_commits_total";
    /// Frames a room queued to its subscribers (`snapshot`s excluded: one `diff` or
    /// `presence` to 100 subscribers counts 100). The dashboard's deliveries/s.
    pub const DELIVERIES: &str = "roomd_deliveries_total";
    /// Ops and creates answered, over WebSocket and HTTP, by `kind` (the room's kind,
    /// `none` when refused before a room of a known kind saw it) and `result` (`ack`
    /// or the nack code).
    pub const OPS: &str = "roomd_ops_total";
    /// Ops and creates that waited for their room's backlog bound (`room/backlog.rs`).
    pub const BACKLOG_WAITS: &str = "roomd_room_backlog_waits_total";
    /// WebSocket frames handed to connections' sockets (close frames included).
    pub const FRAMES_SENT: &str = "roomd_frames_sent_total";
    /// The wire bytes of those frames (headers included).
    pub const BYTES_SENT: &str = "roomd_bytes_sent_total";
    /// WebSocket connections ended, by `code`: the close code sent (or echoed), `none`
    /// when the connection ended without one.
    pub const CONNECTIONS_CLOSED: &str = "roomd_connections_closed_total";
    /// Subscriptions started (`snapshot` or `resumed` queued), WebSocket and SSE.
    pub const SUBSCRIPTIONS_STARTED: &str = "roomd_subscriptions_started_total";
    /// Subscriptions open now, WebSocket and SSE.
    pub const SUBSCRIPTIONS: &str = "roomd_subscriptions";
    /// Signals dropped, by `reason`: `room_busy` (the room's mailbox was full) or
    /// `queue_full` (a receiver's outbound queue was half full); one per receiver.
    pub const SIGNALS_DROPPED: &str = "roomd_signals_dropped_total";
    /// Room actors that read their room from the store, by `result`: `live`, `absent`
    /// (no such room) or `failed`.
    pub const ROOM_LOADS: &str = "roomd_room_loads_total";
    /// Seconds a room took to load (store read and rebuild).
    pub const ROOM_LOAD_SECONDS: &str = "roomd_room_load_seconds";
    /// Bytes charged to a connection's outbound queue right after a frame was queued to
    /// it (the frame included): how close connections run to `--outbound-queue`.
    pub const OUTBOUND_QUEUE_BYTES: &str = "roomd_outbound_queue_bytes";
    /// Open WebSocket connections.
    pub const CONNECTIONS: &str = "roomd_connections";
    /// Room actors running (loaded rooms).
    pub const ROOMS_LIVE: &str = "roomd_rooms_live";
    /// 1 while the store accepts writes, 0 after a failed commit.
    pub const STORE_HEALTHY: &str = "roomd_store_healthy";
    /// Cluster mode: diffs this owner published on room subjects (one per batch of a
    /// room other nodes subscribe to, whatever their number of subscribers).
    pub const CLUSTER_FEED_MESSAGES: &str = "roomd_cluster_feed_messages_total";
    /// Cluster mode: the payload bytes of those messages.
    pub const CLUSTER_FEED_BYTES: &str = "roomd_cluster_feed_bytes_total";
    /// Cluster mode: catch-ups this node asked an owner for after a gap in a room's feed.
    pub const CLUSTER_CATCHUPS: &str = "roomd_cluster_catchups_total";
}

/// The commit-time buckets, in seconds: 100 µs to 1 s.
const COMMIT_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The room-load buckets, in seconds: 100 µs to 10 s.
const LOAD_BUCKETS: [f64; 11] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.025, 0.1, 0.5, 2.5, 10.0,
];

/// The outbound-queue buckets, in bytes: 256 B to 16 MiB by fours (the default
/// `--outbound-queue` is 1 MiB).
const QUEUE_BUCKETS: [f64; 10] = [
    256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 524288.0, 1048576.0, 4194304.0, 16777216.0,
];

/// How often the recorder's upkeep drains buffered histogram samples into their
/// buckets. `build_recorder()` runs no upkeep by itself: without this, every sample
/// stayed in memory until the next scrape, without bound on an unscraped server (the
/// test `tests/metrics_memory.rs` checks the bound).
pub const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The process's recorder handle, installing the recorder (and its upkeep thread) on
/// first use.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let mut builder = PrometheusBuilder::new();
        for (name, buckets) in [
            (names::STORE_COMMIT_SECONDS, &COMMIT_BUCKETS[..]),
            (names::ROOM_LOAD_SECONDS, &LOAD_BUCKETS[..]),
            (names::OUTBOUND_QUEUE_BYTES, &QUEUE_BUCKETS[..]),
        ] {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(name.into()), buckets)
                .expect("the bucket lists are non-empty constants");
        }
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first (an embedding program's);
        // then its recorder gets the figures and this handle renders nothing.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics stays empty");
        }
        describe();
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
                release_drained_blocks();
            });
        if let Err(e) = spawned {
            // Only scrapes drain the samples then; the server still works.
            tracing::warn!(error = %e, "cannot start the metrics upkeep thread");
        }
        handle
    })
}

/// Frees the sample blocks the upkeep just drained. The exporter's histogram buffers
/// (`metrics_util::AtomicBucket`) hand drained blocks to crossbeam-epoch's default
/// collector, which parks them in this thread's local bag until 64 batches pile up
/// (megabytes of samples). A flush moves them to the global queue and collects; each
/// collect also advances the epoch, so three of them free what no reader can still see
/// (a record in progress at the moment of the drain keeps its block until a later
/// upkeep).
fn release_drained_blocks() {
    for _ in 0..3 {
        crossbeam_epoch::pin().flush();
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        names::STORE_COMMITS,
        "Write transactions committed by the store writer."
    );
    describe_counter!(
        names::STORE_BATCH_COMMITS,
        "Commits that carried room batches."
    );
    describe_counter!(
        names::STORE_BATCHES,
        "Room batches written by the store writer."
    );
    describe_counter!(names::STORE_EVENTS, "Events appended to room logs.");
    describe_gauge!(
        names::STORE_JOURNAL_BYTES,
        Unit::Bytes,
        "Bytes of room batches journaled and not yet folded into their rooms."
    );
    describe_counter!(
        names::STORE_FOLDS,
        "Rooms folded out of the store's journal."
    );
    describe_counter!(
        names::STORE_SLOW_COMMITS,
        "Store group commits and syncs that took 100 ms or more."
    );
    describe_histogram!(
        names::STORE_COMMIT_SECONDS,
        Unit::Seconds,
        "Time to write and commit one group of batches."
    );
    describe_counter!(
        names::DELIVERIES,
        "Frames rooms queued to their subscribers (diffs, presence)."
    );
    describe_counter!(
        names::OPS,
        "Ops and creates answered, by room kind and result (ack or nack code)."
    );
    describe_counter!(
        names::BACKLOG_WAITS,
        "Ops and creates that waited because their room held its most unanswered ops."
    );
    describe_counter!(names::FRAMES_SENT, "WebSocket frames handed to sockets.");
    describe_counter!(
        names::BYTES_SENT,
        Unit::Bytes,
        "Wire bytes of the WebSocket frames handed to sockets."
    );
    describe_counter!(
        names::CONNECTIONS_CLOSED,
        "WebSocket connections ended, by close code."
    );
    describe_counter!(names::SUBSCRIPTIONS_STARTED, "Subscriptions started.");
    describe_gauge!(names::SUBSCRIPTIONS, "Subscriptions open.");
    describe_counter!(
        names::SIGNALS_DROPPED,
        "Signals dropped under load, per receiver, by reason."
    );
    describe_counter!(names::ROOM_LOADS, "Rooms read from the store, by result.");
    describe_histogram!(
        names::ROOM_LOAD_SECONDS,
        Unit::Seconds,
        "Time to read and rebuild one room."
    );
    describe_histogram!(
        names::OUTBOUND_QUEUE_BYTES,
        Unit::Bytes,
        "Bytes in a connection's outbound queue right after a frame was queued."
    );
    describe_gauge!(names::CONNECTIONS, "Open WebSocket connections.");
    describe_gauge!(names::ROOMS_LIVE, "Room actors running.");
    describe_gauge!(names::STORE_HEALTHY, "1 while the store accepts writes.");
    describe_counter!(
        names::CLUSTER_FEED_MESSAGES,
        "Diffs published once per batch on room subjects for other nodes."
    );
    describe_counter!(
        names::CLUSTER_FEED_BYTES,
        Unit::Bytes,
        "Payload bytes of the diffs published on room subjects."
    );
    describe_counter!(
        names::CLUSTER_CATCHUPS,
        "Catch-ups asked of owners after a gap in a room's feed."
    );
}

/// The handles of the unlabelled figures recorded on hot paths, registered once.
pub struct Hot {
    pub store_commit_seconds: Histogram,
    pub deliveries: Counter,
    pub frames_sent: Counter,
    pub bytes_sent: Counter,
    pub outbound_queue_bytes: Histogram,
    pub subscriptions_started: Counter,
    pub subscriptions: Gauge,
    pub room_load_seconds: Histogram,
    pub room_loads_live: Counter,
    pub room_loads_absent: Counter,
    pub room_loads_failed: Counter,
    pub signals_dropped_room_busy: Counter,
    pub signals_dropped_queue_full: Counter,
    pub cluster_feed_messages: Counter,
    pub cluster_feed_bytes: Counter,
    pub cluster_catchups: Counter,
}

/// The hot-path handles (installing the recorder first, so they are never the no-op
/// handles of a recorder not yet there).
pub fn hot() -> &'static Hot {
    static HOT: OnceLock<Hot> = OnceLock::new();
    HOT.get_or_init(|| {
        handle();
        Hot {
            store_commit_seconds: metrics::histogram!(names::STORE_COMMIT_SECONDS),
            deliveries: metrics::counter!(names::DELIVERIES),
            frames_sent: metrics::counter!(names::FRAMES_SENT),
            bytes_sent: metrics::counter!(names::BYTES_SENT),
            outbound_queue_bytes: metrics::histogram!(names::OUTBOUND_QUEUE_BYTES),
            subscriptions_started: metrics::counter!(names::SUBSCRIPTIONS_STARTED),
            subscriptions: metrics::gauge!(names::SUBSCRIPTIONS),
            room_load_seconds: metrics::histogram!(names::ROOM_LOAD_SECONDS),
            room_loads_live: metrics::counter!(names::ROOM_LOADS, "result" => "live"),
            room_loads_absent: metrics::counter!(names::ROOM_LOADS, "result" => "absent"),
            room_loads_failed: metrics::counter!(names::ROOM_LOADS, "result" => "failed"),
            signals_dropped_room_busy: metrics::counter!(
                names::SIGNALS_DROPPED,
                "reason" => "room_busy"
            ),
            signals_dropped_queue_full: metrics::counter!(
                names::SIGNALS_DROPPED,
                "reason" => "queue_full"
            ),
            cluster_feed_messages: metrics::counter!(names::CLUSTER_FEED_MESSAGES),
            cluster_feed_bytes: metrics::counter!(names::CLUSTER_FEED_BYTES),
            cluster_catchups: metrics::counter!(names::CLUSTER_CATCHUPS),
        }
    })
}

/// Counters of one name with fixed label sets, registered once: counting picks one by
/// position (an index and an atomic add), with no key built or looked up. Modules that
/// own the label values (nack codes, close codes, room kinds) keep one in a `static`.
pub struct CounterSet(Box<[Counter]>);

impl CounterSet {
    /// One counter of `name` per label set, in order (installing the recorder first).
    pub fn new<const N: usize>(
        name: &'static str,
        label_sets: impl IntoIterator<Item = [(&'static str, &'static str); N]>,
    ) -> CounterSet {
        handle();
        CounterSet(
            label_sets
                .into_iter()
                .map(|labels| {
                    let labels: Vec<Label> =
                        labels.iter().map(|&(k, v)| Label::new(k, v)).collect();
                    metrics::counter!(name, labels)
                })
                .collect(),
        )
    }

    /// The counter of the `index`th label set. Panics on an index past the sets given
    /// to `new`, which is a bug in the caller's mapping.
    pub fn get(&self, index: usize) -> &Counter {
        &self.0[index]
    }
}

/// Counts `n` frames a room broadcast to its subscribers.
pub fn count_deliveries(n: usize) {
    if n > 0 {
        hot().deliveries.increment(n as u64);
    }
}

/// What the scrape-time gauges read.
pub struct Gauges {
    pub connections: usize,
    pub rooms_live: usize,
    pub store_healthy: bool,
}

/// The Prometheus text: the scrape-time gauges are set from `gauges`, then everything
/// recorded is rendered by the exporter.
pub fn render(gauges: &Gauges) -> String {
    let handle = handle();
    metrics::gauge!(names::CONNECTIONS).set(gauges.connections as f64);
    metrics::gauge!(names::ROOMS_LIVE).set(gauges.rooms_live as f64);
    metrics::gauge!(names::STORE_HEALTHY).set(f64::from(u8::from(gauges.store_healthy)));
    handle.render()
}

/// The value of an unlabelled counter or gauge `name` in Prometheus text, for tools
/// that read `/metrics` (`roomd bench`) and tests.
pub fn scrape_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse().ok())?
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_the_gauges_and_scrape_value_reads_them_back() {
        let text = render(&Gauges {
            connections: 3,
            rooms_live: 7,
            store_healthy: true,
        });
        assert_eq!(scrape_value(&text, names::CONNECTIONS), Some(3.0));
        assert_eq!(scrape_value(&text, names::ROOMS_LIVE), Some(7.0));
        assert_eq!(scrape_value(&text, names::STORE_HEALTHY), Some(1.0));
        assert_eq!(scrape_value(&text, "roomd_missing"), None);
        assert!(text.contains("# TYPE roomd_connections gauge"), "{text}");
    }

    #[test]
    fn counter_sets_count_each_label_set_apart() {
        let set = CounterSet::new(
            "roomd_test_set_total",
            [[("result", "a")], [("result", "b")]],
        );
        set.get(1).increment(2);
        let text = render(&Gauges {
            connections: 0,
            rooms_live: 0,
            store_healthy: true,
        });
        assert!(
            text.contains("roomd_test_set_total{result=\"b\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn scrape_value_skips_comments_and_longer_names() {
        let text = "# TYPE a_total counter\na_total_x 5\na_total 2\n";
        assert_eq!(scrape_value(text, "a_total"), Some(2.0));
    }
}
