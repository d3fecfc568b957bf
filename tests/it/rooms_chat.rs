//! Chat rooms over WebSocket: create, posts as `msg/<seq>` entries, author-only edit and
//! delete, history trimming, and the generic create/sub/diff rules seen through chat.

use serde_json::{json, Value};

use crate::support::{assert_epoch, entry, now_ms, Mirror, Server};

#[tokio::test]
async fn create_is_acked_with_seq_1() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    let reply = alice.create("chat:create-ack", "chat", json!({})).await;
    assert_eq!(reply["t"], "ack");
    assert_eq!(reply["id"], "create-chat:create-ack");
    assert_eq!(reply["seq"], 1);
}

#[tokio::test]
async fn creating_an_existing_room_is_nacked_exists() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("chat:twice", "chat", json!({})).await;
    let mut bob = server.client("bob").await;
    let reply = bob
        .create(
            "chat:twice",
            "poll",
            json!({"question": "q", "options": ["a", "b"]}),
        )
        .await;
    assert_eq!(reply["t"], "nack");
    assert_eq!(reply["code"], "exists");
}

#[tokio::test]
async fn create_with_unknown_kind_or_bad_init_is_nacked_invalid() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    let cases = [
        (
            "bad-kind",
            json!({"t": "create", "id": "k1", "room": "chat:bad-kind", "kind": "forum", "init": {}}),
        ),
        (
            "history-too-big",
            json!({"t": "create", "id": "k2", "room": "chat:history-big", "kind": "chat", "init": {"history": 10001}}),
        ),
        (
            "history-not-int",
            json!({"t": "create", "id": "k3", "room": "chat:history-str", "kind": "chat", "init": {"history": "ten"}}),
        ),
        (
            "unknown-init-field",
            json!({"t": "create", "id": "k4", "room": "chat:init-extra", "kind": "chat", "init": {"colour": "red"}}),
        ),
    ];
    for (name, msg) in cases {
        let id = msg["id"].as_str().unwrap().to_string();
        alice.send_json(msg).await;
        let reply = alice.reply(&id).await;
        assert_eq!(reply["t"], "nack", "{name}: {reply}");
        assert_eq!(reply["code"], "invalid", "{name}: {reply}");
    }
    // Nothing was created by the refused requests.
    let answer = alice
        .sub_msg(json!({"t": "sub", "room": "chat:bad-kind"}))
        .await;
    assert_eq!(answer["t"], "error");
    assert_eq!(answer["code"], "not_found");
}

#[tokio::test]
async fn create_with_a_malformed_room_id_is_nacked_invalid() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    let long = "r".repeat(129);
    for (i, room) in [
        "",
        "has space",
        "...",
        ".",
        "slash/room",
        "é",
        long.as_str(),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("bad-id-{i}");
        alice
            .send_json(json!({"t": "create", "id": id, "room": room, "kind": "chat", "init": {}}))
            .await;
        let reply = alice.reply(&id).await;
        assert_eq!(reply["t"], "nack", "room {room:?}: {reply}");
        assert_eq!(reply["code"], "invalid", "room {room:?}: {reply}");
    }
    // The regex's edges are accepted: 128 characters, and dots mixed with other chars.
    alice.create_ok(&"r".repeat(128), "chat", json!({})).await;
    alice.create_ok("a.b:c_d-E9", "chat", json!({})).await;
    alice.create_ok("..x", "chat", json!({})).await;
}

#[tokio::test]
async fn sub_to_a_new_chat_room_gets_an_empty_snapshot() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("chat:empty", "chat", json!({})).await;
    let snapshot = alice.sub("chat:empty").await;
    assert_eq!(snapshot["room"], "chat:empty");
    assert_eq!(snapshot["kind"], "chat");
    assert_eq!(snapshot["seq"], 1);
    assert_eq!(snapshot["entries"], json!([]));
    assert_eq!(snapshot["recovered"], false);
    assert_epoch(snapshot["epoch"].as_str().expect("epoch is a string"));
}

