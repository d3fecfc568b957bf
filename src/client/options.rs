//! How a [`Client`](super::Client) connects: where to ([`Endpoint`]), as whom ([`Auth`]),
//! in which encoding, whom it trusts over `wss://` ([`TlsRoots`]), how it reconnects
//! ([`Reconnect`]), and the bounds of its queues.
//!
//! Plain data only: the connection task reads these, nothing here does I/O.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use crate::protocol::Encoding;

/// Where the client connects: a fixed `ws://host:port/ws` URL, or a function asked for
/// the URL before every connection attempt (a server that came back on another port, a
/// service registry, a rotating token in the query).
#[derive(Clone)]
pub struct Endpoint(EndpointKind);

#[derive(Clone)]
enum EndpointKind {
    Fixed(String),
    Provider(Arc<dyn Fn() -> String + Send + Sync>),
}

impl Endpoint {
    /// An endpoint that asks `provider` for the URL before every connection attempt.
    pub fn provider(provider: impl Fn() -> String + Send + Sync + 'static) -> Endpoint {
        Endpoint(EndpointKind::Provider(Arc::new(provider)))
    }

    /// The URL to use for the next attempt.
    pub fn url(&self) -> String {
        match &self.0 {
            EndpointKind::Fixed(url) => url.clone(),
            EndpointKind::Provider(provider) => provider(),
        }
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            EndpointKind::Fixed(url) => f.debug_tuple("Endpoint").field(url).finish(),
            EndpointKind::Provider(_) => f.write_str("Endpoint(<provider>)"),
        }
    }
}

impl From<&str> for Endpoint {
    fn from(url: &str) -> Endpoint {
        Endpoint(EndpointKind::Fixed(url.to_owned()))
    }
}

impl From<String> for Endpoint {
    fn from(url: String) -> Endpoint {
        Endpoint(EndpointKind::Fixed(url))
    }
}

impl From<&String> for Endpoint {
    fn from(url: &String) -> Endpoint {
        Endpoint(EndpointKind::Fixed(url.clone()))
    }
}

/// Who the client is on the server (PROTOCOL.md "Transport", identity).
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// `?user=<id>`: for servers with auth off (loopback development and tests).
    User(String),
    /// A JWT sent as `Authorization: Bearer <token>` on every upgrade.
    Token(String),
    /// No identity: the server assigns a `guest-…` id per connection. Guests' ops are
    /// never deduplicated by the server, so an op whose answer was lost in a disconnect
    /// is not re-sent: it fails with [`OpError::Interrupted`](super::OpError).
    Guest,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::User(user) => f.debug_tuple("User").field(user).finish(),
            // Tokens are credentials: never in logs.
            Auth::Token(_) => f.write_str("Token(<redacted>)"),
            Auth::Guest => f.write_str("Guest"),
        }
    }
}

/// The certificate authorities a `wss://` server's certificate must chain to. Read
/// once, at the client's first `wss://` connection attempt; unused for `ws://`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TlsRoots {
    /// The operating system's trusted roots (on Linux the OpenSSL store, e.g.
    /// `/etc/ssl/certs`; `SSL_CERT_FILE` / `SSL_CERT_DIR` override it).
    #[default]
    System,
    /// Only the certificates of this PEM text (one or more `CERTIFICATE` blocks): a
    /// private CA, or a self-signed server certificate.
    Pem(Vec<u8>),
    /// Only the certificates of this PEM file.
    File(PathBuf),
}

/// Reconnecting after a connection is lost: exponential backoff with full jitter.
///
/// Attempt `n` (1, 2, …) after a loss waits a uniformly random time in
/// `0 ..= min(cap, base * 2^(n-1))`; a successful `welcome` resets `n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconnect {
    /// The ceiling of the first retry's delay.
    pub base: Duration,
    /// The largest ceiling any retry's delay can have.
    pub cap: Duration,
    /// Give up after this many failed attempts in a row (`None`: never give up;
    /// `Some(0)`: never reconnect).
    pub max_attempts: Option<u32>,
}

impl Reconnect {
    /// No reconnecting: the first lost connection ends the client.
    pub fn disabled() -> Reconnect {
        Reconnect {
            max_attempts: Some(0),
            ..Reconnect::default()
        }
    }
}

impl Default for Reconnect {
    fn default() -> Reconnect {
        Reconnect {
            base: Duration::from_millis(200),
            cap: Duration::from_secs(30),
            max_attempts: None,
        }
    }
}

/// Everything [`Client::connect`](super::Client::connect) needs besides the URL.
#[derive(Debug, Clone)]
pub struct Options {
    pub auth: Auth,
    /// `Rkyv` (`roomd.v1.rkyv`, the default) or `Json` (`roomd.v1.json`).
    pub encoding: Encoding,
    pub reconnect: Reconnect,
    /// Whom `wss://` endpoints must prove to be (default: the system's roots).
    pub tls_roots: TlsRoots,
    /// Bound of the channel from handles to the connection task. When it is full,
    /// `op`, `create`, `subscribe` and `signal` wait for room (backpressure).
    pub command_buffer: usize,
    /// Bound of each subscription's event channel. When it is full the mirror still
    /// updates and the event is dropped; a [`RoomEvent::Lagged`](super::RoomEvent)
    /// marks the place once there is room again.
    pub event_buffer: usize,
    /// Ops (and creates) sent but not yet answered. `op` waits for a free slot when
    /// this many are outstanding; this bounds what is re-sent after a reconnect. The
    /// default stays under the server's default op burst (400), so a reconnect's
    /// re-sends are not nacked `rate_limited`.
    pub max_in_flight: usize,
    /// Longest wait for TCP connect, upgrade and `welcome` together.
    pub connect_timeout: Duration,
    /// Largest server message accepted. The contract puts no limit on server frames
    /// (a snapshot of a 64 MiB room is one frame); this guards the client's memory.
    pub max_message_bytes: usize,
}

impl Options {
    /// Default options for `user` on a server with auth off.
    pub fn user(user: impl Into<String>) -> Options {
        Options {
            auth: Auth::User(user.into()),
            ..Options::default()
        }
    }
}

impl Default for Options {
    fn default() -> Options {
        Options {
            auth: Auth::Guest,
            encoding: Encoding::Rkyv,
            reconnect: Reconnect::default(),
            tls_roots: TlsRoots::System,
            command_buffer: 256,
            event_buffer: 256,
            max_in_flight: 256,
            connect_timeout: Duration::from_secs(10),
            max_message_bytes: 256 << 20,
        }
    }
}
