//! Starts the real `roomd` binary on an ephemeral loopback port and talks to it the way an
//! outside client would: a WebSocket client (tokio-tungstenite), raw WebSocket frames over
//! TCP for what a well-behaved library refuses to send, and a tiny HTTP/1.1 client.
//!
//! Tests exchange literal JSON only. Nothing here depends on the roomd library: the wire
//! contract (`/work/shared/PROTOCOL.md`) is the only thing these tests know about.
//! Every wait has a deadline; nothing sleeps and hopes.

#![allow(dead_code)] // Not every test module uses every helper.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// How long a test waits for an expected frame or response before failing.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// How long a test waits for the ack or nack of an op or create: the ack leaves only once
/// the op's batch is durable (log before send), and an fsync of the shared disk of a
/// loaded two-core machine has been seen to take most of a second per commit, so this
/// is longer than [`TIMEOUT`]. Only the wait for a reply gets it; a frame that needs no
/// commit (a snapshot, an error) still has [`TIMEOUT`].
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the server may take to print its listening line (a debug build recovering a
/// store on a busy two-core machine is not instant).
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The nack and error codes of the contract.
pub const NACK_CODES: &[&str] = &[
    "invalid",
    "not_found",
    "exists",
    "forbidden",
    "conflict",
    "closed",
    "rate_limited",
    "too_large",
    "limit",
    "gone",
    "unavailable",
];

/// The build of example `name` next to the `roomd` binary (`target/<profile>/examples`).
fn example_bin(name: &str) -> PathBuf {
    let roomd = roomd_bin();
    let bin = roomd
        .parent()
        .expect("the roomd binary is in a directory")
        .join("examples")
        .join(name);
    assert!(
        bin.exists(),
        "{} is not built: `cargo test` builds it (or `cargo build --example {name}`)",
        bin.display()
    );
    bin
}

pub fn roomd_bin() -> PathBuf {
    // Inside the roomd package cargo sets CARGO_BIN_EXE_roomd; elsewhere (a scratch crate
    // that only compiles these tests) ROOMD_BIN names the binary.
    if let Some(path) = option_env!("CARGO_BIN_EXE_roomd") {
        return PathBuf::from(path);
    }
    std::env::var_os("ROOMD_BIN")
        .map(PathBuf::from)
        .expect("the roomd binary is unknown: build inside the roomd package or set ROOMD_BIN")
}

/// The value of an unlabelled sample `name` in Prometheus text.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| match line.split_once(' ') {
            Some((key, value)) if key == name => value.trim().parse().ok(),
            _ => None,
        })
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis() as i64
}

pub fn now_secs() -> i64 {
    now_ms() / 1000
}

/// An HS256 JWT over `claims`, signed with `secret`.
pub fn jwt(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("a JSON object always encodes as JWT claims")
}

/// A `roomd serve` process on 127.0.0.1 with its own data directory. Killed on drop.
pub struct Server {
    /// The program: the `roomd` binary, or an example built on `roomd::Server`.
    bin: PathBuf,
    /// Where the server listens now; changes on every restart (the port is ephemeral).
    pub addr: SocketAddr,
    /// Flags given after `--bind` and `--data-dir`, reused by `restart`.
    args: Vec<String>,
    /// Environment variables set for the process (test hooks), reused by `restart`.
    env: Vec<(String, String)>,
    data_dir: PathBuf,
    child: Option<Child>,
    /// The server's stderr (its logs), appended across restarts, shown when a test fails.
    log_path: PathBuf,
    _data_tmp: Option<tempfile::TempDir>,
    _log_tmp: tempfile::TempDir,
}

impl Server {
    /// Starts a server on a fresh temporary data directory.
    pub async fn start(args: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("a temporary directory can be created");
        let data_dir = tmp.path().to_path_buf();
        Self::start_inner(data_dir, Some(tmp), args).await
    }

