//! `roomd bench ingest`: W connections pipelining `state` `set` ops, N in flight each,
//! over K rooms. Measures acked ops/s and ack latency (op written -> ack read).
//!
//! Closed loop by default (a new op as soon as one is answered: the most the server
//! takes). With `--rate R` it is open loop: the writers send R ops/s between them on a
//! 1 ms tick whatever the replies do, so latency is measured at a given load; an op
//! that is due while the writer already has `--window` in flight is sent late, and the
//! report counts those (`late`). In open loop an op's latency runs from its scheduled
//! time (op `n` of a writer at rate r: start + n / r), not from when it was written, so
//! a generator that falls behind (a late tick, a starved thread, a full window) does
//! not hide the wait it caused (no coordinated omission); the report gives the send
//! lag (scheduled -> written) apart, which tells the generator's share of the latency
//! from the server's. The store's commit times (from `/metrics`) are beside them.
//!
//! Writer `i` sends op `n` to room `(i + n) mod K`, so every writer spreads its window
//! over all rooms and each room sees several writers. Replies are matched to ops by id
//! (`w<i>.<n>`), parsed with a borrowed two-field struct rather than a whole JSON value
//! (JSON), or read in place from the validated archive (`--encoding rkyv`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use futures_util::{FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::runtime::Runtime;
use tokio_tungstenite::tungstenite::Message;

use super::client::{self, ConnectOptions, Ws};
use super::proc_stats::{HostCpu, ProcSample};
use super::report::{self, Report};
use super::server::Endpoint;
use super::{fd_limit, progress, BenchArgs, BenchError};
use crate::config::parse_duration;

/// Flags of `roomd bench ingest`.
#[derive(Args, Debug, Clone)]
pub struct IngestArgs {
    /// Writer connections.
    #[arg(long, default_value_t = 8)]
    pub writers: usize,

    /// `state` rooms the ops are spread over.
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,

    /// Ops in flight per writer (sent, not yet acked or nacked).
    #[arg(long, default_value_t = 64)]
    pub window: usize,

    /// How long the writers send new ops (e.g. `10s`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Distinct keys per room the `set`s cycle through.
    #[arg(long, default_value_t = 1_000)]
    pub keys: u64,

    /// Bytes of each value (a string).
    #[arg(long, default_value_t = 16)]
    pub value_size: usize,

    /// Ops per second across all writers, sent on a schedule (open loop); 0 sends a new
    /// op whenever one is answered (closed loop, the default).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,

    /// The writers' encoding: `json` (`roomd.v1.json`, text frames) or `rkyv`
    /// (`roomd.v1.rkyv`, binary frames). Rooms are created over JSON either way.
    #[arg(long, value_enum, default_value_t = WireEncoding::Json)]
    pub encoding: WireEncoding,
}

/// The encoding the writers speak.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireEncoding {
    Json,
    Rkyv,
}

impl WireEncoding {
    fn as_str(self) -> &'static str {
        match self {
            WireEncoding::Json => "json",
            WireEncoding::Rkyv => "rkyv",
        }
    }
}

/// How often an open-loop writer sends the ops that have come due.
const TICK: Duration = Duration::from_millis(1);

/// How long writers wait for the replies to their last ops.
const DRAIN: Duration = Duration::from_secs(30);

const QUANTILES: [(&str, f64); 3] = [("p50", 0.50), ("p99", 0.99), ("max", 1.0)];

