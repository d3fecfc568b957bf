//! The HTTP API of PROTOCOL.md: health, room creation, reads and ops.
//!
//! Handlers identify the caller, check its permission on the room before anything about
//! the room is looked at (so a 403 never tells whether the room exists), rate-limit per
//! user (per IP for guests), and talk to rooms with the same messages as WebSocket
//! sessions; replies come back on a oneshot. Errors are `{"code","msg"}` with the status
//! mapped in `protocol::codes`. The admin endpoints go through [`require_admin`]. What
//! every request passes first (connection cap, Host, Origin, body type and deadline) is
//! [`guard`]; a read's streamed reply is [`reads`]. The per-IP connection count and the
//! rate and turns of reads are `admission`'s ([`crate::admission::http_conns`],
//! [`crate::admission::read_gate`]), below `shared`, which holds them.

pub mod admin;
pub mod forwarded;
pub mod guard;
pub mod reads;

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value as Json};
use tokio::sync::oneshot;

use crate::admission::read_gate::Turn;
use crate::auth::{AuthError, Identity, Permission};
use crate::kind::audience::{event_view, EventView};
use crate::kind::KindRef;
use crate::outbound::{ConnSocket, KillSwitch};
use crate::protocol::codes::Code;
use crate::protocol::ids::{self, epoch_hex, RoomId};
use crate::protocol::json::{entry_json, parse_object, to_value};
use crate::room::messages::{self as room_msg, OpDone, ReplyTo};
use crate::room::RoomError;
use crate::shared::Shared;
use crate::store::{EventsPage, Store};
use forwarded::Call;
use reads::{object_head, StreamedJson};

/// Registers the routes on an actix-web service config.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics))
        .route("/api/rooms", web::post().to(create_room))
        .route("/api/rooms/{room}", web::get().to(read_room))
        .route("/api/rooms/{room}", web::delete().to(delete_room))
        .route("/api/rooms/{room}/ops", web::post().to(post_op))
        .route("/api/rooms/{room}/events", web::get().to(read_events))
        .route("/api/rooms/{room}/signal", web::post().to(signal_room))
        .route(
            "/api/users/{user}/disconnect",
            web::post().to(disconnect_user),
        );
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
        if e.is_invalid_user() {
            return ApiError::new(Code::Invalid, e.to_string());
        }
        ApiError {
            code: Code::Forbidden,
            msg: e.to_string(),
            unauthorized: true,
        }
    }
}

/// A room id from a path or body, checked once here.
fn room_id(room: &str) -> Result<RoomId, ApiError> {
    RoomId::parse(room).map_err(|e| ApiError::new(Code::Invalid, e.to_string()))
}

impl From<RoomError> for ApiError {
    fn from(e: RoomError) -> ApiError {
        ApiError::new(e.code(), e.to_string())
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "ok": true }))
}

/// The most damaged rooms `/readyz` lists by name (`n_damaged` counts them all).
const MAX_DAMAGED_LISTED: usize = 100;

async fn readyz(shared: web::Data<Shared>) -> Result<HttpResponse, ApiError> {
    if !shared.store.is_healthy() {
        return Err(ApiError::new(
            Code::Unavailable,
            "the store cannot be written",
        ));
    }
    let mut body = json!({ "ready": true });
    // Damaged rooms do not make the server unready: they answer `unavailable` on any
    // server, so taking this one out of rotation would only add the healthy rooms to
    // the outage. They are listed for the operator (README, "Damaged data").
    let damaged = shared.store.damaged_rooms();
    if !damaged.is_empty() {
        let listed: Vec<_> = damaged
            .iter()
            .take(MAX_DAMAGED_LISTED)
            .map(|(room, error)| json!({ "room": room, "error": error }))
            .collect();
        body["degraded"] = json!(true);
        body["n_damaged"] = json!(damaged.len());
        body["damaged"] = json!(listed);
    }
    // Cluster mode: without NATS the rooms this node owns still work for its clients,
    // so it stays ready; `degraded` and `cluster.nats` say the rest is unavailable.
    if let Some(cluster) = &shared.cluster {
        if !cluster.nats_connected() {
            body["degraded"] = json!(true);
        }
        body["cluster"] = cluster.status();
    }
    Ok(HttpResponse::Ok().json(body))
}

