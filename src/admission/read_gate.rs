//! The rate and the turns of HTTP room reads (`GET /api/rooms/{room}`, `?at=`,
//! `/events`): what a read must get before it is built.
//!
//! A read holds a copy of what it sends: the room's committed entries, a state rebuilt
//! from the log, or a page of events, up to a room's 64 MiB. Two things here bound how
//! many such copies exist:
//! - a rate per client IP (`--read-rate`, burst twice that; over it,
//!   [`ReadRefused::RateLimited`], 429);
//! - turns: at most `--max-reads-in-flight` reads are built and sent at once; the
//!   others wait up to [`TURN_WAIT`] for a turn, then get [`ReadRefused::Busy`] (503
//!   `unavailable`). A turn lasts until the reply is sent (or the client goes), and a
//!   reply not sent within `--reply-timeout` has its connection cut, so a client that
//!   does not read cannot keep a turn.
//!
//! Streaming the reply (the third bound) and the mapping of [`ReadRefused`] to the
//! contract's codes are `http::reads`'s.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::outbound::KillSwitch;

/// Why a read was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReadRefused {
    /// The client's address is over `--read-rate` (429 `rate_limited`).
    #[error("too many reads from this address: {rate} per second (--read-rate)")]
    RateLimited { rate: u32 },
    /// No turn came free within [`TURN_WAIT`] (503 `unavailable`).
    #[error(
        "{max_turns} reads are being sent (--max-reads-in-flight) and none finished \
         within {wait_secs} s; retry"
    )]
    Busy { max_turns: usize, wait_secs: u64 },
}

/// How long a read waits for a turn before it is answered 503.
pub const TURN_WAIT: Duration = Duration::from_secs(10);

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
    pub fn charge(&self, ip: Option<IpAddr>) -> Result<(), ReadRefused> {
        match ip {
            Some(ip) if self.per_ip.check_key(&ip).is_err() => {
                Err(ReadRefused::RateLimited { rate: self.rate })
            }
            _ => Ok(()),
        }
    }

    /// Waits for a turn to build and send one reply; `kill` cuts the connection if the
    /// reply is not sent within the reply timeout.
    pub async fn turn(&self, kill: KillSwitch) -> Result<Turn, ReadRefused> {
        let permit = tokio::time::timeout(TURN_WAIT, self.turns.clone().acquire_owned()).await;
        let permit = match permit {
            Ok(Ok(permit)) => permit,
            // The semaphore is never closed; a closed one would mean shutdown.
            Ok(Err(_)) | Err(_) => {
                return Err(ReadRefused::Busy {
                    max_turns: self.max_turns,
                    wait_secs: TURN_WAIT.as_secs(),
                })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dropped_turn_is_given_back() {
        let gate = ReadGate::new(10, 1, Duration::from_secs(60));
        let turn = gate
            .turn(KillSwitch::default())
            .await
            .expect("one turn is free");
        drop(turn);
        gate.turn(KillSwitch::default())
            .await
            .expect("the dropped turn came back");
    }

    #[test]
    fn reads_over_the_burst_are_refused() {
        let gate = ReadGate::new(1, 1, Duration::from_secs(60));
        let ip: IpAddr = "127.0.0.1".parse().expect("literal");
        assert!(gate.charge(Some(ip)).is_ok());
        assert!(gate.charge(Some(ip)).is_ok());
        assert_eq!(
            gate.charge(Some(ip)),
            Err(ReadRefused::RateLimited { rate: 1 })
        );
        assert!(
            gate.charge(None).is_ok(),
            "an unknown address is not limited"
        );
    }

    #[test]
    fn refusals_name_the_flag_and_the_numbers() {
        let busy = ReadRefused::Busy {
            max_turns: 4,
            wait_secs: 10,
        };
        assert_eq!(
            busy.to_string(),
            "4 reads are being sent (--max-reads-in-flight) and none finished within 10 s; retry"
        );
    }
}
