//! `roomd bench connections`: opens N idle connections (each waits for `welcome`) and
//! reports the connect rate and what each connection costs the server in RSS.
//!
//! One source address has about 28,000 ephemeral ports toward one server port, so on
//! loopback the connections are spread over 127.0.0.2, 127.0.0.3, … (`--per-source`
//! each), binding the client socket before connecting (with IP_BIND_ADDRESS_NO_PORT, so
//! the port is chosen at connect time). Idle connections still read, so
//! tungstenite answers the server's heartbeat pings and nothing is closed with 4008.

use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt;
use tokio::runtime::Runtime;
use tokio::sync::watch;

use super::client::{self, ConnectOptions, Ws};
use super::proc_stats::ProcSample;
use super::report::{self, Report};
use super::server::Endpoint;
use super::{fd_limit, progress, BenchArgs, BenchError};
use crate::config::parse_duration;

/// Flags of `roomd bench connections`.
#[derive(Args, Debug, Clone)]
pub struct ConnectionsArgs {
    /// Connections to open and hold.
    #[arg(long, default_value_t = 10_000)]
    pub count: usize,

    /// Connections set up at the same time.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,

    /// Connections per loopback source address (127.0.0.2, 127.0.0.3, …). Kept well
    /// below the ~28,000 ephemeral ports of an address: the kernel's search for a free
    /// port (`__inet_check_established`) slows down as the range fills, and at 20,000
    /// per address it was 40% of the generator's CPU.
    #[arg(long, default_value_t = 4_000)]
    pub per_source: usize,

    /// How long the connections stay open after the last one before the server's RSS
    /// is read.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub settle: Duration,

    /// Each connection also subscribes to one shared `state` room (created first) and
    /// waits for its snapshot, so the RSS per connection includes a subscription.
    #[arg(long)]
    pub subscribe: bool,
}

const QUANTILES: [(&str, f64); 3] = [("p50", 0.50), ("p99", 0.99), ("max", 1.0)];

pub fn run(
    args: &BenchArgs,
    connections: &ConnectionsArgs,
    runtime: &Runtime,
) -> Result<Report, BenchError> {
    for (what, value) in [
        ("--count", connections.count),
        ("--concurrency", connections.concurrency),
        ("--per-source", connections.per_source),
    ] {
        if value == 0 {
            return Err(BenchError::Zero { what });
        }
    }
    fd_limit::ensure_for(connections.count)?;
    let endpoint = Endpoint::open(args)?;
    let outcome = runtime.block_on(drive(&endpoint, connections));

    let mut r = Report::new(
        "connections",
        format!("connections: {} idle connections", connections.count),
    );
    let per_s = outcome.connected as f64 / outcome.connect_time.as_secs_f64().max(1e-9);
    r.row(
        "connected",
        format!(
            "{} of {} in {:.2} s ({} failed)",
            outcome.connected,
            connections.count,
            outcome.connect_time.as_secs_f64(),
            outcome.failed
        ),
    );
    r.row("connect rate", format!("{}/s", report::si(per_s)));
    r.row(
        "connect time",
        report::latency_row(&outcome.histogram, &QUANTILES),
    );
    r.field("count", connections.count);
    r.field("subscribed", connections.subscribe);
    r.field("connected", outcome.connected);
    r.field("failed", outcome.failed);
    r.field("connect_per_s", report::round(per_s, 1));
    r.field(
        "connect_ms",
        report::latency_json(&outcome.histogram, &QUANTILES),
    );
    r.field("source_addresses", outcome.sources);
    match (&outcome.server_before, &outcome.server_after) {
        (Some(before), Some(after)) => {
            let grown_kb = (after.rss_mb - before.rss_mb) * 1024.0;
            let per_conn = grown_kb / outcome.connected.max(1) as f64;
            r.row(
                "server RSS",
                format!("{:.1} MiB idle -> {:.1} MiB", before.rss_mb, after.rss_mb),
            );
            r.row("server RSS per connection", format!("{per_conn:.1} KiB"));
            r.row(
                "server CPU for the connects",
                format!("{:.2} s", after.cpu_s - before.cpu_s),
            );
            r.field("server_rss_mb_before", report::round(before.rss_mb, 1));
            r.field("server_rss_mb", report::round(after.rss_mb, 1));
            r.field("server_rss_kb_per_connection", report::round(per_conn, 2));
            r.field("server_cpu_s", report::round(after.cpu_s - before.cpu_s, 3));
        }
        _ => r.row(
            "server RSS",
            "unknown (server PID not known; see --server-pid)",
        ),
    }
    if let (Some(before), Some(after)) = (&outcome.generator_before, &outcome.generator_after) {
        r.row(
            "generator CPU / RSS",
            format!(
                "{:.2} s / {:.1} MiB",
                after.cpu_s - before.cpu_s,
                after.rss_mb
            ),
        );
        r.field(
            "generator_cpu_s",
            report::round(after.cpu_s - before.cpu_s, 3),
        );
        r.field("generator_rss_mb", report::round(after.rss_mb, 1));
    }
    if let Some(error) = outcome.first_error {
        r.note(format!(
            "{} connections failed, first: {error}",
            outcome.failed
        ));
    }
    endpoint.note_log_problems(&mut r);
    Ok(r)
}

