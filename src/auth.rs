//! Who a caller is: JWT (HS256) when a secret is configured, `?user=` otherwise.
//!
//! Also the browser Origin check of the upgrade. This module only decides; the upgrade
//! and HTTP handlers turn its errors into 4401 / 401 / 403.

use std::collections::HashMap;
use std::sync::Arc;

use actix_web::http::header;
use actix_web::HttpRequest;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Longest user id (PROTOCOL.md "Identity").
pub const MAX_USER_ID: usize = 128;

/// The caller of a request or connection.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: Arc<str>,
    pub admin: bool,
    /// A generated guest id: its ops are never deduplicated.
    pub guest: bool,
    /// The token's `exp`, in seconds since the epoch.
    pub expires_at: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing token (use ?token= or Authorization: Bearer)")]
    MissingToken,
    #[error("bad token: {0}")]
    BadToken(String),
    #[error("user id of {0} bytes exceeds limit of {MAX_USER_ID}")]
    UserTooLong(usize),
    #[error("empty user id")]
    EmptyUser,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    admin: bool,
}

/// Checks tokens, or hands out user ids when auth is off.
pub struct Auth {
    /// None: auth off.
    key: Option<(DecodingKey, Validation)>,
}

impl Auth {
    pub fn new(secret: Option<&str>) -> Auth {
        Auth {
            key: secret.map(|secret| {
                let mut validation = Validation::new(Algorithm::HS256);
                // `exp` is honoured when present, to the second: no leeway.
                validation.required_spec_claims.clear();
                validation.leeway = 0;
                validation.validate_exp = true;
                (DecodingKey::from_secret(secret.as_bytes()), validation)
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        self.key.is_some()
    }

    /// Identifies a request. `user_header` lets HTTP callers use `X-Roomd-User`.
    pub fn identify(&self, req: &HttpRequest, user_header: bool) -> Result<Identity, AuthError> {
        let query = query_map(req);
        match &self.key {
            Some((key, validation)) => {
                let token = query
                    .get("token")
                    .cloned()
                    .or_else(|| bearer(req))
                    .ok_or(AuthError::MissingToken)?;
                let data = jsonwebtoken::decode::<Claims>(&token, key, validation)
                    .map_err(|e| AuthError::BadToken(e.to_string()))?;
                let user = check_user(&data.claims.sub)?;
                Ok(Identity {
                    user,
                    admin: data.claims.admin,
                    guest: false,
                    expires_at: data.claims.exp,
                })
            }
            None => {
                let named = query.get("user").cloned().or_else(|| {
                    user_header
                        .then(|| {
                            req.headers()
                                .get("x-roomd-user")?
                                .to_str()
                                .ok()
                                .map(str::to_owned)
                        })
                        .flatten()
                });
                match named {
                    Some(user) => Ok(Identity {
                        user: check_user(&user)?,
                        admin: true,
                        guest: false,
                        expires_at: None,
                    }),
                    None => Ok(Identity {
                        user: Arc::from(format!("guest-{:012x}", rand::random::<u64>() >> 16)),
                        admin: true,
                        guest: true,
                        expires_at: None,
                    }),
                }
            }
        }
    }
}

fn check_user(user: &str) -> Result<Arc<str>, AuthError> {
    if user.is_empty() {
        return Err(AuthError::EmptyUser);
    }
    if user.len() > MAX_USER_ID {
        return Err(AuthError::UserTooLong(user.len()));
    }
    Ok(Arc::from(user))
}

fn bearer(req: &HttpRequest) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim().to_owned())
}

fn query_map(req: &HttpRequest) -> HashMap<String, String> {
    actix_web::web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .map(|q| q.into_inner())
        .unwrap_or_default()
}

/// The browser Origin rule: no Origin is fine; otherwise it must name this host, or be
/// listed in `--allowed-origins` (compared without a trailing slash, case-insensitively).
pub fn origin_allowed(req: &HttpRequest, allowed: &[String]) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim_end_matches('/');
    if allowed
        .iter()
        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    matches!(host, Some(host) if host.eq_ignore_ascii_case(origin_host))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    #[test]
    fn origin_must_match_host_or_be_listed() {
        let req = TestRequest::default()
            .insert_header((header::HOST, "127.0.0.1:8080"))
            .insert_header((header::ORIGIN, "http://127.0.0.1:8080"))
            .to_http_request();
        assert!(origin_allowed(&req, &[]));
        let evil = TestRequest::default()
            .insert_header((header::HOST, "127.0.0.1:8080"))
            .insert_header((header::ORIGIN, "https://evil.example"))
            .to_http_request();
        assert!(!origin_allowed(&evil, &[]));
        assert!(origin_allowed(&evil, &["https://evil.example/".into()]));
        let none = TestRequest::default().to_http_request();
        assert!(origin_allowed(&none, &[]));
    }

    #[test]
    fn tokens_give_the_user_and_expire() {
        use jsonwebtoken::{encode, EncodingKey, Header};
        let auth = Auth::new(Some("s3cret"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let token = |exp: u64| {
            let claims = serde_json::json!({ "sub": "alice", "exp": exp });
            encode(
                &Header::default(),
                &claims,
                &EncodingKey::from_secret(b"s3cret"),
            )
            .unwrap_or_default()
        };
        let ok = TestRequest::default()
            .uri(&format!("/ws?token={}", token(now + 60)))
            .to_http_request();
        assert_eq!(
            &*auth
                .identify(&ok, false)
                .map(|i| i.user)
                .unwrap_or_else(|_| "".into()),
            "alice"
        );
        let expired = TestRequest::default()
            .uri(&format!("/ws?token={}", token(now - 5)))
            .to_http_request();
        assert!(auth.identify(&expired, false).is_err());
        let missing = TestRequest::default().uri("/ws").to_http_request();
        assert!(matches!(
            auth.identify(&missing, false),
            Err(AuthError::MissingToken)
        ));
    }
}
