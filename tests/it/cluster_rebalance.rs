//! Moving rooms when the member list changes: `roomd cluster rebalance` run as the
//! operator would, against real nodes on one real nats-server, while clients keep
//! writing and subscribing in literal JSON. What must hold: every acked op is in its
//! room's log exactly once, at its acked seq, on whichever node owns the room after
//! the move; a re-sent op id gets its original ack; subscribers resume without a gap
//! (same epoch, seq continuing); a node restarted later comes up with the new list;
//! a rebalance with a node missing changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::json;

use crate::cluster::{node_args, owner_of, readyz_until, start_node, start_node_with_env, Nats};
use crate::support::{roomd_bin, Client, Server, TIMEOUT};

/// The test hook that holds each of a node's commits this many milliseconds.
const COMMIT_DELAY: &str = "ROOMD_TEST_COMMIT_DELAY_MS";

/// How long a client keeps re-sending one op (the same id) while its room moves.
const RETRY_FOR: Duration = Duration::from_secs(30);

/// Runs `roomd cluster rebalance ARGS` on `nats` (cluster `test`); (success, output).
fn rebalance(nats: &Nats, args: &[&str]) -> (bool, String) {
    rebalance_at(&nats.url(), args)
}

/// [`rebalance`] on the NATS at `url`.
fn rebalance_at(url: &str, args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new(roomd_bin())
        .args(["cluster", "rebalance", "--cluster-nats", url])
        .args(["--cluster-name", "test"])
        .args(args)
        .output()
        .expect("roomd can be run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// An acked op: (room, op id, seq).
type Acked = Vec<(String, String, u64)>;

/// Writes `set` ops with unique keys to `rooms` in turn through `node` until `stop`,
/// re-sending an op with its id while it is nacked `unavailable` or `rate_limited`.
async fn writer(node: &Server, name: String, rooms: Vec<String>, stop: Arc<AtomicBool>) -> Acked {
    let mut client = node.client(&name).await;
    let mut acked = Vec::new();
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let room = &rooms[n % rooms.len()];
        let id = format!("{name}-{n}");
        let op = json!({"type": "set", "key": id, "value": n});
        let deadline = Instant::now() + RETRY_FOR;
        loop {
            let reply = client.op(&id, room, op.clone()).await;
            if reply["t"] == "ack" {
                acked.push((
                    room.clone(),
                    id.clone(),
                    reply["seq"].as_u64().expect("seq"),
                ));
                break;
            }
            let code = reply["code"].as_str().unwrap_or_default();
            assert!(
                code == "unavailable" || code == "rate_limited",
                "{id} on {room}: {reply}"
            );
            assert!(
                Instant::now() < deadline,
                "{id} on {room} never acked: {reply}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    acked
}

/// What a subscriber saw of one room.
#[derive(Debug, Default, Clone)]
struct Seen {
    epoch: String,
    seq: u64,
    /// Times the room told it `unavailable` (moving) and it subscribed again.
    resubscribed: u32,
}

/// Subscribes to `rooms` through `node` and follows them, checking every frame
/// continues the last (same epoch, `from` = last seq + 1); on `error` `unavailable` it
/// subscribes again with `since`. Ends once `targets` is set and every room reached
/// its target seq.
async fn subscriber(
    node: &Server,
    rooms: Vec<String>,
    targets: Arc<Mutex<Option<HashMap<String, u64>>>>,
) -> HashMap<String, Seen> {
    let mut client = node.client("watcher").await;
    let mut seen: HashMap<String, Seen> = HashMap::new();
    for room in &rooms {
        let snapshot = client.sub(room).await;
        seen.insert(
            room.clone(),
            Seen {
                epoch: snapshot["epoch"].as_str().expect("epoch").to_owned(),
                seq: snapshot["seq"].as_u64().expect("seq"),
                resubscribed: 0,
            },
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(targets) = targets.lock().as_ref() {
            if targets.iter().all(|(room, head)| seen[room].seq >= *head) {
                return seen;
            }
        }
        assert!(
            Instant::now() < deadline,
            "subscriber never caught up: {seen:?}"
        );
        let frame = match tokio::time::timeout(Duration::from_millis(200), client.recv_json()).await
        {
            Ok(frame) => frame,
            Err(_) => continue,
        };
        let Some(room) = frame["room"].as_str().map(str::to_owned) else {
            continue;
        };
        let Some(state) = seen.get_mut(&room) else {
            continue;
        };
        match frame["t"].as_str() {
            Some("diff") | Some("resumed") => {
                assert_eq!(frame["epoch"], json!(state.epoch), "{room}: {frame}");
                let (from, to) = (frame["from"].as_u64(), frame["to"].as_u64());
                assert_eq!(from, Some(state.seq + 1), "{room} has a gap: {frame}");
                state.seq = to.expect("to").max(state.seq);
            }
            Some("snapshot") => {
                panic!("{room}: a snapshot where a gapless resume was due: {frame}")
            }
            Some("error") => {
                assert_eq!(frame["code"], "unavailable", "{room}: {frame}");
                state.resubscribed += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                client
                    .send_json(json!({"t": "sub", "room": room,
                        "since": {"epoch": state.epoch, "seq": state.seq}}))
                    .await;
            }
            _ => {}
        }
    }
}

/// The retained log of `room` (read through `node`, which asks the owner): (op key,
/// seq) of each event.
async fn log_of(node: &Server, room: &str) -> Vec<(String, u64)> {
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let page = node
            .get(&format!(
                "/api/rooms/{room}/events?after={after}&limit=1000"
            ))
            .await;
        assert_eq!(page.status, 200, "{}", page.text);
        let list = page.body["events"].as_array().expect("events").clone();
        if list.is_empty() {
            return events;
        }
        for event in list {
            let seq = event["seq"].as_u64().expect("seq");
            if let Some(key) = event["op"]["key"].as_str() {
                events.push((key.to_owned(), seq));
            }
            after = seq;
        }
    }
}

/// Checks every acked op is in its room's log once, at its seq.
async fn check_logs(nodes: &[&Server], rooms: &[String], acked: &Acked) -> HashMap<String, u64> {
    let mut heads = HashMap::new();
    for room in rooms {
        let log = log_of(nodes[0], room).await;
        // Every node reads the same log (each asks the owner).
        for node in &nodes[1..] {
            assert_eq!(log_of(node, room).await, log, "{room}");
        }
        let mut by_key: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for (key, seq) in &log {
            by_key.entry(key.as_str()).or_default().push(*seq);
        }
        for (_, id, seq) in acked.iter().filter(|(r, _, _)| r == room) {
            assert_eq!(
                by_key.get(id.as_str()),
                Some(&vec![*seq]),
                "{id} acked at {seq} in {room}"
            );
        }
        heads.insert(room.clone(), log.last().map_or(1, |(_, seq)| *seq));
    }
    heads
}

/// Writers on two nodes and a subscriber on a third follow `rooms` while `change` runs;
/// then every check of the module docs. Returns the acked ops.
async fn under_load<F: std::future::Future<Output = ()>>(
    writers_on: [&Server; 2],
    watcher_on: &Server,
    everyone: &[&Server],
    rooms: &[String],
    change: F,
) -> Acked {
    let stop = Arc::new(AtomicBool::new(false));
    let targets = Arc::new(Mutex::new(None));
    let watching = subscriber(watcher_on, rooms.to_vec(), targets.clone());
    let writing = async {
        let (one, two) = tokio::join!(
            writer(writers_on[0], "w1".into(), rooms.to_vec(), stop.clone()),
            writer(
                writers_on[1],
                "w2".into(),
                rooms.iter().rev().cloned().collect(),
                stop.clone()
            ),
        );
        [one, two].concat()
    };
    let driving = async {
        // Some load before and after the change.
        tokio::time::sleep(Duration::from_millis(500)).await;
        change.await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
    };
    let checking = async {
        let (acked, _) = tokio::join!(writing, driving);
        let heads = check_logs(everyone, rooms, &acked).await;
        *targets.lock() = Some(heads);
        acked
    };
    let (seen, acked) = tokio::join!(watching, checking);
    let moved: u32 = seen.values().map(|s| s.resubscribed).sum();
    assert!(moved > 0, "no subscription was moved: {seen:?}");
    eprintln!(
        "{} ops acked, {moved} subscriptions resumed after a move",
        acked.len()
    );
    acked
}

fn rooms() -> Vec<String> {
    (0..24).map(|i| format!("state:moving-{i}")).collect()
}

#[tokio::test]
async fn adding_then_removing_a_node_under_load_loses_and_repeats_no_acked_op() {
    let nats = Nats::start().await;
    let a = start_node(&nats, "a", "a,b").await;
    let b = start_node(&nats, "b", "a,b").await;
    let rooms = rooms();
    let mut setup = a.client("setup").await;
    for room in &rooms {
        setup.create_ok(room, "state", json!({})).await;
    }
    // A third node started with the new list waits outside, owning nothing.
    let c = start_node(&nats, "c", "a,b,c").await;
    readyz_until(&c, TIMEOUT, |body| {
        body["cluster"]["membership"] == "outside"
            && body["cluster"]["members"] == json!(["a", "b"])
    })
    .await;

    let acked = under_load([&a, &c], &b, &[&a, &b, &c], &rooms, async {
        let (ok, out) = rebalance(&nats, &["--to", "a,b,c"]);
        eprintln!("{out}");
        assert!(ok, "{out}");
        assert!(out.contains("committed generation 1 (a,b,c)"), "{out}");
    })
    .await;
    for node in [&a, &b, &c] {
        readyz_until(node, TIMEOUT, |body| {
            body["cluster"]["generation"] == 1 && body["cluster"]["membership"] == "member"
        })
        .await;
    }
    let nodes = [a, b, c];
    let on_c: Vec<&String> = rooms.iter().filter(|r| owner_of(3, r) == 2).collect();
    assert!(!on_c.is_empty(), "no room moved to c");

    // A re-sent op id of a moved room gets its original ack from the new owner.
    let (room, id, seq) = acked
        .iter()
        .find(|(room, _, _)| on_c.contains(&room))
        .expect("an op acked in a room that moved")
        .clone();
    let mut again = nodes[0]
        .client(if id.starts_with("w1") { "w1" } else { "w2" })
        .await;
    let reply = again
        .op(&id, &room, json!({"type": "set", "key": id, "value": -1}))
        .await;
    assert_eq!(reply, json!({"t": "ack", "id": id, "seq": seq}));

    // A node restarted later comes up with the committed list.
    let [mut a, b, mut c] = nodes;
    c.kill9().await;
    c.restart().await;
    readyz_until(&c, TIMEOUT, |body| {
        body["cluster"]["generation"] == 1 && body["cluster"]["members"] == json!(["a", "b", "c"])
    })
    .await;

    // Removing b: its rooms move to a and c, under load again.
    under_load([&a, &c], &a, &[&a, &b, &c], &rooms, async {
        let (ok, out) = rebalance(&nats, &["--to", "a,c"]);
        assert!(ok, "{out}");
        assert!(out.contains("committed generation 2 (a,c)"), "{out}");
    })
    .await;
    readyz_until(&b, TIMEOUT, |body| {
        body["cluster"]["membership"] == "outside"
    })
    .await;

    // A node restarted with a list other than the one it kept is refused, naming both.
    a.kill9().await;
    let stderr = refused_start(&a, &node_args(&nats, "a", "a,b")).await;
    assert!(
        stderr.contains("keeps the member list a,c (generation 2")
            && stderr.contains("start with --cluster-nodes a,c"),
        "{stderr}"
    );
}

/// Runs roomd on `server`'s (stopped) data dir with `args`; it must exit, not serve.
/// Returns its stderr.
async fn refused_start(server: &Server, args: &[String]) -> String {
    let mut child = std::process::Command::new(roomd_bin())
        .args(["--bind", "127.0.0.1:0", "--data-dir"])
        .arg(server.data_dir())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("roomd can be run");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().expect("the child can be polled") {
            assert!(!status.success());
            let mut stderr = String::new();
            use std::io::Read;
            let _ = child
                .stderr
                .take()
                .map(|mut e| e.read_to_string(&mut stderr));
            return stderr;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("roomd started where it had to refuse");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_rebalance_with_a_node_down_refuses_and_changes_nothing() {
    let nats = Nats::start().await;
    let a = start_node(&nats, "a", "a,b").await;
    let _b = start_node(&nats, "b", "a,b").await;
    let mut client = a.client("u").await;
    client.create_ok("state:stays", "state", json!({})).await;
    let (ok, out) = rebalance(&nats, &["--to", "a,b,c"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("node c not running") && out.contains("nothing changed"),
        "{out}"
    );
    readyz_until(&a, TIMEOUT, |body| {
        body["cluster"]["generation"] == 0 && body["cluster"]["members"] == json!(["a", "b"])
    })
    .await;
    assert!(!a.data_dir().join("CLUSTER").exists());
    assert_eq!(
        client
            .ack(
                "x",
                "state:stays",
                json!({"type": "set", "key": "k", "value": 1})
            )
            .await,
        2
    );
}

/// `n` room names that `a,b,c` gives to `c` (rendezvous hashing, as the README says).
fn rooms_moving_to_c(prefix: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("state:{prefix}-{i}"))
        .filter(|room| owner_of(3, room) == 2)
        .take(n)
        .collect()
}

fn set(key: &str) -> serde_json::Value {
    json!({"type": "set", "key": key, "value": 1})
}

/// A subscription made through a node that does not own the room ends at the move like
/// a local one: after its `error` `unavailable`, nothing of the room reaches the client
/// until the answer to its new `sub`, even while that node follows the room for another
/// subscriber and the new owner commits in between; the resume continues the seq with
/// no gap and no repeat.
#[tokio::test]
async fn a_subscription_through_another_node_hears_nothing_of_its_moved_room_until_it_resumes() {
    let nats = Nats::start().await;
    let a = start_node(&nats, "a", "a,b").await;
    let b = start_node(&nats, "b", "a,b").await;
    let c = start_node(&nats, "c", "a,b,c").await;
    readyz_until(&c, TIMEOUT, |body| {
        body["cluster"]["membership"] == "outside"
    })
    .await;
    // A room a owns now and c after the move, watched through b.
    let room = rooms_moving_to_c("relayed", 40)
        .into_iter()
        .find(|room| owner_of(2, room) == 0)
        .expect("a room that moves from a to c");
    let of_room = |v: &serde_json::Value| v["room"] == json!(room);
    let mut writer = a.client("w").await;
    writer.create_ok(&room, "state", json!({})).await;
    let mut watcher = b.client("watcher").await;
    let epoch = watcher.sub(&room).await["epoch"].clone();
    assert_eq!(writer.ack("w-2", &room, set("k2")).await, 2);
    let diff = watcher.recv_until(of_room).await;
    assert_eq!(
        (&diff["t"], &diff["to"]),
        (&json!("diff"), &json!(2)),
        "{diff}"
    );

    let (ok, out) = rebalance(&nats, &["--to", "a,b,c"]);
    assert!(
        ok && out.contains("committed generation 1 (a,b,c)"),
        "{out}"
    );
    let error = watcher.recv_until(of_room).await;
    assert_eq!(
        (&error["t"], &error["code"]),
        (&json!("error"), &json!("unavailable")),
        "{error}"
    );

    // Another subscriber on b: c feeds the room to b again, and commits seq 3.
    let mut other = b.client("other").await;
    assert_eq!(other.sub(&room).await["seq"], 2);
    let mut on_c = c.client("w").await;
    assert_eq!(on_c.ack("w-3", &room, set("k3")).await, 3);
    let diff = other.recv_until(of_room).await;
    assert_eq!(
        (&diff["from"], &diff["to"]),
        (&json!(3), &json!(3)),
        "{diff}"
    );

    // The watcher resumes from the last seq it saw: the answer is the first frame of
    // the room since the error (b fanned seq 3 out to `other` before the `sub` left).
    watcher
        .send_json(json!({"t": "sub", "room": room, "since": {"epoch": epoch, "seq": 2}}))
        .await;
    let frames = watcher.collect_until(of_room).await;
    let answer = frames.last().expect("collected up to the answer");
    assert_eq!(
        (&answer["t"], &answer["from"], &answer["to"]),
        (&json!("resumed"), &json!(3), &json!(3)),
        "the first frame of {room} after its error: {frames:?}"
    );
    assert_eq!(answer["epoch"], epoch);
    // Then the next diff, once.
    assert_eq!(on_c.ack("w-4", &room, set("k4")).await, 4);
    let diff = watcher.recv_until(of_room).await;
    assert_eq!(
        (&diff["t"], &diff["from"], &diff["to"]),
        (&json!("diff"), &json!(4), &json!(4)),
        "{diff}"
    );
}

/// A commit that reaches some nodes and not others leaves them routing a moved room by
/// two member lists, as between two nodes' commits of any rebalance (held open here:
/// `c` cannot write its list, so only `a` and `b` take it). A request that reaches a
/// node that does not own its room is answered there, never dropped: through every
/// node, a `sub` gets an `error` `unavailable` for the room saying why, an op a `nack`
/// `unavailable`, a read and an SSE stream a 503 with the same reason; once `c` has the
/// list, the same requests re-sent get the room, gaplessly, with the op applied once.
#[tokio::test]
async fn requests_a_node_routes_to_a_non_owner_by_another_member_list_are_refused_unavailable() {
    let nats = Nats::start().await;
    let a = start_node(&nats, "a", "a,b").await;
    let b = start_node(&nats, "b", "a,b").await;
    let mut c = start_node(&nats, "c", "a,b,c").await;
    readyz_until(&c, TIMEOUT, |body| {
        body["cluster"]["membership"] == "outside"
    })
    .await;
    let room = rooms_moving_to_c("split", 40)
        .into_iter()
        .find(|room| owner_of(2, room) == 0)
        .expect("a room that moves from a to c");
    let of_room = |v: &serde_json::Value| v["room"] == json!(room);
    let mut writer = a.client("w").await;
    writer.create_ok(&room, "state", json!({})).await;
    assert_eq!(writer.ack("w-2", &room, set("k2")).await, 2);
    let epoch = a.get(&format!("/api/rooms/{room}")).await.body["epoch"].clone();

    // Where c would write its list, a directory: its commit fails, a's and b's do not.
    let blocker = c.data_dir().join("CLUSTER.tmp");
    std::fs::create_dir(&blocker).expect("c's data dir is writable");
    let (ok, out) = rebalance(&nats, &["--to", "a,b,c"]);
    assert!(
        !ok && out.contains("committed on a,b but not on c"),
        "{out}"
    );
    // a and b route the room to c, which routes it to a by the list it keeps.
    let sub = json!({"t": "sub", "room": room, "since": {"epoch": epoch, "seq": 2}});
    for (node, not_owner) in [(&a, "c"), (&b, "c"), (&c, "a")] {
        let mut client = node.client("late").await;
        let answer = client.sub_msg(sub.clone()).await;
        assert_eq!(
            (&answer["t"], &answer["code"]),
            (&json!("error"), &json!("unavailable")),
            "sub through {}: {answer}",
            node.host()
        );
        let msg = answer["msg"].as_str().expect("a message");
        assert!(
            msg.contains(&format!("node {not_owner} does not own room {room}"))
                && msg.contains("retry"),
            "{msg}"
        );
        let nack = client.op("w-3", &room, set("k3")).await;
        assert_eq!(
            (&nack["t"], &nack["code"]),
            (&json!("nack"), &json!("unavailable")),
            "{nack}"
        );
        let read = node.get(&format!("/api/rooms/{room}")).await;
        assert_eq!(
            (read.status, read.code()),
            (503, "unavailable"),
            "{}",
            read.text
        );
        let stream = node.get(&format!("/api/rooms/{room}/stream")).await;
        assert_eq!(stream.status, 503, "{}", stream.text);
        assert!(
            stream.body["msg"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("node {not_owner} does not own room"))),
            "{}",
            stream.text
        );
    }

    // c restarted with the list, as the tool says: the same requests get the room.
    std::fs::remove_dir(&blocker).expect("the blocker is removed");
    c.restart().await;
    readyz_until(&c, TIMEOUT, |body| {
        body["cluster"]["generation"] == 1 && body["cluster"]["membership"] == "member"
    })
    .await;
    let mut late = b.client("late").await;
    let answer = late.sub_msg(sub).await;
    assert_eq!(
        (
            &answer["t"],
            &answer["from"],
            &answer["to"],
            &answer["epoch"]
        ),
        (&json!("resumed"), &json!(3), &json!(2), &epoch),
        "{answer}"
    );
    assert_eq!(writer.ack("w-3", &room, set("k3")).await, 3);
    let diff = late.recv_until(of_room).await;
    assert_eq!(
        (&diff["t"], &diff["from"], &diff["to"]),
        (&json!("diff"), &json!(3), &json!(3)),
        "{diff}"
    );
}

/// Creates each of `rooms` as a `state` room with one acked op; returns those ops.
async fn create_with_one_op(client: &mut Client, rooms: &[String]) -> Acked {
    let mut acked = Vec::new();
    for room in rooms {
        client.create_ok(room, "state", json!({})).await;
        let id = format!("{room}-1");
        let seq = client
            .ack(&id, room, json!({"type": "set", "key": id, "value": 1}))
            .await;
        acked.push((room.clone(), id, seq));
    }
    acked
}

#[tokio::test]
async fn a_move_that_fails_midway_rolls_back_and_a_second_run_moves_big_rooms_whole() {
    let nats = Nats::start().await;
    let a = start_node(&nats, "a", "a,b").await;
    let b = start_node(&nats, "b", "a,b").await;
    let mut c = start_node(&nats, "c", "a,b,c").await;
    // Enough rooms for two batches (one from a, one from b), each with a few ops.
    let rooms = rooms_moving_to_c("rollback", 40);
    let mut client = a.client("u").await;
    let mut acked = create_with_one_op(&mut client, &rooms).await;
    // A room whose export is several pieces (about 750 KB of values).
    let big = rooms_moving_to_c("big", 1).remove(0);
    client.create_ok(&big, "state", json!({})).await;
    let blob = "x".repeat(30_000);
    for i in 0..25 {
        client
            .ack(
                &format!("big-{i}"),
                &big,
                json!({"type": "set", "key": format!("k{i}"), "value": blob}),
            )
            .await;
    }
    let before = a.get(&format!("/api/rooms/{big}")).await.body;

    // The new node dies after the first batch was copied: the move rolls back.
    let tool = rebalance_until_first_batch(&nats, "a,b,c");
    c.kill9().await;
    let stderr = failed_tool(tool).await;
    assert!(
        stderr.contains("rolled back: the old member list stays in force and nothing was lost"),
        "{stderr}"
    );
    for node in [&a, &b] {
        readyz_until(node, TIMEOUT, |body| {
            body["cluster"]["generation"] == 0 && body["cluster"]["members"] == json!(["a", "b"])
        })
        .await;
    }
    // Every room serves again on its old owner, with everything acked.
    check_logs(&[&a, &b], &rooms, &acked).await;
    for room in &rooms {
        let id = format!("{room}-2");
        let seq = client
            .ack(&id, room, json!({"type": "set", "key": id, "value": 2}))
            .await;
        acked.push((room.clone(), id, seq));
    }

    // Back, c waits outside again, with the move it missed the end of still pending
    // (kept in its data dir): a new run is refused until `--abort`, as the tool said.
    c.restart().await;
    readyz_until(&c, TIMEOUT, |body| {
        body["cluster"]["membership"] == "outside"
    })
    .await;
    let (ok, out) = rebalance(&nats, &["--to", "a,b,c"]);
    assert!(!ok && out.contains("node c is already in move"), "{out}");
    let (ok, out) = rebalance(&nats, &["--abort"]);
    assert!(ok, "{out}");
    // A second run moves everything, big room included.
    let (ok, out) = rebalance(&nats, &["--to", "a,b,c"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("committed generation 1 (a,b,c): 41 rooms moved"),
        "{out}"
    );
    check_logs(&[&a, &b, &c], &rooms, &acked).await;
    let after = c.get(&format!("/api/rooms/{big}")).await.body;
    assert_eq!(after, before);
    let mut on_c = c.client("u").await;
    let reply = on_c
        .op(
            "big-3",
            &big,
            json!({"type": "set", "key": "k3", "value": blob}),
        )
        .await;
    assert_eq!(reply["t"], "ack", "{reply}");
    assert_eq!(reply["seq"], before["seq"].as_u64().unwrap() - 21);
}

/// Waits for a running tool to end, which must be a failure; returns its stderr.
async fn failed_tool(tool: std::process::Child) -> String {
    let output = tokio::task::spawn_blocking(move || tool.wait_with_output())
        .await
        .expect("joined")
        .expect("the tool ends");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{stderr}");
    stderr
}

/// Starts `roomd cluster rebalance --to LIST` and returns once it printed its first
/// batch, with the running tool.
fn rebalance_until_first_batch(nats: &Nats, to: &str) -> std::process::Child {
    let mut tool = std::process::Command::new(roomd_bin())
        .args(["cluster", "rebalance", "--cluster-nats", &nats.url()])
        .args(["--cluster-name", "test", "--to", to])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("roomd can be run");
    let stdout = tool.stdout.take().expect("piped");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match lines_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.starts_with("round 1:") => return tool,
            Ok(_) => {}
            Err(_) => {
                let _ = tool.kill();
                let _ = tool.wait();
                panic!("the tool printed no batch");
            }
        }
    }
}

#[tokio::test]
async fn an_old_owner_restarted_mid_move_keeps_its_rooms_frozen_until_the_move_is_aborted() {
    let nats = Nats::start().await;
    let mut a = start_node(&nats, "a", "a,b").await;
    let b = start_node(&nats, "b", "a,b").await;
    let _c = start_node(&nats, "c", "a,b,c").await;
    let rooms = rooms_moving_to_c("restart", 40);
    let mut client = b.client("u").await;
    let acked = create_with_one_op(&mut client, &rooms).await;
    // The first batch comes from a (batches go in node order); a dies right after it.
    let tool = rebalance_until_first_batch(&nats, "a,b,c");
    a.kill9().await;
    let stderr = failed_tool(tool).await;
    assert!(
        stderr.contains("rolled back") && stderr.contains("--abort"),
        "{stderr}"
    );

    // Restarted, a takes the pending move back: the rooms it had frozen stay frozen.
    a.restart().await;
    let frozen: Vec<&String> = rooms.iter().filter(|r| owner_of(2, r) == 0).collect();
    assert!(!frozen.is_empty());
    let reply = client
        .op(
            "probe",
            frozen[0],
            json!({"type": "set", "key": "probe", "value": 0}),
        )
        .await;
    assert_eq!(reply["code"], "unavailable", "{reply}");
    assert!(a.data_dir().join("CLUSTER.move").exists());

    // --abort finishes the rollback: everything serves again, nothing acked is lost.
    let (ok, out) = rebalance(&nats, &["--abort"]);
    assert!(ok, "{out}");
    assert!(!a.data_dir().join("CLUSTER.move").exists());
    let reply = client
        .op(
            "probe",
            frozen[0],
            json!({"type": "set", "key": "probe", "value": 0}),
        )
        .await;
    assert_eq!(reply["t"], "ack", "{reply}");
    check_logs(&[&a, &b], &rooms, &acked).await;
}

#[tokio::test]
async fn a_room_whose_creation_is_still_being_committed_when_the_move_begins_moves_too() {
    let nats = Nats::start().await;
    // a holds each commit 3 s (a test hook), so the creations sent below are accepted
    // by their rooms but not yet in a's store when the rebalance lists what to move.
    let a = start_node_with_env(&nats, "a", "a,b", &[(COMMIT_DELAY, "3000")]).await;
    let b = start_node(&nats, "b", "a,b").await;
    let c = start_node(&nats, "c", "a,b,c").await;
    readyz_until(&c, TIMEOUT, |body| {
        body["cluster"]["membership"] == "outside"
    })
    .await;
    // Rooms a owns now and c owns after the move.
    let rooms: Vec<String> = rooms_moving_to_c("racing", 40)
        .into_iter()
        .filter(|room| owner_of(2, room) == 0)
        .take(6)
        .collect();
    assert_eq!(rooms.len(), 6);
    let mut client = a.client("u").await;
    for room in &rooms {
        client
            .send_json(
                json!({"t": "create", "id": format!("create-{room}"), "room": room,
                "kind": "state", "init": {}}),
            )
            .await;
    }
    // Their rooms take them in well under this; their commits are still held.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let url = nats.url();
    let (ok, out) = tokio::task::spawn_blocking(move || rebalance_at(&url, &["--to", "a,b,c"]))
        .await
        .expect("joined");
    assert!(ok, "{out}");
    assert!(out.contains("committed generation 1 (a,b,c)"), "{out}");
    assert!(
        out.contains("a -> c"),
        "the held rooms were not moved: {out}"
    );

    let mut acked = Vec::new();
    for room in &rooms {
        let reply = client.reply(&format!("create-{room}")).await;
        match reply["t"].as_str() {
            Some("ack") => {
                assert_eq!(reply["seq"], 1, "{reply}");
                acked.push(room.clone());
            }
            // Accepted after the move began: refused, which is the contract too.
            _ => assert_eq!(reply["code"], "unavailable", "{reply}"),
        }
    }
    assert!(
        !acked.is_empty(),
        "no creation was accepted before the move began"
    );
    // Every acked creation is on c, the new owner, read through every node; an op on it
    // through a is served by c and continues the log.
    for room in &acked {
        for node in [&a, &b, &c] {
            let state = node.get(&format!("/api/rooms/{room}")).await;
            assert_eq!(
                state.status, 200,
                "{room} through {}: {}",
                node.addr, state.text
            );
            assert_eq!(state.body["seq"], 1, "{room}: {}", state.text);
        }
        let id = format!("{room}-after");
        let reply = client
            .op(&id, room, json!({"type": "set", "key": "k", "value": 1}))
            .await;
        assert_eq!(reply["t"], "ack", "{room}: {reply}");
        assert_eq!(reply["seq"], 2, "{room}: {reply}");
    }
    // The room list (cluster-wide) names each once, on c.
    let listed = b.get("/api/rooms?prefix=state:racing").await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    for room in &acked {
        let entries: Vec<&serde_json::Value> = listed.body["rooms"]
            .as_array()
            .expect("rooms")
            .iter()
            .filter(|r| r["room"] == json!(room))
            .collect();
        assert_eq!(entries.len(), 1, "{room}: {}", listed.text);
        assert_eq!(entries[0]["node"], "c", "{room}: {}", listed.text);
    }
}
