//! The Admin API the dashboard reads (PROTOCOL.md 1.1 "Admin API"): the room list and a
//! room's presence. Admin only when auth is on (a token with `"admin": true`, or the
//! API key; `http::require_admin`); with auth off every caller is an admin.
//!
//! Cluster mode: a room's presence is read on its owner (the member list there holds
//! the members on every node); the room list is cluster-wide, each node's own rooms
//! gathered over NATS ([`super::forwarded`]) and merged in id order, each room with the
//! `node` that owns it, and `"partial": true` with the nodes that did not answer.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value as Json};

use super::forwarded::{self, Call};
use crate::http::{require_admin, ApiError};
use crate::protocol::codes::Code;
use crate::protocol::ids::{epoch_hex, RoomId};
use crate::room::admin::{ReadPresence, Summarize};
use crate::shared::Shared;

/// Most rooms one page of the list returns.
const MAX_PAGE: usize = 1_000;
const DEFAULT_PAGE: usize = 100;

/// `GET /api/rooms?prefix=P&after=R&limit=M`: rooms in id order with their kind, epoch,
/// committed seq and open subscriptions on their owner (0 for rooms not loaded).
pub async fn list_rooms(
    req: HttpRequest,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &shared)?;
    let query =
        web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
            .map_err(|e| ApiError::new(Code::Invalid, format!("query: {e}")))?
            .into_inner();
    let prefix = query.get("prefix").cloned().unwrap_or_default();
    let after = query.get("after").cloned().filter(|a| !a.is_empty());
    let limit = match query.get("limit") {
        None => DEFAULT_PAGE,
        Some(text) => text
            .parse::<usize>()
            .map_err(|_| ApiError::new(Code::Invalid, "`limit` must be a non-negative integer"))?
            .clamp(1, MAX_PAGE),
    };
    let Some(cluster) = &shared.cluster else {
        let (rooms, more) = rooms_page(&shared, prefix, after, limit).await?;
        let next = more
            .then(|| rooms.last().map(|r| r["room"].clone()))
            .flatten();
        return Ok(HttpResponse::Ok().json(json!({ "rooms": rooms, "next": next })));
    };
    // Every node's first `limit` rooms after `after`, merged: the first `limit` of the
    // union are the page, and a room past it on any node sorts after the page's last.
    let call = Call::Rooms {
        prefix: prefix.clone(),
        after: after.clone(),
        limit,
    };
    // The member list in force (a rebalance changes it).
    let members = cluster.members().members().nodes;
    let pages = futures_util::future::join_all(members.iter().map(|node| {
        let (shared, call) = (shared.clone(), call.clone());
        let (prefix, after) = (prefix.clone(), after.clone());
        async move {
            let page = match node == cluster.node_id() {
                true => rooms_page(&shared, prefix, after, limit)
                    .await
                    .map(|(rooms, more)| json!({ "rooms": rooms, "more": more })),
                false => forwarded::ask(cluster, node, "", "", &call).await,
            };
            (node.clone(), page)
        }
    }))
    .await;
    let mut rooms = Vec::new();
    let mut more = false;
    let mut missing = Vec::new();
    for (node, page) in pages {
        let page = match page {
            Ok(page) => page,
            Err(e) => {
                missing.push(json!({ "node": node, "msg": e.to_string() }));
                continue;
            }
        };
        more |= page["more"] == json!(true);
        for mut room in page["rooms"].as_array().cloned().unwrap_or_default() {
            room["node"] = json!(node);
            rooms.push(room);
        }
    }
    rooms.sort_by(|a, b| a["room"].as_str().cmp(&b["room"].as_str()));
    // A room two nodes list (its data is being moved by a rebalance) is listed once, as
    // its owner lists it.
    let owned = |room: &Json| {
        let id = room["room"].as_str().unwrap_or_default();
        room["node"].as_str() == Some(cluster.owner(id).as_str())
    };
    rooms.dedup_by(|later, earlier| {
        if later["room"] != earlier["room"] {
            return false;
        }
        if owned(later) {
            std::mem::swap(later, earlier);
        }
        true
    });
    more |= rooms.len() > limit;
    rooms.truncate(limit);
    let next = more
        .then(|| rooms.last().map(|r| r["room"].clone()))
        .flatten();
    let mut body = json!({ "rooms": rooms, "next": next, "partial": !missing.is_empty() });
    if !missing.is_empty() {
        body["missing"] = json!(missing);
    }
    Ok(HttpResponse::Ok().json(body))
}

/// This node's own rooms: the first `limit` in id order after `after` with `prefix`, as
/// the list shows them, and whether more follow.
pub async fn rooms_page(
    shared: &Shared,
    prefix: String,
    after: Option<String>,
    limit: usize,
) -> Result<(Vec<Json>, bool), ApiError> {
    let page = shared
        .store
        .read_blocking(move |store| store.rooms_page(&prefix, after.as_deref(), limit))
        .await;
    let (rooms, more) = match page {
        Ok(Ok(page)) => page,
        Ok(Err(e)) => return Err(ApiError::new(Code::Unavailable, e.to_string())),
        Err(e) => {
            return Err(ApiError::new(
                Code::Unavailable,
                format!("read task failed: {e}"),
            ))
        }
    };
    // Loaded rooms know their subscribers and may be ahead of what the page read.
    let summaries = futures_util::future::join_all(rooms.iter().map(|listed| {
        let addr = shared.registry.live(&listed.room);
        async move {
            match addr {
                Some(addr) => addr.send(Summarize).await.ok().flatten(),
                None => None,
            }
        }
    }))
    .await;
    let rooms = rooms
        .iter()
        .zip(summaries)
        .map(|(listed, summary)| {
            let (seq, subscribers) = match &summary {
                Some(s) if s.epoch == listed.epoch => (s.seq.max(listed.head), s.subscribers),
                _ => (listed.head, 0),
            };
            json!({
                "room": listed.room,
                "kind": listed.kind.as_str(),
                "epoch": epoch_hex(listed.epoch),
                "seq": seq,
                "subscribers": subscribers,
            })
        })
        .collect();
    Ok((rooms, more))
}

/// `GET /api/rooms/{room}/presence`: the member list (users and connection counts).
pub async fn presence(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &shared)?;
    let room = RoomId::parse(&path.into_inner())
        .map_err(|e| ApiError::new(Code::Invalid, e.to_string()))?;
    if let Some(cluster) = forwarded::elsewhere(&shared, &room) {
        return forwarded::forward(cluster, &room, "", &Call::Presence).await;
    }
    Ok(HttpResponse::Ok().json(presence_body(&shared, &room).await?))
}

/// `{"room","members"}` of a room this node owns.
pub async fn presence_body(shared: &Shared, room: &RoomId) -> Result<Json, ApiError> {
    let result = match shared.registry.get(room).send(ReadPresence).await {
        Ok(result) => result,
        // The room stopped between lookup and send: start it again once.
        Err(_) => shared
            .registry
            .get(room)
            .send(ReadPresence)
            .await
            .unwrap_or_else(|_| Err((Code::Unavailable, "the room restarted; retry".into()))),
    };
    let members = result.map_err(|(code, msg)| ApiError::new(code, msg))?;
    let members: Vec<_> = members
        .iter()
        .map(|m| json!({ "user": m.user, "conns": m.conns }))
        .collect();
    Ok(json!({ "room": room.as_str(), "members": members }))
}
