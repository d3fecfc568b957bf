//! The WebSocket upgrade: `/ws` (rooms) and `/ws/echo` (conformance testing).
//!
//! Both go through the same path: Origin check, subprotocol choice, identity, the
//! handshake (actix-http's), the [`frame_guard`] in front of the message decoder
//! ([`messages`](super::messages)), and the byte-bounded outbound queue as the response
//! body. Every close, whoever starts it, is
//! [`Outbound::close`]: the body sends the close frame, drains the inbound side until the
//! client's close frame (or 2 s), then ends; a [`KillSwitch`] cuts the socket of a
//! client that does not read.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::{Actor, AsyncContext};
use actix_http::ws::{CloseReason, ProtocolError};
use actix_web::dev::Payload as DevPayload;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;

use super::frame_guard::{self, GuardHandle};
use super::messages::{ClientMessage, ClientMessages};
use super::Session;
use crate::auth::origin_allowed;
use crate::outbound::{
    Charge, ConnSocket, Frame, KillSwitch, OpenConnection, Outbound, OutboundBody, SessionRef,
};
use crate::protocol::codes::close;
use crate::protocol::{Encoding, SUBPROTOCOL_JSON, SUBPROTOCOL_RKYV};
use crate::shared::Shared;

/// The subprotocol a client asked for: None when it offered only others (HTTP 400).
fn choose_encoding(req: &HttpRequest) -> Option<(Encoding, Option<&'static str>)> {
    let mut offered = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .peekable();
    if offered.peek().is_none() {
        return Some((Encoding::Json, None));
    }
    // The client's order is its preference.
    offered.find_map(|p| match p {
        SUBPROTOCOL_JSON => Some((Encoding::Json, Some(SUBPROTOCOL_JSON))),
        SUBPROTOCOL_RKYV => Some((Encoding::Rkyv, Some(SUBPROTOCOL_RKYV))),
        _ => None,
    })
}

fn error_response(status: u16, code: &str, msg: impl Into<String>) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(status)
        .unwrap_or(actix_web::http::StatusCode::BAD_REQUEST);
    HttpResponse::build(status).json(serde_json::json!({ "code": code, "msg": msg.into() }))
}

/// What an accepted upgrade hands to the connection's owner.
struct Upgraded {
    response: HttpResponse,
    outbound: Arc<Outbound>,
    messages: ClientMessages<DevPayload>,
    guard: GuardHandle,
}

/// Performs the upgrade with the frame guard in front and the writer task started.
fn upgrade(
    req: &HttpRequest,
    payload: web::Payload,
    protocol: Option<&'static str>,
    shared: &Shared,
) -> Result<Upgraded, actix_web::Error> {
    let mut handshake = actix_http::ws::handshake(req.head())?;
    if let Some(protocol) = protocol {
        handshake.insert_header((header::SEC_WEBSOCKET_PROTOCOL, protocol));
    }
    // From here the connection is a WebSocket: the WebSocket caps count it, not the
    // HTTP connection cap it was held to while it was a request.
    if let Some(slot) = req.conn_data::<crate::admission::http_conns::ConnSlot>() {
        slot.release();
    }
    let max = shared.config.max_frame;
    let (guarded, drain, guard) = frame_guard::guard(payload.into_inner(), max);
    let kill = KillSwitch::new(req.conn_data::<ConnSocket>().copied());
    let outbound = Outbound::new(shared.config.outbound_queue, kill);
    let open = OpenConnection::new(&shared.open_connections);
    let body = OutboundBody::new(outbound.clone(), drain, open);
    let response = HttpResponse::from(handshake.message_body(body)?).map_into_boxed_body();
    Ok(Upgraded {
        response,
        outbound,
        messages: ClientMessages::new(guarded, max),
        guard,
    })
}

