//! The client's two error types: [`ClientError`] (the connection or a request failed)
//! and [`OpError`] (an op or create was refused, or could not be answered).
//!
//! Wire codes stay the published [`Code`]; the connection task decides which close codes
//! end the client (see `driver::classify_close`).

use crate::protocol::codes::Code;

/// Why the client, a connection attempt, or a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The URL (or the request built from it) is unusable.
    #[error("bad endpoint {url}: {reason}")]
    BadEndpoint { url: String, reason: String },
    /// TCP connect, the upgrade or the `welcome` failed or timed out.
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The TLS settings for a `wss://` endpoint are unusable (a CA file that cannot be
    /// read or holds no certificate). A certificate the server presents that does not
    /// verify is a [`ClientError::Connect`] instead (it may be renewed).
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The upgrade was refused with this HTTP status (e.g. 400: encoding not offered).
    #[error("upgrade refused with HTTP {status}")]
    UpgradeRefused { status: u16 },
    /// Missing, bad or expired token (close 4401, or HTTP 401/403 on the upgrade).
    /// Not retried: connect again with a new token.
    #[error("unauthorized: {reason}")]
    Unauthorized { reason: String },
    /// The server closed with a code that says reconnecting as-is will not help
    /// (4400 protocol violation, 1009 frame too large, 1007 invalid UTF-8, 1002).
    #[error("server closed the connection with {code}: {reason}")]
    Closed { code: u16, reason: String },
    /// The server sent something this client cannot decode or that breaks the
    /// contract (no `welcome` first, an unknown message).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Reconnecting failed `attempts` times in a row.
    #[error("gave up after {attempts} reconnect attempts; last failure: {last}")]
    GaveUp { attempts: u32, last: String },
    /// The server refused a subscription with an `error` frame.
    #[error("room {room}: {} ({msg})", .code.as_str())]
    Room {
        room: String,
        code: Code,
        msg: String,
    },
    /// A value the server would refuse (nested deeper than 32 levels, NaN or an
    /// infinity), caught before sending.
    #[error("invalid value: {0}")]
    InvalidValue(String),
    /// This client already has a live subscription to the room.
    #[error("already subscribed to room {0}")]
    AlreadySubscribed(String),
    /// The client was closed (by [`Client::close`](super::Client::close) or by dropping
    /// every handle) before the request was answered.
    #[error("the client is closed")]
    ClientClosed,
}

/// Why an op or create did not resolve to an ack seq.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// The server (or the client, for a value it can tell is invalid before sending)
    /// refused the op: nothing changed.
    #[error("nack {}: {msg}", .code.as_str())]
    Nack { code: Code, msg: String },
    /// A guest's op was sent, then the connection was lost before its answer. Guests'
    /// ops are not deduplicated, so it is not re-sent: it may or may not have applied.
    #[error("the connection was lost before the op was answered; guests' ops are not re-sent")]
    Interrupted,
    /// The client ended before the op was answered.
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl OpError {
    /// The nack code, if the op was refused.
    pub fn code(&self) -> Option<Code> {
        match self {
            OpError::Nack { code, .. } => Some(*code),
            _ => None,
        }
    }
}
