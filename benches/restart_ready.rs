//! Restart cost of a filled data dir: how long until a restarted server listens, is
//! ready, and has lazily loaded (replayed) a room with a long log.
//!
//! Starts `target/release/roomd` (build it first) on a temporary data dir, fills it over
//! WebSocket with pipelined `set` ops (4 connections, 500 ops in flight in total, op
//! limit raised), then stops it with SIGTERM (exit 0 required). Data sets:
//! - `1x100000`: one `state` room, 100,000 sets over 10,000 keys (each key rewritten
//!   10 times), so the log has 100,001 events;
//! - `100x1000`: 100 `state` rooms, 1,000 sets each over 100 keys;
//! - `1000x1000` (only on request, see below): 1,000 `state` rooms, 1,000 sets each over
//!   100 keys, 1,000,000 events, filled over 8 connections with 4,000 ops in flight.
//!   Its all-rooms pass is measured two ways, on alternate starts so that every pass
//!   meets cold (unloaded) rooms: one GET after another (`all_seq`), and 8 GETs in
//!   flight (`all_c8`, 8 threads taking the next room id); 6 starts per kind of stop.
//!   Before each `kill -9` the server is made dirty: 5 more sets per room (5,000 ops,
//!   pipelined, all acked, so committed but not snapshotted), then killed within
//!   milliseconds of the last ack; the following start must return them all.
//!
//! `ROOMD_RESTART_VARIANT` picks the data sets (comma separated names, or `all`); the
//! default is `1x100000,100x1000`.
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
//! Run: `cargo build --release && cargo bench --bench restart_ready`, and the big one
//! with `ROOMD_RESTART_VARIANT=1000x1000 cargo bench --bench restart_ready`.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use support::{median, ms, r2, Server};

/// GETs in flight in the concurrent all-rooms pass.
const CONCURRENT_GETS: usize = 8;
/// The env var naming the data sets to run.
const VARIANT_ENV: &str = "ROOMD_RESTART_VARIANT";
/// The data sets run when `VARIANT_ENV` is unset.
const DEFAULT_VARIANTS: &str = "1x100000,100x1000";
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
    /// Fill connections; ops are dealt to them round-robin.
    fill_connections: usize,
    /// Ops in flight over all fill connections together.
    window: usize,
    /// Whether alternate starts fetch all rooms with `CONCURRENT_GETS` in flight.
    concurrent_pass: bool,
    /// Sets per room written (and acked) right before each `kill -9`.
    sets_before_kill: usize,
}

const VARIANTS: [Variant; 3] = [
    Variant {
        name: "1x100000",
        rooms: 1,
        events_per_room: 100_000,
        keys_per_room: 10_000,
        fill_connections: 4,
        window: 500,
        concurrent_pass: false,
        sets_before_kill: 0,
    },
    Variant {
        name: "100x1000",
        rooms: 100,
        events_per_room: 1_000,
        keys_per_room: 100,
        fill_connections: 4,
        window: 500,
        concurrent_pass: false,
        sets_before_kill: 0,
    },
    Variant {
        name: "1000x1000",
        rooms: 1_000,
        events_per_room: 1_000,
        keys_per_room: 100,
        fill_connections: 8,
        window: 4_000,
        concurrent_pass: true,
        sets_before_kill: 5,
    },
];

/// The variants named by `VARIANT_ENV` (or the default ones).
fn selected_variants() -> Vec<&'static Variant> {
    let wanted = std::env::var(VARIANT_ENV).unwrap_or_else(|_| DEFAULT_VARIANTS.to_string());
    if wanted.trim() == "all" {
        return VARIANTS.iter().collect();
    }
    wanted
        .split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .map(|w| {
            VARIANTS.iter().find(|v| v.name == w).unwrap_or_else(|| {
                let names: Vec<&str> = VARIANTS.iter().map(|v| v.name).collect();
                eprintln!("error: {VARIANT_ENV}={w:?} names no data set; known: {names:?} or all");
                std::process::exit(2);
            })
        })
        .collect()
}

