//! The registry of room kinds a server serves: name -> kind.
//!
//! Built once at startup (the three built-ins, plus what an embedding application adds
//! through `roomd::Server`) and read-only afterwards, so lookups take no lock.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{ChatKind, KindRef, PollKind, RoomKind, StateKind};

/// Why a kind cannot join the registry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KindError {
    #[error("room kind \"{0}\" is registered twice")]
    Duplicate(String),
    #[error("room kind name {0:?} must be 1..=64 bytes of a-z, 0-9, '_', '-' or '.'")]
    BadName(String),
}

/// The kinds a server knows, by name.
#[derive(Clone, Default)]
pub struct Kinds {
    by_name: BTreeMap<String, KindRef>,
}

impl Kinds {
    /// No kinds at all.
    pub fn empty() -> Kinds {
        Kinds::default()
    }

    /// `chat`, `poll` and `state`: what the `roomd` binary serves.
    pub fn builtin() -> Kinds {
        let mut kinds = Kinds::empty();
        for kind in [
            Arc::new(ChatKind) as KindRef,
            Arc::new(PollKind),
            Arc::new(StateKind),
        ] {
            // The built-in names are distinct and well formed.
            kinds.add(kind).expect("built-in kinds register cleanly");
        }
        kinds
    }

    /// Adds `kind` under its name; a name already taken is refused.
    pub fn add(&mut self, kind: KindRef) -> Result<(), KindError> {
        let name = kind.name().to_owned();
        let well_formed = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.".contains(&b));
        if !well_formed {
            return Err(KindError::BadName(name));
        }
        if self.by_name.contains_key(&name) {
            return Err(KindError::Duplicate(name));
        }
        self.by_name.insert(name, kind);
        Ok(())
    }

    /// Adds a kind by value (see [`Kinds::add`]).
    pub fn with(mut self, kind: impl RoomKind) -> Result<Kinds, KindError> {
        self.add(Arc::new(kind))?;
        Ok(self)
    }

    pub fn get(&self, name: &str) -> Option<&KindRef> {
        self.by_name.get(name)
    }

    /// The registered names, sorted, for error messages ("chat, poll or state").
    pub fn names(&self) -> String {
        let names: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
        match names.split_last() {
            None => "none".to_owned(),
            Some((last, [])) => (*last).to_owned(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        }
    }
}

impl std::fmt::Debug for Kinds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_name.keys()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_holds_the_three_kinds_by_name() {
        let kinds = Kinds::builtin();
        for name in ["chat", "poll", "state"] {
            assert_eq!(kinds.get(name).map(|k| k.name()), Some(name));
        }
        assert!(kinds.get("rps").is_none());
        assert_eq!(kinds.names(), "chat, poll or state");
    }

    #[test]
    fn a_taken_or_malformed_name_is_refused() {
        let mut kinds = Kinds::builtin();
        assert_eq!(
            kinds.add(Arc::new(ChatKind)),
            Err(KindError::Duplicate("chat".into()))
        );
        struct Named(&'static str);
        impl RoomKind for Named {
            fn name(&self) -> &str {
                self.0
            }
            fn init(
                &self,
                _: &crate::value::Value,
                _: &super::super::Ctx,
                _: &super::super::Limits,
            ) -> Result<super::super::Changes, super::super::Refusal> {
                Ok(Default::default())
            }
            fn reduce(
                &self,
                _: &super::super::RoomState,
                _: &crate::value::Value,
                _: &super::super::Ctx,
                _: &super::super::Limits,
            ) -> Result<super::super::Changes, super::super::Refusal> {
                Ok(Default::default())
            }
        }
        for bad in ["", "Game", "a b", &"x".repeat(65)] {
            let name: &'static str = Box::leak(bad.to_owned().into_boxed_str());
            assert!(matches!(
                kinds.add(Arc::new(Named(name))),
                Err(KindError::BadName(_))
            ));
        }
        assert_eq!(kinds.add(Arc::new(Named("rps"))), Ok(()));
    }
}
