//! Per-viewer views of a diff: which changed entries each subscriber may see, computed
//! once per distinct view rather than once per subscriber.
//!
//! A diff whose changed entries are all visible to everyone is one view (the fast path,
//! what every room without hidden entries takes). Otherwise the users named in an
//! audience each get their view, and everyone else shares one "public" view; equal
//! views are merged, so a room of 10,000 spectators and two players with a hidden entry
//! each encodes at most three diffs per batch. For each changed key a viewer gets the
//! entry when its audience includes them, a deletion when it no longer does but the
//! version before the diff was theirs to see, and nothing otherwise (no trace).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::live::wire_entry;
use crate::kind::{Audience, Slot};
use crate::protocol::message::WireEntry;

/// Who could see a key before the diff.
#[derive(Debug, Clone)]
pub enum Seen {
    /// The key did not exist (or not even as a tombstone).
    Nobody,
    Everyone,
    Only(Arc<Audience>),
}

impl Seen {
    pub fn of(prior: Option<&Slot>) -> Seen {
        match prior {
            None => Seen::Nobody,
            Some(slot) => match &slot.audience {
                None => Seen::Everyone,
                Some(audience) => Seen::Only(audience.clone()),
            },
        }
    }

    fn includes(&self, user: Option<&str>) -> bool {
        match (self, user) {
            (Seen::Nobody, _) => false,
            (Seen::Everyone, _) => true,
            (Seen::Only(audience), Some(user)) => audience.contains(user),
            (Seen::Only(_), None) => false,
        }
    }
}

/// The changes of one diff: each key at its last slot, and for keys that end hidden,
/// who could see them before the diff.
#[derive(Debug, Default)]
pub struct DiffChanges {
    pub slots: BTreeMap<String, Slot>,
    /// Only keys whose last slot has an audience; empty on the fast path.
    pub before: BTreeMap<String, Seen>,
}

impl DiffChanges {
    /// Adds a later batch's changes: slots are replaced, and the earliest "before" of a
    /// key is kept.
    pub fn extend(&mut self, later: DiffChanges) {
        self.slots.extend(later.slots);
        for (key, seen) in later.before {
            self.before.entry(key).or_insert(seen);
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// True when every viewer sees the same diff.
    pub fn is_shared(&self) -> bool {
        self.before.is_empty()
    }

    /// Every entry, for the shared view.
    pub fn shared_entries(&self) -> Vec<WireEntry> {
        self.slots
            .iter()
            .map(|(k, slot)| wire_entry(k, slot))
            .collect()
    }

    /// What `user` (`None`: a viewer named in no audience) sees of this diff.
    fn view_of(&self, user: Option<&str>) -> Vec<WireEntry> {
        let mut out = Vec::new();
        for (key, slot) in &self.slots {
            let sees_now = match (&slot.audience, user) {
                (None, _) => true,
                (Some(audience), Some(user)) => audience.contains(user),
                (Some(_), None) => false,
            };
            if sees_now {
                out.push(wire_entry(key, slot));
            } else if self.before.get(key).is_some_and(|seen| seen.includes(user)) {
                out.push(WireEntry {
                    k: key.clone(),
                    v: None,
                    ver: slot.ver,
                });
            }
        }
        out
    }

    /// Every distinct view of this diff, whoever subscribes (for other nodes, which
    /// fan it out to their own subscribers): the public view first (user None), then
    /// the view of each user named in an audience, now or before, whose view differs
    /// from the public one. A viewer not listed gets the public view.
    pub fn all_views(&self) -> Vec<(Option<String>, Vec<WireEntry>)> {
        let public = self.view_of(None);
        if self.is_shared() {
            return vec![(None, public)];
        }
        let mut named: BTreeSet<&str> = BTreeSet::new();
        for slot in self.slots.values() {
            if let Some(audience) = &slot.audience {
                named.extend(audience.users().iter().map(String::as_str));
            }
        }
        for seen in self.before.values() {
            if let Seen::Only(audience) = seen {
                named.extend(audience.users().iter().map(String::as_str));
            }
        }
        let mut views = Vec::new();
        for user in named {
            let view = self.view_of(Some(user));
            if view != public {
                views.push((Some(user.to_owned()), view));
            }
        }
        views.insert(0, (None, public));
        views
    }

    /// Plans the views of this diff for subscribers of the given users: the distinct
    /// views, and for each subscriber (in order) the index of its view. Only users named
    /// in an audience (now or before) get a view of their own; equal views are merged.
    pub fn plan<'u>(&self, users: impl IntoIterator<Item = &'u str>) -> ViewPlan {
        if self.is_shared() {
            let n = users.into_iter().count();
            return ViewPlan {
                views: vec![self.shared_entries()],
                of_subscriber: vec![0; n],
            };
        }
        let mut named: BTreeSet<&str> = BTreeSet::new();
        for slot in self.slots.values() {
            if let Some(audience) = &slot.audience {
                named.extend(audience.users().iter().map(String::as_str));
            }
        }
        for seen in self.before.values() {
            if let Seen::Only(audience) = seen {
                named.extend(audience.users().iter().map(String::as_str));
            }
        }
        let mut views: Vec<Vec<WireEntry>> = Vec::new();
        let mut by_user: HashMap<Option<&str>, usize> = HashMap::new();
        let mut of_subscriber = Vec::new();
        for user in users {
            let key = named.get(user).copied();
            let index = match by_user.get(&key) {
                Some(index) => *index,
                None => {
                    let view = self.view_of(key);
                    let index = match views.iter().position(|v| *v == view) {
                        Some(index) => index,
                        None => {
                            views.push(view);
                            views.len() - 1
                        }
                    };
                    by_user.insert(key, index);
                    index
                }
            };
            of_subscriber.push(index);
        }
        ViewPlan {
            views,
            of_subscriber,
        }
    }
}

/// The distinct views of one diff and which subscriber gets which.
#[derive(Debug)]
pub struct ViewPlan {
    /// Each distinct view's entries: each is encoded once per encoding in use.
    pub views: Vec<Vec<WireEntry>>,
    /// For each subscriber, in the order given to [`DiffChanges::plan`], its view.
    pub of_subscriber: Vec<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::Value;

