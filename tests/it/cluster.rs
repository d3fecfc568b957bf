//! Cluster mode: one nats-server on a free loopback port and roomd nodes on 127.0.0.1,
//! spoken to in literal JSON like any other server. Everything is killed on drop.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{Server, TIMEOUT};

/// A `nats-server` on 127.0.0.1 (Debian's package; `.ci/run` installs it). Killed on drop.
struct Nats {
    addr: SocketAddr,
    child: Option<Child>,
}

impl Nats {
    async fn start() -> Nats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut nats = Nats {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: None,
        };
        nats.spawn().await;
        nats
    }

    async fn spawn(&mut self) {
        let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("nats-server");
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &self.addr.port().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server can be started (apt-get install nats-server)");
        self.child = Some(child);
        let deadline = Instant::now() + TIMEOUT;
        while tokio::net::TcpStream::connect(self.addr).await.is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// SIGKILL, and waits for the process to be gone.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The flags of node `id` in a cluster of `nodes` on `nats`.
fn node_args(nats: &Nats, id: &str, nodes: &str) -> Vec<String> {
    [
        "--cluster-nats",
        &nats.url(),
        "--node-id",
        id,
        "--cluster-nodes",
        nodes,
        "--cluster-name",
        "test",
    ]
    .map(str::to_owned)
    .to_vec()
}

async fn start_node(nats: &Nats, id: &str, nodes: &str) -> Server {
    let args = node_args(nats, id, nodes);
    Server::start(&args.iter().map(String::as_str).collect::<Vec<_>>()).await
}

/// Polls `/readyz` until `check` holds for its body, failing after `within`.
async fn readyz_until(
    server: &Server,
    within: Duration,
    check: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + within;
    loop {
        let response = server.get("/readyz").await;
        let body = &response.body;
        if check(body) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never matched; last: {} {body}",
            response.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_node_with_another_member_list_or_a_live_id_refuses_to_start() {
    let nats = Nats::start().await;
    let a = start_node(&nats, "a", "a,b,c").await;
    let _b = start_node(&nats, "b", "c,b,a").await;
    readyz_until(&a, TIMEOUT, |body| {
        body["ready"] == json!(true)
            && body["cluster"]
                == json!({"node": "a", "members": ["a", "b", "c"], "nats": "connected"})
    })
    .await;

    let other_list = node_args(&nats, "c", "a,b,c,d");
    let other_list: Vec<&str> = other_list.iter().map(String::as_str).collect();
    let (status, stderr) = Server::run_expecting_exit_with_stderr("127.0.0.1:0", &other_list).await;
    assert!(!status.success());
    assert!(
        stderr.contains("has --cluster-nodes a,b,c, this node a,b,c,d: refusing to start"),
        "{stderr}"
    );

    let same_id = node_args(&nats, "b", "a,b,c");
    let same_id: Vec<&str> = same_id.iter().map(String::as_str).collect();
    let (status, stderr) = Server::run_expecting_exit_with_stderr("127.0.0.1:0", &same_id).await;
    assert!(!status.success());
    assert!(stderr.contains("node id `b` is already live"), "{stderr}");

    // The agreeing third member starts.
    let c = start_node(&nats, "c", "b,a,c").await;
    readyz_until(&c, TIMEOUT, |body| {
        body["cluster"]["nats"] == json!("connected")
    })
    .await;
}

#[tokio::test]
async fn readyz_reports_nats_lost_and_back() {
    let mut nats = Nats::start().await;
    let a = start_node(&nats, "a", "a").await;
    readyz_until(&a, TIMEOUT, |body| {
        body["cluster"]["nats"] == json!("connected")
    })
    .await;
    nats.kill9();
    // Still ready (its own rooms work), but degraded and saying why.
    readyz_until(&a, TIMEOUT, |body| {
        body["ready"] == json!(true)
            && body["degraded"] == json!(true)
            && body["cluster"]["nats"] == json!("disconnected")
    })
    .await;
    nats.spawn().await;
    readyz_until(&a, Duration::from_secs(15), |body| {
        body["cluster"]["nats"] == json!("connected") && body.get("degraded").is_none()
    })
    .await;
}

#[tokio::test]
async fn cluster_mode_without_a_reachable_nats_does_not_start() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let (status, stderr) = Server::run_expecting_exit_with_stderr(
        "127.0.0.1:0",
        &[
            "--cluster-nats",
            &url,
            "--node-id",
            "a",
            "--cluster-nodes",
            "a",
        ],
    )
    .await;
    assert!(!status.success());
    assert!(stderr.contains("cannot reach NATS"), "{stderr}");

    let (status, stderr) =
        Server::run_expecting_exit_with_stderr("127.0.0.1:0", &["--cluster-nodes", "a,b"]).await;
    assert!(!status.success());
    assert!(stderr.contains("need --cluster-nats"), "{stderr}");
}