pub fn run(args: &BenchArgs, ingest: &IngestArgs, runtime: &Runtime) -> Result<Report, BenchError> {
    for (what, value) in [
        ("--writers", ingest.writers),
        ("--rooms", ingest.rooms),
        ("--window", ingest.window),
        ("--keys", ingest.keys as usize),
    ] {
        if value == 0 {
            return Err(BenchError::Zero { what });
        }
    }
    fd_limit::ensure_for(ingest.writers + 1)?;
    let endpoint = Endpoint::open(args)?;
    let outcome = runtime.block_on(drive(&endpoint, ingest))?;

    let load = if ingest.rate > 0 {
        format!(
            "{} ops/s offered, at most {} in flight",
            ingest.rate, ingest.window
        )
    } else {
        format!("{} in flight", ingest.window)
    };
    let mut r = Report::new(
        "ingest",
        format!(
            "ingest: {} writers × {load}, `set` over {} state rooms for {:?}, {}",
            ingest.writers,
            ingest.rooms,
            ingest.duration,
            ingest.encoding.as_str()
        ),
    );
    let secs = outcome.window.as_secs_f64().max(1e-9);
    let per_s = outcome.acked as f64 / secs;
    r.row(
        "acked ops/s",
        format!(
            "{} ({} acked in {secs:.2} s)",
            report::si(per_s),
            outcome.acked
        ),
    );
    r.row("nacked", outcome.nacked);
    if ingest.rate > 0 {
        r.row("late (window full when due)", outcome.late);
    }
    let from = if ingest.rate > 0 {
        "ack latency (from the scheduled time)"
    } else {
        "ack latency"
    };
    r.row(from, report::latency_row(&outcome.histogram, &QUANTILES));
    if ingest.rate > 0 {
        r.row(
            "send lag (scheduled -> written)",
            report::latency_row(&outcome.send_lag, &QUANTILES),
        );
        r.field(
            "send_lag_ms",
            report::latency_json(&outcome.send_lag, &QUANTILES),
        );
    }
    r.field("writers", ingest.writers);
    r.field("rooms", ingest.rooms);
    r.field("window", ingest.window);
    r.field("rate", ingest.rate);
    r.field("encoding", ingest.encoding.as_str());
    r.field("late", outcome.late);
    r.field("duration_s", ingest.duration.as_secs_f64());
    r.field("acked", outcome.acked);
    r.field("acked_ops_per_s", report::round(per_s, 1));
    r.field("nacked", outcome.nacked);
    r.field("unanswered", outcome.unanswered);
    r.field(
        "ack_latency_ms",
        report::latency_json(&outcome.histogram, &QUANTILES),
    );
    r.server_cost(
        outcome.server_before.as_ref(),
        outcome.server_after.as_ref(),
        outcome.acked,
        "acked ops",
        "server_cpu_s_per_million_ops",
    );
    r.generator_and_host(outcome.generator_cpu_s, outcome.host, outcome.acked, "ops");
    if let Some(store) = &outcome.store {
        let commits = store.batch_commits.max(1.0);
        r.row(
            "store commits",
            format!(
                "{:.0}/s with batches ({:.1} events and {:.1} room batches each), {:.0}/s in all",
                store.batch_commits / secs,
                store.events / commits,
                store.batches / commits,
                store.commits / secs,
            ),
        );
        r.field(
            "store_commits_per_s",
            report::round(store.batch_commits / secs, 1),
        );
        r.field(
            "store_all_commits_per_s",
            report::round(store.commits / secs, 1),
        );
        r.field(
            "events_per_commit",
            report::round(store.events / commits, 2),
        );
        r.field(
            "batches_per_commit",
            report::round(store.batches / commits, 2),
        );
        if store.commit_count > 0.0 {
            let mean_ms = store.commit_seconds / store.commit_count * 1e3;
            let p50 = store.commit_quantile_ms(0.5);
            let p99 = store.commit_quantile_ms(0.99);
            r.row(
                "store commit time",
                format!(
                    "mean {mean_ms:.2} ms, p50 <= {} ms, p99 <= {} ms (buckets)",
                    p50.map_or("?".to_owned(), |ms| ms.to_string()),
                    p99.map_or("?".to_owned(), |ms| ms.to_string()),
                ),
            );
            // A long tail of ack latency is often a few slow fsyncs: count them.
            let slow = |le: f64| {
                let within = store
                    .commit_buckets
                    .iter()
                    .find(|(b, _)| *b == le)
                    .map_or(store.commit_count, |(_, c)| *c);
                store.commit_count - within
            };
            r.row(
                "store commits slower than 100 / 250 ms",
                format!("{} / {}", slow(0.1), slow(0.25)),
            );
            r.field("commits_over_100ms", slow(0.1));
            r.field("commits_over_250ms", slow(0.25));
            // Folds answered after their group are not in the histogram: a fold the
            // disk held up shows here (and in the server's log) only.
            r.row(
                "store commits and syncs over 100 ms",
                format!("{}", store.slow_commits),
            );
            r.field("slow_commits_any_kind", store.slow_commits);
            r.field("commit_mean_ms", report::round(mean_ms, 3));
            r.field("commit_p50_le_ms", p50);
            r.field("commit_p99_le_ms", p99);
        }
    }
    if let Some(nack) = outcome.first_nack {
        r.note(format!("first nack: {nack}"));
    }
    if outcome.unanswered > 0 {
        r.note(format!(
            "{} ops had no reply within {DRAIN:?} of the end",
            outcome.unanswered
        ));
    }
    for problem in outcome.problems {
        r.note(problem);
    }
    endpoint.note_log_problems(&mut r);
    Ok(r)
}

