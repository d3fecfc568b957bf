//! Poll rooms: the entries a poll exposes, one vote per user, retract, creator-only close,
//! and the `closed` refusals after it.

use serde_json::{json, Value};

use crate::support::{keys, Client, Mirror, Server};

fn lunch() -> Value {
    json!({"question": "Lunch?", "options": ["pizza", "sushi", "tacos"]})
}

/// Waits until `mirror` has caught up with `seq` on `client`'s subscription.
async fn follow(client: &mut Client, mirror: &mut Mirror, seq: u64) {
    for diff in client.diffs_until(&mirror.room.clone(), seq).await {
        mirror.apply(&diff);
    }
}

#[tokio::test]
async fn new_poll_snapshot_has_sorted_question_options_counts_total_and_closed() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("poll:fresh", "poll", lunch()).await;
    let snapshot = alice.sub("poll:fresh").await;
    assert_eq!(snapshot["kind"], "poll");
    assert_eq!(snapshot["seq"], 1);
    assert_eq!(
        keys(&snapshot["entries"]),
        vec!["closed", "count/0", "count/1", "count/2", "options", "question", "total"]
    );
    let mirror = Mirror::from_snapshot(&snapshot);
    assert_eq!(mirror.value("question"), Some(&json!("Lunch?")));
    assert_eq!(
        mirror.value("options"),
        Some(&json!(["pizza", "sushi", "tacos"]))
    );
    assert_eq!(mirror.value("count/0"), Some(&json!(0)));
    assert_eq!(mirror.value("count/2"), Some(&json!(0)));
    assert_eq!(mirror.value("total"), Some(&json!(0)));
    assert_eq!(mirror.value("closed"), Some(&json!(false)));
    assert!(
        mirror.entries.values().all(|e| e["ver"] == 1),
        "all set by the creation"
    );
}

#[tokio::test]
async fn poll_init_needs_a_question_and_2_to_32_options() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    let options_33: Vec<String> = (0..33).map(|i| format!("o{i}")).collect();
    let options_32: Vec<String> = (0..32).map(|i| format!("o{i}")).collect();
    let bad = [
        json!({"question": "q", "options": ["only"]}),
        json!({"question": "q", "options": []}),
        json!({"question": "q", "options": options_33}),
        json!({"options": ["a", "b"]}),
        json!({"question": "q"}),
        json!({"question": "q", "options": "a,b"}),
        json!({"question": "q", "options": ["a", "b"], "anonymous": true}),
    ];
    for (i, init) in bad.into_iter().enumerate() {
        let reply = alice
            .create(&format!("poll:bad-{i}"), "poll", init.clone())
            .await;
        assert_eq!(reply["t"], "nack", "init {init}: {reply}");
        assert_eq!(reply["code"], "invalid", "init {init}: {reply}");
    }
    alice
        .create_ok(
            "poll:two",
            "poll",
            json!({"question": "q", "options": ["a", "b"]}),
        )
        .await;
    alice
        .create_ok(
            "poll:thirty-two",
            "poll",
            json!({"question": "q", "options": options_32}),
        )
        .await;
}

#[tokio::test]
async fn vote_counts_and_voting_again_moves_the_vote() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    alice.create_ok("poll:move", "poll", lunch()).await;
    let mut mirror = Mirror::from_snapshot(&alice.sub("poll:move").await);

    alice
        .ack("v1", "poll:move", json!({"type": "vote", "option": 0}))
        .await;
    let seq = bob
        .ack("v1", "poll:move", json!({"type": "vote", "option": 0}))
        .await;
    follow(&mut alice, &mut mirror, seq).await;
    assert_eq!(mirror.value("count/0"), Some(&json!(2)));
    assert_eq!(mirror.value("total"), Some(&json!(2)));

    let seq = alice
        .ack("v2", "poll:move", json!({"type": "vote", "option": 2}))
        .await;
    follow(&mut alice, &mut mirror, seq).await;
    assert_eq!(mirror.value("count/0"), Some(&json!(1)));
    assert_eq!(mirror.value("count/2"), Some(&json!(1)));
    assert_eq!(
        mirror.value("total"),
        Some(&json!(2)),
        "moving a vote keeps the total"
    );
    assert_eq!(mirror.entries["count/2"]["ver"], seq);
}

