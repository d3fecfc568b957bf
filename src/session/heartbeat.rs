//! Heartbeats: one timer per worker thread for all of its connections.
//!
//! Every connection is pinged once per heartbeat interval and closed with 4008 when the
//! client has sent nothing for two intervals. A timer per connection (actix's
//! `run_interval`: a boxed item in the actor's context and a tokio `Sleep`) cost 160
//! bytes of every idle connection; here a connection costs one weak address in its
//! thread's list. The thread's ticker (`crate::ticker`) spreads the pings of many
//! connections over the interval instead of sending them at once. What a beat does
//! (ping, or close after silence) is the session's own decision ([`Heartbeat`] is
//! handled in `session`); this module only registers sessions with the ticker.

use std::time::Duration;

use actix::prelude::*;
use actix::WeakAddr;

use crate::ticker::{self, Tickers};

/// The message a session gets once per heartbeat interval.
#[derive(Message, Default)]
#[rtype(result = "()")]
pub struct Heartbeat;

thread_local! {
    /// This worker thread's heartbeat tickers.
    static TICKERS: Tickers<super::Session> = const { Tickers::new(Vec::new()) };
}

/// Puts a session on this thread's heartbeat; the first registration at an interval
/// starts the thread's ticker for it. The entry goes when the session is gone. A beat
/// that finds the session's mailbox full (16 control messages) is skipped: the silence
/// check counts from the client's last frame, not from beats.
pub fn register(session: WeakAddr<super::Session>, interval: Duration) {
    ticker::register::<_, Heartbeat>(&TICKERS, session, interval);
}