struct Outcome {
    connected: usize,
    failed: usize,
    first_error: Option<String>,
    connect_time: Duration,
    histogram: hdrhistogram::Histogram<u64>,
    /// Distinct source addresses used (0: the kernel chose).
    sources: usize,
    server_before: Option<ProcSample>,
    server_after: Option<ProcSample>,
    generator_before: Option<ProcSample>,
    generator_after: Option<ProcSample>,
}

async fn drive(endpoint: &Endpoint, args: &ConnectionsArgs) -> Outcome {
    // Let the server finish starting up before its baseline RSS is read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server_before = endpoint.sample();
    let generator_before = ProcSample::read(std::process::id());
    let spread = endpoint.addr.ip().is_loopback();
    let (stop_tx, stop_rx) = watch::channel(false);
    // The shared room, created before the clock starts; its creator stays connected.
    let mut shared_room = None;
    let mut _creator = None;
    if args.subscribe {
        match create_shared_room(endpoint).await {
            Ok((ws, room)) => {
                _creator = Some(ws);
                shared_room = Some(room);
            }
            Err(e) => eprintln!("roomd bench: cannot create the shared room: {e}"),
        }
    }
    let subscribe_to: Option<std::sync::Arc<str>> = shared_room.map(std::sync::Arc::from);

    let bar = progress::bar("connecting", args.count as u64, "conns");
    let started = Instant::now();
    let addr = endpoint.addr;
    // Each attempt is its own task so handshakes run on every worker thread, not only
    // on the thread that drives this loop.
    let mut attempts = futures_util::stream::iter(0..args.count)
        .map(|i| {
            let options = ConnectOptions {
                read_buffer: 4 * 1024,
                write_buffer: 0,
                source: spread.then(|| client::loopback_source(i, args.per_source)),
                subprotocol: None,
            };
            let url = endpoint.url(&format!("/ws?user=c{i}"));
            let subscribe_to = subscribe_to.clone();
            tokio::spawn(async move {
                let began = Instant::now();
                let mut ws = client::connect(addr, &url, options).await?;
                let welcome = client::next_text(&mut ws, "welcome").await?;
                if !welcome.as_str().contains("\"welcome\"") {
                    return Err(BenchError::Protocol(format!(
                        "expected welcome, got {}",
                        welcome.as_str()
                    )));
                }
                if let Some(room) = subscribe_to {
                    let sub = format!(r#"{{"t":"sub","room":"{room}"}}"#);
                    client::send_text(&mut ws, sub, "sub").await?;
                    let reply = client::next_text(&mut ws, "snapshot").await?;
                    if !reply.as_str().contains("\"snapshot\"") {
                        return Err(BenchError::Protocol(format!(
                            "expected a snapshot, got {}",
                            reply.as_str()
                        )));
                    }
                }
                Ok((ws, began.elapsed()))
            })
        })
        .buffer_unordered(args.concurrency);
    let mut histogram = report::latency_histogram();
    let mut holders = Vec::with_capacity(args.count);
    let (mut failed, mut first_error) = (0, None);
    while let Some(attempt) = attempts.next().await {
        let attempt = attempt
            .unwrap_or_else(|e| Err(BenchError::Protocol(format!("a connect task failed: {e}"))));
        match attempt {
            Ok((ws, took)) => {
                histogram.saturating_record((took.as_micros() as u64).max(1));
                holders.push(tokio::spawn(hold(ws, stop_rx.clone())));
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
        bar.inc(1);
    }
    drop(attempts);
    let connect_time = started.elapsed();
    bar.finish_and_clear();
    eprintln!(
        "roomd bench: {} connections open in {:.1} s; holding them {:?}",
        holders.len(),
        connect_time.as_secs_f64(),
        args.settle
    );
    tokio::time::sleep(args.settle).await;
    let server_after = endpoint.sample();
    let generator_after = ProcSample::read(std::process::id());

    let _ = stop_tx.send(true);
    let connected = holders.len();
    for holder in holders {
        let _ = holder.await;
    }
    Outcome {
        connected,
        failed,
        first_error,
        connect_time,
        histogram,
        sources: if spread {
            args.count.div_ceil(args.per_source)
        } else {
            0
        },
        server_before,
        server_after,
        generator_before,
        generator_after,
    }
}

/// Opens a connection that creates the `state` room every connection subscribes to.
async fn create_shared_room(endpoint: &Endpoint) -> Result<(Ws, String), BenchError> {
    let room = format!(
        "state:conns-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let url = endpoint.url("/ws?user=bench-creator");
    let mut ws = client::connect(endpoint.addr, &url, ConnectOptions::receiver()).await?;
    client::next_text(&mut ws, "welcome").await?;
    let create =
        format!(r#"{{"t":"create","id":"c1","room":"{room}","kind":"state","init":{{}}}}"#);
    client::send_text(&mut ws, create, "create").await?;
    let reply = client::next_text(&mut ws, "the ack of the create").await?;
    if !reply.as_str().contains("\"ack\"") {
        return Err(BenchError::Protocol(format!(
            "creating the shared room failed: {}",
            reply.as_str()
        )));
    }
    Ok((ws, room))
}

/// Keeps a connection open and read (so pings are answered) until told to stop.
async fn hold(mut ws: Ws, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            message = ws.next() => {
                if !matches!(message, Some(Ok(_))) {
                    return;
                }
            }
        }
    }
}
