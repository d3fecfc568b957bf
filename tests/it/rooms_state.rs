//! State rooms: init entries, set/del/incr, compare-and-set with `if_ver`, the Value model
//! (bytes, depth, integer range, size), and diff batching as a subscriber sees it.

use serde_json::{json, Value};

use crate::support::{entry, keys, Mirror, Server};

#[tokio::test]
async fn init_entries_appear_sorted_in_the_snapshot_at_ver_1() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice
        .create_ok(
            "state:init",
            "state",
            json!({"entries": {"zeta": 1, "alpha": {"nested": [1, 2.5, "x", null, true]}, "mid/key": "v"}}),
        )
        .await;
    let snapshot = alice.sub("state:init").await;
    assert_eq!(snapshot["kind"], "state");
    assert_eq!(keys(&snapshot["entries"]), vec!["alpha", "mid/key", "zeta"]);
    let mirror = Mirror::from_snapshot(&snapshot);
    assert_eq!(
        mirror.value("alpha"),
        Some(&json!({"nested": [1, 2.5, "x", null, true]}))
    );
    assert_eq!(mirror.entries["zeta"]["ver"], 1);
}

#[tokio::test]
async fn set_del_and_incr_reach_subscribers_as_entries() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("state:ops", "state", json!({})).await;
    let mut mirror = Mirror::from_snapshot(&alice.sub("state:ops").await);

    let set = alice
        .ack(
            "s1",
            "state:ops",
            json!({"type": "set", "key": "players/alice", "value": {"hp": 10}}),
        )
        .await;
    let incr = alice
        .ack(
            "s2",
            "state:ops",
            json!({"type": "incr", "key": "score/red"}),
        )
        .await;
    let incr5 = alice
        .ack(
            "s3",
            "state:ops",
            json!({"type": "incr", "key": "score/red", "by": 5}),
        )
        .await;
    let decr = alice
        .ack(
            "s4",
            "state:ops",
            json!({"type": "incr", "key": "score/blue", "by": -3}),
        )
        .await;
    for diff in alice.diffs_until("state:ops", decr).await {
        mirror.apply(&diff);
    }
    assert_eq!((set, incr, incr5, decr), (2, 3, 4, 5));
    assert_eq!(mirror.value("players/alice"), Some(&json!({"hp": 10})));
    assert_eq!(
        mirror.value("score/red"),
        Some(&json!(6)),
        "a missing key counts as 0, by defaults to 1"
    );
    assert_eq!(mirror.value("score/blue"), Some(&json!(-3)));
    assert_eq!(mirror.entries["score/red"]["ver"], incr5);

    let del = alice
        .ack(
            "s5",
            "state:ops",
            json!({"type": "del", "key": "players/alice"}),
        )
        .await;
    let diffs = alice.diffs_until("state:ops", del).await;
    let removal = diffs
        .iter()
        .find_map(|d| entry(&d["changes"], "players/alice"))
        .expect("the deletion is sent");
    assert_eq!(
        removal,
        &json!({"k": "players/alice", "ver": del, "del": true})
    );
    for diff in &diffs {
        mirror.apply(diff);
    }
    assert_eq!(mirror.value("players/alice"), None);
    let state = server.room_state("state:ops").await;
    assert_eq!(keys(&state["entries"]), vec!["score/blue", "score/red"]);
}

#[tokio::test]
async fn if_ver_is_compare_and_set_on_the_key_version() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("state:cas", "state", json!({})).await;
    let created = alice
        .ack(
            "c1",
            "state:cas",
            json!({"type": "set", "key": "k", "value": 1, "if_ver": 0}),
        )
        .await;
    let code = alice
        .nack(
            "c2",
            "state:cas",
            json!({"type": "set", "key": "k", "value": 2, "if_ver": 0}),
        )
        .await;
    assert_eq!(code, "conflict", "if_ver 0 means the key must not exist");
    let code = alice
        .nack(
            "c3",
            "state:cas",
            json!({"type": "set", "key": "k", "value": 2, "if_ver": created + 7}),
        )
        .await;
    assert_eq!(code, "conflict");
    let updated = alice
        .ack(
            "c4",
            "state:cas",
            json!({"type": "set", "key": "k", "value": 2, "if_ver": created}),
        )
        .await;
    let code = alice
        .nack(
            "c5",
            "state:cas",
            json!({"type": "del", "key": "k", "if_ver": created}),
        )
        .await;
    assert_eq!(code, "conflict", "the version moved on");
    let code = alice
        .nack(
            "c6",
            "state:cas",
            json!({"type": "set", "key": "other", "value": 1, "if_ver": 3}),
        )
        .await;
    assert_eq!(code, "conflict", "a missing key matches no version but 0");
    alice
        .ack(
            "c7",
            "state:cas",
            json!({"type": "del", "key": "k", "if_ver": updated}),
        )
        .await;
    let state = server.room_state("state:cas").await;
    assert_eq!(state["entries"], json!([]));
    assert_eq!(state["seq"], 4, "only the three acked ops were applied");
}

