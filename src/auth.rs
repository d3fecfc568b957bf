//! Who a caller is and what it may do: JWT verification (HMAC secret, one PEM public
//! key, or a JWKS), the `rooms` claims compiled into [`Grants`], guests under
//! `--public-read` / `--public-write`, the HTTP API key, and `?user=` when auth is off.
//!
//! Also the browser Origin check of the upgrade. This module only decides; the upgrade,
//! the Session and the HTTP handlers turn its answers into 4401 / 401 / 403 and
//! `forbidden`. Architecture invariant: permissions are decided where a request enters
//! (a `sub`, an `op`, an HTTP call), once; nothing on the delivery path of a diff asks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix_web::http::header;
use actix_web::HttpRequest;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::RwLock;
use serde::Deserialize;

/// Longest user id (PROTOCOL.md "Identity").
pub const MAX_USER_ID: usize = 128;

/// How far in the future a token's `nbf` may lie (clock skew between issuer and us).
pub const NBF_LEEWAY_SECS: u64 = 30;

/// The user of an HTTP request made with the API key and no `X-Roomd-User`.
pub const API_KEY_USER: &str = "server";

/// The three permissions a `rooms` claim grants (PROTOCOL.md 1.1 "Access control").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// `sub`, `GET /api/rooms/{room}` (also `?at=`), `/events`, `/stream`.
    Read,
    /// `op`, `signal`, `POST /api/rooms/{room}/ops`.
    Write,
    /// `create`, `POST /api/rooms`.
    Create,
}

/// One compiled room pattern: the literal runs between its `*`s, with `{sub}` already
/// replaced by the user id (so a `*` inside a user id matches only itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// The runs between stars; one run means no star (exact match).
    parts: Vec<Box<str>>,
}

impl Pattern {
    /// Compiles `pattern` for the user `sub`.
    pub fn compile(pattern: &str, sub: &str) -> Pattern {
        Pattern {
            parts: pattern
                .split('*')
                .map(|part| part.replace("{sub}", sub).into_boxed_str())
                .collect(),
        }
    }

    /// Whether the room id matches: the first run is a prefix, the last a suffix, and
    /// the runs between occur in order without overlapping. Leftmost matching of each
    /// middle run is enough, since a star can absorb whatever lies between.
    pub fn matches(&self, room: &str) -> bool {
        let (first, rest) = match self.parts.split_first() {
            Some(split) => split,
            None => return false,
        };
        let Some((last, middle)) = rest.split_last() else {
            return room == &**first;
        };
        if room.len() < first.len() + last.len()
            || !room.starts_with(&**first)
            || !room.ends_with(&**last)
        {
            return false;
        }
        let mut inner = &room[first.len()..room.len() - last.len()];
        for part in middle {
            match inner.find(&**part) {
                Some(at) => inner = &inner[at + part.len()..],
                None => return false,
            }
        }
        true
    }
}

/// What one caller may do, compiled once per token (or per guest): its own patterns
/// and the server's public ones.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    /// Holds every permission on every room.
    pub admin: bool,
    read: Vec<Pattern>,
    write: Vec<Pattern>,
    create: Vec<Pattern>,
}

impl Grants {
    /// Every permission (auth off, admin tokens, the API key).
    pub fn all() -> Grants {
        Grants {
            admin: true,
            ..Grants::default()
        }
    }

    fn compile(sub: &str, rooms: &RoomsClaim, public: &PublicPatterns) -> Grants {
        let compile = |own: &[String], public: &[String]| {
            own.iter()
                .chain(public)
                .map(|p| Pattern::compile(p, sub))
                .collect()
        };
        Grants {
            admin: false,
            read: compile(&rooms.read, &public.read),
            write: compile(&rooms.write, &public.write),
            create: compile(&rooms.create, &[]),
        }
    }

    /// Whether this caller holds `permission` on `room`.
    pub fn allows(&self, permission: Permission, room: &str) -> bool {
        if self.admin {
            return true;
        }
        let patterns = match permission {
            Permission::Read => &self.read,
            Permission::Write => &self.write,
            Permission::Create => &self.create,
        };
        patterns.iter().any(|p| p.matches(room))
    }

