//! Access control (PROTOCOL.md 1.1): `rooms` claims with `read` / `write` / `create`
//! patterns, deny by default, refusals that never tell whether a room exists, guests
//! under `--public-read` / `--public-write`, HS / RSA / EC / Ed25519 keys and a JWKS
//! (with algorithm confusion refused), token refresh, the API key, and the admin API
//! (server signal, user disconnect with 4403). Tokens are minted here with jsonwebtoken
//! from the committed test keys in `tests/fixtures/keys/`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::support::{entry, jwt, now_secs, Client, Connect, Server, TIMEOUT};

const SECRET: &str = "access-test-secret";

fn key_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
}

fn key_arg(name: &str) -> String {
    key_path(name).to_string_lossy().into_owned()
}

/// A JWT signed with `alg` by the committed private key `pem` (or the secret for HS*).
fn sign(alg: Algorithm, pem: &str, kid: Option<&str>, claims: Value) -> String {
    let key = match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            EncodingKey::from_secret(pem.as_bytes())
        }
        _ => {
            let bytes = std::fs::read(key_path(pem)).expect("the committed key is readable");
            match alg {
                Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&bytes),
                Algorithm::EdDSA => EncodingKey::from_ed_pem(&bytes),
                _ => EncodingKey::from_rsa_pem(&bytes),
            }
            .expect("the committed private key parses")
        }
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, &claims, &key).expect("claims encode")
}

/// An unsigned token (`alg: none`), which must always be refused.
fn unsigned(claims: Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{body}.")
}

fn hs(claims: Value) -> String {
    jwt(SECRET, claims)
}

fn admin_token() -> String {
    hs(json!({"sub": "root", "exp": now_secs() + 3600, "admin": true}))
}

async fn connect_token(server: &Server, token: &str) -> Client {
    Connect::new().token(token).connect(server).await
}

/// The upgrade succeeds and the socket is closed with 4401.
async fn refused_4401(server: &Server, token: &str) {
    let mut client = Connect::new()
        .token(token)
        .handshake(server)
        .await
        .expect("the upgrade itself succeeds");
    client.expect_close(4401).await;
}

/// The welcome's user, or a close code.
async fn accepted_user(server: &Server, token: &str) -> Result<String, Option<u16>> {
    let mut client = Connect::new()
        .token(token)
        .handshake(server)
        .await
        .expect("the upgrade itself succeeds");
    match client.next_event(TIMEOUT).await {
        crate::support::Event::Json(v) if v["t"] == "welcome" => {
            Ok(v["user"].as_str().unwrap_or_default().to_owned())
        }
        crate::support::Event::Close(code) => Err(code),
        other => panic!("expected welcome or close, got {other:?}"),
    }
}

async fn setup_rooms(server: &Server, rooms: &[(&str, &str, Value)]) {
    let mut admin = connect_token(server, &admin_token()).await;
    for (room, kind, init) in rooms {
        admin.create_ok(room, kind, init.clone()).await;
    }
    admin.close().await;
}

fn poll_init() -> Value {
    json!({"question": "Lunch?", "options": ["pizza", "sushi"]})
}