#[tokio::test]
async fn voting_again_for_the_same_option_is_acked_and_counts_once() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("poll:same", "poll", lunch()).await;
    let first = alice
        .ack("v1", "poll:same", json!({"type": "vote", "option": 1}))
        .await;
    let second = alice
        .ack("v2", "poll:same", json!({"type": "vote", "option": 1}))
        .await;
    assert_eq!(
        second,
        first + 1,
        "an op that changes nothing still gets its own seq"
    );
    let state = server.room_state("poll:same").await;
    let mirror = Mirror::from_snapshot(&json!({
        "t": "snapshot", "room": "poll:same", "epoch": state["epoch"], "seq": state["seq"],
        "entries": state["entries"]
    }));
    assert_eq!(mirror.value("count/1"), Some(&json!(1)));
    assert_eq!(mirror.value("total"), Some(&json!(1)));
}

#[tokio::test]
async fn vote_for_an_option_out_of_range_is_invalid() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("poll:range", "poll", lunch()).await;
    for (i, option) in [json!(3), json!(-1), json!("0"), json!(1.5)]
        .into_iter()
        .enumerate()
    {
        let code = alice
            .nack(
                &format!("r{i}"),
                "poll:range",
                json!({"type": "vote", "option": option}),
            )
            .await;
        assert_eq!(code, "invalid", "option {option}");
    }
}

#[tokio::test]
async fn retract_removes_the_vote_and_without_a_vote_is_invalid() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("poll:retract", "poll", lunch()).await;
    let code = alice
        .nack("r0", "poll:retract", json!({"type": "retract"}))
        .await;
    assert_eq!(code, "invalid");
    let mut mirror = Mirror::from_snapshot(&alice.sub("poll:retract").await);
    alice
        .ack("r1", "poll:retract", json!({"type": "vote", "option": 1}))
        .await;
    let seq = alice
        .ack("r2", "poll:retract", json!({"type": "retract"}))
        .await;
    follow(&mut alice, &mut mirror, seq).await;
    assert_eq!(mirror.value("count/1"), Some(&json!(0)));
    assert_eq!(mirror.value("total"), Some(&json!(0)));
    let code = alice
        .nack("r3", "poll:retract", json!({"type": "retract"}))
        .await;
    assert_eq!(code, "invalid", "the vote is already gone");
}

#[tokio::test]
async fn only_the_creator_closes_and_closed_polls_refuse_votes_retracts_and_closes() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    alice.create_ok("poll:close", "poll", lunch()).await;
    bob.ack("b1", "poll:close", json!({"type": "vote", "option": 0}))
        .await;

    let code = bob.nack("b2", "poll:close", json!({"type": "close"})).await;
    assert_eq!(code, "forbidden");

    let mut mirror = Mirror::from_snapshot(&bob.sub("poll:close").await);
    let seq = alice
        .ack("a1", "poll:close", json!({"type": "close"}))
        .await;
    follow(&mut bob, &mut mirror, seq).await;
    assert_eq!(mirror.value("closed"), Some(&json!(true)));
    assert_eq!(mirror.entries["closed"]["ver"], seq);

    assert_eq!(
        bob.nack("b3", "poll:close", json!({"type": "vote", "option": 1}))
            .await,
        "closed"
    );
    assert_eq!(
        bob.nack("b4", "poll:close", json!({"type": "retract"}))
            .await,
        "closed"
    );
    assert_eq!(
        alice
            .nack("a2", "poll:close", json!({"type": "close"}))
            .await,
        "closed"
    );
    let state = server.room_state("poll:close").await;
    assert_eq!(state["seq"], seq, "refused ops change nothing");
}

#[tokio::test]
async fn poll_state_never_reveals_who_voted() {
    let server = Server::start(&[]).await;
    let mut alice = server.client("alice").await;
    alice.create_ok("poll:secret", "poll", lunch()).await;
    let mut mirror = Mirror::from_snapshot(&alice.sub("poll:secret").await);
    let seq = alice
        .ack("s1", "poll:secret", json!({"type": "vote", "option": 2}))
        .await;
    let diffs = alice.diffs_until("poll:secret", seq).await;
    for diff in &diffs {
        mirror.apply(diff);
        assert!(
            !diff.to_string().contains("alice"),
            "a diff names a voter: {diff}"
        );
    }
    let snapshot = alice.sub("poll:secret").await;
    assert!(
        !snapshot.to_string().contains("alice"),
        "a snapshot names a voter: {snapshot}"
    );
    let state = server.room_state("poll:secret").await;
    assert!(
        !state.to_string().contains("alice"),
        "room state names a voter: {state}"
    );
}
