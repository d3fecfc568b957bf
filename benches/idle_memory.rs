//! Memory of idle rooms: does a server that loaded many rooms give the memory back once
//! they stop (`--room-idle`)?
//!
//! Starts `target/release/roomd` (build it first) on a temporary data dir with
//! `--room-idle 3s` and the op limits raised, and reads `/proc/PID/status`:
//! 1. `fresh`: a few seconds after the listening line;
//! 2. `after_fill`: right after 100,000 `state` rooms were created and touched (a
//!    `create`, then one `set` once the create is acked), pipelined over 8 WebSocket
//!    connections with 250 rooms in flight each; `peak` is VmHWM;
//! 3. `after_idle`: RSS polled every second for up to 60 s, ending early once it has
//!    not moved by more than 1% for 5 s (and at least 15 s have passed, so the rooms
//!    have stopped and tokio's idle blocking threads, which load rooms, have exited;
//!    `ROOMD_IDLE_POLL_MIN_S` raises that floor).
//!    Then one room is read over HTTP (it reloads: seq 2) and the server gets SIGTERM
//!    (exit 0 required).
//!
//! `ROOMD_IDLE_SMAPS=DIR` copies the server's `/proc/PID/smaps` at the end of each idle
//! poll to `DIR/NAME.smaps`, to see which mappings hold the memory.
//!
//! Rooms touched more than 3 s before the end of the fill may already have stopped, so
//! `after_fill` is not "every room loaded". RSS per loaded room comes from a separate
//! `hold` run with `--room-idle 1h`: (RssAnon after the fill - fresh) / rooms.
//!
//! The idle run is repeated per mimalloc setting of the server process
//! (`ROOMD_IDLE_MALLOC`, comma separated, default `default,purge0`): `default`,
//! `purge0` (`MIMALLOC_PURGE_DELAY=0`: freed memory goes back at once), and `stats`
//! (mimalloc prints its statistics at exit; the end of the server log is printed, and
//! the store writer's lines, e.g. how long its quiet reopen took). `ROOMD_IDLE_ROOMS` changes the room count, `ROOMD_IDLE_HOLD=0`
//! skips the hold run. Prints a table (MiB; RssAnon in parentheses) and one JSON line.
//!
//! Run: `cargo build --release && cargo bench --bench idle_memory`.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use support::{proc_mem, r2, ProcMem, Server};

/// Rooms created and touched, unless `ROOMD_IDLE_ROOMS` says otherwise.
const DEFAULT_ROOMS: usize = 100_000;
/// Fill connections; room `i` goes to connection `i % CONNECTIONS`.
const CONNECTIONS: usize = 8;
/// Rooms in flight (created or being set) per connection.
const ROOMS_IN_FLIGHT: usize = 250;
/// `--room-idle` of the measured runs.
const ROOM_IDLE: &str = "3s";
/// Time between the listening line and the `fresh` reading.
const FRESH_WAIT: Duration = Duration::from_secs(3);
/// The longest the idle poll runs.
const IDLE_POLL_MAX: Duration = Duration::from_secs(60);
/// The idle poll may end once this much time has passed and RSS is stable (unless
/// `ROOMD_IDLE_POLL_MIN_S` says otherwise, e.g. 60 to always poll the full minute).
const IDLE_POLL_MIN_S: usize = 15;
/// Consecutive 1 s samples within 1% of each other that count as stable.
const STABLE_SAMPLES: usize = 5;
/// How long the fill may wait for any one reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long SIGTERM may take to end the process.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// One malloc setting of the server process.
struct MallocConfig {
    name: &'static str,
    env: &'static [(&'static str, &'static str)],
}

const MALLOC_CONFIGS: [MallocConfig; 3] = [
    MallocConfig {
        name: "default",
        env: &[],
    },
    MallocConfig {
        name: "purge0",
        env: &[("MIMALLOC_PURGE_DELAY", "0")],
    },
    MallocConfig {
        name: "stats",
        env: &[("MIMALLOC_SHOW_STATS", "1"), ("MIMALLOC_VERBOSE", "1")],
    },
];

/// One idle run's readings.
struct IdleRun {
    name: &'static str,
    fresh: ProcMem,
    after_fill: ProcMem,
    after_idle: ProcMem,
    fill_secs: f64,
    /// Seconds after the fill until RSS was first within 2x of `fresh` (if ever).
    within_2x_after_s: Option<f64>,
    /// Seconds the idle poll ran.
    polled_s: f64,
    /// VmRSS in KiB, one sample per second after the fill.
    rss_series_kib: Vec<u64>,
}