#[tokio::test]
async fn read_write_and_create_patterns_decide_every_websocket_request() {
    let server = Server::start(&["--jwt-secret", SECRET]).await;
    setup_rooms(
        &server,
        &[
            ("chat:general", "chat", json!({})),
            ("chat:private", "chat", json!({})),
            ("poll:lunch", "poll", poll_init()),
        ],
    )
    .await;
    let token = hs(json!({"sub": "alice", "exp": now_secs() + 3600, "rooms": {
        "read": ["chat:*"], "write": ["chat:general"], "create": ["game:{sub}-*"]}}));
    let mut alice = connect_token(&server, &token).await;
    assert_eq!(alice.welcome["proto"], 1);
    assert_eq!(alice.welcome["minor"], 1);

    // read: `sub`
    alice.sub("chat:general").await;
    alice.sub("chat:private").await;
    let refused = alice
        .sub_msg(json!({"t": "sub", "room": "poll:lunch"}))
        .await;
    assert_eq!(refused["t"], "error", "{refused}");
    assert_eq!(refused["code"], "forbidden");
    assert_eq!(refused["room"], "poll:lunch");
    // A room that does not exist is refused the same way: nothing leaks.
    let missing = alice
        .sub_msg(json!({"t": "sub", "room": "poll:none"}))
        .await;
    assert_eq!(missing["code"], "forbidden");
    assert_eq!(missing["msg"], refused["msg"]);

    // write: `op`
    alice
        .ack("p1", "chat:general", json!({"type": "post", "text": "hi"}))
        .await;
    let private = alice
        .op("p2", "chat:private", json!({"type": "post", "text": "hi"}))
        .await;
    assert_eq!(private["t"], "nack");
    assert_eq!(private["code"], "forbidden");
    let absent = alice
        .op("p3", "chat:absent", json!({"type": "post", "text": "hi"}))
        .await;
    assert_eq!(absent["code"], "forbidden");
    assert_eq!(absent["msg"], private["msg"]);

    // write: `signal` (checked before "not subscribed")
    alice
        .send_json(json!({"t": "signal", "room": "chat:private", "data": 1}))
        .await;
    let signal = alice.recv_until(|v| v["t"] == "error").await;
    assert_eq!(signal["code"], "forbidden");
    assert_eq!(signal["room"], "chat:private");
    alice
        .send_json(json!({"t": "signal", "room": "poll:nowhere", "data": 1}))
        .await;
    let signal = alice.recv_until(|v| v["t"] == "error").await;
    assert_eq!(signal["code"], "forbidden");
    assert_eq!(signal["room"], "poll:nowhere");

    // create, with `{sub}` standing for the token's sub
    alice.create_ok("game:alice-1", "state", json!({})).await;
    let exists = alice
        .reply_to(json!({"t": "create", "id": "again", "room": "game:alice-1", "kind": "state", "init": {}}))
        .await;
    assert_eq!(
        exists["code"], "exists",
        "holding create, the truth: {exists}"
    );
    let other = alice.create("game:bob-1", "state", json!({})).await;
    assert_eq!(other["code"], "forbidden", "{other}");
    let taken = alice.create("chat:general", "chat", json!({})).await;
    assert_eq!(taken["code"], "forbidden", "no create on chat:*: {taken}");
    // Writing the room it created needs a write pattern too.
    let game = alice
        .op(
            "g1",
            "game:alice-1",
            json!({"type": "set", "key": "k", "value": 1}),
        )
        .await;
    assert_eq!(game["code"], "forbidden");
}

#[tokio::test]
async fn a_token_with_only_sub_can_do_nothing_and_admin_can_do_everything() {
    let server = Server::start(&["--jwt-secret", SECRET]).await;
    setup_rooms(&server, &[("chat:general", "chat", json!({}))]).await;
    let mut bare = connect_token(&server, &hs(json!({"sub": "bob"}))).await;
    assert_eq!(bare.welcome["user"], "bob");
    let sub = bare
        .sub_msg(json!({"t": "sub", "room": "chat:general"}))
        .await;
    assert_eq!(sub["code"], "forbidden");
    assert_eq!(
        bare.nack("1", "chat:general", json!({"type": "post", "text": "x"}))
            .await,
        "forbidden"
    );
    assert_eq!(
        bare.create("chat:new", "chat", json!({})).await["code"],
        "forbidden"
    );

    let mut root = connect_token(&server, &admin_token()).await;
    root.sub("chat:general").await;
    root.ack("1", "chat:general", json!({"type": "post", "text": "x"}))
        .await;
    root.create_ok("anything:at-all", "state", json!({})).await;
    // HS384 and HS512 verify with the same secret.
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        let token = sign(alg, SECRET, None, json!({"sub": "carol"}));
        assert_eq!(accepted_user(&server, &token).await, Ok("carol".into()));
    }
}