    /// Whether this caller holds nothing at all (a token that can do nothing).
    pub fn is_empty(&self) -> bool {
        !self.admin && self.read.is_empty() && self.write.is_empty() && self.create.is_empty()
    }
}

/// The caller of a request or connection.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: Arc<str>,
    pub admin: bool,
    /// A generated guest id: its ops are never deduplicated.
    pub guest: bool,
    /// The token's `exp`, in seconds since the epoch.
    pub expires_at: Option<u64>,
    /// What the caller may do; shared, so a session clones a pointer, not patterns.
    pub grants: Arc<Grants>,
}

impl Identity {
    /// Whether this caller holds `permission` on `room`.
    pub fn may(&self, permission: Permission, room: &str) -> bool {
        self.grants.allows(permission, room)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing token (use ?token= or Authorization: Bearer)")]
    MissingToken,
    #[error("bad token: {0}")]
    BadToken(String),
    #[error("wrong API key")]
    BadApiKey,
    #[error("user id of {0} bytes exceeds limit of {MAX_USER_ID}")]
    UserTooLong(usize),
    #[error("empty user id")]
    EmptyUser,
    #[error("user id contains a control character")]
    UserControl,
    #[error("user id is not UTF-8 once percent-decoded")]
    UserNotUtf8,
}

impl AuthError {
    /// A user id that breaks the id rules (as opposed to a missing or bad token or key):
    /// with auth off it is the caller's malformed input, answered 400 `invalid`.
    pub fn is_invalid_user(&self) -> bool {
        matches!(
            self,
            AuthError::UserTooLong(_)
                | AuthError::EmptyUser
                | AuthError::UserControl
                | AuthError::UserNotUtf8
        )
    }
}

/// A key that cannot be loaded (at startup or on SIGHUP).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no RSA, EC or Ed25519 public key in PEM")]
    NotAPublicKey { path: PathBuf },
    #[error("{path} is not a JWKS document: {reason}")]
    BadJwks { path: PathBuf, reason: String },
    #[error("{path}: key {kid:?} cannot be used: {reason}")]
    BadJwk {
        path: PathBuf,
        kid: Option<String>,
        reason: String,
    },
    #[error("configure one key: --jwt-secret, --jwt-public-key or --jwt-jwks, not several")]
    SeveralKeys,
}

/// The key settings of `roomd serve` (see `config.rs`). Its `Debug` hides the secret
/// and the API key.
#[derive(Clone, Default)]
pub struct AuthSettings {
    pub jwt_secret: Option<String>,
    pub jwt_public_key: Option<PathBuf>,
    pub jwt_jwks: Option<PathBuf>,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub public_read: Vec<String>,
    pub public_write: Vec<String>,
    /// The HTTP API key (`--api-key`, or the contents of `--api-key-file`).
    pub api_key: Option<String>,
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |set: bool| if set { "<hidden>" } else { "<none>" };
        f.debug_struct("AuthSettings")
            .field("jwt_secret", &hidden(self.jwt_secret.is_some()))
            .field("jwt_public_key", &self.jwt_public_key)
            .field("jwt_jwks", &self.jwt_jwks)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("public_read", &self.public_read)
            .field("public_write", &self.public_write)
            .field("api_key", &hidden(self.api_key.is_some()))
            .finish()
    }
}

impl AuthSettings {
    /// Auth is on when any key is configured (the API key alone does not count).
    pub fn enabled(&self) -> bool {
        self.jwt_secret.is_some() || self.jwt_public_key.is_some() || self.jwt_jwks.is_some()
    }
}

/// `--public-read` / `--public-write`: patterns everyone holds, guests included.
#[derive(Debug, Clone, Default)]
struct PublicPatterns {
    read: Vec<String>,
    write: Vec<String>,
}

/// A verification key with the validation that fits its type: the algorithms of the
/// key's family only, so an HMAC secret never verifies an RS/ES token and the reverse.
struct VerifyingKey {
    key: DecodingKey,
    validation: Validation,
}