struct Outcome {
    /// The store's commits during the run, when the server exports `/metrics`.
    store: Option<StoreCounts>,
    acked: u64,
    nacked: u64,
    /// Open loop: ops sent after their time because the window was full.
    late: u64,
    unanswered: u64,
    first_nack: Option<String>,
    /// First op sent -> last reply read.
    window: Duration,
    histogram: Histogram<u64>,
    /// Open loop: scheduled -> written, per op.
    send_lag: Histogram<u64>,
    server_before: Option<super::proc_stats::ProcSample>,
    server_after: Option<super::proc_stats::ProcSample>,
    /// This process's CPU seconds over the run (the load generator's threads).
    generator_cpu_s: Option<f64>,
    /// The machine's CPU over the run, all processes.
    host: Option<HostCpu>,
    problems: Vec<String>,
}

/// The store writer's counters from `/metrics`.
struct StoreCounts {
    /// All commits, maintenance and syncs included.
    commits: f64,
    /// Commits that carried batches; the per-commit figures divide by these.
    batch_commits: f64,
    batches: f64,
    events: f64,
    /// Time spent in commits that carried batches, and how many (the histogram's
    /// `_sum` and `_count`).
    commit_seconds: f64,
    commit_count: f64,
    /// The commit-time histogram: `(upper bound in seconds, commits at or below it)`.
    commit_buckets: Vec<(f64, f64)>,
    /// Group commits and syncs that took 100 ms or more (folds answered after their
    /// group included, which the histogram does not time).
    slow_commits: f64,
}

impl StoreCounts {
    /// The smallest bucket bound (in ms) holding at least `q` of the commits.
    fn commit_quantile_ms(&self, q: f64) -> Option<f64> {
        let wanted = q * self.commit_count;
        self.commit_buckets
            .iter()
            .find(|(_, count)| *count >= wanted)
            .map(|(le, _)| le * 1e3)
    }

    fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{le=\"");
        let mut buckets: Vec<(f64, f64)> = text
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(&prefix)?;
                let (le, count) = rest.split_once("\"} ")?;
                Some((le.parse().ok()?, count.trim().parse().ok()?))
            })
            .filter(|(le, _): &(f64, f64)| le.is_finite())
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        buckets
    }

    fn scrape(endpoint: &Endpoint) -> Option<StoreCounts> {
        use crate::metrics::{names, scrape_value};
        let text = endpoint.scrape_metrics()?;
        Some(StoreCounts {
            commits: scrape_value(&text, names::STORE_COMMITS)?,
            // Absent until the first batch commits.
            batch_commits: scrape_value(&text, names::STORE_BATCH_COMMITS).unwrap_or(0.0),
            batches: scrape_value(&text, names::STORE_BATCHES).unwrap_or(0.0),
            events: scrape_value(&text, names::STORE_EVENTS).unwrap_or(0.0),
            commit_seconds: scrape_value(&text, &format!("{}_sum", names::STORE_COMMIT_SECONDS))
                .unwrap_or(0.0),
            commit_count: scrape_value(&text, &format!("{}_count", names::STORE_COMMIT_SECONDS))
                .unwrap_or(0.0),
            commit_buckets: Self::buckets(&text, names::STORE_COMMIT_SECONDS),
            // Absent until the first slow commit.
            slow_commits: scrape_value(&text, names::STORE_SLOW_COMMITS).unwrap_or(0.0),
        })
    }

    fn minus(&self, before: &StoreCounts) -> StoreCounts {
        StoreCounts {
            commits: self.commits - before.commits,
            batch_commits: self.batch_commits - before.batch_commits,
            batches: self.batches - before.batches,
            events: self.events - before.events,
            commit_seconds: self.commit_seconds - before.commit_seconds,
            commit_count: self.commit_count - before.commit_count,
            commit_buckets: self
                .commit_buckets
                .iter()
                .map(|&(le, count)| {
                    let earlier = before
                        .commit_buckets
                        .iter()
                        .find(|(b, _)| *b == le)
                        .map_or(0.0, |(_, c)| *c);
                    (le, count - earlier)
                })
                .collect(),
            slow_commits: self.slow_commits - before.slow_commits,
        }
    }
}

/// What one writer saw.
struct Writer {
    histogram: Histogram<u64>,
    send_lag: Histogram<u64>,
    acked: u64,
    nacked: u64,
    late: u64,
    unanswered: u64,
    first_nack: Option<String>,
    last_reply: Option<Instant>,
    /// Why the connection failed, if it did.
    ended: Option<String>,
}

async fn drive(endpoint: &Endpoint, ingest: &IngestArgs) -> Result<Outcome, BenchError> {
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let rooms: Arc<Vec<String>> = Arc::new(
        (0..ingest.rooms)
            .map(|k| format!("state:ingest-{run_id}-{k}"))
            .collect(),
    );
    let mut control = connect(endpoint, "bench-control", WireEncoding::Json).await?;
    create_rooms(&mut control, &rooms).await?;

    let mut writers = Vec::with_capacity(ingest.writers);
    for i in 0..ingest.writers {
        writers.push(connect(endpoint, &format!("w{i}"), ingest.encoding).await?);
    }

    let acked_so_far = Arc::new(AtomicU64::new(0));
    let server_before = endpoint.sample();
    let generator_before = ProcSample::read(std::process::id());
    let host_before = HostCpu::read();
    let store_before = StoreCounts::scrape(endpoint);
    let start = Instant::now();
    let deadline = start + ingest.duration;
    let value: Arc<str> = Arc::from("v".repeat(ingest.value_size));
    let tasks: Vec<_> = writers
        .into_iter()
        .enumerate()
        .map(|(i, ws)| {
            let job = Job {
                index: i,
                rooms: rooms.clone(),
                window: ingest.window,
                keys: ingest.keys,
                value: value.clone(),
                encoding: ingest.encoding,
                start,
                deadline,
                // Writer i's share of the rate; the first rate % writers get one more.
                rate: ingest.rate / ingest.writers as u64
                    + u64::from((i as u64) < ingest.rate % ingest.writers as u64),
                acked_so_far: acked_so_far.clone(),
            };
            tokio::spawn(write(ws, job))
        })
        .collect();

    let bar = progress::bar("writing", ingest.duration.as_millis() as u64, "ms");
    let mut shown = (Instant::now(), 0u64);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let acked = acked_so_far.load(Ordering::Relaxed);
        let rate = (acked - shown.1) as f64 / shown.0.elapsed().as_secs_f64();
        bar.set_message(format!("acked {acked}, {}/s", report::si(rate)));
        bar.set_position(start.elapsed().as_millis() as u64);
        shown = (Instant::now(), acked);
    }
    bar.finish_and_clear();

    let mut histogram = report::latency_histogram();
    let mut send_lag = report::latency_histogram();
    let (mut acked, mut nacked, mut unanswered, mut late) = (0, 0, 0, 0);
    let (mut first_nack, mut last_reply, mut problems) = (None, start, Vec::new());
    for task in tasks {
        let Ok(writer) = task.await else {
            problems.push("a writer task panicked".to_string());
            continue;
        };
        // Same bounds on both sides, so adding cannot fail.
        let _ = histogram.add(&writer.histogram);
        let _ = send_lag.add(&writer.send_lag);
        acked += writer.acked;
        nacked += writer.nacked;
        unanswered += writer.unanswered;
        late += writer.late;
        if first_nack.is_none() {
            first_nack = writer.first_nack;
        }
        if let Some(at) = writer.last_reply {
            last_reply = last_reply.max(at);
        }
        if let Some(reason) = writer.ended {
            problems.push(format!("a writer's connection ended: {reason}"));
        }
    }
    let server_after = endpoint.sample();
    let generator_after = ProcSample::read(std::process::id());
    let host_after = HostCpu::read();
    let store = StoreCounts::scrape(endpoint)
        .zip(store_before)
        .map(|(after, before)| after.minus(&before));
    Ok(Outcome {
        store,
        acked,
        nacked,
        late,
        unanswered,
        first_nack,
        window: last_reply - start,
        histogram,
        send_lag,
        server_before,
        server_after,
        generator_cpu_s: generator_after
            .zip(generator_before)
            .map(|(after, before)| (after.cpu_s - before.cpu_s).max(0.0)),
        host: host_after
            .zip(host_before)
            .map(|(after, before)| after.since(&before)),
        problems,
    })
}

