//! `roomd bench fanout`: N subscribers spread over K chat rooms, one publisher posting R
//! messages/s of about B bytes. Measures deliveries/s, end-to-end latency, loss and
//! duplication, and what the server spent per million deliveries.
//!
//! Every message text starts with a marker `@@<n>:<µs>;` (n counts the room's posts
//! from 0, µs is the send time on this process's clock) and is padded with `x` to the
//! requested size. Subscribers find markers with a substring search instead of parsing
//! the frame: the publisher writes every text, and no other part of a roomd diff, a
//! Socket.IO event or a raw broadcast can contain `@@` (room ids, user ids, epochs and
//! keys are ours or hex). Each subscriber keeps a bitset of the n it received, so a
//! message seen twice is a duplicate and one never seen is lost; n is the room's seq
//! shifted by one (creation is seq 1), so this is counting by (room, seq).
//!
//! Targets: `roomd` (the wire contract: `create` chat rooms, `sub`, `op` `post`); `ws`
//! (a raw broadcast server: the publisher's text frames go to every other client);
//! `socketio` (Engine.IO 4 over the WebSocket transport: open `0{…}`, connect `40`,
//! events `42["msg","…"]`, ping `2` answered by pong `3`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, ValueEnum};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use super::client::{self, ConnectOptions, Ws};
use super::proc_stats::ProcSample;
use super::report::{self, Report};
use super::server::Endpoint;
use super::{fd_limit, progress, BenchArgs, BenchError};
use crate::config::parse_duration;

/// Flags of `roomd bench fanout`.
#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    /// Subscriber connections, spread round-robin over the rooms.
    #[arg(long, default_value_t = 1_000)]
    pub subscribers: usize,

    /// Messages the publisher posts per second (all rooms together).
    #[arg(long, default_value_t = 100)]
    pub rate: u32,

    /// Message text size in bytes (at least the ~20-byte send-time marker).
    #[arg(long, default_value_t = 100)]
    pub size: usize,

    /// How long the publisher posts (e.g. `20s`).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Chat rooms the subscribers and posts are spread over.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,

    /// What the server speaks: roomd's protocol, a raw WebSocket broadcast, or Socket.IO.
    #[arg(long, value_enum, default_value_t = Target::Roomd)]
    pub target: Target,

    /// Connections set up at the same time.
    #[arg(long, default_value_t = 100)]
    pub connect_concurrency: usize,

    /// Longest wait, after the last post, for deliveries still on their way.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain: Duration,

    /// Run with auth on: the server this command starts gets `--jwt-secret SECRET`
    /// (with --url, the server must already use it), and every connection carries a
    /// token whose `rooms` claim has a few patterns, the matching one last, so each
    /// `sub` and `op` pays a realistic permission check.
    #[arg(long, value_name = "SECRET")]
    pub auth_secret: Option<String>,

    /// Connect the subscribers to these servers instead (repeatable; round-robin), e.g.
    /// the other nodes of a cluster; the publisher stays on --url (or the started
    /// server). The server cost is then that of every server whose PID is known.
    #[arg(long, value_name = "URL")]
    pub subscriber_url: Vec<String>,

    /// PID of each --subscriber-url's server, in the same order, so their CPU time is
    /// counted with the publisher's server.
    #[arg(long, value_name = "PID")]
    pub subscriber_pid: Vec<u32>,

    /// Name the rooms `{PREFIX}-{k}` instead of `chat:fanout-{run}-{k}` (to pick the
    /// node that owns them in a cluster); they must not exist yet.
    #[arg(long, value_name = "PREFIX")]
    pub room_prefix: Option<String>,
}

/// A token for `user` that may read (subscribers) or also create and write (the
/// publisher) the bench's rooms, behind two patterns that do not match.
fn bench_token(secret: &str, user: &str) -> String {
    let claims = serde_json::json!({
        "sub": user,
        "rooms": {
            "read": ["dm:{sub}:*", "poll:*", "chat:fanout-*"],
            "write": ["dm:{sub}:*", "poll:*", "chat:fanout-*"],
            "create": ["chat:fanout-*"],
        },
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    // HS256 over a JSON object cannot fail.
    .expect("an HS256 token of a JSON object encodes")
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// roomd's wire protocol (chat rooms, `post` ops, diffs).
    Roomd,
    /// A raw broadcast server (`benches/peers/ws_server.js`).
    Ws,
    /// Socket.IO v4 over WebSocket (`benches/peers/socketio_server.js`).
    Socketio,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Roomd => "roomd",
            Target::Ws => "ws",
            Target::Socketio => "socketio",
        }
    }

    fn path(self, user: &str, auth_secret: Option<&str>) -> String {
        match self {
            Target::Roomd => match auth_secret {
                Some(secret) => format!("/ws?token={}", bench_token(secret, user)),
                None => format!("/ws?user={user}"),
            },
            Target::Ws => "/".to_string(),
            Target::Socketio => "/socket.io/?EIO=4&transport=websocket".to_string(),
        }
    }
}