/// The Prometheus text (`metrics.rs`). Open like `/healthz`: it names no room or user.
async fn metrics(shared: web::Data<Shared>) -> HttpResponse {
    let text = crate::metrics::render(&crate::metrics::Gauges {
        connections: shared.admission.open(),
        rooms_live: shared.registry.len(),
        store_healthy: shared.store.is_healthy(),
    });
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(text)
}

/// Identifies the caller and checks `permission` on `room`: 401 for a missing or bad
/// token or API key, 403 `forbidden` without the permission. Nothing about the room is
/// looked at, so the answer is the same whether the room exists or not.
pub fn authorize(
    req: &HttpRequest,
    shared: &Shared,
    permission: Permission,
    room: &str,
) -> Result<Identity, ApiError> {
    let identity = shared.auth.identify(req, true)?;
    if !identity.may(permission, room) {
        let what = match permission {
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::Create => "create",
        };
        return Err(ApiError::new(
            Code::Forbidden,
            format!("no {what} permission on this room"),
        ));
    }
    Ok(identity)
}

/// Identifies an admin (an admin token, the API key, or anyone when auth is off): 401
/// for a missing or bad token or API key, 403 `forbidden` for anyone else. For every
/// endpoint of PROTOCOL.md "Admin API".
pub fn require_admin(req: &HttpRequest, shared: &Shared) -> Result<Identity, ApiError> {
    let identity = shared.auth.identify(req, true)?;
    if !identity.admin {
        return Err(ApiError::new(Code::Forbidden, "this takes an admin"));
    }
    Ok(identity)
}

/// Charges one op to the caller's rate limit; `Err` when over it.
fn charge(req: &HttpRequest, shared: &Shared, identity: &Identity) -> Result<(), ApiError> {
    match over_rate(req, shared, identity) {
        Some(why) => Err(ApiError::new(Code::RateLimited, why)),
        None => Ok(()),
    }
}

/// Charges one op to the caller's rate limit, returning why it is over the limit
/// instead of failing: an op with an id still goes to its room, which answers a re-sent
/// id from its record before the limit applies.
fn over_rate(req: &HttpRequest, shared: &Shared, identity: &Identity) -> Option<String> {
    let key = if identity.guest {
        let ip = crate::proxy::client_ip(req, &shared.config.trusted_proxies)
            .map_or_else(String::new, |ip| ip.to_string());
        format!("ip:{ip}")
    } else {
        format!("user:{}", identity.user)
    };
    shared
        .http_limiter
        .check_key(&key)
        .is_err()
        .then(|| "too many ops from this user".to_owned())
}

fn parse_body(body: &[u8]) -> Result<serde_json::Map<String, Json>, ApiError> {
    parse_object(body).map_err(|e| ApiError::new(Code::Invalid, e.to_string()))
}

async fn wait_reply(rx: oneshot::Receiver<Result<OpDone, RoomError>>) -> Result<OpDone, ApiError> {
    match rx.await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(e)) => Err(e.into()),
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
    let (room, msg, rx) = create_request(&req, &body, &shared).inspect_err(count_refused)?;
    send_op_to_room(&shared, &room, msg).await;
    let done = wait_reply(rx).await?;
    Ok(HttpResponse::Created().json(json!({ "seq": done.seq, "epoch": epoch_hex(done.epoch) })))
}

/// An op or create answered by its room, with the receiver of the room's answer.
type ToRoom<M> = (RoomId, M, oneshot::Receiver<Result<OpDone, RoomError>>);

