//! `roomd bench`: the load generator. It measures a roomd it starts itself (the current
//! executable on `127.0.0.1:0` with a temporary data dir), a running roomd (`--url`), or
//! a peer broadcast server (`fanout --target ws|socketio`), and prints a table or, with
//! `--json`, one JSON object on stdout.
//!
//! Codemap: `fanout`, `ingest`, `connections` and `views` are the scenarios, each
//! returning a `report::Report`; `server` starts and stops the local roomd; `proc_stats`
//! reads a server's CPU time and RSS from /proc; `client` opens WebSocket connections
//! (from a chosen 127.0.0.x source address when asked); `progress` draws the bar on
//! stderr.
//!
//! Architecture invariant: the generator shares the machine with the server, so the hot
//! paths (a subscriber reading a frame, a writer reading an ack) never parse a whole JSON
//! document; only setup frames are parsed fully. Nothing here touches a non-loopback
//! address unless `--url` names one.

mod client;
mod connections;
mod fanout;
mod fd_limit;
mod ingest;
mod proc_stats;
mod progress;
mod report;
mod server;
mod views;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

pub use connections::ConnectionsArgs;
pub use fanout::{FanoutArgs, Target};
pub use ingest::IngestArgs;
pub use views::ViewsArgs;

/// Flags of `roomd bench`; the global ones may come before or after the scenario.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub scenario: Scenario,

    /// Base URL of a running server (`ws://127.0.0.1:8080`) instead of starting one. The
    /// scenario adds the path (`/ws` for roomd, `/socket.io/` for Socket.IO).
    #[arg(long, global = true)]
    pub url: Option<String>,

    /// PID of the server behind --url, so its CPU time and RSS are read from /proc (the
    /// server must run on this machine).
    #[arg(long, global = true)]
    pub server_pid: Option<u32>,

    /// Print one JSON object on stdout instead of a table.
    #[arg(long, global = true)]
    pub json: bool,

    /// Extra flag for the server this command starts, e.g. `--server-arg=--durability=none`
    /// (repeatable). `--op-rate` and `--op-burst` given here replace the raised defaults.
    #[arg(long = "server-arg", global = true, allow_hyphen_values = true)]
    pub server_args: Vec<String>,

    /// Tokio worker threads of the generator (it shares the cores with the server).
    #[arg(long, global = true, default_value_t = 2)]
    pub threads: usize,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Scenario {
    /// N subscribers over K chat rooms; one publisher posts R messages/s; reports
    /// deliveries/s, end-to-end latency, loss and duplication, and the server's cost.
    Fanout(FanoutArgs),
    /// W connections pipelining `state` `set` ops (N in flight each) over K rooms;
    /// reports acked ops/s and ack latency.
    Ingest(IngestArgs),
    /// Opens N idle connections; reports the connect rate and the server's RSS per
    /// connection.
    Connections(ConnectionsArgs),
    /// Two players and N spectators in an `rps` room (per-viewer entries) and a `state`
    /// room, written in turn at the same rate; reports deliveries/s of each and their
    /// ratio. Needs a server that serves kind `rps`: run it as
    /// `target/release/examples/rps bench views`.
    Views(ViewsArgs),
}

/// Why a bench could not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot find the roomd executable to start: {0}")]
    CurrentExe(std::io::Error),
    #[error("cannot start the server {exe}: {source}")]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("the server did not print `roomd listening on ADDR` within {timeout:?} (stdout {line:?}); its log: {log}")]
    ServerStart {
        timeout: Duration,
        line: String,
        log: PathBuf,
    },
    #[error("cannot create the temporary data dir {path}: {source}")]
    TempDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad --url `{url}`: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("--target {0} needs --url: roomd bench starts only roomd itself (benches/peers/run.sh starts the peers)")]
    UrlRequired(&'static str),
    #[error("--rooms {0} with --target {1}: the peer servers serve a single room")]
    PeerRooms(usize, &'static str),
    #[error("{what} must be at least 1")]
    Zero { what: &'static str },
    #[error("connecting {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{0}")]
    Protocol(String),
    #[error("timed out after {0:?} while {1}")]
    Timeout(Duration, String),
    #[error("{connections} connections need about {needed} file descriptors but RLIMIT_NOFILE allows {soft} (hard limit {hard}); raise it with `ulimit -Hn {needed}` as root, or ask for fewer")]
    FileLimit {
        connections: usize,
        needed: libc::rlim_t,
        soft: libc::rlim_t,
        hard: libc::rlim_t,
    },
    #[error("cannot build the tokio runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{what} failed: {reason}")]
    Send { what: &'static str, reason: String },
}

/// Records the host's 1-minute load average: the generator and the server share the
/// cores, so anything else running shows in every number, and the report says so.
fn note_host_load(report: &mut report::Report) {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<f64>().ok());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    report.field("host_cores", cores);
    let Some(load) = load else {
        return;
    };
    report.field("host_load_1m", report::round(load, 2));
    report.row("host load (1 min) / cores", format!("{load:.2} / {cores}"));
    // The generator and the server together keep about `cores` threads busy at most.
    if load > cores as f64 + 1.0 {
        report.note(format!(
            "the host's load average was {load:.2} on {cores} cores: other processes \
             competed for CPU, so latencies and rates are pessimistic"
        ));
    }
}

/// Runs one scenario and prints its report (table on stdout, or JSON with `--json`).
pub fn run(args: BenchArgs) -> Result<(), BenchError> {
    if args.threads == 0 {
        return Err(BenchError::Zero { what: "--threads" });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .thread_name("bench")
        .build()
        .map_err(BenchError::Runtime)?;
    let mut report = match &args.scenario {
        Scenario::Fanout(scenario) => fanout::run(&args, scenario, &runtime)?,
        Scenario::Ingest(scenario) => ingest::run(&args, scenario, &runtime)?,
        Scenario::Connections(scenario) => connections::run(&args, scenario, &runtime)?,
        Scenario::Views(scenario) => views::run(&args, scenario, &runtime)?,
    };
    // The scenario has stopped its server; tasks still holding a connection (the
    // publisher's reply reader) end with the runtime.
    drop(runtime);
    note_host_load(&mut report);
    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
