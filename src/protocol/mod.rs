//! The wire boundary: every byte a client sends or receives is defined here.
//!
//! `message` holds the published message types (the rkyv schema client authors build
//! against), `json` and `binary` are the two codecs of PROTOCOL.md (`frame_tree` is the
//! parsed form of a JSON client frame), `codes` maps outcomes
//! to nack/error codes and close codes in one place, and `ids` checks room ids and
//! formats epochs. Nothing outside this module serializes a wire message; the rest of the
//! server talks in [`Inbound`] requests and [`message::ServerMsg`] replies.
//!
//! Architecture invariant: decoding never panics and never recurses on client data. JSON
//! is parsed by serde_json (recursion limit 128, frame already bounded by the frame
//! guard); rkyv frames carry values flattened (see [`message::WireValue`]), so bytecheck
//! validation is not recursive, and the value is rebuilt with an explicit depth bound.

pub mod binary;
pub mod codes;
pub mod fixtures;
mod frame_tree;
pub mod ids;
pub mod json;
pub mod message;

use crate::value::Value;

/// The protocol version announced in `welcome`.
pub const PROTO_VERSION: u32 = 1;

/// The minor version announced in the JSON `welcome` (1.1: access control, `auth`).
pub const PROTO_MINOR: u32 = 1;

/// The subprotocol names of PROTOCOL.md "Transport".
pub const SUBPROTOCOL_JSON: &str = "roomd.v1.json";
pub const SUBPROTOCOL_RKYV: &str = "roomd.v1.rkyv";

/// Which of the two encodings a connection speaks; fixed at the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    Json,
    Rkyv,
}

/// A resume position as the client sent it. A part that cannot name a position of this
/// server (a malformed epoch, a negative seq) is `None`, which answers with a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since {
    pub epoch: Option<u64>,
    pub seq: Option<u64>,
}

/// A decoded client message. Values that failed the value rules (depth, integer range,
/// non-finite floats) are kept as `Err(reason)` so the op can be nacked `invalid` under
/// its id rather than rejected as a `bad_frame`.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Create {
        id: String,
        room: String,
        kind: String,
        init: Result<Value, String>,
    },
    Sub {
        room: String,
        presence: bool,
        since: Option<Since>,
    },
    Unsub {
        room: String,
    },
    Op {
        id: String,
        room: String,
        op: Result<Value, String>,
    },
    Signal {
        room: String,
        data: Result<Value, String>,
    },
    /// Token refresh (1.1).
    Auth {
        token: String,
    },
}

/// Why a frame could not be used at all (answered with `error` `bad_frame`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadFrame(pub String);