impl VerifyingKey {
    fn new(key: DecodingKey, only: Option<Algorithm>, settings: &AuthSettings) -> VerifyingKey {
        let mut validation = Validation::new_for_family(key.family());
        if let Some(alg) = only.filter(|alg| validation.algorithms.contains(alg)) {
            validation.algorithms = vec![alg];
        }
        // `exp` is honoured when present, to the second: no leeway. `nbf` has its own
        // leeway, checked in `verify_token`.
        validation.required_spec_claims.clear();
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.validate_nbf = false;
        // A configured issuer or audience must also be present: jsonwebtoken only
        // compares the claims a token carries.
        if let Some(issuer) = &settings.jwt_issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".into());
        }
        match &settings.jwt_audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        VerifyingKey { key, validation }
    }
}

/// Where verification keys come from.
enum Keys {
    /// A secret or one PEM public key (boxed: the JWKS variant is a pointer).
    Single(Box<VerifyingKey>),
    /// A JWKS file, by `kid`; replaced whole on reload.
    Jwks {
        path: PathBuf,
        by_kid: RwLock<Arc<HashMap<String, VerifyingKey>>>,
    },
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    rooms: RoomsClaim,
}

/// The `rooms` claim: patterns per permission.
#[derive(Deserialize, Default)]
struct RoomsClaim {
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
    #[serde(default)]
    create: Vec<String>,
}

/// Checks tokens and API keys, or hands out user ids when auth is off.
pub struct Auth {
    /// None: auth off (every caller an admin).
    keys: Option<Keys>,
    settings: AuthSettings,
    public: PublicPatterns,
    /// Shared by every caller without a token when auth is off.
    everything: Arc<Grants>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret or the API key.
        f.debug_struct("Auth")
            .field("enabled", &self.enabled())
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Auth with an HS* secret only (tests and benches).
    pub fn with_secret(secret: Option<&str>) -> Auth {
        let settings = AuthSettings {
            jwt_secret: secret.map(str::to_owned),
            ..AuthSettings::default()
        };
        // A secret never fails to load.
        Auth::new(settings).unwrap_or_else(|_| unreachable!("a secret always loads"))
    }

    /// Loads the configured key (reading its file).
    pub fn new(settings: AuthSettings) -> Result<Auth, KeyError> {
        let configured = [
            settings.jwt_secret.is_some(),
            settings.jwt_public_key.is_some(),
            settings.jwt_jwks.is_some(),
        ];
        if configured.iter().filter(|on| **on).count() > 1 {
            return Err(KeyError::SeveralKeys);
        }
        let keys = if let Some(secret) = &settings.jwt_secret {
            Some(Keys::Single(Box::new(VerifyingKey::new(
                DecodingKey::from_secret(secret.as_bytes()),
                None,
                &settings,
            ))))
        } else if let Some(path) = &settings.jwt_public_key {
            Some(Keys::Single(Box::new(VerifyingKey::new(
                load_public_pem(path)?,
                None,
                &settings,
            ))))
        } else if let Some(path) = &settings.jwt_jwks {
            Some(Keys::Jwks {
                path: path.clone(),
                by_kid: RwLock::new(Arc::new(load_jwks(path, &settings)?)),
            })
        } else {
            None
        };
        Ok(Auth {
            keys,
            public: PublicPatterns {
                read: settings.public_read.clone(),
                write: settings.public_write.clone(),
            },
            settings,
            everything: Arc::new(Grants::all()),
        })
    }

    pub fn enabled(&self) -> bool {
        self.keys.is_some()
    }

    /// Re-reads the JWKS file (SIGHUP). On error the keys in use stay.
    pub fn reload(&self) -> Result<usize, KeyError> {
        match &self.keys {
            Some(Keys::Jwks { path, by_kid }) => {
                let fresh = load_jwks(path, &self.settings)?;
                let n = fresh.len();
                *by_kid.write() = Arc::new(fresh);
                Ok(n)
            }
            _ => Ok(0),
        }
    }

    /// Whether callers without a token get anything (auth on and a public pattern).
    fn guests_allowed(&self) -> bool {
        !self.public.read.is_empty() || !self.public.write.is_empty()
    }