    fn slot(value: Option<i64>, ver: u64, users: Option<&[&str]>) -> Slot {
        Slot {
            value: value.map(Value::Int),
            ver,
            audience: users.map(|u| Arc::new(Audience::new(u.iter().copied()))),
        }
    }

    fn keys(entries: &[WireEntry]) -> Vec<(String, bool)> {
        entries
            .iter()
            .map(|e| (e.k.clone(), e.v.is_some()))
            .collect()
    }

    /// An rps round: alice's and bob's hidden moves and a public round counter.
    fn round() -> DiffChanges {
        let mut diff = DiffChanges::default();
        diff.slots
            .insert("move/alice".into(), slot(Some(1), 5, Some(&["alice"])));
        diff.slots
            .insert("move/bob".into(), slot(Some(2), 6, Some(&["bob"])));
        diff.slots.insert("round".into(), slot(Some(2), 6, None));
        diff.before.insert("move/alice".into(), Seen::Nobody);
        diff.before.insert("move/bob".into(), Seen::Nobody);
        diff
    }

    #[test]
    fn ten_thousand_spectators_and_two_players_make_three_views() {
        let diff = round();
        let mut users = vec!["alice", "bob"];
        users.extend(std::iter::repeat_n("spectator", 10_000));
        let plan = diff.plan(users.iter().copied());
        assert_eq!(
            plan.views.len(),
            3,
            "one view per distinct view, not per subscriber"
        );
        assert_eq!(plan.of_subscriber.len(), 10_002);
        let view = |i: usize| keys(&plan.views[plan.of_subscriber[i]]);
        assert_eq!(
            view(0),
            [("move/alice".into(), true), ("round".into(), true)]
        );
        assert_eq!(view(1), [("move/bob".into(), true), ("round".into(), true)]);
        assert_eq!(view(2), [("round".into(), true)]);
        assert!(plan.of_subscriber[2..]
            .iter()
            .all(|&i| i == plan.of_subscriber[2]));
    }

    #[test]
    fn a_diff_without_hidden_entries_is_one_shared_view() {
        let mut diff = DiffChanges::default();
        diff.slots.insert("a".into(), slot(Some(1), 2, None));
        let plan = diff.plan(["x", "y", "z"]);
        assert_eq!(plan.views.len(), 1);
        assert_eq!(plan.of_subscriber, [0, 0, 0]);
    }

    #[test]
    fn an_entry_that_stops_being_visible_arrives_as_deleted_only_to_who_saw_it() {
        let mut diff = DiffChanges::default();
        // Was public, now alice's alone: everyone else learns it is gone.
        diff.slots
            .insert("hand".into(), slot(Some(1), 7, Some(&["alice"])));
        diff.before.insert("hand".into(), Seen::Everyone);
        // Was alice's, deleted (the tombstone keeps alice's audience): only alice hears.
        diff.slots
            .insert("move/alice".into(), slot(None, 7, Some(&["alice"])));
        diff.before.insert(
            "move/alice".into(),
            Seen::Only(Arc::new(Audience::new(["alice"]))),
        );
        let plan = diff.plan(["alice", "bob"]);
        assert_eq!(
            keys(&plan.views[plan.of_subscriber[0]]),
            [("hand".into(), true), ("move/alice".into(), false)]
        );
        assert_eq!(
            keys(&plan.views[plan.of_subscriber[1]]),
            [("hand".into(), false)]
        );
    }

    #[test]
    fn an_entry_that_becomes_visible_arrives_as_a_normal_entry() {
        let mut diff = DiffChanges::default();
        diff.slots.insert("last".into(), slot(Some(3), 9, None));
        diff.slots
            .insert("secret".into(), slot(Some(4), 9, Some(&["alice", "bob"])));
        diff.before.insert(
            "secret".into(),
            Seen::Only(Arc::new(Audience::new(["alice"]))),
        );
        let plan = diff.plan(["alice", "bob", "carol"]);
        let view = |i: usize| keys(&plan.views[plan.of_subscriber[i]]);
        assert_eq!(view(1), [("last".into(), true), ("secret".into(), true)]);
        assert_eq!(view(0), view(1), "alice and bob share a view");
        assert_eq!(view(2), [("last".into(), true)]);
        assert_eq!(plan.views.len(), 2);
    }

    #[test]
    fn all_views_are_the_public_one_and_the_named_users_that_differ() {
        let views = round().all_views();
        let users: Vec<Option<&str>> = views.iter().map(|(u, _)| u.as_deref()).collect();
        assert_eq!(users, [None, Some("alice"), Some("bob")]);
        assert_eq!(keys(&views[0].1), [("round".into(), true)]);
        assert_eq!(
            keys(&views[1].1),
            [("move/alice".into(), true), ("round".into(), true)]
        );
        let mut shared = DiffChanges::default();
        shared.slots.insert("a".into(), slot(Some(1), 2, None));
        assert_eq!(shared.all_views().len(), 1);
    }
}
