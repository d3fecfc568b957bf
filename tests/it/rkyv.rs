//! The `roomd.v1.rkyv` subprotocol, spoken the way a Rust client would: the committed
//! client fixtures (`tests/fixtures/rkyv/client/*.bin`) are sent verbatim, and server
//! frames are decoded with the published types (`roomd::protocol::binary::decode_server`).
//!
//! The fixtures form one coherent session (they create `chat:general`, `poll:lunch` and
//! `state:game`); every test starts its own server, so their fixed ids never collide.

use roomd::protocol::codes::Code;
use roomd::protocol::fixtures::every_kind_value;
use roomd::protocol::message::{ServerMsg, WireEntry, WireValue};
use roomd::protocol::{binary, SUBPROTOCOL_RKYV};
use roomd::value::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Client, Connect, Event, Server, TIMEOUT};

/// The committed bytes of client fixture `$name`.
macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!("../fixtures/rkyv/client/", $name, ".bin")).as_slice()
    };
}

/// Opens an rkyv connection as `user` and returns it with its welcome.
async fn connect(server: &Server, user: &str) -> (Client, ServerMsg) {
    let mut client = match Connect::new()
        .user(user)
        .subprotocols(SUBPROTOCOL_RKYV)
        .handshake(server)
        .await
    {
        Ok(client) => client,
        Err(status) => panic!("the rkyv upgrade was refused with HTTP {status}"),
    };
    let welcome = recv(&mut client).await;
    (client, welcome)
}

async fn send(client: &mut Client, frame: &[u8]) {
    client.send(Message::binary(frame.to_vec())).await;
}

/// The next frame, which must be a binary `ServerMsg` arriving within TIMEOUT.
async fn recv(client: &mut Client) -> ServerMsg {
    match client.next_event(TIMEOUT).await {
        Event::Binary(bytes) => binary::decode_server(&bytes)
            .unwrap_or_else(|e| panic!("the server sent an invalid frame: {e}")),
        other => panic!("expected a binary frame, got {other:?}"),
    }
}

/// Every frame up to and including the first matching `pred`.
async fn collect_until(client: &mut Client, pred: impl Fn(&ServerMsg) -> bool) -> Vec<ServerMsg> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut seen = Vec::new();
    while tokio::time::Instant::now() < deadline {
        let msg = recv(client).await;
        let done = pred(&msg);
        seen.push(msg);
        if done {
            return seen;
        }
    }
    panic!("no matching frame within {TIMEOUT:?}; got {seen:?}");
}

async fn recv_until(client: &mut Client, pred: impl Fn(&ServerMsg) -> bool) -> ServerMsg {
    let mut seen = collect_until(client, pred).await;
    seen.pop()
        .expect("collect_until returns the matching frame last")
}

/// The `ack` or `nack` of `id`.
async fn reply(client: &mut Client, id: &str) -> ServerMsg {
    recv_until(client, |m| match m {
        ServerMsg::Ack { id: got, .. } | ServerMsg::Nack { id: got, .. } => got == id,
        _ => false,
    })
    .await
}

/// Sends a fixture carrying `id` and asserts it is acked at `seq`.
async fn expect_ack(client: &mut Client, frame: &[u8], id: &str, seq: u64) {
    send(client, frame).await;
    let got = reply(client, id).await;
    assert_eq!(got, ServerMsg::Ack { id: id.into(), seq }, "reply to {id}");
}

/// Sends a fixture carrying `id` and returns the nack's code.
async fn expect_nack(client: &mut Client, frame: &[u8], id: &str) -> Code {
    send(client, frame).await;
    match reply(client, id).await {
        ServerMsg::Nack { code, .. } => code,
        other => panic!("expected a nack for {id}, got {other:?}"),
    }
}

/// The answer to a `sub` of `room`: snapshot, resumed or error.
async fn sub_answer(client: &mut Client, frame: &[u8], room: &str) -> ServerMsg {
    send(client, frame).await;
    recv_until(client, |m| match m {
        ServerMsg::Snapshot { room: r, .. } | ServerMsg::Resumed { room: r, .. } => r == room,
        ServerMsg::Error { room: Some(r), .. } => r == room,
        _ => false,
    })
    .await
}