#[tokio::test]
async fn del_of_a_missing_key_without_if_ver_is_invalid() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice
        .create_ok("state:del-missing", "state", json!({}))
        .await;
    let code = alice
        .nack(
            "d1",
            "state:del-missing",
            json!({"type": "del", "key": "ghost"}),
        )
        .await;
    assert_eq!(code, "invalid");
}

#[tokio::test]
async fn incr_of_a_non_integer_value_is_invalid() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice
        .create_ok(
            "state:incr-bad",
            "state",
            json!({"entries": {"name": "red", "ratio": 0.5}}),
        )
        .await;
    assert_eq!(
        alice
            .nack(
                "i1",
                "state:incr-bad",
                json!({"type": "incr", "key": "name"})
            )
            .await,
        "invalid"
    );
    assert_eq!(
        alice
            .nack(
                "i2",
                "state:incr-bad",
                json!({"type": "incr", "key": "ratio"})
            )
            .await,
        "invalid"
    );
    assert_eq!(
        alice
            .nack(
                "i3",
                "state:incr-bad",
                json!({"type": "incr", "key": "n", "by": "one"})
            )
            .await,
        "invalid"
    );
}

#[tokio::test]
async fn bytes_floats_and_nested_values_round_trip() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("state:values", "state", json!({})).await;
    let values = [
        ("bytes", json!({"$b64": "aGVsbG8gd29ybGQ="})),
        ("bytes-in-list", json!([{"$b64": ""}, {"$b64": "AA=="}])),
        ("float", json!(-1.25)),
        ("int-max", json!(i64::MAX)),
        ("int-min", json!(i64::MIN)),
        (
            "map",
            json!({"a": {"b": [true, false, null]}, "": "empty key"}),
        ),
        ("unicode", json!("héllo ✓ 𝄞")),
    ];
    for (i, (key, value)) in values.iter().enumerate() {
        alice
            .ack(
                &format!("v{i}"),
                "state:values",
                json!({"type": "set", "key": key, "value": value}),
            )
            .await;
    }
    let state = server.room_state("state:values").await;
    for (key, value) in &values {
        let got = &entry(&state["entries"], key).unwrap_or_else(|| panic!("no {key}"))["v"];
        assert_eq!(got, value, "{key} did not round trip");
    }
    let snapshot = alice.sub("state:values").await;
    assert_eq!(
        entry(&snapshot["entries"], "bytes").unwrap()["v"],
        json!({"$b64": "aGVsbG8gd29ybGQ="})
    );
}

fn nested_lists(depth: usize) -> Value {
    let mut value = json!(1);
    for _ in 0..depth {
        value = json!([value]);
    }
    value
}

#[tokio::test]
async fn values_nested_deeper_than_32_levels_are_invalid() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("state:depth", "state", json!({})).await;
    // 31 nested lists is within 32 levels however the scalar itself is counted; 34 is
    // beyond it either way.
    alice
        .ack(
            "d1",
            "state:depth",
            json!({"type": "set", "key": "ok", "value": nested_lists(31)}),
        )
        .await;
    let code = alice
        .nack(
            "d2",
            "state:depth",
            json!({"type": "set", "key": "deep", "value": nested_lists(34)}),
        )
        .await;
    assert_eq!(code, "invalid");
    let reply = alice
        .create(
            "state:deep-init",
            "state",
            json!({"entries": {"deep": nested_lists(34)}}),
        )
        .await;
    assert_eq!(reply["code"], "invalid", "{reply}");
}