    /// Starts a server on a fresh temporary data directory with `env` set for it (and
    /// for its restarts).
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let tmp = tempfile::tempdir().expect("a temporary directory can be created");
        let mut server = Self::prepare(tmp.path().to_path_buf(), Some(tmp), args);
        server.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        server.spawn().await;
        server
    }

    /// Starts a server on a data directory the test owns (to reuse it afterwards).
    pub async fn start_in(data_dir: &Path, args: &[&str]) -> Server {
        Self::start_inner(data_dir.to_path_buf(), None, args).await
    }

    /// Starts `cargo`'s build of example `name` (a binary built on `roomd::Server`, which
    /// `cargo test` builds) on `data_dir` (a fresh temporary one when None).
    pub async fn start_example(name: &str, data_dir: Option<&Path>, args: &[&str]) -> Server {
        let bin = example_bin(name);
        let mut server = match data_dir {
            Some(dir) => Self::prepare(dir.to_path_buf(), None, args),
            None => {
                let tmp = tempfile::tempdir().expect("a temporary directory can be created");
                Self::prepare(tmp.path().to_path_buf(), Some(tmp), args)
            }
        };
        server.bin = bin;
        server.spawn().await;
        server
    }

    async fn start_inner(
        data_dir: PathBuf,
        data_tmp: Option<tempfile::TempDir>,
        args: &[&str],
    ) -> Server {
        let mut server = Self::prepare(data_dir, data_tmp, args);
        server.spawn().await;
        server
    }

    fn prepare(data_dir: PathBuf, data_tmp: Option<tempfile::TempDir>, args: &[&str]) -> Server {
        let log_tmp = tempfile::tempdir().expect("a temporary directory can be created");
        Server {
            bin: roomd_bin(),
            addr: "127.0.0.1:0".parse().expect("a literal address"),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            data_dir,
            child: None,
            log_path: log_tmp.path().join("roomd.stderr"),
            _data_tmp: data_tmp,
            _log_tmp: log_tmp,
        }
    }

    async fn spawn(&mut self) {
        assert!(
            self.child.is_none(),
            "the previous process is still running"
        );
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("the log file can be opened");
        let mut child = command(&self.bin, "127.0.0.1:0", &self.data_dir, &self.args, log)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .expect("the roomd binary can be spawned");
        let stdout = child.stdout.take().expect("stdout is piped");
        self.child = Some(child);
        let line = tokio::time::timeout(START_TIMEOUT, first_stdout_line(stdout)).await;
        let line = match line {
            Ok(Some(line)) => line,
            Ok(None) => {
                let status = self.wait_exit(Duration::from_secs(5)).await;
                panic!(
                    "roomd exited ({status}) before printing its listening line; stderr:\n{}",
                    self.stderr_tail()
                );
            }
            Err(_) => panic!(
                "roomd printed no listening line within {START_TIMEOUT:?}; stderr:\n{}",
                self.stderr_tail()
            ),
        };
        let addr = line
            .trim_end()
            .strip_prefix("roomd listening on ")
            .unwrap_or_else(|| panic!("unexpected first stdout line {line:?}"));
        self.addr = addr
            .parse()
            .unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"));
        assert!(
            self.addr.ip().is_loopback(),
            "roomd must listen on loopback here"
        );
        assert_ne!(
            self.addr.port(),
            0,
            "the listening line must carry the real port"
        );
    }

    /// Runs `roomd serve --bind BIND --data-dir TMP ARGS` and returns its exit status,
    /// failing the test if it starts listening instead of exiting.
    pub async fn run_expecting_exit(bind: &str, args: &[&str]) -> ExitStatus {
        Self::run_expecting_exit_with_stderr(bind, args).await.0
    }

    /// Like `run_expecting_exit`, also returning what the process wrote to stderr.
    pub async fn run_expecting_exit_with_stderr(bind: &str, args: &[&str]) -> (ExitStatus, String) {
        let tmp = tempfile::tempdir().expect("a temporary directory can be created");
        let log_tmp = tempfile::tempdir().expect("a temporary directory can be created");
        let log_path = log_tmp.path().join("roomd.stderr");
        let log = File::create(&log_path).expect("the log can be created");
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut child = command(&roomd_bin(), bind, tmp.path(), &args, log)
            .spawn()
            .expect("the roomd binary can be spawned");
        let stdout = child.stdout.take().expect("stdout is piped");
        let line = tokio::time::timeout(START_TIMEOUT, first_stdout_line(stdout)).await;
        if let Ok(Some(line)) = line {
            let _ = child.kill();
            let _ = child.wait();
            panic!("roomd started ({line:?}) where it had to refuse to");
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("the child can be polled") {
                return (
                    status,
                    std::fs::read_to_string(&log_path).unwrap_or_default(),
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("roomd neither listened nor exited");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("the server is running").id() as i32
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// `host:port` as a client puts it in the `Host` header.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Resident set size of the server process in KiB (VmRSS from /proc).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/PID/status is readable");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS is in /proc/PID/status")
    }

    /// Sends SIGTERM (graceful shutdown) without waiting.
    pub fn terminate(&self) {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        let rc = unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM could not be sent");
    }

    /// Waits for the process to exit, failing the test after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("the server was running");
        loop {
            if let Some(status) = child.try_wait().expect("the child can be polled") {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "roomd did not exit within {timeout:?}; stderr:\n{}",
                    self.stderr_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL: the process gets no chance to flush anything.
    pub async fn kill9(&mut self) {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        let rc = unsafe { libc::kill(self.pid(), libc::SIGKILL) };
        assert_eq!(rc, 0, "SIGKILL could not be sent");
        self.wait_exit(TIMEOUT).await;
    }

    /// Stops the server gracefully if it runs (SIGTERM), then starts it again on the same
    /// data directory with the same flags. The port changes.
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.terminate();
            let status = self.wait_exit(Duration::from_secs(10)).await;
            assert!(status.success(), "roomd exited with {status} on SIGTERM");
        }
        self.spawn().await;
    }

    /// Everything the server wrote to stderr, across restarts.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn ws_url(&self, query: &str) -> String {
        if query.is_empty() {
            format!("ws://{}/ws", self.addr)
        } else {
            format!("ws://{}/ws?{query}", self.addr)
        }
    }

    /// One HTTP/1.1 request on a fresh connection (`Connection: close`).
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> HttpResponse {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        self.http_raw(method, path, headers, &body).await
    }

    /// One HTTP/1.1 request with `body` sent as it is (for bodies no JSON library writes).
    pub async fn http_raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> HttpResponse {
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\n",
            self.host()
        );
        if method != "GET" {
            request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        let exchange = async {
            let mut stream = TcpStream::connect(self.addr).await.expect("HTTP connect");
            stream
                .write_all(request.as_bytes())
                .await
                .expect("HTTP write");
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await.expect("HTTP read");
            raw
        };
        let raw = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| panic!("no HTTP response to {method} {path} within {TIMEOUT:?}"));
        HttpResponse::parse(&raw)
    }

    pub async fn get(&self, path: &str) -> HttpResponse {
        self.http("GET", path, &[], None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> HttpResponse {
        self.http("POST", path, &[], Some(body)).await
    }

    /// POST as `user` through the `X-Roomd-User` header (auth off).
    pub async fn post_as(&self, user: &str, path: &str, body: &Value) -> HttpResponse {
        self.http("POST", path, &[("X-Roomd-User", user)], Some(body))
            .await
    }

    /// The value of the unlabelled metric `name` from `GET /metrics` (0 if absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let response = self.get("/metrics").await;
        assert_eq!(response.status, 200, "{}", response.text);
        sample(&response.text, name).unwrap_or(0.0)
    }

    /// `GET /api/rooms/{room}`, asserting 200.
    pub async fn room_state(&self, room: &str) -> Value {
        let response = self.get(&format!("/api/rooms/{room}")).await;
        assert_eq!(response.status, 200, "GET room {room}: {}", response.text);
        response.body
    }

    /// A WebSocket client connected as `user` (auth off), its welcome already read.
    pub async fn client(&self, user: &str) -> Client {
        Connect::new().user(user).connect(self).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- roomd stderr (tail) ---\n{}", self.stderr_tail());
        }
    }
}

