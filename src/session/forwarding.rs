//! Cluster mode in the Session: ops and creates for a room another node owns go to
//! that node (`cluster::forward`), and their answers come back in the order sent.
//!
//! The request is handed to NATS inside `ctx.wait`, so a connection's ops leave in the
//! order they arrived, as they reach a local room's mailbox in order; the answer is
//! awaited beside the session (`ctx.spawn`), so the connection keeps reading while the
//! owner commits. [`AckOrder`](crate::cluster::forward::AckOrder) puts the answers
//! back in order per room.

use std::sync::Arc;

use actix::prelude::*;

use super::Session;
use crate::cluster::rpc::Forwardable;
use crate::cluster::Cluster;
use crate::protocol::ids::RoomId;
use crate::room::Room;

impl Session {
    /// Sends an op-like message to its room: here when this node owns it (or there is
    /// no cluster), else to its owner.
    pub(super) fn route<M>(&mut self, ctx: &mut Context<Self>, room: RoomId, msg: M)
    where
        M: Message<Result = ()> + Forwardable + Send + 'static,
        Room: Handler<M>,
    {
        match self.shared.cluster.clone().filter(|c| !c.owns(&room)) {
            Some(cluster) => self.forward(ctx, cluster, room, msg),
            None => self.deliver(ctx, room, msg),
        }
    }

    fn forward<M: Forwardable>(
        &mut self,
        ctx: &mut Context<Self>,
        cluster: Arc<Cluster>,
        room: RoomId,
        msg: M,
    ) {
        let (request, reply) = msg.into_request(&room);
        let slot = self.forwards.push(&room, reply);
        let sent = async move {
            let owner = cluster.owner(&request.room).to_owned();
            cluster.forwarder().send(&owner, &request).await
        };
        ctx.wait(
            sent.into_actor(self)
                .map(move |sent, session, ctx| match sent {
                    Err(e) => session.forwards.answer(&room, slot, Err(e)),
                    Ok(ticket) => {
                        ctx.spawn(ticket.answer().into_actor(session).map(
                            move |answer, session, _ctx| {
                                session.forwards.answer(&room, slot, answer)
                            },
                        ));
                    }
                }),
        );
    }
}
