//! Canonical examples of every wire message, and the committed byte fixtures they pin.
//!
//! [`canonical_messages`] names one example of every [`ClientMsg`] and [`ServerMsg`]
//! variant (and of the shapes client authors trip over: `sub` with and without `since`,
//! both `presence` shapes, deleted entries, values holding every [`Node`] kind). Each is
//! committed under `tests/fixtures/rkyv/{client,server}/<name>.bin` (the exact
//! `roomd.v1.rkyv` frame) next to `<name>.json` (the same message as a `roomd.v1.json`
//! text frame), so a client can be written and checked against them without Rust.
//!
//! The test `rkyv_bytes_match_committed_fixtures` fails when the encoders no longer
//! produce the committed bytes: that is a protocol change and needs a version bump
//! (PROTOCOL.md), not a silent re-bless. To (re)write the files after a deliberate change:
//!
//! ```text
//! ROOMD_BLESS_FIXTURES=1 cargo test --lib rkyv_bytes_match_committed_fixtures
//! ```
//!
//! This module only builds examples; the codecs live in `json` and `binary`, and the
//! black-box tests that send these bytes to a real server live in `tests/it/rkyv.rs`.

use super::codes::Code;
use super::message::{ClientMsg, Node, ServerMsg, WireEntry, WireMember, WireSince, WireValue};
use crate::value::{Value, MAX_DEPTH};

/// The epoch used by every server fixture (JSON `"9f3c51a20b7ed4c8"`).
pub const FIXTURE_EPOCH: u64 = 0x9f3c_51a2_0b7e_d4c8;

/// A value holding every value kind (and so every [`Node`] kind): null, bool, negative
/// and extreme integers, a float, a non-ASCII string, bytes, and nested lists and maps,
/// empty ones included.
pub fn every_kind_value() -> Value {
    Value::map([
        ("null", Value::Null),
        ("bool", Value::Bool(true)),
        ("neg", Value::Int(-42)),
        ("min", Value::Int(i64::MIN)),
        ("float", Value::Float(-2.5)),
        ("str", Value::Str("héllo ✓".into())),
        ("bytes", Value::Bytes(vec![0, 1, 2, 0xfe, 0xff])),
        (
            "list",
            Value::List(vec![
                Value::Int(1),
                Value::List(vec![Value::Bool(false), Value::Map(Default::default())]),
                Value::Str("x".into()),
            ]),
        ),
        (
            "map",
            Value::map([
                (
                    "inner",
                    Value::map([("deep", Value::List(vec![Value::Null]))]),
                ),
                ("empty", Value::List(vec![])),
            ]),
        ),
    ])
}

/// [`every_kind_value`] as JSON text, written by hand; a macro so `concat!` can use it.
macro_rules! every_kind_json {
    () => {
        r#"{"null":null,"bool":true,"neg":-42,"min":-9223372036854775808,"float":-2.5,"str":"héllo ✓","bytes":{"$b64":"AAEC/v8="},"list":[1,[false,{}],"x"],"map":{"inner":{"deep":[null]},"empty":[]}}"#
    };
}

fn wire(value: Value) -> WireValue {
    WireValue::from_value(&value)
}

fn s(text: &str) -> Value {
    Value::Str(text.into())
}

/// An op nested one level deeper than [`MAX_DEPTH`]: it must be nacked `invalid` under
/// its id, never answered with `bad_frame`.
fn too_deep_op() -> WireValue {
    let mut nodes = vec![Node::List(1); MAX_DEPTH + 1];
    nodes.push(Node::Int(1));
    WireValue { nodes }
}

fn entry(k: &str, v: Value, ver: u64) -> WireEntry {
    WireEntry {
        k: k.into(),
        v: Some(wire(v)),
        ver,
    }
}

fn deleted(k: &str, ver: u64) -> WireEntry {
    WireEntry {
        k: k.into(),
        v: None,
        ver,
    }
}