#[tokio::test]
async fn integers_outside_i64_and_malformed_bytes_are_invalid() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("state:range", "state", json!({})).await;
    let code = alice
        .nack(
            "r1",
            "state:range",
            json!({"type": "set", "key": "big", "value": u64::MAX}),
        )
        .await;
    assert_eq!(code, "invalid");
    // A literal the JSON text carries but i64 cannot hold.
    alice
        .send_text(r#"{"t":"op","id":"r2","room":"state:range","op":{"type":"incr","key":"n","by":9223372036854775808}}"#)
        .await;
    let reply = alice.reply("r2").await;
    assert_eq!(reply["code"], "invalid", "{reply}");
    let code = alice
        .nack(
            "r3",
            "state:range",
            json!({"type": "set", "key": "b", "value": {"$b64": "not base64!"}}),
        )
        .await;
    assert_eq!(code, "invalid");
    let state = server.room_state("state:range").await;
    assert_eq!(state["seq"], 1);
}

#[tokio::test]
async fn incr_past_i64_max_is_refused_and_changes_nothing() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice
        .create_ok(
            "state:overflow",
            "state",
            json!({"entries": {"n": i64::MAX}}),
        )
        .await;
    let reply = alice
        .op("o1", "state:overflow", json!({"type": "incr", "key": "n"}))
        .await;
    assert_eq!(
        reply["t"], "nack",
        "an overflowing incr cannot be applied: {reply}"
    );
    let state = server.room_state("state:overflow").await;
    assert_eq!(entry(&state["entries"], "n").unwrap()["v"], json!(i64::MAX));
}

#[tokio::test]
async fn values_over_32_kib_are_too_large() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("state:big", "state", json!({})).await;
    let code = alice
        .nack(
            "b1",
            "state:big",
            json!({"type": "set", "key": "blob", "value": "x".repeat(40 * 1024)}),
        )
        .await;
    assert_eq!(code, "too_large");
    alice
        .ack(
            "b2",
            "state:big",
            json!({"type": "set", "key": "blob", "value": "x".repeat(30 * 1024)}),
        )
        .await;
}

#[tokio::test]
async fn keys_must_be_1_to_256_bytes() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("state:keys", "state", json!({})).await;
    let code = alice
        .nack(
            "k1",
            "state:keys",
            json!({"type": "set", "key": "", "value": 1}),
        )
        .await;
    assert_eq!(code, "invalid");
    let code = alice
        .nack(
            "k2",
            "state:keys",
            json!({"type": "set", "key": "k".repeat(257), "value": 1}),
        )
        .await;
    assert!(
        code == "invalid" || code == "too_large",
        "257-byte key: {code}"
    );
    alice
        .ack(
            "k3",
            "state:keys",
            json!({"type": "set", "key": "k".repeat(256), "value": 1}),
        )
        .await;
}

#[tokio::test]
async fn unknown_op_types_and_fields_are_invalid_never_bad_frame() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("state:unknown", "state", json!({})).await;
    let cases = [
        json!({"type": "explode"}),
        json!({"type": "set", "key": "k"}),
        json!({"type": "set", "key": "k", "value": 1, "ttl": 5}),
        json!({"type": "set", "key": 7, "value": 1}),
        json!({"type": "incr", "key": "k", "if_ver": "seven"}),
        json!([1, 2, 3]),
        json!(42),
    ];
    for (i, op) in cases.into_iter().enumerate() {
        let reply = alice
            .op(&format!("u{i}"), "state:unknown", op.clone())
            .await;
        assert_eq!(reply["t"], "nack", "op {op}: {reply}");
        assert_eq!(reply["code"], "invalid", "op {op}: {reply}");
    }
}