/// Checks a `POST /api/rooms` and builds its message to the room.
fn create_request(
    req: &HttpRequest,
    body: &web::Bytes,
    shared: &Shared,
) -> Result<ToRoom<room_msg::Create>, ApiError> {
    // A bad token is 401 whatever the body.
    shared.auth.identify(req, true)?;
    let obj = parse_body(body)?;
    let (Some(Json::String(room)), Some(Json::String(kind))) = (obj.get("room"), obj.get("kind"))
    else {
        return Err(ApiError::new(
            Code::Invalid,
            "`room` and `kind` must be strings",
        ));
    };
    let identity = authorize(req, shared, Permission::Create, room)?;
    charge(req, shared, &identity)?;
    let room = room_id(room)?;
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
        now_ms: room_msg::now_ms(),
        refusal: None,
        reply: ReplyTo::http(tx),
    };
    Ok((room, msg, rx))
}

/// Counts an op or create the HTTP API refused before a room saw it (a room's answers
/// are counted by their `ReplyTo`).
fn count_refused(e: &ApiError) {
    room_msg::count_op(None, Some(e.code));
}

/// Charges a read to the caller's address and waits for a turn to build and send it.
async fn read_turn(req: &HttpRequest, shared: &Shared) -> Result<Turn, ApiError> {
    shared
        .reads
        .charge(crate::proxy::client_ip(req, &shared.config.trusted_proxies))?;
    let kill = KillSwitch::new(req.conn_data::<ConnSocket>().copied());
    Ok(shared.reads.turn(kill).await?)
}

/// The fields of a room's state before its `entries`: `{"room","kind","epoch","seq"}`.
fn state_fields(room: &str, kind: &str, epoch: u64, seq: u64) -> serde_json::Map<String, Json> {
    let mut fields = serde_json::Map::new();
    fields.insert("room".into(), json!(room));
    fields.insert("kind".into(), json!(kind));
    fields.insert("epoch".into(), json!(epoch_hex(epoch)));
    fields.insert("seq".into(), json!(seq));
    fields
}

/// A 200 whose body is `fields` and then `list` holding `items`, streamed.
fn streamed(
    fields: serde_json::Map<String, Json>,
    list: &str,
    items: Box<dyn Iterator<Item = Json>>,
    turn: Turn,
) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .streaming(StreamedJson::new(object_head(&fields, list), items, turn))
}

/// A room's state as a streamed `{"room","kind","epoch","seq","entries"}` reply.
fn state_reply(
    room: &str,
    kind: &str,
    epoch: u64,
    seq: u64,
    entries: Box<dyn Iterator<Item = Json>>,
    turn: Turn,
) -> HttpResponse {
    streamed(
        state_fields(room, kind, epoch, seq),
        "entries",
        entries,
        turn,
    )
}

async fn read_room(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let room = path.into_inner();
    let identity = authorize(&req, &shared, Permission::Read, &room)?;
    let room = room_id(&room)?;
    let query = Query::parse(&req)?;
    let turn = read_turn(&req, &shared).await?;
    let viewer = identity.user.clone();
    if let Some(at) = query.at {
        // Cluster mode: time travel in a room owned elsewhere is done on its owner; the
        // turn is held until its answer is here.
        if let Some(cluster) = forwarded::elsewhere(&shared, &room) {
            return forwarded::forward(cluster, &room, &viewer, &Call::At { at }).await;
        }
        let (fields, entries) = state_at(&shared, &room, at, viewer).await?;
        return Ok(streamed(fields, "entries", entries, turn));
    }
    // Cluster mode: the state of a room owned elsewhere is read on its owner.
    if let Some(cluster) = shared.cluster.as_ref().filter(|c| !c.owns(&room)) {
        let view = crate::cluster::forward::read(cluster, &room, &viewer).await?;
        return Ok(state_reply(
            &room,
            &view.kind,
            view.epoch,
            view.seq,
            Box::new(view.entries.into_iter()),
            turn,
        ));
    }
    let read = || room_msg::Read {
        viewer: viewer.clone(),
    };
    let result = match shared.registry.get(&room).send(read()).await {
        Ok(result) => result,
        // The room stopped between lookup and send: start it again once.
        Err(_) => {
            shared
                .registry
                .get(&room)
                .send(read())
                .await
                .unwrap_or(Err(RoomError::Rejected(
                    Code::Unavailable,
                    "the room stopped before answering; retry".into(),
                )))
        }
    };
    let view = result?;
    Ok(state_reply(
        &room,
        &view.kind,
        view.epoch,
        view.seq,
        Box::new(view.entries.into_iter().map(|entry| entry_json(&entry))),
        turn,
    ))
}

