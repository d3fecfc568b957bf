//! The cost bound of HTTP room reads (`GET /api/rooms/{room}`, `?at=`, `/events`).
//!
//! A read holds a copy of what it sends: the room's committed entries, a state rebuilt
//! from the log, or a page of events, up to a room's 64 MiB. Three things bound it:
//! - a rate per client IP (`--read-rate`, burst twice that; over it, 429);
//! - turns: at most `--max-reads-in-flight` reads are built and sent at once; the
//!   others wait up to [`TURN_WAIT`] for a turn, then get 503 `unavailable`. A turn
//!   lasts until the reply is sent (or the client goes), and a reply not sent within
//!   `--reply-timeout` has its connection cut, so a client that does not read cannot
//!   keep a turn;
//! - the reply is streamed: items are serialized 64 KiB at a time as the client takes
//!   them, and each item's copy is freed once written, so a read never holds a second
//!   full copy as JSON text (it took ~100-125 MB per 64 MiB room before).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::Value as Json;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::ApiError;
use crate::outbound::KillSwitch;
use crate::protocol::codes::Code;

/// How long a read waits for a turn before it is answered 503.
pub const TURN_WAIT: Duration = Duration::from_secs(10);

/// Bytes serialized per chunk of a streamed reply.
const CHUNK_BYTES: usize = 64 * 1024;

/// The rate and the turns of reads, shared by every worker.
pub struct ReadGate {
    /// Keyed by client IP; pruned with the other limiters (`server.rs`), so the map is
    /// bounded by the addresses seen within about one burst.
    per_ip: DefaultKeyedRateLimiter<IpAddr>,
    rate: u32,
    turns: Arc<Semaphore>,
    max_turns: usize,
    reply_timeout: Duration,
}

