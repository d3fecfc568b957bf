//! Who may see an entry: everyone, or a set of users (per-viewer views).
//!
//! A kind gives an entry an audience with [`super::Changes::put_for`]. The audience
//! travels in the recorded changes as a private fact under [`AUDIENCE_PREFIX`] + key, so
//! the log and snapshots carry it with no format of their own and replay needs no kind
//! code. `RoomState` keeps it beside each entry ([`super::Slot::audience`]) for the read
//! paths: snapshot, diff, resumed, `GET`, `?at=`, `/events` and the SSE stream all show
//! a viewer only what its audience includes.
//!
//! Rules: an entry written with `put` is visible to everyone; one written with
//! `put_for` to its users only; a deleted entry keeps the audience it had, so only
//! those who saw it learn of the deletion.

use std::sync::Arc;

use super::{Changes, Slot};
use crate::value::Value;

/// The private-fact prefix under which an entry's audience is recorded. Private keys
/// starting with it are reserved: a kind must not write them itself.
pub const AUDIENCE_PREFIX: &str = "\u{0}audience/";

/// The users who may see one entry (sorted, without repeats).
#[derive(Debug, Clone)]
pub struct Audience {
    users: Box<[String]>,
    /// The seq of the last write that took the entry from someone who could see the
    /// version before it (0: never). Later writes that only keep or widen the audience
    /// carry it over, so it stays put while the entry is rewritten for the same users.
    /// A viewer outside the audience that resumes from before it may hold the entry
    /// and must learn it went away, which a `resumed` cannot say without the history,
    /// so that resume becomes a snapshot. After a rebuild from a snapshot the history
    /// is unknown and it is the entry's ver, an upper bound: the narrowing was a write
    /// no later than the last one.
    pub(super) narrowed_at: u64,
}

impl PartialEq for Audience {
    /// Two audiences are equal when they hold the same users; `narrowed_at` is bookkeeping
    /// of how the room got there, not part of the state.
    fn eq(&self, other: &Audience) -> bool {
        self.users == other.users
    }
}

impl Audience {
    /// The audience of `users`, sorted and without repeats.
    pub fn new(users: impl IntoIterator<Item = impl Into<String>>) -> Audience {
        let mut users: Vec<String> = users.into_iter().map(Into::into).collect();
        users.sort_unstable();
        users.dedup();
        Audience {
            users: users.into_boxed_slice(),
            narrowed_at: 0,
        }
    }

    pub fn contains(&self, user: &str) -> bool {
        self.users
            .binary_search_by(|u| u.as_str().cmp(user))
            .is_ok()
    }

    /// Whether the entry was taken from someone after `since` (see the field): a resume
    /// from `since` over this entry by someone outside the audience needs a snapshot.
    pub fn narrowed_after(&self, since: u64) -> bool {
        self.narrowed_at > since
    }

    pub fn users(&self) -> &[String] {
        &self.users
    }

    /// True when every user of `self` is in `other`.
    fn is_subset_of(&self, other: &Audience) -> bool {
        self.users.iter().all(|u| other.contains(u))
    }

    /// The audience as it is recorded: a list of user ids.
    pub fn to_value(&self) -> Value {
        Value::List(self.users.iter().cloned().map(Value::Str).collect())
    }

    /// Reads a recorded audience; anything but a list of strings is an empty audience
    /// (nobody), which fails closed.
    pub fn from_value(value: &Value) -> Audience {
        match value {
            Value::List(items) => Audience::new(items.iter().filter_map(Value::as_str)),
            _ => Audience::new(std::iter::empty::<String>()),
        }
    }
}

/// Who may see an entry: `None` is everyone.
pub type Visibility = Option<Arc<Audience>>;

/// True when `visibility` lets `user` see the entry.
pub fn visible(visibility: &Visibility, user: &str) -> bool {
    visibility.as_ref().is_none_or(|a| a.contains(user))
}

/// The private key recording the audience of entry `key`.
pub fn fact_key(key: &str) -> String {
    format!("{AUDIENCE_PREFIX}{key}")
}

/// Whether a write that replaces `before` with `after` takes the entry away from
/// someone who could see `before` (see [`Audience::narrowed_after`]).
pub(super) fn narrows(before: &Visibility, after: &Audience) -> bool {
    match before {
        None => true,
        Some(before) => !before.is_subset_of(after),
    }
}

/// The `narrowed_at` of an entry written at `seq` with audience `after` over the slot
/// `before` (None: the key did not exist, so nobody held it). When the write takes the
/// entry from someone it is `seq`, or, over a tombstone, the deletion's seq: who saw the
/// deletion holds nothing, so only a resume from before it can hold the entry. Else the
/// last narrowing's seq, carried over.
pub(super) fn narrowed_at(before: Option<&Slot>, after: &Audience, seq: u64) -> u64 {
    match before {
        None => 0,
        Some(before) if narrows(&before.audience, after) => match before.value {
            Some(_) => seq,
            None => before.ver,
        },
        Some(before) => before
            .audience
            .as_ref()
            .map_or(0, |audience| audience.narrowed_at),
    }
}

/// What a viewer may see of one recorded event (`GET /events`).
#[derive(Debug, PartialEq)]
pub enum EventView<'a> {
    /// The event touched no entry hidden from the viewer: it is shown whole.
    Whole,
    /// It touched entries hidden from the viewer and these others: the viewer sees
    /// these changes (key and value, `None` for a deletion) and nothing else of it.
    Partly(Vec<(&'a str, Option<&'a Value>)>),
    /// Every entry it touched is hidden from the viewer: only that it happened shows.
    Hidden,
}