/// The next frame must be an `error` with `code` for `room`.
async fn expect_error(client: &mut Client, code: Code, room: Option<&str>) {
    match recv_until(client, |m| matches!(m, ServerMsg::Error { .. })).await {
        ServerMsg::Error {
            code: got,
            room: got_room,
            ..
        } => {
            assert_eq!(got, code);
            assert_eq!(got_room.as_deref(), room);
        }
        _ => unreachable!("recv_until returned a frame matching its predicate"),
    }
}

fn wire(value: Value) -> Option<WireValue> {
    Some(WireValue::from_value(&value))
}

fn find<'a>(entries: &'a [WireEntry], key: &str) -> &'a WireEntry {
    entries
        .iter()
        .find(|e| e.k == key)
        .unwrap_or_else(|| panic!("no entry {key} in {entries:?}"))
}

#[tokio::test]
async fn rkyv_subprotocol_is_selected_and_welcome_is_binary() {
    let server = Server::start(&[]).await;
    let (client, welcome) = connect(&server, "alice").await;
    assert_eq!(client.subprotocol.as_deref(), Some(SUBPROTOCOL_RKYV));
    match welcome {
        ServerMsg::Welcome {
            proto,
            session,
            user,
            heartbeat_ms,
            max_frame,
        } => {
            assert_eq!(proto, 1);
            assert!(!session.is_empty());
            assert_eq!(user, "alice");
            assert_eq!(heartbeat_ms, 15_000);
            assert_eq!(max_frame, 65_536);
        }
        other => panic!("the first frame must be welcome, got {other:?}"),
    }
}

#[tokio::test]
async fn create_fixtures_are_acked_with_seq_1() {
    let server = Server::start(&[]).await;
    let (mut alice, _) = connect(&server, "alice").await;
    expect_ack(&mut alice, fixture!("create_chat"), "c1", 1).await;
    expect_ack(&mut alice, fixture!("create_poll"), "c2", 1).await;
    expect_ack(&mut alice, fixture!("create_state"), "c3", 1).await;
}

#[tokio::test]
async fn sub_fixtures_are_answered_with_a_snapshot() {
    let server = Server::start(&[]).await;
    let (mut alice, _) = connect(&server, "alice").await;
    expect_ack(&mut alice, fixture!("create_poll"), "c2", 1).await;
    let ServerMsg::Snapshot {
        kind,
        epoch,
        seq,
        entries,
        recovered,
        ..
    } = sub_answer(&mut alice, fixture!("sub"), "poll:lunch").await
    else {
        panic!("sub must be answered with a snapshot");
    };
    assert_eq!((kind.as_str(), seq, recovered), ("poll", 1, false));
    let keys: Vec<&str> = entries.iter().map(|e| e.k.as_str()).collect();
    assert_eq!(
        keys,
        ["closed", "count/0", "count/1", "options", "question", "total"]
    );
    let question = find(&entries, "question");
    assert_eq!(question.v, wire(Value::Str("Lunch?".into())));
    assert_eq!(question.ver, 1);

    // The fixture's `since` names an epoch this room never had: a fresh snapshot.
    match sub_answer(&mut alice, fixture!("sub_since"), "poll:lunch").await {
        ServerMsg::Snapshot {
            epoch: again,
            seq: 1,
            recovered: false,
            ..
        } => assert_eq!(again, epoch),
        other => panic!("a foreign epoch must be answered with a snapshot, got {other:?}"),
    }
}

