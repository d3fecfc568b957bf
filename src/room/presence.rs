//! Who is in a room, and the coalesced join/leave announcements.
//!
//! Members are users, not connections. Changes are announced at most once per flush
//! (a short delay coalesces churn), and only to subscribers that asked for presence, so
//! a room of many presence-less viewers costs no presence traffic. A new presence
//! subscriber triggers a flush before it gets its member list, so every presence
//! subscriber's view is exactly its list plus the changes broadcast afterwards.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::message::WireMember;

/// How long membership changes are collected before they are announced.
pub const FLUSH_DELAY: Duration = Duration::from_millis(20);

#[derive(Debug, Default)]
pub struct Presence {
    /// Subscribed connections per user; a user with 0 is not a member.
    conns: BTreeMap<Arc<str>, u32>,
    /// The member set presence subscribers were last told about.
    announced: BTreeSet<Arc<str>>,
    /// Membership (not just a connection count) changed since the last flush.
    dirty: bool,
    /// A flush timer is pending.
    scheduled: bool,
}

impl Presence {
    pub fn join(&mut self, user: &Arc<str>) {
        let n = self.conns.entry(user.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.dirty = true;
        }
    }

    pub fn leave(&mut self, user: &Arc<str>) {
        if let Some(n) = self.conns.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                self.conns.remove(user);
                self.dirty = true;
            }
        }
    }

    /// The full member list, sorted by user.
    pub fn members(&self) -> Vec<WireMember> {
        self.conns
            .iter()
            .map(|(user, n)| WireMember {
                user: user.to_string(),
                conns: *n,
            })
            .collect()
    }

    pub fn needs_flush(&self) -> bool {
        self.dirty
    }

    /// Marks a flush timer as pending; false if one already is.
    pub fn schedule(&mut self) -> bool {
        !std::mem::replace(&mut self.scheduled, true)
    }

    pub fn unschedule(&mut self) {
        self.scheduled = false;
    }

    /// The joins and leaves since the last flush, or None when there are none.
    pub fn take_changes(&mut self) -> Option<(Vec<String>, Vec<String>)> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        let current: BTreeSet<Arc<str>> = self.conns.keys().cloned().collect();
        let join: Vec<String> = current
            .difference(&self.announced)
            .map(|u| u.to_string())
            .collect();
        let leave: Vec<String> = self
            .announced
            .difference(&current)
            .map(|u| u.to_string())
            .collect();
        self.announced = current;
        if join.is_empty() && leave.is_empty() {
            None
        } else {
            Some((join, leave))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_connection_of_a_user_is_not_announced() {
        let mut p = Presence::default();
        let alice: Arc<str> = Arc::from("alice");
        p.join(&alice);
        assert_eq!(p.take_changes(), Some((vec!["alice".into()], vec![])));
        p.join(&alice);
        assert_eq!(p.take_changes(), None);
        p.leave(&alice);
        assert_eq!(p.take_changes(), None);
        assert_eq!(p.members()[0].conns, 1);
        p.leave(&alice);
        assert_eq!(p.take_changes(), Some((vec![], vec!["alice".into()])));
    }

    #[test]
    fn join_then_leave_within_one_flush_announces_nothing() {
        let mut p = Presence::default();
        let bob: Arc<str> = Arc::from("bob");
        p.join(&bob);
        p.leave(&bob);
        assert_eq!(p.take_changes(), None);
    }
}