impl ReadGate {
    pub fn new(rate: u32, max_in_flight: usize, reply_timeout: Duration) -> ReadGate {
        let per_second = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
        let burst = per_second.saturating_mul(NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN));
        ReadGate {
            per_ip: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            rate,
            turns: Arc::new(Semaphore::new(max_in_flight.max(1))),
            max_turns: max_in_flight.max(1),
            reply_timeout,
        }
    }

    /// Charges one read to `ip` (None: address unknown, not limited).
    pub fn charge(&self, ip: Option<IpAddr>) -> Result<(), ApiError> {
        match ip {
            Some(ip) if self.per_ip.check_key(&ip).is_err() => Err(ApiError::new(
                Code::RateLimited,
                format!(
                    "too many reads from this address: {} per second (--read-rate)",
                    self.rate
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Waits for a turn to build and send one reply; `kill` cuts the connection if the
    /// reply is not sent within the reply timeout.
    pub async fn turn(&self, kill: KillSwitch) -> Result<Turn, ApiError> {
        let permit = tokio::time::timeout(TURN_WAIT, self.turns.clone().acquire_owned()).await;
        let permit = match permit {
            Ok(Ok(permit)) => permit,
            // The semaphore is never closed; a closed one would mean shutdown.
            Ok(Err(_)) | Err(_) => {
                return Err(ApiError::new(
                    Code::Unavailable,
                    format!(
                        "{} reads are being sent (--max-reads-in-flight) and none finished \
                         within {} s; retry",
                        self.max_turns,
                        TURN_WAIT.as_secs()
                    ),
                ))
            }
        };
        let (done, finished) = oneshot::channel::<()>();
        let timeout = self.reply_timeout;
        tokio::spawn(async move {
            tokio::select! {
                // The turn ended (its sender dropped): nothing to do.
                _ = finished => {}
                _ = tokio::time::sleep(timeout) => {
                    tracing::info!(?timeout, "a read's reply was not taken in time; disconnecting");
                    kill.kill();
                }
            }
        });
        Ok(Turn {
            _permit: permit,
            _done: done,
        })
    }

    /// Forgets the rate buckets of addresses quiet long enough to refill them.
    pub fn prune(&self) {
        self.per_ip.retain_recent();
        self.per_ip.shrink_to_fit();
    }
}

/// One read's turn: held by its reply until the last byte is handed to actix or the
/// reply is dropped; dropping it frees the turn and stops the reply timer.
pub struct Turn {
    _permit: OwnedSemaphorePermit,
    _done: oneshot::Sender<()>,
}

/// A JSON object whose one list is streamed: `head` (the object up to the list's `[`),
/// the items comma-separated, then `]}`.
pub struct StreamedJson {
    head: Option<Bytes>,
    items: Box<dyn Iterator<Item = Json>>,
    first: bool,
    /// Freed with the last chunk.
    turn: Option<Turn>,
}

impl StreamedJson {
    /// `head` must be a JSON object's text without its closing brace, ending in
    /// `"name":[` (see [`object_head`]).
    pub fn new(head: String, items: Box<dyn Iterator<Item = Json>>, turn: Turn) -> StreamedJson {
        StreamedJson {
            head: Some(Bytes::from(head)),
            items,
            first: true,
            turn: Some(turn),
        }
    }
}

/// The text of `fields` as an object, left open with `"list":[` at the end.
pub fn object_head(fields: &serde_json::Map<String, Json>, list: &str) -> String {
    let mut text = Json::Object(fields.clone()).to_string();
    text.pop(); // the closing brace, which `to_string` always writes last
    if !fields.is_empty() {
        text.push(',');
    }
    text.push_str(&Json::String(list.to_owned()).to_string());
    text.push_str(":[");
    text
}

impl Stream for StreamedJson {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.turn.is_none() {
            return Poll::Ready(None);
        }
        let mut chunk = match self.head.take() {
            Some(head) => head.to_vec(),
            None => Vec::with_capacity(CHUNK_BYTES + 1024),
        };
        while chunk.len() < CHUNK_BYTES {
            let Some(item) = self.items.next() else {
                chunk.extend_from_slice(b"]}");
                // The reply is complete: free the turn now rather than when actix
                // drops the body.
                self.turn = None;
                break;
            };
            if !std::mem::take(&mut self.first) {
                chunk.push(b',');
            }
            // Writing a `serde_json::Value` into a Vec cannot fail: its keys are strings
            // and the writer is infallible.
            let _ = serde_json::to_writer(&mut chunk, &item);
        }
        Poll::Ready(Some(Ok(Bytes::from(chunk))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use serde_json::json;

    #[tokio::test]
    async fn a_streamed_reply_is_one_json_object_and_frees_its_turn() {
        let gate = ReadGate::new(10, 1, Duration::from_secs(60));
        let turn = gate
            .turn(KillSwitch::default())
            .await
            .expect("one turn is free");
        let mut fields = serde_json::Map::new();
        fields.insert("head".into(), json!(7));
        let items: Vec<Json> = (0..20_000).map(|i| json!({ "seq": i })).collect();
        let body = StreamedJson::new(
            object_head(&fields, "events"),
            Box::new(items.into_iter()),
            turn,
        );
        let chunks: Vec<Bytes> = body.map(|c| c.expect("infallible")).collect().await;
        assert!(chunks.len() > 1, "20,000 items take more than one chunk");
        let text: Vec<u8> = chunks.concat();
        let value: Json = serde_json::from_slice(&text).expect("valid JSON");
        assert_eq!(value["head"], 7);
        assert_eq!(value["events"].as_array().map(Vec::len), Some(20_000));
        assert_eq!(value["events"][19_999]["seq"], 19_999);
        gate.turn(KillSwitch::default())
            .await
            .expect("the finished reply gave its turn back");
    }

    #[test]
    fn an_empty_list_is_still_an_object() {
        let head = object_head(&serde_json::Map::new(), "entries");
        assert_eq!(head, r#"{"entries":["#);
    }

    #[test]
    fn reads_over_the_burst_are_refused() {
        let gate = ReadGate::new(1, 1, Duration::from_secs(60));
        let ip: IpAddr = "127.0.0.1".parse().expect("literal");
        assert!(gate.charge(Some(ip)).is_ok());
        assert!(gate.charge(Some(ip)).is_ok());
        assert!(gate.charge(Some(ip)).is_err());
        assert!(
            gate.charge(None).is_ok(),
            "an unknown address is not limited"
        );
    }
}