/// What `viewer` may see of an event that made `changes`. An entry's audience in the
/// event is its recorded fact (the room records one for every hidden entry an event
/// writes or deletes, see `RoomState::complete_audiences`); an entry without one is
/// everyone's.
pub fn event_view<'a>(changes: &'a Changes, viewer: &str) -> EventView<'a> {
    let hidden_from_viewer = |key: &str| {
        let fact = fact_key(key);
        changes.private.iter().any(|(k, recorded)| {
            *k == fact
                && recorded
                    .as_ref()
                    .is_some_and(|audience| !Audience::from_value(audience).contains(viewer))
        })
    };
    // Most events record no audience: one pass over the private facts settles them.
    let records_audiences = changes
        .private
        .iter()
        .any(|(key, recorded)| key.starts_with(AUDIENCE_PREFIX) && recorded.is_some());
    if !records_audiences {
        return EventView::Whole;
    }
    let mut seen = Vec::with_capacity(changes.public.len());
    let mut hidden = false;
    for (key, value) in &changes.public {
        if hidden_from_viewer(key) {
            hidden = true;
        } else {
            seen.push((key.as_str(), value.as_ref()));
        }
    }
    match (hidden, seen.is_empty()) {
        (false, _) => EventView::Whole,
        (true, true) => EventView::Hidden,
        (true, false) => EventView::Partly(seen),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_audience_is_sorted_deduplicated_and_compared_by_users() {
        let a = Audience::new(["bob", "alice", "bob"]);
        assert_eq!(a.users(), ["alice", "bob"]);
        assert!(a.contains("alice") && !a.contains("carol"));
        let mut b = Audience::new(["alice", "bob"]);
        b.narrowed_at = 7;
        assert_eq!(a, b);
        assert_eq!(Audience::from_value(&a.to_value()), a);
        assert!(Audience::from_value(&Value::Int(3)).users().is_empty());
    }

    #[test]
    fn narrowing_is_losing_a_viewer() {
        let alice = Audience::new(["alice"]);
        assert!(narrows(&None, &alice));
        assert!(!narrows(&Some(Arc::new(alice.clone())), &alice));
        let both = Audience::new(["alice", "bob"]);
        assert!(!narrows(&Some(Arc::new(alice.clone())), &both));
        assert!(narrows(&Some(Arc::new(both)), &alice));
    }

    /// The event that ends an rps round: both hidden moves deleted, `last` and
    /// `round` for everyone.
    fn round_end() -> Changes {
        let mut changes = Changes::default()
            .put("last", Value::Str("bob won".into()))
            .delete("move/alice")
            .delete("move/bob")
            .put("round", Value::Int(2));
        for user in ["alice", "bob"] {
            changes.private.push((
                fact_key(&format!("move/{user}")),
                Some(Audience::new([user]).to_value()),
            ));
        }
        changes
    }

    #[test]
    fn a_viewer_sees_the_changes_of_an_event_meant_for_them_and_no_more() {
        let changes = round_end();
        let last = Value::Str("bob won".into());
        let round = Value::Int(2);
        assert_eq!(
            event_view(&changes, "alice"),
            EventView::Partly(vec![
                ("last", Some(&last)),
                ("move/alice", None),
                ("round", Some(&round)),
            ]),
            "alice sees her own move go, not bob's"
        );
        assert_eq!(
            event_view(&changes, "carol"),
            EventView::Partly(vec![("last", Some(&last)), ("round", Some(&round))])
        );
        let first_move =
            Changes::default().put_for("move/alice", Value::Str("rock".into()), ["alice"]);
        assert_eq!(event_view(&first_move, "alice"), EventView::Whole);
        assert_eq!(event_view(&first_move, "bob"), EventView::Hidden);
        let public = Changes::default().put("round", Value::Int(3));
        assert_eq!(event_view(&public, "bob"), EventView::Whole);
        // A hidden entry shown to everyone again records its audience as removed.
        let mut shown = Changes::default().put("hand", Value::Int(1));
        shown.private.push((fact_key("hand"), None));
        assert_eq!(event_view(&shown, "bob"), EventView::Whole);
    }

    #[test]
    fn the_last_narrowing_is_carried_over_by_writes_that_do_not_narrow() {
        let alice = Audience::new(["alice"]);
        let public = Slot::new(Some(Value::Int(1)), 3);
        assert_eq!(narrowed_at(None, &alice, 4), 0, "a new key was nobody's");
        assert_eq!(
            narrowed_at(Some(&public), &alice, 4),
            4,
            "public, then hidden"
        );
        let deleted = Slot::new(None, 3);
        assert_eq!(
            narrowed_at(Some(&deleted), &alice, 4),
            3,
            "a public tombstone: only who held the entry before its deletion lost it"
        );
        let mut narrowed = alice.clone();
        narrowed.narrowed_at = 4;
        let mut before = Slot::new(Some(Value::Int(2)), 4);
        before.audience = Some(Arc::new(narrowed));
        assert_eq!(narrowed_at(Some(&before), &alice, 9), 4, "the same users");
        let both = Audience::new(["alice", "bob"]);
        assert_eq!(narrowed_at(Some(&before), &both, 9), 4, "widened");
        let bob = Audience::new(["bob"]);
        assert_eq!(narrowed_at(Some(&before), &bob, 9), 9, "alice lost it");
    }
}
