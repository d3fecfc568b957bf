//! Per-thread tickers: one timer per thread for every actor of one kind on it.
//!
//! A timer per actor (actix's `run_interval`: a boxed item in the actor's context and a
//! tokio `Sleep`) costs memory in every actor, and actix polls every item of a context
//! each time its actor wakes, so a busy actor also pays for its idle timer. Here an actor
//! costs one weak address in its thread's list, and the thread's ticker visits
//! [`BUCKETS`] slices of the list per period, so the beats of many actors are spread
//! over the period instead of arriving at once. Used for connection heartbeats
//! (`session::heartbeat`) and room idle checks (`room::idle`); what a beat does is the
//! actor's own decision, this module only keeps the clock.
//!
//! Each user declares its thread's tickers as a `thread_local!` of [`Tickers`] (a
//! thread-local cannot be generic) and passes it to [`register`].

use std::cell::RefCell;
use std::thread::LocalKey;
use std::time::Duration;

use actix::dev::ToEnvelope;
use actix::prelude::*;
use actix::WeakAddr;

/// How many slices a period is cut into; each tick visits one bucket.
pub const BUCKETS: usize = 16;

/// A thread's actors of one kind at one period, in buckets visited in turn.
pub struct Ticker<A: Actor> {
    every: Duration,
    buckets: Vec<Vec<WeakAddr<A>>>,
    /// The bucket the next registration goes to (round robin).
    next: usize,
}

/// A thread's tickers for one actor kind: one per period in use (one in a server, more
/// only in tests that run servers with different periods in one process).
pub type Tickers<A> = RefCell<Vec<Ticker<A>>>;

/// Puts an actor on this thread's ticker for `every`, which sends it an `M` once per
/// period; the first registration at a period starts the ticker. The entry goes when
/// the actor is gone (its weak address no longer upgrades), at its bucket's next visit.
pub fn register<A, M>(key: &'static LocalKey<Tickers<A>>, actor: WeakAddr<A>, every: Duration)
where
    A: Actor + Handler<M>,
    A::Context: ToEnvelope<A, M>,
    M: Message<Result = ()> + Default + Send + 'static,
{
    key.with(|tickers| {
        let mut tickers = tickers.borrow_mut();
        let ticker = match tickers.iter().position(|t| t.every == every) {
            Some(i) => &mut tickers[i],
            None => {
                tickers.push(Ticker {
                    every,
                    buckets: (0..BUCKETS).map(|_| Vec::new()).collect(),
                    next: 0,
                });
                actix_rt::spawn(tick::<A, M>(key, every));
                tickers.last_mut().expect("pushed just above")
            }
        };
        let bucket = ticker.next;
        ticker.next = (ticker.next + 1) % BUCKETS;
        ticker.buckets[bucket].push(actor);
    });
}

/// The thread's ticker for one period: visits one bucket per tick, forever (it ends
/// with the thread's runtime).
async fn tick<A, M>(key: &'static LocalKey<Tickers<A>>, every: Duration)
where
    A: Actor + Handler<M>,
    A::Context: ToEnvelope<A, M>,
    M: Message<Result = ()> + Default + Send + 'static,
{
    let mut timer = actix_rt::time::interval(every / BUCKETS as u32);
    // A late tick (a busy thread) is not made up for by a burst.
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer.tick().await;
    let mut bucket = 0;
    loop {
        timer.tick().await;
        let due = key.with(|tickers| {
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
        // Sent outside the borrow: an actor handling its beat may register another.
        for addr in due {
            // A full mailbox means the actor has plenty to do: this beat is skipped
            // and the next comes one period later (what each beat checks counts from
            // the actor's own clock, not from beats).
            let _ = addr.try_send(M::default());
        }
        bucket = (bucket + 1) % BUCKETS;
    }
}
