//! Per-connection limits and the close codes that enforce them: bad frames (4400), frame
//! size (1009), invalid UTF-8 (1007), op rate (rate_limited nacks, HTTP 429), heartbeat
//! (4008) and the slow-consumer queue (4001).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{Client, Connect, Event, Mirror, RawWs, Server, TIMEOUT};

#[tokio::test]
async fn unparseable_frame_gets_bad_frame_error_and_connection_stays_open() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.send_text("this is not json").await;
    let error = alice.recv_json().await;
    assert_eq!(error["t"], "error");
    assert_eq!(error["code"], "bad_frame");
    assert!(error["msg"].is_string());
    alice
        .create_ok("chat:after-bad-frame", "chat", json!({}))
        .await;
}

#[tokio::test]
async fn tenth_bad_frame_within_a_minute_closes_with_4400() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    let bad = [
        "not json",
        "[1, 2, 3]",
        "\"a string\"",
        "{}",
        r#"{"t": "dance"}"#,
        r#"{"room": "chat:x"}"#,
        "{\"t\": \"sub\"",
        "null",
        "42",
    ];
    assert_eq!(bad.len(), 9);
    for text in bad {
        alice.send_text(text).await;
        let error = alice.recv_json().await;
        assert_eq!(error["code"], "bad_frame", "frame {text:?}: {error}");
    }
    // Errors that are not bad frames do not count toward the limit.
    let answer = alice
        .sub_msg(json!({"t": "sub", "room": "chat:none"}))
        .await;
    assert_eq!(answer["code"], "not_found");
    alice.create_ok("chat:still-open", "chat", json!({})).await;
    alice.send_text("the tenth").await;
    alice.expect_close(4400).await;
}

#[tokio::test]
async fn malformed_op_body_is_nacked_invalid_not_counted_as_bad_frame() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("state:malformed", "state", json!({})).await;
    for i in 0..12 {
        let code = alice
            .nack(
                &format!("m{i}"),
                "state:malformed",
                json!({"type": "warp", "speed": i}),
            )
            .await;
        assert_eq!(code, "invalid");
    }
    // Twelve invalid ops did not close the connection.
    alice
        .ack("ok", "state:malformed", json!({"type": "incr", "key": "n"}))
        .await;
}

