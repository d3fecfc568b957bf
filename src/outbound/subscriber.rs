//! The handle a room holds for one subscribed connection: who it is, how its frames
//! are encoded, and the outbound queue they go to.
//!
//! Rooms push through this handle and never see the session actor or the socket; the
//! session builds one per connection at the upgrade.

use std::sync::Arc;

use actix_http::ws::OpCode;

use super::{Charge, Frame, Outbound};
use crate::protocol::message::ServerMsg;
use crate::protocol::Encoding;

/// What a Room needs to know of a connection: who it is and where its frames go.
#[derive(Clone, Debug)]
pub struct SessionRef {
    pub session_id: u64,
    pub user: Arc<str>,
    /// False for generated guest ids: their ops are never deduplicated.
    pub dedup: bool,
    pub encoding: Encoding,
    pub outbound: Arc<Outbound>,
    /// True for WebSocket sessions. False for an SSE stream (`sse.rs`), which is not a
    /// room member: it is not in presence, gets no signals, and is not counted in the
    /// admin room list's `subscribers`.
    pub member: bool,
    /// Rooms that dropped this connection's subscription on their own (deleted, moving),
    /// marked before their `error` is queued: the session forgets them before it
    /// handles its next message; a cluster relay tells the connection's node.
    pub evicted: Arc<parking_lot::Mutex<Vec<String>>>,
}

impl SessionRef {
    /// Tells the session that `room` dropped its subscription.
    pub fn evict(&self, room: &str) {
        self.evicted.lock().push(room.to_owned());
    }

    /// Encodes and queues one message for this connection alone.
    pub fn send(&self, msg: &ServerMsg, charge: Charge) {
        self.outbound.push(encode(msg, self.encoding), charge);
    }
}

/// Encodes one message in one encoding.
pub fn encode(msg: &ServerMsg, encoding: Encoding) -> Frame {
    match encoding {
        Encoding::Json => {
            Frame::copied(OpCode::Text, crate::protocol::json::encode(msg).as_bytes())
        }
        Encoding::Rkyv => Frame::copied(OpCode::Binary, &crate::protocol::binary::encode(msg)),
    }
}
