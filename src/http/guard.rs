//! What every HTTP request passes before a handler sees it, and what every error reply
//! looks like after.
//!
//! In order: the connection's place in the per-IP cap
//! ([`crate::admission::http_conns`]; over it: 429 and close), the Host allow-list (against DNS rebinding on a loopback bind; 403),
//! the Origin rule on writes (the upgrade's rule, `auth::origin_allowed`; 403), JSON as
//! the only body type (415), and a deadline on the body (`--body-timeout`; 408 and
//! close). After the handler, an error reply that is not already the contract's
//! `{"code","msg"}` (actix's own 404, 405, 413, JSON and payload errors) is rewritten
//! into it. The handlers themselves (`http.rs`) and the upgrade (`session::upgrade`)
//! know nothing of this.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_http::{BoxedPayloadStream, ConnectionType};
use actix_web::body::BoxBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, HttpResponse};
use bytes::Bytes;
use futures_util::Stream;
use serde_json::json;

use crate::admission::http_conns::ConnSlot;
use crate::auth::origin_allowed;
use crate::protocol::codes::Code;
use crate::shared::Shared;

/// The middleware (`actix_web::middleware::from_fn(guard::check)`).
pub async fn check(
    mut req: ServiceRequest,
    next: Next<BoxBody>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let Some(shared) = req.app_data::<web::Data<Shared>>().cloned() else {
        // Every app in `server.rs` registers `Shared`; without it there is nothing to
        // check against, and the handlers fail on their own extractor.
        return next.call(req).await;
    };
    let config = &shared.config;
    let path = req.path().to_owned();
    let slot = req.conn_data::<ConnSlot>();
    if let Some(slot) = slot {
        slot.mark_request();
    }
    let over_cap = slot.is_some_and(ConnSlot::refused);
    if over_cap && !exempt_from_cap(&path) {
        let max = shared.http_conns.max_per_ip();
        return Ok(refuse(
            req,
            StatusCode::TOO_MANY_REQUESTS,
            Code::RateLimited,
            format!(
                "this address has {max} open HTTP connections (--max-http-conns-per-ip); \
                 retry on one of them or after one closes"
            ),
            true,
        ));
    }
    if config.check_host && !host_allowed(&req, &config.allowed_hosts) {
        let host = header_str(&req, header::HOST)
            .unwrap_or_default()
            .to_owned();
        return Ok(refuse(
            req,
            StatusCode::FORBIDDEN,
            Code::Forbidden,
            format!(
                "Host `{host}` is not served here: use localhost, 127.0.0.1 or [::1], \
                 or list it in --allowed-hosts"
            ),
            over_cap,
        ));
    }
    let writes = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if writes && !origin_allowed(req.request(), &config.allowed_origins) {
        return Ok(refuse(
            req,
            StatusCode::FORBIDDEN,
            Code::Forbidden,
            "Origin does not match Host and is not in --allowed-origins",
            over_cap,
        ));
    }
    let timed_out = if has_body(&req) {
        if !is_json(&req) {
            let given = header_str(&req, header::CONTENT_TYPE)
                .unwrap_or("none")
                .to_owned();
            return Ok(refuse(
                req,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Code::Invalid,
                format!("a body must be Content-Type: application/json (got {given})"),
                over_cap,
            ));
        }
        let fired = Rc::new(Cell::new(false));
        let payload = req.take_payload();
        let limited = BodyDeadline {
            inner: payload,
            sleep: Box::pin(tokio::time::sleep(config.body_timeout)),
            fired: fired.clone(),
        };
        req.set_payload(Payload::from(Box::pin(limited) as BoxedPayloadStream));
        Some(fired)
    } else {
        None
    };

    let mut res = next.call(req).await?;
    if timed_out.is_some_and(|fired| fired.get()) {
        let (req, _) = res.into_parts();
        let msg = format!(
            "the request body did not arrive within {} (--body-timeout)",
            seconds(config.body_timeout)
        );
        return Ok(refuse_parts(
            req,
            StatusCode::REQUEST_TIMEOUT,
            Code::Invalid,
            msg,
            true,
        ));
    }
    if res.status().as_u16() >= 400 && !is_json_reply(&res) {
        res = as_contract_error(res, config.max_frame);
    }
    if over_cap {
        res.response_mut()
            .head_mut()
            .set_connection_type(ConnectionType::Close);
    }
    Ok(res)
}

/// Requests a connection over the per-IP cap may still make: health checks (cheap, no
/// body, and what an operator needs most while an address misbehaves) and upgrades
/// (counted by the WebSocket caps, which answer 4429 themselves).
fn exempt_from_cap(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/ws" | "/ws/echo")
}

