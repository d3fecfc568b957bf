//! Bad input that reaches the store: values at the nesting limit (accepted, and durable),
//! one level deeper (`invalid`, never `unavailable`), and a data file with damaged bytes
//! (the damaged room answers `unavailable`, every other room keeps serving, `roomd log
//! verify` names the damage and exits 1, and nothing panics).

use serde_json::{json, Value};

use crate::support::Server;

/// The deepest value the contract accepts: a scalar is depth 0, `[1]` depth 1.
const MAX_DEPTH: usize = 32;

/// `depth` lists around the integer 1.
fn nested(depth: usize) -> Value {
    (0..depth).fold(json!(1), |inner, _| json!([inner]))
}

/// A `state` init of exactly `depth` levels: `{"entries": {"deep": nested(depth - 2)}}`.
fn init_of_depth(depth: usize) -> Value {
    json!({"entries": {"deep": nested(depth - 2)}})
}

/// A `set` op of exactly `depth` levels: `{"type":"set","key":"deep","value":nested(depth - 1)}`.
fn set_of_depth(depth: usize) -> Value {
    json!({"type": "set", "key": "deep", "value": nested(depth - 1)})
}

/// The value of `key` in the room's state read over HTTP.
async fn entry_value(server: &Server, room: &str, key: &str) -> Value {
    let state = server.room_state(room).await;
    let entries = state["entries"].as_array().expect("entries is a list");
    entries
        .iter()
        .find(|entry| entry["k"] == key)
        .map(|entry| entry["v"].clone())
        .unwrap_or_else(|| panic!("no entry {key} in {state}"))
}