/// The hold run's readings (rooms never go idle).
struct HoldRun {
    fresh: ProcMem,
    after_fill: ProcMem,
    fill_secs: f64,
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("error: {name}={v:?} is not a number");
            std::process::exit(2);
        }),
        Err(_) => default,
    }
}

fn selected_configs() -> Vec<&'static MallocConfig> {
    let wanted = std::env::var("ROOMD_IDLE_MALLOC").unwrap_or_else(|_| "default,purge0".to_owned());
    wanted
        .split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .map(|w| {
            MALLOC_CONFIGS
                .iter()
                .find(|c| c.name == w)
                .unwrap_or_else(|| {
                    let names: Vec<&str> = MALLOC_CONFIGS.iter().map(|c| c.name).collect();
                    eprintln!("error: ROOMD_IDLE_MALLOC names {w:?}; known: {names:?}");
                    std::process::exit(2);
                })
        })
        .collect()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn room_id(i: usize) -> String {
    format!("state:idle-{i}")
}

fn main() {
    let bin = support::roomd_release_bin();
    let rooms = env_usize("ROOMD_IDLE_ROOMS", DEFAULT_ROOMS);
    let hold = env_usize("ROOMD_IDLE_HOLD", 1) != 0;
    let tmp = tempfile::tempdir().expect("a temporary directory can be created");
    let load_before = support::loadavg();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");

    let mut runs = Vec::new();
    for config in selected_configs() {
        runs.push(idle_run(&bin, tmp.path(), config, rooms, &runtime));
    }
    let hold_run = hold.then(|| hold_run(&bin, tmp.path(), rooms, &runtime));
    let load_after = support::loadavg();
    report(rooms, &runs, hold_run.as_ref(), &load_before, &load_after);

    if selected_configs().iter().any(|c| c.name == "stats") {
        let log = std::fs::read_to_string(tmp.path().join("server.stderr")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        println!("store writer lines of the server log (`ROOMD_LOG=info,roomd::store=debug`):");
        for line in lines.iter().filter(|l| l.contains("roomd::store::writer")) {
            println!("  {line}");
        }
        println!("end of the server log (mimalloc statistics):");
        for line in &lines[lines.len().saturating_sub(60)..] {
            println!("  {line}");
        }
    }

    let (n_problems, first) = support::log_problems(&tmp.path().join("server.stderr"), 5);
    if n_problems > 0 {
        println!("server log: {n_problems} WARN/ERROR lines, first ones:");
        for line in first {
            println!("  {line}");
        }
    }
}

fn server_args(room_idle: &str) -> Vec<String> {
    [
        "--room-idle",
        room_idle,
        "--op-rate",
        "1000000",
        "--op-burst",
        "1000000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn mem(server: &Server) -> ProcMem {
    proc_mem(server.pid()).expect("the server's /proc/PID/status is readable")
}

fn idle_run(
    bin: &Path,
    tmp: &Path,
    config: &MallocConfig,
    rooms: usize,
    runtime: &tokio::runtime::Runtime,
) -> IdleRun {
    let data_dir = tmp.join(config.name);
    let envs: Vec<(String, String)> = config
        .env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let server = Server::start_with_env(
        bin,
        &data_dir,
        &server_args(ROOM_IDLE),
        &envs,
        &tmp.join("server.stderr"),
    );
    std::thread::sleep(FRESH_WAIT);
    let fresh = mem(&server);

    let fill_started = Instant::now();
    runtime.block_on(fill(server.addr, rooms));
    let fill_secs = fill_started.elapsed().as_secs_f64();
    let after_fill = mem(&server);
    eprintln!(
        "{}: fresh {:.1} MiB, {rooms} rooms in {fill_secs:.1} s, right after {:.1} MiB \
         (peak {:.1})",
        config.name,
        mib(fresh.rss_kib),
        mib(after_fill.rss_kib),
        mib(after_fill.hwm_kib)
    );

    let poll_min = Duration::from_secs(env_usize("ROOMD_IDLE_POLL_MIN_S", IDLE_POLL_MIN_S) as u64);
    let polled = Instant::now();
    let mut series = Vec::new();
    let mut within_2x_after_s = None;
    let after_idle = loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = mem(&server);
        series.push(now.rss_kib);
        let t = polled.elapsed();
        if within_2x_after_s.is_none() && now.rss_kib <= 2 * fresh.rss_kib {
            within_2x_after_s = Some(t.as_secs_f64());
        }
        let stable = series.len() >= STABLE_SAMPLES && {
            let last = &series[series.len() - STABLE_SAMPLES..];
            let (lo, hi) = (last.iter().min().unwrap(), last.iter().max().unwrap());
            (hi - lo) as f64 <= 0.01 * *hi as f64
        };
        if t >= IDLE_POLL_MAX || (t >= poll_min && stable) {
            break now;
        }
    };
    let polled_s = polled.elapsed().as_secs_f64();
    if let Ok(dir) = std::env::var("ROOMD_IDLE_SMAPS") {
        let to = Path::new(&dir).join(format!("{}.smaps", config.name));
        let from = format!("/proc/{}/smaps", server.pid());
        if let Err(e) = std::fs::copy(&from, &to) {
            eprintln!("cannot copy {from} to {}: {e}", to.display());
        }
    }
    eprintln!(
        "{}: after {polled_s:.0} s idle {:.1} MiB (anon {:.1}), threads {}",
        config.name,
        mib(after_idle.rss_kib),
        mib(after_idle.anon_kib),
        after_idle.threads
    );

    // A stopped room reloads on access with what it had.
    let last = room_id(rooms - 1);
    let resp = support::http_get(server.addr, &format!("/api/rooms/{last}"), REPLY_TIMEOUT)
        .expect("the server answers a GET");
    assert_eq!(resp.status, 200, "GET {last} after idle");
    assert_eq!(
        resp.json()["seq"].as_u64(),
        Some(2),
        "{last} came back wrong"
    );

    let (status, _) = server.terminate(STOP_TIMEOUT);
    assert_eq!(status.code(), Some(0), "roomd must exit 0 after SIGTERM");
    IdleRun {
        name: config.name,
        fresh,
        after_fill,
        after_idle,
        fill_secs,
        within_2x_after_s,
        polled_s,
        rss_series_kib: series,
    }
}

fn hold_run(bin: &Path, tmp: &Path, rooms: usize, runtime: &tokio::runtime::Runtime) -> HoldRun {
    let server = Server::start(
        bin,
        &tmp.join("hold"),
        &server_args("1h"),
        &tmp.join("server.stderr"),
    );
    std::thread::sleep(FRESH_WAIT);
    let fresh = mem(&server);
    let fill_started = Instant::now();
    runtime.block_on(fill(server.addr, rooms));
    let fill_secs = fill_started.elapsed().as_secs_f64();
    // Let the blocking pool's idle threads exit, so their stacks do not count.
    std::thread::sleep(Duration::from_secs(12));
    let after_fill = mem(&server);
    eprintln!(
        "hold: fresh {:.1} MiB, {rooms} rooms loaded {:.1} MiB (anon {:.1})",
        mib(fresh.rss_kib),
        mib(after_fill.rss_kib),
        mib(after_fill.anon_kib)
    );
    let (status, _) = server.terminate(STOP_TIMEOUT);
    assert_eq!(status.code(), Some(0), "roomd must exit 0 after SIGTERM");
    HoldRun {
        fresh,
        after_fill,
        fill_secs,
    }
}

/// Creates and touches `rooms` rooms over `CONNECTIONS` connections.
async fn fill(addr: SocketAddr, rooms: usize) {
    let mut tasks = Vec::new();
    for conn in 0..CONNECTIONS {
        let ids: Vec<usize> = (conn..rooms).step_by(CONNECTIONS).collect();
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?user=idle{conn}"))
            .await
            .expect("the server accepts a WebSocket");
        tasks.push(tokio::spawn(fill_connection(ws, ids)));
    }
    for task in tasks {
        task.await.expect("a fill task does not panic");
    }
}

/// Per room: `create`, then one `set` once the create is acked; at most
/// `ROOMS_IN_FLIGHT` rooms between their create and the set's ack.
async fn fill_connection(
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    ids: Vec<usize>,
) {
    let (mut sink, mut stream) = ws.split();
    // Frames to send; the receiver decides what comes next, the sender writes it.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let sender = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            sink.send(Message::text(frame))
                .await
                .expect("the server accepts a frame");
        }
        sink
    });
    let create = |i: usize| {
        json!({"t": "create", "id": format!("c{i}"), "room": room_id(i), "kind": "state",
               "init": {}})
        .to_string()
    };
    let set = |i: usize| {
        json!({"t": "op", "id": format!("s{i}"), "room": room_id(i),
               "op": {"type": "set", "key": "touched", "value": i}})
        .to_string()
    };
    let mut next = 0;
    while next < ids.len().min(ROOMS_IN_FLIGHT) {
        tx.send(create(ids[next])).expect("the sender runs");
        next += 1;
    }
    let mut done = 0;
    // Creates acked, by op id, so a stray ack is noticed.
    let mut created: HashMap<String, ()> = HashMap::new();
    while done < ids.len() {
        let frame = support::next_json(&mut stream, REPLY_TIMEOUT).await;
        match frame["t"].as_str() {
            Some("ack") => {
                let id = frame["id"].as_str().unwrap_or("");
                let room: usize = id[1..].parse().expect("acks carry our op ids");
                if id.starts_with('c') {
                    created.insert(id.to_string(), ());
                    tx.send(set(room)).expect("the sender runs");
                } else {
                    assert!(
                        created.remove(&format!("c{room}")).is_some(),
                        "set before create"
                    );
                    done += 1;
                    if next < ids.len() {
                        tx.send(create(ids[next])).expect("the sender runs");
                        next += 1;
                    }
                }
            }
            Some("nack") | Some("error") => panic!("fill refused: {frame}"),
            _ => {}
        }
    }
    drop(tx);
    let sink = sender.await.expect("the sender does not panic");
    let mut ws = sink
        .reunite(stream)
        .expect("both halves come from the same socket");
    let _ = ws.close(None).await;
}