fn header_str(req: &ServiceRequest, name: header::HeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Whether the request says it carries a body (a WebSocket upgrade's stream is not a
/// body: it is never given a deadline).
fn has_body(req: &ServiceRequest) -> bool {
    if req.headers().contains_key(header::UPGRADE) {
        return false;
    }
    let length = header_str(req, header::CONTENT_LENGTH).map(str::trim);
    match length {
        Some(length) => length != "0",
        None => req.headers().contains_key(header::TRANSFER_ENCODING),
    }
}

/// `application/json`, with any parameters (`; charset=utf-8`).
fn is_json(req: &ServiceRequest) -> bool {
    header_str(req, header::CONTENT_TYPE).is_some_and(|value| {
        value
            .split(';')
            .next()
            .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
    })
}

fn is_json_reply(res: &ServiceResponse<BoxBody>) -> bool {
    res.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"))
}

/// The Host rule: on a loopback bind (or with `--allowed-hosts`), the Host's name must
/// be a loopback name or listed. A request without Host (HTTP/1.0, not a browser) is
/// served: DNS rebinding needs a browser, and browsers always send Host.
fn host_allowed(req: &ServiceRequest, allowed: &[String]) -> bool {
    let Some(host) = req.headers().get(header::HOST) else {
        return true;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = host_name(host);
    is_loopback_name(name)
        || allowed
            .iter()
            .any(|a| a == "*" || host_name(a).eq_ignore_ascii_case(name))
}

/// The name part of a Host value: without the port, brackets kept for IPv6, without a
/// trailing dot.
fn host_name(host: &str) -> &str {
    let host = host.trim();
    let name = if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    name.strip_suffix('.').unwrap_or(name)
}

fn is_loopback_name(name: &str) -> bool {
    name.eq_ignore_ascii_case("localhost")
        || name == "[::1]"
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A `{"code","msg"}` answer instead of calling the handler.
fn refuse(
    req: ServiceRequest,
    status: StatusCode,
    code: Code,
    msg: impl Into<String>,
    close: bool,
) -> ServiceResponse<BoxBody> {
    let (req, _) = req.into_parts();
    refuse_parts(req, status, code, msg, close)
}

fn refuse_parts(
    req: actix_web::HttpRequest,
    status: StatusCode,
    code: Code,
    msg: impl Into<String>,
    close: bool,
) -> ServiceResponse<BoxBody> {
    let mut builder = HttpResponse::build(status);
    if close {
        builder.force_close();
    }
    let response = builder.json(json!({ "code": code.as_str(), "msg": msg.into() }));
    ServiceResponse::new(req, response)
}

/// The contract code of an error status that a handler did not pick itself.
fn code_for(status: StatusCode) -> Code {
    match status.as_u16() {
        401 | 403 => Code::Forbidden,
        404 => Code::NotFound,
        409 => Code::Conflict,
        410 => Code::Gone,
        413 => Code::TooLarge,
        429 => Code::RateLimited,
        500.. => Code::Unavailable,
        _ => Code::Invalid,
    }
}

/// Rewrites an error reply made by actix (or any non-JSON one) into `{"code","msg"}`,
/// keeping its status and headers such as `Allow`. `max_body` names the limit in a 413.
fn as_contract_error(res: ServiceResponse<BoxBody>, max_body: usize) -> ServiceResponse<BoxBody> {
    let status = res.status();
    let msg = match (res.response().error(), status) {
        (_, StatusCode::PAYLOAD_TOO_LARGE) => {
            format!("the body exceeds limit of {max_body} bytes")
        }
        (Some(err), _) => err.to_string(),
        (None, StatusCode::NOT_FOUND) => {
            format!(
                "no such endpoint: {} {}",
                res.request().method(),
                res.request().path()
            )
        }
        (None, StatusCode::METHOD_NOT_ALLOWED) => format!(
            "{} is not allowed on {}",
            res.request().method(),
            res.request().path()
        ),
        (None, status) => status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_owned(),
    };
    let (req, old) = res.into_parts();
    let mut response =
        HttpResponse::build(status).json(json!({ "code": code_for(status).as_str(), "msg": msg }));
    for (name, value) in old.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            response.headers_mut().insert(name.clone(), value.clone());
        }
    }
    if old.head().connection_type() == ConnectionType::Close {
        response
            .head_mut()
            .set_connection_type(ConnectionType::Close);
    }
    ServiceResponse::new(req, response.map_into_boxed_body())
}

fn seconds(duration: Duration) -> String {
    format!("{} s", duration.as_secs_f64())
}

/// The request body, cut off at the deadline: after it, the stream ends with an error
/// (the handler's read fails) and `fired` tells the middleware to answer 408.
struct BodyDeadline {
    inner: Payload,
    sleep: Pin<Box<tokio::time::Sleep>>,
    fired: Rc<Cell<bool>>,
}

impl Stream for BodyDeadline {
    type Item = Result<Bytes, actix_web::error::PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.fired.get() {
            return Poll::Ready(None);
        }
        if let Poll::Ready(item) = Pin::new(&mut self.inner).poll_next(cx) {
            return Poll::Ready(item);
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.fired.set(true);
            return Poll::Ready(Some(Err(actix_web::error::PayloadError::Io(
                std::io::Error::new(std::io::ErrorKind::TimedOut, "request body timed out"),
            ))));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_lose_their_port_and_trailing_dot() {
        assert_eq!(host_name("localhost:8080"), "localhost");
        assert_eq!(host_name("127.0.0.1"), "127.0.0.1");
        assert_eq!(host_name("[::1]:8080"), "[::1]");
        assert_eq!(host_name("evil.example.:80"), "evil.example");
        assert!(is_loopback_name("LOCALHOST"));
        assert!(is_loopback_name("127.0.0.1"));
        assert!(is_loopback_name("[::1]"));
        assert!(!is_loopback_name("evil.example"));
        assert!(!is_loopback_name("127.0.0.1.evil.example"));
    }

    #[test]
    fn error_statuses_map_to_contract_codes() {
        assert_eq!(code_for(StatusCode::NOT_FOUND), Code::NotFound);
        assert_eq!(code_for(StatusCode::PAYLOAD_TOO_LARGE), Code::TooLarge);
        assert_eq!(code_for(StatusCode::METHOD_NOT_ALLOWED), Code::Invalid);
        assert_eq!(code_for(StatusCode::UNSUPPORTED_MEDIA_TYPE), Code::Invalid);
        assert_eq!(
            code_for(StatusCode::INTERNAL_SERVER_ERROR),
            Code::Unavailable
        );
    }
}