async fn connect(
    endpoint: &Endpoint,
    user: &str,
    encoding: WireEncoding,
) -> Result<Ws, BenchError> {
    let options = ConnectOptions {
        subprotocol: match encoding {
            WireEncoding::Json => None,
            WireEncoding::Rkyv => Some("roomd.v1.rkyv"),
        },
        // tungstenite zeroes this much before every read: at 64 KiB that was 8% of the
        // generator's CPU in the open loop, where each read finds an ack or two. A
        // closed loop's burst of 256 acks is about 15 KiB.
        read_buffer: 16 * 1024,
        ..ConnectOptions::sender()
    };
    let mut ws = client::connect(
        endpoint.addr,
        &endpoint.url(&format!("/ws?user={user}")),
        options,
    )
    .await?;
    if encoding == WireEncoding::Rkyv {
        return match client::next_binary(&mut ws, "welcome").await? {
            crate::protocol::message::ServerMsg::Welcome { .. } => Ok(ws),
            other => Err(BenchError::Protocol(format!(
                "expected welcome, got {other:?}"
            ))),
        };
    }
    let welcome = client::next_text(&mut ws, "welcome").await?;
    if !welcome.as_str().contains("\"welcome\"") {
        return Err(BenchError::Protocol(format!(
            "expected welcome, got {}",
            welcome.as_str()
        )));
    }
    Ok(ws)
}

/// Creates the state rooms, pipelined, and waits for every ack.
/// Most room creations in flight at once: each is a batch in the store writer's queue
/// (4,096 by default), so creating 10,000 rooms all at once filled it and the server
/// nacked the rest `unavailable`, as it should.
const CREATES_IN_FLIGHT: usize = 512;