#[tokio::test]
async fn dm_patterns_put_the_sub_in_place() {
    let server = Server::start(&["--jwt-secret", SECRET]).await;
    setup_rooms(
        &server,
        &[
            ("dm:alice:bob", "chat", json!({})),
            ("dm:bob:carol", "chat", json!({})),
        ],
    )
    .await;
    let dm = |user: &str| {
        hs(
            json!({"sub": user, "rooms": {"read": ["dm:{sub}:*", "dm:*:{sub}"],
                                          "write": ["dm:{sub}:*", "dm:*:{sub}"]}}),
        )
    };
    let mut alice = connect_token(&server, &dm("alice")).await;
    alice.sub("dm:alice:bob").await;
    let other = alice
        .sub_msg(json!({"t": "sub", "room": "dm:bob:carol"}))
        .await;
    assert_eq!(other["code"], "forbidden");
    let mut bob = connect_token(&server, &dm("bob")).await;
    bob.sub("dm:alice:bob").await;
    bob.sub("dm:bob:carol").await;
    bob.ack("1", "dm:alice:bob", json!({"type": "post", "text": "hi"}))
        .await;
    let mut carol = connect_token(&server, &dm("carol")).await;
    assert_eq!(
        carol
            .nack("1", "dm:alice:bob", json!({"type": "post", "text": "x"}))
            .await,
        "forbidden"
    );
}

