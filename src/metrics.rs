//! `GET /metrics`: the server's counters in the Prometheus text format.
//!
//! Two kinds of figures:
//! - counters and histograms recorded where things happen, through the `metrics` facade
//!   (the store writer's commits, batches, events and commit time; see [`names`]);
//! - gauges read when the endpoint is scraped (open connections, live rooms, store
//!   health), so nothing on a hot path keeps them up to date.
//!
//! The recorder is process-global (`metrics` allows one); the first server to start
//! installs it and later ones in the same process (tests) share it, so counters then add
//! up across those servers. Nothing is exported unless a client asks.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

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
    /// Frames a room queued to its subscribers (`snapshot`s excluded: one `diff` or
    /// `presence` to 100 subscribers counts 100). The dashboard's deliveries/s.
    pub const DELIVERIES: &str = "roomd_deliveries_total";
    /// Open WebSocket connections.
    pub const CONNECTIONS: &str = "roomd_connections";
    /// Room actors running (loaded rooms).
    pub const ROOMS_LIVE: &str = "roomd_rooms_live";
    /// 1 while the store accepts writes, 0 after a failed commit.
    pub const STORE_HEALTHY: &str = "roomd_store_healthy";
}

/// The commit-time buckets, in seconds: 100 µs to 1 s.
const COMMIT_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// How often the recorder's upkeep drains buffered histogram samples into their
/// buckets. `build_recorder()` runs no upkeep by itself: without this, every commit's
/// sample stayed in memory until the next scrape, without bound on an unscraped server.
pub const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The process's recorder handle, installing the recorder (and its upkeep thread) on
/// first use.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(names::STORE_COMMIT_SECONDS.into()),
                &COMMIT_BUCKETS,
            )
            .expect("the bucket list is a non-empty constant")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first (an embedding program's);
        // then its recorder gets the figures and this handle renders the gauges alone.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics shows gauges only");
        }
        describe();
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            });
        if let Err(e) = spawned {
            // Only scrapes drain the samples then; the server still works.
            tracing::warn!(error = %e, "cannot start the metrics upkeep thread");
        }
        handle
    })
}

fn describe() {
    use metrics::{describe_counter, describe_histogram, Unit};
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
    describe_counter!(
        names::DELIVERIES,
        "Frames rooms queued to their subscribers (diffs, presence)."
    );
    describe_histogram!(
        names::STORE_COMMIT_SECONDS,
        Unit::Seconds,
        "Time to write and commit one group of batches."
    );
}

/// Counts `n` frames a room broadcast to its subscribers.
pub fn count_deliveries(n: usize) {
    if n > 0 {
        metrics::counter!(names::DELIVERIES).increment(n as u64);
    }
}

/// What the scrape-time gauges read.
pub struct Gauges {
    pub connections: usize,
    pub rooms_live: usize,
    pub store_healthy: bool,
}

/// The Prometheus text for the recorded figures plus `gauges`.
pub fn render(gauges: &Gauges) -> String {
    let mut text = handle().render();
    for (name, help, value) in [
        (
            names::CONNECTIONS,
            "Open WebSocket connections.",
            gauges.connections,
        ),
        (names::ROOMS_LIVE, "Room actors running.", gauges.rooms_live),
        (
            names::STORE_HEALTHY,
            "1 while the store accepts writes.",
            usize::from(gauges.store_healthy),
        ),
    ] {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
        ));
    }
    text
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
    }

    #[test]
    fn scrape_value_skips_comments_and_longer_names() {
        let text = "# TYPE a_total counter\na_total_x 5\na_total 2\n";
        assert_eq!(scrape_value(text, "a_total"), Some(2.0));
    }
}
