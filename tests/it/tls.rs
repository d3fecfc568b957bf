//! TLS (`--tls-cert`, `--tls-key`): HTTPS and `wss://` on one port, the Rust client over
//! `wss://` trusting the CA given in its `Options`, a certificate reload on SIGHUP under
//! open connections, and the refusals at startup.
//!
//! Every test makes its own certificates with rcgen: a CA, and leaf certificates it signs
//! for `localhost` and `127.0.0.1`. Requests and frames are literal JSON; the client is
//! the roomd library's (it is under test here, as in `client.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use roomd::client::{
    Client, ClientError, Options, Reconnect, Status, SubscribeOptions, Subscription, TlsRoots,
};
use roomd::value::Value;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value as Json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{HttpResponse, Server, TIMEOUT};

/// Waits for reloads and reconnects (a debug build on a busy machine is not instant).
const LONG: Duration = Duration::from_secs(30);

/// A certificate authority that signs the tests' server certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A server certificate and its key, as PEM files hold them.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params =
            CertificateParams::new(Vec::<String>::new()).expect("no names is a valid CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("a key pair");
        let cert = params.self_signed(&key).expect("a self-signed CA");
        Ca {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
        }
    }

    /// A new certificate (and key) for `localhost` and `127.0.0.1`.
    fn leaf(&self) -> Leaf {
        let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("valid names");
        let key = KeyPair::generate().expect("a key pair");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("the CA signs it");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// The files a TLS server is started with, in a temporary directory.
struct Files {
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl Files {
    fn new(leaf: &Leaf) -> Files {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let files = Files {
            cert: dir.path().join("fullchain.pem"),
            key: dir.path().join("privkey.pem"),
            dir,
        };
        files.install(leaf);
        files
    }

    /// Replaces both files, each by a rename (as certbot and most deploy tools do).
    fn install(&self, leaf: &Leaf) {
        for (path, text) in [(&self.cert, &leaf.cert_pem), (&self.key, &leaf.key_pem)] {
            let fresh = self.dir.path().join("fresh.pem");
            std::fs::write(&fresh, text).expect("writable");
            std::fs::rename(&fresh, path).expect("renamable");
        }
    }

    fn args(&self) -> Vec<&str> {
        vec![
            "--tls-cert",
            self.cert.to_str().expect("temporary paths are UTF-8 here"),
            "--tls-key",
            self.key.to_str().expect("temporary paths are UTF-8 here"),
        ]
    }
}

fn wss_url(server: &Server) -> String {
    format!("wss://{}/ws", server.addr)
}

fn options(user: &str, roots: TlsRoots) -> Options {
    Options {
        tls_roots: roots,
        reconnect: Reconnect::disabled(),
        connect_timeout: TIMEOUT,
        ..Options::user(user)
    }
}

fn value(json: Json) -> Value {
    roomd::protocol::json::to_value(&json).expect("test values follow the value rules")
}

fn incr(key: &str) -> Value {
    value(json!({"type": "incr", "key": key}))
}

/// The mirror's value at `key`, as JSON.
fn mirrored(sub: &Subscription, key: &str) -> Option<Json> {
    sub.get(key)
        .map(|(value, _ver)| roomd::protocol::json::from_value(&value))
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + LONG;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A TLS connection to the server, verifying its certificate against `ca_pem`.
async fn tls_connect(
    server: &Server,
    ca_pem: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, std::io::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.expect("rcgen writes valid PEM"))
            .expect("a valid CA certificate");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(server.addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::from(server.addr.ip()), tcp)
        .await
}

/// The certificate a new TLS connection is served.
async fn served_certificate(server: &Server, ca_pem: &str) -> Vec<u8> {
    let stream = tokio::time::timeout(TIMEOUT, tls_connect(server, ca_pem))
        .await
        .expect("a TLS handshake within the timeout")
        .expect("the TLS handshake succeeds");
    let (_, connection) = stream.get_ref();
    connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server presents a certificate")
        .to_vec()
}

/// One HTTP/1.1 request over TLS on a fresh connection (`Connection: close`).
async fn https(
    server: &Server,
    ca_pem: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Json>,
) -> HttpResponse {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\n",
        server.host()
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
    request.push_str(&body);
    let exchange = async {
        let mut stream = tls_connect(server, ca_pem).await.expect("TLS connect");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("HTTPS write");
        let mut raw = Vec::new();
        // A server may close without a TLS close_notify once the response is sent;
        // what arrived before that is the response.
        let _ = stream.read_to_end(&mut raw).await;
        raw
    };
    let raw = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("no HTTPS response to {method} {path} within {TIMEOUT:?}"));
    HttpResponse::parse(&raw)
}

fn sighup(server: &Server) {
    // SAFETY: kill(2) with a pid the test spawned and still owns (not yet reaped).
    let rc = unsafe { libc::kill(server.pid(), libc::SIGHUP) };
    assert_eq!(rc, 0, "SIGHUP could not be sent");
}

#[tokio::test]
async fn wss_clients_and_https_requests_share_the_tls_port() {
    let ca = Ca::new("roomd test CA");
    let leaf = ca.leaf();
    let files = Files::new(&leaf);
    let server = Server::start(&files.args()).await;
    assert_eq!(served_certificate(&server, &ca.pem).await, leaf.der);

    let health = https(&server, &ca.pem, "GET", "/healthz", &[], None).await;
    assert_eq!(health.status, 200, "{}", health.text);

    let alice = Client::connect(
        wss_url(&server),
        options("alice", TlsRoots::Pem(ca.pem.clone().into_bytes())),
    )
    .await
    .expect("a wss:// client trusting the CA connects");
    let room = "state:tls";
    assert_eq!(
        alice
            .create(room, "state", value(json!({"entries": {}})))
            .await,
        Ok(1)
    );
    let sub = alice
        .subscribe(room, SubscribeOptions::default())
        .await
        .expect("the room exists");
    assert_eq!(alice.op(room, incr("hits")).await, Ok(2));

    // An op over the HTTP API, over TLS too, reaches the wss:// subscriber.
    let response = https(
        &server,
        &ca.pem,
        "POST",
        &format!("/api/rooms/{room}/ops"),
        &[("X-Roomd-User", "bob")],
        Some(json!({"id": "h1", "op": {"type": "incr", "key": "hits"}})),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text);
    assert_eq!(response.body["seq"], 3);
    wait_for("the HTTPS op in the wss:// mirror", || {
        mirrored(&sub, "hits") == Some(json!(2))
    })
    .await;

    // The CA from a file works the same; a client trusting another CA is refused.
    let ca_file = files.dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).expect("writable");
    let carol = Client::connect(wss_url(&server), options("carol", TlsRoots::File(ca_file)))
        .await
        .expect("a wss:// client with the CA file connects");
    assert_eq!(carol.op(room, incr("hits")).await, Ok(4));
    let other = Ca::new("another CA");
    let Err(refused) = Client::connect(
        wss_url(&server),
        options("mallory", TlsRoots::Pem(other.pem.clone().into_bytes())),
    )
    .await
    else {
        panic!("a client that does not trust the server's CA must not connect");
    };
    assert!(
        matches!(&refused, ClientError::Connect { reason, .. } if reason.contains("certificate")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn plain_clients_on_the_tls_port_fail_cleanly() {
    // Settings from a --config file: the keys are the flags' names.
    let ca = Ca::new("roomd test CA");
    let files = Files::new(&ca.leaf());
    let config = files.dir.path().join("roomd.toml");
    std::fs::write(
        &config,
        format!(
            "tls-cert = {:?}\ntls_key = {:?}\n",
            files.cert.display().to_string(),
            files.key.display().to_string()
        ),
    )
    .expect("writable");
    let server = Server::start(&["--config", config.to_str().expect("UTF-8 path")]).await;

    let Err(refused) = tokio::time::timeout(
        LONG,
        Client::connect(
            format!("ws://{}/ws", server.addr),
            options("alice", TlsRoots::System),
        ),
    )
    .await
    .expect("a ws:// client gives up without waiting for its timeout") else {
        panic!("a ws:// client must not connect to a TLS port");
    };
    assert!(
        matches!(&refused, ClientError::Protocol(reason) if reason.contains("wss://")),
        "{refused:?}"
    );

    // A plaintext HTTP request is not answered as HTTP, and the connection ends.
    let mut tcp = TcpStream::connect(server.addr).await.expect("TCP connect");
    tcp.write_all(
        format!(
            "GET /healthz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            server.host()
        )
        .as_bytes(),
    )
    .await
    .expect("TCP write");
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(LONG, tcp.read_to_end(&mut raw))
        .await
        .expect("the server closes a plaintext connection");
    assert!(
        !raw.starts_with(b"HTTP/"),
        "plaintext HTTP was answered: {:?}",
        String::from_utf8_lossy(&raw)
    );

    // The server is unharmed.
    let health = https(&server, &ca.pem, "GET", "/healthz", &[], None).await;
    assert_eq!(health.status, 200, "{}", health.text);
}

#[tokio::test]
async fn sighup_serves_the_new_certificate_to_new_connections_and_keeps_open_ones() {
    let ca = Ca::new("roomd test CA");
    let first = ca.leaf();
    let files = Files::new(&first);
    let server = Server::start(&files.args()).await;
    let roots = TlsRoots::Pem(ca.pem.clone().into_bytes());
    let alice = Client::connect(wss_url(&server), options("alice", roots.clone()))
        .await
        .expect("connects over wss://");
    let room = "state:reload";
    assert_eq!(
        alice
            .create(room, "state", value(json!({"entries": {}})))
            .await,
        Ok(1)
    );
    let sub = alice
        .subscribe(room, SubscribeOptions::default())
        .await
        .expect("the room exists");
    assert_eq!(served_certificate(&server, &ca.pem).await, first.der);

    let second = ca.leaf();
    files.install(&second);
    sighup(&server);
    let deadline = tokio::time::Instant::now() + LONG;
    while served_certificate(&server, &ca.pem).await != second.der {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new connections still get the old certificate; stderr:\n{}",
            server.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The connection made before the reload carries on: same connection, ops and diffs.
    assert_eq!(alice.op(room, incr("hits")).await, Ok(2));
    wait_for("the diff on the open connection", || {
        mirrored(&sub, "hits") == Some(json!(1))
    })
    .await;
    assert!(
        matches!(alice.status(), Status::Connected { connection: 1, .. }),
        "the open connection was dropped: {:?}",
        alice.status()
    );
    let bob = Client::connect(wss_url(&server), options("bob", roots))
        .await
        .expect("a new wss:// client connects after the reload");
    assert_eq!(bob.op(room, incr("hits")).await, Ok(3));

    // Unusable new files: the certificate in use stays, and the error is logged.
    std::fs::write(&files.cert, "-----BEGIN CERTIFICATE-----\ntruncated").expect("writable");
    sighup(&server);
    wait_for("the reload error in the log", || {
        server
            .stderr_tail()
            .lines()
            .any(|line| line.contains("ERROR") && line.contains("TLS certificate kept"))
    })
    .await;
    assert_eq!(served_certificate(&server, &ca.pem).await, second.der);
    assert_eq!(alice.op(room, incr("hits")).await, Ok(4));
}

#[tokio::test]
async fn unusable_tls_files_stop_the_start_with_a_clear_message() {
    let ca = Ca::new("roomd test CA");
    let files = Files::new(&ca.leaf());
    let other = Files::new(&ca.leaf());
    let dir = files.dir.path();
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not PEM at all\n").expect("writable");
    let path = |p: &Path| p.to_str().expect("UTF-8 path").to_owned();
    let (cert, key) = (path(&files.cert), path(&files.key));
    let (other_key, garbage, missing) = (
        path(&other.key),
        path(&garbage),
        path(&dir.join("missing.pem")),
    );
    let cases: [(&[&str], &str); 6] = [
        (&["--tls-cert", &cert], "--tls-cert needs --tls-key"),
        (&["--tls-key", &key], "--tls-key needs --tls-cert"),
        (
            &["--tls-cert", &missing, "--tls-key", &key],
            "cannot read --tls-cert",
        ),
        (
            &["--tls-cert", &garbage, "--tls-key", &key],
            "holds no certificate",
        ),
        (
            &["--tls-cert", &cert, "--tls-key", &garbage],
            "holds no usable private key",
        ),
        (
            &["--tls-cert", &cert, "--tls-key", &other_key],
            "does not belong to the certificate",
        ),
    ];
    for (args, message) in cases {
        let (status, stderr) = Server::run_expecting_exit_with_stderr("127.0.0.1:0", args).await;
        assert!(!status.success(), "{args:?} exited {status}");
        assert!(
            stderr.contains(message),
            "{args:?}: expected {message:?} in stderr:\n{stderr}"
        );
    }
}

#[tokio::test]
async fn the_per_ip_connection_cap_and_the_frame_guard_hold_under_tls() {
    let ca = Ca::new("roomd test CA");
    let files = Files::new(&ca.leaf());
    let mut args = files.args();
    args.extend([
        "--max-http-conns-per-ip",
        "1",
        "--body-timeout",
        "120s",
        "--max-frame",
        "1024",
    ]);
    let server = Server::start(&args).await;

    // The frame guard: a message over --max-frame closes with 1009.
    let stream = tls_connect(&server, &ca.pem).await.expect("TLS connect");
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("wss://{}/ws?user=alice", server.addr), stream)
            .await
            .expect("the upgrade over TLS succeeds");
    let welcome = tokio::time::timeout(TIMEOUT, futures_util::StreamExt::next(&mut ws))
        .await
        .expect("a welcome")
        .expect("a frame")
        .expect("a readable frame");
    assert!(welcome.to_text().expect("JSON text").contains("welcome"));
    futures_util::SinkExt::send(
        &mut ws,
        tokio_tungstenite::tungstenite::Message::text("x".repeat(2_000)),
    )
    .await
    .expect("sent");
    let close = loop {
        let frame = tokio::time::timeout(TIMEOUT, futures_util::StreamExt::next(&mut ws))
            .await
            .expect("a close within the timeout");
        match frame {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(close))) => break close,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(
        close.map(|c| u16::from(c.code)),
        Some(1009),
        "an oversize message closes with 1009"
    );
    // The per-IP cap (counted from the TCP socket under TLS): one TLS connection holds
    // the address's only slot, stalled in a request body; the next is refused. The
    // closed WebSocket's slot is given back once the server has seen its socket end,
    // which may be just after our side of the close: a held connection that is answered
    // at once (refused) is tried again until one stays unanswered, holding the slot.
    drop(ws);
    let head = format!(
        "POST /api/rooms HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: 1000\r\n\r\n{{\"room\":",
        server.host()
    );
    let deadline = std::time::Instant::now() + TIMEOUT;
    let held = loop {
        let mut held = tls_connect(&server, &ca.pem).await.expect("TLS connect");
        held.write_all(head.as_bytes())
            .await
            .expect("the head is sent");
        held.flush().await.expect("flushed");
        let mut byte = [0u8; 1];
        let answered = tokio::time::timeout(Duration::from_millis(300), held.read(&mut byte)).await;
        if answered.is_err() {
            break held;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no connection could hold the slot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let refused = https(&server, &ca.pem, "GET", "/api/rooms/chat:absent", &[], None).await;
    assert_eq!(refused.status, 429, "{}", refused.text);
    assert_eq!(refused.code(), "rate_limited");

    drop(held);
}