#[tokio::test]
async fn op_fixture_is_acked_and_its_diff_carries_the_vote() {
    let server = Server::start(&[]).await;
    let (mut alice, _) = connect(&server, "alice").await;
    expect_ack(&mut alice, fixture!("create_poll"), "c2", 1).await;
    sub_answer(&mut alice, fixture!("sub"), "poll:lunch").await;
    send(&mut alice, fixture!("op_vote")).await;
    // The ack and the diff that carries it may come in either order.
    let mut ack = None;
    let mut diff = None;
    while ack.is_none() || diff.is_none() {
        match recv(&mut alice).await {
            msg @ ServerMsg::Ack { .. } => ack = Some(msg),
            msg @ ServerMsg::Diff { .. } => diff = Some(msg),
            other => panic!("unexpected frame {other:?}"),
        }
    }
    assert_eq!(
        ack,
        Some(ServerMsg::Ack {
            id: "c4".into(),
            seq: 2
        })
    );
    let Some(ServerMsg::Diff {
        room,
        from,
        to,
        changes,
        ..
    }) = diff
    else {
        unreachable!("the loop ends only with a diff");
    };
    assert_eq!((room.as_str(), from, to), ("poll:lunch", 2, 2));
    assert_eq!(find(&changes, "count/1").v, wire(Value::Int(1)));
    assert_eq!(find(&changes, "total").v, wire(Value::Int(1)));
    assert!(changes.iter().all(|e| e.ver == 2), "{changes:?}");
}

#[tokio::test]
async fn resent_op_fixture_gets_the_original_ack_and_applies_once() {
    let server = Server::start(&[]).await;
    let (mut alice, _) = connect(&server, "alice").await;
    expect_ack(&mut alice, fixture!("create_poll"), "c2", 1).await;
    expect_ack(&mut alice, fixture!("op_vote"), "c4", 2).await;
    expect_ack(&mut alice, fixture!("op_vote"), "c4", 2).await;
    // A re-sent create is answered from the record too, not with `exists`.
    expect_ack(&mut alice, fixture!("create_poll"), "c2", 1).await;
    let ServerMsg::Snapshot { seq, entries, .. } =
        sub_answer(&mut alice, fixture!("sub"), "poll:lunch").await
    else {
        panic!("sub must be answered with a snapshot");
    };
    assert_eq!(seq, 2, "the duplicate must not be a new event");
    assert_eq!(find(&entries, "total").v, wire(Value::Int(1)));
}

#[tokio::test]
async fn nacks_carry_their_codes_and_a_nacked_id_is_not_recorded() {
    let server = Server::start(&[]).await;
    let (mut alice, _) = connect(&server, "alice").await;
    assert_eq!(
        expect_nack(&mut alice, fixture!("op_vote"), "c4").await,
        Code::NotFound
    );
    expect_ack(&mut alice, fixture!("create_poll"), "c2", 1).await;
    expect_ack(&mut alice, fixture!("op_vote"), "c4", 2).await;

    // A value too deep is an op the server nacks `invalid`, never a bad frame.
    expect_ack(&mut alice, fixture!("create_state"), "c3", 1).await;
    assert_eq!(
        expect_nack(&mut alice, fixture!("op_too_deep"), "c7").await,
        Code::Invalid
    );
}

#[tokio::test]
async fn values_of_every_kind_survive_the_server_unchanged() {
    let server = Server::start(&[]).await;
    let (mut alice, _) = connect(&server, "alice").await;
    expect_ack(&mut alice, fixture!("create_state"), "c3", 1).await;
    let ServerMsg::Snapshot { entries, .. } =
        sub_answer(&mut alice, fixture!("sub_state"), "state:game").await
    else {
        panic!("sub must be answered with a snapshot");
    };
    assert_eq!(find(&entries, "board").v, wire(every_kind_value()));
    assert_eq!(find(&entries, "score/red").v, wire(Value::Int(0)));

    send(&mut alice, fixture!("op_set")).await;
    send(&mut alice, fixture!("op_incr")).await;
    // Acks and diffs interleave in any order; gather until both acks and seq 3 are in.
    let mut acks = Vec::new();
    let mut changed = std::collections::BTreeMap::new();
    let mut head = 1;
    while acks.len() < 2 || head < 3 {
        match recv(&mut alice).await {
            ServerMsg::Ack { id, seq } => acks.push((id, seq)),
            ServerMsg::Diff {
                from, to, changes, ..
            } => {
                assert_eq!(from, head + 1, "diffs chain");
                head = to;
                changed.extend(changes.into_iter().map(|e| (e.k, e.v)));
            }
            other => panic!("unexpected frame {other:?}"),
        }
    }
    assert_eq!(acks, [("c5".to_string(), 2), ("c6".to_string(), 3)]);
    assert_eq!(changed["players/alice"], wire(every_kind_value()));
    assert_eq!(changed["score/red"], wire(Value::Int(-3)));
}

