//! The client's side of the two encodings: [`ClientMsg`] out, [`ServerMsg`] in.
//!
//! rkyv goes through the published `protocol::binary` functions. JSON is written and
//! read here ([`encode_client`], [`decode_server`]), mirroring `protocol::json`, which
//! only speaks the server's side. Both decoders end in [`Incoming`], the client's own
//! view of a server message with values rebuilt (and bounded) as domain [`Value`]s.
//! Nothing here panics on server bytes: every malformed frame is a [`BadFrame`].

use serde_json::{json, Map, Value as Json};
use tokio_tungstenite::tungstenite::Message;

use super::subscription::{Change, Member, Presence};
use crate::protocol::codes::Code;
use crate::protocol::ids::{epoch_hex, parse_epoch};
use crate::protocol::message::{ClientMsg, ServerMsg, WireEntry, WireMember, WireValue};
use crate::protocol::{binary, json as server_json, BadFrame, Encoding};
use crate::value::Value;

/// Encodes a client message as a `roomd.v1.json` text frame.
///
/// Values are written node for node, with no depth check, so the server judges them
/// exactly as it judges the same message in rkyv (too deep: nacked `invalid`). A
/// [`WireValue`] whose nodes do not form one value is written as `null`.
pub fn encode_client(msg: &ClientMsg) -> String {
    let value = wire_to_json;
    let json = match msg {
        ClientMsg::Create {
            id,
            room,
            kind,
            init,
        } => json!({"t": "create", "id": id, "room": room, "kind": kind, "init": value(init)}),
        ClientMsg::Sub {
            room,
            presence,
            since,
        } => {
            let mut obj = Map::new();
            obj.insert("t".into(), "sub".into());
            obj.insert("room".into(), room.as_str().into());
            if *presence {
                obj.insert("presence".into(), true.into());
            }
            if let Some(since) = since {
                obj.insert(
                    "since".into(),
                    json!({"epoch": epoch_hex(since.epoch), "seq": since.seq}),
                );
            }
            Json::Object(obj)
        }
        ClientMsg::Unsub { room } => json!({"t": "unsub", "room": room}),
        ClientMsg::Op { id, room, op } => {
            json!({"t": "op", "id": id, "room": room, "op": value(op)})
        }
        ClientMsg::Signal { room, data } => {
            json!({"t": "signal", "room": room, "data": value(data)})
        }
        ClientMsg::Auth { token } => json!({"t": "auth", "token": token}),
    };
    json.to_string()
}