fn command(bin: &Path, bind: &str, data_dir: &Path, args: &[String], log: File) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--bind")
        .arg(bind)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args);
    // Flags also come from ROOMD_* variables: the caller's environment must not leak in.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ROOMD_") {
            cmd.env_remove(name);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    cmd
}

/// The first line the child prints, or None if stdout closes first. A thread keeps
/// draining stdout afterwards so the child never blocks on a full pipe.
async fn first_stdout_line(stdout: std::process::ChildStdout) -> Option<String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(n) if n > 0 => {
                let _ = tx.send(line);
            }
            _ => return,
        }
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink);
    });
    rx.await.ok()
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON, or Null when it is empty or not JSON.
    pub body: Value,
    pub text: String,
}

impl HttpResponse {
    pub fn parse(raw: &[u8]) -> HttpResponse {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP header end in {:?}", String::from_utf8_lossy(raw)));
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("a status line");
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut body = raw[split + 4..].to_vec();
        let chunked = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
        if chunked {
            body = dechunk(&body);
        } else if let Some((_, len)) = headers.iter().find(|(n, _)| n == "content-length") {
            let len: usize = len.parse().expect("a numeric Content-Length");
            body.truncate(len);
        }
        let text = String::from_utf8_lossy(&body).to_string();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        HttpResponse {
            status,
            headers,
            body,
            text,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `code` of an error body.
    pub fn code(&self) -> &str {
        self.body["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in HTTP {} body {:?}", self.status, self.text))
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&data[..end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
            .expect("a hex chunk size");
        if size == 0 {
            return out;
        }
        let start = end + 2;
        out.extend_from_slice(&data[start..start + size]);
        data = &data[start + size + 2..];
    }
}

/// What the next read from a WebSocket produced.
#[derive(Debug)]
pub enum Event {
    Json(Value),
    Binary(Vec<u8>),
    /// A close frame (with its code, None if it carried none).
    Close(Option<u16>),
    /// The connection ended without a close frame.
    Ended(String),
    /// Nothing arrived before the deadline.
    Timeout,
}

/// How to open a WebSocket: query parameters, headers, socket options.
#[derive(Default, Clone)]
pub struct Connect {
    query: Vec<(String, String)>,
    /// Query parts sent exactly as given (no percent-encoding), after `query`.
    raw_query: Vec<String>,
    headers: Vec<(String, String)>,
    recv_buffer: Option<u32>,
}

impl Connect {
    pub fn new() -> Connect {
        Connect::default()
    }

    pub fn user(mut self, user: &str) -> Connect {
        self.query.push(("user".into(), user.into()));
        self
    }

    /// Adds `part` (`name=value`) to the query exactly as given, for bytes a URL
    /// encoder would never produce.
    pub fn raw_query(mut self, part: &str) -> Connect {
        self.raw_query.push(part.into());
        self
    }

    pub fn token(mut self, token: &str) -> Connect {
        self.query.push(("token".into(), token.into()));
        self
    }

    pub fn bearer(mut self, token: &str) -> Connect {
        self.headers
            .push(("Authorization".into(), format!("Bearer {token}")));
        self
    }

    /// Any extra header on the upgrade request.
    pub fn header(mut self, name: &str, value: &str) -> Connect {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn origin(mut self, origin: &str) -> Connect {
        self.headers.push(("Origin".into(), origin.into()));
        self
    }

    /// Offers `list` (comma separated) in Sec-WebSocket-Protocol.
    pub fn subprotocols(mut self, list: &str) -> Connect {
        self.headers
            .push(("Sec-WebSocket-Protocol".into(), list.into()));
        self
    }

    /// A small SO_RCVBUF makes a client that stops reading back up quickly.
    pub fn recv_buffer(mut self, bytes: u32) -> Connect {
        self.recv_buffer = Some(bytes);
        self
    }

    /// Performs the upgrade only: Ok with the client (welcome not read yet), or Err with
    /// the HTTP status that refused the upgrade.
    pub async fn handshake(&self, server: &Server) -> Result<Client, u16> {
        let query: Vec<String> = self
            .query
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encode(v)))
            .chain(self.raw_query.iter().cloned())
            .collect();
        let mut request = server
            .ws_url(&query.join("&"))
            .into_client_request()
            .expect("a valid ws URL");
        for (name, value) in &self.headers {
            let name: tungstenite::http::HeaderName = name.parse().expect("a valid header name");
            request.headers_mut().insert(
                name,
                HeaderValue::from_str(value).expect("a valid header value"),
            );
        }
        let socket = TcpSocket::new_v4().expect("a TCP socket");
        if let Some(bytes) = self.recv_buffer {
            socket
                .set_recv_buffer_size(bytes)
                .expect("SO_RCVBUF can be set");
        }
        let open = async {
            let stream = socket
                .connect(server.addr)
                .await
                .expect("TCP connect to roomd");
            tokio_tungstenite::client_async(request, stream).await
        };
        match tokio::time::timeout(TIMEOUT, open).await {
            Err(_) => panic!("WebSocket handshake did not finish within {TIMEOUT:?}"),
            Ok(Ok((ws, response))) => Ok(Client {
                subprotocol: response
                    .headers()
                    .get("Sec-WebSocket-Protocol")
                    .map(|v| v.to_str().unwrap_or_default().to_string()),
                ws,
                pending: VecDeque::new(),
                welcome: Value::Null,
            }),
            Ok(Err(tungstenite::Error::Http(response))) => Err(response.status().as_u16()),
            Ok(Err(e)) => panic!("WebSocket handshake failed: {e}"),
        }
    }

    /// Upgrades and reads the welcome frame, which must come first.
    pub async fn connect(&self, server: &Server) -> Client {
        let mut client = match self.handshake(server).await {
            Ok(client) => client,
            Err(status) => panic!("the upgrade was refused with HTTP {status}"),
        };
        let welcome = client.recv_json().await;
        assert_eq!(
            welcome["t"], "welcome",
            "first frame must be welcome: {welcome}"
        );
        client.welcome = welcome;
        client
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A JSON WebSocket client. tungstenite answers pings while the client reads.
///
/// Frames that `recv_until` skips are kept, in order, and seen first by later reads: a
/// test waiting for an ack does not lose the diff that arrived before it.
pub struct Client {
    ws: WebSocketStream<TcpStream>,
    /// Frames read off the socket but not yet consumed by the test.
    pending: VecDeque<Value>,
    /// The welcome frame (Null until `Connect::connect` read it).
    pub welcome: Value,
    /// The subprotocol the server selected, if any.
    pub subprotocol: Option<String>,
}

impl Client {
    /// The client end's address, which is the peer address of the server's socket.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.ws
            .get_ref()
            .local_addr()
            .expect("a connected socket has a local address")
    }

    pub fn user(&self) -> &str {
        self.welcome["user"].as_str().expect("welcome carries user")
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send(Message::text(value.to_string())).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send(Message::text(text.to_string())).await;
    }

    pub async fn send(&mut self, message: Message) {
        tokio::time::timeout(TIMEOUT, self.ws.send(message))
            .await
            .expect("send did not finish in time")
            .expect("send failed");
    }

    /// Sends `messages` in one write (fed, then flushed once), so the server reads them
    /// together.
    pub async fn send_all(&mut self, messages: Vec<Message>) {
        let feed = async {
            for message in messages {
                self.ws.feed(message).await?;
            }
            self.ws.flush().await
        };
        tokio::time::timeout(TIMEOUT, feed)
            .await
            .expect("send did not finish in time")
            .expect("send failed");
    }

    /// The next frame, close or end, or Timeout after `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Event::Timeout,
                Ok(next) => next,
            };
            match next {
                None => return Event::Ended("stream ended".into()),
                Some(Err(e)) => return Event::Ended(e.to_string()),
                Some(Ok(Message::Text(text))) => {
                    let value = serde_json::from_str(text.as_str())
                        .unwrap_or_else(|e| panic!("server sent non-JSON text {text:?}: {e}"));
                    return Event::Json(value);
                }
                Some(Ok(Message::Binary(bytes))) => return Event::Binary(bytes.to_vec()),
                Some(Ok(Message::Close(frame))) => {
                    return Event::Close(frame.map(|f| u16::from(f.code)))
                }
                Some(Ok(_)) => continue, // ping/pong: tungstenite answers pings itself
            }
        }
    }

    /// The next unconsumed frame, which must be JSON and arrive within TIMEOUT.
    pub async fn recv_json(&mut self) -> Value {
        if let Some(v) = self.pending.pop_front() {
            return v;
        }
        match self.next_event(TIMEOUT).await {
            Event::Json(v) => v,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// The first frame matching `pred` (within TIMEOUT); frames skipped on the way stay
    /// pending for later reads.
    pub async fn recv_until(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        self.recv_until_within(TIMEOUT, "a frame", pred).await
    }

    /// As [`recv_until`](Self::recv_until), waiting up to `timeout` for `what` (named in
    /// the failure, so a timeout says which frame did not come).
    pub async fn recv_until_within(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        if let Some(pos) = self.pending.iter().position(&pred) {
            return self.pending.remove(pos).expect("the position is in range");
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await {
                Event::Json(v) if pred(&v) => return v,
                Event::Json(v) => self.pending.push_back(v),
                other => panic!(
                    "waiting for {what}, got {other:?}; unmatched: {:?}",
                    self.pending
                ),
            }
        }
    }

    /// Every frame, in order, up to and including the first one matching `pred` (within
    /// TIMEOUT). All of them are consumed.
    pub async fn collect_until(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        while let Some(v) = self.pending.pop_front() {
            let done = pred(&v);
            seen.push(v);
            if done {
                return seen;
            }
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await {
                Event::Json(v) => {
                    let done = pred(&v);
                    seen.push(v);
                    if done {
                        return seen;
                    }
                }
                other => panic!("waiting for a frame, got {other:?} after {seen:?}"),
            }
        }
    }

    /// Asserts that no JSON frame arrives for `duration` (pings are still answered).
    pub async fn expect_silence(&mut self, duration: Duration) {
        match self.next_event(duration).await {
            Event::Timeout => {}
            other => panic!("expected silence for {duration:?}, got {other:?}"),
        }
    }

    /// Skips data frames until the connection ends; returns the close code, or None if it
    /// ended without a close frame. Fails after `timeout`.
    pub async fn close_code_within(&mut self, timeout: Duration) -> Option<u16> {
        self.pending.clear();
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await {
                Event::Json(_) | Event::Binary(_) => continue,
                Event::Close(code) => return code,
                Event::Ended(_) => return None,
                Event::Timeout => panic!("the connection was not closed within {timeout:?}"),
            }
        }
    }

    /// Skips data frames until a close frame, which must carry `code`.
    pub async fn expect_close(&mut self, code: u16) {
        match self.close_code_within(TIMEOUT).await {
            Some(got) => assert_eq!(got, code, "close code"),
            None => panic!("the connection ended without a close frame (expected {code})"),
        }
    }

    /// Sends a close frame (a polite goodbye) and waits for the server's answer.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = self.close_code_within(TIMEOUT).await;
    }

    pub async fn send_op(&mut self, id: &str, room: &str, op: Value) {
        self.send_json(json!({"t": "op", "id": id, "room": room, "op": op}))
            .await;
    }

    /// Sends an op and returns its `ack` or `nack` (frames in between are skipped).
    pub async fn op(&mut self, id: &str, room: &str, op: Value) -> Value {
        self.send_op(id, room, op).await;
        self.reply(id).await
    }

    /// Sends a message carrying an `id` (op or create) and returns its ack or nack.
    pub async fn reply_to(&mut self, msg: Value) -> Value {
        let id = msg["id"]
            .as_str()
            .expect("the message carries an id")
            .to_string();
        self.send_json(msg).await;
        self.reply(&id).await
    }

    /// Waits for the `ack` or `nack` of `id`.
    pub async fn reply(&mut self, id: &str) -> Value {
        let what = format!("the ack or nack of {id:?}");
        self.recv_until_within(REPLY_TIMEOUT, &what, |v| {
            (v["t"] == "ack" || v["t"] == "nack") && v["id"] == id
        })
        .await
    }

    /// Sends an op that must be acked; returns the ack's seq.
    pub async fn ack(&mut self, id: &str, room: &str, op: Value) -> u64 {
        let reply = self.op(id, room, op).await;
        assert_eq!(reply["t"], "ack", "expected an ack for {id}: {reply}");
        reply["seq"].as_u64().expect("ack carries an integer seq")
    }

    /// Sends an op that must be nacked; returns the nack code.
    pub async fn nack(&mut self, id: &str, room: &str, op: Value) -> String {
        let reply = self.op(id, room, op).await;
        assert_eq!(reply["t"], "nack", "expected a nack for {id}: {reply}");
        reply["code"]
            .as_str()
            .expect("nack carries a code")
            .to_string()
    }

    /// Sends `create` (id `create-<room>`) and returns the ack or nack.
    pub async fn create(&mut self, room: &str, kind: &str, init: Value) -> Value {
        let id = format!("create-{room}");
        self.send_json(json!({"t": "create", "id": id, "room": room, "kind": kind, "init": init}))
            .await;
        self.reply(&id).await
    }

    /// Creates a room, asserting the ack with seq 1.
    pub async fn create_ok(&mut self, room: &str, kind: &str, init: Value) {
        let reply = self.create(room, kind, init).await;
        assert_eq!(reply["t"], "ack", "create {room}: {reply}");
        assert_eq!(reply["seq"], 1, "creating a room is event 1: {reply}");
    }

    /// Sends a `sub` message and returns the answer for its room: snapshot, resumed or
    /// error.
    pub async fn sub_msg(&mut self, msg: Value) -> Value {
        let room = msg["room"].clone();
        self.send_json(msg).await;
        self.recv_until(|v| {
            (v["t"] == "snapshot" || v["t"] == "resumed" || v["t"] == "error") && v["room"] == room
        })
        .await
    }

    /// Subscribes (no presence); the answer must be a snapshot, which is returned.
    pub async fn sub(&mut self, room: &str) -> Value {
        let answer = self.sub_msg(json!({"t": "sub", "room": room})).await;
        assert_eq!(answer["t"], "snapshot", "sub {room}: {answer}");
        answer
    }

    /// Subscribes with presence; the answer must be a snapshot, which is returned.
    pub async fn sub_presence(&mut self, room: &str) -> Value {
        let answer = self
            .sub_msg(json!({"t": "sub", "room": room, "presence": true}))
            .await;
        assert_eq!(answer["t"], "snapshot", "sub {room}: {answer}");
        answer
    }

    pub async fn unsub(&mut self, room: &str) {
        self.send_json(json!({"t": "unsub", "room": room})).await;
    }

    /// The diffs of `room`, in order, until one reaches `to >= seq`; other frames stay
    /// pending.
    pub async fn diffs_until(&mut self, room: &str, seq: u64) -> Vec<Value> {
        let mut diffs = Vec::new();
        loop {
            let diff = self
                .recv_until(|v| v["t"] == "diff" && v["room"] == room)
                .await;
            let to = diff["to"].as_u64().expect("a diff carries to");
            diffs.push(diff);
            if to >= seq {
                return diffs;
            }
        }
    }
}