/// Latency histograms and counters are sharded by subscriber so the two generator
/// threads rarely meet on a lock.
const SHARDS: usize = 16;

/// Quantiles reported for end-to-end latency.
const QUANTILES: [(&str, f64); 5] = [
    ("p50", 0.50),
    ("p90", 0.90),
    ("p99", 0.99),
    ("p999", 0.999),
    ("max", 1.0),
];

pub fn run(args: &BenchArgs, fanout: &FanoutArgs, runtime: &Runtime) -> Result<Report, BenchError> {
    for (what, value) in [
        ("--subscribers", fanout.subscribers),
        ("--rate", fanout.rate as usize),
        ("--rooms", fanout.rooms),
        ("--connect-concurrency", fanout.connect_concurrency),
    ] {
        if value == 0 {
            return Err(BenchError::Zero { what });
        }
    }
    if fanout.target != Target::Roomd {
        if args.url.is_none() {
            return Err(BenchError::UrlRequired(fanout.target.name()));
        }
        if fanout.rooms != 1 {
            return Err(BenchError::PeerRooms(fanout.rooms, fanout.target.name()));
        }
    }
    fd_limit::ensure_for(fanout.subscribers + 1)?;
    let mut args = args.clone();
    if let (Some(secret), None) = (&fanout.auth_secret, &args.url) {
        args.server_args
            .extend(["--jwt-secret".to_owned(), secret.clone()]);
    }
    let args = &args;
    let endpoint = Endpoint::open(args)?;
    let mut others = Vec::new();
    for (i, url) in fanout.subscriber_url.iter().enumerate() {
        let mut other = args.clone();
        other.url = Some(url.clone());
        other.server_pid = fanout.subscriber_pid.get(i).copied();
        others.push(Endpoint::open(&other)?);
    }
    let outcome = runtime.block_on(drive(&endpoint, &others, fanout))?;
    let mut report = outcome.report(fanout);
    endpoint.note_log_problems(&mut report);
    Ok(report)
}

/// Every server's CPU time and memory, added up (None unless every PID is known), and
/// each one's CPU seconds.
fn sample_all(endpoints: &[&Endpoint]) -> (Option<ProcSample>, Vec<Option<f64>>) {
    let samples: Vec<Option<ProcSample>> = endpoints.iter().map(|e| e.sample()).collect();
    let each = samples
        .iter()
        .map(|s| s.as_ref().map(|s| s.cpu_s))
        .collect();
    let mut total: Option<ProcSample> = None;
    for (i, sample) in samples.into_iter().enumerate() {
        let Some(sample) = sample else {
            return (None, each);
        };
        match &mut total {
            None if endpoints.len() == 1 => total = Some(sample),
            _ => {
                let sum = total.get_or_insert_with(|| ProcSample {
                    cpu_s: 0.0,
                    rss_mb: 0.0,
                    threads: Default::default(),
                });
                sum.cpu_s += sample.cpu_s;
                sum.rss_mb += sample.rss_mb;
                for (name, cpu) in sample.threads {
                    sum.threads.insert(format!("s{i}:{name}"), cpu);
                }
            }
        }
    }
    (total, each)
}

/// The cluster feed the publisher's server sent (messages, bytes), from its `/metrics`.
fn feed_counts(endpoint: &Endpoint) -> Option<(f64, f64)> {
    use crate::metrics::{names, scrape_value};
    let text = endpoint.scrape_metrics()?;
    Some((
        scrape_value(&text, names::CLUSTER_FEED_MESSAGES).unwrap_or(0.0),
        scrape_value(&text, names::CLUSTER_FEED_BYTES).unwrap_or(0.0),
    ))
}

/// What one run measured.
struct Outcome {
    connect_time: Duration,
    posts: u64,
    nacked: u64,
    expected: u64,
    delivered: u64,
    lost: u64,
    duplicated: u64,
    frames: u64,
    /// First post -> last delivery.
    window: Duration,
    histogram: Histogram<u64>,
    server_before: Option<ProcSample>,
    server_after: Option<ProcSample>,
    /// CPU seconds of each server during the run (publisher's first), when several.
    servers_cpu_s: Vec<Option<f64>>,
    /// Messages and bytes the publisher's server published on room subjects (cluster).
    feed: Option<(f64, f64)>,
    generator_cpu_s: f64,
    problems: Vec<String>,
}

