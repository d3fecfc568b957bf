//! `roomd bench views`: the fan-out of a room with per-viewer entries against one
//! without, in the same run, over real WebSockets.
//!
//! Two players and N spectators (5,000 by default) all subscribe to two rooms: an `rps`
//! room (the kind of `examples/rps.rs`: a player's move is an entry only they see until
//! the other has moved) and a `state` room. Phases then alternate between the rooms:
//! in each, the two players write one op at a time, in turn, at `--rate` ops/s for
//! `--duration` (in rps, a move each: every other event is hidden from all but its
//! player; in the state room, a `set` of the player's key, seen by all). Every
//! subscriber is sent a diff for every event (an empty one for a hidden move), so a
//! delivery is one (subscriber, seq) pair covered by a diff's `from..=to`; a subscriber
//! reads only each diff's room, `from` and `to`, never the whole frame.
//!
//! Only a server that serves kind `rps` can run it: the rps example is a whole roomd,
//! so `target/release/examples/rps bench views` starts itself as the server.
//!
//! Each op waits for its ack before the next is sent (the rps rules need the moves in
//! turn), so `--rate` is an upper bound: a server whose acks take longer writes less,
//! and the report gives the ops actually written per phase.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use super::client::{self, ConnectOptions, Ws};
use super::proc_stats::ProcSample;
use super::report::{self, Report};
use super::server::Endpoint;
use super::{fd_limit, progress, BenchArgs, BenchError};
use crate::config::parse_duration;

/// Flags of `roomd bench views`.
#[derive(Args, Debug, Clone)]
pub struct ViewsArgs {
    /// Spectator connections (the two players subscribe too).
    #[arg(long, default_value_t = 5_000)]
    pub spectators: usize,

    /// Ops the two players write per second, together (an upper bound: each op waits
    /// for the ack of the one before).
    #[arg(long, default_value_t = 100)]
    pub rate: u32,

    /// How long each phase writes (e.g. `10s`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Rounds; each runs one phase per room, the first room alternating between rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,

    /// Connections set up at the same time.
    #[arg(long, default_value_t = 100)]
    pub connect_concurrency: usize,

    /// Longest wait, after a phase's last ack, for deliveries still on their way.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain: Duration,
}

/// How long one op's ack may take before the run stops.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// The two rooms, by index into the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Room {
    /// Kind `rps`: every other event writes an entry only its player sees.
    PerViewer = 0,
    /// Kind `state`: every event is seen by all.
    Shared = 1,
}

impl Room {
    fn name(self) -> &'static str {
        match self {
            Room::PerViewer => "per-viewer (rps)",
            Room::Shared => "shared (state)",
        }
    }

    fn field(self) -> &'static str {
        match self {
            Room::PerViewer => "per_viewer",
            Room::Shared => "shared",
        }
    }
}

/// One subscriber's counts per room; written by its reader task only, read by the
/// phase loop.
#[derive(Default)]
struct Counts {
    /// Seqs covered by the diffs received.
    covered: [AtomicU64; 2],
    frames: [AtomicU64; 2],
    /// When the last diff arrived, in µs since the run's start.
    last_us: [AtomicU64; 2],
}

/// What every reader shares: the clock, the room ids and each subscriber's counts.
struct Tally {
    t0: Instant,
    /// The `"room":"<id>"` text of each room, as diffs carry it.
    room_fields: [String; 2],
    counts: Vec<Counts>,
}

impl Tally {
    fn now_us(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64
    }

    /// (covered seqs, frames, last diff in µs) of one room over all subscribers.
    fn totals(&self, room: Room) -> (u64, u64, u64) {
        let i = room as usize;
        self.counts
            .iter()
            .fold((0, 0, 0), |(covered, frames, last), c| {
                (
                    covered + c.covered[i].load(Ordering::Relaxed),
                    frames + c.frames[i].load(Ordering::Relaxed),
                    last.max(c.last_us[i].load(Ordering::Relaxed)),
                )
            })
    }
}