    /// Verifies a token and compiles its grants.
    pub fn verify_token(&self, token: &str) -> Result<Identity, AuthError> {
        let bad = |e: jsonwebtoken::errors::Error| AuthError::BadToken(e.to_string());
        let data = match &self.keys {
            None => return Err(AuthError::BadToken("auth is off on this server".into())),
            Some(Keys::Single(key)) => {
                jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation).map_err(bad)?
            }
            Some(Keys::Jwks { by_kid, .. }) => {
                let header = jsonwebtoken::decode_header(token).map_err(bad)?;
                let kid = header
                    .kid
                    .ok_or_else(|| AuthError::BadToken("the token names no `kid`".into()))?;
                // Clone the map's Arc so no lock is held while verifying.
                let keys = by_kid.read().clone();
                let key = keys
                    .get(&kid)
                    .ok_or_else(|| AuthError::BadToken(format!("no key with kid {kid:?}")))?;
                jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation).map_err(bad)?
            }
        };
        let claims = data.claims;
        if let Some(nbf) = claims.nbf {
            if nbf > now_secs() + NBF_LEEWAY_SECS {
                return Err(AuthError::BadToken(format!(
                    "the token is not valid before {nbf} (more than {NBF_LEEWAY_SECS} s from now)"
                )));
            }
        }
        let user = check_user(&claims.sub)?;
        let grants = if claims.admin {
            self.everything.clone()
        } else {
            Arc::new(Grants::compile(&user, &claims.rooms, &self.public))
        };
        Ok(Identity {
            user,
            admin: claims.admin,
            guest: false,
            expires_at: claims.exp,
            grants,
        })
    }

    /// Identifies a request. `http` lets HTTP callers use `X-Roomd-User` (auth off) and
    /// `X-Roomd-Api-Key`.
    pub fn identify(&self, req: &HttpRequest, http: bool) -> Result<Identity, AuthError> {
        if http {
            if let Some(given) = req.headers().get("x-roomd-api-key") {
                return self.api_key_identity(req, given.as_bytes());
            }
        }
        let query = query_map(req);
        if self.enabled() {
            return match query.get("token").cloned().or_else(|| bearer(req)) {
                Some(token) => self.verify_token(&token),
                None if self.guests_allowed() => Ok(self.guest()),
                None => Err(AuthError::MissingToken),
            };
        }
        let named = match query_user(req.query_string())? {
            Some(user) => Some(user),
            None if http => match req.headers().get("x-roomd-user") {
                Some(value) => Some(header_user(value)?),
                None => None,
            },
            None => None,
        };
        match named {
            Some(user) => Ok(Identity {
                user: check_user(&user)?,
                admin: true,
                guest: false,
                expires_at: None,
                grants: self.everything.clone(),
            }),
            None => Ok(Identity {
                guest: true,
                ..self.guest()
            }),
        }
    }

    /// A caller without a token: a generated id holding the public patterns (auth on)
    /// or everything (auth off).
    fn guest(&self) -> Identity {
        let user: Arc<str> = Arc::from(format!("guest-{:012x}", rand::random::<u64>() >> 16));
        let grants = if self.enabled() {
            Arc::new(Grants::compile(&user, &RoomsClaim::default(), &self.public))
        } else {
            self.everything.clone()
        };
        Identity {
            admin: !self.enabled(),
            guest: true,
            expires_at: None,
            grants,
            user,
        }
    }

    /// The identity of a request carrying `X-Roomd-Api-Key`: an admin named by
    /// `X-Roomd-User`, else `server`. A wrong key (or none configured) is 401.
    fn api_key_identity(&self, req: &HttpRequest, given: &[u8]) -> Result<Identity, AuthError> {
        let Some(expected) = &self.settings.api_key else {
            return Err(AuthError::BadApiKey);
        };
        if !constant_time_eq(expected.as_bytes(), given) {
            return Err(AuthError::BadApiKey);
        }
        let user = match req.headers().get("x-roomd-user") {
            Some(value) => check_user(&header_user(value)?)?,
            None => Arc::from(API_KEY_USER),
        };
        Ok(Identity {
            user,
            admin: true,
            guest: false,
            expires_at: None,
            grants: self.everything.clone(),
        })
    }
}