impl Outcome {
    fn report(&self, fanout: &FanoutArgs) -> Report {
        let mut r = Report::new(
            "fanout",
            format!(
                "fanout → {}: {} subscribers in {} room(s), {} posts/s of {} B for {:?}",
                fanout.target.name(),
                fanout.subscribers,
                fanout.rooms,
                fanout.rate,
                fanout.size,
                fanout.duration
            ),
        );
        let secs = self.window.as_secs_f64().max(1e-9);
        let deliveries_per_s = self.delivered as f64 / secs;
        let frames_per_s = self.frames as f64 / secs;
        r.field("target", fanout.target.name());
        r.field("subscribers", fanout.subscribers);
        r.field("rooms", fanout.rooms);
        r.field("rate", fanout.rate);
        r.field("size", fanout.size);
        r.field("duration_s", fanout.duration.as_secs_f64());
        r.row(
            "connect all",
            format!("{:.2} s", self.connect_time.as_secs_f64()),
        );
        r.row("posts", format!("{} ({} nacked)", self.posts, self.nacked));
        r.row(
            "deliveries/s",
            format!(
                "{} ({} of {} expected in {:.2} s)",
                report::si(deliveries_per_s),
                self.delivered,
                self.expected,
                secs
            ),
        );
        r.row("frames/s", report::si(frames_per_s));
        r.row(
            "lost / duplicated",
            format!("{} / {}", self.lost, self.duplicated),
        );
        r.row("latency", report::latency_row(&self.histogram, &QUANTILES));
        r.field("posts", self.posts);
        r.field("nacked", self.nacked);
        r.field("deliveries_per_s", report::round(deliveries_per_s, 1));
        r.field("frames_per_s", report::round(frames_per_s, 1));
        r.field("expected", self.expected);
        r.field("delivered", self.delivered);
        r.field("lost", self.lost);
        r.field("duplicated", self.duplicated);
        r.field("window_s", report::round(secs, 3));
        r.field(
            "latency_ms",
            report::latency_json(&self.histogram, &QUANTILES),
        );
        r.server_cost(
            self.server_before.as_ref(),
            self.server_after.as_ref(),
            self.delivered,
            "deliveries",
            "server_cpu_s_per_million",
        );
        if self.servers_cpu_s.len() > 1 {
            let each: Vec<String> = self
                .servers_cpu_s
                .iter()
                .map(|cpu| cpu.map_or_else(|| "?".to_owned(), |c| format!("{c:.2}")))
                .collect();
            r.row("CPU per server (s)", each.join(", "));
            r.field(
                "servers_cpu_s",
                self.servers_cpu_s
                    .iter()
                    .map(|c| c.map(|c| report::round(c, 3)))
                    .collect::<Vec<_>>(),
            );
        }
        if let Some((messages, bytes)) = self.feed.filter(|(m, _)| *m > 0.0) {
            r.row(
                "cluster feed",
                format!(
                    "{messages} messages, {} B ({:.0} B per message)",
                    report::si(bytes),
                    bytes / messages
                ),
            );
            r.field("feed_messages", messages);
            r.field("feed_bytes", bytes);
        }
        r.row("generator CPU", format!("{:.2} s", self.generator_cpu_s));
        r.field("generator_cpu_s", report::round(self.generator_cpu_s, 3));
        if self.lost > 0 || self.duplicated > 0 {
            r.note(format!(
                "{} lost and {} duplicated deliveries (both must be 0)",
                self.lost, self.duplicated
            ));
        }
        for problem in &self.problems {
            r.note(problem.clone());
        }
        r
    }
}

/// Counters and latencies of a group of subscribers, behind one lock.
struct Shard {
    histogram: Histogram<u64>,
    /// First deliveries of a (room, n).
    unique: u64,
    duplicated: u64,
    frames: u64,
    last_delivery_us: u64,
}

/// What all subscribers share: the clock of the send-time markers and the shards.
struct Tally {
    t0: Instant,
    shards: Vec<Mutex<Shard>>,
    /// Posts the run makes in all; a marker or nack naming a post beyond is not ours
    /// and is ignored (it would otherwise size a bitmap).
    posts: u64,
}

impl Tally {
    fn now_us(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64
    }

    /// (unique deliveries, last delivery in µs) so far.
    fn progress(&self) -> (u64, u64) {
        self.shards.iter().fold((0, 0), |(unique, last), shard| {
            let shard = shard.lock();
            (unique + shard.unique, last.max(shard.last_delivery_us))
        })
    }
}

/// What one subscriber saw.
struct Subscriber {
    room: usize,
    /// Bit n set: message n of the room arrived.
    seen: Vec<u64>,
    /// Why the connection ended before the bench stopped it, if it did.
    ended: Option<String>,
    /// The first `error` frame, if any.
    error: Option<String>,
}

/// Sets bit n of `bits`; false if it was set before.
fn set_bit(bits: &mut Vec<u64>, n: u64) -> bool {
    let (word, bit) = ((n / 64) as usize, 1u64 << (n % 64));
    if word >= bits.len() {
        bits.resize(word + 1, 0);
    }
    let fresh = bits[word] & bit == 0;
    bits[word] |= bit;
    fresh
}

impl Subscriber {
    /// Marks n as seen; false if it was seen before.
    fn mark(&mut self, n: u64) -> bool {
        set_bit(&mut self.seen, n)
    }

    /// Distinct messages seen among those set in `posts`.
    fn seen_among(&self, posts: &[u64]) -> u64 {
        self.seen
            .iter()
            .zip(posts)
            .map(|(seen, post)| u64::from((seen & post).count_ones()))
            .sum()
    }