/// Writes a flattened value as JSON without rebuilding a [`Value`] (which would enforce
/// the depth rule). Iterative, like `WireValue::to_value`.
fn wire_to_json(wire: &WireValue) -> Json {
    use crate::protocol::message::Node;
    use base64::Engine as _;

    /// A container being filled: items still to read, what was read, a pending key.
    enum Open {
        List(usize, Vec<Json>),
        Map(usize, Map<String, Json>, Option<String>),
    }
    let mut stack: Vec<Open> = Vec::new();
    for node in &wire.nodes {
        if let Some(Open::Map(_, _, key @ None)) = stack.last_mut() {
            let Node::Str(k) = node else {
                return Json::Null;
            };
            *key = Some(k.clone());
            continue;
        }
        let mut done = match node {
            Node::Null => Json::Null,
            Node::Bool(b) => Json::Bool(*b),
            Node::Int(n) => Json::from(*n),
            Node::Float(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
            Node::Str(s) => Json::String(s.clone()),
            Node::Bytes(b) => {
                json!({"$b64": base64::engine::general_purpose::STANDARD.encode(b)})
            }
            Node::List(0) => Json::Array(Vec::new()),
            Node::Map(0) => Json::Object(Map::new()),
            Node::List(n) => {
                stack.push(Open::List(*n as usize, Vec::new()));
                continue;
            }
            Node::Map(n) => {
                stack.push(Open::Map(*n as usize, Map::new(), None));
                continue;
            }
        };
        // Hand the finished value to its parent, closing every parent it completes.
        loop {
            let left = match stack.last_mut() {
                None => return done,
                Some(Open::List(left, items)) => {
                    items.push(done);
                    left
                }
                Some(Open::Map(left, map, key)) => {
                    let Some(key) = key.take() else {
                        return Json::Null;
                    };
                    map.insert(key, done);
                    left
                }
            };
            *left -= 1;
            if *left > 0 {
                break;
            }
            done = match stack.pop() {
                Some(Open::List(_, items)) => Json::Array(items),
                Some(Open::Map(_, map, _)) => Json::Object(map),
                // `stack.last_mut()` was Some just above.
                None => return Json::Null,
            };
        }
    }
    // The nodes ended before the value did.
    Json::Null
}

/// Decodes a `roomd.v1.json` text frame from the server.
pub fn decode_server(text: &str) -> Result<ServerMsg, BadFrame> {
    let frame: Json = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let Json::Object(obj) = frame else {
        return Err(bad("a frame must be a JSON object"));
    };
    let o = &obj;
    Ok(match str_field(o, "t")? {
        "welcome" => ServerMsg::Welcome {
            proto: u32_field(o, "proto")?,
            session: string(o, "session")?,
            user: string(o, "user")?,
            heartbeat_ms: u64_field(o, "heartbeat_ms")?,
            max_frame: u32_field(o, "max_frame")?,
        },
        "snapshot" => ServerMsg::Snapshot {
            room: string(o, "room")?,
            kind: string(o, "kind")?,
            epoch: epoch_field(o)?,
            seq: u64_field(o, "seq")?,
            entries: entries_field(o, "entries")?,
            recovered: match o.get("recovered") {
                None => false,
                Some(Json::Bool(b)) => *b,
                Some(_) => return Err(bad("`recovered` must be a boolean")),
            },
        },
        "resumed" => ServerMsg::Resumed {
            room: string(o, "room")?,
            epoch: epoch_field(o)?,
            from: u64_field(o, "from")?,
            to: u64_field(o, "to")?,
            changes: entries_field(o, "changes")?,
        },
        "diff" => ServerMsg::Diff {
            room: string(o, "room")?,
            epoch: epoch_field(o)?,
            from: u64_field(o, "from")?,
            to: u64_field(o, "to")?,
            changes: entries_field(o, "changes")?,
        },
        "ack" => ServerMsg::Ack {
            id: string(o, "id")?,
            seq: u64_field(o, "seq")?,
        },
        "nack" => ServerMsg::Nack {
            id: string(o, "id")?,
            code: code_field(o)?,
            msg: optional_string(o, "msg")?.unwrap_or_default(),
        },
        "presence" => match o.get("members") {
            Some(Json::Array(members)) => ServerMsg::PresenceMembers {
                room: string(o, "room")?,
                members: members
                    .iter()
                    .map(|m| {
                        let Json::Object(m) = m else {
                            return Err(bad("a presence member must be an object"));
                        };
                        Ok(WireMember {
                            user: string(m, "user")?,
                            conns: u32_field(m, "conns")?,
                        })
                    })
                    .collect::<Result<_, _>>()?,
            },
            Some(_) => return Err(bad("`members` must be a list")),
            None => ServerMsg::PresenceChange {
                room: string(o, "room")?,
                join: user_list(o, "join")?,
                leave: user_list(o, "leave")?,
            },
        },
        "signal" => ServerMsg::Signal {
            room: string(o, "room")?,
            user: string(o, "user")?,
            data: WireValue::from_value(&value_field(o.get("data").unwrap_or(&Json::Null))?),
        },
        "error" => ServerMsg::Error {
            code: code_field(o)?,
            room: optional_string(o, "room")?,
            msg: optional_string(o, "msg")?.unwrap_or_default(),
        },
        "authed" => ServerMsg::Authed {
            exp: match o.get("exp") {
                None | Some(Json::Null) => None,
                Some(_) => Some(u64_field(o, "exp")?),
            },
        },
        other => return Err(bad(format!("unknown message type `{other}`"))),
    })
}

fn bad(why: impl Into<String>) -> BadFrame {
    BadFrame(why.into())
}

fn str_field<'a>(obj: &'a Map<String, Json>, name: &str) -> Result<&'a str, BadFrame> {
    match obj.get(name) {
        Some(Json::String(s)) => Ok(s),
        Some(_) => Err(bad(format!("`{name}` must be a string"))),
        None => Err(bad(format!("missing `{name}`"))),
    }
}