/// A client-side copy of one room, kept from a snapshot plus diffs, checking the contract's
/// invariants on every frame: entries sorted by key and unique, versions within the batch,
/// each diff starting right after the previous one.
#[derive(Debug, Clone)]
pub struct Mirror {
    pub room: String,
    pub epoch: String,
    pub seq: u64,
    pub entries: BTreeMap<String, Value>,
}

impl Mirror {
    pub fn from_snapshot(snapshot: &Value) -> Mirror {
        assert_eq!(snapshot["t"], "snapshot", "{snapshot}");
        let epoch = snapshot["epoch"]
            .as_str()
            .expect("snapshot epoch")
            .to_string();
        assert_epoch(&epoch);
        let seq = snapshot["seq"].as_u64().expect("snapshot seq");
        let entries = assert_entries(&snapshot["entries"], 1, seq);
        for entry in entries.values() {
            assert!(
                entry.get("del").is_none(),
                "a snapshot holds no deletions: {entry}"
            );
        }
        Mirror {
            room: snapshot["room"]
                .as_str()
                .expect("snapshot room")
                .to_string(),
            epoch,
            seq,
            entries,
        }
    }

    /// Applies a `diff` or `resumed` that must follow on directly from the mirror's seq.
    pub fn apply(&mut self, frame: &Value) {
        assert!(frame["t"] == "diff" || frame["t"] == "resumed", "{frame}");
        assert_eq!(frame["room"], self.room.as_str(), "{frame}");
        assert_eq!(
            frame["epoch"],
            self.epoch.as_str(),
            "epoch changed: {frame}"
        );
        let from = frame["from"].as_u64().expect("from");
        let to = frame["to"].as_u64().expect("to");
        assert_eq!(
            from,
            self.seq + 1,
            "batches must chain (mirror at {}): {frame}",
            self.seq
        );
        if frame["t"] == "diff" {
            assert!(to >= from, "a diff carries at least one event: {frame}");
        } else {
            assert!(to + 1 >= from, "{frame}");
        }
        for (key, entry) in assert_entries(&frame["changes"], from, to) {
            if entry["del"] == true {
                self.entries.remove(&key);
            } else {
                self.entries.insert(key, entry);
            }
        }
        self.seq = to;
    }