async fn post_op(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let (room, msg, rx) =
        op_request(&req, &path.into_inner(), &body, &shared).inspect_err(count_refused)?;
    send_op_to_room(&shared, &room, msg).await;
    let done = wait_reply(rx).await?;
    Ok(HttpResponse::Ok().json(json!({ "seq": done.seq })))
}

/// Checks a `POST /api/rooms/{room}/ops` and builds its message to the room.
fn op_request(
    req: &HttpRequest,
    room: &str,
    body: &web::Bytes,
    shared: &Shared,
) -> Result<ToRoom<room_msg::Submit>, ApiError> {
    let identity = authorize(req, shared, Permission::Write, room)?;
    let over_rate = over_rate(req, shared, &identity);
    let room = room_id(room)?;
    let obj = parse_body(body)?;
    let op_id = match obj.get("id") {
        None | Some(Json::Null) => None,
        Some(Json::String(id)) => Some(id.clone()),
        Some(_) => return Err(ApiError::new(Code::Invalid, "`id` must be a string")),
    };
    if let Some(id) = &op_id {
        ids::check_op_id(id).map_err(|e| ApiError::new(Code::Invalid, e.to_string()))?;
    }
    // An op without a user identity is never deduplicated.
    let op_id = op_id.filter(|_| !identity.guest);
    let op = obj
        .get("op")
        .map_or(Err("missing `op`".to_owned()), to_value);
    // Refusals wait for the room only when an op id could make this a re-send.
    let refusal = match (&op, over_rate) {
        (Err(why), _) => Some(RoomError::Rejected(Code::Invalid, format!("op: {why}"))),
        (Ok(_), Some(why)) => Some(RoomError::Rejected(Code::RateLimited, why)),
        (Ok(_), None) => None,
    };
    if let (None, Some(refusal)) = (&op_id, &refusal) {
        return Err(refusal.clone().into());
    }
    let (tx, rx) = oneshot::channel();
    let msg = room_msg::Submit {
        user: identity.user,
        op_id,
        op: op.unwrap_or(crate::value::Value::Null),
        now_ms: room_msg::now_ms(),
        refusal,
        reply: ReplyTo::http(tx),
    };
    Ok((room, msg, rx))
}

/// The numeric query parameters of the read endpoints.
#[derive(Default)]
struct Query {
    at: Option<u64>,
    after: Option<u64>,
    limit: Option<u64>,
}

impl Query {
    fn parse(req: &HttpRequest) -> Result<Query, ApiError> {
        let mut query = Query::default();
        for pair in req.query_string().split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match name {
                "at" => &mut query.at,
                "after" => &mut query.after,
                "limit" => &mut query.limit,
                _ => continue,
            };
            *slot = Some(value.parse().map_err(|_| {
                ApiError::new(
                    Code::Invalid,
                    format!("`{name}` must be a non-negative integer"),
                )
            })?);
        }
        Ok(query)
    }
}

/// Runs a blocking store read off the async threads (bounded by the store's read
/// permits, shared with room loads).
async fn blocking<T: Send + 'static>(
    store: &Store,
    read: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    match store.read_blocking(read).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(ApiError::new(Code::Unavailable, e.to_string())),
        Err(e) => Err(ApiError::new(
            Code::Unavailable,
            format!("read task failed: {e}"),
        )),
    }
}

/// The fields and entries of a room's state as `viewer` may see it.
type StateParts = (
    serde_json::Map<String, Json>,
    Box<dyn Iterator<Item = Json>>,
);