/// A player's sending half and the acks and nacks its reader hands over.
struct Player {
    sink: SplitSink<Ws, Message>,
    /// Bounded at 16; the player has one op in flight, so it never fills. Were it full,
    /// the reader would wait, and with it this player's diffs.
    replies: mpsc::Receiver<String>,
}

/// What one phase measured.
struct Phase {
    room: Room,
    ops: u64,
    nacked: u64,
    first_nack: Option<String>,
    expected: u64,
    delivered: u64,
    frames: u64,
    /// First op sent -> last diff received.
    window: Duration,
    server_cpu_s: Option<f64>,
}

impl Phase {
    fn deliveries_per_s(&self) -> f64 {
        self.delivered as f64 / self.window.as_secs_f64().max(1e-9)
    }

    fn frames_per_s(&self) -> f64 {
        self.frames as f64 / self.window.as_secs_f64().max(1e-9)
    }

    fn cpu_per_million(&self) -> Option<f64> {
        let cpu = self.server_cpu_s?;
        (self.delivered > 0).then(|| cpu / (self.delivered as f64 / 1e6))
    }

    fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.delivered)
    }
}

pub fn run(args: &BenchArgs, views: &ViewsArgs, runtime: &Runtime) -> Result<Report, BenchError> {
    for (what, value) in [
        ("--spectators", views.spectators),
        ("--rate", views.rate as usize),
        ("--rounds", views.rounds),
        ("--connect-concurrency", views.connect_concurrency),
    ] {
        if value == 0 {
            return Err(BenchError::Zero { what });
        }
    }
    fd_limit::ensure_for(views.spectators + 2)?;
    let endpoint = Endpoint::open(args)?;
    let mut report = runtime.block_on(drive(&endpoint, views))?;
    endpoint.note_log_problems(&mut report);
    Ok(report)
}