#[tokio::test]
async fn post_adds_a_msg_entry_with_user_text_and_timestamp() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("chat:post", "chat", json!({})).await;
    let mut mirror = Mirror::from_snapshot(&alice.sub("chat:post").await);
    let before = now_ms();
    let seq = alice
        .ack("p1", "chat:post", json!({"type": "post", "text": "hi"}))
        .await;
    let after = now_ms();
    assert_eq!(seq, 2);
    for diff in alice.diffs_until("chat:post", seq).await {
        mirror.apply(&diff);
    }
    let key = format!("msg/{seq}");
    let message = mirror
        .entries
        .get(&key)
        .unwrap_or_else(|| panic!("no {key} in {mirror:?}"));
    assert_eq!(message["ver"], seq);
    assert_eq!(message["v"]["user"], "alice");
    assert_eq!(message["v"]["text"], "hi");
    let ts = message["v"]["ts"].as_i64().expect("ts is an integer in ms");
    assert!(
        ts >= before - 2000 && ts <= after + 2000,
        "ts {ts} not near {before}..{after}"
    );
}

#[tokio::test]
async fn ack_seq_is_covered_by_a_diff_to_the_acking_subscriber() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("chat:ack-diff", "chat", json!({})).await;
    let mut mirror = Mirror::from_snapshot(&alice.sub("chat:ack-diff").await);
    for i in 0..5 {
        alice
            .send_op(
                &format!("m{i}"),
                "chat:ack-diff",
                json!({"type": "post", "text": format!("n{i}")}),
            )
            .await;
    }
    // Acks and diffs may interleave in any order; collect until every ack is in and a
    // diff has reached the highest acked seq.
    let mut acks = Vec::new();
    let mut max_to = 0;
    while acks.len() < 5 || max_to < *acks.iter().max().unwrap_or(&0) {
        let frame = alice.recv_until(|_| true).await;
        match frame["t"].as_str() {
            Some("ack") => acks.push(frame["seq"].as_u64().expect("ack seq")),
            Some("diff") => {
                mirror.apply(&frame);
                max_to = frame["to"].as_u64().expect("diff to");
            }
            _ => panic!("unexpected frame {frame}"),
        }
    }
    assert_eq!(
        acks,
        vec![2, 3, 4, 5, 6],
        "ops of one connection are acked in order"
    );
    for (i, seq) in acks.iter().enumerate() {
        assert_eq!(
            mirror.value(&format!("msg/{seq}")).expect("posted")["text"],
            format!("n{i}")
        );
    }
}

#[tokio::test]
async fn post_text_must_be_between_1_and_4096_bytes() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("chat:text-len", "chat", json!({})).await;
    let code = alice
        .nack("e1", "chat:text-len", json!({"type": "post", "text": ""}))
        .await;
    assert_eq!(code, "invalid");
    let code = alice
        .nack(
            "e2",
            "chat:text-len",
            json!({"type": "post", "text": "x".repeat(4097)}),
        )
        .await;
    assert!(
        code == "invalid" || code == "too_large",
        "4097-byte text: {code}"
    );
    // 4096 bytes of multi-byte characters is exactly the limit.
    let seq = alice
        .ack(
            "e3",
            "chat:text-len",
            json!({"type": "post", "text": "é".repeat(2048)}),
        )
        .await;
    assert_eq!(seq, 2, "refused ops consume no seq");
}

#[tokio::test]
async fn author_can_edit_and_delete_but_others_are_forbidden() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    alice.create_ok("chat:authors", "chat", json!({})).await;
    let posted = alice
        .ack(
            "a1",
            "chat:authors",
            json!({"type": "post", "text": "draft"}),
        )
        .await;

    let code = bob
        .nack(
            "b1",
            "chat:authors",
            json!({"type": "edit", "msg": posted, "text": "mine"}),
        )
        .await;
    assert_eq!(code, "forbidden");
    let code = bob
        .nack(
            "b2",
            "chat:authors",
            json!({"type": "delete", "msg": posted}),
        )
        .await;
    assert_eq!(code, "forbidden");

    let mut mirror = Mirror::from_snapshot(&bob.sub("chat:authors").await);
    assert_eq!(
        mirror.value(&format!("msg/{posted}")).unwrap()["text"],
        "draft"
    );
    let edited = alice
        .ack(
            "a2",
            "chat:authors",
            json!({"type": "edit", "msg": posted, "text": "final"}),
        )
        .await;
    for diff in bob.diffs_until("chat:authors", edited).await {
        mirror.apply(&diff);
    }
    let message = &mirror.entries[&format!("msg/{posted}")];
    assert_eq!(message["v"]["text"], "final");
    assert_eq!(message["v"]["user"], "alice");
    assert_eq!(message["ver"], edited, "ver is the seq of the last change");

    let deleted = alice
        .ack(
            "a3",
            "chat:authors",
            json!({"type": "delete", "msg": posted}),
        )
        .await;
    let diffs = bob.diffs_until("chat:authors", deleted).await;
    let last = diffs.last().expect("a diff");
    let removal =
        entry(&last["changes"], &format!("msg/{posted}")).expect("the deletion is in the diff");
    assert_eq!(removal["del"], true);
    assert_eq!(removal["ver"], deleted);
    for diff in &diffs {
        mirror.apply(diff);
    }
    assert!(mirror.entries.is_empty());
}

