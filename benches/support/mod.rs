//! What both benches share: starting and stopping the release `roomd` binary on a
//! loopback port, a tiny blocking HTTP/1.1 client, a mirror of a room's entries, and
//! summary statistics.
//!
//! Nothing here depends on the roomd library: the benches speak the wire contract
//! (`PROTOCOL.md`) in literal JSON, like any outside client. Each bench measures its own
//! cost; this module only owns the plumbing.

// Each bench uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a freshly spawned server may take to print its listening line.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The release binary, built beforehand with `cargo build --release`.
///
/// Benches never build it themselves: `cargo bench` compiles the bench, not the binary's
/// release profile, and a stale or debug binary would measure the wrong thing silently.
pub fn roomd_release_bin() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/roomd");
    if !path.is_file() {
        eprintln!(
            "error: {} is missing; run `cargo build --release` first (the bench times the \
             release binary and does not build it)",
            path.display()
        );
        std::process::exit(2);
    }
    path
}

/// Raises the soft RLIMIT_NOFILE to at least `wanted` (capped by the hard limit), so
/// this process and the server it spawns (which inherits the limit) can hold a socket
/// per connection. Returns the resulting soft limit.
pub fn raise_nofile(wanted: libc::rlim_t) -> libc::rlim_t {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own and reports failure by return value.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    if limit.rlim_cur < wanted {
        let raised = libc::rlimit {
            rlim_cur: wanted.min(limit.rlim_max),
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct; failure leaves the old limit in place.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    limit.rlim_cur
}

/// A running `roomd serve` on 127.0.0.1:0. Killed (SIGKILL) on drop if still running.
pub struct Server {
    pub addr: SocketAddr,
    child: Child,
    /// When `spawn` was called: the zero of every startup measurement.
    pub spawned_at: Instant,
    /// When the `roomd listening on` line was read from stdout.
    pub listening_at: Instant,
}

impl Server {
    /// Spawns the binary with `--bind 127.0.0.1:0 --data-dir DATA ARGS`, appending its
    /// stderr to `log`, and waits for the listening line.
    pub fn start(bin: &Path, data_dir: &Path, args: &[String], log: &Path) -> Server {
        Server::start_with_env(bin, data_dir, args, &[], log)
    }

    /// `start` with extra environment variables for the server process (e.g. glibc
    /// malloc tunables such as `MALLOC_ARENA_MAX`).
    pub fn start_with_env(
        bin: &Path,
        data_dir: &Path,
        args: &[String],
        envs: &[(String, String)],
        log: &Path,
    ) -> Server {
        let log = File::options()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open the server log {}: {e}", log.display()));
        let spawned_at = Instant::now();
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--bind")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            // Plain log lines, so `log_problems` can grep them.
            .env("NO_COLOR", "1")
            .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("stdout was piped above");
        let (line_tx, line_rx) = mpsc::channel();
        // Reads the listening line, stamps it, then drains stdout so the server never
        // blocks on a full pipe.
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let read = reader.read_line(&mut line);
            let _ = line_tx.send((read.map(|n| n > 0).unwrap_or(false), line, Instant::now()));
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let (ok, line, listening_at) = match line_rx.recv_timeout(START_TIMEOUT) {
            Ok(got) => got,
            Err(_) => {
                let _ = child.kill();
                panic!("roomd printed no listening line within {START_TIMEOUT:?}");
            }
        };
        let addr = line
            .trim_end()
            .strip_prefix("roomd listening on ")
            .filter(|_| ok)
            .and_then(|a| a.parse::<SocketAddr>().ok());
        let Some(addr) = addr else {
            let _ = child.kill();
            let status = child.wait();
            panic!("roomd did not start (stdout {line:?}, exit {status:?}); see its log");
        };
        assert!(addr.ip().is_loopback(), "roomd must listen on loopback");
        Server {
            addr,
            child,
            spawned_at,
            listening_at,
        }
    }

    /// The server's process id (for `/proc/PID/status`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn ws_url(&self, user: &str) -> String {
        format!("ws://{}/ws?user={user}", self.addr)
    }

    /// Sends SIGTERM and waits for the exit; returns the status and how long it took.
    pub fn terminate(mut self, timeout: Duration) -> (ExitStatus, Duration) {
        let asked = Instant::now();
        // SAFETY: kill(2) on our own child's pid; the child is not reaped yet, so the pid
        // cannot have been reused.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let status = self.wait(timeout);
        (status, asked.elapsed())
    }

    /// SIGKILL, then reap.
    pub fn kill9(mut self) -> ExitStatus {
        let _ = self.child.kill();
        self.child.wait().expect("a killed child can be reaped")
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("the child can be polled") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("roomd did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One HTTP response: status and body (de-chunked).
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A blocking `GET` with `Connection: close` (one request per TCP connection, so the
/// response ends at EOF).
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of HTTP headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    let body = &raw[split + 4..];
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_vec()
    };
    Ok(HttpResponse { status, body })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            break;
        };
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

/// A client's copy of one room, kept from `snapshot` and `diff` frames.
#[derive(Default)]
pub struct Mirror {
    pub epoch: String,
    /// The `seq` of the snapshot or the `to` of the last diff applied.
    pub seq: u64,
    pub entries: BTreeMap<String, Value>,
    /// Diffs whose `from` was not `seq + 1` or whose epoch differed (contract breaks).
    pub gaps: u64,
}

impl Mirror {
    pub fn from_snapshot(frame: &Value) -> Mirror {
        let mut mirror = Mirror {
            epoch: frame["epoch"].as_str().unwrap_or("").to_string(),
            seq: frame["seq"].as_u64().unwrap_or(0),
            ..Mirror::default()
        };
        mirror.apply_entries(&frame["entries"]);
        mirror
    }

    /// Applies a `diff` for this room.
    pub fn apply_diff(&mut self, frame: &Value) {
        let from = frame["from"].as_u64().unwrap_or(0);
        if from != self.seq + 1 || frame["epoch"].as_str() != Some(self.epoch.as_str()) {
            self.gaps += 1;
        }
        self.seq = frame["to"].as_u64().unwrap_or(self.seq);
        self.apply_entries(&frame["changes"]);
    }

    fn apply_entries(&mut self, list: &Value) {
        for entry in list.as_array().into_iter().flatten() {
            let Some(key) = entry["k"].as_str() else {
                continue;
            };
            if entry["del"].as_bool() == Some(true) {
                self.entries.remove(key);
            } else {
                self.entries.insert(key.to_string(), entry["v"].clone());
            }
        }
    }

    pub fn int(&self, key: &str) -> i64 {
        self.entries.get(key).and_then(Value::as_i64).unwrap_or(0)
    }
}

/// The `q`-quantile (0..=1) of `sorted` by nearest rank; 0 for an empty slice.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sorts a copy of `values`.
pub fn sorted(values: &[f64]) -> Vec<f64> {
    let mut values = values.to_vec();
    values.sort_by(f64::total_cmp);
    values
}

/// Median (mean of the middle two for an even count); 0 for an empty slice.
pub fn median(values: &[f64]) -> f64 {
    let s = sorted(values);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Milliseconds, for tables and JSON.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Rounds to 0.01 so the JSON line stays short.
pub fn r2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The server log's WARN and ERROR lines (at most `max`), and how many there were.
pub fn log_problems(log: &Path, max: usize) -> (usize, Vec<String>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    let first = problems.iter().take(max).map(|s| s.to_string()).collect();
    (problems.len(), first)
}

/// A process's memory as `/proc/PID/status` reports it, in KiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcMem {
    /// VmRSS: resident set (anon + file + shmem).
    pub rss_kib: u64,
    /// RssAnon: resident anonymous memory (heap, stacks): what the server allocated.
    pub anon_kib: u64,
    /// RssFile: resident file-backed pages (mostly the binary's own text and debug info).
    pub file_kib: u64,
    /// VmHWM: peak VmRSS so far.
    pub hwm_kib: u64,
    /// Threads.
    pub threads: u64,
}

/// Reads `/proc/PID/status`; `None` when the process is gone or the file is unreadable.
pub fn proc_mem(pid: u32) -> Option<ProcMem> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut mem = ProcMem::default();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(value) = value.parse::<u64>() else {
            continue;
        };
        match key {
            "VmRSS:" => mem.rss_kib = value,
            "RssAnon:" => mem.anon_kib = value,
            "RssFile:" => mem.file_kib = value,
            "VmHWM:" => mem.hwm_kib = value,
            "Threads:" => mem.threads = value,
            _ => {}
        }
    }
    Some(mem)
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`), e.g. `"1.52 1.10 0.90"`, so
/// numbers taken on a shared machine carry the load they were taken under.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The next text frame as JSON (Null when it does not parse), skipping other frames.
/// Fails the bench if the server does not answer within `timeout` or the connection ends.
pub async fn next_json<S>(stream: &mut S, timeout: Duration) -> Value
where
    S: futures_util::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    use futures_util::StreamExt;
    loop {
        let message = tokio::time::timeout(timeout, stream.next())
            .await
            .expect("the server answers within the reply timeout")
            .expect("the connection stays open")
            .expect("the connection has no error");
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            return serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
        }
    }
}