/// `GET /ws`: a room session.
pub async fn ws_rooms(
    req: HttpRequest,
    payload: web::Payload,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, actix_web::Error> {
    let shared = shared.into_inner();
    if shared.shutting_down.load(Ordering::Acquire) {
        return Ok(error_response(503, "unavailable", "server shutting down"));
    }
    if !origin_allowed(&req, &shared.config.allowed_origins) {
        return Ok(error_response(
            403,
            "forbidden",
            "Origin does not match Host and is not in --allowed-origins",
        ));
    }
    let Some((encoding, protocol)) = choose_encoding(&req) else {
        return Ok(error_response(
            400,
            "invalid",
            format!("offer {SUBPROTOCOL_JSON} or {SUBPROTOCOL_RKYV}"),
        ));
    };
    let identity = shared.auth.identify(&req, false);
    if let Err(e) = &identity {
        if e.is_invalid_user() && !shared.auth.enabled() {
            return Ok(error_response(400, "invalid", e.to_string()));
        }
    }
    let up = upgrade(&req, payload, protocol, &shared)?;
    let identity = match identity {
        Ok(identity) => identity,
        Err(e) => {
            // The contract answers a bad token on the socket: close 4401.
            up.outbound.close(close::UNAUTHORIZED, e.to_string());
            super::count_close(Some(close::UNAUTHORIZED));
            return Ok(up.response);
        }
    };
    let client_ip = crate::proxy::client_ip(&req, &shared.config.trusted_proxies);
    let permit = match shared.admission.admit(client_ip) {
        Ok(permit) => permit,
        Err(refused) => {
            up.outbound.close(close::TOO_MANY, refused.to_string());
            super::count_close(Some(close::TOO_MANY));
            return Ok(up.response);
        }
    };
    let session_ref = SessionRef {
        session_id: shared.next_session_id.fetch_add(1, Ordering::Relaxed),
        user: identity.user.clone(),
        dedup: !identity.guest,
        encoding,
        outbound: up.outbound,
        member: true,
        evicted: Default::default(),
    };
    let guard = up.guard;
    let messages = up.messages;
    Session::create(move |ctx| {
        ctx.add_stream(messages);
        Session::new(session_ref, shared, guard, identity, permit, client_ip)
    });
    Ok(up.response)
}

/// The close code for a failed inbound stream.
pub fn close_for(err: &ProtocolError, guard: &GuardHandle, max_frame: usize) -> (u16, String) {
    match (guard.violation(), err) {
        (Some(violation), _) => (close::TOO_LARGE, violation.to_string()),
        (None, ProtocolError::Overflow) => (
            close::TOO_LARGE,
            format!("message exceeds limit of {max_frame} bytes"),
        ),
        // actix-http reports both bad UTF-8 and non-zero reserved bits as `InvalidData`;
        // only its text tells them apart (RSV bits are a protocol error, 1002).
        (None, ProtocolError::Io(e))
            if e.kind() == std::io::ErrorKind::InvalidData
                && !e.to_string().contains("reserved bits") =>
        {
            (
                close::INVALID_UTF8,
                "invalid UTF-8 in a text frame".to_owned(),
            )
        }
        (None, other) => (close::PROTOCOL_ERROR, other.to_string()),
    }
}

/// The code to answer a client's close with: its own code when valid (RFC 6455 7.4),
/// 1000 when it sent none, 1002 for a code no endpoint may send.
pub fn reply_close_code(reason: Option<&CloseReason>) -> u16 {
    let Some(reason) = reason else { return 1000 };
    let code = u16::from(reason.code);
    match code {
        1000..=1003 | 1007..=1011 | 3000..=4999 => code,
        _ => close::PROTOCOL_ERROR,
    }
}

/// `GET /ws/echo` (only with `--enable-echo`): echoes every message through the same
/// guard, limits and writer as `/ws`. Exists for the Autobahn conformance suite.
pub async fn ws_echo(
    req: HttpRequest,
    payload: web::Payload,
    shared: web::Data<Shared>,
) -> Result<HttpResponse, actix_web::Error> {
    let shared = shared.into_inner();
    let up = upgrade(&req, payload, None, &shared)?;
    let Upgraded {
        response,
        outbound,
        mut messages,
        guard,
    } = up;
    let max = shared.config.max_frame;
    actix_rt::spawn(async move {
        while let Some(item) = messages.next().await {
            let frame = match item {
                Ok(ClientMessage::Text(text)) => Frame::text(text.into_bytes()),
                Ok(ClientMessage::Binary(bytes)) => Frame::binary(bytes),
                Ok(ClientMessage::Ping(bytes)) => Frame::Pong(bytes),
                Ok(ClientMessage::Pong(_)) => continue,
                Ok(ClientMessage::Close(reason)) => {
                    outbound.close(reply_close_code(reason.as_ref()), "");
                    return;
                }
                Err(err) => {
                    let (code, reason) = close_for(&err, &guard, max);
                    outbound.close(code, reason);
                    return;
                }
            };
            outbound.push(frame, Charge::Full);
        }
        if let Some(violation) = guard.violation() {
            outbound.close(close::TOO_LARGE, violation.to_string());
        } else {
            outbound.close(1000, "");
        }
    });
    Ok(response)
}