#[tokio::test]
async fn guests_hold_only_the_public_patterns_and_a_bad_token_is_still_refused() {
    let server = Server::start(&[
        "--jwt-secret",
        SECRET,
        "--public-read",
        "poll:*",
        "--public-write",
        "poll:open",
    ])
    .await;
    setup_rooms(
        &server,
        &[
            ("poll:lunch", "poll", poll_init()),
            ("poll:open", "poll", poll_init()),
            ("chat:staff", "chat", json!({})),
        ],
    )
    .await;
    let mut guest = Connect::new().connect(&server).await;
    let user = guest.welcome["user"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(user.starts_with("guest-"), "{user}");
    guest.sub("poll:lunch").await;
    assert_eq!(
        guest
            .nack("v1", "poll:lunch", json!({"type": "vote", "option": 0}))
            .await,
        "forbidden"
    );
    guest
        .ack("v2", "poll:open", json!({"type": "vote", "option": 0}))
        .await;
    let staff = guest
        .sub_msg(json!({"t": "sub", "room": "chat:staff"}))
        .await;
    assert_eq!(staff["code"], "forbidden");
    assert_eq!(
        guest.create("poll:mine", "poll", poll_init()).await["code"],
        "forbidden"
    );

    // Signed-in users hold the public patterns too, besides their own.
    let mut alice = connect_token(
        &server,
        &hs(json!({"sub": "alice", "rooms": {"write": ["poll:lunch"]}})),
    )
    .await;
    alice.sub("poll:lunch").await;
    alice
        .ack("v1", "poll:lunch", json!({"type": "vote", "option": 1}))
        .await;

    // A bad token is refused, not treated as a guest.
    refused_4401(&server, &jwt("wrong-secret", json!({"sub": "alice"}))).await;

    // Over HTTP: a guest reads public rooms and nothing else.
    assert_eq!(server.get("/api/rooms/poll:lunch").await.status, 200);
    assert_eq!(server.get("/api/rooms/poll:lunch/events").await.status, 200);
    assert_eq!(server.get("/api/rooms/chat:staff").await.status, 403);
    let vote = json!({"id": "h1", "op": {"type": "vote", "option": 0}});
    assert_eq!(
        server.post("/api/rooms/poll:lunch/ops", &vote).await.status,
        403
    );
    assert_eq!(
        server.post("/api/rooms/poll:open/ops", &vote).await.status,
        200
    );
    let bad = server
        .http(
            "GET",
            "/api/rooms/poll:lunch",
            &[("Authorization", "Bearer not.a.token")],
            None,
        )
        .await;
    assert_eq!(bad.status, 401);
}

#[tokio::test]
async fn http_checks_each_permission_before_looking_at_the_room() {
    let server = Server::start(&["--jwt-secret", SECRET]).await;
    setup_rooms(&server, &[("chat:general", "chat", json!({}))]).await;
    let reader = format!(
        "Bearer {}",
        hs(json!({"sub": "reader", "rooms": {"read": ["chat:*"]}}))
    );
    let writer = format!(
        "Bearer {}",
        hs(json!({"sub": "writer", "rooms": {"write": ["chat:*"], "create": ["chat:w-*"]}}))
    );
    let get = |path: &'static str, auth: String| {
        let server = &server;
        async move {
            server
                .http("GET", path, &[("Authorization", &auth)], None)
                .await
                .status
        }
    };
    // read: state, time travel, events; 404 only for a caller that may read.
    assert_eq!(get("/api/rooms/chat:general", reader.clone()).await, 200);
    assert_eq!(
        get("/api/rooms/chat:general?at=1", reader.clone()).await,
        200
    );
    assert_eq!(
        get("/api/rooms/chat:general/events", reader.clone()).await,
        200
    );
    assert_eq!(get("/api/rooms/chat:none", reader.clone()).await, 404);
    for path in [
        "/api/rooms/chat:general",
        "/api/rooms/chat:general?at=1",
        "/api/rooms/chat:general/events",
        "/api/rooms/chat:none",
        "/api/rooms/chat:none/events",
    ] {
        let status = get(path, writer.clone()).await;
        assert_eq!(status, 403, "GET {path} without read");
    }
    let forbidden = server
        .http(
            "GET",
            "/api/rooms/chat:none",
            &[("Authorization", &writer)],
            None,
        )
        .await;
    assert_eq!(forbidden.code(), "forbidden");

    // write: ops
    let op = json!({"id": "1", "op": {"type": "post", "text": "hi"}});
    let post = |path: &'static str, auth: String, body: Value| {
        let server = &server;
        async move {
            server
                .http("POST", path, &[("Authorization", &auth)], Some(&body))
                .await
                .status
        }
    };
    assert_eq!(
        post("/api/rooms/chat:general/ops", writer.clone(), op.clone()).await,
        200
    );
    assert_eq!(
        post("/api/rooms/chat:general/ops", reader.clone(), op.clone()).await,
        403
    );
    assert_eq!(
        post("/api/rooms/chat:none/ops", reader.clone(), op.clone()).await,
        403
    );
    assert_eq!(
        post("/api/rooms/chat:none/ops", writer.clone(), op.clone()).await,
        404
    );

    // create
    let create = |room: &str| json!({"room": room, "kind": "chat", "init": {}});
    assert_eq!(
        post("/api/rooms", writer.clone(), create("chat:w-1")).await,
        201
    );
    assert_eq!(
        post("/api/rooms", writer.clone(), create("chat:w-1")).await,
        409
    );
    assert_eq!(
        post("/api/rooms", writer.clone(), create("chat:general")).await,
        403
    );
    assert_eq!(
        post("/api/rooms", reader.clone(), create("chat:w-2")).await,
        403
    );

    // DELETE by a non-admin: 403 whether or not the room exists.
    for path in ["/api/rooms/chat:general", "/api/rooms/chat:none"] {
        let refused = server
            .http("DELETE", path, &[("Authorization", &writer)], None)
            .await;
        assert_eq!(refused.status, 403, "DELETE {path}");
    }
    let admin = format!("Bearer {}", admin_token());
    let deleted = server
        .http(
            "DELETE",
            "/api/rooms/chat:general",
            &[("Authorization", &admin)],
            None,
        )
        .await;
    assert_eq!(deleted.status, 204);
}