/// Compares without an early exit, so the time taken says nothing about the key.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn read_file(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })
}

/// A PEM public key of any supported type: RSA (PKCS#1 or SPKI), EC or Ed25519 (SPKI).
fn load_public_pem(path: &Path) -> Result<DecodingKey, KeyError> {
    let pem = read_file(path)?;
    DecodingKey::from_rsa_pem(&pem)
        .or_else(|_| DecodingKey::from_ec_pem(&pem))
        .or_else(|_| DecodingKey::from_ed_pem(&pem))
        .map_err(|_| KeyError::NotAPublicKey {
            path: path.to_owned(),
        })
}

/// Every key of a JWKS file that has a `kid`, keyed by it. A key naming its `alg` is
/// held to that algorithm; one that does not, to its type's family.
fn load_jwks(
    path: &Path,
    settings: &AuthSettings,
) -> Result<HashMap<String, VerifyingKey>, KeyError> {
    let text = read_file(path)?;
    let set: JwkSet = serde_json::from_slice(&text).map_err(|e| KeyError::BadJwks {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let mut by_kid = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| KeyError::BadJwk {
            path: path.to_owned(),
            kid: Some(kid.clone()),
            reason: e.to_string(),
        })?;
        let only = jwk
            .common
            .key_algorithm
            .and_then(|alg| Algorithm::try_from(alg).ok());
        by_kid.insert(kid, VerifyingKey::new(key, only, settings));
    }
    Ok(by_kid)
}

fn check_user(user: &str) -> Result<Arc<str>, AuthError> {
    if user.is_empty() {
        return Err(AuthError::EmptyUser);
    }
    if user.len() > MAX_USER_ID {
        return Err(AuthError::UserTooLong(user.len()));
    }
    if user.chars().any(char::is_control) {
        return Err(AuthError::UserControl);
    }
    Ok(Arc::from(user))
}

/// An `X-Roomd-User` value as text: visible ASCII, or bytes 0x80-0xFF (obs-text) that
/// must still form UTF-8.
fn header_user(value: &header::HeaderValue) -> Result<String, AuthError> {
    String::from_utf8(value.as_bytes().to_vec()).map_err(|_| AuthError::UserNotUtf8)
}

