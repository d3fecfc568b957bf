//! The published message types: the rkyv schema of `roomd.v1.rkyv`.
//!
//! Client authors build against these exact definitions: field order, variant order and
//! integer widths are the format. rkyv 0.8 with the features `little_endian`,
//! `pointer_width_32` and `unaligned`; one archive per binary frame, the root type being
//! [`ClientMsg`] (client to server) or [`ServerMsg`] (server to client). Committed byte
//! fixtures of every message live in `tests/fixtures/rkyv/`.
//!
//! Any change here changes the bytes, so it is a protocol version bump, not an edit.
//!
//! Values travel flattened ([`WireValue`]): a pre-order list of nodes, so no type here
//! is recursive and validating an archive costs no stack per nesting level.

use rkyv::{Archive, Deserialize, Serialize};

use super::codes::Code;
use crate::value::{Value, MAX_DEPTH};

/// A client-to-server message. Same vocabulary as the JSON `t` tags.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum ClientMsg {
    Create {
        id: String,
        room: String,
        kind: String,
        init: WireValue,
    },
    Sub {
        room: String,
        presence: bool,
        since: Option<WireSince>,
    },
    Unsub {
        room: String,
    },
    Op {
        id: String,
        room: String,
        op: WireValue,
    },
    Signal {
        room: String,
        data: WireValue,
    },
    /// Protocol 1.1: replace the connection's token (answered by `Authed` or `Error`).
    /// Appended last, so the bytes of every 1.0 message are unchanged.
    Auth {
        token: String,
    },
}

/// A resume position; the epoch is the number JSON writes as 16 hex chars.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct WireSince {
    pub epoch: u64,
    pub seq: u64,
}

/// A server-to-client message. JSON's two `presence` shapes are two variants here.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum ServerMsg {
    Welcome {
        proto: u32,
        session: String,
        user: String,
        heartbeat_ms: u64,
        max_frame: u32,
    },
    Snapshot {
        room: String,
        kind: String,
        epoch: u64,
        seq: u64,
        entries: Vec<WireEntry>,
        recovered: bool,
    },
    Resumed {
        room: String,
        epoch: u64,
        from: u64,
        to: u64,
        changes: Vec<WireEntry>,
    },
    Diff {
        room: String,
        epoch: u64,
        from: u64,
        to: u64,
        changes: Vec<WireEntry>,
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
    PresenceMembers {
        room: String,
        members: Vec<WireMember>,
    },
    PresenceChange {
        room: String,
        join: Vec<String>,
        leave: Vec<String>,
    },
    Signal {
        room: String,
        user: String,
        data: WireValue,
    },
    Error {
        code: Code,
        room: Option<String>,
        msg: String,
    },
    /// Protocol 1.1: the refreshed token is in force; its `exp` (None: it has none).
    /// Appended last, so the bytes of every 1.0 message are unchanged. The rkyv
    /// `Welcome` keeps its 1.0 fields (a new field would change its bytes); the JSON
    /// `welcome` carries `"minor"`.
    Authed {
        exp: Option<u64>,
    },
}

/// One entry of a room's state. `v: None` is a deleted key (JSON `"del": true`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WireEntry {
    pub k: String,
    pub v: Option<WireValue>,
    pub ver: u64,
}

/// One member of a room in a presence list.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WireMember {
    pub user: String,
    pub conns: u32,
}

/// A value as a pre-order list of nodes. `List(n)` is followed by its `n` items; `Map(n)`
/// by `n` pairs of a `Str` key node and the value's nodes. Map keys are sorted and unique
/// in what the server sends; on input, a repeated key keeps its last value.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct WireValue {
    pub nodes: Vec<Node>,
}

/// One node of a [`WireValue`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Node {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(u32),
    Map(u32),
}

impl WireValue {
    /// Flattens a domain value.
    pub fn from_value(value: &Value) -> WireValue {
        let mut nodes = Vec::new();
        push_nodes(value, &mut nodes);
        WireValue { nodes }
    }

    /// Rebuilds the domain value, enforcing the value rules: exactly one value, depth at
    /// most [`MAX_DEPTH`], finite floats, string map keys. Iterative, so hostile input
    /// cannot exhaust the stack.
    pub fn to_value(&self) -> Result<Value, String> {
        rebuild(self.nodes.iter().map(Node::view), self.nodes.len())
    }
}