/// `GET /api/rooms/{room}?at=N` on the room's owner: the state as it was at seq N,
/// rebuilt from the newest snapshot at or before N and the logged changes after it.
async fn state_at(
    shared: &Shared,
    room: &RoomId,
    at: u64,
    viewer: Arc<str>,
) -> Result<StateParts, ApiError> {
    let room_id = room.to_owned();
    let found = blocking(&shared.store, move |store| store.read_at(&room_id, at)).await?;
    let Some(found) = found else {
        return Err(ApiError::new(Code::NotFound, format!("no room {room}")));
    };
    if at > found.head {
        return Err(ApiError::new(
            Code::Invalid,
            format!("seq {at} is beyond the room's head {}", found.head),
        ));
    }
    if at == 0 {
        return Err(ApiError::new(
            Code::Invalid,
            "seq must be at least 1 (the creation)",
        ));
    }
    if !found.can_rebuild() {
        return Err(ApiError::new(
            Code::Gone,
            format!(
                "seq {at} is older than the retained log (from seq {})",
                found.first_retained
            ),
        ));
    }
    let state = crate::room::recovery::replay(found.snapshot.as_ref(), &found.events);
    drop(found.snapshot);
    drop(found.events);
    // The rebuilt state is the only copy: its entries are turned into JSON one at a
    // time as the reply streams, by key (keys are small next to values).
    let keys: Vec<String> = state
        .entries()
        .filter(|(_, slot)| slot.visible_to(&viewer))
        .map(|(key, _)| key.to_owned())
        .collect();
    let entries = keys.into_iter().filter_map(move |key| {
        let slot = state.get(&key)?;
        Some(entry_json(&crate::room::wire_entry(&key, slot)))
    });
    Ok((
        state_fields(room, &found.meta.kind, found.meta.epoch, at),
        Box::new(entries),
    ))
}

/// Most events one page of `GET /events` returns.
const MAX_EVENTS_PAGE: u64 = 1_000;

/// `GET /api/rooms/{room}/events?after=N&limit=M`: the logged events after N.
async fn read_events(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let room = path.into_inner();
    let identity = authorize(&req, &shared, Permission::Read, &room)?;
    let room = room_id(&room)?;
    let query = Query::parse(&req)?;
    let after = query.after.unwrap_or(0);
    // `limit=0` asks for no events: the reply still carries `head` (a cheap way to
    // learn it). Above the page size it is capped, as the contract says.
    let limit = query.limit.unwrap_or(100).min(MAX_EVENTS_PAGE) as usize;
    let turn = read_turn(&req, &shared).await?;
    let viewer = identity.user.clone();
    if let Some(cluster) = forwarded::elsewhere(&shared, &room) {
        let call = Call::Events {
            after,
            limit,
            admin: identity.admin,
        };
        return forwarded::forward(cluster, &room, &viewer, &call).await;
    }
    let (fields, events) =
        events_page(&shared, &room, after, limit, viewer, identity.admin).await?;
    Ok(streamed(fields, "events", events, turn))
}