/// A message with its fixture name.
pub type Named<T> = (&'static str, T);

/// One named example of every client and server message.
///
/// Names are file names: stable, unique within each list. The client examples form a
/// coherent session (the rooms they create are the rooms the later ones use), so
/// `tests/it/rkyv.rs` can send them verbatim to a fresh server.
pub fn canonical_messages() -> (Vec<Named<ClientMsg>>, Vec<Named<ServerMsg>>) {
    (client_messages(), server_messages())
}

fn client_messages() -> Vec<Named<ClientMsg>> {
    vec![
        (
            "create_chat",
            ClientMsg::Create {
                id: "c1".into(),
                room: "chat:general".into(),
                kind: "chat".into(),
                init: wire(Value::map([("history", Value::Int(100))])),
            },
        ),
        (
            "create_poll",
            ClientMsg::Create {
                id: "c2".into(),
                room: "poll:lunch".into(),
                kind: "poll".into(),
                init: wire(Value::map([
                    ("question", s("Lunch?")),
                    ("options", Value::List(vec![s("pizza"), s("sushi")])),
                ])),
            },
        ),
        (
            "create_state",
            ClientMsg::Create {
                id: "c3".into(),
                room: "state:game".into(),
                kind: "state".into(),
                init: wire(Value::map([(
                    "entries",
                    Value::map([("board", every_kind_value()), ("score/red", Value::Int(0))]),
                )])),
            },
        ),
        (
            "sub",
            ClientMsg::Sub {
                room: "poll:lunch".into(),
                presence: false,
                since: None,
            },
        ),
        (
            "sub_state",
            ClientMsg::Sub {
                room: "state:game".into(),
                presence: false,
                since: None,
            },
        ),
        (
            "sub_presence",
            ClientMsg::Sub {
                room: "chat:general".into(),
                presence: true,
                since: None,
            },
        ),
        (
            "sub_since",
            ClientMsg::Sub {
                room: "poll:lunch".into(),
                presence: false,
                since: Some(WireSince {
                    epoch: FIXTURE_EPOCH,
                    seq: 41,
                }),
            },
        ),
        (
            "unsub",
            ClientMsg::Unsub {
                room: "poll:lunch".into(),
            },
        ),
        (
            "op_vote",
            ClientMsg::Op {
                id: "c4".into(),
                room: "poll:lunch".into(),
                op: wire(Value::map([("type", s("vote")), ("option", Value::Int(1))])),
            },
        ),
        (
            "op_set",
            ClientMsg::Op {
                id: "c5".into(),
                room: "state:game".into(),
                op: wire(Value::map([
                    ("type", s("set")),
                    ("key", s("players/alice")),
                    ("value", every_kind_value()),
                    ("if_ver", Value::Int(0)),
                ])),
            },
        ),
        (
            "op_incr",
            ClientMsg::Op {
                id: "c6".into(),
                room: "state:game".into(),
                op: wire(Value::map([
                    ("type", s("incr")),
                    ("key", s("score/red")),
                    ("by", Value::Int(-3)),
                ])),
            },
        ),
        (
            "op_too_deep",
            ClientMsg::Op {
                id: "c7".into(),
                room: "state:game".into(),
                op: too_deep_op(),
            },
        ),
        (
            "signal",
            ClientMsg::Signal {
                room: "chat:general".into(),
                data: wire(Value::map([
                    (
                        "cursor",
                        Value::map([("x", Value::Int(3)), ("y", Value::Int(-7))]),
                    ),
                    ("typing", Value::Bool(true)),
                ])),
            },
        ),
        (
            "auth",
            ClientMsg::Auth {
                token: "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln".into(),
            },
        ),
        // A room of an application's kind: the rock-paper-scissors of `examples/rps.rs`.
        (
            "create_rps",
            ClientMsg::Create {
                id: "r1".into(),
                room: "rps:game".into(),
                kind: "rps".into(),
                init: wire(Value::map::<&str>([])),
            },
        ),
        (
            "sub_rps",
            ClientMsg::Sub {
                room: "rps:game".into(),
                presence: false,
                since: None,
            },
        ),
        (
            "op_rps_join",
            ClientMsg::Op {
                id: "r2".into(),
                room: "rps:game".into(),
                op: wire(Value::map([("type", s("join"))])),
            },
        ),
        (
            "op_rps_rock",
            ClientMsg::Op {
                id: "r3".into(),
                room: "rps:game".into(),
                op: wire(Value::map([("type", s("move")), ("move", s("rock"))])),
            },
        ),
        (
            "op_rps_paper",
            ClientMsg::Op {
                id: "r4".into(),
                room: "rps:game".into(),
                op: wire(Value::map([("type", s("move")), ("move", s("paper"))])),
            },
        ),
    ]
}

/// The `roomd.v1.json` text of each client example, written by hand (not produced by
/// any encoder, so it checks the JSON decoder against the rkyv one).
pub fn client_json(name: &str) -> Option<&'static str> {
    let text = match name {
        "create_chat" => {
            r#"{"t":"create","id":"c1","room":"chat:general","kind":"chat","init":{"history":100}}"#
        }
        "create_poll" => {
            r#"{"t":"create","id":"c2","room":"poll:lunch","kind":"poll","init":{"question":"Lunch?","options":["pizza","sushi"]}}"#
        }
        "create_state" => concat!(
            r#"{"t":"create","id":"c3","room":"state:game","kind":"state","init":{"entries":{"board":"#,
            every_kind_json!(),
            r#","score/red":0}}}"#
        ),
        "sub" => r#"{"t":"sub","room":"poll:lunch"}"#,
        "sub_state" => r#"{"t":"sub","room":"state:game","presence":false}"#,
        "sub_presence" => r#"{"t":"sub","room":"chat:general","presence":true}"#,
        "sub_since" => {
            r#"{"t":"sub","room":"poll:lunch","since":{"epoch":"9f3c51a20b7ed4c8","seq":41}}"#
        }
        "unsub" => r#"{"t":"unsub","room":"poll:lunch"}"#,
        "op_vote" => r#"{"t":"op","id":"c4","room":"poll:lunch","op":{"type":"vote","option":1}}"#,
        "op_set" => concat!(
            r#"{"t":"op","id":"c5","room":"state:game","op":{"type":"set","key":"players/alice","value":"#,
            every_kind_json!(),
            r#","if_ver":0}}"#
        ),
        "op_incr" => {
            r#"{"t":"op","id":"c6","room":"state:game","op":{"type":"incr","key":"score/red","by":-3}}"#
        }
        "op_too_deep" => {
            r#"{"t":"op","id":"c7","room":"state:game","op":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}"#
        }
        "signal" => {
            r#"{"t":"signal","room":"chat:general","data":{"cursor":{"x":3,"y":-7},"typing":true}}"#
        }
        "auth" => r#"{"t":"auth","token":"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln"}"#,
        "create_rps" => r#"{"t":"create","id":"r1","room":"rps:game","kind":"rps","init":{}}"#,
        "sub_rps" => r#"{"t":"sub","room":"rps:game"}"#,
        "op_rps_join" => r#"{"t":"op","id":"r2","room":"rps:game","op":{"type":"join"}}"#,
        "op_rps_rock" => {
            r#"{"t":"op","id":"r3","room":"rps:game","op":{"type":"move","move":"rock"}}"#
        }
        "op_rps_paper" => {
            r#"{"t":"op","id":"r4","room":"rps:game","op":{"type":"move","move":"paper"}}"#
        }
        _ => return None,
    };
    Some(text)
}