async fn drive(endpoint: &Endpoint, views: &ViewsArgs) -> Result<Report, BenchError> {
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let rooms = [
        format!("rps:views-{run_id}"),
        format!("state:views-{run_id}"),
    ];
    let n_subscribers = views.spectators + 2;
    let tally = Arc::new(Tally {
        t0: Instant::now(),
        room_fields: rooms.clone().map(|room| format!("\"room\":\"{room}\"")),
        counts: (0..n_subscribers).map(|_| Counts::default()).collect(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);

    // The players first: the first creates both rooms, both join the rps game.
    let mut players = Vec::with_capacity(2);
    for p in 0..2 {
        let url = endpoint.url(&format!("/ws?user=bench-player-{p}"));
        let mut ws = client::connect(endpoint.addr, &url, ConnectOptions::sender()).await?;
        welcome(&mut ws).await?;
        if p == 0 {
            request(
                &mut ws,
                create_frame(&rooms[0], "rps"),
                "create the rps room",
            )
            .await?;
            request(
                &mut ws,
                create_frame(&rooms[1], "state"),
                "create the state room",
            )
            .await?;
        }
        let join = serde_json::json!({
            "t": "op", "id": "join", "room": rooms[0], "op": {"type": "join"}
        });
        request(&mut ws, join.to_string(), "join the rps room").await?;
        for room in &rooms {
            subscribe(&mut ws, room).await?;
        }
        let (sink, stream) = ws.split();
        let (replies_tx, replies) = mpsc::channel(16);
        tokio::spawn(receive(
            p,
            stream,
            tally.clone(),
            Some(replies_tx),
            stop_rx.clone(),
        ));
        players.push(Player { sink, replies });
    }

    let connect_started = Instant::now();
    let bar = progress::bar("connecting", views.spectators as u64, "spectators");
    let addr = endpoint.addr;
    let mut connecting = futures_util::stream::iter(0..views.spectators)
        .map(|i| {
            let url = endpoint.url(&format!("/ws?user=s{i}"));
            let rooms = rooms.clone();
            tokio::spawn(async move {
                let mut ws = client::connect(addr, &url, ConnectOptions::receiver()).await?;
                welcome(&mut ws).await?;
                for room in &rooms {
                    subscribe(&mut ws, room).await?;
                }
                Ok::<_, BenchError>(ws)
            })
        })
        .buffer_unordered(views.connect_concurrency);
    let mut index = 2;
    while let Some(connected) = connecting.next().await {
        let ws = connected
            .map_err(|e| BenchError::Protocol(format!("a spectator's setup task failed: {e}")))??;
        tokio::spawn(receive(index, ws, tally.clone(), None, stop_rx.clone()));
        index += 1;
        bar.inc(1);
    }
    drop(connecting);
    bar.finish_and_clear();
    let connect_time = connect_started.elapsed();
    eprintln!(
        "roomd bench: 2 players and {} spectators subscribed to both rooms in {:.1} s",
        views.spectators,
        connect_time.as_secs_f64()
    );

    let mut phases = Vec::with_capacity(views.rounds * 2);
    let mut next_op = 0u64;
    for round in 0..views.rounds {
        let order = match round % 2 {
            0 => [Room::PerViewer, Room::Shared],
            _ => [Room::Shared, Room::PerViewer],
        };
        for room in order {
            let phase = run_phase(
                room,
                &rooms,
                &mut players,
                &tally,
                endpoint,
                views,
                n_subscribers as u64,
                &mut next_op,
            )
            .await?;
            eprintln!(
                "roomd bench: round {} {}: {} ops, {} deliveries/s, {} lost",
                round + 1,
                room.name(),
                phase.ops,
                report::si(phase.deliveries_per_s()),
                phase.lost()
            );
            phases.push(phase);
        }
    }
    let _ = stop_tx.send(true);
    Ok(build_report(views, connect_time, &phases))
}

/// Writes one phase's ops into `room` and waits for their deliveries.
#[allow(clippy::too_many_arguments)] // One call site; a struct would only rename them.
async fn run_phase(
    room: Room,
    rooms: &[String; 2],
    players: &mut [Player],
    tally: &Tally,
    endpoint: &Endpoint,
    views: &ViewsArgs,
    n_subscribers: u64,
    next_op: &mut u64,
) -> Result<Phase, BenchError> {
    let (covered_before, frames_before, _) = tally.totals(room);
    let server_before = endpoint.sample();
    let started = tokio::time::Instant::now();
    let start_us = tally.now_us();
    // Whole rps rounds: an even number of ops.
    let total = (f64::from(views.rate) * views.duration.as_secs_f64()).round() as u64 / 2 * 2;
    let (mut ops, mut nacked, mut first_nack) = (0u64, 0u64, None);
    let (mut first_seq, mut last_seq) = (None, 0u64);
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / f64::from(views.rate));
        tokio::time::sleep_until(due).await;
        // Acks slower than the rate: the phase ends about on time, with fewer ops, and
        // after a whole round (the next rps phase starts with player 0 again).
        if i % 2 == 0 && started.elapsed() > views.duration + Duration::from_secs(1) {
            break;
        }
        let player = (i % 2) as usize;
        *next_op += 1;
        let id = format!("v{next_op}");
        let op = match room {
            // Round r: player 0's move is hidden from all but them, player 1's ends it.
            Room::PerViewer => {
                let choice = ["rock", "paper", "scissors"][((i / 2 + i % 2) % 3) as usize];
                serde_json::json!({"type": "move", "move": choice})
            }
            Room::Shared => {
                serde_json::json!({"type": "set", "key": format!("k/{player}"), "value": i})
            }
        };
        let frame = serde_json::json!({
            "t": "op", "id": id, "room": rooms[room as usize], "op": op
        });
        let Player { sink, replies } = &mut players[player];
        sink.send(Message::text(frame.to_string()))
            .await
            .map_err(|e| BenchError::Send {
                what: "op",
                reason: e.to_string(),
            })?;
        let reply = tokio::time::timeout(ACK_TIMEOUT, replies.recv())
            .await
            .map_err(|_| BenchError::Timeout(ACK_TIMEOUT, format!("waiting for the ack of {id}")))?
            .ok_or_else(|| BenchError::Protocol("a player's connection ended".into()))?;
        ops += 1;
        match number_after(&reply, "\"seq\":") {
            Some(seq) if reply.starts_with("{\"t\":\"ack\"") => {
                first_seq.get_or_insert(seq);
                last_seq = seq;
            }
            _ => {
                nacked += 1;
                first_nack.get_or_insert(reply);
            }
        }
    }
    let events = first_seq.map_or(0, |first| last_seq + 1 - first);
    let expected = events * n_subscribers;
    let deadline = Instant::now() + views.drain;
    loop {
        let (covered, _, _) = tally.totals(room);
        if covered - covered_before >= expected || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let server_after = endpoint.sample();
    let (covered, frames, last_us) = tally.totals(room);
    Ok(Phase {
        room,
        ops,
        nacked,
        first_nack,
        expected,
        delivered: (covered - covered_before).min(expected),
        frames: frames - frames_before,
        window: Duration::from_micros(last_us.saturating_sub(start_us)),
        server_cpu_s: cpu_between(server_before, server_after),
    })
}

fn cpu_between(before: Option<ProcSample>, after: Option<ProcSample>) -> Option<f64> {
    Some((after?.cpu_s - before?.cpu_s).max(0.0))
}

/// The median of `values` (the lower middle one of an even count); NaN when empty.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n => values[(n - 1) / 2],
    }
}