/// A page of `GET /api/rooms/{room}/events` on the room's owner: `{"head"}` and the
/// events after `after` as `viewer` may see them (`admin` sees private ops).
async fn events_page(
    shared: &Shared,
    room: &RoomId,
    after: u64,
    limit: usize,
    viewer: Arc<str>,
    admin: bool,
) -> Result<StateParts, ApiError> {
    let room_id = room.clone();
    let page = blocking(&shared.store, move |store| {
        store.read_events(&room_id, after, limit)
    })
    .await?;
    let Some(page) = page else {
        return Err(ApiError::new(Code::NotFound, format!("no room {room}")));
    };
    // Only a position the log once held and no longer does is gone; `after` at or
    // beyond the head (even u64::MAX) is an empty page.
    if after < page.head && after.saturating_add(1) < page.first_retained {
        return Err(ApiError::new(
            Code::Gone,
            format!(
                "events after {after} are no longer retained (the log starts at seq {})",
                page.first_retained
            ),
        ));
    }
    // The kind says which ops are private (a poll's votes): only admins see their
    // author and body. A kind this server does not serve hides every op's.
    let kind = match admin {
        true => None,
        false => Some(page_kind(shared, room, &page).await),
    };
    let mut fields = serde_json::Map::new();
    fields.insert("head".into(), json!(page.head));
    let events = page.events.into_iter().map(move |event| {
        let op_type = event.op.get("type").and_then(|t| t.as_str());
        let private = match &kind {
            None => false,
            Some(None) => true,
            Some(Some(kind)) => kind.private_op(&event.op),
        };
        // An event that touched entries hidden from the caller shows neither its author
        // nor its op (either may tell what the hidden entries hold): only the changes
        // the caller may see, or, when it may see none, only that the event happened.
        // Admins too (with auth off every caller is one): hidden entries follow the
        // user id on every read path; `roomd log` shows the whole log.
        match event_view(&event.changes, &viewer) {
            EventView::Whole => {}
            EventView::Hidden => {
                return json!({ "seq": event.seq, "ts": event.ts_ms, "hidden": true });
            }
            EventView::Partly(seen) => {
                // Entries as in `snapshot` and `diff` (`protocol::json::entry_json`).
                let changes: Vec<Json> = seen
                    .into_iter()
                    .map(|(key, value)| match value {
                        Some(value) => json!({
                            "k": key,
                            "v": crate::protocol::json::from_value(value),
                            "ver": event.seq,
                        }),
                        None => json!({ "k": key, "ver": event.seq, "del": true }),
                    })
                    .collect();
                return json!({ "seq": event.seq, "ts": event.ts_ms, "changes": changes });
            }
        }
        if private {
            json!({ "seq": event.seq, "ts": event.ts_ms, "op": { "type": op_type } })
        } else {
            json!({
                "seq": event.seq,
                "user": event.user,
                "ts": event.ts_ms,
                "op": crate::protocol::json::from_value(&event.op),
            })
        }
    });
    Ok((fields, Box::new(events)))
}

/// The room's kind, from its creation event when the page holds it, else from the room;
/// `None` when it is not a kind this server serves.
async fn page_kind(shared: &Shared, room: &RoomId, page: &EventsPage) -> Option<KindRef> {
    let kinds = &shared.room_config.kinds;
    if let Some(first) = page.events.first().filter(|e| e.seq == 1) {
        return first
            .op
            .get("kind")
            .and_then(|k| k.as_str())
            .and_then(|name| kinds.get(name))
            .cloned();
    }
    let read = room_msg::Read {
        viewer: Arc::from("server"),
    };
    match shared.registry.get(room).send(read).await {
        Ok(Ok(view)) => kinds.get(&view.kind).cloned(),
        _ => None,
    }
}

/// `DELETE /api/rooms/{room}` (admin only when auth is on): 204 once the room, its log,
/// snapshots and op ids are gone.
async fn delete_room(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let room = path.into_inner();
    require_admin(&req, &shared)?;
    let room = room_id(&room)?;
    if let Some(cluster) = forwarded::elsewhere(&shared, &room) {
        return forwarded::forward(cluster, &room, "", &Call::Delete).await;
    }
    delete(&shared, &room).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Deletes a room this node owns.
async fn delete(shared: &Arc<Shared>, room: &RoomId) -> Result<(), ApiError> {
    let (tx, rx) = oneshot::channel();
    send_to_room(shared, room, room_msg::Delete { reply: tx }).await;
    match rx.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(ApiError::new(
            Code::Unavailable,
            "the room stopped before answering; retry",
        )),
    }
}

/// Sends to a room, restarting it once if it stopped; a message lost anyway answers
/// through its dropped `ReplyTo`.
/// An op or create to its room: [`send_to_room`] on the room's owner, forwarded to the
/// owner over NATS elsewhere (cluster mode); either way answered through its `ReplyTo`.
async fn send_op_to_room<M>(shared: &Arc<Shared>, room: &RoomId, msg: M)
where
    M: actix::Message<Result = ()>
        + crate::cluster::rpc::Forwardable
        + crate::room::messages::Queued
        + Send
        + 'static,
    crate::room::Room: actix::Handler<M>,
{
    match shared.cluster.as_ref().filter(|c| !c.owns(room)) {
        Some(cluster) => crate::cluster::forward::forward_one(cluster, room, msg).await,
        // Waits while the room holds its most unanswered ops (`room/backlog.rs`).
        None => {
            if let crate::room::registry::Delivery::Wait(wait) = shared.registry.deliver(room, msg)
            {
                wait.await;
            }
        }
    }
}

