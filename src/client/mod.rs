//! `roomd::client`: an async Rust client for roomd (tokio + tokio-tungstenite).
//!
//! It speaks the contract of PROTOCOL.md over one WebSocket, in `roomd.v1.rkyv` (the
//! default) or `roomd.v1.json`, and keeps going across lost connections:
//!
//! - [`Client::op`] and [`Client::create`] resolve to the seq of their `ack`, or to the
//!   `nack` ([`OpError::Nack`]). Op ids are generated here (a random 64-bit prefix per
//!   client plus a counter), so they are unique per user across clients.
//! - [`Client::subscribe`] returns a [`Subscription`]: a live mirror of the room's
//!   entries (`entries()`, `get()`, `seq()`, `epoch()`), readable at any time, plus a
//!   stream of [`RoomEvent`]s (`next().await`, or as a `futures::Stream`).
//! - When the connection is lost the client reconnects with exponential backoff and
//!   full jitter ([`Reconnect`]), re-subscribes every room with `since` its mirror's
//!   `{epoch, seq}` (the server answers `resumed`, or a `snapshot` that replaces the
//!   mirror), then re-sends every op not yet answered with its *original* id, in the
//!   original order. The server deduplicates ids, so a caller still awaiting `op()`
//!   gets the original ack and the op applies once. Guests are the exception: the
//!   server does not deduplicate their ops, so a guest's op that was sent before the
//!   loss fails with [`OpError::Interrupted`] instead of being re-sent. The server
//!   answers a re-sent id from its record before its rate limit applies; a re-sent op
//!   that is nacked `rate_limited` anyway (it never reached the log) is sent again a
//!   second later instead of being reported as refused.
//! - `wss://` endpoints are dialed over TLS (rustls), trusting the system's root
//!   certificates or the CA given in [`Options::tls_roots`] ([`TlsRoots`]).
//! - A `diff` that does not continue a mirror (`from != seq + 1`, or another epoch)
//!   makes the client re-subscribe `since` the mirror; the gap is never papered over.
//! - Close codes: 4001, 4002, 4008 (and 4429, 1000, 1001, unknown codes) reconnect;
//!   4401 ends the client with [`ClientError::Unauthorized`]; 4400, 1009, 1007 and 1002
//!   end it with [`ClientError::Closed`] (reconnecting as-is would fail the same way).
//!   A server frame that does not decode ends it with [`ClientError::Protocol`].
//!   The first connection is not retried: [`Client::connect`] returns its error.
//!
//! # Design
//!
//! One background task (spawned by [`Client::connect`] on the current tokio runtime)
//! owns the socket, reading and writing it, and all state: ops in flight,
//! subscriptions, mirrors. [`Client`] (cheap to clone) and [`Subscription`] are
//! handles that talk to it through channels, all bounded:
//!
//! - Commands (op, create, subscribe, signal, unsubscribe): a channel of
//!   [`Options::command_buffer`] (256) messages. When it is full, the calling method
//!   waits until the task takes the next command.
//! - Ops in flight: at most [`Options::max_in_flight`] (256) ops or creates are
//!   unanswered at once; `op()` waits for a slot. This also bounds what a reconnect
//!   re-sends at once.
//! - Events: each subscription has a channel of [`Options::event_buffer`] (256)
//!   events. The task never waits for a subscriber: when the channel is full, the
//!   mirror still updates, the event is dropped, and a [`RoomEvent::Lagged`] with the
//!   number dropped is delivered in its place once there is room.
//!
//! Signals are ephemeral: one sent while disconnected, or to a room without a live
//! subscription, is dropped. Dropping the future of `op()` does not cancel the op.
//! The connection stays open while any `Client` or `Subscription` handle exists;
//! [`Client::close`] ends it at once and fails whatever is still unanswered.
//!
//! # Example
//!
//! This runs against a roomd server started in-process on `127.0.0.1:0` (hidden setup
//! lines: an actix `System` on its own thread, a temporary data directory).
//!
//! ```
//! # fn start_server() -> (String, impl FnOnce()) {
//! #     use clap::{Args, FromArgMatches};
//! #     let dir = tempfile::tempdir().expect("a temporary directory can be created");
//! #     let data_dir = dir.path().to_str().expect("temporary paths are UTF-8 here").to_owned();
//! #     let flags = ["roomd", "--data-dir", data_dir.as_str(), "--workers", "1"];
//! #     let matches = roomd::config::ServeArgs::augment_args(clap::Command::new("roomd"))
//! #         .get_matches_from(flags);
//! #     let args = roomd::config::ServeArgs::from_arg_matches(&matches).expect("valid flags");
//! #     let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
//! #     let addr = listener.local_addr().expect("a bound listener has an address");
//! #     let config = roomd::config::Config {
//! #         bind: addr,
//! #         ..args.into_config().expect("a loopback config is valid")
//! #     };
//! #     let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! #     let server = std::thread::spawn(move || {
//! #         actix_rt::System::new()
//! #             .block_on(roomd::server::run(config, listener, async {
//! #                 let _ = stopped.await;
//! #             }))
//! #             .map_err(|e| e.to_string())
//! #     });
//! #     let stop = move || {
//! #         let _ = stop.send(());
//! #         let result = server.join().expect("the server thread does not panic");
//! #         result.expect("the server shuts down cleanly");
//! #         drop(dir);
//! #     };
//! #     (format!("ws://{addr}/ws"), stop)
//! # }
//! # let (url, stop_server) = start_server();
//! use roomd::client::{Client, Options, RoomEvent, SubscribeOptions};
//! use roomd::value::Value;
//!
//! let runtime = tokio::runtime::Runtime::new()?;
//! runtime.block_on(async {
//!     // `url` is "ws://127.0.0.1:<port>/ws".
//!     let client = Client::connect(url.as_str(), Options::user("alice")).await?;
//!     let init = Value::map([("entries", Value::map([("score", Value::Int(0))]))]);
//!     assert_eq!(client.create("state:demo", "state", init).await?, 1);
//!
//!     let mut sub = client
//!         .subscribe("state:demo", SubscribeOptions::default())
//!         .await?;
//!     assert!(matches!(sub.next().await, Some(RoomEvent::Snapshot { seq: 1, .. })));
//!
//!     let incr = Value::map([
//!         ("type", Value::Str("incr".into())),
//!         ("key", Value::Str("score".into())),
//!         ("by", Value::Int(5)),
//!     ]);
//!     let seq = client.op("state:demo", incr).await?;
//!     // The op's diff may arrive just before or just after its ack.
//!     while sub.seq() < seq {
//!         sub.next().await;
//!     }
//!     assert_eq!(sub.get("score"), Some((Value::Int(5), seq)));
//!
//!     client.close().await;
//!     Ok::<_, Box<dyn std::error::Error>>(())
//! })?;
//! # stop_server();
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! ```

mod backoff;
mod codec;
mod driver;
mod error;
mod mirror;
mod options;
mod subscription;
mod tls;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch, Semaphore};

pub use codec::{decode_server, encode_client};
pub use error::{ClientError, OpError};
pub use options::{Auth, Encoding, Endpoint, Options, Reconnect, TlsRoots};
pub use subscription::{Change, Entry, Member, Presence, RoomEvent, Subscription};

use crate::protocol::codes::Code;
use crate::value::{Value, MAX_DEPTH};
use driver::{Command, Driver, OpBody};

/// Options of one subscription.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Also receive the member list and joins/leaves ([`RoomEvent::Presence`]).
    pub presence: bool,
}

/// Where the client's connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Connecting, or waiting to reconnect. Requests are queued meanwhile.
    Connecting,
    /// Between `welcome` and the loss of the connection.
    Connected {
        session: String,
        user: String,
        /// 1 for the first connection, counting every reconnect.
        connection: u64,
    },
    /// The client ended for good, for this reason.
    Closed(ClientError),
}

/// A handle to one roomd connection; clone it freely. See the module docs.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<Status>,
    in_flight: Arc<Semaphore>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("status", &*self.status.borrow())
            .finish()
    }
}

impl Client {
    /// Connects to `endpoint` (e.g. `"ws://127.0.0.1:8080/ws"`, or an
    /// [`Endpoint::provider`]) and waits for the server's `welcome`. Must be called
    /// inside a tokio runtime: the connection task is spawned on it.
    pub async fn connect(
        endpoint: impl Into<Endpoint>,
        options: Options,
    ) -> Result<Client, ClientError> {
        let (commands, receiver) = mpsc::channel(options.command_buffer.max(1));
        let (status_tx, status) = watch::channel(Status::Connecting);
        let in_flight = Arc::new(Semaphore::new(
            options.max_in_flight.clamp(1, Semaphore::MAX_PERMITS),
        ));
        let driver = Driver::new(
            endpoint.into(),
            options,
            receiver,
            commands.downgrade(),
            status_tx,
            in_flight.clone(),
        );
        let (first_tx, first) = oneshot::channel();
        tokio::spawn(driver.run(first_tx));
        match first.await {
            Ok(Ok(())) => Ok(Client {
                commands,
                status,
                in_flight,
            }),
            Ok(Err(e)) => Err(e),
            // The task always answers before it ends; this is only a panic in it.
            Err(_) => Err(ClientError::ClientClosed),
        }
    }

    /// Applies `op` to `room`; resolves to the seq of its `ack`. Keeps waiting across
    /// reconnects (the op is re-sent with its id, and the server answers once).
    pub async fn op(&self, room: &str, op: Value) -> Result<u64, OpError> {
        check_value(&op).map_err(|why| OpError::Nack {
            code: Code::Invalid,
            msg: format!("op: {why}"),
        })?;
        self.submit(room, OpBody::Op(op)).await
    }

    /// Creates `room` of `kind` (`chat`, `poll`, `state`); resolves to seq 1, or to a
    /// nack (`exists`, `invalid`, `forbidden`). Re-sent across reconnects like an op.
    pub async fn create(&self, room: &str, kind: &str, init: Value) -> Result<u64, OpError> {
        check_value(&init).map_err(|why| OpError::Nack {
            code: Code::Invalid,
            msg: format!("init: {why}"),
        })?;
        let body = OpBody::Create {
            kind: kind.to_owned(),
            init,
        };
        self.submit(room, body).await
    }

    async fn submit(&self, room: &str, body: OpBody) -> Result<u64, OpError> {
        let permit = self
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| self.end_reason())?;
        let (reply, answer) = oneshot::channel();
        let command = Command::Op {
            room: room.to_owned(),
            body,
            permit,
            reply,
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| self.end_reason())?;
        answer
            .await
            .unwrap_or_else(|_| Err(OpError::Client(self.end_reason())))
    }

    /// Subscribes to `room`; resolves once its first snapshot is in the mirror (the
    /// subscription's first event is that [`RoomEvent::Snapshot`]). A room that does
    /// not exist is [`ClientError::Room`] with `not_found`.
    pub async fn subscribe(
        &self,
        room: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, ClientError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Subscribe {
            room: room.to_owned(),
            presence: options.presence,
            reply,
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| self.end_reason())?;
        answer.await.unwrap_or_else(|_| Err(self.end_reason()))
    }

    /// Sends an ephemeral message to the room's other members. Requires a live
    /// subscription to the room; not acknowledged, and dropped while disconnected.
    pub async fn signal(&self, room: &str, data: Value) -> Result<(), ClientError> {
        check_value(&data).map_err(ClientError::InvalidValue)?;
        let command = Command::Signal {
            room: room.to_owned(),
            data,
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| self.end_reason())
    }

    /// Closes the connection and ends the client: unanswered ops fail with
    /// [`ClientError::ClientClosed`] and every subscription's stream ends.
    pub async fn close(&self) {
        let _ = self.commands.send(Command::Close).await;
        let mut status = self.status.clone();
        // An error here means the task is gone, which is what we wait for.
        let _ = status.wait_for(|s| matches!(s, Status::Closed(_))).await;
    }

    /// The connection's current status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change (connects, losses, the end).
    pub fn status_changes(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Why the client ended; `ClientClosed` if it has not recorded a reason.
    fn end_reason(&self) -> ClientError {
        match &*self.status.borrow() {
            Status::Closed(e) => e.clone(),
            _ => ClientError::ClientClosed,
        }
    }
}

/// The value rules the server enforces (depth, finite floats), checked before sending
/// so that such a value is refused like the server would (`invalid`) in both encodings.
/// Recursion stops at `MAX_DEPTH + 1` levels.
fn check_value(value: &Value) -> Result<(), String> {
    fn at(value: &Value, depth: usize) -> Result<(), String> {
        match value {
            Value::Float(f) if !f.is_finite() => Err("NaN and infinities are not values".into()),
            Value::List(_) | Value::Map(_) if depth >= MAX_DEPTH => {
                Err(format!("value nested deeper than {MAX_DEPTH} levels"))
            }
            Value::List(items) => items.iter().try_for_each(|v| at(v, depth + 1)),
            Value::Map(map) => map.values().try_for_each(|v| at(v, depth + 1)),
            _ => Ok(()),
        }
    }
    at(value, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> Value {
        let mut v = Value::Int(1);
        for _ in 0..depth {
            v = Value::List(vec![v]);
        }
        v
    }

    #[test]
    fn values_are_checked_like_the_server_checks_them() {
        assert!(check_value(&nested(MAX_DEPTH)).is_ok());
        assert!(check_value(&nested(MAX_DEPTH + 1)).is_err());
        assert!(check_value(&Value::map([("x", Value::Float(f64::NAN))])).is_err());
        assert!(check_value(&Value::Float(1.5)).is_ok());
    }
}