/// The last `user=` of a query string, percent-decoded (`+` is a space), refusing bytes
/// that do not form UTF-8 instead of replacing them as form decoding does.
fn query_user(query: &str) -> Result<Option<String>, AuthError> {
    let mut user = None;
    for pair in query.split('&') {
        if let Some(("user", raw)) = pair.split_once('=') {
            user = Some(raw);
        }
    }
    let Some(raw) = user else { return Ok(None) };
    let hex = |b: u8| (b as char).to_digit(16);
    let mut bytes = Vec::with_capacity(raw.len());
    let mut rest = raw.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        match (first, tail) {
            (b'%', [hi, lo, after @ ..]) if hex(*hi).is_some() && hex(*lo).is_some() => {
                // Both digits were just checked, so the byte is their value.
                bytes.push((hex(*hi).unwrap_or(0) * 16 + hex(*lo).unwrap_or(0)) as u8);
                rest = after;
            }
            (b'+', _) => {
                bytes.push(b' ');
                rest = tail;
            }
            (byte, _) => {
                bytes.push(byte);
                rest = tail;
            }
        }
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| AuthError::UserNotUtf8)
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
    fn patterns_match_stars_and_the_literal_sub() {
        let cases: &[(&str, &str, &str, bool)] = &[
            ("chat:*", "alice", "chat:general", true),
            ("chat:*", "alice", "chat:", true),
            ("chat:*", "alice", "poll:chat:", false),
            ("poll:lunch", "alice", "poll:lunch", true),
            ("poll:lunch", "alice", "poll:lunch2", false),
            ("*", "alice", "anything", true),
            ("dm:{sub}:*", "alice", "dm:alice:bob", true),
            ("dm:{sub}:*", "alice", "dm:bob:alice", false),
            ("dm:*:{sub}", "alice", "dm:bob:alice", true),
            ("game:{sub}-*", "bob", "game:bob-1", true),
            ("a*b*c", "x", "abc", true),
            ("a*b*c", "x", "a-b-b-c", true),
            ("a*b*c", "x", "acb", false),
            ("ab*ba", "x", "aba", false),
            ("**", "x", "", true),
            // `{sub}` is replaced literally: a star in a user id matches only itself.
            ("dm:{sub}", "a*", "dm:a*", true),
            ("dm:{sub}", "a*", "dm:abc", false),
        ];
        for (pattern, sub, room, expected) in cases {
            assert_eq!(
                Pattern::compile(pattern, sub).matches(room),
                *expected,
                "{pattern} (sub {sub}) against {room}"
            );
        }
    }

    fn token(claims: serde_json::Value) -> String {
        use jsonwebtoken::{encode, EncodingKey, Header};
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(b"s3cret"),
        )
        .expect("a JSON object always encodes as claims")
    }

    #[test]
    fn tokens_give_the_user_and_expire() {
        let auth = Auth::with_secret(Some("s3cret"));
        let now = now_secs();
        let ok = TestRequest::default()
            .uri(&format!(
                "/ws?token={}",
                token(serde_json::json!({"sub": "alice", "exp": now + 60}))
            ))
            .to_http_request();
        assert_eq!(
            &*auth
                .identify(&ok, false)
                .map(|i| i.user)
                .unwrap_or_else(|_| "".into()),
            "alice"
        );
        let expired = TestRequest::default()
            .uri(&format!(
                "/ws?token={}",
                token(serde_json::json!({"sub": "alice", "exp": now - 5}))
            ))
            .to_http_request();
        assert!(auth.identify(&expired, false).is_err());
        let missing = TestRequest::default().uri("/ws").to_http_request();
        assert!(matches!(
            auth.identify(&missing, false),
            Err(AuthError::MissingToken)
        ));
    }

    #[test]
    fn grants_come_from_the_rooms_claim_and_deny_by_default() {
        let auth = Auth::with_secret(Some("s3cret"));
        let alice = auth
            .verify_token(&token(serde_json::json!({
                "sub": "alice",
                "rooms": {"read": ["chat:*"], "write": ["dm:{sub}:*"], "create": ["game:{sub}-*"]}
            })))
            .expect("a valid token");
        assert!(alice.may(Permission::Read, "chat:general"));
        assert!(!alice.may(Permission::Write, "chat:general"));
        assert!(alice.may(Permission::Write, "dm:alice:bob"));
        assert!(!alice.may(Permission::Write, "dm:bob:alice"));
        assert!(alice.may(Permission::Create, "game:alice-7"));
        assert!(!alice.may(Permission::Read, "poll:lunch"));
        let bare = auth
            .verify_token(&token(serde_json::json!({"sub": "bob"})))
            .expect("a valid token");
        assert!(bare.grants.is_empty());
        let admin = auth
            .verify_token(&token(serde_json::json!({"sub": "root", "admin": true})))
            .expect("a valid token");
        assert!(admin.may(Permission::Create, "anything"));
    }

    #[test]
    fn query_user_is_percent_decoded_strictly() {
        assert_eq!(
            query_user("user=al%69ce+b").ok().flatten().as_deref(),
            Some("alice b")
        );
        assert_eq!(
            query_user("a=1&user=%C3%A9").ok().flatten().as_deref(),
            Some("é")
        );
        assert_eq!(query_user("token=x").ok().flatten(), None);
        assert!(matches!(
            query_user("user=%FF"),
            Err(AuthError::UserNotUtf8)
        ));
        // A `%` not followed by two hex digits stands for itself.
        assert_eq!(
            query_user("user=100%").ok().flatten().as_deref(),
            Some("100%")
        );
        assert!(matches!(check_user("a\u{7}b"), Err(AuthError::UserControl)));
    }

    #[test]
    fn nbf_beyond_the_leeway_is_refused() {
        let auth = Auth::with_secret(Some("s3cret"));
        let now = now_secs();
        assert!(auth
            .verify_token(&token(serde_json::json!({"sub": "a", "nbf": now + 10})))
            .is_ok());
        assert!(auth
            .verify_token(&token(serde_json::json!({"sub": "a", "nbf": now + 120})))
            .is_err());
    }
}
