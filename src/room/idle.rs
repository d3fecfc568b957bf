//! Idle checks: one timer per room thread for all of its rooms.
//!
//! A room that has gone unused for its idle timeout stops (see `Room::check_idle`). It
//! used to ask every few seconds through a timer of its own (actix's `run_interval`),
//! and actix polls every item of an actor's context each time the actor wakes: each op
//! polled its room's timer, a cache miss per op once rooms are many (3.4% of the room
//! threads at 10,000 rooms, benches/README.md, "Sixth pass"), and each room held the
//! timer's memory. Here a room costs one weak address in its thread's list, and the
//! thread's ticker visits [`BUCKETS`] slices of the list per period, so the checks of
//! many rooms are spread over it. Whether to stop is the room's own decision
//! ([`CheckIdle`] is handled in `handlers`); this module only keeps the clock.

use std::cell::RefCell;
use std::time::Duration;

use actix::prelude::*;
use actix::WeakAddr;

use super::Room;

/// How many slices a period is cut into; each tick visits one bucket.
const BUCKETS: usize = 16;

/// The message a room gets once per check period.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CheckIdle;

/// A room thread's rooms at one period, in buckets visited in turn.
struct Ticker {
    every: Duration,
    buckets: Vec<Vec<WeakAddr<Room>>>,
    /// The bucket the next registration goes to (round robin).
    next: usize,
}

thread_local! {
    /// This thread's tickers (one per period in use: one in a server, more only in
    /// tests that run servers with different idle timeouts in one process).
    static TICKERS: RefCell<Vec<Ticker>> = const { RefCell::new(Vec::new()) };
}

/// Puts a room on this thread's idle checks; the first registration at a period starts
/// the thread's ticker for it. The entry goes when the room is gone (its weak address
/// no longer upgrades), at its bucket's next visit.
pub fn register(room: WeakAddr<Room>, every: Duration) {
    TICKERS.with(|tickers| {
        let mut tickers = tickers.borrow_mut();
        let ticker = match tickers.iter().position(|t| t.every == every) {
            Some(i) => &mut tickers[i],
            None => {
                tickers.push(Ticker {
                    every,
                    buckets: (0..BUCKETS).map(|_| Vec::new()).collect(),
                    next: 0,
                });
                actix_rt::spawn(tick(every));
                tickers.last_mut().expect("pushed just above")
            }
        };
        let bucket = ticker.next;
        ticker.next = (ticker.next + 1) % BUCKETS;
        ticker.buckets[bucket].push(room);
    });
}

/// The thread's ticker for one period: visits one bucket per tick, forever (it ends
/// with the thread's runtime).
async fn tick(every: Duration) {
    let mut timer = actix_rt::time::interval(every / BUCKETS as u32);
    // A late tick (a busy thread) is not made up for by a burst.
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer.tick().await;
    let mut bucket = 0;
    loop {
        timer.tick().await;
        let due = TICKERS.with(|tickers| {
            let mut tickers = tickers.borrow_mut();
            let Some(ticker) = tickers.iter_mut().find(|t| t.every == every) else {
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
        // Sent outside the borrow: a room started while handling its check registers.
        for addr in due {
            // A full mailbox (256 messages) means the room is busy, not idle: this
            // check is skipped and the next comes one period later.
            let _ = addr.try_send(CheckIdle);
        }
        bucket = (bucket + 1) % BUCKETS;
    }
}
