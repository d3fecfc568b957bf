//! Cluster mode in the Session: ops and creates for a room another node owns go to
//! that node (`cluster::forward`), and their answers come back in the order sent;
//! subscriptions, unsubscriptions and signals for such a room go to its owner's relay,
//! and a subscription's diffs come from the room's mirror on this node.
//!
//! The request is handed to NATS inside `ctx.wait`, so a connection's ops leave in the
//! order they arrived, as they reach a local room's mailbox in order; the answer is
//! awaited beside the session (`ctx.spawn`), so the connection keeps reading while the
//! owner commits. [`AckOrder`](crate::cluster::forward::AckOrder) puts the answers
//! back in order per room.

use std::sync::Arc;

use actix::prelude::*;

use super::Session;
use crate::cluster::rpc::{Forwardable, Request, What};
use crate::cluster::Cluster;
use crate::protocol::ids::RoomId;
use crate::protocol::Since;
use crate::room::messages::Queued;
use crate::room::Room;
use crate::value::Value;

impl Session {
    /// Sends an op-like message to its room: here when this node owns it (or there is
    /// no cluster), else to its owner.
    pub(super) fn route<M>(&mut self, ctx: &mut Context<Self>, room: RoomId, msg: M)
    where
        M: Message<Result = ()> + Forwardable + Queued + Send + 'static,
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
        let slot = self.forwards().push(&room, reply);
        let sent = async move {
            let owner = cluster.owner(&request.room).to_owned();
            cluster.forwarder().send(&owner, &request).await
        };
        ctx.wait(
            sent.into_actor(self)
                .map(move |sent, session, ctx| match sent {
                    Err(e) => session.forwards().answer(&room, slot, Err(e)),
                    Ok(ticket) => {
                        ctx.spawn(ticket.answer().into_actor(session).map(
                            move |answer, session, _ctx| {
                                session.forwards().answer(&room, slot, answer)
                            },
                        ));
                    }
                }),
        );
    }
}

/// Remote subscriptions: a `sub` to a room another node owns is made on the owner
/// through a relay (`cluster::relay`); its frames arrive through `cluster::remote`.
impl Session {
    /// Subscriptions to rooms owned elsewhere.
    pub(super) fn n_remote_subs(&self) -> usize {
        self.shared
            .cluster
            .as_ref()
            .map_or(0, |c| c.remote().count(self.session.session_id))
    }

    pub(super) fn sub_remote(
        &mut self,
        ctx: &mut Context<Self>,
        cluster: Arc<Cluster>,
        room: RoomId,
        presence: bool,
        since: Option<Since>,
    ) {
        let session = self.session.clone();
        let asked = async move {
            crate::cluster::remote::subscribe(&cluster, &session, &room, presence, since, true)
                .await
                .map_err(|e| (room, e))
        };
        ctx.wait(asked.into_actor(self).map(|subscribed, session, _ctx| {
            if let Err((room, e)) = subscribed {
                session.error(e.code(), Some(&room), e.to_string());
            }
        }));
    }

    /// Sends a control request about `room` to its owner without waiting for the reply
    /// (unsubscribe, signal, close): a lost one is cleaned up by the relay's expiry.
    /// With `ctx`, it is handed to NATS before the connection's next request, so an
    /// `unsub` reaches the owner's room before a later op does.
    fn tell_owner(
        &mut self,
        ctx: Option<&mut Context<Self>>,
        owner: String,
        room: &str,
        what: What,
    ) {
        let Some(cluster) = self.shared.cluster.clone() else {
            return;
        };
        let request = Request {
            room: room.to_owned(),
            user: self.session.user.to_string(),
            op_id: None,
            now_ms: 0,
            what,
            refusal: None,
        };
        let sent = async move { cluster.forwarder().send(&owner, &request).await };
        match ctx {
            Some(ctx) => ctx.wait(sent.into_actor(self).map(|sent, _session, ctx| {
                if let Ok(ticket) = sent {
                    ctx.spawn(
                        async move {
                            let _ = ticket.reply().await;
                        }
                        .into_actor(_session),
                    );
                }
            })),
            None => {
                actix_rt::spawn(async move {
                    if let Ok(ticket) = sent.await {
                        let _ = ticket.reply().await;
                    }
                });
            }
        }
    }

    /// `unsub` of a remote subscription; false when there is none.
    pub(super) fn unsub_remote(&mut self, ctx: &mut Context<Self>, room: &str) -> bool {
        let Some(cluster) = self.shared.cluster.clone() else {
            return false;
        };
        let session_id = self.session.session_id;
        let Some(owner) = cluster.remote().remove_room(session_id, room) else {
            return false;
        };
        let deliver = cluster.remote().deliver_subject(session_id, &owner);
        self.tell_owner(Some(ctx), owner, room, What::Unsubscribe { deliver });
        true
    }

    /// The rooms this connection subscribes to on other nodes.
    pub(super) fn remote_rooms(&self) -> Vec<String> {
        self.shared
            .cluster
            .as_ref()
            .map_or_else(Vec::new, |c| c.remote().rooms(self.session.session_id))
    }

    /// Whether this connection subscribes to `room` on another node.
    pub(super) fn is_remote_sub(&self, room: &str) -> bool {
        self.shared
            .cluster
            .as_ref()
            .is_some_and(|c| c.remote().is_subscribed(self.session.session_id, room))
    }

    /// A signal to a remotely subscribed room (checked by the caller).
    pub(super) fn signal_remote(&mut self, ctx: &mut Context<Self>, room: &str, data: &Value) {
        let Some(cluster) = self.shared.cluster.clone() else {
            return;
        };
        let session_id = self.session.session_id;
        let owner = cluster.owner(room).to_owned();
        let deliver = cluster.remote().deliver_subject(session_id, &owner);
        let data = crate::protocol::json::from_value(data);
        self.tell_owner(Some(ctx), owner, room, What::Signal { deliver, data });
    }

    /// The connection ended: its relays on other nodes are closed.
    pub(super) fn end_remote(&mut self) {
        let Some(cluster) = self.shared.cluster.clone() else {
            return;
        };
        let session_id = self.session.session_id;
        for owner in cluster.remote().drop_session(session_id) {
            let deliver = cluster.remote().deliver_subject(session_id, &owner);
            self.tell_owner(None, owner, "", What::Close { deliver });
        }
    }
}
