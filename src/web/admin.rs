//! The Admin API the dashboard reads (PROTOCOL.md 1.1 "Admin API"): the room list and a
//! room's presence. Admin only when auth is on (a token with `"admin": true`, or the
//! API key; `http::require_admin`); with auth off every caller is an admin.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use crate::http::{require_admin, ApiError};
use crate::protocol::codes::Code;
use crate::protocol::ids::{epoch_hex, RoomId};
use crate::room::admin::{ReadPresence, Summarize};
use crate::shared::Shared;

/// Most rooms one page of the list returns.
const MAX_PAGE: usize = 1_000;
const DEFAULT_PAGE: usize = 100;

/// `GET /api/rooms?prefix=P&after=R&limit=M`: rooms in id order with their kind, epoch,
/// committed seq and open subscriptions on this server (0 for rooms not loaded).
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
    let next = more.then(|| rooms.last().map(|r| r.room.clone())).flatten();
    let rooms: Vec<_> = rooms
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
    Ok(HttpResponse::Ok().json(json!({ "rooms": rooms, "next": next })))
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
    crate::http::local_room(&shared, &room)?;
    let result = match shared.registry.get(&room).send(ReadPresence).await {
        Ok(result) => result,
        // The room stopped between lookup and send: start it again once.
        Err(_) => shared
            .registry
            .get(&room)
            .send(ReadPresence)
            .await
            .unwrap_or_else(|_| Err((Code::Unavailable, "the room restarted; retry".into()))),
    };
    let members = result.map_err(|(code, msg)| ApiError::new(code, msg))?;
    let members: Vec<_> = members
        .iter()
        .map(|m| json!({ "user": m.user, "conns": m.conns }))
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "room": room.as_str(), "members": members })))
}