#[tokio::test]
async fn the_api_key_acts_as_an_admin_over_http_only() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let key_file = dir.path().join("api-key");
    std::fs::write(&key_file, "file-key-123\n").expect("the key file can be written");
    let key_file = key_file.to_string_lossy().into_owned();
    let server = Server::start(&["--jwt-secret", SECRET, "--api-key-file", &key_file]).await;
    let key = [("X-Roomd-Api-Key", "file-key-123")];
    let created = server
        .http(
            "POST",
            "/api/rooms",
            &key,
            Some(&json!({"room": "chat:backend", "kind": "chat", "init": {}})),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let op = |id: &str| json!({"id": id, "op": {"type": "post", "text": "from the backend"}});
    assert_eq!(
        server
            .http("POST", "/api/rooms/chat:backend/ops", &key, Some(&op("1")))
            .await
            .status,
        200
    );
    let as_bob = [("X-Roomd-Api-Key", "file-key-123"), ("X-Roomd-User", "bob")];
    assert_eq!(
        server
            .http(
                "POST",
                "/api/rooms/chat:backend/ops",
                &as_bob,
                Some(&op("2"))
            )
            .await
            .status,
        200
    );
    let state = server
        .http("GET", "/api/rooms/chat:backend", &key, None)
        .await;
    assert_eq!(state.status, 200);
    assert_eq!(
        entry(&state.body["entries"], "msg/2").unwrap()["v"]["user"],
        "server"
    );
    assert_eq!(
        entry(&state.body["entries"], "msg/3").unwrap()["v"]["user"],
        "bob"
    );

    let wrong = server
        .http(
            "GET",
            "/api/rooms/chat:backend",
            &[("X-Roomd-Api-Key", "guess")],
            None,
        )
        .await;
    assert_eq!(wrong.status, 401);
    // HTTP only: the key opens no WebSocket.
    let mut ws = Connect::new()
        .user("server")
        .handshake(&server)
        .await
        .expect("upgrade");
    ws.expect_close(4401).await;

    // `--api-key` alone leaves auth off: `?user=` names the caller.
    let open = Server::start(&["--api-key", "k"]).await;
    let client = open.client("alice").await;
    assert_eq!(client.welcome["user"], "alice");
    assert_eq!(
        open.http("GET", "/healthz", &[("X-Roomd-Api-Key", "nope")], None)
            .await
            .status,
        200
    );
    let wrong = open
        .http(
            "POST",
            "/api/rooms",
            &[("X-Roomd-Api-Key", "nope")],
            Some(&json!({"room": "chat:x", "kind": "chat", "init": {}})),
        )
        .await;
    assert_eq!(wrong.status, 401, "a wrong key is 401 even with auth off");
}

#[tokio::test]
async fn rsa_ec_and_ed25519_keys_verify_their_own_algorithms_only() {
    let claims = || json!({"sub": "alice", "exp": now_secs() + 600});
    let rsa = Server::start(&["--jwt-public-key", &key_arg("rsa_public.pem")]).await;
    for alg in [Algorithm::RS256, Algorithm::RS512, Algorithm::PS256] {
        let token = sign(alg, "rsa_private.pem", None, claims());
        assert_eq!(
            accepted_user(&rsa, &token).await,
            Ok("alice".into()),
            "{alg:?}"
        );
    }
    // Algorithm confusion: the public key's PEM text used as an HMAC secret.
    let pem = std::fs::read_to_string(key_path("rsa_public.pem")).expect("readable");
    refused_4401(&rsa, &jwt(&pem, claims())).await;
    refused_4401(
        &rsa,
        &sign(Algorithm::ES256, "ec_private.pem", None, claims()),
    )
    .await;
    refused_4401(&rsa, &unsigned(claims())).await;
    drop(rsa);

    let ec = Server::start(&["--jwt-public-key", &key_arg("ec_public.pem")]).await;
    let token = sign(Algorithm::ES256, "ec_private.pem", None, claims());
    assert_eq!(accepted_user(&ec, &token).await, Ok("alice".into()));
    refused_4401(
        &ec,
        &sign(Algorithm::RS256, "rsa_private.pem", None, claims()),
    )
    .await;
    let pem = std::fs::read_to_string(key_path("ec_public.pem")).expect("readable");
    refused_4401(&ec, &jwt(&pem, claims())).await;
    refused_4401(&ec, &unsigned(claims())).await;
    drop(ec);

    let ed = Server::start(&["--jwt-public-key", &key_arg("ed25519_public.pem")]).await;
    let token = sign(Algorithm::EdDSA, "ed25519_private.pem", None, claims());
    assert_eq!(accepted_user(&ed, &token).await, Ok("alice".into()));
    refused_4401(
        &ed,
        &sign(Algorithm::ES256, "ec_private.pem", None, claims()),
    )
    .await;
    let unsigned_http = ed
        .http(
            "GET",
            "/api/rooms/chat:x",
            &[("Authorization", &format!("Bearer {}", unsigned(claims())))],
            None,
        )
        .await;
    assert_eq!(unsigned_http.status, 401);
}

