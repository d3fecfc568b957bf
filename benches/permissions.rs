//! The cost of access control on the hot paths (PROTOCOL.md 1.1 "Access control"):
//!
//! - `op_write_check`: the `write` check of one op, for a token with three write
//!   patterns where the matching one is last (`Identity::may`, what the Session runs
//!   before every `op`; HTTP ops run the same check).
//! - `sub_read_check`: the `read` check of one `sub` (same token, read patterns).
//! - `sub_read_refused`: a `sub` refused after trying every pattern.
//! - `token_verify_and_compile`: verifying an HS256 token and compiling its patterns,
//!   paid once per connection (and per `auth` refresh), never per op.
//!
//! Diffs, presence and signals are delivered without any check, so there is no
//! per-delivery cost to measure.
//!
//! Run: `cargo bench --bench permissions` (add `-- --quick` for a shorter run).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use roomd::auth::{Auth, Identity, Permission};

const SECRET: &str = "bench-secret";

fn token() -> String {
    let claims = serde_json::json!({
        "sub": "alice",
        "exp": 4_102_444_800u64,
        "rooms": {
            "read": ["dm:{sub}:*", "poll:*", "chat:*"],
            "write": ["dm:{sub}:*", "game:{sub}-*", "chat:general"],
            "create": ["game:{sub}-*"],
        },
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("an HS256 token of a JSON object encodes")
}

fn identity(auth: &Auth) -> Identity {
    auth.verify_token(&token())
        .expect("the bench token verifies with its own secret")
}

fn permissions(c: &mut Criterion) {
    let auth = Auth::with_secret(Some(SECRET));
    let alice = identity(&auth);
    assert!(alice.may(Permission::Write, "chat:general"));
    assert!(alice.may(Permission::Read, "chat:general"));
    assert!(!alice.may(Permission::Read, "state:secret"));

    c.bench_function("op_write_check", |b| {
        b.iter(|| black_box(&alice).may(Permission::Write, black_box("chat:general")))
    });
    c.bench_function("sub_read_check", |b| {
        b.iter(|| black_box(&alice).may(Permission::Read, black_box("chat:general")))
    });
    c.bench_function("sub_read_refused", |b| {
        b.iter(|| black_box(&alice).may(Permission::Read, black_box("state:secret")))
    });
    let token = token();
    c.bench_function("token_verify_and_compile", |b| {
        b.iter(|| auth.verify_token(black_box(&token)))
    });
}

criterion_group!(benches, permissions);
criterion_main!(benches);
