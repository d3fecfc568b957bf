//! The HTTP API of PROTOCOL.md: health, room creation, reads and ops.
//!
//! Handlers identify the caller, rate-limit per user (per IP for guests), and talk to
//! rooms with the same messages as WebSocket sessions; replies come back on a oneshot.
//! Errors are `{"code","msg"}` with the status mapped in `protocol::codes`.

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value as Json};
use tokio::sync::oneshot;

use crate::auth::AuthError;
use crate::protocol::codes::Code;
use crate::protocol::ids::{epoch_hex, valid_room_id};
use crate::protocol::json::{entries_json, to_value};
use crate::room::messages::{self as room_msg, OpDone, ReplyTo};
use crate::server::Shared;

/// Registers the routes on an actix-web service config.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/api/rooms", web::post().to(create_room))
        .route("/api/rooms/{room}", web::get().to(read_room))
        .route("/api/rooms/{room}/ops", web::post().to(post_op));
}

pub fn error(code: Code, msg: impl Into<String>) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(code.http_status())
        .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
    HttpResponse::build(status).json(json!({ "code": code.as_str(), "msg": msg.into() }))
}

fn auth_error(e: AuthError) -> HttpResponse {
    match e {
        AuthError::UserTooLong(_) | AuthError::EmptyUser => error(Code::Invalid, e.to_string()),
        AuthError::MissingToken | AuthError::BadToken(_) => {
            HttpResponse::Unauthorized().json(json!({ "code": "forbidden", "msg": e.to_string() }))
        }
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "ok": true }))
}

async fn readyz(shared: web::Data<Shared>) -> HttpResponse {
    if shared.store.is_healthy() {
        HttpResponse::Ok().json(json!({ "ready": true }))
    } else {
        error(Code::Unavailable, "the store cannot be written")
    }
}

/// Identifies the caller and charges one op to its rate limit.
fn admit(req: &HttpRequest, shared: &Shared) -> Result<crate::auth::Identity, HttpResponse> {
    let identity = shared.auth.identify(req, true).map_err(auth_error)?;
    let key = if identity.guest {
        let ip = req
            .peer_addr()
            .map_or_else(String::new, |a| a.ip().to_string());
        format!("ip:{ip}")
    } else {
        format!("user:{}", identity.user)
    };
    if shared.http_limiter.check_key(&key).is_err() {
        return Err(error(Code::RateLimited, "too many ops from this user"));
    }
    Ok(identity)
}

fn parse_body(body: &[u8]) -> Result<serde_json::Map<String, Json>, HttpResponse> {
    match serde_json::from_slice::<Json>(body) {
        Ok(Json::Object(obj)) => Ok(obj),
        Ok(_) => Err(error(Code::Invalid, "the body must be a JSON object")),
        Err(e) => Err(error(Code::Invalid, format!("the body is not JSON: {e}"))),
    }
}

async fn wait_reply(
    rx: oneshot::Receiver<Result<OpDone, (Code, String)>>,
) -> Result<OpDone, HttpResponse> {
    match rx.await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err((code, msg))) => Err(error(code, msg)),
        Err(_) => Err(error(
            Code::Unavailable,
            "the room stopped before answering; retry",
        )),
    }
}

async fn create_room(
    req: HttpRequest,
    body: web::Bytes,
    shared: web::Data<Shared>,
) -> HttpResponse {
    let identity = match admit(&req, &shared) {
        Ok(identity) => identity,
        Err(response) => return response,
    };
    let obj = match parse_body(&body) {
        Ok(obj) => obj,
        Err(response) => return response,
    };
    let (Some(Json::String(room)), Some(Json::String(kind))) = (obj.get("room"), obj.get("kind"))
    else {
        return error(Code::Invalid, "`room` and `kind` must be strings");
    };
    if !valid_room_id(room) {
        return error(Code::Invalid, "room id must match ^[A-Za-z0-9_.:-]{1,128}$");
    }
    let init = match obj
        .get("init")
        .map_or(Ok(crate::value::Value::Null), to_value)
    {
        Ok(init) => init,
        Err(why) => return error(Code::Invalid, format!("init: {why}")),
    };
    let (tx, rx) = oneshot::channel();
    let msg = room_msg::Create {
        user: identity.user,
        op_id: None,
        kind: kind.clone(),
        init,
        now_ms: now_ms(),
        reply: ReplyTo::http(tx),
    };
    send_to_room(&shared, room, msg).await;
    match wait_reply(rx).await {
        Ok(done) => {
            HttpResponse::Created().json(json!({ "seq": done.seq, "epoch": epoch_hex(done.epoch) }))
        }
        Err(response) => response,
    }
}