fn string(obj: &Map<String, Json>, name: &str) -> Result<String, BadFrame> {
    str_field(obj, name).map(str::to_owned)
}

fn optional_string(obj: &Map<String, Json>, name: &str) -> Result<Option<String>, BadFrame> {
    match obj.get(name) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad(format!("`{name}` must be a string"))),
    }
}

fn u64_field(obj: &Map<String, Json>, name: &str) -> Result<u64, BadFrame> {
    obj.get(name)
        .and_then(Json::as_u64)
        .ok_or_else(|| bad(format!("`{name}` must be a non-negative integer")))
}

fn u32_field(obj: &Map<String, Json>, name: &str) -> Result<u32, BadFrame> {
    u32::try_from(u64_field(obj, name)?).map_err(|_| bad(format!("`{name}` exceeds 32 bits")))
}

fn epoch_field(obj: &Map<String, Json>) -> Result<u64, BadFrame> {
    parse_epoch(str_field(obj, "epoch")?).ok_or_else(|| bad("`epoch` must be 16 hex chars"))
}

fn code_field(obj: &Map<String, Json>) -> Result<Code, BadFrame> {
    let text = str_field(obj, "code")?;
    Code::from_name(text).ok_or_else(|| bad(format!("unknown code `{text}`")))
}

fn user_list(obj: &Map<String, Json>, name: &str) -> Result<Vec<String>, BadFrame> {
    match obj.get(name) {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(items)) => items
            .iter()
            .map(|item| match item {
                Json::String(s) => Ok(s.clone()),
                _ => Err(bad(format!("`{name}` must list user ids"))),
            })
            .collect(),
        Some(_) => Err(bad(format!("`{name}` must be a list"))),
    }
}

fn value_field(json: &Json) -> Result<Value, BadFrame> {
    server_json::to_value(json).map_err(|why| bad(format!("bad value: {why}")))
}

fn entries_field(obj: &Map<String, Json>, name: &str) -> Result<Vec<WireEntry>, BadFrame> {
    let Some(Json::Array(items)) = obj.get(name) else {
        return Err(bad(format!("`{name}` must be a list of entries")));
    };
    items
        .iter()
        .map(|item| {
            let Json::Object(e) = item else {
                return Err(bad("an entry must be an object"));
            };
            let deleted = matches!(e.get("del"), Some(Json::Bool(true)));
            let v = if deleted {
                None
            } else {
                let v = e
                    .get("v")
                    .ok_or_else(|| bad("an entry without `del` needs `v`"))?;
                Some(WireValue::from_value(&value_field(v)?))
            };
            Ok(WireEntry {
                k: string(e, "k")?,
                v,
                ver: u64_field(e, "ver")?,
            })
        })
        .collect()
}

/// A server message as the connection task uses it: values rebuilt and checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Incoming {
    Welcome {
        session: String,
        user: String,
        heartbeat_ms: u64,
    },
    Snapshot {
        room: String,
        kind: String,
        epoch: u64,
        seq: u64,
        entries: Vec<Change>,
        recovered: bool,
    },
    Resumed {
        room: String,
        epoch: u64,
        from: u64,
        to: u64,
        changes: Vec<Change>,
    },
    Diff {
        room: String,
        epoch: u64,
        from: u64,
        to: u64,
        changes: Vec<Change>,
    },
    Ack {
        id: String,
        seq: u64,
    },
    Nack {
        id: String,
        code: Code,
        msg: String,
    },
    Presence {
        room: String,
        presence: Presence,
    },
    Signal {
        room: String,
        user: String,
        data: Value,
    },
    Error {
        code: Code,
        room: Option<String>,
        msg: String,
    },
    /// A token refresh took effect (the SDK does not send `auth` yet).
    Authed,
}

