//! A room's backlog bound: at most [`MAX_BACKLOG`] ops and creates wait for one room at
//! once, from every connection, HTTP caller and cluster peer together, counted from when
//! they are handed to the room until they are answered (in its mailbox, in its batches,
//! in the store writer's queue, in a commit).
//!
//! Overflow policy: the sender waits for a slot, in arrival order (a fair semaphore). A
//! WebSocket connection stops reading its socket meanwhile, so TCP pushes back on the
//! client and its later frames keep their order; an HTTP request or a cluster peer's
//! forwarded op waits in its handler. Nothing is refused or dropped. The memory a room's
//! pending ops hold is therefore bounded by `MAX_BACKLOG` plus one op per waiting
//! sender, however fast and however many clients write to it.
//!
//! roomd counts this itself because the actor mailbox's own capacity does not hold:
//! actix's `try_send` over capacity still queues the message and parks only the `Addr`
//! clone that sent it, and every delivery uses a fresh clone from the registry.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The most ops one room holds unanswered. Far above what a room needs in flight to
/// run at full speed (8 writers x 256 ops in flight reach a room's peak, benches/README),
/// and small enough that a room's pending ops stay a few MiB.
pub const MAX_BACKLOG: usize = 4096;

/// One room's count of unanswered ops (shared by every sender through the registry).
#[derive(Debug, Clone)]
pub struct Backlog(Arc<Semaphore>);

/// One op's place in its room's backlog, given back when it is dropped: with the op's
/// [`ReplyTo`](super::messages::ReplyTo), once the op is answered (or dropped unanswered).
#[derive(Debug)]
pub struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

impl Default for Backlog {
    fn default() -> Self {
        Backlog(Arc::new(Semaphore::new(MAX_BACKLOG)))
    }
}

impl Backlog {
    /// A slot now, or None when the room holds `MAX_BACKLOG` ops (or a sender is
    /// already waiting, so slots go in arrival order).
    pub fn try_take(&self) -> Option<Slot> {
        self.0.clone().try_acquire_owned().ok().map(Slot)
    }

    /// Waits for a slot. None only if the semaphore were closed, which it never is.
    pub async fn take(self) -> Option<Slot> {
        self.0.acquire_owned().await.ok().map(Slot)
    }

    /// Ops held now (for tests and diagnostics).
    pub fn held(&self) -> usize {
        MAX_BACKLOG - self.0.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_backlog_makes_the_next_sender_wait_until_an_op_is_answered() {
        let backlog = Backlog::default();
        let mut slots: Vec<Slot> = (0..MAX_BACKLOG)
            .map(|_| backlog.try_take().expect("room below its bound"))
            .collect();
        assert_eq!(backlog.held(), MAX_BACKLOG);
        assert!(backlog.try_take().is_none(), "the bound holds");
        let waiting = tokio::spawn(backlog.clone().take());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "waits while the room is full");
        // A second sender does not jump the one already waiting.
        drop(slots.pop());
        let slot = waiting.await.expect("task").expect("open semaphore");
        assert!(
            backlog.try_take().is_none(),
            "the freed slot went to the waiter"
        );
        drop(slot);
        drop(slots);
        assert_eq!(backlog.held(), 0, "every slot is given back on drop");
    }
}