#[tokio::test]
async fn message_over_max_frame_closes_with_1009_and_one_under_is_served() {
    let server = Server::start(&["--max-frame", "4096"]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("chat:frame-size", "chat", json!({})).await;
    alice
        .ack(
            "fits",
            "chat:frame-size",
            json!({"type": "post", "text": "x".repeat(3000)}),
        )
        .await;
    alice
        .send_op(
            "huge",
            "chat:frame-size",
            json!({"type": "post", "text": "y".repeat(5000)}),
        )
        .await;
    alice.expect_close(1009).await;
    let state = server.room_state("chat:frame-size").await;
    assert_eq!(state["seq"], 2, "the oversized op was not applied");
}

#[tokio::test]
async fn frame_header_declaring_1_gib_is_closed_with_1009_before_the_payload_is_buffered() {
    let server = Server::start(&[]).await;
    let mut raw = RawWs::connect(&server, "user=alice").await;
    let welcome = raw.read_frame(TIMEOUT).await.expect("a welcome frame");
    assert_eq!(welcome.opcode, 0x1, "JSON welcome is a text frame");
    let rss_before = server.rss_kib();
    // Only the header: a server that waited for the payload before checking would never
    // answer.
    raw.send_header(true, 0x1, 1 << 30).await;
    assert_eq!(raw.read_close_code(TIMEOUT).await, Some(1009));
    let rss_after = server.rss_kib();
    assert!(
        rss_after < rss_before + 50 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert_eq!(server.get("/healthz").await.status, 200);
}

#[tokio::test]
async fn continuation_frames_are_joined_and_the_joined_size_is_limited() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("chat:fragments", "chat", json!({})).await;

    // A message split in three fragments is one message.
    let mut raw = RawWs::connect(&server, "user=bob").await;
    raw.read_frame(TIMEOUT).await.expect("a welcome frame");
    let text = json!({"t": "op", "id": "frag", "room": "chat:fragments",
                      "op": {"type": "post", "text": "joined"}})
    .to_string();
    let (a, rest) = text.as_bytes().split_at(10);
    let (b, c) = rest.split_at(20);
    assert!(raw.send_frame(false, 0x1, a).await);
    assert!(raw.send_frame(false, 0x0, b).await);
    assert!(raw.send_frame(true, 0x0, c).await);
    let reply = raw.read_frame(TIMEOUT).await.expect("a reply");
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).expect("JSON reply");
    assert_eq!(reply["t"], "ack", "{reply}");

    // Two fragments of 40,000 bytes exceed 65,536 once joined.
    let mut raw = RawWs::connect(&server, "user=carol").await;
    raw.read_frame(TIMEOUT).await.expect("a welcome frame");
    raw.send_frame(false, 0x1, &[b' '; 40_000]).await;
    raw.send_frame(true, 0x0, &[b' '; 40_000]).await;
    assert_eq!(raw.read_close_code(TIMEOUT).await, Some(1009));
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_closes_with_1007() {
    let server = Server::start(&[]).await;
    let mut raw = RawWs::connect(&server, "user=alice").await;
    raw.read_frame(TIMEOUT).await.expect("a welcome frame");
    raw.send_frame(true, 0x1, b"{\"t\":\"sub\",\"room\":\"\xff\xfe\"}")
        .await;
    assert_eq!(raw.read_close_code(TIMEOUT).await, Some(1007));
}

#[tokio::test]
async fn ops_over_the_rate_are_nacked_rate_limited_and_not_applied() {
    let server = Server::start(&["--op-rate", "1", "--op-burst", "5"]).await;
    let created = server
        .post_as(
            "setup",
            "/api/rooms",
            &json!({"room": "state:rate", "kind": "state", "init": {}}),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text);

    let mut alice = server.client("alice").await;
    for i in 0..12 {
        alice
            .send_op(
                &format!("r{i}"),
                "state:rate",
                json!({"type": "incr", "key": "n"}),
            )
            .await;
    }
    let (mut acked, mut limited) = (0, 0);
    for i in 0..12 {
        let reply = alice.reply(&format!("r{i}")).await;
        match (reply["t"].as_str(), reply["code"].as_str()) {
            (Some("ack"), _) => acked += 1,
            (Some("nack"), Some("rate_limited")) => limited += 1,
            _ => panic!("unexpected reply {reply}"),
        }
    }
    assert!((5..=7).contains(&acked), "burst 5 at 1/s: {acked} acked");
    assert_eq!(acked + limited, 12);
    let state = server.room_state("state:rate").await;
    assert_eq!(
        state["entries"][0]["v"], acked,
        "only acked ops were applied"
    );

    // The limit is per connection: a fresh connection has its own burst.
    let mut second = server.client("alice").await;
    second
        .ack("fresh", "state:rate", json!({"type": "incr", "key": "n"}))
        .await;
}

/// A room holds at most 4,096 unanswered ops (README "Limits"). Commits held 400 ms each
/// (the test hook) let one fast connection get that far ahead; it then waits, unread,
/// until earlier ops are answered: nothing is refused or lost, and the ops land gapless
/// in the order sent.
#[tokio::test]
async fn a_room_far_behind_on_commits_makes_its_writer_wait_and_loses_nothing() {
    let server = Server::start_with_env(
        &["--op-rate", "100000", "--op-burst", "100000"],
        &[("ROOMD_TEST_COMMIT_DELAY_MS", "400")],
    )
    .await;
    let waits = "roomd_room_backlog_waits_total";
    let mut alice = server.client("alice").await;
    alice.create_ok("state:backlog", "state", json!({})).await;
    assert_eq!(server.metric(waits).await, 0.0);
    const N: u64 = 5_000;
    let seqs = incr_all_acked(&mut alice, "state:backlog", "b", N).await;
    for (i, pair) in seqs.windows(2).enumerate() {
        assert_eq!(pair[1], pair[0] + 1, "op b{} lands right after b{i}", i + 1);
    }
    assert!(
        server.metric(waits).await >= 1.0,
        "the connection waited for the room's backlog"
    );
    let state = server.room_state("state:backlog").await;
    let n = state["entries"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["k"] == "n"))
        .map(|e| e["v"].clone());
    assert_eq!(n, Some(json!(N)), "{state}");
}