fn changes(entries: Vec<WireEntry>) -> Result<Vec<Change>, BadFrame> {
    entries
        .into_iter()
        .map(|e| {
            let value = match e.v {
                None => None,
                Some(v) => Some(
                    v.to_value()
                        .map_err(|why| bad(format!("entry `{}`: {why}", e.k)))?,
                ),
            };
            Ok(Change {
                key: e.k,
                value,
                ver: e.ver,
            })
        })
        .collect()
}

impl Incoming {
    pub(crate) fn from_server(msg: ServerMsg) -> Result<Incoming, BadFrame> {
        Ok(match msg {
            ServerMsg::Welcome {
                session,
                user,
                heartbeat_ms,
                ..
            } => Incoming::Welcome {
                session,
                user,
                heartbeat_ms,
            },
            ServerMsg::Snapshot {
                room,
                kind,
                epoch,
                seq,
                entries,
                recovered,
            } => Incoming::Snapshot {
                room,
                kind,
                epoch,
                seq,
                entries: changes(entries)?,
                recovered,
            },
            ServerMsg::Resumed {
                room,
                epoch,
                from,
                to,
                changes: c,
            } => Incoming::Resumed {
                room,
                epoch,
                from,
                to,
                changes: changes(c)?,
            },
            ServerMsg::Diff {
                room,
                epoch,
                from,
                to,
                changes: c,
            } => Incoming::Diff {
                room,
                epoch,
                from,
                to,
                changes: changes(c)?,
            },
            ServerMsg::Ack { id, seq } => Incoming::Ack { id, seq },
            ServerMsg::Nack { id, code, msg } => Incoming::Nack { id, code, msg },
            ServerMsg::PresenceMembers { room, members } => Incoming::Presence {
                room,
                presence: Presence::Members(
                    members
                        .into_iter()
                        .map(|m| Member {
                            user: m.user,
                            conns: m.conns,
                        })
                        .collect(),
                ),
            },
            ServerMsg::PresenceChange { room, join, leave } => Incoming::Presence {
                room,
                presence: Presence::Change { join, leave },
            },
            ServerMsg::Signal { room, user, data } => Incoming::Signal {
                room,
                user,
                data: data
                    .to_value()
                    .map_err(|why| bad(format!("signal data: {why}")))?,
            },
            ServerMsg::Error { code, room, msg } => Incoming::Error { code, room, msg },
            ServerMsg::Authed { .. } => Incoming::Authed,
        })
    }

    /// Decodes one WebSocket data frame; `None` for frames that carry no message
    /// (pings, pongs, raw frames). Close frames are handled by the caller.
    pub(crate) fn decode(message: &Message) -> Result<Option<Incoming>, BadFrame> {
        let msg = match message {
            Message::Text(text) => decode_server(text.as_str())?,
            Message::Binary(bytes) => binary::decode_server(bytes)?,
            _ => return Ok(None),
        };
        Incoming::from_server(msg).map(Some)
    }
}

