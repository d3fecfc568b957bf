//! Restart cost of a filled data dir: how long until a restarted server listens, is
//! ready, and has lazily loaded (replayed) a room with a long log.
//!
//! Starts `target/release/roomd` (build it first) on a temporary data dir, fills it over
//! WebSocket with pipelined `set` ops (4 connections, 500 ops in flight in total, op
//! limit raised), then stops it with SIGTERM (exit 0 required). Two data sets:
//! - `1x100000`: one `state` room, 100,000 sets over 10,000 keys (each key rewritten
//!   10 times), so the log has 100,001 events;
//! - `100x1000`: 100 `state` rooms, 1,000 sets each over 100 keys.
//!
//! Then it restarts the server on the same data dir six times. Each start is timed from
//! `spawn` to (a) the `roomd listening on` line, (b) the first `/readyz` 200 (polled
//! every ~1 ms), (c) the first 200 from `GET /api/rooms/{room}` (the room loads lazily,
//! replaying its log; the response is checked for the full head seq and key count),
//! and for `100x1000` also to all 100 rooms fetched one after another. A second GET of
//! the same room (already loaded) shows what the GET alone costs. The first three
//! starts follow a SIGTERM, the last three follow a `kill -9` of the previous process:
//! (d). Medians over the 3 starts of each kind are reported as a table and one JSON
//! line. The data dir stays in the OS page cache, so these are warm-cache restarts.
//!
//! Run: `cargo build --release && cargo bench --bench restart_ready`.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use support::{median, ms, r2, Server};

/// Fill connections; ops are dealt to them round-robin.
const FILL_CONNECTIONS: usize = 4;
/// Ops in flight over all fill connections together.
const WINDOW: usize = 500;
/// Starts measured after each kind of stop.
const RESTARTS: usize = 3;
/// How long a started server may take to become ready and to load a room.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the fill may wait for any one reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long SIGTERM may take to end the process.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// One data set.
struct Variant {
    name: &'static str,
    rooms: usize,
    events_per_room: usize,
    keys_per_room: usize,
}

const VARIANTS: [Variant; 2] = [
    Variant {
        name: "1x100000",
        rooms: 1,
        events_per_room: 100_000,
        keys_per_room: 10_000,
    },
    Variant {
        name: "100x1000",
        rooms: 100,
        events_per_room: 1_000,
        keys_per_room: 100,
    },
];

#[derive(Clone, Copy, PartialEq)]
enum Stop {
    Term,
    Kill,
}

/// One measured start, in ms since spawn.
struct Startup {
    listen: f64,
    ready: f64,
    first_get: f64,
    all_rooms: f64,
    /// A second GET of the first room, already loaded (its own duration).
    warm_get: f64,
}

struct VariantResult {
    name: &'static str,
    fill_secs: f64,
    after_term: Vec<Startup>,
    after_kill: Vec<Startup>,
    /// SIGTERM -> exit, for every SIGTERM stop.
    term_exit_ms: Vec<f64>,
}

fn room_id(i: usize) -> String {
    format!("state:bench-{i}")
}

fn main() {
    let bin = support::roomd_release_bin();
    let tmp = tempfile::tempdir().expect("a temporary directory can be created");
    let mut results = Vec::new();
    let mut logs = Vec::new();
    for variant in &VARIANTS {
        let log = tmp.path().join(format!("{}.stderr", variant.name));
        results.push(run_variant(&bin, tmp.path(), variant, &log));
        logs.push(log);
    }
    report(&results);
    for log in &logs {
        let (n_problems, first) = support::log_problems(log, 5);
        if n_problems > 0 {
            println!(
                "server log {}: {n_problems} WARN/ERROR lines, first ones:",
                log.display()
            );
            for line in first {
                println!("  {line}");
            }
        }
    }
}

