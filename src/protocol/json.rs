//! The `roomd.v1.json` codec: one JSON object per text frame.
//!
//! Decoding goes through `serde_json::Value` and explicit field checks, so every
//! malformed frame becomes a [`BadFrame`] with a reason and never a panic. Encoding writes
//! [`ServerMsg`] as the JSON shapes of PROTOCOL.md "Server to client".

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::{json, Map, Number, Value as Json};

use super::ids::{epoch_hex, parse_epoch};
use super::message::{ServerMsg, WireEntry, WireValue};
use super::{BadFrame, Inbound, Since};
use crate::value::{Value, MAX_DEPTH};

/// Decodes one client text frame.
pub fn decode(text: &str) -> Result<Inbound, BadFrame> {
    let frame: Json = serde_json::from_str(text).map_err(|e| BadFrame(format!("not JSON: {e}")))?;
    let Json::Object(obj) = frame else {
        return Err(BadFrame("a frame must be a JSON object".into()));
    };
    let tag = str_field(&obj, "t")?;
    let inbound = match tag {
        "create" => Inbound::Create {
            id: str_field(&obj, "id")?.to_owned(),
            room: str_field(&obj, "room")?.to_owned(),
            kind: str_field(&obj, "kind")?.to_owned(),
            init: obj.get("init").map_or(Ok(Value::Null), to_value),
        },
        "sub" => Inbound::Sub {
            room: str_field(&obj, "room")?.to_owned(),
            presence: match obj.get("presence") {
                None | Some(Json::Null) => false,
                Some(Json::Bool(b)) => *b,
                Some(_) => return Err(BadFrame("`presence` must be a boolean".into())),
            },
            since: match obj.get("since") {
                None | Some(Json::Null) => None,
                Some(Json::Object(since)) => Some(decode_since(since)?),
                Some(_) => return Err(BadFrame("`since` must be an object".into())),
            },
        },
        "unsub" => Inbound::Unsub {
            room: str_field(&obj, "room")?.to_owned(),
        },
        "op" => Inbound::Op {
            id: str_field(&obj, "id")?.to_owned(),
            room: str_field(&obj, "room")?.to_owned(),
            op: obj
                .get("op")
                .map_or(Err("missing `op`".to_owned()), to_value),
        },
        "signal" => Inbound::Signal {
            room: str_field(&obj, "room")?.to_owned(),
            data: obj.get("data").map_or(Ok(Value::Null), to_value),
        },
        "auth" => Inbound::Auth {
            token: str_field(&obj, "token")?.to_owned(),
        },
        other => return Err(BadFrame(format!("unknown message type `{other}`"))),
    };
    Ok(inbound)
}

fn str_field<'a>(obj: &'a Map<String, Json>, name: &str) -> Result<&'a str, BadFrame> {
    match obj.get(name) {
        Some(Json::String(s)) => Ok(s),
        Some(_) => Err(BadFrame(format!("`{name}` must be a string"))),
        None => Err(BadFrame(format!("missing `{name}`"))),
    }
}

fn decode_since(since: &Map<String, Json>) -> Result<Since, BadFrame> {
    let epoch = match since.get("epoch") {
        Some(Json::String(s)) => parse_epoch(s),
        _ => return Err(BadFrame("`since.epoch` must be a string".into())),
    };
    let seq = match since.get("seq") {
        Some(Json::Number(n)) if n.is_i64() || n.is_u64() => n.as_u64(),
        _ => return Err(BadFrame("`since.seq` must be an integer".into())),
    };
    Ok(Since { epoch, seq })
}

/// Converts a JSON value to a domain value under the value rules of PROTOCOL.md.
pub fn to_value(json: &Json) -> Result<Value, String> {
    to_value_at(json, 0)
}

fn to_value_at(json: &Json, depth: usize) -> Result<Value, String> {
    Ok(match json {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if n.is_u64() {
                return Err(format!("integer {n} is outside the 64-bit signed range"));
            } else {
                // serde_json only yields finite floats.
                Value::Float(n.as_f64().ok_or("number is not representable")?)
            }
        }
        Json::String(s) => Value::Str(s.clone()),
        Json::Array(items) => {
            if depth >= MAX_DEPTH {
                return Err(format!("value nested deeper than {MAX_DEPTH} levels"));
            }
            Value::List(
                items
                    .iter()
                    .map(|item| to_value_at(item, depth + 1))
                    .collect::<Result<_, _>>()?,
            )
        }
        Json::Object(obj) => {
            if let (1, Some(Json::String(b64))) = (obj.len(), obj.get("$b64")) {
                return BASE64
                    .decode(b64)
                    .map(Value::Bytes)
                    .map_err(|e| format!("bad base64 in `$b64`: {e}"));
            }
            if depth >= MAX_DEPTH {
                return Err(format!("value nested deeper than {MAX_DEPTH} levels"));
            }
            Value::Map(
                obj.iter()
                    .map(|(k, v)| Ok((k.clone(), to_value_at(v, depth + 1)?)))
                    .collect::<Result<_, String>>()?,
            )
        }
    })
}

