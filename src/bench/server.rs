//! The server a bench measures: either a roomd this process starts (the current
//! executable, `serve --bind 127.0.0.1:0` with a temporary data dir and raised op
//! limits) or one named by `--url` (and `--server-pid` for its /proc numbers).
//!
//! A started server gets SIGTERM when the [`Endpoint`] is dropped and is killed if it has
//! not exited 30 s later; its temporary data dir is then removed.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::proc_stats::ProcSample;
use super::{BenchArgs, BenchError};

/// How long a started server may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a started server may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long reading `/metrics` may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of a `/metrics` answer read.
const MAX_SCRAPE_BYTES: u64 = 1 << 20;

/// Op and handshake limits for a started server: high enough that no publisher or
/// writer is ever `rate_limited` and no connect storm is closed with 4429, so the bench
/// measures the server, not its policy.
const RAISED_OP_LIMITS: [(&str, &str); 4] = [
    ("--op-rate", "1000000"),
    ("--op-burst", "1000000"),
    ("--handshakes-per-ip", "1000000"),
    ("--handshakes-total", "1000000"),
];

/// Where the bench connects, and the process behind it when known.
pub struct Endpoint {
    /// The address every connection goes to.
    pub addr: SocketAddr,
    /// `host:port` as given (for the `Host` header and URLs).
    pub authority: String,
    /// The server's PID when /proc can be read for it.
    pub pid: Option<u32>,
    /// Present when this process started the server.
    local: Option<LocalServer>,
}

impl Endpoint {
    /// Starts a roomd unless `--url` names a server.
    pub fn open(args: &BenchArgs) -> Result<Endpoint, BenchError> {
        match &args.url {
            Some(url) => {
                let authority = parse_authority(url)?;
                let addr = authority
                    .to_socket_addrs()
                    .map_err(|e| BenchError::BadUrl {
                        url: url.clone(),
                        reason: e.to_string(),
                    })?
                    .next()
                    .ok_or_else(|| BenchError::BadUrl {
                        url: url.clone(),
                        reason: "the host resolves to no address".into(),
                    })?;
                Ok(Endpoint {
                    addr,
                    authority,
                    pid: args.server_pid,
                    local: None,
                })
            }
            None => {
                let local = LocalServer::start(&args.server_args)?;
                Ok(Endpoint {
                    addr: local.addr,
                    authority: local.addr.to_string(),
                    pid: Some(local.child.id()),
                    local: Some(local),
                })
            }
        }
    }

    /// `ws://authority` + `path_and_query`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.authority, path_and_query)
    }

    /// The server's CPU time and memory now, when its PID is known.
    pub fn sample(&self) -> Option<ProcSample> {
        self.pid.and_then(ProcSample::read)
    }

    /// The server's `GET /metrics` text, or None if it cannot be read (an old server, a
    /// peer that is not roomd). A plain HTTP/1.0 request: one short read on localhost.
    pub fn scrape_metrics(&self) -> Option<String> {
        use std::io::Write as _;
        let mut stream = std::net::TcpStream::connect_timeout(&self.addr, SCRAPE_TIMEOUT).ok()?;
        stream.set_read_timeout(Some(SCRAPE_TIMEOUT)).ok()?;
        write!(
            stream,
            "GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n",
            self.authority
        )
        .ok()?;
        let mut response = String::new();
        stream
            .take(MAX_SCRAPE_BYTES)
            .read_to_string(&mut response)
            .ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200")
            .then(|| body.to_owned())
            .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_owned()))
    }

    /// Adds a note to `report` when the started server logged WARN or ERROR lines.
    pub fn note_log_problems(&self, report: &mut super::report::Report) {
        let (n_problems, first) = self.log_problems();
        if n_problems > 0 {
            report.note(format!(
                "the server logged {n_problems} WARN/ERROR lines, first: {}",
                first.join(" | ")
            ));
        }
    }

    /// WARN and ERROR lines the started server logged so far (count, first few).
    fn log_problems(&self) -> (usize, Vec<String>) {
        let Some(local) = &self.local else {
            return (0, Vec::new());
        };
        let mut text = String::new();
        if let Ok(mut file) = File::open(&local.log) {
            let _ = file.read_to_string(&mut text);
        }
        let problems: Vec<&str> = text
            .lines()
            .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
            .collect();
        let first = problems.iter().take(3).map(|s| s.to_string()).collect();
        (problems.len(), first)
    }
}

