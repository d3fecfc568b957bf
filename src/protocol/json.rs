//! The `roomd.v1.json` codec: one JSON object per text frame.
//!
//! Decoding goes through `frame_tree` (the frame's fields as a light tree, its value
//! built into the domain `Value` as it is parsed) and explicit field checks, so every
//! malformed frame becomes a [`BadFrame`] with a reason and never a panic. Encoding
//! writes [`ServerMsg`] as the JSON shapes of PROTOCOL.md "Server to client".
//!
//! Parsing refuses duplicate object keys, which serde_json would silently resolve to the
//! last value (a client and the server could then read one message two ways): a key
//! repeated in the message itself (or in `since`) makes it a `bad_frame`; one inside
//! `op`, `init` or `data` makes that value `invalid`, like any other malformed value.
//! [`parse_object`] applies the same rule to HTTP bodies.

use std::borrow::Cow;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{json, Map, Number, Value as Json};

use super::frame_tree::{self, Field, ParsedFrame, Tree};
use super::ids::{epoch_hex, parse_epoch};
use super::message::{ServerMsg, WireEntry, WireValue};
use super::{BadFrame, Inbound, Since};
use crate::value::{Value, MAX_DEPTH};

/// Decodes one client text frame. The frame's own fields are parsed into a light tree
/// (`frame_tree`: no hash map per object, keys and strings borrowed from the frame),
/// and its value (`op`, `init`, `data`) straight into the domain `Value` as it is parsed,
/// with no tree in between; the value rules and their messages are those of
/// [`to_value`].
pub fn decode(text: &str) -> Result<Inbound, BadFrame> {
    let frame: ParsedFrame =
        serde_json::from_str(text).map_err(|e| BadFrame(format!("not JSON: {e}")))?;
    let ParsedFrame::Object(frame) = frame else {
        return Err(BadFrame("a frame must be a JSON object".into()));
    };
    let mut obj = frame.members;
    if let Some(key) = frame.own_duplicate {
        return Err(BadFrame(format!("duplicate key `{key}`")));
    }
    let members = frame.member_duplicates;
    // A value with a repeated key inside is `invalid` (nacked under the op's id); a
    // repeated key anywhere else in the frame makes the frame unusable.
    let value_of = |obj: &mut FrameMembers<'_>, name: &str| -> Option<Result<Value, String>> {
        let field = frame_tree::take(obj, name)?;
        Some(match duplicate_in(&members, name) {
            Some(key) => Err(format!("duplicate key `{key}`")),
            None => field.into_value(),
        })
    };
    if let Some((field, key)) = members
        .iter()
        .find(|(field, _)| !matches!(field.as_str(), "op" | "init" | "data"))
    {
        return Err(BadFrame(format!("duplicate key `{key}` in `{field}`")));
    }
    let tag = take_field(&mut obj, "t")?;
    let inbound = match &*tag {
        "create" => Inbound::Create {
            id: take_str(&mut obj, "id")?,
            room: take_str(&mut obj, "room")?,
            kind: take_str(&mut obj, "kind")?,
            init: value_of(&mut obj, "init").unwrap_or(Ok(Value::Null)),
        },
        "sub" => Inbound::Sub {
            room: take_str(&mut obj, "room")?,
            presence: match tree(&obj, "presence") {
                None | Some(Tree::Null) => false,
                Some(Tree::Bool(b)) => *b,
                Some(_) => return Err(BadFrame("`presence` must be a boolean".into())),
            },
            since: match tree(&obj, "since") {
                None | Some(Tree::Null) => None,
                Some(Tree::Object(since)) => Some(decode_since(since)?),
                Some(_) => return Err(BadFrame("`since` must be an object".into())),
            },
        },
        "unsub" => Inbound::Unsub {
            room: take_str(&mut obj, "room")?,
        },
        "op" => Inbound::Op {
            id: take_str(&mut obj, "id")?,
            room: take_str(&mut obj, "room")?,
            op: value_of(&mut obj, "op").unwrap_or(Err("missing `op`".to_owned())),
        },
        "signal" => Inbound::Signal {
            room: take_str(&mut obj, "room")?,
            data: value_of(&mut obj, "data").unwrap_or(Ok(Value::Null)),
        },
        "auth" => Inbound::Auth {
            token: take_str(&mut obj, "token")?,
        },
        other => return Err(BadFrame(format!("unknown message type `{other}`"))),
    };
    Ok(inbound)
}

/// Why a JSON body could not be used (HTTP 400 `invalid`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    #[error("the body must be a JSON object")]
    NotObject,
    #[error("duplicate key `{0}` in the body")]
    DuplicateKey(String),
}

/// Parses a JSON object (an HTTP body), refusing a key repeated anywhere in it.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Json>, ObjectError> {
    let parsed: Parsed =
        serde_json::from_slice(bytes).map_err(|e| ObjectError::NotJson(e.to_string()))?;
    if let Some(key) = parsed.duplicate {
        return Err(ObjectError::DuplicateKey(key));
    }
    match parsed.value {
        Json::Object(obj) => Ok(obj),
        _ => Err(ObjectError::NotObject),
    }
}