/// Converts a domain value to JSON (bytes as `{"$b64": ...}`).
pub fn from_value(value: &Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(n) => Json::from(*n),
        // Values hold finite floats only; a non-finite one would be a bug upstream, and
        // null is the only JSON that cannot break a client.
        Value::Float(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::Str(s) => Json::String(s.clone()),
        Value::Bytes(b) => json!({ "$b64": BASE64.encode(b) }),
        Value::List(items) => Json::Array(items.iter().map(from_value).collect()),
        Value::Map(map) => Json::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), from_value(v)))
                .collect(),
        ),
    }
}

fn wire_to_json(value: &WireValue) -> Json {
    // Server-built wire values always rebuild; see `WireValue::from_value`.
    value.to_value().map_or(Json::Null, |v| from_value(&v))
}

pub fn entries_json(entries: &[WireEntry]) -> Json {
    Json::Array(entries.iter().map(entry_json).collect())
}

/// One entry as JSON: `{"k","v","ver"}`, or `{"k","ver","del":true}` for a deleted key.
pub fn entry_json(e: &WireEntry) -> Json {
    match &e.v {
        Some(v) => json!({ "k": e.k, "v": wire_to_json(v), "ver": e.ver }),
        None => json!({ "k": e.k, "ver": e.ver, "del": true }),
    }
}

fn code_str(code: super::codes::Code) -> &'static str {
    code.as_str()
}

/// Encodes one server message as a JSON text frame.
pub fn encode(msg: &ServerMsg) -> String {
    let json = match msg {
        ServerMsg::Welcome {
            proto,
            session,
            user,
            heartbeat_ms,
            max_frame,
        } => json!({
            "t": "welcome", "proto": proto, "minor": super::PROTO_MINOR, "session": session,
            "user": user, "heartbeat_ms": heartbeat_ms, "max_frame": max_frame,
        }),
        ServerMsg::Snapshot {
            room,
            kind,
            epoch,
            seq,
            entries,
            recovered,
        } => json!({
            "t": "snapshot", "room": room, "kind": kind, "epoch": epoch_hex(*epoch),
            "seq": seq, "entries": entries_json(entries), "recovered": recovered,
        }),
        ServerMsg::Resumed {
            room,
            epoch,
            from,
            to,
            changes,
        } => json!({
            "t": "resumed", "room": room, "epoch": epoch_hex(*epoch), "from": from, "to": to,
            "changes": entries_json(changes),
        }),
        ServerMsg::Diff {
            room,
            epoch,
            from,
            to,
            changes,
        } => json!({
            "t": "diff", "room": room, "epoch": epoch_hex(*epoch), "from": from, "to": to,
            "changes": entries_json(changes),
        }),
        ServerMsg::Ack { id, seq } => json!({ "t": "ack", "id": id, "seq": seq }),
        ServerMsg::Nack { id, code, msg } => {
            json!({ "t": "nack", "id": id, "code": code_str(*code), "msg": msg })
        }
        ServerMsg::PresenceMembers { room, members } => json!({
            "t": "presence", "room": room,
            "members": members.iter().map(|m| json!({ "user": m.user, "conns": m.conns })).collect::<Vec<_>>(),
        }),
        ServerMsg::PresenceChange { room, join, leave } => {
            json!({ "t": "presence", "room": room, "join": join, "leave": leave })
        }
        ServerMsg::Signal { room, user, data } => {
            json!({ "t": "signal", "room": room, "user": user, "data": wire_to_json(data) })
        }
        ServerMsg::Error { code, room, msg } => match room {
            Some(room) => {
                json!({ "t": "error", "code": code_str(*code), "room": room, "msg": msg })
            }
            None => json!({ "t": "error", "code": code_str(*code), "msg": msg }),
        },
        ServerMsg::Authed { exp } => json!({ "t": "authed", "exp": exp }),
    };
    json.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_with_bad_values_decode_as_invalid_not_bad_frame() {
        let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
        let frame = format!(r#"{{"t":"op","id":"c1","room":"r","op":{deep}}}"#);
        match decode(&frame) {
            Ok(Inbound::Op { op: Err(_), .. }) => {}
            other => panic!("expected an invalid op, got {other:?}"),
        }
        let big = r#"{"t":"op","id":"c1","room":"r","op":{"n":9223372036854775808}}"#;
        assert!(matches!(decode(big), Ok(Inbound::Op { op: Err(_), .. })));
    }

    #[test]
    fn unparseable_frames_are_bad_frames() {
        for frame in [
            "",
            "[]",
            "{}",
            r#"{"t":"nope"}"#,
            r#"{"t":"sub"}"#,
            r#"{"t":"sub","room":1}"#,
        ] {
            assert!(decode(frame).is_err(), "{frame}");
        }
    }

    #[test]
    fn bytes_travel_as_b64_objects() {
        let v = to_value(&json!({"$b64": "AAE="})).expect("valid base64");
        assert_eq!(v, Value::Bytes(vec![0, 1]));
        assert_eq!(from_value(&v), json!({"$b64": "AAE="}));
        // Another key next to `$b64` makes it an ordinary map.
        let m = to_value(&json!({"$b64": "AAE=", "x": 1})).expect("a map");
        assert!(matches!(m, Value::Map(_)));
    }

    #[test]
    fn malformed_since_epoch_means_no_position() {
        let frame = r#"{"t":"sub","room":"r","since":{"epoch":"xyz","seq":4}}"#;
        match decode(frame) {
            Ok(Inbound::Sub {
                since: Some(since), ..
            }) => {
                assert_eq!(
                    since,
                    Since {
                        epoch: None,
                        seq: Some(4)
                    }
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