    /// Expected messages this subscriber got: among the first `sent`, those not nacked
    /// (which may be anywhere among them, e.g. under a rate limit). A delivered nacked
    /// post (a server bug) is not among them.
    fn delivered(&self, sent: u64, nacked: &[u64]) -> u64 {
        self.seen_below(sent) - self.seen_among(nacked)
    }

    /// Distinct messages seen among the first `posted`.
    fn seen_below(&self, posted: u64) -> u64 {
        let full = (posted / 64) as usize;
        let mut count: u64 = self
            .seen
            .iter()
            .take(full)
            .map(|w| u64::from(w.count_ones()))
            .sum();
        let rest = posted % 64;
        if rest > 0 {
            if let Some(word) = self.seen.get(full) {
                count += u64::from((word & ((1u64 << rest) - 1)).count_ones());
            }
        }
        count
    }
}

async fn drive(
    endpoint: &Endpoint,
    others: &[Endpoint],
    fanout: &FanoutArgs,
) -> Result<Outcome, BenchError> {
    let target = fanout.target;
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let prefix = fanout
        .room_prefix
        .clone()
        .unwrap_or_else(|| format!("chat:fanout-{run_id}"));
    let rooms: Vec<String> = (0..fanout.rooms).map(|k| format!("{prefix}-{k}")).collect();
    // Where the subscribers connect: the other servers, or the publisher's.
    let subscriber_servers: Vec<&Endpoint> = if others.is_empty() {
        vec![endpoint]
    } else {
        others.iter().collect()
    };
    let mut every_server = vec![endpoint];
    every_server.extend(others);

    // The publisher first: on roomd it creates the rooms the subscribers join.
    let mut publisher = client::connect(
        endpoint.addr,
        &endpoint.url(&target.path("bench-publisher", fanout.auth_secret.as_deref())),
        ConnectOptions::sender(),
    )
    .await?;
    handshake(&mut publisher, target).await?;
    if target == Target::Roomd {
        create_rooms(&mut publisher, &rooms).await?;
    }

    let connect_started = Instant::now();
    let bar = progress::bar("connecting", fanout.subscribers as u64, "subscribers");
    // Each setup is its own task so handshakes run on every worker thread.
    let mut connecting = futures_util::stream::iter(0..fanout.subscribers)
        .map(|i| {
            let room = i % rooms.len();
            let server = subscriber_servers[i % subscriber_servers.len()];
            let addr = server.addr;
            let url = server.url(&target.path(&format!("s{i}"), fanout.auth_secret.as_deref()));
            let room_id = rooms[room].clone();
            tokio::spawn(async move {
                let mut ws = client::connect(addr, &url, ConnectOptions::receiver()).await?;
                handshake(&mut ws, target).await?;
                if target == Target::Roomd {
                    subscribe(&mut ws, &room_id).await?;
                }
                Ok::<_, BenchError>((i, room, ws))
            })
        })
        .buffer_unordered(fanout.connect_concurrency);
    let mut subscribers = Vec::with_capacity(fanout.subscribers);
    while let Some(connected) = connecting.next().await {
        let connected = connected
            .map_err(|e| BenchError::Protocol(format!("a subscriber's setup task failed: {e}")))?;
        subscribers.push(connected?);
        bar.inc(1);
    }
    drop(connecting);
    bar.finish_and_clear();
    let connect_time = connect_started.elapsed();
    eprintln!(
        "roomd bench: {} subscribers connected{} in {:.1} s",
        fanout.subscribers,
        if target == Target::Roomd {
            " and subscribed"
        } else {
            ""
        },
        connect_time.as_secs_f64()
    );

    let tally = Arc::new(Tally {
        posts: total_posts(fanout),
        t0: Instant::now(),
        shards: (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    histogram: report::latency_histogram(),
                    unique: 0,
                    duplicated: 0,
                    frames: 0,
                    last_delivery_us: 0,
                })
            })
            .collect(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut subs_per_room = vec![0u64; rooms.len()];
    let tasks: Vec<_> = subscribers
        .into_iter()
        .map(|(i, room, ws)| {
            subs_per_room[room] += 1;
            tokio::spawn(receive(i, room, ws, target, tally.clone(), stop_rx.clone()))
        })
        .collect();

    let generator_before = ProcSample::read(std::process::id());
    let (server_before, servers_before) = sample_all(&every_server);
    let feed_before = feed_counts(endpoint);
    let start_us = tally.now_us();
    let published = publish(publisher, target, &rooms, fanout, &tally).await?;

    // Every post answered (roomd), then every expected delivery in, or the drain ends.
    let drain_deadline = Instant::now() + fanout.drain;
    if target == Target::Roomd {
        while published.answered() < published.total() && Instant::now() < drain_deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let posted: Vec<u64> = (0..rooms.len()).map(|k| published.expected_in(k)).collect();
    let expected: u64 = posted.iter().zip(&subs_per_room).map(|(p, s)| p * s).sum();
    let bar = progress::bar("draining", expected, "deliveries");
    loop {
        let (unique, _) = tally.progress();
        bar.set_position(unique.min(expected));
        if unique >= expected || Instant::now() >= drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bar.finish_and_clear();
    let (server_after, servers_after) = sample_all(&every_server);
    let feed_after = feed_counts(endpoint);
    let generator_after = ProcSample::read(std::process::id());

    let _ = stop_tx.send(true);
    let mut problems = published.problems();
    let (mut ended, mut first_end, mut first_error) = (0u64, None, None);
    let mut delivered_expected = 0u64;
    for task in tasks {
        let Ok(sub) = task.await else {
            problems.push("a subscriber task panicked".into());
            continue;
        };
        let nacked = published.nacked_posts[sub.room].lock();
        delivered_expected += sub.delivered(published.sent[sub.room], &nacked);
        if let Some(reason) = sub.ended {
            ended += 1;
            first_end.get_or_insert(reason);
        }
        if let Some(error) = sub.error {
            first_error.get_or_insert(error);
        }
    }
    if let Some(reason) = first_end {
        problems.push(format!(
            "{ended} subscriber connections ended early, first: {reason}"
        ));
    }
    if let Some(error) = first_error {
        problems.push(format!("a subscriber got an error frame: {error}"));
    }

    let mut histogram = report::latency_histogram();
    let (mut duplicated, mut frames, mut last_us) = (0, 0, 0);
    for shard in &tally.shards {
        let shard = shard.lock();
        // Same bounds on both sides, so adding cannot fail.
        let _ = histogram.add(&shard.histogram);
        duplicated += shard.duplicated;
        frames += shard.frames;
        last_us = last_us.max(shard.last_delivery_us);
    }
    // `delivered` counts distinct expected messages per subscriber; a delivery of a
    // nacked post (which would be a server bug) is not among them.
    Ok(Outcome {
        connect_time,
        posts: published.total(),
        nacked: published
            .nacked
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum(),
        expected,
        delivered: delivered_expected,
        lost: expected.saturating_sub(delivered_expected),
        duplicated,
        frames,
        window: Duration::from_micros(last_us.saturating_sub(start_us)),
        histogram,
        server_before,
        server_after,
        servers_cpu_s: servers_before
            .iter()
            .zip(&servers_after)
            .map(|(b, a)| Some(a.as_ref()? - b.as_ref()?))
            .collect(),
        feed: feed_before
            .zip(feed_after)
            .map(|((m0, b0), (m1, b1))| (m1 - m0, b1 - b0)),
        generator_cpu_s: match (generator_before, generator_after) {
            (Some(before), Some(after)) => after.cpu_s - before.cpu_s,
            _ => f64::NAN,
        },
        problems,
    })
}

/// The first frames of a connection: roomd's `welcome`, or Socket.IO's open and connect.
async fn handshake(ws: &mut Ws, target: Target) -> Result<(), BenchError> {
    match target {
        Target::Roomd => {
            let welcome = client::next_text(ws, "welcome").await?;
            if !welcome.as_str().contains("\"welcome\"") {
                return Err(BenchError::Protocol(format!(
                    "expected welcome, got {}",
                    welcome.as_str()
                )));
            }
        }
        Target::Ws => {}
        Target::Socketio => {
            let open = client::next_text(ws, "the Engine.IO open packet").await?;
            if !open.as_str().starts_with('0') {
                return Err(BenchError::Protocol(format!(
                    "expected an Engine.IO open packet `0{{…}}`, got {}",
                    open.as_str()
                )));
            }
            client::send_text(ws, "40".into(), "Socket.IO connect").await?;
            loop {
                let reply = client::next_text(ws, "the Socket.IO connect reply").await?;
                match reply.as_str() {
                    text if text.starts_with("40") => break,
                    "2" => client::send_text(ws, "3".into(), "Engine.IO pong").await?,
                    text if text.starts_with("44") => {
                        return Err(BenchError::Protocol(format!(
                            "Socket.IO refused the connection: {text}"
                        )))
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

/// Creates the chat rooms from the publisher's connection, pipelined.
async fn create_rooms(ws: &mut Ws, rooms: &[String]) -> Result<(), BenchError> {
    for (k, room) in rooms.iter().enumerate() {
        let frame = serde_json::json!({
            "t": "create", "id": format!("c{k}"), "room": room, "kind": "chat", "init": {}
        });
        ws.feed(Message::text(frame.to_string()))
            .await
            .map_err(|e| BenchError::Send {
                what: "create",
                reason: e.to_string(),
            })?;
    }
    ws.flush().await.map_err(|e| BenchError::Send {
        what: "create",
        reason: e.to_string(),
    })?;
    let mut acked = 0;
    while acked < rooms.len() {
        let reply = client::next_text(ws, "the ack of a create").await?;
        let reply: serde_json::Value = serde_json::from_str(reply.as_str()).unwrap_or_default();
        match reply["t"].as_str() {
            Some("ack") => acked += 1,
            Some("nack") | Some("error") => {
                return Err(BenchError::Protocol(format!(
                    "creating a room failed: {reply}"
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// `sub` and wait for the snapshot.
async fn subscribe(ws: &mut Ws, room: &str) -> Result<(), BenchError> {
    let frame = serde_json::json!({"t": "sub", "room": room});
    client::send_text(ws, frame.to_string(), "sub").await?;
    loop {
        let reply = client::next_text(ws, "the snapshot").await?;
        let reply: serde_json::Value = serde_json::from_str(reply.as_str()).unwrap_or_default();
        match reply["t"].as_str() {
            Some("snapshot") => return Ok(()),
            Some("error") => {
                return Err(BenchError::Protocol(format!("subscribing failed: {reply}")))
            }
            _ => {}
        }
    }
}

/// One subscriber: reads frames until told to stop, counting markers.
async fn receive(
    index: usize,
    room: usize,
    mut ws: Ws,
    target: Target,
    tally: Arc<Tally>,
    mut stop: watch::Receiver<bool>,
) -> Subscriber {
    let shard = &tally.shards[index % SHARDS];
    let mut sub = Subscriber {
        room,
        seen: Vec::new(),
        ended: None,
        error: None,
    };
    let mut latencies: Vec<u64> = Vec::with_capacity(16);
    // One stop future for the whole loop: building and dropping one per frame (its
    // waiter joins and leaves the watch's list) was about 5% of the generator's CPU.
    let stopped = stop.changed();
    tokio::pin!(stopped);
    loop {
        let message = tokio::select! {
            biased;
            _ = &mut stopped => break,
            message = ws.next() => message,
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                sub.ended = Some(client::close_reason(frame.as_ref()));
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                sub.ended = Some(e.to_string());
                break;
            }
            None => {
                sub.ended = Some("the server ended the connection".into());
                break;
            }
        };
        let text = text.as_str();
        if target == Target::Socketio && text == "2" {
            // Engine.IO heartbeat: answer or the server drops us after pingTimeout.
            if let Err(e) = ws.send(Message::text("3")).await {
                sub.ended = Some(e.to_string());
                break;
            }
            continue;
        }
        if target == Target::Roomd && sub.error.is_none() && text.starts_with("{\"t\":\"error\"") {
            sub.error = Some(text.to_string());
        }
        let now_us = tally.now_us();
        let (mut fresh, mut again) = (0, 0);
        for_each_marker(text, |n, sent_us| {
            if n >= tally.posts {
                return;
            }
            if sub.mark(n) {
                fresh += 1;
            } else {
                again += 1;
            }
            latencies.push(now_us.saturating_sub(sent_us).max(1));
        });
        let mut shard = shard.lock();
        shard.frames += 1;
        if !latencies.is_empty() {
            for latency in latencies.drain(..) {
                shard.histogram.saturating_record(latency);
            }
            shard.unique += fresh;
            shard.duplicated += again;
            shard.last_delivery_us = shard.last_delivery_us.max(now_us);
        }
    }
    sub
}

/// Calls `f(n, sent_us)` for every `@@<n>:<µs>;` marker in `text`. Scans for single
/// `@`s (a memchr) rather than the substring `"@@"` (a two-way searcher built per
/// call; the scan was the generator's largest item): the generator's CPU in a 20 s run
/// at 2M deliveries/s went from 17.7-18.8 s to 17.1-17.3 s.
fn for_each_marker(text: &str, mut f: impl FnMut(u64, u64)) {
    let bytes = text.as_bytes();
    // Always just after an ASCII byte, so a char boundary.
    let mut from = 0;
    while let Some(found) = text[from..].find('@') {
        let at = from + found;
        if bytes.get(at + 1) != Some(&b'@') {
            from = at + 1;
            continue;
        }
        from = at + 2;
        let rest = &bytes[from..];
        let (n, used_n) = digits(rest);
        if used_n == 0 || rest.get(used_n) != Some(&b':') {
            continue;
        }
        let (sent_us, used_us) = digits(&rest[used_n + 1..]);
        if used_us == 0 || rest.get(used_n + 1 + used_us) != Some(&b';') {
            continue;
        }
        f(n, sent_us);
        from += used_n + 2 + used_us;
    }
}

/// The decimal number at the start of `bytes` and how many bytes it used.
fn digits(bytes: &[u8]) -> (u64, usize) {
    let mut value: u64 = 0;
    let mut used = 0;
    for &b in bytes.iter().take(19) {
        if !b.is_ascii_digit() {
            break;
        }
        value = value * 10 + u64::from(b - b'0');
        used += 1;
    }
    (value, used)
}

/// A message text: marker, then `x` up to `size` bytes.
fn message_text(n: u64, sent_us: u64, size: usize) -> String {
    let mut text = format!("@@{n}:{sent_us};");
    if text.len() < size {
        text.extend(std::iter::repeat_n('x', size - text.len()));
    }
    text
}

/// The publisher's counts, shared with the task that reads its replies.
struct Published {
    /// Posts sent per room.
    sent: Vec<u64>,
    acked: Arc<AtomicU64>,
    /// Nacks per room, and which posts (bit n: post n of the room was nacked).
    nacked: Arc<Vec<AtomicU64>>,
    nacked_posts: Arc<Vec<Mutex<Vec<u64>>>>,
    first_nack: Arc<Mutex<Option<String>>>,
    /// Why the publisher's connection ended early, if it did.
    ended: Arc<Mutex<Option<String>>>,
}

impl Published {
    fn total(&self) -> u64 {
        self.sent.iter().sum()
    }

    fn answered(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
            + self
                .nacked
                .iter()
                .map(|n| n.load(Ordering::Relaxed))
                .sum::<u64>()
    }

    /// Posts of room k that subscribers should see (sent minus nacked).
    fn expected_in(&self, k: usize) -> u64 {
        self.sent[k].saturating_sub(self.nacked[k].load(Ordering::Relaxed))
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(nack) = self.first_nack.lock().clone() {
            let hint = if nack.contains("\"rate_limited\"") {
                " (the server's --op-rate and --op-burst limit the publisher's connection; \
                 roomd bench raises them only on a server it starts itself)"
            } else {
                ""
            };
            problems.push(format!("a post was nacked: {nack}{hint}"));
        }
        if let Some(reason) = self.ended.lock().clone() {
            problems.push(format!("the publisher's connection ended: {reason}"));
        }
        problems
    }
}

type Sink = SplitSink<Ws, Message>;

/// Posts `rate` messages/s for `duration`, spread round-robin over the rooms.
async fn publish(
    ws: Ws,
    target: Target,
    rooms: &[String],
    fanout: &FanoutArgs,
    tally: &Tally,
) -> Result<Published, BenchError> {
    let (sink, stream) = ws.split();
    let sink = Arc::new(tokio::sync::Mutex::new(sink));
    let mut published = Published {
        sent: vec![0; rooms.len()],
        acked: Arc::new(AtomicU64::new(0)),
        nacked: Arc::new((0..rooms.len()).map(|_| AtomicU64::new(0)).collect()),
        nacked_posts: Arc::new((0..rooms.len()).map(|_| Mutex::new(Vec::new())).collect()),
        first_nack: Arc::new(Mutex::new(None)),
        ended: Arc::new(Mutex::new(None)),
    };
    let replies = tokio::spawn(read_replies(
        stream,
        target,
        sink.clone(),
        clone_counts(&published),
        tally.posts,
    ));

    let total = tally.posts;
    let bar = progress::bar("posting", fanout.duration.as_millis() as u64, "ms");
    let start = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_millis(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut sent, mut last_shown, mut shown_unique) = (0u64, Instant::now(), 0u64);
    // A server that closes the publisher's connection (Socket.IO under overload misses
    // its own ping deadline) ends the posting early; the run is measured over what was
    // posted, and the report says why it stopped.
    while sent < total && published.ended.lock().is_none() {
        ticks.tick().await;
        let due = ((start.elapsed().as_secs_f64() * f64::from(fanout.rate)) as u64 + 1).min(total);
        if sent < due {
            let mut sink = sink.lock().await;
            let mut posted = Ok(());
            while sent < due && posted.is_ok() {
                let k = (sent % rooms.len() as u64) as usize;
                let n = published.sent[k];
                let text = message_text(n, tally.now_us(), fanout.size);
                let frame = match target {
                    Target::Roomd => format!(
                        r#"{{"t":"op","id":"p{k}.{n}","room":"{}","op":{{"type":"post","text":"{text}"}}}}"#,
                        rooms[k]
                    ),
                    Target::Ws => text,
                    Target::Socketio => format!(r#"42["msg","{text}"]"#),
                };
                posted = sink.feed(Message::text(frame)).await;
                if posted.is_ok() {
                    published.sent[k] += 1;
                    sent += 1;
                }
            }
            if let Err(e) = posted.and(sink.flush().await) {
                let mut ended = published.ended.lock();
                let reason = format!("posting stopped after {sent} of {total} posts: {e}");
                match ended.as_mut() {
                    Some(why) => *why = format!("{why}; {reason}"),
                    None => *ended = Some(reason),
                }
            }
        }
        if last_shown.elapsed() >= Duration::from_millis(250) {
            let (unique, _) = tally.progress();
            let rate = (unique - shown_unique) as f64 / last_shown.elapsed().as_secs_f64();
            bar.set_message(format!("sent {sent}, deliveries {}/s", report::si(rate)));
            bar.set_position(start.elapsed().as_millis() as u64);
            (last_shown, shown_unique) = (Instant::now(), unique);
        }
    }
    bar.finish_and_clear();
    // The reply reader runs on until the runtime ends; its counts are shared.
    drop(replies);
    Ok(published)
}

fn clone_counts(published: &Published) -> Published {
    Published {
        sent: Vec::new(),
        acked: published.acked.clone(),
        nacked: published.nacked.clone(),
        nacked_posts: published.nacked_posts.clone(),
        first_nack: published.first_nack.clone(),
        ended: published.ended.clone(),
    }
}

/// Posts a run makes: `rate` per second for `duration`.
fn total_posts(fanout: &FanoutArgs) -> u64 {
    (f64::from(fanout.rate) * fanout.duration.as_secs_f64()).round() as u64
}

/// Reads the publisher's connection: roomd acks and nacks, Socket.IO pings.
async fn read_replies(
    mut stream: SplitStream<Ws>,
    target: Target,
    sink: Arc<tokio::sync::Mutex<Sink>>,
    counts: Published,
    posts: u64,
) {
    while let Some(message) = stream.next().await {
        let text = match message {
            Ok(Message::Text(text)) => text,
            Ok(Message::Close(frame)) => {
                *counts.ended.lock() = Some(client::close_reason(frame.as_ref()));
                return;
            }
            Ok(_) => continue,
            Err(e) => {
                *counts.ended.lock() = Some(e.to_string());
                return;
            }
        };
        let text = text.as_str();
        match target {
            Target::Roomd if text.starts_with("{\"t\":\"ack\"") => {
                counts.acked.fetch_add(1, Ordering::Relaxed);
            }
            Target::Roomd => {
                // Rare: parse it whole. Nack ids are `p<room>.<n>`.
                let reply: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
                if reply["t"] == "nack" {
                    let post = reply["id"]
                        .as_str()
                        .and_then(|id| id.strip_prefix('p'))
                        .and_then(|id| id.split_once('.'))
                        .and_then(|(k, n)| {
                            Some((k.parse::<usize>().ok()?, n.parse::<u64>().ok()?))
                        });
                    // Only posts of this run, each counted once (a repeated nack is
                    // not a second post the subscribers should not see).
                    if let Some((k, n)) = post.filter(|&(_, n)| n < posts) {
                        if let (Some(count), Some(nacked)) =
                            (counts.nacked.get(k), counts.nacked_posts.get(k))
                        {
                            if set_bit(&mut nacked.lock(), n) {
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    counts
                        .first_nack
                        .lock()
                        .get_or_insert_with(|| text.to_string());
                }
            }
            Target::Socketio if text == "2" => {
                let _ = sink.lock().await.send(Message::text("3")).await;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_count_the_posts_not_nacked_wherever_they_are() {
        let mut sub = Subscriber {
            room: 0,
            seen: Vec::new(),
            ended: None,
            error: None,
        };
        // Posts 0..100 sent; 10..20 and 90 nacked (a rate limit hits the middle, not the
        // end); the subscriber saw every accepted post but 50.
        let mut nacked = Vec::new();
        for n in (10..20).chain([90]) {
            assert!(set_bit(&mut nacked, n));
        }
        for n in (0..100).filter(|n| !(10..20).contains(n) && *n != 90 && *n != 50) {
            assert!(sub.mark(n));
        }
        assert!(!sub.mark(0), "a second delivery is a duplicate");
        assert_eq!(sub.delivered(100, &nacked), 88);
        // A delivered nacked post (a server bug) does not count as an expected delivery.
        sub.mark(15);
        assert_eq!(sub.delivered(100, &nacked), 88);
    }

    #[test]
    fn markers_are_found_in_every_framing() {
        let text = message_text(7, 123_456, 40);
        assert_eq!(text.len(), 40);
        let frames = [
            text.clone(),
            format!(r#"42["msg","{text}"]"#),
            format!(
                r#"{{"t":"diff","room":"chat:a","epoch":"00ff","from":9,"to":10,"changes":[{{"k":"msg/9","v":{{"user":"p","text":"{text}","ts":1}},"ver":9}},{{"k":"msg/10","v":{{"user":"p","text":"{}","ts":1}},"ver":10}}]}}"#,
                message_text(8, 5, 10)
            ),
        ];
        let mut found = Vec::new();
        for frame in &frames {
            for_each_marker(frame, |n, us| found.push((n, us)));
        }
        assert_eq!(
            found,
            vec![(7, 123_456), (7, 123_456), (7, 123_456), (8, 5)]
        );
    }

    #[test]
    fn broken_markers_are_skipped() {
        let mut found = Vec::new();
        for_each_marker("@@ @@1: @@2:3 @@@@4:5;x", |n, us| found.push((n, us)));
        assert_eq!(found, vec![(4, 5)]);
    }

    #[test]
    fn the_bitset_counts_firsts_and_repeats() {
        let mut sub = Subscriber {
            room: 0,
            seen: Vec::new(),
            ended: None,
            error: None,
        };
        assert!(sub.mark(0));
        assert!(sub.mark(65));
        assert!(!sub.mark(65));
        assert_eq!(sub.seen_below(65), 1);
        assert_eq!(sub.seen_below(66), 2);
        assert_eq!(sub.seen_below(1_000), 2);
    }
}