/// A roomd child process with its own temporary data dir.
struct LocalServer {
    child: Child,
    addr: SocketAddr,
    /// The server's stderr (its log), inside `dir`.
    log: PathBuf,
    /// Held only for its `Drop`, which removes the data dir after the server has exited.
    _dir: TempDir,
}

impl LocalServer {
    fn start(extra: &[String]) -> Result<LocalServer, BenchError> {
        let exe = std::env::current_exe().map_err(BenchError::CurrentExe)?;
        let dir = TempDir::new()?;
        let data_dir = dir.path.join("data");
        let log = dir.path.join("roomd.log");
        let log_file = File::create(&log).map_err(|source| BenchError::TempDir {
            path: log.clone(),
            source,
        })?;

        let mut args: Vec<String> = vec![
            "serve".into(),
            "--bind".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        for (flag, value) in RAISED_OP_LIMITS {
            let given = extra
                .iter()
                .any(|arg| arg == flag || arg.starts_with(&format!("{flag}=")));
            if !given {
                args.push(flag.into());
                args.push(value.into());
            }
        }
        args.extend(extra.iter().cloned());
        eprintln!(
            "roomd bench: starting {} {} (op and handshake limits raised so the generator \
             is never rate limited; pass --url to measure a running server)",
            exe.display(),
            args.join(" ")
        );

        let mut child = Command::new(&exe)
            .args(&args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .map_err(|source| BenchError::Spawn {
                exe: exe.clone(),
                source,
            })?;
        let addr = match wait_listening(&mut child) {
            Ok(addr) => addr,
            Err(line) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(BenchError::ServerStart {
                    timeout: START_TIMEOUT,
                    line,
                    // The dir is removed on return; keep the log where the user can read it.
                    log: keep_log(&log),
                });
            }
        };
        Ok(LocalServer {
            child,
            addr,
            log,
            _dir: dir,
        })
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child, not reaped yet, so the pid is still ours.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_TIMEOUT;
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() > deadline {
                    eprintln!(
                        "roomd bench: the server ignored SIGTERM for {STOP_TIMEOUT:?}; killing it"
                    );
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Fields drop after this body, so `_dir` is removed once the server has exited.
    }
}

/// Reads the child's stdout until `roomd listening on ADDR`; Err carries what was read.
fn wait_listening(child: &mut Child) -> Result<SocketAddr, String> {
    let Some(stdout) = child.stdout.take() else {
        return Err(String::new());
    };
    let (tx, rx) = mpsc::channel();
    // Reads the line, then drains stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    let line = rx.recv_timeout(START_TIMEOUT).unwrap_or_default();
    line.trim_end()
        .strip_prefix("roomd listening on ")
        .and_then(|addr| addr.parse().ok())
        .ok_or(line)
}

/// Copies a failed server's log next to the temp dir so it survives the cleanup.
fn keep_log(log: &Path) -> PathBuf {
    let kept = std::env::temp_dir().join(format!("roomd-bench-failed-{}.log", std::process::id()));
    match std::fs::copy(log, &kept) {
        Ok(_) => kept,
        Err(_) => log.to_path_buf(),
    }
}

/// `host:port` of `ws://host:port[/...]`.
fn parse_authority(url: &str) -> Result<String, BenchError> {
    let bad = |reason: &str| BenchError::BadUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| bad("only ws:// URLs are supported"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    if authority.is_empty() {
        return Err(bad("no host"));
    }
    if !authority.contains(':') {
        return Ok(format!("{authority}:80"));
    }
    Ok(authority.to_string())
}

/// A directory under the system temp dir, removed on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new() -> Result<TempDir, BenchError> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("roomd-bench-{}-{nanos:09}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|source| BenchError::TempDir {
            path: path.clone(),
            source,
        })?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_comes_from_the_url() {
        assert_eq!(
            parse_authority("ws://127.0.0.1:9001").ok(),
            Some("127.0.0.1:9001".into())
        );
        assert_eq!(
            parse_authority("ws://localhost:8080/ws?x=1").ok(),
            Some("localhost:8080".into())
        );
        assert!(parse_authority("http://127.0.0.1:1").is_err());
    }
}
