//! Connection caps: how many WebSocket sessions may be open, and how many handshakes
//! may arrive per second, in total and per client IP.
//!
//! A session holds a [`Permit`] for its whole life; dropping it gives the slot back.
//! Handshakes are counted by token buckets (governor) with a burst of
//! [`BURST_SECONDS`] seconds' worth, so a client that reconnects a few thousand
//! sockets at once (a test suite, a restarted gateway) is let in and a flood is not;
//! every attempt takes a token, refused ones too. Over a cap or a rate, the upgrade is
//! answered on the socket with close 4429 (PROTOCOL.md "Close codes"), like a bad token,
//! so clients see the documented code.
//!
//! The HTTP side's admission lives beside it: [`http_conns`], the per-IP cap on open
//! HTTP connections, and [`read_gate`], the rate and turns of room reads. They sit here,
//! below `shared` (which holds them) and `http` (which applies them), so no module
//! imports one above it.

pub mod http_conns;
pub mod read_gate;

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

/// A handshake rate's burst, in seconds of the rate.
pub const BURST_SECONDS: u32 = 10;

/// The limits, from the server's flags.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub max_total: usize,
    pub max_per_ip: usize,
    /// Handshakes per second in total.
    pub handshakes_total: u32,
    /// Handshakes per second per client IP.
    pub handshakes_per_ip: u32,
}

/// The open-session counts and handshake rates the caps are checked against.
#[derive(Debug)]
pub struct Admission {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    /// Open sessions per client IP; an IP with none has no entry, so the map is bounded
    /// by the open sessions.
    per_ip: DashMap<IpAddr, usize>,
    handshakes_total: DefaultDirectRateLimiter,
    /// Keyed by client IP; [`Admission::prune`] drops keys whose bucket is full again,
    /// so the map is bounded by the addresses seen within about one burst.
    handshakes_per_ip: DefaultKeyedRateLimiter<IpAddr>,
    handshake_rates: (u32, u32),
}

/// `rate` per second with a burst of [`BURST_SECONDS`] seconds' worth.
fn quota(rate: u32) -> Quota {
    let rate = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
    let burst = rate.saturating_mul(NonZeroU32::new(BURST_SECONDS).unwrap_or(NonZeroU32::MIN));
    Quota::per_second(rate).allow_burst(burst)
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("server is at its limit of {0} connections")]
    Total(usize),
    #[error("this address is at its limit of {0} connections")]
    PerIp(usize),
    #[error("too many handshakes: the server takes {0} per second")]
    HandshakesTotal(u32),
    #[error("too many handshakes from this address: {0} per second")]
    HandshakesPerIp(u32),
}

impl Admission {
    pub fn new(caps: Caps) -> Arc<Admission> {
        Arc::new(Admission {
            max_total: caps.max_total,
            max_per_ip: caps.max_per_ip,
            total: AtomicUsize::new(0),
            per_ip: DashMap::new(),
            handshakes_total: RateLimiter::direct(quota(caps.handshakes_total)),
            handshakes_per_ip: RateLimiter::keyed(quota(caps.handshakes_per_ip)),
            handshake_rates: (caps.handshakes_total, caps.handshakes_per_ip),
        })
    }

    /// Counts a handshake from `ip` and takes a slot for its session (None: address
    /// unknown, only the total limits apply).
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Permit, Refused> {
        if let Some(ip) = ip {
            if self.handshakes_per_ip.check_key(&ip).is_err() {
                return Err(Refused::HandshakesPerIp(self.handshake_rates.1));
            }
        }
        if self.handshakes_total.check().is_err() {
            return Err(Refused::HandshakesTotal(self.handshake_rates.0));
        }
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Total(self.max_total));
        }
        if let Some(ip) = ip {
            // The shard guard lives only inside this block: no await, no send.
            let mut count = self.per_ip.entry(ip).or_insert(0);
            if *count >= self.max_per_ip {
                drop(count);
                self.per_ip.remove_if(&ip, |_, n| *n == 0);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(Refused::PerIp(self.max_per_ip));
            }
            *count += 1;
        }
        Ok(Permit {
            admission: self.clone(),
            ip,
        })
    }

    /// Sessions open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Forgets the handshake buckets of addresses that have been quiet long enough to
    /// refill them, and gives back the map's spare capacity.
    pub fn prune(&self) {
        self.handshakes_per_ip.retain_recent();
        self.handshakes_per_ip.shrink_to_fit();
    }
}

/// One admitted session's slot; given back on drop.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    ip: Option<IpAddr>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            if let Some(mut count) = self.admission.per_ip.get_mut(&ip) {
                *count = count.saturating_sub(1);
            }
            self.admission.per_ip.remove_if(&ip, |_, n| *n == 0);
        }
        self.admission.total.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(max_total: usize, max_per_ip: usize) -> Caps {
        Caps {
            max_total,
            max_per_ip,
            handshakes_total: 1_000,
            handshakes_per_ip: 1_000,
        }
    }

    #[test]
    fn handshakes_over_the_burst_are_refused_per_ip_then_in_total() {
        let admission = Admission::new(Caps {
            handshakes_total: 3,
            handshakes_per_ip: 1,
            ..caps(1_000, 1_000)
        });
        let a: IpAddr = "127.0.0.1".parse().expect("literal");
        let b: IpAddr = "127.0.0.2".parse().expect("literal");
        // A burst of ten seconds' worth from one address, then refused.
        for _ in 0..BURST_SECONDS {
            admission.admit(Some(a)).expect("within the burst");
        }
        assert_eq!(
            admission.admit(Some(a)).err(),
            Some(Refused::HandshakesPerIp(1))
        );
        // Another address has its own bucket, until the total one (30) runs dry.
        for _ in 0..BURST_SECONDS {
            admission.admit(Some(b)).expect("within b's burst");
        }
        let c: IpAddr = "127.0.0.3".parse().expect("literal");
        for _ in 0..BURST_SECONDS {
            admission.admit(Some(c)).expect("within the total burst");
        }
        let d: IpAddr = "127.0.0.4".parse().expect("literal");
        assert_eq!(
            admission.admit(Some(d)).err(),
            Some(Refused::HandshakesTotal(3))
        );
    }

    #[test]
    fn caps_hold_and_slots_come_back_on_drop() {
        let admission = Admission::new(caps(3, 2));
        let a: IpAddr = "127.0.0.1".parse().expect("literal");
        let b: IpAddr = "127.0.0.2".parse().expect("literal");
        let first = admission.admit(Some(a)).expect("room for one");
        let _second = admission.admit(Some(a)).expect("room for two");
        assert_eq!(admission.admit(Some(a)).err(), Some(Refused::PerIp(2)));
        let _third = admission.admit(Some(b)).expect("another address");
        assert_eq!(admission.admit(Some(b)).err(), Some(Refused::Total(3)));
        drop(first);
        assert_eq!(admission.open(), 2);
        assert!(admission.admit(Some(a)).is_ok());
        assert_eq!(admission.open(), 2, "the permit above was dropped at once");
    }
}