#[tokio::test]
async fn the_jwks_picks_keys_by_kid_and_is_reread_on_sighup() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let jwks_path = dir.path().join("jwks.json");
    let full: Value = serde_json::from_slice(
        &std::fs::read(key_path("jwks.json")).expect("the committed JWKS is readable"),
    )
    .expect("the committed JWKS is JSON");
    let rsa_only = json!({"keys": [full["keys"][0].clone()]});
    std::fs::write(&jwks_path, rsa_only.to_string()).expect("writable");
    let server = Server::start(&[
        "--jwt-jwks",
        &jwks_path.to_string_lossy(),
        "--jwt-issuer",
        "https://issuer.test",
        "--jwt-audience",
        "roomd",
    ])
    .await;
    let claims = || json!({"sub": "alice", "iss": "https://issuer.test", "aud": "roomd", "exp": now_secs() + 600});
    let rsa = sign(Algorithm::RS256, "rsa_private.pem", Some("rsa-1"), claims());
    assert_eq!(accepted_user(&server, &rsa).await, Ok("alice".into()));
    let ec = sign(Algorithm::ES256, "ec_private.pem", Some("ec-1"), claims());
    refused_4401(&server, &ec).await;
    // No kid, or a kid naming another key's type.
    refused_4401(
        &server,
        &sign(Algorithm::RS256, "rsa_private.pem", None, claims()),
    )
    .await;
    refused_4401(
        &server,
        &sign(Algorithm::ES256, "ec_private.pem", Some("rsa-1"), claims()),
    )
    .await;
    // Issuer and audience must be present and match.
    let mut wrong_iss = claims();
    wrong_iss["iss"] = json!("https://evil.test");
    refused_4401(
        &server,
        &sign(
            Algorithm::RS256,
            "rsa_private.pem",
            Some("rsa-1"),
            wrong_iss,
        ),
    )
    .await;
    let mut no_aud = claims();
    no_aud.as_object_mut().expect("an object").remove("aud");
    refused_4401(
        &server,
        &sign(Algorithm::RS256, "rsa_private.pem", Some("rsa-1"), no_aud),
    )
    .await;
    // `nbf` up to 30 s ahead is clock skew; beyond is refused.
    let mut soon = claims();
    soon["nbf"] = json!(now_secs() + 10);
    let soon = sign(Algorithm::RS256, "rsa_private.pem", Some("rsa-1"), soon);
    assert_eq!(accepted_user(&server, &soon).await, Ok("alice".into()));
    let mut later = claims();
    later["nbf"] = json!(now_secs() + 300);
    refused_4401(
        &server,
        &sign(Algorithm::RS256, "rsa_private.pem", Some("rsa-1"), later),
    )
    .await;

    // Rotate: the file gains the EC key; SIGHUP makes the server read it.
    std::fs::write(&jwks_path, full.to_string()).expect("writable");
    // SAFETY: kill(2) on the child this test spawned and still owns.
    let rc = unsafe { libc::kill(server.pid(), libc::SIGHUP) };
    assert_eq!(rc, 0, "SIGHUP could not be sent");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match accepted_user(&server, &ec).await {
            Ok(user) => {
                assert_eq!(user, "alice");
                break;
            }
            Err(code) => {
                assert_eq!(code, Some(4401));
                assert!(Instant::now() < deadline, "the EC key never became valid");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert_eq!(accepted_user(&server, &rsa).await, Ok("alice".into()));
}

#[tokio::test]
async fn token_refresh_swaps_permissions_and_ends_subscriptions_it_cannot_read() {
    let server = Server::start(&["--jwt-secret", SECRET]).await;
    setup_rooms(
        &server,
        &[("chat:a", "chat", json!({})), ("chat:b", "chat", json!({}))],
    )
    .await;
    let both = hs(json!({"sub": "alice", "exp": now_secs() + 3,
                         "rooms": {"read": ["chat:*"], "write": ["chat:*"]}}));
    let mut alice = connect_token(&server, &both).await;
    alice.sub("chat:a").await;
    alice.sub("chat:b").await;

    // Another user's token, or an invalid one: `error` without a room, nothing changes.
    alice
        .send_json(
            json!({"t": "auth", "token": hs(json!({"sub": "mallory", "rooms": {"read": ["*"]}}))}),
        )
        .await;
    let other = alice.recv_until(|v| v["t"] == "error").await;
    assert_eq!(other["code"], "forbidden");
    assert!(other.get("room").is_none(), "{other}");
    alice
        .send_json(json!({"t": "auth", "token": "not.a.token"}))
        .await;
    let invalid = alice.recv_until(|v| v["t"] == "error").await;
    assert_eq!(invalid["code"], "forbidden");
    assert!(invalid.get("room").is_none(), "{invalid}");

    // A narrower token: `authed` with its exp, then chat:b ends.
    let exp = now_secs() + 3600;
    let only_a = hs(json!({"sub": "alice", "exp": exp,
                           "rooms": {"read": ["chat:a"], "write": ["chat:*"]}}));
    alice.send_json(json!({"t": "auth", "token": only_a})).await;
    let frames = alice
        .collect_until(|v| v["t"] == "error" && v["room"] == "chat:b")
        .await;
    let authed = frames
        .iter()
        .find(|v| v["t"] == "authed")
        .expect("authed comes before the lost subscription's error");
    assert_eq!(authed["exp"], exp);
    assert_eq!(frames.last().expect("non-empty")["code"], "forbidden");

    // chat:b's diffs stop; chat:a's keep coming.
    alice
        .ack("1", "chat:b", json!({"type": "post", "text": "b"}))
        .await;
    let seq = alice
        .ack("2", "chat:a", json!({"type": "post", "text": "a"}))
        .await;
    let diffs = alice.diffs_until("chat:a", seq).await;
    assert!(!diffs.is_empty());
    let sub_b = alice.sub_msg(json!({"t": "sub", "room": "chat:b"})).await;
    assert_eq!(sub_b["code"], "forbidden");

    // The old token expired 3 s after it was issued; the new one keeps the connection.
    alice.expect_silence(Duration::from_secs(4)).await;
    alice
        .ack("3", "chat:a", json!({"type": "post", "text": "still here"}))
        .await;

    // A token without exp: `authed` with exp null.
    let forever = hs(json!({"sub": "alice", "rooms": {"read": ["chat:a"]}}));
    alice
        .send_json(json!({"t": "auth", "token": forever}))
        .await;
    let authed = alice.recv_until(|v| v["t"] == "authed").await;
    assert_eq!(authed["exp"], Value::Null);
}

#[tokio::test]
async fn admin_disconnect_closes_every_connection_of_the_user_with_4403() {
    let server = Server::start(&["--jwt-secret", SECRET, "--api-key", "ops-key"]).await;
    let user = |sub: &str| hs(json!({"sub": sub, "rooms": {"read": ["*"]}}));
    let mut alice1 = connect_token(&server, &user("alice")).await;
    let mut alice2 = connect_token(&server, &user("alice")).await;
    let mut bob = connect_token(&server, &user("bob")).await;

    let plain = format!("Bearer {}", user("carol"));
    let refused = server
        .http(
            "POST",
            "/api/users/alice/disconnect",
            &[("Authorization", &plain)],
            Some(&json!({})),
        )
        .await;
    assert_eq!(refused.status, 403);
    let anonymous = server
        .http("POST", "/api/users/alice/disconnect", &[], Some(&json!({})))
        .await;
    assert_eq!(anonymous.status, 401);

    let admin = format!("Bearer {}", admin_token());
    let done = server
        .http(
            "POST",
            "/api/users/alice/disconnect",
            &[("Authorization", &admin)],
            Some(&json!({})),
        )
        .await;
    assert_eq!(done.status, 200, "{}", done.text);
    assert_eq!(done.body, json!({"closed": 2}));
    alice1.expect_close(4403).await;
    alice2.expect_close(4403).await;
    bob.sub_msg(json!({"t": "sub", "room": "chat:x"})).await;

    let by_key = server
        .http(
            "POST",
            "/api/users/bob/disconnect",
            &[("X-Roomd-Api-Key", "ops-key")],
            Some(&json!({})),
        )
        .await;
    assert_eq!(by_key.body, json!({"closed": 1}));
    bob.expect_close(4403).await;
    let nobody = server
        .http(
            "POST",
            "/api/users/nobody/disconnect",
            &[("X-Roomd-Api-Key", "ops-key")],
            Some(&json!({})),
        )
        .await;
    assert_eq!(nobody.body, json!({"closed": 0}));
}

#[tokio::test]
async fn admin_signal_reaches_every_subscriber_from_user_server() {
    let server = Server::start(&["--jwt-secret", SECRET]).await;
    setup_rooms(&server, &[("chat:general", "chat", json!({}))]).await;
    let reader = |sub: &str| hs(json!({"sub": sub, "rooms": {"read": ["chat:*"]}}));
    let mut alice = connect_token(&server, &reader("alice")).await;
    let mut bob = connect_token(&server, &reader("bob")).await;
    alice.sub("chat:general").await;
    bob.sub("chat:general").await;
    let body = json!({"data": {"notice": "maintenance at noon"}});
    let plain = format!("Bearer {}", reader("carol"));
    let refused = server
        .http(
            "POST",
            "/api/rooms/chat:general/signal",
            &[("Authorization", &plain)],
            Some(&body),
        )
        .await;
    assert_eq!(refused.status, 403);
    let admin = format!("Bearer {}", admin_token());
    let sent = server
        .http(
            "POST",
            "/api/rooms/chat:general/signal",
            &[("Authorization", &admin)],
            Some(&body),
        )
        .await;
    assert_eq!(sent.status, 202, "{}", sent.text);
    for client in [&mut alice, &mut bob] {
        let signal = client.recv_until(|v| v["t"] == "signal").await;
        assert_eq!(
            signal,
            json!({"t": "signal", "room": "chat:general", "user": "server",
                   "data": {"notice": "maintenance at noon"}})
        );
    }
    let large = json!({"data": "x".repeat(2000)});
    let too_large = server
        .http(
            "POST",
            "/api/rooms/chat:general/signal",
            &[("Authorization", &admin)],
            Some(&large),
        )
        .await;
    assert_eq!(too_large.status, 413);
}

/// Runs `roomd token ARGS` and returns the token it prints.
fn roomd_token(args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_roomd"))
        .arg("token")
        .args(args)
        .env_remove("ROOMD_JWT_SECRET")
        .output()
        .expect("roomd token runs");
    assert!(
        output.status.success(),
        "roomd token failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("the token is UTF-8")
        .trim()
        .to_owned()
}

#[tokio::test]
async fn roomd_token_mints_tokens_the_server_accepts() {
    let server = Server::start(&["--jwt-secret", SECRET]).await;
    setup_rooms(&server, &[("chat:general", "chat", json!({}))]).await;
    let token = roomd_token(&[
        "--jwt-secret",
        SECRET,
        "--sub",
        "alice",
        "--read",
        "chat:*",
        "--write",
        "chat:general",
        "--ttl",
        "1h",
    ]);
    let mut alice = connect_token(&server, &token).await;
    assert_eq!(alice.welcome["user"], "alice");
    alice.sub("chat:general").await;
    alice
        .ack(
            "1",
            "chat:general",
            json!({"type": "post", "text": "minted"}),
        )
        .await;
    assert_eq!(
        alice.create("chat:new", "chat", json!({})).await["code"],
        "forbidden"
    );
    let admin = roomd_token(&["--jwt-secret", SECRET, "--sub", "root", "--admin"]);
    let mut root = connect_token(&server, &admin).await;
    root.create_ok("chat:new", "chat", json!({})).await;

    let rsa = Server::start(&["--jwt-public-key", &key_arg("rsa_public.pem")]).await;
    let token = roomd_token(&[
        "--jwt-private-key",
        &key_arg("rsa_private.pem"),
        "--sub",
        "bob",
        "--ttl",
        "10m",
    ]);
    assert_eq!(accepted_user(&rsa, &token).await, Ok("bob".into()));
}
