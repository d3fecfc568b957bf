//! Cluster mode: the HTTP calls about a room another node owns, answered by the owner
//! as if local (same status, same body), and the owner's side of them.
//!
//! The node the client is connected to does everything a local call does first (the
//! caller's identity and permission, the room id, the query, the read's rate and turn),
//! then sends the owner a [`Call`] over NATS (`cluster::forward`, request/reply on the
//! owner's subject) with the caller's user; the owner runs the same code as for its own
//! clients ([`OwnerCalls`]) and answers the status and JSON body, or the refusal's code
//! and message. A body over NATS's `max_payload` (a big room's state, a page of large
//! events) travels in parts (`cluster::rpc::publish_reply`); a lost part, a silent
//! owner or one that is down is 503 `unavailable`, as for forwarded ops, and so is a
//! node with `cluster::forward::MAX_IN_FLIGHT` forwards already waiting.
//!
//! `GET /api/rooms/{room}` has its own request (`What::Read`, older than this file);
//! the room list asks every node for its own rooms with [`Call::Rooms`]
//! (`super::admin`), and the admin disconnect every node with [`Call::Disconnect`];
//! `POST` of ops and creates are forwarded as room messages (`cluster::rpc`).

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use futures_util::future::LocalBoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use tokio::sync::Semaphore;

use super::ApiError;
use crate::cluster::rpc::{Calls, Reply, Request, What, WireError};
use crate::cluster::Cluster;
use crate::protocol::codes::Code;
use crate::protocol::ids::RoomId;
use crate::room::RoomError;
use crate::shared::Shared;

/// An HTTP call answered on another node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", tag = "call")]
pub enum Call {
    /// `GET /api/rooms/{room}?at=N`.
    At { at: u64 },
    /// `GET /api/rooms/{room}/events`; `admin` sees private ops.
    Events {
        after: u64,
        limit: usize,
        admin: bool,
    },
    /// `DELETE /api/rooms/{room}` (the caller is an admin).
    Delete,
    /// `POST /api/rooms/{room}/signal` (checked: the data's size is within the limit).
    Signal { data: Json },
    /// `GET /api/rooms/{room}/presence`.
    Presence,
    /// `POST /api/users/{user}/disconnect` on every node: each closes its own
    /// connections of the user and answers `{"closed":N}`.
    Disconnect { user: String },
    /// The node's own rooms, one page of `GET /api/rooms`: answered
    /// `{"rooms":[…],"more":bool}`.
    Rooms {
        prefix: String,
        after: Option<String>,
        limit: usize,
    },
}

/// The cluster when another node owns `room` (None on its owner and on a single node).
pub fn elsewhere<'a>(shared: &'a Shared, room: &RoomId) -> Option<&'a Arc<Cluster>> {
    shared.cluster.as_ref().filter(|c| !c.owns(room))
}

/// Sends `call` about `room` for `user` to `node` and returns the body it answered
/// (`Json::Null` for none); its refusal as the same error.
pub async fn ask(
    cluster: &Cluster,
    node: &str,
    room: &str,
    user: &str,
    call: &Call,
) -> Result<Json, ApiError> {
    Ok(ask_http(cluster, node, room, user, call).await?.1)
}

/// [`ask`] with the answer's status.
async fn ask_http(
    cluster: &Cluster,
    node: &str,
    room: &str,
    user: &str,
    call: &Call,
) -> Result<(u16, Json), ApiError> {
    let request = Request {
        room: room.to_owned(),
        user: user.to_owned(),
        op_id: None,
        now_ms: 0,
        what: What::Call {
            call: serde_json::to_value(call).unwrap_or_default(),
        },
        refusal: None,
    };
    let ticket = cluster.forwarder().send(node, &request).await?;
    match ticket.reply().await? {
        Reply::Http { status, body } => Ok((status, body.unwrap_or(Json::Null))),
        Reply::Nack(refusal) => Err(refusal.into_room_error().into()),
        _ => Err(ApiError::new(
            Code::Unavailable,
            format!("node {node} answered an HTTP call as something else"),
        )),
    }
}

/// `call` about `room` answered by the room's owner, as the HTTP response it gave.
pub async fn forward(
    cluster: &Cluster,
    room: &RoomId,
    user: &str,
    call: &Call,
) -> Result<HttpResponse, ApiError> {
    let (status, body) = ask_http(cluster, &cluster.owner(room), room, user, call).await?;
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Ok(match body {
        Json::Null => HttpResponse::build(status).finish(),
        body => HttpResponse::build(status).json(body),
    })
}