#[tokio::test]
async fn init_and_set_at_depth_32_are_accepted_and_durable_and_33_is_invalid() {
    let mut server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;

    // WebSocket JSON.
    alice
        .create_ok("deep:ws", "state", init_of_depth(MAX_DEPTH))
        .await;
    let refused = alice
        .create("deeper:ws", "state", init_of_depth(MAX_DEPTH + 1))
        .await;
    assert_eq!(refused["t"], "nack", "{refused}");
    assert_eq!(refused["code"], "invalid", "{refused}");
    alice
        .ack("set-32", "deep:ws", set_of_depth(MAX_DEPTH))
        .await;
    let code = alice
        .nack("set-33", "deep:ws", set_of_depth(MAX_DEPTH + 1))
        .await;
    assert_eq!(code, "invalid");

    // HTTP.
    let created = server
        .post(
            "/api/rooms",
            &json!({"room": "deep:http", "kind": "state", "init": init_of_depth(MAX_DEPTH)}),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let refused = server
        .post(
            "/api/rooms",
            &json!({"room": "deeper:http", "kind": "state", "init": init_of_depth(MAX_DEPTH + 1)}),
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.text);
    assert_eq!(refused.body["code"], "invalid", "{}", refused.text);
    let set = server
        .post(
            "/api/rooms/deep:http/ops",
            &json!({"id": "h-32", "op": set_of_depth(MAX_DEPTH)}),
        )
        .await;
    assert_eq!(set.status, 200, "{}", set.text);
    let refused = server
        .post(
            "/api/rooms/deep:http/ops",
            &json!({"id": "h-33", "op": set_of_depth(MAX_DEPTH + 1)}),
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.text);
    assert_eq!(refused.body["code"], "invalid", "{}", refused.text);

    // The refused rooms do not exist; the accepted values survive a restart whole.
    drop(alice);
    server.restart().await;
    for room in ["deeper:ws", "deeper:http"] {
        let missing = server.get(&format!("/api/rooms/{room}")).await;
        assert_eq!(missing.status, 404, "{room}: {}", missing.text);
    }
    for room in ["deep:ws", "deep:http"] {
        assert_eq!(
            entry_value(&server, room, "deep").await,
            nested(MAX_DEPTH - 1)
        );
        let events = server.get(&format!("/api/rooms/{room}/events")).await;
        assert_eq!(events.status, 200, "{}", events.text);
        assert_eq!(
            events.body["events"][0]["op"]["init"],
            init_of_depth(MAX_DEPTH),
            "the creation is logged with its whole init"
        );
    }
    assert!(
        !server.stderr_tail().contains("commit failed"),
        "{}",
        server.stderr_tail()
    );
}

/// redb's page size: a row's page starts at the multiple of it at or below the row.
const PAGE_BYTES: usize = 4096;

/// Flips the first byte (the page type: 1 for a B-tree leaf) of every leaf page of the
/// data file that holds `marker`, returning how many pages it damaged. Pages that hold
/// the marker hold rows of the room that wrote it (or are free), so no other room's rows
/// are touched; redb panics on a page type it does not know.
fn damage_pages_holding(data_dir: &std::path::Path, marker: &str) -> usize {
    let path = data_dir.join("roomd.redb");
    let mut bytes = std::fs::read(&path).expect("the data file can be read");
    let mut pages: Vec<usize> = bytes
        .windows(marker.len())
        .enumerate()
        .filter(|(_, window)| *window == marker.as_bytes())
        .map(|(at, _)| at / PAGE_BYTES * PAGE_BYTES)
        .collect();
    pages.dedup();
    pages.retain(|&page| bytes[page] == 1);
    for &page in &pages {
        bytes[page] ^= 0xff;
    }
    std::fs::write(&path, bytes).expect("the data file can be written");
    pages.len()
}

/// Runs `roomd log ARGS --data-dir DIR` to its end.
fn roomd_log(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_roomd"))
        .arg("log")
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .expect("roomd log runs")
}

#[tokio::test]
async fn a_damaged_page_makes_its_room_unavailable_while_the_others_keep_serving() {
    let dir = tempfile::tempdir().expect("a temporary directory can be created");
    let mut server = Server::start_in(dir.path(), &[]).await;
    let mut alice = server.client("alice").await;
    for room in ["good:a", "bad", "good:b"] {
        alice.create_ok(room, "state", json!({})).await;
    }
    // Rows of about 2 KiB: the damaged room's events fill pages of their own.
    let pad = "x".repeat(1000);
    for i in 1..=30 {
        let value = format!("DAMAGE-ME-{i}-{pad}");
        alice
            .ack(
                &format!("b{i}"),
                "bad",
                json!({"type": "set", "key": format!("k{i}"), "value": value}),
            )
            .await;
    }
    for room in ["good:a", "good:b"] {
        alice
            .ack("g1", room, json!({"type": "set", "key": "k", "value": 1}))
            .await;
    }
    drop(alice);
    server.terminate();
    let status = server.wait_exit(std::time::Duration::from_secs(10)).await;
    assert!(status.success(), "roomd exited with {status} on SIGTERM");
    assert!(damage_pages_holding(dir.path(), "DAMAGE-ME-15-") > 0);

    server.restart().await;
    // The undamaged rooms serve reads and writes, over HTTP and WebSocket.
    let mut bob = server.client("bob").await;
    for room in ["good:a", "good:b"] {
        assert_eq!(entry_value(&server, room, "k").await, json!(1));
        let set = server
            .post(
                &format!("/api/rooms/{room}/ops"),
                &json!({"id": "after-1", "op": {"type": "set", "key": "k", "value": 2}}),
            )
            .await;
        assert_eq!(set.status, 200, "{room}: {}", set.text);
        let snapshot = bob.sub(room).await;
        assert_eq!(snapshot["t"], "snapshot", "{snapshot}");
        bob.ack("after-2", room, json!({"type": "incr", "key": "n"}))
            .await;
    }
    // The damaged room answers `unavailable`, naming the damage, on every path.
    let read = server.get("/api/rooms/bad").await;
    assert_eq!(read.status, 503, "{}", read.text);
    assert_eq!(read.body["code"], "unavailable", "{}", read.text);
    assert!(read.text.contains("damaged"), "{}", read.text);
    let events = server.get("/api/rooms/bad/events").await;
    assert_eq!(events.status, 503, "{}", events.text);
    let write = server
        .post(
            "/api/rooms/bad/ops",
            &json!({"id": "after-1", "op": {"type": "set", "key": "k", "value": 2}}),
        )
        .await;
    assert_eq!(write.status, 503, "{}", write.text);
    let code = bob
        .nack(
            "after-3",
            "bad",
            json!({"type": "set", "key": "k", "value": 3}),
        )
        .await;
    assert_eq!(code, "unavailable");
    // Readiness stays (the other rooms serve) and names the damaged room.
    let ready = server.get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text);
    assert_eq!(ready.body["degraded"], true, "{}", ready.text);
    assert_eq!(ready.body["damaged"][0]["room"], "bad", "{}", ready.text);
    // Writes still commit after all that: the writer thread is alive.
    bob.ack("after-4", "good:a", json!({"type": "incr", "key": "n"}))
        .await;
    let log = server.stderr_tail();
    assert!(log.contains("room is damaged"), "{log}");
    assert!(!log.contains("panicked"), "{log}");

    drop(bob);
    server.terminate();
    let status = server.wait_exit(std::time::Duration::from_secs(10)).await;
    assert!(status.success(), "roomd exited with {status} on SIGTERM");
    let verify = roomd_log(dir.path(), &["verify"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr),
    );
    assert_eq!(verify.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("room bad: events rows cannot be read"),
        "{stdout}{stderr}"
    );
    assert!(!stdout.contains("room good"), "{stdout}{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let rooms = roomd_log(dir.path(), &["rooms"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&rooms.stdout),
        String::from_utf8_lossy(&rooms.stderr),
    );
    assert_eq!(rooms.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("good:a") && stdout.contains("DAMAGED"),
        "{stdout}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The undamaged rooms kept what was written after the damage was found.
    server.restart().await;
    assert_eq!(entry_value(&server, "good:b", "k").await, json!(2));
    assert_eq!(entry_value(&server, "good:a", "n").await, json!(2));
}

/// Changes one letter of `marker`'s every copy in the data file (the rows still decode),
/// returning how many it changed.
fn change_a_letter_of(data_dir: &std::path::Path, marker: &str) -> usize {
    let path = data_dir.join("roomd.redb");
    let mut bytes = std::fs::read(&path).expect("the data file can be read");
    let at: Vec<usize> = bytes
        .windows(marker.len())
        .enumerate()
        .filter(|(_, window)| *window == marker.as_bytes())
        .map(|(at, _)| at)
        .collect();
    for &at in &at {
        bytes[at] ^= 0x20; // lower case to upper case: still UTF-8, still a valid row
    }
    std::fs::write(&path, bytes).expect("the data file can be written");
    at.len()
}

#[tokio::test]
async fn a_changed_letter_inside_a_stored_value_fails_log_verify_by_its_page_checksum() {
    let dir = tempfile::tempdir().expect("a temporary directory can be created");
    let mut server = Server::start_in(dir.path(), &[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("state:v", "state", json!({})).await;
    let op = json!({"type": "set", "key": "motto", "value": "zebras-never-sleep-here"});
    alice.ack("v1", "state:v", op).await;
    drop(alice);
    server.terminate();
    let status = server.wait_exit(std::time::Duration::from_secs(10)).await;
    assert!(status.success(), "roomd exited with {status} on SIGTERM");

    let sound = roomd_log(dir.path(), &["verify"]);
    let stdout = String::from_utf8_lossy(&sound.stdout);
    assert_eq!(sound.status.code(), Some(0), "{stdout}");
    let before = std::fs::read(dir.path().join("roomd.redb")).expect("readable");

    assert!(change_a_letter_of(dir.path(), "zebras-never-sleep-here") > 0);
    let damaged = std::fs::read(dir.path().join("roomd.redb")).expect("readable");
    assert_ne!(before, damaged);
    let verify = roomd_log(dir.path(), &["verify"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr),
    );
    assert_eq!(verify.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("database: page checksums do not match"),
        "{stdout}{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