async fn send_to_room<M>(shared: &Arc<Shared>, room: &RoomId, msg: M)
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

/// `POST /api/rooms/{room}/signal` `{"data":…}` (admin): 202, and a `signal` from user
/// `server` to every subscriber of the room (in cluster mode sent by its owner, so
/// subscribers on every node get it). A room that is not loaded has no subscribers, so
/// it is not loaded for this.
async fn signal_room(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let room = path.into_inner();
    require_admin(&req, &shared)?;
    let room = room_id(&room)?;
    let obj = parse_body(&body)?;
    let data = obj
        .get("data")
        .map_or(Ok(crate::value::Value::Null), to_value)
        .map_err(|why| ApiError::new(Code::Invalid, format!("data: {why}")))?;
    let size = data.json_size();
    let limit = shared.room_config.max_signal_bytes;
    if size > limit {
        return Err(ApiError::new(
            Code::TooLarge,
            format!("signal of {size} bytes exceeds limit of {limit}"),
        ));
    }
    if let Some(cluster) = forwarded::elsewhere(&shared, &room) {
        let data = crate::protocol::json::from_value(&data);
        return forwarded::forward(cluster, &room, "", &Call::Signal { data }).await;
    }
    signal(&shared, &room, data);
    Ok(HttpResponse::Accepted().json(json!({})))
}

/// A signal from user `server` to the subscribers of a room this node owns (on every
/// node: remote subscribers are the room's too).
fn signal(shared: &Shared, room: &RoomId, data: crate::value::Value) {
    if let Some(addr) = shared.registry.live(room) {
        // Like a member's signal: dropped when the room's mailbox is full.
        let _ = addr.try_send(room_msg::Signal {
            session_id: room_msg::SERVER_SESSION,
            user: Arc::from(crate::auth::API_KEY_USER),
            data,
        });
    }
}

/// `POST /api/users/{user}/disconnect` (admin): closes every WebSocket connection of
/// the user with 4403 and answers `{"closed":N}`. In cluster mode every node closes its
/// own and `closed` is the sum, with `"partial"` as in the room list (a node that did
/// not answer closed nothing it told of).
async fn disconnect_user(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let user = path.into_inner();
    require_admin(&req, &shared)?;
    let mut closed = disconnect(&shared, &user);
    let Some(cluster) = &shared.cluster else {
        return Ok(HttpResponse::Ok().json(json!({ "closed": closed })));
    };
    let call = Call::Disconnect { user: user.clone() };
    // The member list in force (a rebalance changes it).
    let members = cluster.members().members().nodes;
    let others = members.iter().filter(|node| *node != cluster.node_id());
    let answers = futures_util::future::join_all(others.map(|node| {
        let call = &call;
        async move { (node, forwarded::ask(cluster, node, "", "", call).await) }
    }))
    .await;
    let mut missing = Vec::new();
    for (node, answer) in answers {
        match answer {
            Ok(body) => closed += body["closed"].as_u64().unwrap_or(0) as usize,
            Err(e) => missing.push(json!({ "node": node, "msg": e.to_string() })),
        }
    }
    let mut body = json!({ "closed": closed, "partial": !missing.is_empty() });
    if !missing.is_empty() {
        body["missing"] = json!(missing);
    }
    Ok(HttpResponse::Ok().json(body))
}

/// Closes this node's WebSocket connections (and streams) of `user` with 4403; how many.
fn disconnect(shared: &Shared, user: &str) -> usize {
    // Collected first: no map guard is held while closing.
    let targets: Vec<_> = shared
        .sessions
        .iter()
        .filter(|entry| *entry.value().user == *user)
        .map(|entry| entry.value().outbound.clone())
        .collect();
    for outbound in &targets {
        outbound.close(
            crate::protocol::codes::close::DISCONNECTED,
            "disconnected by an admin",
        );
    }
    targets.len()
}
