//! `roomd token`: mints a development JWT from the server's key, so a team can turn
//! auth on before its identity provider is wired up.
//!
//! It signs with `--jwt-secret` (HS256 by default) or `--jwt-private-key FILE` (PEM:
//! RSA -> RS256, EC -> ES256, Ed25519 -> EdDSA, unless `--alg` says otherwise) and
//! prints the token on stdout. The claims are those of PROTOCOL.md 1.1 "Access control".
//! Verification lives in `auth`; this module only signs.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::config::parse_duration;

/// Flags of `roomd token`.
#[derive(Args, Debug, Clone)]
pub struct TokenArgs {
    /// The user id (`sub`).
    #[arg(long)]
    pub sub: String,

    /// Room patterns the user may read (`sub`, GET); comma separated or repeated.
    /// `*` matches any run of characters, `{sub}` stands for the user id.
    #[arg(long, value_delimiter = ',')]
    pub read: Vec<String>,

    /// Room patterns the user may write (`op`, `signal`).
    #[arg(long, value_delimiter = ',')]
    pub write: Vec<String>,

    /// Room patterns the user may create.
    #[arg(long, value_delimiter = ',')]
    pub create: Vec<String>,

    /// Make the holder an admin (every permission on every room, the admin API).
    #[arg(long)]
    pub admin: bool,

    /// Lifetime (`exp` = now + this), e.g. `15m`, `1h`; `0` for a token without `exp`.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,

    /// HMAC secret to sign with (the server's --jwt-secret).
    #[arg(long, env = "ROOMD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM private key to sign with (RSA, EC P-256/P-384 or Ed25519).
    #[arg(long, value_name = "FILE", conflicts_with = "jwt_secret")]
    pub jwt_private_key: Option<PathBuf>,

    /// Signing algorithm, when the key type's default is not wanted (e.g. HS512, PS256,
    /// ES384).
    #[arg(long)]
    pub alg: Option<String>,

    /// `kid` header, for servers verifying with a JWKS.
    #[arg(long)]
    pub kid: Option<String>,

    /// `iss` claim (for servers run with --jwt-issuer).
    #[arg(long)]
    pub issuer: Option<String>,

    /// `aud` claim (for servers run with --jwt-audience).
    #[arg(long)]
    pub audience: Option<String>,
}

/// Why no token could be made.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("give --jwt-secret or --jwt-private-key to sign with")]
    NoKey,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} holds no RSA, EC or Ed25519 private key in PEM")]
    NotAPrivateKey(PathBuf),
    #[error("unknown algorithm `{0}`")]
    UnknownAlg(String),
    #[error("cannot sign: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// Builds the signed token.
pub fn mint(args: &TokenArgs) -> Result<String, TokenError> {
    let (key, default_alg) = match (&args.jwt_secret, &args.jwt_private_key) {
        (Some(secret), _) => (
            EncodingKey::from_secret(secret.as_bytes()),
            Algorithm::HS256,
        ),
        (None, Some(path)) => {
            let pem = std::fs::read(path).map_err(|source| TokenError::Read {
                path: path.clone(),
                source,
            })?;
            if let Ok(key) = EncodingKey::from_rsa_pem(&pem) {
                (key, Algorithm::RS256)
            } else if let Ok(key) = EncodingKey::from_ec_pem(&pem) {
                (key, Algorithm::ES256)
            } else if let Ok(key) = EncodingKey::from_ed_pem(&pem) {
                (key, Algorithm::EdDSA)
            } else {
                return Err(TokenError::NotAPrivateKey(path.clone()));
            }
        }
        (None, None) => return Err(TokenError::NoKey),
    };
    let alg = match &args.alg {
        Some(name) => name
            .to_ascii_uppercase()
            .parse::<Algorithm>()
            .or_else(|_| name.parse::<Algorithm>())
            .map_err(|_| TokenError::UnknownAlg(name.clone()))?,
        None => default_alg,
    };
    let mut claims = json!({
        "sub": args.sub,
        "rooms": {"read": args.read, "write": args.write, "create": args.create},
    });
    if args.admin {
        claims["admin"] = json!(true);
    }
    if !args.ttl.is_zero() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        claims["exp"] = json!(now + args.ttl.as_secs().max(1));
    }
    if let Some(issuer) = &args.issuer {
        claims["iss"] = json!(issuer);
    }
    if let Some(audience) = &args.audience {
        claims["aud"] = json!(audience);
    }
    let mut header = Header::new(alg);
    header.kid = args.kid.clone();
    Ok(jsonwebtoken::encode(&header, &claims, &key)?)
}

/// `roomd token`: prints the token.
pub fn run(args: TokenArgs) -> Result<(), TokenError> {
    println!("{}", mint(&args)?);
    Ok(())
}