    pub fn value(&self, key: &str) -> Option<&Value> {
        self.entries.get(key).map(|e| &e["v"])
    }
}

pub fn assert_epoch(epoch: &str) {
    assert!(
        epoch.len() == 16
            && epoch
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "an epoch is 16 lowercase hex characters: {epoch:?}"
    );
}

/// Checks a list of entries (sorted by key, unique, `ver` within `lo..=hi`, a value unless
/// deleted) and returns them by key.
pub fn assert_entries(list: &Value, lo: u64, hi: u64) -> BTreeMap<String, Value> {
    let list = list
        .as_array()
        .unwrap_or_else(|| panic!("entries must be a list: {list}"));
    let mut out = BTreeMap::new();
    let mut previous: Option<String> = None;
    for entry in list {
        let key = entry["k"]
            .as_str()
            .unwrap_or_else(|| panic!("entry key: {entry}"))
            .to_string();
        if let Some(previous) = &previous {
            assert!(
                *previous < key,
                "entries must be sorted by key and unique: {list:?}"
            );
        }
        let ver = entry["ver"]
            .as_u64()
            .unwrap_or_else(|| panic!("entry ver: {entry}"));
        assert!(
            (lo..=hi).contains(&ver),
            "ver {ver} outside {lo}..={hi}: {entry}"
        );
        if entry["del"] == true {
            assert!(
                entry.get("v").is_none(),
                "a deleted entry carries no value: {entry}"
            );
        } else {
            assert!(
                entry.get("v").is_some(),
                "an entry carries a value: {entry}"
            );
        }
        previous = Some(key.clone());
        out.insert(key, entry.clone());
    }
    out
}

