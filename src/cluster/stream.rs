//! An SSE stream (`GET /api/rooms/{room}/stream`) of a room another node owns: made on
//! the owner like a WebSocket's remote subscription (`remote`, `relay`), for a stand-in
//! that is not a room member (not in presence, not counted as a subscriber).
//!
//! The stream's [`SessionRef`] is subscribed through [`super::remote::subscribe`], so
//! its diffs come from the room's mirror on this node and the owner's other frames
//! reach its outbound queue exactly as they reach a WebSocket's: numbered,
//! a lost one or an overflow on the owner closing it (the SSE body ends, the client
//! reconnects with its `Last-Event-ID`), and an owner that dies or restarts ending it
//! with `error` `unavailable`. The SSE body (`sse`) reads that queue the same way
//! whether the room is local or not; this file is only the start and the end.

use std::sync::Arc;

use super::rpc::{Request, What};
use super::Cluster;
use crate::outbound::SessionRef;
use crate::protocol::ids::RoomId;
use crate::protocol::Since;
use crate::room::RoomError;

/// Subscribes the stream `session` to `room` on the room's owner. Ok(true): subscribed;
/// Ok(false): the owner refused it, and its `error` frame (`not_found`, …) is on its way
/// to the stream's queue; Err: the owner was not reached, or the node asked does not
/// own the room (`unavailable`, see [`super::remote::subscribe`]).
pub async fn subscribe(
    cluster: &Cluster,
    session: &SessionRef,
    room: &RoomId,
    presence: bool,
    since: Option<Since>,
) -> Result<bool, RoomError> {
    super::remote::subscribe(cluster, session, room, presence, since, false).await
}

/// The stream ended (or was refused): forgotten here, and its relay on the owner closed
/// (a close that is lost is cleaned up by the relay's expiry).
pub fn end(cluster: &Arc<Cluster>, session_id: u64) {
    let remote = cluster.remote();
    for owner in remote.drop_session(session_id) {
        let request = Request {
            room: String::new(),
            user: String::new(),
            op_id: None,
            now_ms: 0,
            what: What::Close {
                deliver: remote.deliver_subject(session_id, &owner),
            },
            refusal: None,
        };
        let cluster = cluster.clone();
        actix_rt::spawn(async move {
            if let Ok(ticket) = cluster.forwarder().send(&owner, &request).await {
                let _ = ticket.reply().await;
            }
        });
    }
}
