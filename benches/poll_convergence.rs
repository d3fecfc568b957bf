//! Fan-in then fan-out on one poll room: how long until 1,000 subscribers all see the
//! result of 1,000 votes.
//!
//! Starts `target/release/roomd` (build it first) on a temporary data dir with the
//! per-connection op limit raised, opens N = 1,000 WebSocket connections as users
//! `u0..u999`, and runs R = 5 rounds. Each round creates a fresh 2-option poll room,
//! subscribes every connection (waiting for all snapshots), then every connection casts
//! one vote as fast as it can and reads until it has its ack and its mirror (snapshot
//! plus diffs) shows `total` = 1,000 and counts summing to 1,000. The clock stops only
//! when every mirror has converged, i.e. after the server's queues have drained.
//!
//! Per round: (a) last vote sent -> every subscriber converged, (b) first vote sent ->
//! all 1,000 acks, (c) per-subscriber convergence latency from the last vote sent
//! (p50/p99/max). Reported as a table and one JSON line, with the median and the
//! min..max spread across rounds. The load generator shares the machine's cores with
//! the server, so the numbers include client-side scheduling.
//!
//! Run: `cargo build --release && cargo bench --bench poll_convergence`.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::Barrier;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use support::{median, ms, quantile, r2, sorted, Server};

/// Subscriber connections, one user each; every one of them votes once per round.
const N: usize = 1_000;
/// Rounds, each on a fresh poll room.
const ROUNDS: usize = 5;
/// Connections opened concurrently while setting up.
const CONNECT_CONCURRENCY: usize = 50;
/// How long one round may take from the votes to full convergence before it is
/// reported as unconverged.
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one frame (welcome, snapshot, ack) may take during setup.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What one subscriber saw in one round.
#[derive(Default)]
struct SubOutcome {
    /// When its vote frame was written to the socket.
    sent_at: Option<Instant>,
    acked_at: Option<Instant>,
    converged_at: Option<Instant>,
    /// Diffs that did not continue the mirror's seq or epoch.
    gaps: u64,
    /// Nacks, errors, timeouts and closed connections, as text.
    problems: Vec<String>,
}

/// One round's measurements, in milliseconds.
struct RoundResult {
    subscribe_all: f64,
    /// First vote sent -> last vote sent: how long the generator took to push them out.
    send_spread: f64,
    acks_all: f64,
    converge_all: f64,
    conv_p50: f64,
    conv_p99: f64,
    conv_max: f64,
    unconverged: usize,
    unacked: usize,
    gaps: u64,
    problems: Vec<String>,
    /// `total` in `GET /api/rooms/{room}` after the round.
    server_total: i64,
}