#[tokio::test]
async fn malformed_bytes_get_a_bad_frame_error_and_the_connection_stays_open() {
    let server = Server::start(&[]).await;
    let (mut alice, _) = connect(&server, "alice").await;
    let create = fixture!("create_poll");
    for garbage in [&[0xff; 64][..], &create[..create.len() - 5], b"", b"{}"] {
        send(&mut alice, garbage).await;
        expect_error(&mut alice, Code::BadFrame, None).await;
    }
    expect_ack(&mut alice, create, "c2", 1).await;
}

#[tokio::test]
async fn text_frame_on_an_rkyv_connection_is_a_bad_frame() {
    let server = Server::start(&[]).await;
    let (mut alice, _) = connect(&server, "alice").await;
    let json = include_str!("../fixtures/rkyv/client/create_poll.json");
    alice.send_text(json).await;
    expect_error(&mut alice, Code::BadFrame, None).await;
    // The text frame was not executed: the room does not exist.
    match sub_answer(&mut alice, fixture!("sub"), "poll:lunch").await {
        ServerMsg::Error {
            code: Code::NotFound,
            ..
        } => {}
        other => panic!("expected not_found for a room never created, got {other:?}"),
    }
}

#[tokio::test]
async fn unsub_fixture_ends_the_subscription() {
    let server = Server::start(&[]).await;
    let (mut alice, _) = connect(&server, "alice").await;
    expect_ack(&mut alice, fixture!("create_poll"), "c2", 1).await;
    sub_answer(&mut alice, fixture!("sub"), "poll:lunch").await;
    send(&mut alice, fixture!("unsub")).await;
    // The second unsub finds no subscription left, which only the first could remove.
    send(&mut alice, fixture!("unsub")).await;
    expect_error(&mut alice, Code::NotFound, Some("poll:lunch")).await;
}

#[tokio::test]
async fn signal_fixture_reaches_another_member_with_presence() {
    let server = Server::start(&[]).await;
    let (mut alice, _) = connect(&server, "alice").await;
    let (mut bob, _) = connect(&server, "bob").await;
    expect_ack(&mut alice, fixture!("create_chat"), "c1", 1).await;
    for (client, user) in [(&mut alice, "alice"), (&mut bob, "bob")] {
        sub_answer(client, fixture!("sub_presence"), "chat:general").await;
        let members = recv_until(client, |m| matches!(m, ServerMsg::PresenceMembers { .. })).await;
        let ServerMsg::PresenceMembers { room, members } = members else {
            unreachable!("recv_until returned a frame matching its predicate");
        };
        assert_eq!(room, "chat:general");
        assert!(
            members.iter().any(|m| m.user == user && m.conns == 1),
            "{user} is among the members: {members:?}"
        );
    }
    send(&mut alice, fixture!("signal")).await;
    let signal = recv_until(&mut bob, |m| matches!(m, ServerMsg::Signal { .. })).await;
    let expected = WireValue::from_value(&Value::map([
        (
            "cursor",
            Value::map([("x", Value::Int(3)), ("y", Value::Int(-7))]),
        ),
        ("typing", Value::Bool(true)),
    ]));
    assert_eq!(
        signal,
        ServerMsg::Signal {
            room: "chat:general".into(),
            user: "alice".into(),
            data: expected
        }
    );
}

#[tokio::test]
async fn json_subscriber_sees_the_op_an_rkyv_client_made() {
    let server = Server::start(&[]).await;
    let (mut alice, _) = connect(&server, "alice").await;
    expect_ack(&mut alice, fixture!("create_poll"), "c2", 1).await;
    let mut bob = server.client("bob").await;
    bob.sub("poll:lunch").await;
    expect_ack(&mut alice, fixture!("op_vote"), "c4", 2).await;
    let diffs = bob.diffs_until("poll:lunch", 2).await;
    let last = diffs
        .last()
        .expect("diffs_until returns the diff reaching seq 2");
    let count = crate::support::entry(&last["changes"], "count/1").expect("count/1 changed");
    assert_eq!(count["v"], 1);
}