fn server_messages() -> Vec<Named<ServerMsg>> {
    vec![
        (
            "welcome",
            ServerMsg::Welcome {
                proto: super::PROTO_VERSION,
                session: "s-3f9a1c".into(),
                user: "alice".into(),
                heartbeat_ms: 15_000,
                max_frame: 65_536,
            },
        ),
        (
            "snapshot",
            ServerMsg::Snapshot {
                room: "poll:lunch".into(),
                kind: "poll".into(),
                epoch: FIXTURE_EPOCH,
                seq: 3,
                entries: vec![
                    entry("closed", Value::Bool(false), 1),
                    entry("count/0", Value::Int(0), 1),
                    entry("count/1", Value::Int(2), 3),
                    entry("options", Value::List(vec![s("pizza"), s("sushi")]), 1),
                    entry("question", s("Lunch?"), 1),
                    entry("total", Value::Int(2), 3),
                ],
                recovered: false,
            },
        ),
        (
            "snapshot_state",
            ServerMsg::Snapshot {
                room: "state:game".into(),
                kind: "state".into(),
                epoch: FIXTURE_EPOCH,
                seq: 2,
                entries: vec![
                    entry("board", every_kind_value(), 1),
                    entry("players/alice", every_kind_value(), 2),
                    entry("score/red", Value::Int(0), 1),
                ],
                recovered: false,
            },
        ),
        (
            "resumed",
            ServerMsg::Resumed {
                room: "poll:lunch".into(),
                epoch: FIXTURE_EPOCH,
                from: 42,
                to: 57,
                changes: vec![
                    entry("count/0", Value::Int(7), 55),
                    entry("count/1", Value::Int(9), 57),
                    entry("total", Value::Int(16), 57),
                ],
            },
        ),
        (
            "resumed_empty",
            ServerMsg::Resumed {
                room: "poll:lunch".into(),
                epoch: FIXTURE_EPOCH,
                from: 58,
                to: 57,
                changes: vec![],
            },
        ),
        (
            "diff",
            ServerMsg::Diff {
                room: "state:game".into(),
                epoch: FIXTURE_EPOCH,
                from: 58,
                to: 63,
                changes: vec![
                    deleted("players/alice", 60),
                    entry(
                        "players/bob",
                        Value::map([("hp", Value::Int(10)), ("pos", Value::Float(0.5))]),
                        63,
                    ),
                    entry("score/red", Value::Int(-3), 61),
                ],
            },
        ),
        (
            "ack",
            ServerMsg::Ack {
                id: "c4".into(),
                seq: 58,
            },
        ),
        (
            "nack_conflict",
            ServerMsg::Nack {
                id: "c5".into(),
                code: Code::Conflict,
                msg: "key \"players/alice\" is at ver 60, not 0".into(),
            },
        ),
        (
            "nack_invalid",
            ServerMsg::Nack {
                id: "c7".into(),
                code: Code::Invalid,
                msg: "value nested deeper than 32 levels".into(),
            },
        ),
        (
            "nack_rate_limited",
            ServerMsg::Nack {
                id: "c8".into(),
                code: Code::RateLimited,
                msg: "more than 200 ops/s (burst 400)".into(),
            },
        ),
        (
            "presence_members",
            ServerMsg::PresenceMembers {
                room: "chat:general".into(),
                members: vec![
                    WireMember {
                        user: "alice".into(),
                        conns: 2,
                    },
                    WireMember {
                        user: "bob".into(),
                        conns: 1,
                    },
                ],
            },
        ),
        (
            "presence_change",
            ServerMsg::PresenceChange {
                room: "chat:general".into(),
                join: vec!["bob".into()],
                leave: vec!["carol".into()],
            },
        ),
        (
            "presence_join_only",
            ServerMsg::PresenceChange {
                room: "chat:general".into(),
                join: vec!["dave".into(), "erin".into()],
                leave: vec![],
            },
        ),
        (
            "signal",
            ServerMsg::Signal {
                room: "chat:general".into(),
                user: "alice".into(),
                data: wire(Value::map([
                    (
                        "cursor",
                        Value::map([("x", Value::Int(3)), ("y", Value::Int(-7))]),
                    ),
                    ("typing", Value::Bool(true)),
                ])),
            },
        ),
        (
            "error_bad_frame",
            ServerMsg::Error {
                code: Code::BadFrame,
                room: None,
                msg: "not a valid rkyv ClientMsg".into(),
            },
        ),
        (
            "error_not_found",
            ServerMsg::Error {
                code: Code::NotFound,
                room: Some("poll:gone".into()),
                msg: "no room \"poll:gone\"".into(),
            },
        ),
        (
            "error_limit",
            ServerMsg::Error {
                code: Code::Limit,
                room: Some("chat:general".into()),
                msg: "101 subscriptions exceed limit of 100".into(),
            },
        ),
        (
            "authed",
            ServerMsg::Authed {
                exp: Some(1_767_225_600),
            },
        ),
        ("authed_no_exp", ServerMsg::Authed { exp: None }),
        (
            "error_forbidden",
            ServerMsg::Error {
                code: Code::Forbidden,
                room: Some("chat:private".into()),
                msg: "no read permission on this room".into(),
            },
        ),
    ]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::protocol::{binary, json, Inbound};

    fn fixture_dir(side: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/rkyv")
            .join(side)
    }

    fn blessing() -> bool {
        std::env::var_os("ROOMD_BLESS_FIXTURES").is_some_and(|v| v == "1")
    }

    /// Errors carry reasons worded by each codec; the contract is only that both refuse.
    fn without_reasons(inbound: Inbound) -> Inbound {
        let erase = |r: Result<Value, String>| r.map_err(|_| String::new());
        match inbound {
            Inbound::Create {
                id,
                room,
                kind,
                init,
            } => Inbound::Create {
                id,
                room,
                kind,
                init: erase(init),
            },
            Inbound::Op { id, room, op } => Inbound::Op {
                id,
                room,
                op: erase(op),
            },
            Inbound::Signal { room, data } => Inbound::Signal {
                room,
                data: erase(data),
            },
            other => other,
        }
    }

    /// Writes (blessing) or checks each `(name, bin, json)` in `side`, and that the
    /// directory holds nothing else.
    fn bless_or_compare(side: &str, files: &[(&str, Vec<u8>, String)]) -> Vec<String> {
        let dir = fixture_dir(side);
        let mut failures = Vec::new();
        if blessing() {
            std::fs::create_dir_all(&dir).expect("the fixture directory can be created");
        }
        let mut expected = BTreeSet::new();
        for (name, bin, text) in files {
            for (file, bytes) in [
                (format!("{name}.bin"), bin.as_slice()),
                (format!("{name}.json"), text.as_bytes()),
            ] {
                let path = dir.join(&file);
                if blessing() {
                    std::fs::write(&path, bytes).expect("a fixture can be written");
                } else {
                    match std::fs::read(&path) {
                        Ok(committed) if committed == bytes => {}
                        Ok(_) => failures.push(format!("{side}/{file} differs from the encoder")),
                        Err(e) => failures.push(format!("{side}/{file}: {e}")),
                    }
                }
                expected.insert(file);
            }
        }
        let present = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        for file in present.iter().filter(|f| !expected.contains(*f)) {
            if blessing() {
                std::fs::remove_file(dir.join(file)).expect("a stale fixture can be removed");
            } else {
                failures.push(format!("{side}/{file} is not a canonical message"));
            }
        }
        failures
    }

    #[test]
    fn rkyv_bytes_match_committed_fixtures() {
        let (client, server) = canonical_messages();
        let mut client_files = Vec::new();
        for (name, msg) in &client {
            let text = client_json(name).unwrap_or_else(|| panic!("no JSON text for {name}"));
            client_files.push((*name, binary::encode_client(msg).to_vec(), text.to_owned()));
        }
        let server_files: Vec<_> = server
            .iter()
            .map(|(name, msg)| (*name, binary::encode(msg).to_vec(), json::encode(msg)))
            .collect();
        let mut failures = bless_or_compare("client", &client_files);
        failures.extend(bless_or_compare("server", &server_files));
        assert!(
            failures.is_empty(),
            "the wire bytes changed, which is a protocol version bump (see the module \
             docs to re-bless after a deliberate change):\n{}",
            failures.join("\n")
        );

        // The committed bytes decode to the same message, and the JSON and rkyv forms of
        // each client message mean the same thing.
        for (name, bin, text) in &client_files {
            let committed =
                std::fs::read(fixture_dir("client").join(format!("{name}.bin"))).expect("read");
            let from_rkyv = binary::decode(&committed)
                .unwrap_or_else(|e| panic!("client/{name}.bin does not decode: {e}"));
            let from_json = json::decode(text)
                .unwrap_or_else(|e| panic!("client/{name}.json does not decode: {e}"));
            assert_eq!(
                without_reasons(from_rkyv),
                without_reasons(from_json),
                "client/{name}: the rkyv and JSON forms differ"
            );
            assert_eq!(&committed, bin);
        }
        for (name, msg) in &server {
            let committed =
                std::fs::read(fixture_dir("server").join(format!("{name}.bin"))).expect("read");
            let decoded = binary::decode_server(&committed)
                .unwrap_or_else(|e| panic!("server/{name}.bin does not decode: {e}"));
            assert_eq!(&decoded, msg, "server/{name}.bin");
        }
    }

    #[test]
    fn fixtures_cover_every_variant() {
        let (client, server) = canonical_messages();
        let client_tags: BTreeSet<&str> = client
            .iter()
            .map(|(_, m)| match m {
                ClientMsg::Create { .. } => "create",
                ClientMsg::Sub { .. } => "sub",
                ClientMsg::Unsub { .. } => "unsub",
                ClientMsg::Op { .. } => "op",
                ClientMsg::Signal { .. } => "signal",
                ClientMsg::Auth { .. } => "auth",
            })
            .collect();
        assert_eq!(client_tags.len(), 6, "{client_tags:?}");
        let server_tags: BTreeSet<&str> = server
            .iter()
            .map(|(_, m)| match m {
                ServerMsg::Welcome { .. } => "welcome",
                ServerMsg::Snapshot { .. } => "snapshot",
                ServerMsg::Resumed { .. } => "resumed",
                ServerMsg::Diff { .. } => "diff",
                ServerMsg::Ack { .. } => "ack",
                ServerMsg::Nack { .. } => "nack",
                ServerMsg::PresenceMembers { .. } => "presence_members",
                ServerMsg::PresenceChange { .. } => "presence_change",
                ServerMsg::Signal { .. } => "signal",
                ServerMsg::Error { .. } => "error",
                ServerMsg::Authed { .. } => "authed",
            })
            .collect();
        assert_eq!(server_tags.len(), 11, "{server_tags:?}");
        let names: BTreeSet<&str> = client.iter().map(|(n, _)| *n).collect();
        assert_eq!(names.len(), client.len(), "client fixture names are unique");
        let names: BTreeSet<&str> = server.iter().map(|(n, _)| *n).collect();
        assert_eq!(names.len(), server.len(), "server fixture names are unique");

        let nodes = WireValue::from_value(&every_kind_value()).nodes;
        let kinds: std::collections::HashSet<std::mem::Discriminant<Node>> =
            nodes.iter().map(std::mem::discriminant).collect();
        assert_eq!(kinds.len(), 8, "every Node kind appears: {nodes:?}");
    }
}