#[tokio::test]
async fn pipelined_ops_arrive_as_chained_coalesced_diffs() {
    let server = Server::start(&["--durability", "immediate"]).await;
    let mut watcher = server.client("watcher").await;
    let mut alice = server.client("alice").await;
    alice.create_ok("state:batch", "state", json!({})).await;
    let mut mirror = Mirror::from_snapshot(&watcher.sub("state:batch").await);
    let n = 150;
    for i in 0..n {
        // Two keys per round: one bumped every time, one flipped between set and del.
        let op = if i % 3 == 0 {
            json!({"type": "set", "key": "flip", "value": i})
        } else if i % 3 == 1 {
            json!({"type": "del", "key": "flip"})
        } else {
            json!({"type": "incr", "key": "count"})
        };
        alice.send_op(&format!("p{i}"), "state:batch", op).await;
    }
    let mut last = 0;
    for i in 0..n {
        let reply = alice.reply(&format!("p{i}")).await;
        assert_eq!(reply["t"], "ack", "{reply}");
        let seq = reply["seq"].as_u64().unwrap();
        assert_eq!(
            seq,
            last.max(1) + 1,
            "acks of one connection come in order, gapless"
        );
        last = seq;
    }
    let diffs = watcher.diffs_until("state:batch", last).await;
    for diff in &diffs {
        // Mirror::apply checks chaining, sorting, one entry per key and ver within the batch.
        mirror.apply(diff);
        let to = diff["to"].as_u64().unwrap();
        if let Some(count) = entry(&diff["changes"], "count") {
            assert!(count["ver"].as_u64().unwrap() <= to);
        }
    }
    assert_eq!(mirror.seq, last);
    assert_eq!(mirror.value("count"), Some(&json!(n / 3)));
    // The last op touching "flip" (i = 148, i % 3 == 1) deleted it.
    assert_eq!(mirror.value("flip"), None);
    let state = server.room_state("state:batch").await;
    assert_eq!(state["seq"], last);
    assert_eq!(
        state["entries"],
        json!([{"k": "count", "v": n / 3, "ver": last}])
    );
}

#[tokio::test]
async fn write_rules_limit_keys_to_their_user_the_creator_or_any_member_across_a_restart() {
    let mut server = Server::start(&[]).await;
    let init = json!({
        "entries": {"config/title": "lobby"},
        "rules": [
            {"keys": "user/{user}/*"},
            {"keys": "config/*", "write": "creator"},
            {"keys": "board/*", "write": "member"}
        ]
    });
    let mut alice = server.client("alice").await;
    alice.create_ok("state:rules", "state", init).await;
    let mut bob = server.client("bob").await;

    let own = json!({"type": "set", "key": "user/bob/hp", "value": 10});
    assert!(bob.ack("b1", "state:rules", own).await > 1);
    let theirs = json!({"type": "set", "key": "user/alice/hp", "value": 0});
    assert_eq!(bob.nack("b2", "state:rules", theirs).await, "forbidden");
    let config = json!({"type": "set", "key": "config/title", "value": "mine"});
    assert_eq!(
        bob.nack("b3", "state:rules", config.clone()).await,
        "forbidden"
    );
    assert!(alice.ack("a1", "state:rules", config).await > 1);
    let board = json!({"type": "incr", "key": "board/moves"});
    assert!(bob.ack("b4", "state:rules", board).await > 1);
    let uncovered = json!({"type": "set", "key": "elsewhere", "value": 1});
    assert_eq!(bob.nack("b5", "state:rules", uncovered).await, "forbidden");
    let del = json!({"type": "del", "key": "user/bob/hp"});
    assert_eq!(alice.nack("a2", "state:rules", del).await, "forbidden");

    // The rules are part of the room's logged state: a restarted server applies them.
    server.restart().await;
    let mut bob = server.client("bob").await;
    let config = json!({"type": "del", "key": "config/title"});
    assert_eq!(bob.nack("b6", "state:rules", config).await, "forbidden");
    let own = json!({"type": "del", "key": "user/bob/hp"});
    assert!(bob.ack("b7", "state:rules", own).await > 1);
    let state = server.room_state("state:rules").await;
    let keys: Vec<&str> = state["entries"]
        .as_array()
        .expect("entries is a list")
        .iter()
        .map(|e| e["k"].as_str().expect("keys are strings"))
        .collect();
    assert_eq!(keys, ["board/moves", "config/title"]);

    let mut carol = server.client("carol").await;
    for (id, rules) in [
        ("c1", json!("user/*")),
        ("c2", json!([{"keys": "x", "write": "owner"}])),
        ("c3", json!([{"keys": ""}])),
    ] {
        let reply = carol
            .create(
                &format!("state:bad-{id}"),
                "state",
                json!({ "rules": rules }),
            )
            .await;
        assert_eq!(reply["code"], "invalid", "{id}: {reply}");
    }
}
