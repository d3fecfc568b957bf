//! Connection caps: how many WebSocket sessions may be open in total and per client IP.
//!
//! A session holds a [`Permit`] for its whole life; dropping it gives the slot back.
//! Over a cap, the upgrade is answered on the socket with close 4429 (PROTOCOL.md
//! "Close codes"), like a bad token, so clients see the documented code.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

/// The open-session counts the caps are checked against.
#[derive(Debug)]
pub struct Admission {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    /// Open sessions per client IP; an IP with none has no entry, so the map is bounded
    /// by the open sessions.
    per_ip: DashMap<IpAddr, usize>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("server is at its limit of {0} connections")]
    Total(usize),
    #[error("this address is at its limit of {0} connections")]
    PerIp(usize),
}

impl Admission {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max_total,
            max_per_ip,
            total: AtomicUsize::new(0),
            per_ip: DashMap::new(),
        })
    }

    /// Takes a slot for a session from `ip` (None: address unknown, only the total cap).
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Permit, Refused> {
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

    #[test]
    fn caps_hold_and_slots_come_back_on_drop() {
        let admission = Admission::new(3, 2);
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