fn run_variant(bin: &Path, tmp: &Path, variant: &Variant, log: &Path) -> VariantResult {
    let data_dir = tmp.join(variant.name);
    let args: Vec<String> = ["--op-rate", "1000000", "--op-burst", "1000000"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let server = Server::start(bin, &data_dir, &args, log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");
    let fill_started = Instant::now();
    runtime.block_on(fill(server.addr, variant));
    let fill_secs = fill_started.elapsed().as_secs_f64();
    drop(runtime);
    let total = variant.rooms * variant.events_per_room;
    eprintln!(
        "{}: filled {total} events in {fill_secs:.1} s ({:.0} ops/s)",
        variant.name,
        total as f64 / fill_secs
    );
    let mut term_exit_ms = Vec::new();
    stop(server, Stop::Term, &mut term_exit_ms);

    let mut result = VariantResult {
        name: variant.name,
        fill_secs,
        after_term: Vec::new(),
        after_kill: Vec::new(),
        term_exit_ms: Vec::new(),
    };
    // Each start is measured, then stopped the way the next start's row expects; the
    // last SIGTERM only checks that the crashed-and-recovered dir still shuts down clean.
    let plan = [
        Stop::Term,
        Stop::Term,
        Stop::Kill,
        Stop::Kill,
        Stop::Kill,
        Stop::Term,
    ];
    let mut previous = Stop::Term;
    for next in plan {
        let server = Server::start(bin, &data_dir, &args, log);
        let startup = measure(&server, variant);
        eprintln!(
            "{} after {}: listen {:.1} ms, ready {:.1} ms, first GET {:.1} ms",
            variant.name,
            if previous == Stop::Term {
                "SIGTERM"
            } else {
                "kill -9"
            },
            startup.listen,
            startup.ready,
            startup.first_get
        );
        match previous {
            Stop::Term => result.after_term.push(startup),
            Stop::Kill => result.after_kill.push(startup),
        }
        stop(server, next, &mut term_exit_ms);
        previous = next;
    }
    assert_eq!(result.after_term.len(), RESTARTS);
    assert_eq!(result.after_kill.len(), RESTARTS);
    result.term_exit_ms = term_exit_ms;
    result
}

fn stop(server: Server, how: Stop, term_exit_ms: &mut Vec<f64>) {
    match how {
        Stop::Term => {
            let (status, took) = server.terminate(STOP_TIMEOUT);
            assert_eq!(
                status.code(),
                Some(0),
                "roomd must exit 0 after SIGTERM, got {status}"
            );
            term_exit_ms.push(ms(took));
        }
        Stop::Kill => {
            server.kill9();
        }
    }
}

/// Times one start: listening line, readiness, lazy load of the first room, the rest.
fn measure(server: &Server, variant: &Variant) -> Startup {
    let since_spawn = |t: Instant| ms(t - server.spawned_at);
    let listen = since_spawn(server.listening_at);
    let deadline = Instant::now() + READY_TIMEOUT;

    let ready_at = loop {
        if let Ok(resp) = support::http_get(server.addr, "/readyz", READY_TIMEOUT) {
            if resp.status == 200 {
                break Instant::now();
            }
        }
        assert!(Instant::now() < deadline, "/readyz never answered 200");
        std::thread::sleep(Duration::from_millis(1));
    };

    let first_get_at = get_room_checked(server.addr, &room_id(0), variant, deadline);
    for i in 1..variant.rooms {
        get_room_checked(server.addr, &room_id(i), variant, deadline);
    }
    let all_rooms_at = Instant::now();
    let warm_started = Instant::now();
    let warm_at = get_room_checked(server.addr, &room_id(0), variant, deadline);
    let warm_get = ms(warm_at - warm_started);

    Startup {
        listen,
        ready: since_spawn(ready_at),
        first_get: since_spawn(first_get_at),
        all_rooms: since_spawn(all_rooms_at),
        warm_get,
    }
}

/// GETs the room until it answers 200, checks that nothing was lost, and returns when
/// the answer arrived.
fn get_room_checked(addr: SocketAddr, room: &str, variant: &Variant, deadline: Instant) -> Instant {
    let path = format!("/api/rooms/{room}");
    loop {
        match support::http_get(addr, &path, READY_TIMEOUT) {
            Ok(resp) if resp.status == 200 => {
                let at = Instant::now();
                let state = resp.json();
                let seq = state["seq"].as_u64();
                let keys = state["entries"].as_array().map_or(0, |e| e.len());
                assert_eq!(
                    (seq, keys),
                    (
                        Some(variant.events_per_room as u64 + 1),
                        variant.keys_per_room
                    ),
                    "{room} came back with the wrong head seq or key count"
                );
                return at;
            }
            Ok(resp) => eprintln!(
                "GET {path}: {} {}",
                resp.status,
                String::from_utf8_lossy(&resp.body)
            ),
            Err(e) => eprintln!("GET {path}: {e}"),
        }
        assert!(Instant::now() < deadline, "GET {path} never answered 200");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Creates the variant's rooms and pipelines its sets over `FILL_CONNECTIONS`
/// connections; returns once every op is acked.
async fn fill(addr: SocketAddr, variant: &Variant) {
    let url = |user: &str| format!("ws://{addr}/ws?user={user}");
    let (mut control, _) = tokio_tungstenite::connect_async(url("bench-creator"))
        .await
        .expect("the server accepts a WebSocket");
    for i in 0..variant.rooms {
        let frame = json!({"t": "create", "id": format!("create-{i}"), "room": room_id(i),
                           "kind": "state", "init": {}});
        control
            .send(Message::text(frame.to_string()))
            .await
            .expect("the server accepts a frame");
    }
    let mut created = 0;
    while created < variant.rooms {
        let frame = next_json(&mut control).await;
        match frame["t"].as_str() {
            Some("ack") => created += 1,
            Some("nack") => panic!("create refused: {frame}"),
            _ => {}
        }
    }
    let _ = control.close(None).await;

    let total = variant.rooms * variant.events_per_room;
    let pad = "x".repeat(32);
    let mut fillers = Vec::new();
    for conn in 0..FILL_CONNECTIONS {
        let ops: Vec<String> = (conn..total)
            .step_by(FILL_CONNECTIONS)
            .map(|j| {
                let n = j / variant.rooms;
                json!({"t": "op", "id": format!("f{j}"), "room": room_id(j % variant.rooms),
                       "op": {"type": "set", "key": format!("k{}", n % variant.keys_per_room),
                              "value": {"n": n, "pad": pad}}})
                .to_string()
            })
            .collect();
        let (ws, _) = tokio_tungstenite::connect_async(url(&format!("filler{conn}")))
            .await
            .expect("the server accepts a WebSocket");
        fillers.push(tokio::spawn(fill_connection(ws, ops)));
    }
    for filler in fillers {
        filler.await.expect("a fill task does not panic");
    }
}

/// Sends `ops` with at most `WINDOW / FILL_CONNECTIONS` unanswered at a time.
async fn fill_connection(
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    ops: Vec<String>,
) {
    let (mut sink, mut stream) = ws.split();
    let window = Arc::new(Semaphore::new(WINDOW / FILL_CONNECTIONS));
    let n_ops = ops.len();
    let sending = {
        let window = window.clone();
        async move {
            for op in ops {
                window
                    .acquire()
                    .await
                    .expect("the semaphore is never closed")
                    .forget();
                sink.send(Message::text(op))
                    .await
                    .expect("the server accepts a frame");
            }
            sink
        }
    };
    let receiving = async move {
        let mut answered = 0;
        while answered < n_ops {
            let message = tokio::time::timeout(REPLY_TIMEOUT, stream.next())
                .await
                .expect("the server answers within the reply timeout")
                .expect("the connection stays open")
                .expect("the connection has no error");
            let Message::Text(text) = message else {
                continue;
            };
            let frame: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
            match frame["t"].as_str() {
                Some("ack") => {
                    answered += 1;
                    window.add_permits(1);
                }
                Some("nack") | Some("error") => panic!("fill op refused: {frame}"),
                _ => {}
            }
        }
        stream
    };
    let (sink, stream) = tokio::join!(sending, receiving);
    let mut ws = sink
        .reunite(stream)
        .expect("both halves come from the same socket");
    let _ = ws.close(None).await;
}

async fn next_json(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Value {
    loop {
        let message = tokio::time::timeout(REPLY_TIMEOUT, ws.next())
            .await
            .expect("the server answers within the reply timeout")
            .expect("the connection stays open")
            .expect("the connection has no error");
        if let Message::Text(text) = message {
            return serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
        }
    }
}

fn report(results: &[VariantResult]) {
    type Column = (&'static str, fn(&Startup) -> f64);
    let columns: [Column; 5] = [
        ("listen", |s| s.listen),
        ("ready", |s| s.ready),
        ("first_get", |s| s.first_get),
        ("all_rooms", |s| s.all_rooms),
        ("warm_get", |s| s.warm_get),
    ];
    println!(
        "restart_ready: medians over {RESTARTS} starts, ms since spawn (warm_get: the GET alone)"
    );
    print!("{:<10}{:<9}", "data", "after");
    for (name, _) in &columns {
        print!("{name:>11}");
    }
    println!("{:>11}", "fill_s");
    let mut json_variants = serde_json::Map::new();
    for r in results {
        let mut json_variant = serde_json::Map::new();
        for (stop, samples) in [("sigterm", &r.after_term), ("kill9", &r.after_kill)] {
            print!("{:<10}{:<9}", r.name, stop);
            let mut stats = serde_json::Map::new();
            for (name, get) in &columns {
                let values: Vec<f64> = samples.iter().map(get).collect();
                print!("{:>11.1}", median(&values));
                stats.insert(
                    format!("{name}_ms"),
                    json!({"median": r2(median(&values)),
                           "samples": values.iter().map(|v| r2(*v)).collect::<Vec<_>>()}),
                );
            }
            println!("{:>11.1}", r.fill_secs);
            json_variant.insert(stop.to_string(), Value::Object(stats));
        }
        json_variant.insert("fill_s".into(), json!(r2(r.fill_secs)));
        json_variant.insert(
            "sigterm_exit_ms_median".into(),
            json!(r2(median(&r.term_exit_ms))),
        );
        println!(
            "{:<10}SIGTERM -> exit 0: median {:.1} ms over {} stops",
            r.name,
            median(&r.term_exit_ms),
            r.term_exit_ms.len()
        );
        json_variants.insert(r.name.to_string(), Value::Object(json_variant));
    }
    println!(
        "{}",
        json!({"bench": "restart_ready", "restarts": RESTARTS, "variants": json_variants})
    );
}