fn report(
    rooms: usize,
    runs: &[IdleRun],
    hold: Option<&HoldRun>,
    load_before: &str,
    load_after: &str,
) {
    println!(
        "idle_memory: {rooms} state rooms (create + 1 set), --room-idle {ROOM_IDLE}; VmRSS MiB \
         (RssAnon); loadavg before {load_before}, after {load_after}"
    );
    println!(
        "{:<13}{:>17}{:>17}{:>9}{:>17}{:>11}{:>10}{:>8}",
        "malloc", "fresh", "after_fill", "peak", "after_idle", "idle/fresh", "<=2x_at_s", "fill_s"
    );
    let pair = |m: &ProcMem| format!("{:.1} ({:.1})", mib(m.rss_kib), mib(m.anon_kib));
    let mut json_runs = serde_json::Map::new();
    for r in runs {
        let ratio = r.after_idle.rss_kib as f64 / r.fresh.rss_kib as f64;
        println!(
            "{:<13}{:>17}{:>17}{:>9.1}{:>17}{:>11.2}{:>10}{:>8.1}",
            r.name,
            pair(&r.fresh),
            pair(&r.after_fill),
            mib(r.after_fill.hwm_kib),
            pair(&r.after_idle),
            ratio,
            r.within_2x_after_s
                .map_or("never".to_string(), |s| format!("{s:.0}")),
            r.fill_secs
        );
        json_runs.insert(
            r.name.to_string(),
            json!({
                "fresh_rss_mib": r2(mib(r.fresh.rss_kib)),
                "fresh_anon_mib": r2(mib(r.fresh.anon_kib)),
                "after_fill_rss_mib": r2(mib(r.after_fill.rss_kib)),
                "after_fill_anon_mib": r2(mib(r.after_fill.anon_kib)),
                "peak_rss_mib": r2(mib(r.after_fill.hwm_kib)),
                "after_idle_rss_mib": r2(mib(r.after_idle.rss_kib)),
                "after_idle_anon_mib": r2(mib(r.after_idle.anon_kib)),
                "idle_over_fresh": r2(ratio),
                "within_2x_after_s": r.within_2x_after_s.map(r2),
                "polled_s": r2(r.polled_s),
                "fill_s": r2(r.fill_secs),
                "rss_series_mib": r.rss_series_kib.iter().map(|k| r2(mib(*k))).collect::<Vec<_>>(),
            }),
        );
    }
    let hold_json = hold.map(|h| {
        let per_room_anon =
            (h.after_fill.anon_kib as f64 - h.fresh.anon_kib as f64) * 1024.0 / rooms as f64;
        let per_room_rss =
            (h.after_fill.rss_kib as f64 - h.fresh.rss_kib as f64) * 1024.0 / rooms as f64;
        println!(
            "hold (--room-idle 1h, all {rooms} rooms loaded): fresh {} -> {} MiB: {:.0} B \
             RSS / {:.0} B anon per loaded room (fill {:.1} s)",
            pair(&h.fresh),
            pair(&h.after_fill),
            per_room_rss,
            per_room_anon,
            h.fill_secs
        );
        json!({
            "fresh_rss_mib": r2(mib(h.fresh.rss_kib)),
            "loaded_rss_mib": r2(mib(h.after_fill.rss_kib)),
            "loaded_anon_mib": r2(mib(h.after_fill.anon_kib)),
            "rss_bytes_per_room": per_room_rss.round(),
            "anon_bytes_per_room": per_room_anon.round(),
            "fill_s": r2(h.fill_secs),
        })
    });
    println!(
        "{}",
        json!({"bench": "idle_memory", "rooms": rooms, "room_idle": ROOM_IDLE,
               "loadavg_before": load_before, "loadavg_after": load_after,
               "runs": json_runs, "hold": hold_json})
    );
}