/// A connection waiting for a room's backlog is not read, so its client looks silent; that
/// silence is the server's doing and must not close it for a missed heartbeat (4008).
/// Heartbeat 500 ms (silence limit 1 s), commits held 2.5 s: the first wait lasts well
/// over the limit.
#[tokio::test]
async fn a_wait_for_the_backlog_longer_than_the_heartbeat_does_not_close_the_client() {
    let server = Server::start_with_env(
        &[
            "--op-rate",
            "100000",
            "--op-burst",
            "100000",
            "--heartbeat",
            "500ms",
        ],
        &[("ROOMD_TEST_COMMIT_DELAY_MS", "2500")],
    )
    .await;
    let mut alice = server.client("alice").await;
    alice
        .create_ok("state:slow-backlog", "state", json!({}))
        .await;
    incr_all_acked(&mut alice, "state:slow-backlog", "h", 4_400).await;
    assert!(server.metric("roomd_room_backlog_waits_total").await >= 1.0);
    alice.expect_silence(Duration::from_millis(300)).await;
}

/// Sends `n` `incr` ops (ids `{prefix}0`...) back to back without reading, then reads
/// their replies in order; each must be an ack. Their seqs, in the order sent.
async fn incr_all_acked(client: &mut Client, room: &str, prefix: &str, n: u64) -> Vec<u64> {
    for i in 0..n {
        let op = json!({"type": "incr", "key": "n"});
        client.send_op(&format!("{prefix}{i}"), room, op).await;
    }
    let mut seqs = Vec::with_capacity(n as usize);
    for i in 0..n {
        let reply = client.reply(&format!("{prefix}{i}")).await;
        assert_eq!(reply["t"], "ack", "op {prefix}{i}: {reply}");
        seqs.push(reply["seq"].as_u64().expect("ack seq"));
    }
    seqs
}