/// How a start fetches all the rooms after the first.
#[derive(Clone, Copy, PartialEq)]
enum Pass {
    Sequential,
    Concurrent,
}

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
    /// All rooms answered, one GET after another (`None` on a concurrent start).
    all_seq: Option<f64>,
    /// All rooms answered with `CONCURRENT_GETS` in flight (`None` on a sequential one).
    all_c8: Option<f64>,
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
    let load_before = support::loadavg();
    let mut results = Vec::new();
    let mut logs = Vec::new();
    for variant in selected_variants() {
        let log = tmp.path().join(format!("{}.stderr", variant.name));
        results.push(run_variant(&bin, tmp.path(), variant, &log));
        logs.push(log);
    }
    let load_after = support::loadavg();
    report(&results, &load_before, &load_after);
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
    // With a concurrent pass, starts alternate sequential and concurrent passes, so each
    // kind of stop gets `RESTARTS` of each.
    let passes: &[Pass] = if variant.concurrent_pass {
        &[Pass::Sequential, Pass::Concurrent]
    } else {
        &[Pass::Sequential]
    };
    let per_stop = RESTARTS * passes.len();
    let plan: Vec<Stop> = (0..2 * per_stop)
        .map(|i| match i {
            i if i + 1 < per_stop => Stop::Term,
            i if i + 1 == per_stop => Stop::Kill,
            i if i + 1 < 2 * per_stop => Stop::Kill,
            _ => Stop::Term,
        })
        .collect();
    let mut previous = Stop::Term;
    // Every room's head seq: the creation, the fill, the sets before kills.
    let mut head = variant.events_per_room as u64 + 1;
    let mut dirty_rounds = 0;
    for (i, next) in plan.into_iter().enumerate() {
        let pass = passes[i % passes.len()];
        let server = Server::start(bin, &data_dir, &args, log);
        let startup = measure(&server, variant, pass, head);
        if next == Stop::Kill && variant.sets_before_kill > 0 {
            runtime.block_on(sets_before_kill(server.addr, variant, dirty_rounds));
            dirty_rounds += 1;
            head += variant.sets_before_kill as u64;
        }
        eprintln!(
            "{} after {}: listen {:.1} ms, ready {:.1} ms, first GET {:.1} ms, all rooms \
             {} {:.1} ms",
            variant.name,
            if previous == Stop::Term {
                "SIGTERM"
            } else {
                "kill -9"
            },
            startup.listen,
            startup.ready,
            startup.first_get,
            if pass == Pass::Sequential {
                "sequential"
            } else {
                "8 in flight"
            },
            startup.all_seq.or(startup.all_c8).unwrap_or(0.0)
        );
        match previous {
            Stop::Term => result.after_term.push(startup),
            Stop::Kill => result.after_kill.push(startup),
        }
        stop(server, next, &mut term_exit_ms);
        previous = next;
    }
    assert_eq!(result.after_term.len(), per_stop);
    assert_eq!(result.after_kill.len(), per_stop);
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

/// Times one start: listening line, readiness, lazy load of the first room, the rest
/// (one after another or `CONCURRENT_GETS` at a time).
fn measure(server: &Server, variant: &Variant, pass: Pass, head: u64) -> Startup {
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

    let first_get_at = get_room_checked(server.addr, &room_id(0), variant, head, deadline);
    match pass {
        Pass::Sequential => {
            for i in 1..variant.rooms {
                get_room_checked(server.addr, &room_id(i), variant, head, deadline);
            }
        }
        Pass::Concurrent => {
            let next = AtomicUsize::new(1);
            std::thread::scope(|scope| {
                for _ in 0..CONCURRENT_GETS {
                    scope.spawn(|| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= variant.rooms {
                            break;
                        }
                        get_room_checked(server.addr, &room_id(i), variant, head, deadline);
                    });
                }
            });
        }
    }
    let all_rooms_at = Instant::now();
    let warm_started = Instant::now();
    let warm_at = get_room_checked(server.addr, &room_id(0), variant, head, deadline);
    let warm_get = ms(warm_at - warm_started);

    Startup {
        listen,
        ready: since_spawn(ready_at),
        first_get: since_spawn(first_get_at),
        all_seq: (pass == Pass::Sequential).then(|| since_spawn(all_rooms_at)),
        all_c8: (pass == Pass::Concurrent).then(|| since_spawn(all_rooms_at)),
        warm_get,
    }
}

