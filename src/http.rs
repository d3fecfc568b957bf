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

/// An error answer: `{"code","msg"}` with the code's status (401 for a bad token).
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct ApiError {
    code: Code,
    msg: String,
    unauthorized: bool,
}

impl ApiError {
    pub fn new(code: Code, msg: impl Into<String>) -> ApiError {
        ApiError {
            code,
            msg: msg.into(),
            unauthorized: false,
        }
    }
}

impl actix_web::ResponseError for ApiError {
    fn status_code(&self) -> actix_web::http::StatusCode {
        if self.unauthorized {
            return actix_web::http::StatusCode::UNAUTHORIZED;
        }
        actix_web::http::StatusCode::from_u16(self.code.http_status())
            .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code())
            .json(json!({ "code": self.code.as_str(), "msg": self.msg }))
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        match e {
            AuthError::UserTooLong(_) | AuthError::EmptyUser => {
                ApiError::new(Code::Invalid, e.to_string())
            }
            AuthError::MissingToken | AuthError::BadToken(_) => ApiError {
                code: Code::Forbidden,
                msg: e.to_string(),
                unauthorized: true,
            },
        }
    }
}

const BAD_ROOM_ID: &str = "room id must match ^[A-Za-z0-9_.:-]{1,128}$";

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "ok": true }))
}

async fn readyz(shared: web::Data<Shared>) -> Result<HttpResponse, ApiError> {
    if shared.store.is_healthy() {
        Ok(HttpResponse::Ok().json(json!({ "ready": true })))
    } else {
        Err(ApiError::new(
            Code::Unavailable,
            "the store cannot be written",
        ))
    }
}

/// Identifies the caller and charges one op to its rate limit.
fn admit(req: &HttpRequest, shared: &Shared) -> Result<crate::auth::Identity, ApiError> {
    let identity = shared.auth.identify(req, true)?;
    let key = if identity.guest {
        let ip = req
            .peer_addr()
            .map_or_else(String::new, |a| a.ip().to_string());
        format!("ip:{ip}")
    } else {
        format!("user:{}", identity.user)
    };
    if shared.http_limiter.check_key(&key).is_err() {
        return Err(ApiError::new(
            Code::RateLimited,
            "too many ops from this user",
        ));
    }
    Ok(identity)
}

fn parse_body(body: &[u8]) -> Result<serde_json::Map<String, Json>, ApiError> {
    match serde_json::from_slice::<Json>(body) {
        Ok(Json::Object(obj)) => Ok(obj),
        Ok(_) => Err(ApiError::new(
            Code::Invalid,
            "the body must be a JSON object",
        )),
        Err(e) => Err(ApiError::new(
            Code::Invalid,
            format!("the body is not JSON: {e}"),
        )),
    }
}

async fn wait_reply(
    rx: oneshot::Receiver<Result<OpDone, (Code, String)>>,
) -> Result<OpDone, ApiError> {
    match rx.await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err((code, msg))) => Err(ApiError::new(code, msg)),
        Err(_) => Err(ApiError::new(
            Code::Unavailable,
            "the room stopped before answering; retry",
        )),
    }
}

async fn create_room(
    req: HttpRequest,
    body: web::Bytes,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let identity = admit(&req, &shared)?;
    let obj = parse_body(&body)?;
    let (Some(Json::String(room)), Some(Json::String(kind))) = (obj.get("room"), obj.get("kind"))
    else {
        return Err(ApiError::new(
            Code::Invalid,
            "`room` and `kind` must be strings",
        ));
    };
    if !valid_room_id(room) {
        return Err(ApiError::new(Code::Invalid, BAD_ROOM_ID));
    }
    let init = obj
        .get("init")
        .map_or(Ok(crate::value::Value::Null), to_value)
        .map_err(|why| ApiError::new(Code::Invalid, format!("init: {why}")))?;
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
    let done = wait_reply(rx).await?;
    Ok(HttpResponse::Created().json(json!({ "seq": done.seq, "epoch": epoch_hex(done.epoch) })))
}

async fn read_room(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let room = path.into_inner();
    shared.auth.identify(&req, true)?;
    if !valid_room_id(&room) {
        return Err(ApiError::new(Code::Invalid, BAD_ROOM_ID));
    }
    if req.query_string().split('&').any(|p| p.starts_with("at=")) {
        return Err(ApiError::new(
            Code::Invalid,
            "time travel (?at=) is not available in this version",
        ));
    }
    let result = match shared.registry.get(&room).send(room_msg::Read).await {
        Ok(result) => result,
        // The room stopped between lookup and send: start it again once.
        Err(_) => shared
            .registry
            .get(&room)
            .send(room_msg::Read)
            .await
            .unwrap_or_else(|_| {
                Err((
                    Code::Unavailable,
                    "the room stopped before answering; retry".into(),
                ))
            }),
    };
    let view = result.map_err(|(code, msg)| ApiError::new(code, msg))?;
    Ok(HttpResponse::Ok().json(json!({
        "room": room,
        "kind": view.kind,
        "epoch": epoch_hex(view.epoch),
        "seq": view.seq,
        "entries": entries_json(&view.entries),
    })))
}

async fn post_op(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let room = path.into_inner();
    let identity = admit(&req, &shared)?;
    if !valid_room_id(&room) {
        return Err(ApiError::new(Code::Invalid, BAD_ROOM_ID));
    }
    let obj = parse_body(&body)?;
    let op_id = match obj.get("id") {
        None | Some(Json::Null) => None,
        Some(Json::String(id)) => Some(id.clone()),
        Some(_) => return Err(ApiError::new(Code::Invalid, "`id` must be a string")),
    };
    let op = obj
        .get("op")
        .map_or(Err("missing `op`".to_owned()), to_value)
        .map_err(|why| ApiError::new(Code::Invalid, format!("op: {why}")))?;
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
    let done = wait_reply(rx).await?;
    Ok(HttpResponse::Ok().json(json!({ "seq": done.seq })))
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