async fn read_room(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Shared>,
) -> HttpResponse {
    let room = path.into_inner();
    if let Err(e) = shared.auth.identify(&req, true) {
        return auth_error(e);
    }
    if !valid_room_id(&room) {
        return error(Code::Invalid, "room id must match ^[A-Za-z0-9_.:-]{1,128}$");
    }
    if req.query_string().split('&').any(|p| p.starts_with("at=")) {
        return error(
            Code::Invalid,
            "time travel (?at=) is not available in this version",
        );
    }
    let addr = shared.registry.get(&room);
    let result = match addr.send(room_msg::Read).await {
        Ok(result) => result,
        Err(_) => match shared.registry.get(&room).send(room_msg::Read).await {
            Ok(result) => result,
            Err(_) => Err((
                Code::Unavailable,
                "the room stopped before answering; retry".into(),
            )),
        },
    };
    match result {
        Ok(view) => HttpResponse::Ok().json(json!({
            "room": room,
            "kind": view.kind,
            "epoch": epoch_hex(view.epoch),
            "seq": view.seq,
            "entries": entries_json(&view.entries),
        })),
        Err((code, msg)) => error(code, msg),
    }
}

async fn post_op(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    shared: web::Data<Shared>,
) -> HttpResponse {
    let room = path.into_inner();
    let identity = match admit(&req, &shared) {
        Ok(identity) => identity,
        Err(response) => return response,
    };
    if !valid_room_id(&room) {
        return error(Code::Invalid, "room id must match ^[A-Za-z0-9_.:-]{1,128}$");
    }
    let obj = match parse_body(&body) {
        Ok(obj) => obj,
        Err(response) => return response,
    };
    let op_id = match obj.get("id") {
        None | Some(Json::Null) => None,
        Some(Json::String(id)) => Some(id.clone()),
        Some(_) => return error(Code::Invalid, "`id` must be a string"),
    };
    let op = match obj
        .get("op")
        .map_or(Err("missing `op`".to_owned()), to_value)
    {
        Ok(op) => op,
        Err(why) => return error(Code::Invalid, format!("op: {why}")),
    };
    let (tx, rx) = oneshot::channel();
    let msg = room_msg::Submit {
        user: identity.user,
        // An op without a user identity is never deduplicated.
        op_id: op_id.filter(|_| !identity.guest),
        op,
        now_ms: now_ms(),
        reply: ReplyTo::http(tx),
    };
    send_to_room(&shared, &room, msg).await;
    match wait_reply(rx).await {
        Ok(done) => HttpResponse::Ok().json(json!({ "seq": done.seq })),
        Err(response) => response,
    }
}

/// Sends to a room, restarting it once if it stopped; a message lost anyway answers
/// through its dropped `ReplyTo`.
async fn send_to_room<M>(shared: &Arc<Shared>, room: &str, msg: M)
where
    M: actix::Message<Result = ()> + Send + 'static,
    crate::room::Room: actix::Handler<M>,
{
    let addr = shared.registry.get(room);
    match addr.try_send(msg) {
        Ok(()) => {}
        Err(actix::prelude::SendError::Full(msg) | actix::prelude::SendError::Closed(msg)) => {
            let _ = shared.registry.get(room).send(msg).await;
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