#[tokio::test]
async fn create_counts_as_an_op_for_the_rate_limit() {
    let server = Server::start(&["--op-rate", "1", "--op-burst", "2"]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("chat:rate-a", "chat", json!({})).await;
    alice.create_ok("chat:rate-b", "chat", json!({})).await;
    let reply = alice.create("chat:rate-c", "chat", json!({})).await;
    assert_eq!(reply["t"], "nack", "{reply}");
    assert_eq!(reply["code"], "rate_limited");
}

#[tokio::test]
async fn http_ops_over_the_rate_get_429_per_user() {
    let server = Server::start(&["--op-rate", "1", "--op-burst", "3"]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("state:http-rate", "state", json!({})).await;
    let mut statuses = Vec::new();
    for i in 0..6 {
        let response = server
            .post_as(
                "bob",
                "/api/rooms/state:http-rate/ops",
                &json!({"id": format!("h{i}"), "op": {"type": "incr", "key": "n"}}),
            )
            .await;
        if response.status == 429 {
            assert_eq!(response.code(), "rate_limited");
        } else {
            assert_eq!(response.status, 200, "{}", response.text);
        }
        statuses.push(response.status);
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!((3..=5).contains(&ok), "burst 3 at 1/s: {statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    // Another user has a budget of their own.
    let response = server
        .post_as(
            "carol",
            "/api/rooms/state:http-rate/ops",
            &json!({"id": "c1", "op": {"type": "incr", "key": "n"}}),
        )
        .await;
    assert_eq!(response.status, 200, "{}", response.text);
}

#[tokio::test]
async fn silent_connection_is_closed_with_4008_after_two_heartbeats() {
    let server = Server::start(&["--heartbeat", "500ms"]).await;
    let started = Instant::now();
    // A hand-made client that reads but never answers a ping.
    let mut raw = RawWs::connect(&server, "user=alice").await;
    let mut pings = 0;
    let code = loop {
        let frame = raw
            .read_frame(Duration::from_secs(5))
            .await
            .expect("closed without a close frame");
        match frame.opcode {
            0x9 => pings += 1,
            0x8 => break frame.close_code(),
            _ => {}
        }
    };
    let elapsed = started.elapsed();
    assert_eq!(code, Some(4008));
    assert!(pings >= 1, "the server pings every heartbeat");
    assert!(
        elapsed >= Duration::from_millis(800),
        "closed too early: {elapsed:?}"
    );
    assert!(
        elapsed <= Duration::from_secs(4),
        "closed too late: {elapsed:?}"
    );
}

#[tokio::test]
async fn connection_that_answers_pings_outlives_the_heartbeat_timeout() {
    let server = Server::start(&["--heartbeat", "500ms"]).await;
    let mut alice = server.client("alice").await;
    assert_eq!(alice.welcome["heartbeat_ms"], 500);
    // Time passing is the point here: three heartbeats, answering pings all along.
    alice.expect_silence(Duration::from_millis(1600)).await;
    alice.create_ok("chat:alive", "chat", json!({})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_is_closed_with_4001_while_other_subscribers_keep_up() {
    let server = Server::start(&[
        "--outbound-queue",
        "262144",
        "--op-rate",
        "100000",
        "--op-burst",
        "100000",
        "--durability",
        "none",
        // Every commit its own diff (see the loop below): with a batch interval, diffs
        // of commits less than the interval apart coalesce to one 30 KiB value.
        "--batch-interval",
        "0ms",
    ])
    .await;
    let room = "state:slow";
    // 150 values of 30 KiB: over 4 MiB, far beyond the 256 KiB queue plus what a 4 KiB
    // receive window lets the kernels buffer.
    let n_ops: u64 = 150;
    let head = n_ops + 1;
    let mut alice = server.client("alice").await;
    alice.create_ok(room, "state", json!({})).await;

    // carol subscribes, then never reads again until the flood is over.
    let mut carol = Connect::new()
        .user("carol")
        .recv_buffer(4096)
        .connect(&server)
        .await;
    carol.sub(room).await;

    // bob reads everything, concurrently with the flood.
    let mut bob = server.client("bob").await;
    let snapshot = bob.sub(room).await;
    let watcher = tokio::spawn(async move {
        let mut mirror = Mirror::from_snapshot(&snapshot);
        while mirror.seq < head {
            let diff = bob.recv_until(|v| v["t"] == "diff").await;
            mirror.apply(&diff);
        }
        mirror
    });

    let blob = "z".repeat(30 * 1024);
    for i in 0..n_ops {
        // One key, so no coalesced diff can exceed the queue on its own; one op at a
        // time, so every op is its own commit and its own 30 KiB diff (pipelined ops
        // would coalesce into a few diffs and never fill the queue).
        let op = json!({"type": "set", "key": "blob", "value": format!("{i}:{blob}")});
        alice.send_op(&format!("s{i}"), room, op).await;
        let reply = alice.reply(&format!("s{i}")).await;
        assert_eq!(reply["t"], "ack", "{reply}");
    }
    let mirror = tokio::time::timeout(TIMEOUT * 4, watcher)
        .await
        .expect("the fast subscriber kept up")
        .expect("the watcher task did not panic");
    assert_eq!(mirror.seq, head);
    let last = mirror
        .value("blob")
        .and_then(|v| v.as_str())
        .expect("blob is a string");
    assert!(
        last.starts_with(&format!("{}:", n_ops - 1)),
        "the last write wins"
    );

    // carol now drains what reached her socket: the connection must end, with 4001 if a
    // close frame made it through, and before she saw the whole flood.
    let mut carol_to = 1;
    let deadline = Instant::now() + TIMEOUT;
    let end = loop {
        match carol
            .next_event(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            Event::Json(v) => {
                if v["t"] == "diff" {
                    carol_to = v["to"].as_u64().unwrap();
                }
            }
            Event::Binary(_) => panic!("binary frame on a JSON connection"),
            Event::Close(code) => break Some(code),
            Event::Ended(_) => break None,
            Event::Timeout => {
                panic!("the slow reader was never closed (saw up to seq {carol_to} of {head})")
            }
        }
    };
    if let Some(code) = end {
        assert_eq!(code, Some(4001), "slow consumers are closed with 4001");
    }
    assert!(
        carol_to < head,
        "the slow reader's queue was discarded, not delivered"
    );
}

#[tokio::test]
async fn handshakes_over_the_per_ip_rate_are_closed_with_4429() {
    // One per second with a burst of ten seconds' worth: the first ten get in (though
    // each closes before the next), then one is refused. Tokens come back at one per
    // second, so on a slow machine a few more may get in first, never fewer than ten.
    let server = Server::start(&["--handshakes-per-ip", "1"]).await;
    let mut admitted = 0;
    let refused_at = loop {
        assert!(admitted < 40, "no 4429 after {admitted} handshakes");
        let mut client = Connect::new()
            .user(&format!("u{admitted}"))
            .handshake(&server)
            .await
            .expect("the upgrade itself succeeds");
        match client.next_event(TIMEOUT).await {
            Event::Json(welcome) if welcome["t"] == "welcome" => {
                admitted += 1;
                client.close().await;
            }
            Event::Close(Some(4429)) => break admitted,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(refused_at >= 10, "refused after only {refused_at}");
    // HTTP is not a handshake: it still answers.
    assert_eq!(server.get("/readyz").await.status, 200);
}

#[tokio::test]
async fn connections_over_the_per_ip_cap_are_closed_with_4429_until_one_leaves() {
    let server = Server::start(&["--max-conns-per-ip", "2"]).await;
    let first = server.client("a").await;
    let _second = server.client("b").await;
    let mut third = Connect::new()
        .user("c")
        .handshake(&server)
        .await
        .expect("the upgrade itself succeeds");
    third.expect_close(4429).await;
    first.close().await;
    // The slot comes back once the server has seen the first connection end.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let mut next = Connect::new()
            .user("d")
            .handshake(&server)
            .await
            .expect("the upgrade itself succeeds");
        match next.next_event(Duration::from_millis(300)).await {
            Event::Json(welcome) => {
                assert_eq!(welcome["t"], "welcome");
                break;
            }
            Event::Close(code) => assert_eq!(code, Some(4429)),
            other => panic!("unexpected {other:?}"),
        }
        assert!(Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn creates_beyond_the_rooms_per_user_limit_are_nacked_limit_until_one_is_deleted() {
    let server = Server::start(&["--max-rooms-per-user", "2"]).await;
    let mut alice = server.client("alice").await;
    for room in ["chat:quota-1", "chat:quota-2"] {
        let reply = alice.create(room, "chat", json!({})).await;
        assert_eq!(reply["t"], "ack", "{reply}");
    }
    let refused = alice.create("chat:quota-3", "chat", json!({})).await;
    assert_eq!(refused["t"], "nack", "{refused}");
    assert_eq!(refused["code"], "limit", "{refused}");
    // Over HTTP too, and the refused room does not exist.
    let http = server
        .post_as(
            "alice",
            "/api/rooms",
            &json!({"room": "chat:quota-4", "kind": "chat", "init": {}}),
        )
        .await;
    assert_eq!(http.code(), "limit", "{}", http.text);
    assert_eq!(server.get("/api/rooms/chat:quota-3").await.status, 404);
    // The limit is per user.
    let mut bob = server.client("bob").await;
    let reply = bob.create("chat:quota-bob", "chat", json!({})).await;
    assert_eq!(reply["t"], "ack", "{reply}");
    // A deleted room no longer counts.
    let deleted = server
        .http("DELETE", "/api/rooms/chat:quota-1", &[], None)
        .await;
    assert_eq!(deleted.status, 204, "{}", deleted.text);
    let again = alice
        .reply_to(json!({"t": "create", "id": "again", "room": "chat:quota-3", "kind": "chat", "init": {}}))
        .await;
    assert_eq!(again["t"], "ack", "{again}");
}