/// GETs the room until it answers 200, checks that nothing was lost (head seq `head`),
/// and returns when the answer arrived.
fn get_room_checked(
    addr: SocketAddr,
    room: &str,
    variant: &Variant,
    head: u64,
    deadline: Instant,
) -> Instant {
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
                    (Some(head), variant.keys_per_room),
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

/// Creates the variant's rooms and pipelines its sets over the variant's fill
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
        let frame = support::next_json(&mut control, REPLY_TIMEOUT).await;
        match frame["t"].as_str() {
            Some("ack") => created += 1,
            Some("nack") => panic!("create refused: {frame}"),
            _ => {}
        }
    }
    let _ = control.close(None).await;

    let total = variant.rooms * variant.events_per_room;
    let pad = "x".repeat(32);
    let connections = variant.fill_connections;
    let (rooms, keys) = (variant.rooms, variant.keys_per_room);
    let mut fillers = Vec::new();
    for conn in 0..connections {
        // Built as they are sent: a million ops held up front would cost ~150 MB here.
        let pad = pad.clone();
        let ops = (conn..total).step_by(connections).map(move |j| {
            let n = j / rooms;
            json!({"t": "op", "id": format!("f{j}"), "room": room_id(j % rooms),
                   "op": {"type": "set", "key": format!("k{}", n % keys),
                          "value": {"n": n, "pad": pad}}})
            .to_string()
        });
        let n_ops = (conn..total).step_by(connections).len();
        let (ws, _) = tokio_tungstenite::connect_async(url(&format!("filler{conn}")))
            .await
            .expect("the server accepts a WebSocket");
        fillers.push(tokio::spawn(fill_connection(
            ws,
            ops,
            n_ops,
            variant.window / connections,
        )));
    }
    for filler in fillers {
        filler.await.expect("a fill task does not panic");
    }
}

/// Writes `sets_before_kill` more sets to every room (existing keys, new op ids) over the
/// fill connections and returns once all are acked.
async fn sets_before_kill(addr: SocketAddr, variant: &Variant, round: usize) {
    let total = variant.rooms * variant.sets_before_kill;
    let connections = variant.fill_connections;
    let (rooms, keys) = (variant.rooms, variant.keys_per_room);
    let mut writers = Vec::new();
    for conn in 0..connections {
        let ops = (conn..total).step_by(connections).map(move |j| {
            json!({"t": "op", "id": format!("d{round}-{j}"), "room": room_id(j % rooms),
                   "op": {"type": "set", "key": format!("k{}", (j / rooms) % keys),
                          "value": {"dirty": round}}})
            .to_string()
        });
        let n_ops = (conn..total).step_by(connections).len();
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?user=dirty{conn}"))
            .await
            .expect("the server accepts a WebSocket");
        writers.push(tokio::spawn(fill_connection(
            ws,
            ops,
            n_ops,
            variant.window / connections,
        )));
    }
    for writer in writers {
        writer.await.expect("a writer task does not panic");
    }
}

/// Sends the `n_ops` ops of `ops` with at most `window` unanswered at a time.
async fn fill_connection(
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    ops: impl Iterator<Item = String> + Send + 'static,
    n_ops: usize,
    window: usize,
) {
    let (mut sink, mut stream) = ws.split();
    let window = Arc::new(Semaphore::new(window));
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
            let frame = support::next_json(&mut stream, REPLY_TIMEOUT).await;
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

fn report(results: &[VariantResult], load_before: &str, load_after: &str) {
    type Column = (&'static str, fn(&Startup) -> Option<f64>);
    let columns: [Column; 6] = [
        ("listen", |s| Some(s.listen)),
        ("ready", |s| Some(s.ready)),
        ("first_get", |s| Some(s.first_get)),
        ("all_seq", |s| s.all_seq),
        ("all_c8", |s| s.all_c8),
        ("warm_get", |s| Some(s.warm_get)),
    ];
    println!(
        "restart_ready: medians, ms since spawn; all_seq and all_c8 ({CONCURRENT_GETS} GETs \
         in flight) over {RESTARTS} starts each, the other columns over every start after \
         that stop; warm_get: the GET alone; loadavg before {load_before}, after {load_after}"
    );
    print!("{:<11}{:<9}", "data", "after");
    for (name, _) in &columns {
        print!("{name:>11}");
    }
    println!("{:>11}", "fill_s");
    let mut json_variants = serde_json::Map::new();
    for r in results {
        let mut json_variant = serde_json::Map::new();
        for (stop, samples) in [("sigterm", &r.after_term), ("kill9", &r.after_kill)] {
            print!("{:<11}{:<9}", r.name, stop);
            let mut stats = serde_json::Map::new();
            for (name, get) in &columns {
                let values: Vec<f64> = samples.iter().filter_map(get).collect();
                if values.is_empty() {
                    print!("{:>11}", "-");
                    continue;
                }
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
            "{:<11}SIGTERM -> exit 0: median {:.1} ms over {} stops",
            r.name,
            median(&r.term_exit_ms),
            r.term_exit_ms.len()
        );
        json_variants.insert(r.name.to_string(), Value::Object(json_variant));
    }
    println!(
        "{}",
        json!({"bench": "restart_ready", "restarts": RESTARTS, "loadavg_before": load_before,
               "loadavg_after": load_after, "variants": json_variants})
    );
}