async fn create_rooms(ws: &mut Ws, rooms: &[String]) -> Result<(), BenchError> {
    let send_error = |e: tokio_tungstenite::tungstenite::Error| BenchError::Send {
        what: "create",
        reason: e.to_string(),
    };
    let mut sent = 0;
    let mut acked = 0;
    while acked < rooms.len() {
        while sent < rooms.len() && sent - acked < CREATES_IN_FLIGHT {
            let frame = serde_json::json!({
                "t": "create", "id": format!("c{sent}"), "room": rooms[sent], "kind": "state",
                "init": {}
            });
            ws.feed(Message::text(frame.to_string()))
                .await
                .map_err(send_error)?;
            sent += 1;
        }
        ws.flush().await.map_err(send_error)?;
        let text = client::next_text(ws, "the ack of a create").await?;
        match parse_reply(text.as_str()) {
            Some(("ack", _)) => acked += 1,
            Some(("nack", _)) | Some(("error", _)) => {
                return Err(BenchError::Protocol(format!(
                    "creating a room failed: {}",
                    text.as_str()
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// What a writer task needs.
struct Job {
    index: usize,
    rooms: Arc<Vec<String>>,
    window: usize,
    keys: u64,
    value: Arc<str>,
    encoding: WireEncoding,
    start: Instant,
    /// No new ops after this.
    deadline: Instant,
    /// This writer's ops/s in open loop; 0 in closed loop.
    rate: u64,
    /// Acks of all writers, for the progress bar.
    acked_so_far: Arc<AtomicU64>,
}

impl Job {
    /// Open loop: when op `n` is due (start + n / rate); None in closed loop.
    fn scheduled(&self, n: u64) -> Option<Instant> {
        (self.rate > 0).then(|| {
            let nanos = u128::from(n) * 1_000_000_000 / u128::from(self.rate);
            self.start + Duration::from_nanos(nanos as u64)
        })
    }

    /// Open loop: how many ops are due at `now`, the ops numbered below it: op `n` is
    /// due once `now` reaches [`Job::scheduled`]`(n)`, so op 0 is due at the start.
    fn due_by(&self, now: Instant) -> u64 {
        // Op n is due once elapsed >= floor(n * 1e9 / rate), that is for every n below
        // (elapsed + 1) * rate / 1e9, rounded up (the exact inverse of `scheduled`).
        let elapsed = now.saturating_duration_since(self.start).as_nanos();
        ((elapsed + 1) * u128::from(self.rate)).div_ceil(1_000_000_000) as u64
    }

    fn op(&self, n: u64) -> Message {
        let room = &self.rooms[(self.index + n as usize) % self.rooms.len()];
        let key = n % self.keys;
        match self.encoding {
            WireEncoding::Json => Message::text(format!(
                r#"{{"t":"op","id":"w{}.{n}","room":"{room}","op":{{"type":"set","key":"k{key}","value":"{}"}}}}"#,
                self.index, self.value
            )),
            WireEncoding::Rkyv => {
                use crate::protocol::message::{ClientMsg, Node, WireValue};
                let op = WireValue {
                    nodes: vec![
                        Node::Map(3),
                        Node::Str("key".into()),
                        Node::Str(format!("k{key}")),
                        Node::Str("type".into()),
                        Node::Str("set".into()),
                        Node::Str("value".into()),
                        Node::Str(self.value.to_string()),
                    ],
                };
                Message::binary(crate::protocol::binary::encode_client(&ClientMsg::Op {
                    id: format!("w{}.{n}", self.index),
                    room: room.clone(),
                    op,
                }))
            }
        }
    }
}

async fn write(mut ws: Ws, job: Job) -> Writer {
    let mut writer = Writer {
        histogram: report::latency_histogram(),
        send_lag: report::latency_histogram(),
        acked: 0,
        nacked: 0,
        late: 0,
        unanswered: 0,
        first_nack: None,
        last_reply: None,
        ended: None,
    };
    let mut in_flight = InFlight {
        sent_at: HashMap::with_capacity(job.window * 2),
        next: 0,
    };
    let pumped = if job.rate > 0 {
        pump_open(&mut ws, &job, &mut writer, &mut in_flight).await
    } else {
        pump(&mut ws, &job, &mut writer, &mut in_flight).await
    };
    if let Err(reason) = pumped {
        writer.ended = Some(reason);
    }
    writer.unanswered = in_flight.sent_at.len() as u64;
    writer
}

/// A writer's ops without a reply yet.
struct InFlight {
    /// Op number -> when it was written.
    sent_at: HashMap<u64, Instant>,
    /// The next op number.
    next: u64,
}

impl InFlight {
    /// Writes the next op. Its latency counts from when it was written in closed loop,
    /// from its scheduled time in open loop (the lag between the two is recorded).
    async fn send(&mut self, ws: &mut Ws, job: &Job, writer: &mut Writer) -> Result<(), String> {
        ws.feed(job.op(self.next))
            .await
            .map_err(|e| e.to_string())?;
        let now = Instant::now();
        let since = match job.scheduled(self.next) {
            Some(scheduled) => {
                let lag = now.saturating_duration_since(scheduled).as_micros() as u64;
                writer.send_lag.saturating_record(lag.max(1));
                scheduled.min(now)
            }
            None => now,
        };
        self.sent_at.insert(self.next, since);
        self.next += 1;
        Ok(())
    }
}

/// Keeps `window` ops in flight until the deadline, then waits for the last replies.
async fn pump(
    ws: &mut Ws,
    job: &Job,
    writer: &mut Writer,
    in_flight: &mut InFlight,
) -> Result<(), String> {
    for _ in 0..job.window {
        in_flight.send(ws, job, writer).await?;
    }
    ws.flush().await.map_err(|e| e.to_string())?;
    let drain_until = tokio::time::Instant::from_std(job.deadline + DRAIN);
    while !in_flight.sent_at.is_empty() {
        let Ok(mut message) = tokio::time::timeout_at(drain_until, ws.next()).await else {
            return Ok(());
        };
        // Handle every reply already read, then write the new ops with one flush.
        loop {
            if on_reply(message, job, writer, in_flight)? {
                in_flight.send(ws, job, writer).await?;
            }
            match ws.next().now_or_never() {
                Some(more) => message = more,
                None => break,
            }
        }
        ws.flush().await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Sends the ops due by the schedule every tick until the deadline (holding back while
/// `window` are in flight), reads replies in between, then waits for the last replies.
async fn pump_open(
    ws: &mut Ws,
    job: &Job,
    writer: &mut Writer,
    in_flight: &mut InFlight,
) -> Result<(), String> {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Ops numbered below this were already counted late.
    let mut counted_late: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = Instant::now();
                if now >= job.deadline {
                    break;
                }
                let due = job.due_by(now);
                let mut sent = false;
                while in_flight.next < due {
                    if in_flight.sent_at.len() >= job.window {
                        writer.late += due - counted_late.max(in_flight.next);
                        counted_late = due;
                        break;
                    }
                    in_flight.send(ws, job, writer).await?;
                    sent = true;
                }
                if sent {
                    ws.flush().await.map_err(|e| e.to_string())?;
                }
            }
            message = ws.next() => {
                on_reply(message, job, writer, in_flight)?;
            }
        }
    }
    let drain_until = tokio::time::Instant::from_std(job.deadline + DRAIN);
    while !in_flight.sent_at.is_empty() {
        let Ok(message) = tokio::time::timeout_at(drain_until, ws.next()).await else {
            return Ok(());
        };
        on_reply(message, job, writer, in_flight)?;
    }
    Ok(())
}

/// Accounts for one frame; true when a new op should replace the answered one.
fn on_reply(
    message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    job: &Job,
    writer: &mut Writer,
    in_flight: &mut InFlight,
) -> Result<bool, String> {
    let (kind, n, text) = match message {
        Some(Ok(Message::Text(text))) => {
            let Some((kind, Some(n))) = parse_reply(text.as_str()) else {
                return Ok(false);
            };
            (kind == "ack", n, text.as_str().to_owned())
        }
        Some(Ok(Message::Binary(bytes))) => {
            let Some((kind, n)) = parse_binary_reply(&bytes) else {
                return Ok(false);
            };
            (
                kind,
                n,
                format!("{:?}", crate::protocol::binary::decode_server(&bytes)),
            )
        }
        Some(Ok(Message::Close(frame))) => return Err(client::close_reason(frame.as_ref())),
        Some(Ok(_)) => return Ok(false),
        Some(Err(e)) => return Err(e.to_string()),
        None => return Err("the server ended the connection".into()),
    };
    let Some(sent) = in_flight.sent_at.remove(&n) else {
        return Ok(false);
    };
    let now = Instant::now();
    let micros = now.duration_since(sent).as_micros() as u64;
    writer.histogram.saturating_record(micros.max(1));
    writer.last_reply = Some(now);
    if kind {
        writer.acked += 1;
        job.acked_so_far.fetch_add(1, Ordering::Relaxed);
    } else {
        writer.nacked += 1;
        writer.first_nack.get_or_insert(text);
    }
    Ok(now < job.deadline)
}

/// The two fields a writer needs from a reply.
#[derive(serde::Deserialize)]
struct Reply<'a> {
    t: &'a str,
    #[serde(default)]
    id: Option<&'a str>,
}

/// `(t, op number)` of a reply; the op number is None for ids that are not `w<i>.<n>`.
/// None when the frame is not JSON with a plain `t` (ids and tags never need escapes).
fn parse_reply(text: &str) -> Option<(&str, Option<u64>)> {
    let reply: Reply = serde_json::from_str(text).ok()?;
    let n = reply
        .id
        .and_then(|id| id.rsplit_once('.'))
        .and_then(|(_, n)| n.parse().ok());
    Some((reply.t, n))
}

/// `(is an ack, op number)` of a binary reply to a `w<i>.<n>` op: read in place from the
/// validated archive. None for other frames (diffs, errors, replies to other ids).
fn parse_binary_reply(bytes: &[u8]) -> Option<(bool, u64)> {
    use crate::protocol::message::ArchivedServerMsg;
    let archived = rkyv::access::<ArchivedServerMsg, rkyv::rancor::Error>(bytes).ok()?;
    let (ack, id) = match archived {
        ArchivedServerMsg::Ack { id, .. } => (true, id.as_str()),
        ArchivedServerMsg::Nack { id, .. } => (false, id.as_str()),
        _ => return None,
    };
    let n = id.rsplit_once('.')?.1.parse().ok()?;
    Some((ack, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_give_their_kind_and_op_number() {
        assert_eq!(
            parse_reply(r#"{"t":"ack","id":"w3.17","seq":5}"#),
            Some(("ack", Some(17)))
        );
        assert_eq!(
            parse_reply(r#"{"t":"nack","id":"w3.18","code":"conflict","msg":"a \"quoted\" word"}"#),
            Some(("nack", Some(18)))
        );
        assert_eq!(
            parse_reply(r#"{"t":"ack","id":"c1","seq":1}"#),
            Some(("ack", None))
        );
        assert_eq!(parse_reply("not json"), None);
    }

    /// Op `n` is sent by the first tick at or after its scheduled time, not one op
    /// interval later (the count of due ops once left out the op due right now).
    #[test]
    fn an_open_loop_op_is_due_at_its_scheduled_time() {
        for rate in [3, 250, 2_500, 2_501, 1_000_000] {
            let start = Instant::now();
            let job = Job {
                index: 0,
                rooms: Arc::new(vec!["r".into()]),
                window: 1,
                keys: 1,
                value: Arc::from("v"),
                encoding: WireEncoding::Json,
                start,
                deadline: start,
                rate,
                acked_so_far: Arc::default(),
            };
            assert_eq!(job.due_by(start), 1, "op 0 is due at the start");
            for n in 1..2_000 {
                let at = job.scheduled(n).expect("open loop");
                assert_eq!(job.due_by(at), n + 1, "rate {rate}: op {n} due at its time");
                let before = at - Duration::from_nanos(1);
                assert_eq!(
                    job.due_by(before),
                    n,
                    "rate {rate}: op {n} not due before it"
                );
            }
        }
    }
}