/// Encodes one client message as a frame of the connection's encoding.
pub(crate) fn encode(msg: &ClientMsg, encoding: Encoding) -> Message {
    match encoding {
        Encoding::Json => Message::text(encode_client(msg)),
        Encoding::Rkyv => Message::Binary(binary::encode_client(msg)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::WireSince;

    #[test]
    fn client_messages_encode_as_the_contract_json() {
        let sub = ClientMsg::Sub {
            room: "poll:lunch".into(),
            presence: false,
            since: Some(WireSince {
                epoch: 0x9f,
                seq: 41,
            }),
        };
        let json: Json = serde_json::from_str(&encode_client(&sub)).expect("valid JSON");
        assert_eq!(
            json,
            json!({"t": "sub", "room": "poll:lunch", "since": {"epoch": "000000000000009f", "seq": 41}})
        );
        let op = ClientMsg::Op {
            id: "c2".into(),
            room: "r".into(),
            op: WireValue::from_value(&Value::map([("b", Value::Bytes(vec![0, 1]))])),
        };
        let json: Json = serde_json::from_str(&encode_client(&op)).expect("valid JSON");
        assert_eq!(
            json,
            json!({"t": "op", "id": "c2", "room": "r", "op": {"b": {"$b64": "AAE="}}})
        );
    }

    #[test]
    fn server_json_round_trips_through_the_server_encoder() {
        let msgs = [
            ServerMsg::Diff {
                room: "r".into(),
                epoch: u64::MAX,
                from: 2,
                to: 3,
                changes: vec![
                    WireEntry {
                        k: "a".into(),
                        v: Some(WireValue::from_value(&Value::Int(1))),
                        ver: 3,
                    },
                    WireEntry {
                        k: "b".into(),
                        v: None,
                        ver: 2,
                    },
                ],
            },
            ServerMsg::Nack {
                id: "c1".into(),
                code: Code::Conflict,
                msg: "ver".into(),
            },
            ServerMsg::PresenceChange {
                room: "r".into(),
                join: vec!["bob".into()],
                leave: vec![],
            },
            ServerMsg::Error {
                code: Code::NotFound,
                room: None,
                msg: "x".into(),
            },
        ];
        for msg in msgs {
            let text = server_json::encode(&msg);
            assert_eq!(decode_server(&text), Ok(msg), "{text}");
        }
    }

    /// Every committed fixture of one side (`client` or `server`): its path, its rkyv
    /// bytes and the JSON next to it.
    fn fixtures(side: &str) -> Vec<(std::path::PathBuf, Vec<u8>, String)> {
        let dir = format!("{}/tests/fixtures/rkyv/{side}", env!("CARGO_MANIFEST_DIR"));
        let entries = std::fs::read_dir(dir).expect("the fixture folder is committed");
        entries
            .map(|entry| entry.expect("a readable folder entry").path())
            .filter(|path| path.extension().is_some_and(|e| e == "bin"))
            .map(|path| {
                let bytes = std::fs::read(&path).expect("a readable fixture");
                let json = std::fs::read_to_string(path.with_extension("json"))
                    .expect("every .bin fixture has its .json next to it");
                (path, bytes, json)
            })
            .collect()
    }

    #[test]
    fn every_committed_server_fixture_decodes_in_both_encodings() {
        let fixtures = fixtures("server");
        assert!(
            fixtures.len() > 10,
            "only {} server fixtures found",
            fixtures.len()
        );
        for (path, bytes, json) in fixtures {
            let from_rkyv = binary::decode_server(&bytes).expect("a valid fixture");
            let from_json = decode_server(&json).expect("a valid JSON fixture");
            assert_eq!(from_rkyv, from_json, "{}", path.display());
            assert!(Incoming::from_server(from_rkyv).is_ok());
        }
    }

    #[test]
    fn hostile_server_json_is_a_bad_frame() {
        for text in [
            "",
            "[]",
            r#"{"t":"diff","room":"r","epoch":"xyz","from":1,"to":1,"changes":[]}"#,
            r#"{"t":"ack","id":"c","seq":-1}"#,
            r#"{"t":"nack","id":"c","code":"nope","msg":""}"#,
            r#"{"t":"diff","room":"r","epoch":"0000000000000001","from":1,"to":1,"changes":[{"k":"a","ver":1}]}"#,
            r#"{"t":"mystery"}"#,
        ] {
            assert!(decode_server(text).is_err(), "{text}");
        }
    }

    #[test]
    fn client_json_matches_every_committed_client_fixture() {
        let fixtures = fixtures("client");
        assert!(
            fixtures.len() > 5,
            "only {} client fixtures found",
            fixtures.len()
        );
        for (path, bytes, json) in fixtures {
            let msg = rkyv::from_bytes::<ClientMsg, rkyv::rancor::Error>(&bytes)
                .expect("a valid fixture");
            // The encoder reproduces the rkyv bytes, and our JSON means what the
            // hand-written JSON means to the server.
            assert_eq!(&binary::encode_client(&msg)[..], &bytes[..]);
            assert_eq!(
                server_json::decode(&encode_client(&msg)),
                server_json::decode(&json),
                "{}",
                path.display()
            );
        }
    }
}