impl ArchivedWireValue {
    /// [`WireValue::to_value`] of the archived value, read in place: the same rules and
    /// messages, and each string copied once, into the domain value (a decoded frame's
    /// value is not deserialized into nodes first).
    pub fn to_value(&self) -> Result<Value, String> {
        rebuild(self.nodes.iter().map(ArchivedNode::view), self.nodes.len())
    }
}

/// One node of a [`WireValue`], owned or archived, as [`rebuild`] reads it.
#[derive(Clone, Copy)]
enum NodeView<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
    Bytes(&'a [u8]),
    List(u32),
    Map(u32),
}

impl Node {
    fn view(&self) -> NodeView<'_> {
        match self {
            Node::Null => NodeView::Null,
            Node::Bool(b) => NodeView::Bool(*b),
            Node::Int(n) => NodeView::Int(*n),
            Node::Float(f) => NodeView::Float(*f),
            Node::Str(s) => NodeView::Str(s),
            Node::Bytes(b) => NodeView::Bytes(b),
            Node::List(n) => NodeView::List(*n),
            Node::Map(n) => NodeView::Map(*n),
        }
    }
}

impl ArchivedNode {
    fn view(&self) -> NodeView<'_> {
        match self {
            ArchivedNode::Null => NodeView::Null,
            ArchivedNode::Bool(b) => NodeView::Bool(*b),
            ArchivedNode::Int(n) => NodeView::Int(n.to_native()),
            ArchivedNode::Float(f) => NodeView::Float(f.to_native()),
            ArchivedNode::Str(s) => NodeView::Str(s.as_str()),
            ArchivedNode::Bytes(b) => NodeView::Bytes(b.as_slice()),
            ArchivedNode::List(n) => NodeView::List(n.to_native()),
            ArchivedNode::Map(n) => NodeView::Map(n.to_native()),
        }
    }
}

/// The domain value of `n_nodes` nodes (see [`WireValue::to_value`]).
fn rebuild<'a>(nodes: impl Iterator<Item = NodeView<'a>>, n_nodes: usize) -> Result<Value, String> {
    let mut stack: Vec<Open> = Vec::new();
    let mut root: Option<Value> = None;
    for node in nodes {
        if root.is_some() {
            return Err("trailing nodes after the value".into());
        }
        // A map between entries takes the next node as a key.
        if let Some(Open::Map {
            key: key @ None, ..
        }) = stack.last_mut()
        {
            let NodeView::Str(s) = node else {
                return Err("map key is not a string".into());
            };
            *key = Some(s.to_owned());
            continue;
        }
        let mut value = match node {
            NodeView::Null => Value::Null,
            NodeView::Bool(b) => Value::Bool(b),
            NodeView::Int(n) => Value::Int(n),
            NodeView::Float(f) if f.is_finite() => Value::Float(f),
            NodeView::Float(_) => return Err("NaN and infinities are not values".into()),
            NodeView::Str(s) => Value::Str(s.to_owned()),
            NodeView::Bytes(b) => Value::Bytes(b.to_vec()),
            NodeView::List(0) => Value::List(Vec::new()),
            NodeView::Map(0) => Value::Map(Default::default()),
            NodeView::List(n) | NodeView::Map(n) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(format!("value nested deeper than {MAX_DEPTH} levels"));
                }
                let left = n as usize;
                // Every item takes at least one node, so a larger count is a lie; this
                // also bounds the preallocation below.
                if left > n_nodes {
                    return Err(format!("container of {left} items exceeds the node count"));
                }
                stack.push(match node {
                    NodeView::List(_) => Open::List {
                        left,
                        items: Vec::with_capacity(left.min(256)),
                    },
                    _ => Open::Map {
                        left,
                        map: Default::default(),
                        key: None,
                    },
                });
                continue;
            }
        };
        // Hand the finished value to its parent, closing every parent it completes.
        loop {
            let Some(top) = stack.last_mut() else {
                root = Some(value);
                break;
            };
            let left = match top {
                Open::List { left, items } => {
                    items.push(value);
                    left
                }
                Open::Map { left, map, key } => {
                    // The key check above guarantees a key is waiting here.
                    let key = key.take().ok_or("map value without a key")?;
                    map.insert(key, value);
                    left
                }
            };
            *left -= 1;
            if *left > 0 {
                break;
            }
            value = match stack.pop() {
                Some(Open::List { items, .. }) => Value::List(items),
                Some(Open::Map { map, .. }) if is_b64_lookalike(&map) => {
                    return Err(B64_LOOKALIKE.into());
                }
                Some(Open::Map { map, .. }) => Value::Map(map),
                None => unreachable!("stack.last_mut() was Some just above"),
            };
        }
    }
    root.ok_or_else(|| "value ends early".into())
}

