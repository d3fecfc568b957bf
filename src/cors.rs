//! CORS for the HTTP API and the SSE stream (PROTOCOL.md 1.1): pages served from an
//! origin in `--allowed-origins` may call them from the browser.
//!
//! A listed origin gets `Access-Control-Allow-Origin` (its own value, with `Vary:
//! Origin`) on every answer, and its preflight (`OPTIONS` with
//! `Access-Control-Request-Method`) is answered 204 before routing. An unlisted
//! origin's preflight is refused 403 `forbidden`; its simple requests are served
//! without CORS headers, so the browser withholds the answer from the page. Same-origin
//! pages send no preflight and need nothing. `/ws` keeps its own Origin rule (`auth`).

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method};
use actix_web::middleware::Next;
use actix_web::{web, HttpResponse};

use crate::shared::Shared;

/// Methods the HTTP API answers.
const METHODS: &str = "GET, POST, DELETE, OPTIONS";
/// Request headers a cross-origin page may send.
const HEADERS: &str = "authorization, content-type, last-event-id, x-roomd-user, x-roomd-api-key";
/// How long a browser may cache a preflight answer, in seconds.
const MAX_AGE: &str = "600";

/// True when `origin` is in the allowed list (compared as the upgrade's rule does).
fn listed(origin: &str, allowed: &[String]) -> bool {
    let origin = origin.trim_end_matches('/');
    allowed
        .iter()
        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
}

/// The middleware (`actix_web::middleware::from_fn`).
pub async fn cors(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_owned);
    let Some(origin) = origin.filter(|_| !req.path().starts_with("/ws")) else {
        return Ok(next.call(req).await?.map_into_left_body());
    };
    let allowed = req
        .app_data::<web::Data<Shared>>()
        .is_some_and(|shared| listed(&origin, &shared.config.allowed_origins));
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight {
        let response = if allowed {
            HttpResponse::NoContent()
                .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin))
                .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, METHODS))
                .insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, HEADERS))
                .insert_header((header::ACCESS_CONTROL_MAX_AGE, MAX_AGE))
                .insert_header((header::VARY, "Origin"))
                .finish()
        } else {
            HttpResponse::Forbidden().json(serde_json::json!({
                "code": "forbidden",
                "msg": "origin not in --allowed-origins",
            }))
        };
        return Ok(req.into_response(response).map_into_right_body());
    }
    let mut res = next.call(req).await?;
    if allowed {
        let headers = res.headers_mut();
        if let Ok(value) = header::HeaderValue::from_str(&origin) {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
            headers.append(header::VARY, header::HeaderValue::from_static("Origin"));
        }
    }
    Ok(res.map_into_left_body())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_match_without_case_or_trailing_slash() {
        let allowed = vec!["https://App.example.com/".to_owned()];
        assert!(listed("https://app.example.com", &allowed));
        assert!(!listed("https://evil.example", &allowed));
        assert!(!listed("https://app.example.com", &[]));
    }
}
