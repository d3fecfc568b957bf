//! The per-IP cap on open HTTP connections.
//!
//! Every accepted TCP connection takes a [`ConnSlot`] when actix hands it over
//! (`server.rs`, `on_connect`), and keeps it in the connection's data for its whole
//! life; dropping the connection gives the slot back. A connection over the cap still
//! gets a slot, marked refused: `http::guard` answers its requests 429 and closes it
//! (apart from health checks and upgrades), so the client learns why instead of seeing
//! a silent reset. A refused connection that sends no request within [`REFUSED_GRACE`]
//! is cut, so a flood of idle connections from one address holds at most a second's
//! worth of descriptors. A WebSocket starts as an HTTP request and then lives for hours: the
//! upgrade releases its slot ([`ConnSlot::release`]) and the WebSocket caps
//! ([`super::Admission`]) count it from then on.

use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

/// How long a connection over the cap may take to send a request before it is cut.
pub const REFUSED_GRACE: Duration = Duration::from_secs(1);

/// Open HTTP connections per client IP, against `--max-http-conns-per-ip`.
#[derive(Debug)]
pub struct HttpConns {
    max_per_ip: usize,
    /// Open connections holding a slot, per client IP; an IP with none has no entry, so
    /// the map is bounded by the open connections.
    per_ip: DashMap<IpAddr, usize>,
}

impl HttpConns {
    pub fn new(max_per_ip: usize) -> Arc<HttpConns> {
        Arc::new(HttpConns {
            max_per_ip,
            per_ip: DashMap::new(),
        })
    }

    /// The cap this server runs with.
    pub fn max_per_ip(&self) -> usize {
        self.max_per_ip
    }

    /// A slot for a new connection from `ip`: held, or refused when `ip` is at its cap.
    pub fn connect(self: &Arc<Self>, ip: IpAddr) -> ConnSlot {
        // The shard guard lives only inside this block: no await, no send.
        let held = {
            let mut count = self.per_ip.entry(ip).or_insert(0);
            if *count >= self.max_per_ip {
                false
            } else {
                *count += 1;
                true
            }
        };
        let state = if held {
            SlotState::Held(HttpPermit {
                conns: self.clone(),
                ip,
            })
        } else {
            SlotState::Refused
        };
        ConnSlot {
            state: RefCell::new(state),
            requested: Rc::default(),
        }
    }

    /// Connections holding a slot from `ip` now.
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.per_ip.get(&ip).map_or(0, |count| *count)
    }
}

/// One connection's place in the count, kept in its connection data. `RefCell`, `Rc`:
/// the connection data lives on the connection's worker thread only.
#[derive(Debug)]
pub struct ConnSlot {
    state: RefCell<SlotState>,
    /// Set when a request arrives; read by the grace timer of a refused connection.
    requested: Rc<Cell<bool>>,
}

#[derive(Debug)]
enum SlotState {
    // Held for its `Drop`, which gives the slot back when the connection ends.
    Held(#[allow(dead_code)] HttpPermit),
    /// The address was at its cap when the connection came.
    Refused,
    /// Upgraded to WebSocket: counted by the WebSocket caps now.
    Released,
}

impl ConnSlot {
    /// Whether the connection came while its address was at the cap.
    pub fn refused(&self) -> bool {
        matches!(*self.state.borrow(), SlotState::Refused)
    }

    /// Notes that a request arrived on this connection.
    pub fn mark_request(&self) {
        self.requested.set(true);
    }

    /// Whether a request has arrived, readable after the slot moved into the
    /// connection's data (for the grace timer).
    pub fn requested(&self) -> Rc<Cell<bool>> {
        self.requested.clone()
    }

    /// Gives the slot back (the connection became a WebSocket).
    pub fn release(&self) {
        let mut state = self.state.borrow_mut();
        if matches!(*state, SlotState::Held(_)) {
            *state = SlotState::Released;
        }
    }
}

/// A held slot; given back on drop.
#[derive(Debug)]
struct HttpPermit {
    conns: Arc<HttpConns>,
    ip: IpAddr,
}

impl Drop for HttpPermit {
    fn drop(&mut self) {
        if let Some(mut count) = self.conns.per_ip.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
        }
        self.conns.per_ip.remove_if(&self.ip, |_, n| *n == 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_over_the_cap_are_refused_and_come_back_on_drop_or_release() {
        let conns = HttpConns::new(2);
        let a: IpAddr = "127.0.0.1".parse().expect("literal");
        let b: IpAddr = "127.0.0.2".parse().expect("literal");
        let first = conns.connect(a);
        let second = conns.connect(a);
        assert!(!first.refused() && !second.refused());
        let third = conns.connect(a);
        assert!(third.refused());
        assert!(
            !conns.connect(b).refused(),
            "another address has its own count"
        );
        drop(third);
        assert_eq!(conns.open_from(a), 2, "a refused slot was never counted");
        drop(first);
        assert_eq!(conns.open_from(a), 1);
        second.release();
        assert_eq!(
            conns.open_from(a),
            0,
            "an upgraded connection leaves the count"
        );
        assert!(!second.refused());
        let seen = second.requested();
        second.mark_request();
        assert!(seen.get());
        drop(second);
        assert_eq!(conns.open_from(a), 0);
        assert!(
            conns.per_ip.is_empty(),
            "addresses without connections are forgotten"
        );
    }
}