#[tokio::test]
async fn edit_or_delete_of_a_message_not_in_state_is_invalid() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("chat:missing-msg", "chat", json!({})).await;
    let code = alice
        .nack(
            "x1",
            "chat:missing-msg",
            json!({"type": "edit", "msg": 99, "text": "t"}),
        )
        .await;
    assert_eq!(code, "invalid");
    let code = alice
        .nack(
            "x2",
            "chat:missing-msg",
            json!({"type": "delete", "msg": 1}),
        )
        .await;
    assert_eq!(code, "invalid", "seq 1 is the creation, not a message");
    let posted = alice
        .ack(
            "x3",
            "chat:missing-msg",
            json!({"type": "post", "text": "t"}),
        )
        .await;
    alice
        .ack(
            "x4",
            "chat:missing-msg",
            json!({"type": "delete", "msg": posted}),
        )
        .await;
    let code = alice
        .nack(
            "x5",
            "chat:missing-msg",
            json!({"type": "delete", "msg": posted}),
        )
        .await;
    assert_eq!(
        code, "invalid",
        "a deleted message is no longer in the state"
    );
}

#[tokio::test]
async fn history_limit_deletes_the_oldest_message_in_the_same_diff() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice
        .create_ok("chat:history", "chat", json!({"history": 2}))
        .await;
    let first = alice
        .ack("h1", "chat:history", json!({"type": "post", "text": "one"}))
        .await;
    let second = alice
        .ack("h2", "chat:history", json!({"type": "post", "text": "two"}))
        .await;
    let mut mirror = Mirror::from_snapshot(&alice.sub("chat:history").await);
    assert_eq!(mirror.entries.len(), 2);

    let third = alice
        .ack(
            "h3",
            "chat:history",
            json!({"type": "post", "text": "three"}),
        )
        .await;
    let diffs = alice.diffs_until("chat:history", third).await;
    let carrying = diffs
        .iter()
        .find(|d| entry(&d["changes"], &format!("msg/{third}")).is_some())
        .expect("a diff carries the new message");
    let trimmed = entry(&carrying["changes"], &format!("msg/{first}"))
        .expect("the trimmed message is deleted in the same diff");
    assert_eq!(trimmed["del"], true);
    assert_eq!(trimmed["ver"], third);
    for diff in &diffs {
        mirror.apply(diff);
    }
    let kept: Vec<&String> = mirror.entries.keys().collect();
    assert_eq!(
        kept,
        vec![&format!("msg/{second}"), &format!("msg/{third}")]
    );
}

#[tokio::test]
async fn op_to_a_missing_room_is_nacked_not_found() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    let code = alice
        .nack(
            "n1",
            "chat:nowhere",
            json!({"type": "post", "text": "hello?"}),
        )
        .await;
    assert_eq!(code, "not_found");
}

#[tokio::test]
async fn op_does_not_require_a_sub() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("chat:no-sub", "chat", json!({})).await;
    let mut bob = server.client("bob").await;
    let seq = bob
        .ack(
            "b1",
            "chat:no-sub",
            json!({"type": "post", "text": "drive-by"}),
        )
        .await;
    let state = server.room_state("chat:no-sub").await;
    let message: &Value = entry(&state["entries"], &format!("msg/{seq}")).expect("posted");
    assert_eq!(message["v"]["user"], "bob");
}

#[tokio::test]
async fn malformed_chat_ops_are_nacked_invalid() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("chat:malformed", "chat", json!({})).await;
    let cases = [
        json!({"type": "shout", "text": "x"}),
        json!({"type": "post"}),
        json!({"type": "post", "text": 5}),
        json!({"type": "post", "text": "x", "bold": true}),
        json!({"text": "x"}),
        json!("post"),
        json!(null),
    ];
    for (i, op) in cases.into_iter().enumerate() {
        let code = alice
            .nack(&format!("bad{i}"), "chat:malformed", op.clone())
            .await;
        assert_eq!(code, "invalid", "op {op}");
    }
}