/// The entry with key `key` in a list of entries.
pub fn entry<'a>(entries: &'a Value, key: &str) -> Option<&'a Value> {
    entries
        .as_array()
        .expect("entries are a list")
        .iter()
        .find(|e| e["k"] == key)
}

/// The keys of a list of entries, in order.
pub fn keys(entries: &Value) -> Vec<String> {
    entries
        .as_array()
        .expect("entries are a list")
        .iter()
        .map(|e| e["k"].as_str().expect("entry key").to_string())
        .collect()
}

/// A WebSocket spoken by hand over TCP, for frames a library will not send (oversized
/// headers, invalid UTF-8) and for a peer that never answers pings.
pub struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// One frame as read off the wire.
#[derive(Debug)]
pub struct RawFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The status code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 0x8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

impl RawWs {
    /// Upgrades `/ws?query` by hand; the server must answer 101.
    pub async fn connect(server: &Server, query: &str) -> RawWs {
        let mut stream = TcpStream::connect(server.addr).await.expect("TCP connect");
        let path = if query.is_empty() {
            "/ws".to_string()
        } else {
            format!("/ws?{query}")
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            server.host()
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("handshake write");
        let mut raw = RawWs {
            stream,
            buf: Vec::new(),
        };
        let head_end = loop {
            if let Some(pos) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos;
            }
            assert!(
                raw.fill(TIMEOUT).await,
                "the server closed during the handshake"
            );
        };
        let head = String::from_utf8_lossy(&raw.buf[..head_end]).to_string();
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "expected 101, got {head:?}"
        );
        // RFC 6455's sample key and its accept value.
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "bad accept header in {head:?}"
        );
        raw.buf.drain(..head_end + 4);
        raw
    }

    /// Reads more bytes into the buffer; false on EOF or reset.
    async fn fill(&mut self, timeout: Duration) -> bool {
        let mut chunk = [0u8; 16384];
        match tokio::time::timeout(timeout, self.stream.read(&mut chunk)).await {
            Err(_) => panic!("no bytes from the server within {timeout:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Sends one masked frame; false if the server had already closed the connection.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) -> bool {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut frame = frame_header(fin, opcode, payload.len() as u64, mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.write(&frame).await
    }

    /// Sends only a frame header that declares `declared_len` payload bytes.
    pub async fn send_header(&mut self, fin: bool, opcode: u8, declared_len: u64) -> bool {
        let frame = frame_header(fin, opcode, declared_len, [1, 2, 3, 4]);
        self.write(&frame).await
    }

    /// Writes raw bytes; false if the connection is gone (a server that closed on us is an
    /// outcome the caller checks through the close code, not a test failure here).
    pub async fn write(&mut self, bytes: &[u8]) -> bool {
        match tokio::time::timeout(Duration::from_secs(2), self.stream.write_all(bytes)).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => false,
            // A server that stopped reading leaves us blocked on a full socket.
            Err(_) => false,
        }
    }

    /// The next frame, or None when the connection ends first.
    pub async fn read_frame(&mut self, timeout: Duration) -> Option<RawFrame> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !self.fill(left).await {
                return None;
            }
        }
    }

    /// Reads frames (never answering pings) until a close frame; returns its code, or None
    /// if the connection ended without one.
    pub async fn read_close_code(&mut self, timeout: Duration) -> Option<u16> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = self.read_frame(left).await?;
            if frame.opcode == 0x8 {
                return frame.close_code();
            }
        }
    }
}

/// One whole masked client frame, for tests that pipeline many in one write.
pub fn masked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = frame_header(fin, opcode, payload.len() as u64, mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// A masked client frame header declaring `len` payload bytes.
pub fn frame_header(fin: bool, opcode: u8, len: u64, mask: [u8; 4]) -> Vec<u8> {
    let mut header = vec![if fin { 0x80 } else { 0 } | opcode];
    if len < 126 {
        header.push(0x80 | len as u8);
    } else if len <= u16::MAX as u64 {
        header.push(0x80 | 126);
        header.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        header.push(0x80 | 127);
        header.extend_from_slice(&len.to_be_bytes());
    }
    header.extend_from_slice(&mask);
    header
}

/// Parses one unmasked server frame from the front of `buf`.
pub fn parse_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        n => (n as usize, 2),
    };
    let mask = if masked {
        if buf.len() < at + 4 {
            return None;
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    if buf.len() < at + len {
        return None;
    }
    let mut payload = buf[at..at + len].to_vec();
    if let Some(mask) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Some((
        RawFrame {
            fin,
            opcode,
            payload,
        },
        at + len,
    ))
}
