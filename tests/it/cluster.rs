//! Cluster mode: one nats-server on a free loopback port and roomd nodes on 127.0.0.1,
//! spoken to in literal JSON like any other server. Everything is killed on drop.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::sse::Stream;
use crate::support::{jwt, now_secs, Connect, HttpResponse, Mirror, Server, TIMEOUT};

/// A `nats-server` on 127.0.0.1 (Debian's package; `.ci/run` installs it). Killed on drop.
pub(crate) struct Nats {
    addr: SocketAddr,
    child: Option<Child>,
}

impl Nats {
    pub(crate) async fn start() -> Nats {
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

    pub(crate) fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
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
pub(crate) fn node_args(nats: &Nats, id: &str, nodes: &str) -> Vec<String> {
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

pub(crate) async fn start_node(nats: &Nats, id: &str, nodes: &str) -> Server {
    start_node_with_env(nats, id, nodes, &[]).await
}

/// [`start_node`] with environment variables (test hooks) set for the process.
pub(crate) async fn start_node_with_env(
    nats: &Nats,
    id: &str,
    nodes: &str,
    env: &[(&str, &str)],
) -> Server {
    let args = node_args(nats, id, nodes);
    Server::start_with_env(&args.iter().map(String::as_str).collect::<Vec<_>>(), env).await
}

/// Polls `/readyz` until `check` holds for its body, failing after `within`.
pub(crate) async fn readyz_until(
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
                == json!({"node": "a", "members": ["a", "b", "c"], "generation": 0,
                          "membership": "member", "nats": "connected"})
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

/// Sends `incr` with op id `id` until it is acked, re-sending it (as a client does) while
/// it is nacked `unavailable`: the owner just restarted, and a forward that timed out
/// while it started is answered `unavailable`. Returns the ack's seq.
async fn ack_once_back(client: &mut crate::support::Client, id: &str, room: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = client.op(id, room, incr()).await;
        if reply["t"] == "ack" {
            return reply["seq"].as_u64().expect("an ack carries seq");
        }
        assert_eq!(reply["code"], "unavailable", "{reply}");
        assert!(
            Instant::now() < deadline,
            "never acked after the restart: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Three nodes `a`, `b`, `c` on one NATS.
async fn three_nodes(nats: &Nats) -> Vec<Server> {
    let mut nodes = Vec::new();
    for id in ["a", "b", "c"] {
        nodes.push(start_node(nats, id, "a,b,c").await);
    }
    nodes
}

/// The index of the node owning `room` in a cluster of the first `n` of `a`, `b`, `c`:
/// rendezvous hashing as the README says (FNV-1a over the node id, a 0xff byte and the
/// room id, then the SplitMix64 finalizer; the highest score owns). The room list's
/// `node` field is checked against it (`every_http_call_through_a_non_owner_…`).
pub(crate) fn owner_of(n: usize, room: &str) -> usize {
    let score = |node: &str| {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for &byte in node.as_bytes().iter().chain(&[0xff]).chain(room.as_bytes()) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        hash ^ (hash >> 31)
    };
    (0..n)
        .max_by_key(|&i| score(["a", "b", "c"][i]))
        .expect("at least one node")
}

fn incr() -> serde_json::Value {
    json!({"type": "incr", "key": "n", "by": 1})
}

#[tokio::test]
async fn ops_through_non_owners_are_applied_once_and_acked_in_order() {
    let nats = Nats::start().await;
    let nodes = three_nodes(&nats).await;
    let room = "state:forwarded";
    let owner = owner_of(nodes.len(), room);
    let (n1, n2) = ((owner + 1) % 3, (owner + 2) % 3);

    // Create and op through a non-owner.
    let mut alice = nodes[n1].client("alice").await;
    alice.create_ok(room, "state", json!({})).await;
    assert_eq!(alice.ack("x1", room, incr()).await, 2);
    // A refusal comes back with the owner's code and message.
    let reply = alice
        .op("bad", room, json!({"type": "del", "key": "missing"}))
        .await;
    assert_eq!(reply["t"], "nack");
    assert_eq!(reply["code"], "invalid");
    // The same op id re-sent through another node: the original ack, applied once.
    let mut again = nodes[n2].client("alice").await;
    let reply = again.op("x1", room, incr()).await;
    assert_eq!(reply, json!({"t": "ack", "id": "x1", "seq": 2}));
    // A re-sent create is answered from the record too (seq 1); another id is `exists`.
    let create_again = again.create(room, "state", json!({})).await;
    assert_eq!(create_again["seq"], 1, "{create_again}");
    let other_create = again
        .reply_to(json!({"t": "create", "id": "c2", "room": room, "kind": "state", "init": {}}))
        .await;
    assert_eq!(other_create["code"], "exists", "{other_create}");

    // Pipelined ops through a non-owner: acked in the order sent, seqs in that order.
    for i in 0..30 {
        alice.send_op(&format!("p{i}"), room, incr()).await;
    }
    let mut seqs = Vec::new();
    while seqs.len() < 30 {
        let msg = alice
            .recv_until(|v| v["t"] == "ack" || v["t"] == "nack")
            .await;
        assert_eq!(msg["t"], "ack", "{msg}");
        assert_eq!(msg["id"], format!("p{}", seqs.len()), "acks out of order");
        seqs.push(msg["seq"].as_u64().expect("an integer seq"));
    }
    assert_eq!(seqs, (3..33).collect::<Vec<u64>>());

    // HTTP ops are forwarded too, with the same effectively-once rule.
    let posted = nodes[n2]
        .post_as(
            "bob",
            &format!("/api/rooms/{room}/ops"),
            &json!({"id": "h1", "op": incr()}),
        )
        .await;
    assert_eq!(posted.status, 200, "{}", posted.text);
    assert_eq!(posted.body, json!({"seq": 33}));
    let reposted = nodes[n1]
        .post_as(
            "bob",
            &format!("/api/rooms/{room}/ops"),
            &json!({"id": "h1", "op": incr()}),
        )
        .await;
    assert_eq!(reposted.body, json!({"seq": 33}));

    // The owner holds every op once: 1 + 30 + 1 increments; a read on any node is
    // the owner's state.
    let state = nodes[owner].room_state(room).await;
    assert_eq!(state["seq"], 33);
    assert_eq!(state["entries"], json!([{"k": "n", "v": 32, "ver": 33}]));
    assert_eq!(nodes[n1].room_state(room).await, state);
    assert_eq!(nodes[n2].room_state(room).await, state);
    let missing = nodes[n1].get("/api/rooms/state:nowhere-at-all").await;
    assert_eq!(missing.status, 404, "{}", missing.text);
}

#[tokio::test]
async fn an_owner_killed_gives_unavailable_and_after_restart_the_room_continues() {
    let nats = Nats::start().await;
    let mut nodes = three_nodes(&nats).await;
    let room = "state:owner-restarts";
    let owner = owner_of(nodes.len(), room);
    let other = (owner + 1) % 3;
    let mut alice = nodes[other].client("alice").await;
    alice.create_ok(room, "state", json!({})).await;
    assert_eq!(alice.ack("k1", room, incr()).await, 2);
    let before = nodes[owner].room_state(room).await;

    nodes[owner].kill9().await;
    let reply = alice.op("k2", room, incr()).await;
    assert_eq!(reply["t"], "nack", "{reply}");
    assert_eq!(reply["code"], "unavailable", "{reply}");
    let posted = nodes[other]
        .post_as(
            "bob",
            &format!("/api/rooms/{room}/ops"),
            &json!({"id": "h", "op": incr()}),
        )
        .await;
    assert_eq!(posted.status, 503, "{}", posted.text);

    nodes[owner].restart().await;
    // The nacked op was not recorded: re-sent, it applies now; the acked one is
    // answered from the record. Same epoch, seq continues.
    assert_eq!(ack_once_back(&mut alice, "k2", room).await, 3);
    assert_eq!(
        alice.op("k1", room, incr()).await,
        json!({"t": "ack", "id": "k1", "seq": 2})
    );
    let after = nodes[owner].room_state(room).await;
    assert_eq!(after["epoch"], before["epoch"]);
    assert_eq!(after["entries"], json!([{"k": "n", "v": 2, "ver": 3}]));
}

#[tokio::test]
async fn clients_on_different_nodes_in_one_room_converge() {
    let nats = Nats::start().await;
    let nodes = three_nodes(&nats).await;
    let room = "state:converge";
    let owner = owner_of(nodes.len(), room);
    let mut creator = nodes[owner].client("carol").await;
    creator.create_ok(room, "state", json!({})).await;

    // One subscriber (with presence) and one writer on every node.
    let mut subscribers = Vec::new();
    let mut mirrors = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut client = node.client(&format!("user{i}")).await;
        let snapshot = client.sub_presence(room).await;
        mirrors.push(Mirror::from_snapshot(&snapshot));
        subscribers.push(client);
    }
    // Presence is the room's on its owner: members from every node.
    let mut last = subscribers.pop().expect("three subscribers");
    let members = last
        .recv_until(|v| v["t"] == "presence" && v["members"].is_array())
        .await;
    let users: Vec<&str> = members["members"]
        .as_array()
        .expect("a member list")
        .iter()
        .filter_map(|m| m["user"].as_str())
        .collect();
    assert_eq!(users, ["user0", "user1", "user2"], "{members}");
    subscribers.push(last);

    let mut writers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        writers.push(node.client(&format!("writer{i}")).await);
    }
    for round in 0..5 {
        for (i, writer) in writers.iter_mut().enumerate() {
            let op = json!({"type": "incr", "key": format!("w{i}"), "by": 1});
            writer.ack(&format!("r{round}"), room, op).await;
        }
    }
    // 1 create + 15 ops: every mirror reaches seq 16 through gapless diffs.
    for (client, mirror) in subscribers.iter_mut().zip(&mut mirrors) {
        for diff in client.diffs_until(room, 16).await {
            mirror.apply(&diff);
        }
        assert_eq!(mirror.seq, 16);
        for i in 0..3 {
            assert_eq!(mirror.value(&format!("w{i}")), Some(&json!(5)));
        }
    }
    assert_eq!(mirrors[0].entries, mirrors[1].entries);
    assert_eq!(mirrors[1].entries, mirrors[2].entries);

    // A signal from a subscriber on a non-owner reaches the members on other nodes.
    let sender = (owner + 1) % 3;
    subscribers[sender]
        .send_json(json!({"t": "signal", "room": room, "data": {"typing": true}}))
        .await;
    let heard = subscribers[owner].recv_until(|v| v["t"] == "signal").await;
    assert_eq!(heard["user"], format!("user{sender}"));
    assert_eq!(heard["data"], json!({"typing": true}));

    // Unsubscribed on a non-owner: no more diffs there, others still get them.
    let quiet = (owner + 2) % 3;
    subscribers[quiet].recv_until(|v| v["t"] == "signal").await;
    subscribers[quiet].unsub(room).await;
    // `unsub` has no answer; a signal to the room after it is answered `not_found` once
    // the node has dropped the subscription (frames of a connection are taken in order),
    // so no diff sent before the unsub took effect can arrive below.
    subscribers[quiet]
        .send_json(json!({"t": "signal", "room": room, "data": {}}))
        .await;
    let refused = subscribers[quiet]
        .recv_until(|v| v["t"] == "error" && v["room"] == room)
        .await;
    assert_eq!(refused["code"], "not_found", "{refused}");
    writers[owner].ack("last", room, incr()).await;
    subscribers[owner].diffs_until(room, 17).await;
    subscribers[quiet]
        .expect_silence(Duration::from_millis(300))
        .await;
}

#[tokio::test]
async fn subscribers_on_other_nodes_hear_the_owner_die_and_resume_after_its_restart() {
    let nats = Nats::start().await;
    let mut nodes = three_nodes(&nats).await;
    let room = "state:resume-across";
    let owner = owner_of(nodes.len(), room);
    let other = (owner + 1) % 3;
    let mut writer = nodes[other].client("writer").await;
    writer.create_ok(room, "state", json!({})).await;
    writer.ack("w1", room, incr()).await;

    let mut watcher = nodes[other].client("watcher").await;
    let snapshot = watcher.sub(room).await;
    let mut mirror = Mirror::from_snapshot(&snapshot);
    assert_eq!(mirror.seq, 2);

    nodes[owner].kill9().await;
    let told = watcher
        .recv_until(|v| v["t"] == "error" && v["room"] == room)
        .await;
    assert_eq!(told["code"], "unavailable", "{told}");
    // While the owner is down a new subscription is refused too.
    let refused = watcher.sub_msg(json!({"t": "sub", "room": room})).await;
    assert_eq!(refused["code"], "unavailable", "{refused}");

    nodes[owner].restart().await;
    ack_once_back(&mut writer, "w2", room).await;
    let resumed = watcher
        .sub_msg(
            json!({"t": "sub", "room": room, "since": {"epoch": mirror.epoch, "seq": mirror.seq}}),
        )
        .await;
    assert_eq!(resumed["t"], "resumed", "{resumed}");
    mirror.apply(&resumed);
    assert_eq!(mirror.seq, 3);
    writer.ack("w3", room, incr()).await;
    for diff in watcher.diffs_until(room, 4).await {
        mirror.apply(&diff);
    }
    assert_eq!(mirror.value("n"), Some(&json!(3)));
}

#[tokio::test]
async fn with_nats_killed_local_rooms_work_and_the_rest_is_unavailable_until_it_returns() {
    let mut nats = Nats::start().await;
    let nodes = three_nodes(&nats).await;
    // A room node 0 owns and one it does not.
    let mut local = None;
    let mut remote = None;
    for i in 0..64 {
        let room = format!("state:nats-down-{i}");
        match owner_of(nodes.len(), &room) {
            0 if local.is_none() => local = Some(room),
            o if o != 0 && remote.is_none() => remote = Some(room),
            _ => {}
        }
        if local.is_some() && remote.is_some() {
            break;
        }
    }
    let (local, remote) = (
        local.expect("a room of node 0"),
        remote.expect("a room elsewhere"),
    );
    let mut alice = nodes[0].client("alice").await;
    alice.create_ok(&local, "state", json!({})).await;
    alice.create_ok(&remote, "state", json!({})).await;

    nats.kill9();
    readyz_until(&nodes[0], TIMEOUT, |body| {
        body["cluster"]["nats"] == json!("disconnected")
    })
    .await;
    assert_eq!(alice.ack("l1", &local, incr()).await, 2);
    let mut watcher = nodes[0].client("watcher").await;
    watcher.sub(&local).await;
    let reply = alice.op("r1", &remote, incr()).await;
    assert_eq!(reply["code"], "unavailable", "{reply}");
    let refused = watcher.sub_msg(json!({"t": "sub", "room": remote})).await;
    assert_eq!(refused["code"], "unavailable", "{refused}");

    nats.spawn().await;
    readyz_until(&nodes[0], Duration::from_secs(15), |body| {
        body["cluster"]["nats"] == json!("connected")
    })
    .await;
    // The other nodes reconnect on their own schedule: retry until the owner answers.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reply = alice.op("r1", &remote, incr()).await;
        if reply["t"] == "ack" {
            assert_eq!(reply["seq"], 2);
            break;
        }
        assert_eq!(reply["code"], "unavailable", "{reply}");
        assert!(
            Instant::now() < deadline,
            "the owner never came back: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let snapshot = watcher.sub(&remote).await;
    assert_eq!(snapshot["seq"], 2);
}

#[tokio::test]
async fn permissions_are_checked_on_the_node_the_client_is_connected_to() {
    let nats = Nats::start().await;
    let mut nodes = Vec::new();
    for id in ["a", "b"] {
        let mut args = node_args(&nats, id, "a,b");
        args.extend(["--jwt-secret", "s3cret"].map(str::to_owned));
        nodes.push(Server::start(&args.iter().map(String::as_str).collect::<Vec<_>>()).await);
    }
    let token = |rooms: serde_json::Value| {
        jwt(
            "s3cret",
            json!({"sub": "alice", "exp": now_secs() + 600, "rooms": rooms}),
        )
    };
    let all = token(json!({"read": ["*"], "write": ["*"], "create": ["*"]}));
    // A room owned by node b, for a client on node a.
    let mut room = String::new();
    for i in 0..64 {
        room = format!("state:acl-{i}");
        if owner_of(nodes.len(), &room) == 1 {
            break;
        }
    }
    let mut alice = Connect::new().token(&all).connect(&nodes[0]).await;
    alice.create_ok(&room, "state", json!({})).await;
    alice.sub(&room).await;
    let read_only = token(json!({"read": ["*"]}));
    let mut reader = Connect::new().token(&read_only).connect(&nodes[0]).await;
    assert_eq!(reader.nack("w", &room, incr()).await, "forbidden");

    // A refreshed token that cannot read the room ends the remote subscription.
    alice
        .send_json(json!({"t": "auth", "token": token(json!({"write": ["*"]}))}))
        .await;
    let ended = alice
        .recv_until(|v| v["t"] == "error" && v["room"] == room.as_str())
        .await;
    assert_eq!(ended["code"], "forbidden", "{ended}");
    assert_eq!(alice.ack("after", &room, incr()).await, 2);
    alice.expect_silence(Duration::from_millis(300)).await;

    // HTTP calls are checked on the node asked, then answered by the owner, which
    // keeps a poll's votes private to admins in `/events`.
    let mut poll = String::new();
    for i in 0..64 {
        poll = format!("poll:acl-{i}");
        if owner_of(nodes.len(), &poll) == 1 {
            break;
        }
    }
    let admin = jwt(
        "s3cret",
        json!({"sub": "root", "exp": now_secs() + 600, "admin": true}),
    );
    let writer = token(json!({"write": ["*"]}));
    let [as_all, as_reader, as_admin, as_writer] =
        [&all, &read_only, &admin, &writer].map(|token| format!("Bearer {token}"));
    let as_all = [("Authorization", as_all.as_str())];
    let as_reader = [("Authorization", as_reader.as_str())];
    let as_admin = [("Authorization", as_admin.as_str())];
    let as_writer = [("Authorization", as_writer.as_str())];
    let created = nodes[0]
        .http(
            "POST",
            "/api/rooms",
            &as_all,
            Some(&json!({"room": poll, "kind": "poll", "init": {"question": "q", "options": ["x", "y"]}})),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let voted = nodes[0]
        .http(
            "POST",
            &format!("/api/rooms/{poll}/ops"),
            &as_all,
            Some(&json!({"op": {"type": "vote", "option": 1}})),
        )
        .await;
    assert_eq!(voted.status, 200, "{}", voted.text);
    let events = get_everywhere(&nodes, &format!("/api/rooms/{poll}/events"), &as_reader).await;
    assert_eq!(events[0], events[1], "the non-owner answers as the owner");
    assert_eq!(
        events[0].1["events"][1]["op"],
        json!({"type": "vote"}),
        "{:?}",
        events[0]
    );
    assert!(
        events[0].1["events"][1].get("user").is_none(),
        "{:?}",
        events[0]
    );
    let seen = get_everywhere(&nodes, &format!("/api/rooms/{poll}/events"), &as_admin).await;
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[0].1["events"][1]["user"], "alice", "{:?}", seen[0]);
    let refused = nodes[0]
        .http("GET", &format!("/api/rooms/{poll}?at=1"), &as_writer, None)
        .await;
    assert_eq!((refused.status, refused.code()), (403, "forbidden"));
    let refused = nodes[0]
        .http("DELETE", &format!("/api/rooms/{poll}"), &as_reader, None)
        .await;
    assert_eq!((refused.status, refused.code()), (403, "forbidden"));
    let deleted = nodes[0]
        .http("DELETE", &format!("/api/rooms/{poll}"), &as_admin, None)
        .await;
    assert_eq!(deleted.status, 204, "{}", deleted.text);
}

/// `GET path` on every node: the status and body of each.
async fn get_everywhere(
    nodes: &[Server],
    path: &str,
    headers: &[(&str, &str)],
) -> Vec<(u16, serde_json::Value)> {
    let mut answers = Vec::new();
    for node in nodes {
        let response: HttpResponse = node.http("GET", path, headers, None).await;
        answers.push((response.status, response.body));
    }
    answers
}

/// Asserts every node answers `GET path` as the owner does; returns the owner's body.
async fn same_everywhere(nodes: &[Server], owner: usize, path: &str) -> serde_json::Value {
    let answers = get_everywhere(nodes, path, &[]).await;
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(
            answer, &answers[owner],
            "GET {path}: node {i} differs from the owner (node {owner})"
        );
    }
    answers[owner].1.clone()
}

#[tokio::test]
async fn every_http_call_through_a_non_owner_is_answered_as_by_the_owner() {
    let nats = Nats::start().await;
    let nodes = three_nodes(&nats).await;
    let room = "poll:forwarded-http";
    let owner = owner_of(3, room);
    let (n1, n2) = ((owner + 1) % 3, (owner + 2) % 3);
    let created = nodes[n1]
        .post_as(
            "alice",
            "/api/rooms",
            &json!({"room": room, "kind": "poll", "init": {"question": "Lunch?", "options": ["pizza", "sushi"]}}),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    // Members with presence on two nodes, votes through all three.
    let mut carol = nodes[n1].client("carol").await;
    carol.sub_presence(room).await;
    let mut dave = nodes[n2].client("dave").await;
    dave.sub_presence(room).await;
    for (i, user) in ["alice", "bob", "erin"].into_iter().enumerate() {
        let voted = nodes[i]
            .post_as(
                user,
                &format!("/api/rooms/{room}/ops"),
                &json!({"id": "v", "op": {"type": "vote", "option": i % 2}}),
            )
            .await;
        assert_eq!(voted.status, 200, "{}", voted.text);
    }
    dave.diffs_until(room, 4).await;

    // Reads: the state, time travel, events and their pages, presence; and their errors.
    let state = same_everywhere(&nodes, owner, &format!("/api/rooms/{room}")).await;
    assert_eq!(state["seq"], 4, "{state}");
    let past = same_everywhere(&nodes, owner, &format!("/api/rooms/{room}?at=2")).await;
    assert_eq!(past["seq"], 2, "{past}");
    let events = same_everywhere(&nodes, owner, &format!("/api/rooms/{room}/events")).await;
    assert_eq!(events["head"], 4);
    assert_eq!(
        events["events"].as_array().map(Vec::len),
        Some(4),
        "{events}"
    );
    let page = same_everywhere(
        &nodes,
        owner,
        &format!("/api/rooms/{room}/events?after=1&limit=2"),
    )
    .await;
    assert_eq!(page["events"][0]["seq"], 2, "{page}");
    assert_eq!(page["events"].as_array().map(Vec::len), Some(2), "{page}");
    let head = same_everywhere(&nodes, owner, &format!("/api/rooms/{room}/events?limit=0")).await;
    assert_eq!(head, json!({"head": 4, "events": []}));
    let presence = same_everywhere(&nodes, owner, &format!("/api/rooms/{room}/presence")).await;
    assert_eq!(
        presence,
        json!({"room": room, "members": [{"user": "carol", "conns": 1}, {"user": "dave", "conns": 1}]})
    );
    for path in [
        format!("/api/rooms/{room}?at=9"),
        format!("/api/rooms/{room}?at=0"),
        "/api/rooms/poll:nowhere?at=1".to_owned(),
        "/api/rooms/poll:nowhere/events".to_owned(),
        "/api/rooms/poll:nowhere/presence".to_owned(),
    ] {
        let answers = get_everywhere(&nodes, &path, &[]).await;
        assert!(answers[0].0 >= 400, "GET {path}: {answers:?}");
        assert!(
            answers.iter().all(|a| a == &answers[0]),
            "GET {path}: {answers:?}"
        );
    }

    // The room list is cluster-wide: every node lists every room with its owner.
    let other = "state:forwarded-list";
    nodes[owner]
        .post(
            "/api/rooms",
            &json!({"room": other, "kind": "state", "init": {}}),
        )
        .await;
    let list = same_everywhere(&nodes, owner, "/api/rooms").await;
    let ids = ["a", "b", "c"];
    assert_eq!(
        list,
        json!({"rooms": [
            {"room": room, "kind": "poll", "epoch": state["epoch"], "seq": 4, "subscribers": 2, "node": ids[owner]},
            {"room": other, "kind": "state", "epoch": list["rooms"][1]["epoch"], "seq": 1, "subscribers": 0, "node": ids[owner_of(3, other)]},
        ], "next": null, "partial": false}),
    );
    let first = same_everywhere(&nodes, owner, "/api/rooms?limit=1").await;
    assert_eq!(first["rooms"][0]["room"], room);
    assert_eq!(first["next"], room);
    let rest = same_everywhere(&nodes, owner, &format!("/api/rooms?limit=1&after={room}")).await;
    assert_eq!(rest["rooms"][0]["room"], other);
    assert_eq!(rest["next"], json!(null));

    // The SSE stream on a non-owner: the owner's snapshot, then diffs, not a member.
    let mut stream = Stream::open(
        &nodes[n2],
        &format!("/api/rooms/{room}/stream?presence=1"),
        &[],
    )
    .await;
    assert_eq!(stream.status, 200);
    let snapshot = stream.event().await;
    assert_eq!(snapshot.event, "snapshot");
    assert_eq!(snapshot.data["entries"], state["entries"]);
    assert_eq!(snapshot.data["seq"], 4);
    let members = stream.event().await;
    assert_eq!(members.event, "presence", "{:?}", members.data);
    let voted = nodes[n1]
        .post_as(
            "frank",
            &format!("/api/rooms/{room}/ops"),
            &json!({"op": {"type": "vote", "option": 1}}),
        )
        .await;
    assert_eq!(voted.body, json!({"seq": 5}));
    let diff = stream.event().await;
    assert_eq!(
        (diff.event.as_str(), &diff.data["from"], &diff.data["to"]),
        ("diff", &json!(5), &json!(5))
    );
    let presence = same_everywhere(&nodes, owner, &format!("/api/rooms/{room}/presence")).await;
    assert_eq!(
        presence["members"].as_array().map(Vec::len),
        Some(2),
        "the stream is no member: {presence}"
    );
    // A resume through a non-owner: `resumed` from the seq given.
    let epoch = state["epoch"].as_str().expect("an epoch");
    let mut resumed = Stream::open(
        &nodes[n1],
        &format!("/api/rooms/{room}/stream"),
        &[("Last-Event-ID", &format!("{epoch}:3"))],
    )
    .await;
    let caught_up = resumed.event().await;
    assert_eq!(caught_up.event, "resumed");
    assert_eq!(
        (&caught_up.data["from"], &caught_up.data["to"]),
        (&json!(4), &json!(5))
    );
    let missing = Stream::open(&nodes[n1], "/api/rooms/poll:nowhere/stream", &[]).await;
    let local_missing = Stream::open(
        &nodes[owner_of(3, "poll:nowhere")],
        "/api/rooms/poll:nowhere/stream",
        &[],
    )
    .await;
    assert_eq!((missing.status, local_missing.status), (404, 404));

    // The admin signal through a non-owner reaches members on every node.
    let signalled = nodes[n2]
        .post(
            &format!("/api/rooms/{room}/signal"),
            &json!({"data": {"hi": 1}}),
        )
        .await;
    assert_eq!((signalled.status, &signalled.body), (202, &json!({})));
    for client in [&mut carol, &mut dave] {
        let heard = client.recv_until(|v| v["t"] == "signal").await;
        assert_eq!(
            (&heard["user"], &heard["data"]),
            (&json!("server"), &json!({"hi": 1}))
        );
    }
    let too_big = "x".repeat(2_000);
    let refused = nodes[n2]
        .post(
            &format!("/api/rooms/{room}/signal"),
            &json!({"data": too_big}),
        )
        .await;
    let local = nodes[owner]
        .post(
            &format!("/api/rooms/{room}/signal"),
            &json!({"data": too_big}),
        )
        .await;
    assert_eq!((refused.status, &refused.body), (local.status, &local.body));

    // DELETE through a non-owner: 204, then gone on every node; subscribers are told.
    let deleted = nodes[n1]
        .http("DELETE", &format!("/api/rooms/{room}"), &[], None)
        .await;
    assert_eq!(deleted.status, 204, "{}", deleted.text);
    let gone = dave
        .recv_until(|v| v["t"] == "error" && v["room"] == room)
        .await;
    assert_eq!(gone["code"], "not_found", "{gone}");
    let ended = stream.event().await;
    assert_eq!(
        (ended.event.as_str(), &ended.data["code"]),
        ("error", &json!("not_found"))
    );
    for answer in get_everywhere(&nodes, &format!("/api/rooms/{room}"), &[]).await {
        assert_eq!(answer.0, 404, "{answer:?}");
    }
    let again = nodes[n2]
        .http("DELETE", &format!("/api/rooms/{room}"), &[], None)
        .await;
    let local = nodes[owner]
        .http("DELETE", &format!("/api/rooms/{room}"), &[], None)
        .await;
    assert_eq!((again.status, &again.body), (local.status, &local.body));
}

#[tokio::test]
async fn answers_larger_than_a_nats_message_arrive_whole() {
    let nats = Nats::start().await;
    let nodes = three_nodes(&nats).await;
    let room = "state:big-answers";
    let owner = owner_of(3, room);
    let other = (owner + 1) % 3;
    let mut alice = nodes[other].client("alice").await;
    alice.create_ok(room, "state", json!({})).await;
    // 60 values of 30 KB: about 1.8 MB of state and of events, over NATS's 1 MiB.
    for i in 0..60 {
        let value = format!("{i:02}").repeat(15_000);
        let op = json!({"type": "set", "key": format!("k{i:02}"), "value": value});
        alice.ack(&format!("s{i}"), room, op).await;
    }
    let state = same_everywhere(&nodes, owner, &format!("/api/rooms/{room}")).await;
    assert_eq!(state["entries"].as_array().map(Vec::len), Some(60));
    assert!(state.to_string().len() > 1_800_000);
    let past = same_everywhere(&nodes, owner, &format!("/api/rooms/{room}?at=41")).await;
    assert_eq!(past["entries"].as_array().map(Vec::len), Some(40));
    let events = same_everywhere(&nodes, owner, &format!("/api/rooms/{room}/events")).await;
    assert_eq!(events["events"].as_array().map(Vec::len), Some(61));
}

#[tokio::test]
async fn an_owner_killed_and_restarted_resumes_gaplessly_on_every_node() {
    let nats = Nats::start().await;
    let mut nodes = three_nodes(&nats).await;
    let room = "state:resume-everywhere";
    let owner = owner_of(3, room);
    let (n1, n2) = ((owner + 1) % 3, (owner + 2) % 3);
    let mut writer = nodes[n1].client("writer").await;
    writer.create_ok(room, "state", json!({})).await;
    writer.ack("w1", room, incr()).await;
    // A watcher on every node, and an SSE stream on a non-owner.
    let mut watchers = Vec::new();
    let mut mirrors = Vec::new();
    for node in &nodes {
        let mut watcher = node.client("watcher").await;
        mirrors.push(Mirror::from_snapshot(&watcher.sub(room).await));
        watchers.push(watcher);
    }
    let mut stream = Stream::open(&nodes[n2], &format!("/api/rooms/{room}/stream"), &[]).await;
    let snapshot = stream.event().await;
    assert_eq!(snapshot.data["seq"], 2);
    writer.ack("w2", room, incr()).await;
    for (watcher, mirror) in watchers.iter_mut().zip(&mut mirrors) {
        for diff in watcher.diffs_until(room, 3).await {
            mirror.apply(&diff);
        }
    }
    let last_id = stream.event().await.id.expect("a diff has an id");

    nodes[owner].kill9().await;
    for i in [n1, n2] {
        let told = watchers[i]
            .recv_until(|v| v["t"] == "error" && v["room"] == room)
            .await;
        assert_eq!(told["code"], "unavailable", "{told}");
    }
    let ended = stream.event().await;
    assert_eq!(
        (ended.event.as_str(), &ended.data["code"]),
        ("error", &json!("unavailable"))
    );
    // The room list says which node did not answer.
    let list = nodes[n1].get("/api/rooms").await;
    assert_eq!(list.body["partial"], true, "{}", list.text);
    assert_eq!(list.body["missing"][0]["node"], ["a", "b", "c"][owner]);
    assert_eq!(
        list.body["rooms"],
        json!([]),
        "the room is the owner's only"
    );
    let down = nodes[n2].get(&format!("/api/rooms/{room}/events")).await;
    assert_eq!(
        (down.status, down.code()),
        (503, "unavailable"),
        "{}",
        down.text
    );

    nodes[owner].restart().await;
    watchers[owner] = nodes[owner].client("watcher").await;
    let list = nodes[n1].get("/api/rooms").await;
    assert_eq!(list.body["partial"], false, "{}", list.text);
    // Every node's watcher resumes from where it was, with no gap, as ops keep coming
    // through every node.
    for (i, (watcher, mirror)) in watchers.iter_mut().zip(&mut mirrors).enumerate() {
        let mut node_writer = nodes[i].client("writer").await;
        node_writer.ack(&format!("after-{i}"), room, incr()).await;
        let resumed = watcher
            .sub_msg(json!({"t": "sub", "room": room, "since": {"epoch": mirror.epoch, "seq": mirror.seq}}))
            .await;
        assert_eq!(resumed["t"], "resumed", "node {i}: {resumed}");
        mirror.apply(&resumed);
    }
    writer.ack("w3", room, incr()).await;
    for (watcher, mirror) in watchers.iter_mut().zip(&mut mirrors) {
        for diff in watcher.diffs_until(room, 7).await {
            mirror.apply(&diff);
        }
        assert_eq!(mirror.seq, 7);
        assert_eq!(mirror.value("n"), Some(&json!(6)));
    }
    let mut stream = Stream::open(
        &nodes[n2],
        &format!("/api/rooms/{room}/stream"),
        &[("Last-Event-ID", &last_id)],
    )
    .await;
    let resumed = stream.event().await;
    assert_eq!(resumed.event, "resumed");
    assert_eq!(
        (&resumed.data["from"], &resumed.data["to"]),
        (&json!(4), &json!(7))
    );
}

#[tokio::test]
async fn a_poll_voted_through_every_node_converges_with_the_right_counts() {
    let nats = Nats::start().await;
    let nodes = three_nodes(&nats).await;
    let room = "poll:lunch-across";
    let owner = owner_of(3, room);
    let host_node = (owner + 1) % 3;
    let mut host = nodes[host_node].client("host").await;
    host.create_ok(
        room,
        "poll",
        json!({"question": "Lunch?", "options": ["pizza", "sushi", "tacos"]}),
    )
    .await;
    let mut watchers = Vec::new();
    let mut mirrors = Vec::new();
    for node in &nodes {
        let mut watcher = node.client("watcher").await;
        mirrors.push(Mirror::from_snapshot(&watcher.sub(room).await));
        watchers.push(watcher);
    }
    // Four voters on each node vote at once; then each node's first voter moves its
    // vote to tacos through another node, and its second retracts.
    let mut voters = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for j in 0..4 {
            voters.push((i, j, node.client(&format!("voter{i}{j}")).await));
        }
    }
    for (i, j, voter) in voters.iter_mut() {
        let op = json!({"type": "vote", "option": (*i + *j) % 3});
        voter.send_op("v1", room, op).await;
    }
    for (_, _, voter) in voters.iter_mut() {
        let reply = voter.reply("v1").await;
        assert_eq!(reply["t"], "ack", "{reply}");
    }
    let mut expected = [0u64; 3];
    for (i, j, _) in &voters {
        expected[(i + j) % 3] += 1;
    }
    for i in 0..3 {
        let mut moved = nodes[(i + 1) % 3].client(&format!("voter{i}0")).await;
        moved
            .ack("v2", room, json!({"type": "vote", "option": 2}))
            .await;
        expected[i % 3] -= 1;
        expected[2] += 1;
        let mut retracting = nodes[(i + 2) % 3].client(&format!("voter{i}1")).await;
        retracting.ack("r", room, json!({"type": "retract"})).await;
        expected[(i + 1) % 3] -= 1;
    }
    // Voting again through a third node is still one vote per user.
    let mut again = nodes[host_node].client("voter23").await;
    again
        .ack("v3", room, json!({"type": "vote", "option": 1}))
        .await;
    expected[(2 + 3) % 3] -= 1;
    expected[1] += 1;
    // 1 create + 12 votes + 3 moves + 3 retracts + 1 vote.
    let head = 20;
    for (watcher, mirror) in watchers.iter_mut().zip(&mut mirrors) {
        for diff in watcher.diffs_until(room, head).await {
            mirror.apply(&diff);
        }
        for (option, count) in expected.iter().enumerate() {
            assert_eq!(
                mirror.value(&format!("count/{option}")),
                Some(&json!(count)),
                "count/{option}"
            );
        }
        assert_eq!(mirror.value("total"), Some(&json!(9)));
    }
    assert_eq!(mirrors[0].entries, mirrors[1].entries);
    assert_eq!(mirrors[1].entries, mirrors[2].entries);
    let state = same_everywhere(&nodes, owner, &format!("/api/rooms/{room}")).await;
    assert_eq!(state["seq"], head);

    // The creator closes it through a non-owner; a vote through any node is refused.
    host.ack("close", room, json!({"type": "close"})).await;
    for node in &nodes {
        let mut late = node.client("late").await;
        let code = late
            .nack("v", room, json!({"type": "vote", "option": 0}))
            .await;
        assert_eq!(code, "closed");
    }
}

/// Starts node `id` of `a,b,c` as the rock-paper-scissors example (`examples/rps.rs`,
/// built on `roomd::Server`, so it takes the cluster flags like `roomd`).
async fn start_rps_node(nats: &Nats, id: &str) -> Server {
    let args = node_args(nats, id, "a,b,c");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_example("rps", None, &args).await
}

#[tokio::test]
async fn rps_across_nodes_hides_the_first_move_on_every_node_and_read_path() {
    use crate::rps::{
        acked, assert_no_trace, check_http_paths, check_round_events, diffs_through, entry, nacked,
        play, sub, ROOM,
    };
    let nats = Nats::start().await;
    let mut nodes = Vec::new();
    for id in ["a", "b", "c"] {
        nodes.push(start_rps_node(&nats, id).await);
    }
    let owner = owner_of(3, ROOM);
    let (n1, n2) = ((owner + 1) % 3, (owner + 2) % 3);
    // The players on the two other nodes, the spectator on the owner.
    let mut alice = nodes[n1].client("alice").await;
    let mut bob = nodes[n2].client("bob").await;
    let mut carol = nodes[owner].client("carol").await;
    alice
        .send_json(json!({"t": "create", "id": "c", "room": ROOM, "kind": "rps", "init": {}}))
        .await;
    let created = alice.recv_until(|v| v["id"] == "c").await;
    assert_eq!(created["t"], "ack", "{created}");
    for client in [&mut alice, &mut bob, &mut carol] {
        let snapshot = sub(client, None).await;
        assert_eq!(snapshot["kind"], "rps");
    }
    acked(&mut alice, "j1", json!({"type": "join"})).await;
    let joined = acked(&mut bob, "j1", json!({"type": "join"})).await;
    assert_eq!(
        nacked(&mut carol, "j1", json!({"type": "join"})).await,
        "forbidden"
    );

    // Round 1: alice moves first; only she sees it, on any node.
    let first = acked(&mut alice, "m1", play("rock")).await;
    let seen = diffs_through(&mut alice, first).await;
    let mine = seen.last().expect("a diff");
    assert_eq!(
        entry(&mine["changes"], "move/alice").expect("her move")["v"],
        "rock"
    );
    let hidden = ["move/alice", "rock"];
    for (name, client) in [("bob", &mut bob), ("carol", &mut carol)] {
        let frames = diffs_through(client, first).await;
        assert_no_trace(
            &serde_json::Value::Array(frames),
            &hidden,
            &format!("diffs to {name}"),
        );
        let snapshot = sub(client, None).await;
        assert_no_trace(&snapshot, &hidden, &format!("snapshot to {name}"));
        let epoch = snapshot["epoch"].clone();
        let resumed = sub(client, Some(json!({"epoch": epoch, "seq": joined}))).await;
        assert_eq!(resumed["t"], "resumed", "{resumed}");
        assert_no_trace(&resumed, &hidden, &format!("resumed to {name}"));
        for node in &nodes {
            check_http_paths(node, name, first, &hidden).await;
        }
    }
    for node in &nodes {
        let own = node.get(&format!("/api/rooms/{ROOM}?user=alice")).await;
        assert_eq!(
            entry(&own.body["entries"], "move/alice").expect("her move")["v"],
            "rock"
        );
    }

    // Bob's move ends the round, seen by all on every node.
    let second = acked(&mut bob, "m1", play("paper")).await;
    for client in [&mut alice, &mut bob, &mut carol] {
        let frames = diffs_through(client, second).await;
        let changes = &frames.last().expect("a diff")["changes"];
        assert_eq!(
            entry(changes, "last").expect("the round's result")["v"],
            json!({"round": 1, "moves": {"alice": "rock", "bob": "paper"}, "winner": "bob"})
        );
    }
    for node in &nodes {
        check_round_events(node, joined, first, second).await;
    }

    // Round 2: bob moves first, then the owner is killed and restarted.
    let hidden = ["move/bob", "scissors"];
    let third = acked(&mut bob, "m2", play("scissors")).await;
    let _ = diffs_through(&mut bob, third).await;
    nodes[owner].kill9().await;
    nodes[owner].restart().await;
    for node in &nodes {
        for name in ["alice", "carol"] {
            check_http_paths(node, name, third, &hidden).await;
        }
    }
    let fourth = acked(&mut alice, "m2", play("rock")).await;
    let mut watcher = nodes[n2].client("carol").await;
    let snapshot = sub(&mut watcher, None).await;
    assert_eq!(snapshot["seq"], fourth);
    assert_eq!(
        entry(&snapshot["entries"], "last").expect("the round's result")["v"],
        json!({"round": 2, "moves": {"alice": "rock", "bob": "scissors"}, "winner": "alice"})
    );
}

/// The diffs of `room` through seq `to`, each reduced to what every subscriber must
/// agree on (`from`, `to`, `changes`).
async fn diff_bodies(
    client: &mut crate::support::Client,
    room: &str,
    to: u64,
) -> Vec<serde_json::Value> {
    client
        .diffs_until(room, to)
        .await
        .into_iter()
        .map(|d| json!({"from": d["from"], "to": d["to"], "changes": d["changes"]}))
        .collect()
}

#[tokio::test]
async fn many_subscribers_on_a_non_owner_get_every_diff_once_published_and_identical() {
    let nats = Nats::start().await;
    let nodes = three_nodes(&nats).await;
    let room = "state:fanned-out";
    let owner = owner_of(3, room);
    let (far, writer_node) = ((owner + 1) % 3, (owner + 2) % 3);
    let mut writer = nodes[writer_node].client("writer").await;
    writer.create_ok(room, "state", json!({})).await;

    let mut local = nodes[owner].client("local").await;
    let mut reference = Mirror::from_snapshot(&local.sub(room).await);
    let mut far_subs = Vec::new();
    let mut far_mirrors = Vec::new();
    for i in 0..24 {
        let mut client = nodes[far].client(&format!("viewer{i}")).await;
        far_mirrors.push(Mirror::from_snapshot(&client.sub(room).await));
        far_subs.push(client);
    }
    let published_before = nodes[owner]
        .metric("roomd_cluster_feed_messages_total")
        .await;

    // 60 ops sent without waiting, so the room batches them into fewer diffs.
    for i in 0..60 {
        let op = json!({"type": "incr", "key": format!("k{}", i % 7), "by": 1});
        writer.send_op(&format!("o{i}"), room, op).await;
    }
    for i in 0..60 {
        let reply = writer.reply(&format!("o{i}")).await;
        assert_eq!(reply["t"], "ack", "{reply}");
    }
    let head = 61;
    let expected = diff_bodies(&mut local, room, head).await;
    for diff in &expected {
        reference.apply(&json!({"t": "diff", "room": room, "epoch": reference.epoch, "from": diff["from"], "to": diff["to"], "changes": diff["changes"]}));
    }
    assert_eq!(reference.seq, head);
    for (i, (client, mirror)) in far_subs.iter_mut().zip(&mut far_mirrors).enumerate() {
        let got = diff_bodies(client, room, head).await;
        assert_eq!(
            got, expected,
            "viewer{i} on node {far} got other diffs than the owner's own subscriber"
        );
        for diff in client_diffs(room, &mirror.epoch.clone(), &got) {
            mirror.apply(&diff);
        }
        assert_eq!(mirror.entries, reference.entries);
    }
    // Once per batch on the room's subject, not once per remote subscriber.
    let published = nodes[owner]
        .metric("roomd_cluster_feed_messages_total")
        .await
        - published_before;
    assert_eq!(
        published,
        expected.len() as f64,
        "{} diffs, 24 subscribers on node {far}",
        expected.len()
    );
}

/// Diff bodies back as `diff` frames of `room`.
fn client_diffs(room: &str, epoch: &str, bodies: &[serde_json::Value]) -> Vec<serde_json::Value> {
    bodies
        .iter()
        .map(|d| json!({"t": "diff", "room": room, "epoch": epoch, "from": d["from"], "to": d["to"], "changes": d["changes"]}))
        .collect()
}

#[tokio::test]
async fn a_resume_with_since_on_a_non_owner_is_gapless_beside_other_subscribers() {
    let nats = Nats::start().await;
    let nodes = three_nodes(&nats).await;
    let room = "state:resume-far";
    let owner = owner_of(3, room);
    let far = (owner + 1) % 3;
    let mut writer = nodes[owner].client("writer").await;
    writer.create_ok(room, "state", json!({})).await;
    // Another subscriber keeps the room's mirror on the far node the whole time.
    let mut steady = nodes[far].client("steady").await;
    let mut steady_mirror = Mirror::from_snapshot(&steady.sub(room).await);

    let mut leaver = nodes[far].client("leaver").await;
    let mut mirror = Mirror::from_snapshot(&leaver.sub(room).await);
    writer.ack("w1", room, incr()).await;
    for diff in leaver.diffs_until(room, 2).await {
        mirror.apply(&diff);
    }
    drop(leaver);
    for i in 2..6 {
        writer.ack(&format!("w{i}"), room, incr()).await;
    }
    let mut back = nodes[far].client("leaver").await;
    let resumed = back
        .sub_msg(
            json!({"t": "sub", "room": room, "since": {"epoch": mirror.epoch, "seq": mirror.seq}}),
        )
        .await;
    assert_eq!(resumed["t"], "resumed", "{resumed}");
    mirror.apply(&resumed);
    assert_eq!(mirror.seq, 6);
    for i in 6..9 {
        writer.ack(&format!("w{i}"), room, incr()).await;
    }
    for diff in back.diffs_until(room, 9).await {
        mirror.apply(&diff);
    }
    for diff in steady.diffs_until(room, 9).await {
        steady_mirror.apply(&diff);
    }
    assert_eq!(mirror.value("n"), Some(&json!(8)));
    assert_eq!(mirror.entries, steady_mirror.entries);
}

#[tokio::test]
async fn hidden_entries_stay_hidden_on_every_node() {
    let nats = Nats::start().await;
    let mut nodes = Vec::new();
    for id in ["a", "b", "c"] {
        nodes.push(start_rps_node(&nats, id).await);
    }
    let room = "rps:across";
    let owner = owner_of(3, room);
    let (far, third) = ((owner + 1) % 3, (owner + 2) % 3);
    // Alice and a spectator on one non-owner, bob on the other, a spectator at home.
    let mut alice = nodes[far].client("alice").await;
    let mut carol = nodes[far].client("carol").await;
    let mut bob = nodes[third].client("bob").await;
    let mut dave = nodes[owner].client("dave").await;
    alice.create_ok(room, "rps", json!({})).await;
    for client in [&mut alice, &mut carol, &mut bob, &mut dave] {
        client.sub(room).await;
    }
    assert_eq!(alice.ack("j", room, json!({"type": "join"})).await, 2);
    bob.ack("j", room, json!({"type": "join"})).await;
    let first = alice
        .ack("m1", room, json!({"type": "move", "move": "rock"}))
        .await;
    let own = alice.diffs_until(room, first).await;
    let last = own.last().expect("a diff");
    assert!(
        last["changes"].to_string().contains("move/alice"),
        "alice sees her own move on a non-owner: {last}"
    );
    for (name, client) in [
        ("carol", &mut carol),
        ("bob", &mut bob),
        ("dave", &mut dave),
    ] {
        let seen = client.diffs_until(room, first).await;
        let text = serde_json::Value::Array(seen).to_string();
        for needle in ["move/alice", "rock"] {
            assert!(!text.contains(needle), "{name} saw {needle}: {text}");
        }
    }
    // The round ends: everyone learns both moves, and nobody is told of a deletion of
    // an entry they never saw.
    let second = bob
        .ack("m1", room, json!({"type": "move", "move": "paper"}))
        .await;
    for (name, client) in [
        ("alice", &mut alice),
        ("carol", &mut carol),
        ("bob", &mut bob),
        ("dave", &mut dave),
    ] {
        let seen = client.diffs_until(room, second).await;
        let last = seen.last().expect("a diff");
        assert_eq!(last["to"], second, "{name}: {last}");
        let text = last["changes"].to_string();
        assert!(text.contains("\"winner\":\"bob\""), "{name}: {text}");
        assert_eq!(
            text.contains("move/alice"),
            name == "alice",
            "only alice saw move/alice, so only she hears of its deletion ({name}): {text}"
        );
    }
    // A new subscription on a non-owner during the next round's first move hides it too.
    let third_move = bob
        .ack("m2", room, json!({"type": "move", "move": "scissors"}))
        .await;
    let mut erin = nodes[far].client("erin").await;
    let snapshot = erin.sub(room).await;
    assert!(snapshot["seq"].as_u64() >= Some(third_move), "{snapshot}");
    assert!(!snapshot.to_string().contains("scissors"), "{snapshot}");
    let seen = carol.diffs_until(room, third_move).await;
    assert!(!serde_json::Value::Array(seen)
        .to_string()
        .contains("scissors"));
}

#[tokio::test]
async fn an_admin_disconnect_closes_the_users_connections_on_every_node() {
    let nats = Nats::start().await;
    let nodes = three_nodes(&nats).await;
    let mut on_a = nodes[0].client("mallory").await;
    let mut on_c = nodes[2].client("mallory").await;
    let mut other = nodes[2].client("trent").await;
    let closed = nodes[1]
        .post("/api/users/mallory/disconnect", &json!({}))
        .await;
    assert_eq!(
        (closed.status, &closed.body),
        (200, &json!({"closed": 2, "partial": false})),
        "{}",
        closed.text
    );
    on_a.expect_close(4403).await;
    on_c.expect_close(4403).await;
    other.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn nodes_stop_on_sigterm_with_exit_0_and_no_panic() {
    let nats = Nats::start().await;
    let mut nodes = three_nodes(&nats).await;
    let room = "state:stopping";
    let owner = owner_of(nodes.len(), room);
    let other = (owner + 1) % 3;
    // Every kind of NATS subscription a node holds: the member check, forwarded ops and
    // their answers, and a remote subscription.
    let mut writer = nodes[other].client("writer").await;
    writer.create_ok(room, "state", json!({})).await;
    writer.ack("w1", room, incr()).await;
    let mut watcher = nodes[other].client("watcher").await;
    watcher.sub(room).await;

    for node in [other, owner, (owner + 2) % 3] {
        nodes[node].terminate();
        let status = nodes[node].wait_exit(Duration::from_secs(20)).await;
        let stderr = nodes[node].stderr();
        assert!(status.success(), "node exited with {status}:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
