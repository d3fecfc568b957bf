//! Heartbeats: one timer per worker thread for all of its connections.
//!
//! Every connection is pinged once per heartbeat interval and closed with 4008 when the
//! client has sent nothing for two intervals. A timer per connection (actix's
//! `run_interval`: a boxed item in the actor's context and a tokio `Sleep`) cost 160
//! bytes of every idle connection; here a connection costs one weak address in its
//! thread's list. The thread's ticker runs [`BUCKETS`] times per interval and visits
//! one bucket each time, so the pings of many connections are spread over the interval
//! instead of arriving at once. What a beat does (ping, or close after silence) is the
//! session's own decision ([`Heartbeat`] is handled in `session`); this module only
//! keeps the clock.

use std::cell::RefCell;
use std::time::Duration;

use actix::prelude::*;
use actix::WeakAddr;

/// How many slices an interval is cut into; each tick visits one bucket.
const BUCKETS: usize = 16;

/// The message a session gets once per heartbeat interval.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Heartbeat;

/// A worker thread's sessions at one interval, in buckets visited in turn.
struct Ticker<A: Actor> {
    interval: Duration,
    buckets: Vec<Vec<WeakAddr<A>>>,
    /// The bucket the next registration goes to (round robin).
    next: usize,
}

thread_local! {
    /// This thread's tickers (one per interval in use: one in a server, more only in
    /// tests that run servers with different intervals in one process).
    static TICKERS: RefCell<Vec<Ticker<super::Session>>> = const { RefCell::new(Vec::new()) };
}

/// Puts a session on this thread's heartbeat; the first registration at an interval
/// starts the thread's ticker for it. The entry goes when the session is gone (its
/// weak address no longer upgrades), at its bucket's next visit.
pub fn register(session: WeakAddr<super::Session>, interval: Duration) {
    TICKERS.with(|tickers| {
        let mut tickers = tickers.borrow_mut();
        let ticker = match tickers.iter().position(|t| t.interval == interval) {
            Some(i) => &mut tickers[i],
            None => {
                tickers.push(Ticker {
                    interval,
                    buckets: (0..BUCKETS).map(|_| Vec::new()).collect(),
                    next: 0,
                });
                actix_rt::spawn(tick(interval));
                tickers.last_mut().expect("pushed just above")
            }
        };
        let bucket = ticker.next;
        ticker.next = (ticker.next + 1) % BUCKETS;
        ticker.buckets[bucket].push(session);
    });
}

/// The thread's ticker for one interval: visits one bucket per tick, forever (it ends
/// with the thread's runtime).
async fn tick(interval: Duration) {
    let mut timer = actix_rt::time::interval(interval / BUCKETS as u32);
    // A late tick (a busy thread) is not made up for by a burst.
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer.tick().await;
    let mut bucket = 0;
    loop {
        timer.tick().await;
        let due = TICKERS.with(|tickers| {
            let mut tickers = tickers.borrow_mut();
            let Some(ticker) = tickers.iter_mut().find(|t| t.interval == interval) else {
                return Vec::new();
            };
            let entries = &mut ticker.buckets[bucket];
            let mut due = Vec::with_capacity(entries.len());
            entries.retain(|weak| match weak.upgrade() {
                Some(addr) => {
                    due.push(addr);
                    true
                }
                None => false,
            });
            if entries.capacity() > 2 * entries.len() + 16 {
                entries.shrink_to_fit();
            }
            due
        });
        // Sent outside the borrow: a session handling its beat may register another.
        for addr in due {
            // The mailbox holds at most 16 control messages; a full one means the
            // session has plenty to do, and this beat is skipped (the next comes one
            // interval later, and the silence check counts from the client's last
            // frame, not from beats).
            let _ = addr.try_send(Heartbeat);
        }
        bucket = (bucket + 1) % BUCKETS;
    }
}
