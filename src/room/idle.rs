//! Idle checks: one timer per room thread for all of its rooms.
//!
//! A room that has gone unused for its idle timeout stops (see `Room::check_idle`). It
//! used to ask every few seconds through a timer of its own (actix's `run_interval`),
//! and actix polls every item of an actor's context each time the actor wakes: each op
//! polled its room's timer, a cache miss per op once rooms are many (3.4% of the room
//! threads at 10,000 rooms, benches/README.md, "Sixth pass"), and each room held the
//! timer's memory. Here a room costs one weak address in its thread's list, and the
//! thread's ticker (`crate::ticker`) spreads the checks of many rooms over the period.
//! Whether to stop is the room's own decision ([`CheckIdle`] is handled in
//! `handlers`); this module only registers rooms with the ticker.

use std::time::Duration;

use actix::prelude::*;
use actix::WeakAddr;

use super::Room;
use crate::ticker::{self, Tickers};

/// The message a room gets once per check period.
#[derive(Message, Default)]
#[rtype(result = "()")]
pub struct CheckIdle;

thread_local! {
    /// This room thread's idle-check tickers.
    static TICKERS: Tickers<Room> = const { Tickers::new(Vec::new()) };
}

/// Puts a room on this thread's idle checks; the first registration at a period starts
/// the thread's ticker for it. The entry goes when the room is gone. A check that finds
/// the room's mailbox full (256 messages) is skipped: a busy room is not idle.
pub fn register(room: WeakAddr<Room>, every: Duration) {
    ticker::register::<_, CheckIdle>(&TICKERS, room, every);
}