fn main() {
    let bin = support::roomd_release_bin();
    // Each connection is one fd here and one in the server, which inherits this limit.
    let nofile = support::raise_nofile((2 * N + 1_024) as libc::rlim_t);
    if nofile < (N + 256) as libc::rlim_t {
        eprintln!("error: RLIMIT_NOFILE is {nofile}; {N} connections need more (ulimit -n)");
        std::process::exit(2);
    }
    let tmp = tempfile::tempdir().expect("a temporary directory can be created");
    let data_dir = tmp.path().join("data");
    let log = tmp.path().join("roomd.stderr");
    let args: Vec<String> = ["--op-rate", "1000000", "--op-burst", "1000000"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let server = Server::start(&bin, &data_dir, &args, &log);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");
    let results = runtime.block_on(run_rounds(&server));
    drop(runtime);

    let (status, _) = server.terminate(Duration::from_secs(30));
    report(&results, status.code());
    let (n_problems, first) = support::log_problems(&log, 5);
    if n_problems > 0 {
        println!("server log: {n_problems} WARN/ERROR lines, first ones:");
        for line in first {
            println!("  {line}");
        }
    }
}

async fn run_rounds(server: &Server) -> Vec<RoundResult> {
    let connect_started = Instant::now();
    let mut control = connect(server.ws_url("bench-creator")).await;
    let mut subs: Vec<(usize, Ws)> = futures_util::stream::iter(0..N)
        .map(|i| {
            let url = server.ws_url(&format!("u{i}"));
            async move { (i, connect(url).await) }
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    subs.sort_by_key(|(i, _)| *i);
    let mut subs: Vec<Ws> = subs.into_iter().map(|(_, ws)| ws).collect();
    eprintln!(
        "connected {N} subscribers in {:.0} ms",
        ms(connect_started.elapsed())
    );

    let mut results = Vec::new();
    for round in 0..ROUNDS {
        let (result, back) = run_round(server, round, &mut control, subs).await;
        subs = back;
        eprintln!(
            "round {}: converge_all {:.1} ms, acks_all {:.1} ms",
            round + 1,
            result.converge_all,
            result.acks_all
        );
        results.push(result);
    }
    for mut ws in subs {
        let _ = ws.close(None).await;
    }
    results
}

async fn run_round(
    server: &Server,
    round: usize,
    control: &mut Ws,
    subs: Vec<Ws>,
) -> (RoundResult, Vec<Ws>) {
    let room: Arc<str> = Arc::from(format!("poll:bench-{round}"));
    let create_id = format!("create-{round}");
    send(
        control,
        json!({"t": "create", "id": create_id, "room": &*room, "kind": "poll",
               "init": {"question": "Bench?", "options": ["a", "b"]}}),
    )
    .await;
    let reply = tokio::time::timeout(
        SETUP_TIMEOUT,
        recv_until(control, |f| f["id"] == create_id.as_str()),
    )
    .await
    .unwrap_or_else(|_| panic!("no reply to creating {room}"));
    assert_eq!(reply["t"], "ack", "creating {room} failed: {reply}");

    // Everyone subscribes and waits at the barrier; the votes go out together.
    let barrier = Arc::new(Barrier::new(N + 1));
    let subscribe_started = Instant::now();
    let tasks: Vec<_> = subs
        .into_iter()
        .enumerate()
        .map(|(i, ws)| tokio::spawn(subscriber(i, round, ws, room.clone(), barrier.clone())))
        .collect();
    barrier.wait().await;
    let subscribe_all = ms(subscribe_started.elapsed());

    let mut outcomes = Vec::with_capacity(N);
    let mut back = Vec::with_capacity(N);
    for task in tasks {
        let (ws, outcome) = task.await.expect("a subscriber task does not panic");
        back.push(ws);
        outcomes.push(outcome);
    }

    let path = format!("/api/rooms/{room}");
    let addr = server.addr;
    let state = tokio::task::spawn_blocking(move || {
        support::http_get(addr, &path, SETUP_TIMEOUT).map(|r| r.json())
    })
    .await
    .expect("the HTTP task does not panic")
    .unwrap_or(Value::Null);
    let server_total = state["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["k"] == "total")
        .and_then(|e| e["v"].as_i64())
        .unwrap_or(-1);
    (summarize(&outcomes, subscribe_all, server_total), back)
}

/// One connection's round: subscribe, wait for everyone, vote, read until converged.
async fn subscriber(
    i: usize,
    round: usize,
    mut ws: Ws,
    room: Arc<str>,
    barrier: Arc<Barrier>,
) -> (Ws, SubOutcome) {
    let mut outcome = SubOutcome::default();
    send(&mut ws, json!({"t": "sub", "room": &*room})).await;
    let snapshot = tokio::time::timeout(
        SETUP_TIMEOUT,
        recv_until(&mut ws, |f| {
            (f["t"] == "snapshot" || f["t"] == "error") && f["room"] == *room
        }),
    )
    .await;
    // Every task reaches the barrier, even a failed one, so the round cannot hang.
    let mut mirror = match snapshot {
        Ok(frame) if frame["t"] == "snapshot" => Some(support::Mirror::from_snapshot(&frame)),
        Ok(frame) => {
            outcome.problems.push(format!("sub refused: {frame}"));
            None
        }
        Err(_) => {
            outcome.problems.push("no snapshot".into());
            None
        }
    };
    barrier.wait().await;
    let Some(mirror) = mirror.as_mut() else {
        return (ws, outcome);
    };

    let vote_id = format!("v{round}");
    send(
        &mut ws,
        json!({"t": "op", "id": vote_id, "room": &*room,
               "op": {"type": "vote", "option": i % 2}}),
    )
    .await;
    let sent_at = Instant::now();
    outcome.sent_at = Some(sent_at);

    let deadline = tokio::time::Instant::from_std(sent_at + ROUND_TIMEOUT);
    while outcome.acked_at.is_none() || outcome.converged_at.is_none() {
        let frame = match tokio::time::timeout_at(deadline, next_json(&mut ws)).await {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                outcome.problems.push("connection closed".into());
                break;
            }
            Err(_) => {
                outcome.problems.push("timed out".into());
                break;
            }
        };
        match frame["t"].as_str() {
            Some("ack") if frame["id"] == vote_id.as_str() => {
                outcome.acked_at = Some(Instant::now());
            }
            Some("nack") => {
                outcome.problems.push(format!("nack: {frame}"));
                break;
            }
            Some("diff") if frame["room"] == *room => {
                mirror.apply_diff(&frame);
                let counts = mirror.int("count/0") + mirror.int("count/1");
                if outcome.converged_at.is_none()
                    && mirror.int("total") == N as i64
                    && counts == N as i64
                {
                    outcome.converged_at = Some(Instant::now());
                }
            }
            Some("error") => outcome.problems.push(format!("error: {frame}")),
            _ => {}
        }
    }
    outcome.gaps = mirror.gaps;
    // Drop the subscription so later rounds fan out to one room only. No reply on success.
    let _ = ws
        .send(Message::text(
            json!({"t": "unsub", "room": &*room}).to_string(),
        ))
        .await;
    (ws, outcome)
}

fn summarize(outcomes: &[SubOutcome], subscribe_all: f64, server_total: i64) -> RoundResult {
    let sent: Vec<Instant> = outcomes.iter().filter_map(|o| o.sent_at).collect();
    let first_sent = sent.iter().min().copied();
    let last_sent = sent.iter().max().copied();
    let (Some(first_sent), Some(last_sent)) = (first_sent, last_sent) else {
        panic!(
            "no vote was sent; first problem: {:?}",
            first_problem(outcomes)
        );
    };
    let acked: Vec<Instant> = outcomes.iter().filter_map(|o| o.acked_at).collect();
    let converged: Vec<Instant> = outcomes.iter().filter_map(|o| o.converged_at).collect();
    let latencies: Vec<f64> = converged
        .iter()
        .map(|t| ms(t.saturating_duration_since(last_sent)))
        .collect();
    let latencies = sorted(&latencies);
    let last = |ts: &[Instant], from: Instant| {
        ts.iter()
            .max()
            .map_or(f64::NAN, |t| ms(t.saturating_duration_since(from)))
    };
    let mut problems: Vec<String> = outcomes
        .iter()
        .flat_map(|o| o.problems.iter().cloned())
        .collect();
    problems.dedup();
    RoundResult {
        subscribe_all,
        send_spread: ms(last_sent - first_sent),
        acks_all: last(&acked, first_sent),
        converge_all: last(&converged, last_sent),
        conv_p50: quantile(&latencies, 0.50),
        conv_p99: quantile(&latencies, 0.99),
        conv_max: quantile(&latencies, 1.0),
        unconverged: N - converged.len(),
        unacked: N - acked.len(),
        gaps: outcomes.iter().map(|o| o.gaps).sum(),
        problems,
        server_total,
    }
}

fn first_problem(outcomes: &[SubOutcome]) -> Option<&String> {
    outcomes.iter().flat_map(|o| o.problems.first()).next()
}

fn report(results: &[RoundResult], exit_code: Option<i32>) {
    type Column = (&'static str, fn(&RoundResult) -> f64);
    let columns: [Column; 7] = [
        ("subscribe_all", |r| r.subscribe_all),
        ("send_spread", |r| r.send_spread),
        ("acks_all", |r| r.acks_all),
        ("converge_all", |r| r.converge_all),
        ("conv_p50", |r| r.conv_p50),
        ("conv_p99", |r| r.conv_p99),
        ("conv_max", |r| r.conv_max),
    ];
    println!("poll_convergence: {N} subscribers/voters, {ROUNDS} rounds (all times in ms)");
    print!("{:<8}", "round");
    for (name, _) in &columns {
        print!("{name:>14}");
    }
    println!("{:>14}", "unconverged");
    for (i, r) in results.iter().enumerate() {
        print!("{:<8}", i + 1);
        for (_, get) in &columns {
            print!("{:>14.1}", get(r));
        }
        println!("{:>14}", r.unconverged);
    }
    let mut json_stats = serde_json::Map::new();
    let mut medians = Vec::new();
    let mut spreads = Vec::new();
    for (name, get) in &columns {
        let values: Vec<f64> = results.iter().map(get).collect();
        let s = sorted(&values);
        let (med, lo, hi) = (median(&values), s[0], s[s.len() - 1]);
        medians.push(format!("{med:>14.1}"));
        spreads.push(format!("{:>14}", format!("{lo:.0}..{hi:.0}")));
        json_stats.insert(
            format!("{name}_ms"),
            json!({"median": r2(med), "min": r2(lo), "max": r2(hi)}),
        );
    }
    println!("{:<8}{}", "median", medians.concat());
    println!("{:<8}{}", "spread", spreads.concat());

    let unconverged: usize = results.iter().map(|r| r.unconverged).sum();
    let unacked: usize = results.iter().map(|r| r.unacked).sum();
    let gaps: u64 = results.iter().map(|r| r.gaps).sum();
    let totals: Vec<i64> = results.iter().map(|r| r.server_total).collect();
    let problems: Vec<&String> = results.iter().flat_map(|r| r.problems.iter()).collect();
    println!(
        "checks: unconverged {unconverged}, unacked {unacked}, diff gaps {gaps}, \
         server totals {totals:?}, problems {}, server exit {exit_code:?}",
        problems.len()
    );
    for p in problems.iter().take(5) {
        println!("  problem: {p}");
    }
    let mut line = json!({
        "bench": "poll_convergence",
        "subscribers": N,
        "rounds": ROUNDS,
        "unconverged": unconverged,
        "unacked": unacked,
        "diff_gaps": gaps,
        "problems": problems.len(),
        "server_exit": exit_code,
    });
    let obj = line
        .as_object_mut()
        .expect("the literal above is an object");
    obj.extend(json_stats);
    println!("{line}");
}

async fn connect(url: String) -> Ws {
    let (mut ws, _) = tokio::time::timeout(SETUP_TIMEOUT, tokio_tungstenite::connect_async(&url))
        .await
        .unwrap_or_else(|_| panic!("connecting {url} timed out"))
        .unwrap_or_else(|e| panic!("connecting {url} failed: {e}"));
    let welcome = tokio::time::timeout(SETUP_TIMEOUT, next_json(&mut ws))
        .await
        .ok()
        .flatten();
    match welcome {
        Some(frame) if frame["t"] == "welcome" => ws,
        other => panic!("expected welcome on {url}, got {other:?}"),
    }
}

async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::text(frame.to_string()))
        .await
        .expect("the server accepts a frame");
}

/// The next JSON text frame; None when the connection ends.
async fn next_json(ws: &mut Ws) -> Option<Value> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(text)) => {
                return Some(serde_json::from_str(text.as_str()).unwrap_or(Value::Null))
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Reads frames until one matches `pred`; panics if the connection ends first.
async fn recv_until(ws: &mut Ws, pred: impl Fn(&Value) -> bool) -> Value {
    loop {
        let frame = next_json(ws)
            .await
            .expect("the connection stays open during setup");
        if pred(&frame) {
            return frame;
        }
    }
}