/// How long a read forwarded by another node waits for one of [`OwnerCalls`]'s turns
/// before it is refused `unavailable`; below `cluster::forward::FORWARD_TIMEOUT`, so
/// the sender hears the reason rather than a timeout.
const OWNER_TURN_WAIT: Duration = Duration::from_secs(3);

/// The owner's side: runs [`Call`]s for other nodes through the HTTP API's own code.
pub struct OwnerCalls {
    shared: Arc<Shared>,
    /// Turns of the reads other nodes forward here (`?at=`, `/events`), each of which
    /// holds a copy of what it answers: `--max-reads-in-flight` of them, apart from the
    /// turns of this node's own clients (a node's turns are held while it waits for an
    /// owner, so sharing one pool between two nodes asking each other could starve
    /// both). Full: wait up to [`OWNER_TURN_WAIT`], then refuse `unavailable`.
    turns: Arc<Semaphore>,
}

impl OwnerCalls {
    pub fn new(shared: Arc<Shared>) -> OwnerCalls {
        let turns = Arc::new(Semaphore::new(shared.config.max_reads_in_flight.max(1)));
        OwnerCalls { shared, turns }
    }
}

impl Calls for OwnerCalls {
    fn answer(&self, room: String, user: String, call: Json) -> LocalBoxFuture<'static, Reply> {
        let shared = self.shared.clone();
        let turns = self.turns.clone();
        Box::pin(async move {
            let answer = match serde_json::from_value::<Call>(call) {
                Ok(call @ (Call::At { .. } | Call::Events { .. })) => {
                    match tokio::time::timeout(OWNER_TURN_WAIT, turns.acquire_owned()).await {
                        Ok(Ok(_turn)) => run(&shared, &room, user, call).await,
                        _ => Err(ApiError::new(
                            Code::Unavailable,
                            format!(
                                "the room's owner is building {} reads for other nodes; retry",
                                shared.config.max_reads_in_flight
                            ),
                        )),
                    }
                }
                Ok(call) => run(&shared, &room, user, call).await,
                Err(e) => Err(ApiError::new(
                    Code::Invalid,
                    format!("unreadable HTTP call: {e}"),
                )),
            };
            match answer {
                Ok((status, body)) => Reply::Http { status, body },
                Err(e) => Reply::Nack(WireError::of(&RoomError::Rejected(e.code, e.msg))),
            }
        })
    }
}

/// Runs one call on this node: its status and body.
async fn run(
    shared: &Arc<Shared>,
    room: &str,
    user: String,
    call: Call,
) -> Result<(u16, Option<Json>), ApiError> {
    if let Call::Rooms {
        prefix,
        after,
        limit,
    } = call
    {
        let (rooms, more) = super::admin::rooms_page(shared, prefix, after, limit).await?;
        return Ok((
            200,
            Some(serde_json::json!({ "rooms": rooms, "more": more })),
        ));
    }
    if let Call::Disconnect { user } = call {
        let closed = super::disconnect(shared, &user);
        return Ok((200, Some(serde_json::json!({ "closed": closed }))));
    }
    let room = RoomId::parse(room).map_err(|e| ApiError::new(Code::Invalid, e.to_string()))?;
    if let Some(cluster) = elsewhere(shared, &room) {
        return Err(crate::cluster::rpc::not_owned(cluster, &room).into());
    }
    let viewer: Arc<str> = user.into();
    match call {
        Call::At { at } => {
            let (fields, entries) = super::state_at(shared, &room, at, viewer).await?;
            Ok((200, Some(super::reads::collect(fields, "entries", entries))))
        }
        Call::Events {
            after,
            limit,
            admin,
        } => {
            let (fields, events) =
                super::events_page(shared, &room, after, limit, viewer, admin).await?;
            Ok((200, Some(super::reads::collect(fields, "events", events))))
        }
        Call::Delete => {
            super::delete(shared, &room).await?;
            Ok((204, None))
        }
        Call::Signal { data } => {
            let data = crate::protocol::json::to_value(&data)
                .map_err(|why| ApiError::new(Code::Invalid, format!("data: {why}")))?;
            super::signal(shared, &room, data);
            Ok((202, Some(serde_json::json!({}))))
        }
        Call::Presence => Ok((200, Some(super::admin::presence_body(shared, &room).await?))),
        Call::Rooms { .. } | Call::Disconnect { .. } => {
            Err(ApiError::new(Code::Invalid, "not a room call"))
        }
    }
}