fn duplicate_in<'a>(members: &'a [(String, String)], field: &str) -> Option<&'a str> {
    members
        .iter()
        .find(|(name, _)| name == field)
        .map(|(_, key)| key.as_str())
}

/// A JSON value as serde_json parses it, and the object keys it repeats. serde_json's
/// own `Value` keeps the last of a repeated key without a word; this keeps the first and
/// reports the repetition. Nesting is bounded by serde_json's recursion limit (128).
/// HTTP bodies only: client frames are parsed by `frame_tree` under the same rules.
struct Parsed {
    value: Json,
    /// The first key repeated within one object, at any depth.
    duplicate: Option<String>,
}

impl Parsed {
    fn plain(value: Json) -> Parsed {
        Parsed {
            value,
            duplicate: None,
        }
    }
}

impl<'de> Deserialize<'de> for Parsed {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Parsed, D::Error> {
        deserializer.deserialize_any(ParsedVisitor)
    }
}

struct ParsedVisitor;

impl<'de> Visitor<'de> for ParsedVisitor {
    type Value = Parsed;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Parsed, E> {
        Ok(Parsed::plain(Json::Bool(b)))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Parsed, E> {
        Ok(Parsed::plain(Json::from(n)))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Parsed, E> {
        Ok(Parsed::plain(Json::from(n)))
    }

    fn visit_f64<E>(self, f: f64) -> Result<Parsed, E> {
        // serde_json yields finite floats only; `from_f64` is None for the others.
        Ok(Parsed::plain(
            Number::from_f64(f).map_or(Json::Null, Json::Number),
        ))
    }

    fn visit_str<E>(self, s: &str) -> Result<Parsed, E> {
        Ok(Parsed::plain(Json::String(s.to_owned())))
    }

    fn visit_string<E>(self, s: String) -> Result<Parsed, E> {
        Ok(Parsed::plain(Json::String(s)))
    }

    fn visit_unit<E>(self) -> Result<Parsed, E> {
        Ok(Parsed::plain(Json::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Parsed, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        let mut duplicate = None;
        while let Some(item) = seq.next_element::<Parsed>()? {
            duplicate = duplicate.or(item.duplicate);
            items.push(item.value);
        }
        Ok(Parsed {
            duplicate,
            ..Parsed::plain(Json::Array(items))
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Parsed, A::Error> {
        let mut map = Map::new();
        let mut own_duplicate: Option<String> = None;
        let mut member_duplicate: Option<String> = None;
        while let Some(key) = access.next_key::<String>()? {
            let member: Parsed = access.next_value()?;
            if member_duplicate.is_none() {
                member_duplicate = member.duplicate;
            }
            match map.entry(key) {
                serde_json::map::Entry::Vacant(slot) => {
                    slot.insert(member.value);
                }
                serde_json::map::Entry::Occupied(slot) => {
                    own_duplicate.get_or_insert_with(|| slot.key().clone());
                }
            }
        }
        Ok(Parsed {
            value: Json::Object(map),
            duplicate: own_duplicate.or(member_duplicate),
        })
    }
}

/// A frame's members: its value fields built, the others as trees.
type FrameMembers<'de> = Vec<(Cow<'de, str>, Field<'de>)>;

/// A string field of the frame, moved out of it (still borrowed from the frame unless
/// it had escapes).
fn take_field<'de>(obj: &mut FrameMembers<'de>, name: &str) -> Result<Cow<'de, str>, BadFrame> {
    match frame_tree::take(obj, name) {
        Some(Field::Tree(Tree::Str(s))) => Ok(s),
        Some(_) => Err(BadFrame(format!("`{name}` must be a string"))),
        None => Err(BadFrame(format!("missing `{name}`"))),
    }
}

/// A field of the frame that is not a value field, as parsed.
fn tree<'a, 'de>(obj: &'a FrameMembers<'de>, name: &str) -> Option<&'a Tree<'de>> {
    match frame_tree::get(obj, name)? {
        Field::Tree(tree) => Some(tree),
        // Only `op`, `init` and `data` are built, and they are read as values.
        Field::Value(_) => None,
    }
}

/// A string field of the frame, moved out of it and owned.
fn take_str(obj: &mut FrameMembers<'_>, name: &str) -> Result<String, BadFrame> {
    take_field(obj, name).map(Cow::into_owned)
}

fn decode_since(since: &[(Cow<'_, str>, Tree<'_>)]) -> Result<Since, BadFrame> {
    let epoch = match frame_tree::get(since, "epoch") {
        Some(Tree::Str(s)) => parse_epoch(s),
        _ => return Err(BadFrame("`since.epoch` must be a string".into())),
    };
    // A negative seq names no position (None), as a malformed epoch does.
    let seq = match frame_tree::get(since, "seq") {
        Some(Tree::Int(n)) => u64::try_from(*n).ok(),
        Some(Tree::Big(n)) => Some(*n),
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
    // The one message sent per op: written directly, not through a `json!` tree (which
    // allocates a map and a string per field). Same bytes as the tree would give.
    if let ServerMsg::Ack { id, seq } = msg {
        return encode_ack(id, *seq);
    }
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

/// `{"t":"ack","id":…,"seq":…}`, the id escaped as serde_json escapes any string.
fn encode_ack(id: &str, seq: u64) -> String {
    let mut out = Vec::with_capacity(id.len() + 40);
    encode_ack_into(id, seq, &mut out);
    // serde_json writes UTF-8 and the rest is ASCII.
    String::from_utf8(out).expect("JSON is UTF-8")
}

/// Appends the bytes of `encode(&ServerMsg::Ack { id, seq })` to `out` (a buffer reused
/// for many acks).
pub fn encode_ack_into(id: &str, seq: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(br#"{"t":"ack","id":"#);
    // Writing a string into a Vec cannot fail.
    serde_json::to_writer(&mut *out, id).expect("a string serializes into memory");
    out.extend_from_slice(br#","seq":"#);
    // serde_json writes integers with itoa, not the formatter `write!` goes through;
    // writing one into a Vec cannot fail.
    serde_json::to_writer(&mut *out, &seq).expect("an integer serializes into memory");
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_written_as_the_json_tree_would_write_them() {
        for (id, seq) in [("c1", 1), ("w3.17", u64::MAX), ("a \"quoted\"\n\u{7f}é", 0)] {
            let tree = json!({ "t": "ack", "id": id, "seq": seq }).to_string();
            assert_eq!(encode(&ServerMsg::Ack { id: id.into(), seq }), tree);
        }
    }

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
    fn duplicate_keys_are_bad_frames_in_the_message_and_invalid_inside_values() {
        for frame in [
            r#"{"t":"sub","t":"unsub","room":"r"}"#,
            r#"{"t":"sub","room":"r","since":{"epoch":"0000000000000001","seq":1,"seq":2}}"#,
        ] {
            let err = decode(frame).expect_err(frame);
            assert!(err.0.contains("duplicate key"), "{err}");
        }
        let frame = r#"{"t":"op","id":"c1","room":"r","op":{"a":[{"b":1,"b":1}]}}"#;
        match decode(frame) {
            Ok(Inbound::Op { op: Err(why), .. }) => assert_eq!(why, "duplicate key `b`"),
            other => panic!("expected an invalid op, got {other:?}"),
        }
        // The same key in two different objects is no repetition.
        let frame = r#"{"t":"op","id":"c1","room":"r","op":{"a":{"k":1},"b":{"k":2}}}"#;
        assert!(matches!(decode(frame), Ok(Inbound::Op { op: Ok(_), .. })));
    }

    #[test]
    fn duplicate_keys_are_found_in_objects_past_the_linear_search() {
        let keys: Vec<String> = (0..40).map(|i| format!(r#""k{i}":{i}"#)).collect();
        let op = format!(r#"{{{},"k5":0}}"#, keys.join(","));
        let frame = format!(r#"{{"t":"op","id":"c1","room":"r","op":{op}}}"#);
        match decode(&frame) {
            Ok(Inbound::Op { op: Err(why), .. }) => assert_eq!(why, "duplicate key `k5`"),
            other => panic!("expected an invalid op, got {other:?}"),
        }
        let frame = format!(
            r#"{{"t":"op","id":"c1","room":"r",{},"k39":1}}"#,
            keys.join(",")
        );
        let err = decode(&frame).expect_err("a repeated key in the frame");
        assert_eq!(err.0, "duplicate key `k39`");
        // Without the repetition the 40 keys are a valid op, the first of each kept.
        let frame = format!(
            r#"{{"t":"op","id":"c1","room":"r","op":{{{}}}}}"#,
            keys.join(",")
        );
        match decode(&frame) {
            Ok(Inbound::Op {
                op: Ok(Value::Map(map)),
                ..
            }) => {
                assert_eq!(map.len(), 40);
                assert_eq!(map.get("k39"), Some(&Value::Int(39)));
            }
            other => panic!("expected a valid op, got {other:?}"),
        }
    }

    #[test]
    fn http_bodies_refuse_duplicate_keys_at_any_depth() {
        assert_eq!(
            parse_object(br#"{"id":"a","op":{"x":[{"y":1,"y":2}]}}"#),
            Err(ObjectError::DuplicateKey("y".into()))
        );
        assert_eq!(
            parse_object(br#"{"id":"a","id":"b"}"#),
            Err(ObjectError::DuplicateKey("id".into()))
        );
        assert_eq!(parse_object(b"[1]"), Err(ObjectError::NotObject));
        let obj = parse_object(br#"{"n":1.5,"big":18446744073709551615,"s":"x","z":null}"#)
            .expect("a plain object");
        assert_eq!(
            Json::Object(obj),
            json!({"n":1.5,"big":18446744073709551615u64,"s":"x","z":null})
        );
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