/// JSON reads an object whose only key is `$b64` with a string value as bytes, so such
/// a map has no JSON form: refusing it keeps both encodings meaning the same values.
const B64_LOOKALIKE: &str =
    "a map whose only key is `$b64` with a string value is bytes in JSON; send Bytes instead";

fn is_b64_lookalike(map: &std::collections::BTreeMap<String, Value>) -> bool {
    map.len() == 1 && matches!(map.get("$b64"), Some(Value::Str(_)))
}

/// A container being rebuilt by [`WireValue::to_value`]: items still to read, and the
/// items (or entries and the pending key) read so far.
enum Open {
    List {
        left: usize,
        items: Vec<Value>,
    },
    Map {
        left: usize,
        map: std::collections::BTreeMap<String, Value>,
        key: Option<String>,
    },
}

fn push_nodes(value: &Value, nodes: &mut Vec<Node>) {
    match value {
        Value::Null => nodes.push(Node::Null),
        Value::Bool(b) => nodes.push(Node::Bool(*b)),
        Value::Int(n) => nodes.push(Node::Int(*n)),
        Value::Float(f) => nodes.push(Node::Float(*f)),
        Value::Str(s) => nodes.push(Node::Str(s.clone())),
        Value::Bytes(b) => nodes.push(Node::Bytes(b.clone())),
        Value::List(items) => {
            nodes.push(Node::List(len_u32(items.len())));
            for item in items {
                push_nodes(item, nodes);
            }
        }
        Value::Map(map) => {
            nodes.push(Node::Map(len_u32(map.len())));
            for (k, v) in map {
                nodes.push(Node::Str(k.clone()));
                push_nodes(v, nodes);
            }
        }
    }
}

fn len_u32(len: usize) -> u32 {
    // Containers come from frames of at most a few MiB or rooms of at most 100,000 keys.
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> Value {
        let mut v = Value::Int(1);
        for _ in 0..depth {
            v = Value::List(vec![v]);
        }
        v
    }

    #[test]
    fn values_round_trip_through_nodes() {
        let v = Value::map([
            (
                "a",
                Value::List(vec![Value::Null, Value::Bool(true), Value::Float(1.5)]),
            ),
            (
                "b",
                Value::map([("c", Value::Bytes(vec![1, 2])), ("d", Value::List(vec![]))]),
            ),
            ("e", Value::Map(Default::default())),
            ("f", Value::Str("x".into())),
        ]);
        assert_eq!(WireValue::from_value(&v).to_value(), Ok(v));
        assert_eq!(
            WireValue::from_value(&Value::Int(7)).to_value(),
            Ok(Value::Int(7))
        );
    }

    #[test]
    fn depth_limit_is_enforced_while_rebuilding() {
        assert!(WireValue::from_value(&nested(MAX_DEPTH)).to_value().is_ok());
        assert!(WireValue::from_value(&nested(MAX_DEPTH + 1))
            .to_value()
            .is_err());
        let hostile = WireValue {
            nodes: vec![Node::List(1); 100_000],
        };
        assert!(hostile.to_value().is_err());
    }

    #[test]
    fn malformed_node_lists_are_errors() {
        for nodes in [
            vec![],
            vec![Node::List(2), Node::Null],
            vec![Node::Null, Node::Null],
            vec![Node::Map(1), Node::Int(1), Node::Null],
            vec![Node::Float(f64::NAN)],
            vec![Node::List(u32::MAX)],
            vec![
                Node::Map(1),
                Node::Str("$b64".into()),
                Node::Str("AA==".into()),
            ],
        ] {
            assert!(WireValue { nodes }.to_value().is_err());
        }
    }
}