fn build_report(views: &ViewsArgs, connect_time: Duration, phases: &[Phase]) -> Report {
    let mut r = Report::new(
        "views",
        format!(
            "views: 2 players + {} spectators, {} ops/s for {:?} per phase, {} rounds \
             (rps with per-viewer entries vs state)",
            views.spectators, views.rate, views.duration, views.rounds
        ),
    );
    r.field("spectators", views.spectators);
    r.field("subscribers", views.spectators + 2);
    r.field("rate", views.rate);
    r.field("duration_s", views.duration.as_secs_f64());
    r.field("rounds", views.rounds);
    r.row(
        "connect all",
        format!("{:.2} s", connect_time.as_secs_f64()),
    );
    let mut listed = Vec::new();
    for (i, phase) in phases.iter().enumerate() {
        let cpu = phase
            .cpu_per_million()
            .map_or("?".to_owned(), |cpu| format!("{cpu:.2}"));
        r.row(
            &format!("round {} {}", i / 2 + 1, phase.room.name()),
            format!(
                "{} ops ({} nacked), {} deliveries/s, {} frames/s, {} lost of {}, \
                 server CPU {cpu} s per 1M deliveries",
                phase.ops,
                phase.nacked,
                report::si(phase.deliveries_per_s()),
                report::si(phase.frames_per_s()),
                phase.lost(),
                phase.expected
            ),
        );
        listed.push(serde_json::json!({
            "room": phase.room.field(),
            "ops": phase.ops,
            "nacked": phase.nacked,
            "expected": phase.expected,
            "delivered": phase.delivered,
            "lost": phase.lost(),
            "frames": phase.frames,
            "window_s": report::round(phase.window.as_secs_f64(), 3),
            "deliveries_per_s": report::round(phase.deliveries_per_s(), 1),
            "server_cpu_s_per_million": phase.cpu_per_million().map(|c| report::round(c, 3)),
        }));
        if let Some(nack) = &phase.first_nack {
            r.note(format!("{}: an op was nacked: {nack}", phase.room.name()));
        }
        if phase.lost() > 0 {
            r.note(format!(
                "{}: {} deliveries lost (must be 0)",
                phase.room.name(),
                phase.lost()
            ));
        }
    }
    r.field("phases", serde_json::Value::Array(listed));
    let mut medians = [0.0; 2];
    for room in [Room::PerViewer, Room::Shared] {
        let of = |f: &dyn Fn(&Phase) -> Option<f64>| {
            median(
                phases
                    .iter()
                    .filter(|p| p.room == room)
                    .filter_map(f)
                    .collect(),
            )
        };
        let deliveries = of(&|p| Some(p.deliveries_per_s()));
        let cpu = of(&|p| p.cpu_per_million());
        medians[room as usize] = deliveries;
        r.row(
            &format!("median {}", room.name()),
            format!(
                "{} deliveries/s, server CPU {cpu:.2} s per 1M deliveries",
                report::si(deliveries)
            ),
        );
        r.field(
            &format!("{}_deliveries_per_s", room.field()),
            report::round(deliveries, 1),
        );
        r.field(
            &format!("{}_server_cpu_s_per_million", room.field()),
            if cpu.is_finite() {
                serde_json::Value::from(report::round(cpu, 3))
            } else {
                serde_json::Value::Null
            },
        );
    }
    let ratio = medians[0] / medians[1];
    r.row("per-viewer / shared", format!("{ratio:.3}"));
    r.field("ratio", report::round(ratio, 3));
    r
}

