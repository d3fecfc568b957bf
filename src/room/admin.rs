//! What the Admin API and the dashboard ask a running room: its member list and a
//! summary (kind, epoch, committed seq, subscriptions). Read-only; the HTTP side is in
//! `web/admin.rs`.

use actix::prelude::*;

use super::{Room, Status};
use crate::protocol::codes::Code;
use crate::protocol::message::WireMember;

/// The room's members (users with their connection counts), sorted by user. SSE
/// streams are not members.
#[derive(Message)]
#[rtype(result = "Result<Vec<WireMember>, (Code, String)>")]
pub struct ReadPresence;

/// A loaded room at a glance, for the admin room list.
#[derive(Message)]
#[rtype(result = "Option<RoomSummary>")]
pub struct Summarize;

/// What [`Summarize`] answers (None when the room does not exist).
#[derive(Debug, Clone)]
pub struct RoomSummary {
    pub kind: String,
    pub epoch: u64,
    /// Seq of the last committed event.
    pub seq: u64,
    /// Open subscriptions of member connections (two connections of one user count 2;
    /// SSE streams are not counted).
    pub subscribers: usize,
}

impl Handler<ReadPresence> for Room {
    type Result = Result<Vec<WireMember>, (Code, String)>;

    fn handle(&mut self, _msg: ReadPresence, _ctx: &mut Context<Self>) -> Self::Result {
        match &self.status {
            Status::Live(live) if live.committed > 0 && live.deleting.is_none() => {
                Ok(self.presence.members())
            }
            Status::Failed(e) => Err((Code::Unavailable, format!("room unavailable: {e}"))),
            _ => Err((Code::NotFound, format!("no room {}", self.room_id))),
        }
    }
}

impl Handler<Summarize> for Room {
    type Result = Option<RoomSummary>;

    fn handle(&mut self, _msg: Summarize, _ctx: &mut Context<Self>) -> Self::Result {
        match &self.status {
            Status::Live(live) if live.committed > 0 && live.deleting.is_none() => {
                Some(RoomSummary {
                    kind: live.kind.name().to_owned(),
                    epoch: live.epoch,
                    seq: live.committed,
                    subscribers: self
                        .subscribers
                        .values()
                        .filter(|sub| sub.session.member)
                        .count(),
                })
            }
            _ => None,
        }
    }
}
