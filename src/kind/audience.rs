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

use crate::value::Value;

/// The private-fact prefix under which an entry's audience is recorded. Private keys
/// starting with it are reserved: a kind must not write them itself.
pub const AUDIENCE_PREFIX: &str = "\u{0}audience/";

/// The users who may see one entry (sorted, without repeats).
#[derive(Debug, Clone)]
pub struct Audience {
    users: Box<[String]>,
    /// Set when the write that gave the entry this audience took it from someone who
    /// could see the version before (or when that is unknown, after a rebuild from a
    /// snapshot). Such a viewer must learn that the entry went away, which a `resumed`
    /// cannot say without the history, so a resume over it becomes a snapshot.
    pub(super) narrowed: bool,
}

impl PartialEq for Audience {
    /// Two audiences are equal when they hold the same users; `narrowed` is bookkeeping
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
            narrowed: false,
        }
    }

    pub fn contains(&self, user: &str) -> bool {
        self.users
            .binary_search_by(|u| u.as_str().cmp(user))
            .is_ok()
    }

    /// See the field: a resume over this entry by someone outside it needs a snapshot.
    pub fn narrowed(&self) -> bool {
        self.narrowed
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
/// someone who could see `before` (see [`Audience::narrowed`]).
pub(super) fn narrows(before: &Visibility, after: &Audience) -> bool {
    match before {
        None => true,
        Some(before) => !before.is_subset_of(after),
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
        b.narrowed = true;
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
}