fn create_frame(room: &str, kind: &str) -> String {
    serde_json::json!({"t": "create", "id": format!("create-{kind}"), "room": room, "kind": kind, "init": {}})
        .to_string()
}

/// Reads the `welcome`.
async fn welcome(ws: &mut Ws) -> Result<(), BenchError> {
    let welcome = client::next_text(ws, "welcome").await?;
    if !welcome.as_str().contains("\"welcome\"") {
        return Err(BenchError::Protocol(format!(
            "expected welcome, got {}",
            welcome.as_str()
        )));
    }
    Ok(())
}

/// Sends a `create` or `op` and waits for its ack.
async fn request(ws: &mut Ws, frame: String, what: &'static str) -> Result<(), BenchError> {
    client::send_text(ws, frame, what).await?;
    loop {
        let reply = client::next_text(ws, what).await?;
        let reply: serde_json::Value = serde_json::from_str(reply.as_str()).unwrap_or_default();
        match reply["t"].as_str() {
            Some("ack") => return Ok(()),
            Some("nack") | Some("error") => {
                let hint = if reply["msg"].as_str().is_some_and(|m| m.contains("rps")) {
                    " (kind rps is served by the rps example: run \
                     `target/release/examples/rps bench views`)"
                } else {
                    ""
                };
                return Err(BenchError::Protocol(format!("{what}: {reply}{hint}")));
            }
            _ => {}
        }
    }
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

/// One subscriber's reader: counts the seqs each diff covers, and hands a player's acks
/// and nacks to its writer.
async fn receive<S>(
    index: usize,
    mut stream: S,
    tally: Arc<Tally>,
    replies: Option<mpsc::Sender<String>>,
    mut stop: watch::Receiver<bool>,
) where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let counts = &tally.counts[index];
    let stopped = stop.changed();
    tokio::pin!(stopped);
    loop {
        let message = tokio::select! {
            biased;
            _ = &mut stopped => break,
            message = stream.next() => message,
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => break,
        };
        let text = text.as_str();
        if text.starts_with("{\"t\":\"diff\"") {
            let Some(room) = tally
                .room_fields
                .iter()
                .position(|f| text.contains(f.as_str()))
            else {
                continue;
            };
            let (Some(from), Some(to)) = (
                number_after(text, "\"from\":"),
                number_after(text, "\"to\":"),
            ) else {
                continue;
            };
            counts.covered[room].fetch_add(to + 1 - from.min(to + 1), Ordering::Relaxed);
            counts.frames[room].fetch_add(1, Ordering::Relaxed);
            counts.last_us[room].store(tally.now_us(), Ordering::Relaxed);
        } else if text.starts_with("{\"t\":\"ack\"") || text.starts_with("{\"t\":\"nack\"") {
            if let Some(replies) = &replies {
                if replies.send(text.to_owned()).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// The decimal number right after the first `name` in `text`.
fn number_after(text: &str, name: &str) -> Option<u64> {
    let at = text.find(name)? + name.len();
    let digits: &str = &text[at..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_read_after_their_field_name() {
        let diff = r#"{"t":"diff","room":"rps:v","epoch":"0a","from":12,"to":14,"changes":[]}"#;
        assert_eq!(number_after(diff, "\"from\":"), Some(12));
        assert_eq!(number_after(diff, "\"to\":"), Some(14));
        assert_eq!(
            number_after(r#"{"t":"ack","id":"v1","seq":7}"#, "\"seq\":"),
            Some(7)
        );
        assert_eq!(number_after(diff, "\"seq\":"), None);
    }

    #[test]
    fn the_median_is_the_middle_value() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.0);
        assert!(median(Vec::new()).is_nan());
    }
}
