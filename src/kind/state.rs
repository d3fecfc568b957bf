//! The "state" room kind: generic authoritative key-value state. Owns its `init`, its
//! ops (`set`, `del`, `incr`), `if_ver` compare-and-set and the size limits.
//!
//! Every public entry is a client's key. The private facts are the `creator` and, when
//! `init` has them, the write `rules` ([`super::rules`]).
//!
//! Refusals are checked in one order: the op's shape and the key (`invalid`), the write
//! rules (`forbidden`), the value's size (`too_large`), `if_ver` (`conflict`), what the
//! key holds (`invalid`), then the room's totals (`limit`).

use super::{
    entry_bytes, rules, Changes, Ctx, Fields, Limits, Refusal, RefuseCode, RoomKind, RoomState,
    Slot,
};
use crate::value::Value;

/// The built-in "state" kind.
#[derive(Debug, Clone, Copy, Default)]
pub struct StateKind;

impl RoomKind for StateKind {
    fn name(&self) -> &str {
        "state"
    }

    fn init(&self, init: &Value, ctx: &Ctx, limits: &Limits) -> Result<Changes, Refusal> {
        create(init, ctx, limits)
    }

    fn reduce(
        &self,
        state: &RoomState,
        op: &Value,
        ctx: &Ctx,
        limits: &Limits,
    ) -> Result<Changes, Refusal> {
        reduce(state, op, ctx, limits)
    }
}

fn create(init: &Value, ctx: &Ctx, limits: &Limits) -> Result<Changes, Refusal> {
    let fields = Fields::init(init)?;
    fields.only(&["entries", "rules"])?;
    let rules = rules::from_init(fields.opt("rules"))?;
    let entries = match fields.opt("entries") {
        None => None,
        Some(Value::Map(entries)) => Some(entries),
        Some(_) => return Err(Refusal::invalid("field \"entries\" must be a map")),
    };
    let mut public = Vec::new();
    let mut room_bytes = 0usize;
    for (key, value) in entries.into_iter().flatten() {
        check_key(key, limits)?;
        check_value_size(value, limits)?;
        room_bytes = room_bytes.saturating_add(entry_bytes(key, value));
        public.push((key.clone(), Some(value.clone())));
    }
    if public.len() > limits.max_keys {
        return Err(Refusal::new(
            RefuseCode::Limit,
            format!(
                "room of {} keys exceeds limit of {}",
                public.len(),
                limits.max_keys
            ),
        ));
    }
    if room_bytes > limits.max_room_bytes {
        return Err(Refusal::new(
            RefuseCode::Limit,
            format!(
                "room of {room_bytes} bytes exceeds limit of {}",
                limits.max_room_bytes
            ),
        ));
    }
    let mut private = vec![("creator".to_owned(), Some(Value::Str(ctx.user.to_owned())))];
    private.extend(rules.map(|rules| ("rules".to_owned(), Some(rules))));
    Ok(Changes { public, private })
}

fn reduce(state: &RoomState, op: &Value, ctx: &Ctx, limits: &Limits) -> Result<Changes, Refusal> {
    let (kind, fields) = Fields::op(op)?;
    // The creator matters only to rules, which most rooms do not have.
    let may_write = |key: &str| match state.private("rules") {
        None => Ok(()),
        rules => {
            let creator = state.private("creator").and_then(Value::as_str);
            rules::check_write(rules, creator, ctx.user, key)
        }
    };
    match kind {
        "set" => {
            fields.only(&["key", "value", "if_ver"])?;
            let key = fields.str("key")?;
            let value = fields.required("value")?;
            let if_ver = if_ver(&fields)?;
            check_key(key, limits)?;
            may_write(key)?;
            let size = check_value_size(value, limits)?;
            // One lookup of the key serves every check below.
            let slot = state.get(key);
            check_if_ver(slot, key, if_ver)?;
            check_room_limits(state, slot, key, size, limits)?;
            Ok(one_change(key, Some(value.clone())))
        }
        "del" => {
            fields.only(&["key", "if_ver"])?;
            let key = fields.str("key")?;
            let if_ver = if_ver(&fields)?;
            check_key(key, limits)?;
            may_write(key)?;
            let slot = state.get(key);
            if live(slot).is_none() {
                // Deleting what is not there is a mistake, unless the client expected a
                // specific version, in which case its view is stale.
                return Err(match if_ver {
                    None | Some(0) => Refusal::invalid(format!("key \"{key}\" is not in the room")),
                    Some(expected) => conflict(key, 0, expected),
                });
            }
            check_if_ver(slot, key, if_ver)?;
            Ok(one_change(key, None))
        }
        "incr" => {
            fields.only(&["key", "by", "if_ver"])?;
            let key = fields.str("key")?;
            let by = fields.opt_int("by")?.unwrap_or(1);
            let if_ver = if_ver(&fields)?;
            check_key(key, limits)?;
            may_write(key)?;
            let slot = state.get(key);
            check_if_ver(slot, key, if_ver)?;
            let current = match live(slot) {
                None => 0,
                Some(Value::Int(n)) => *n,
                Some(_) => {
                    return Err(Refusal::invalid(format!(
                        "key \"{key}\" does not hold an integer"
                    )))
                }
            };
            let sum = current.checked_add(by).ok_or_else(|| {
                Refusal::invalid(format!("{current} + {by} overflows a 64-bit integer"))
            })?;
            let value = Value::Int(sum);
            let size = check_value_size(&value, limits)?;
            check_room_limits(state, slot, key, size, limits)?;
            Ok(one_change(key, Some(value)))
        }
        other => Err(Refusal::invalid(format!(
            "unknown op type \"{other}\" for a state room"
        ))),
    }
}

fn one_change(key: &str, value: Option<Value>) -> Changes {
    Changes {
        public: vec![(key.to_owned(), value)],
        private: vec![],
    }
}

fn check_key(key: &str, limits: &Limits) -> Result<(), Refusal> {
    if key.is_empty() || key.len() > limits.max_key_bytes {
        return Err(Refusal::invalid(format!(
            "field \"key\" of {} bytes, must be 1..={}",
            key.len(),
            limits.max_key_bytes
        )));
    }
    Ok(())
}

/// Refuses a value whose JSON size is over the limit; returns the size.
fn check_value_size(value: &Value, limits: &Limits) -> Result<usize, Refusal> {
    let size = value.json_size();
    if size > limits.max_value_bytes {
        return Err(Refusal::new(
            RefuseCode::TooLarge,
            format!(
                "value of {size} bytes exceeds limit of {}",
                limits.max_value_bytes
            ),
        ));
    }
    Ok(size)
}

/// The optional `if_ver` field: an integer >= 0.
fn if_ver(fields: &Fields) -> Result<Option<u64>, Refusal> {
    match fields.opt_int("if_ver")? {
        None => Ok(None),
        Some(ver) => u64::try_from(ver)
            .map(Some)
            .map_err(|_| Refusal::invalid(format!("field \"if_ver\" is {ver}, must be >= 0"))),
    }
}

/// The live value of a key's slot (`None` for an absent key or a tombstone).
fn live(slot: Option<&Slot>) -> Option<&Value> {
    slot.and_then(|slot| slot.value.as_ref())
}

/// Compares `if_ver` with the version of the key's `slot`, 0 for an absent key or a
/// tombstone.
fn check_if_ver(slot: Option<&Slot>, key: &str, if_ver: Option<u64>) -> Result<(), Refusal> {
    let current = match slot {
        Some(slot) if slot.value.is_some() => slot.ver,
        _ => 0,
    };
    match if_ver {
        Some(expected) if expected != current => Err(conflict(key, current, expected)),
        _ => Ok(()),
    }
}

fn conflict(key: &str, current: u64, expected: u64) -> Refusal {
    Refusal::new(
        RefuseCode::Conflict,
        format!("key \"{key}\" is at ver {current}, not if_ver {expected}"),
    )
}

/// Refuses a write of a value of `size` JSON bytes over the key's `slot` that would take
/// the room past `max_keys` or `max_room_bytes`. A write that does not grow the room is
/// always allowed, so a room left over its limits (the limits were lowered) can still
/// shrink.
fn check_room_limits(
    state: &RoomState,
    slot: Option<&Slot>,
    key: &str,
    size: usize,
    limits: &Limits,
) -> Result<(), Refusal> {
    let old = live(slot);
    if old.is_none() {
        let keys = state.live_keys().saturating_add(1);
        if keys > limits.max_keys {
            return Err(Refusal::new(
                RefuseCode::Limit,
                format!(
                    "room of {keys} keys would exceed limit of {}",
                    limits.max_keys
                ),
            ));
        }
    }
    let new_bytes = key.len().saturating_add(size);
    // Within the limit even if the old value freed nothing: the old value is not sized
    // (a walk of it, and a first touch of its memory, on every write).
    if state.live_bytes().saturating_add(new_bytes) <= limits.max_room_bytes {
        return Ok(());
    }
    let old_bytes = old.map_or(0, |old| entry_bytes(key, old));
    let bytes = state
        .live_bytes()
        .saturating_sub(old_bytes)
        .saturating_add(new_bytes);
    if bytes > limits.max_room_bytes && bytes > state.live_bytes() {
        return Err(Refusal::new(
            RefuseCode::Limit,
            format!(
                "room of {bytes} bytes would exceed limit of {}",
                limits.max_room_bytes
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::Slot;
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn set(key: &str, value: Value, if_ver: Option<i64>) -> Value {
        let mut fields = vec![("type", s("set")), ("key", s(key)), ("value", value)];
        fields.extend(if_ver.map(|v| ("if_ver", Value::Int(v))));
        Value::map(fields)
    }

    fn del(key: &str, if_ver: Option<i64>) -> Value {
        let mut fields = vec![("type", s("del")), ("key", s(key))];
        fields.extend(if_ver.map(|v| ("if_ver", Value::Int(v))));
        Value::map(fields)
    }

    fn incr(key: &str, by: Option<i64>, if_ver: Option<i64>) -> Value {
        let mut fields = vec![("type", s("incr")), ("key", s(key))];
        fields.extend(by.map(|v| ("by", Value::Int(v))));
        fields.extend(if_ver.map(|v| ("if_ver", Value::Int(v))));
        Value::map(fields)
    }

    fn empty(limits: &Limits) -> RoomState {
        created(&StateKind, Value::Null, limits)
    }

    fn refused(room: &RoomState, op: Value, limits: &Limits) -> Refusal {
        StateKind
            .reduce(room, &op, &ctx("u1", 99), limits)
            .expect_err("the op must be refused")
    }

    #[test]
    fn create_accepts_null_empty_and_initial_entries() {
        let limits = Limits::default();
        assert_eq!(empty(&limits).entries().count(), 0);
        let init = Value::map([("entries", Value::map([("a", Value::Int(1)), ("b", s("x"))]))]);
        let room = created(&StateKind, init, &limits);
        assert_eq!(room.get("a"), Some(&Slot::new(Some(Value::Int(1)), 1)));
        assert_eq!(room.live_keys(), 2);
        assert_eq!(room.live_bytes(), (1 + 1) + (1 + 3));
        assert_eq!(room.private("creator"), Some(&s("u0")));
    }

    #[test]
    fn create_checks_entries_like_set() {
        let limits = Limits {
            max_keys: 2,
            max_room_bytes: 20,
            max_value_bytes: 8,
            max_key_bytes: 4,
            ..Limits::default()
        };
        let entries = |pairs: Vec<(&str, Value)>| Value::map([("entries", Value::map(pairs))]);
        let cases = [
            (entries(vec![("", Value::Int(1))]), RefuseCode::Invalid),
            (
                entries(vec![("toolong", Value::Int(1))]),
                RefuseCode::Invalid,
            ),
            (entries(vec![("a", s("123456789"))]), RefuseCode::TooLarge),
            (
                entries(vec![
                    ("a", Value::Int(1)),
                    ("b", Value::Int(1)),
                    ("c", Value::Int(1)),
                ]),
                RefuseCode::Limit,
            ),
            (
                entries(vec![("aaaa", s("123456")), ("bbbb", s("123456"))]),
                RefuseCode::Limit,
            ),
            (
                Value::map([("entries", Value::List(vec![]))]),
                RefuseCode::Invalid,
            ),
            (
                Value::map([("keys", Value::map::<&str>([]))]),
                RefuseCode::Invalid,
            ),
            (s("entries"), RefuseCode::Invalid),
        ];
        for (init, expected) in cases {
            let result = create(&init, &ctx("u0", 1), &limits);
            assert_eq!(code(&result), Some(expected), "{init:?}");
        }
    }

    #[test]
    fn set_writes_the_value_with_the_event_seq_as_ver() {
        let limits = Limits::default();
        let mut room = empty(&limits);
        submit(
            &StateKind,
            &mut room,
            "u1",
            2,
            set("players/alice", Value::Int(3), None),
            &limits,
        )
        .unwrap();
        submit(
            &StateKind,
            &mut room,
            "u1",
            3,
            set("players/alice", s("x"), Some(2)),
            &limits,
        )
        .unwrap();
        assert_eq!(room.get("players/alice"), Some(&Slot::new(Some(s("x")), 3)));
    }

    #[test]
    fn set_with_if_ver_zero_requires_the_key_to_be_absent() {
        let limits = Limits::default();
        let mut room = empty(&limits);
        submit(
            &StateKind,
            &mut room,
            "u1",
            2,
            set("k", Value::Int(1), Some(0)),
            &limits,
        )
        .unwrap();
        let refusal = refused(&room, set("k", Value::Int(2), Some(0)), &limits);
        assert_eq!(refusal.code, RefuseCode::Conflict);
        assert_eq!(refusal.msg, "key \"k\" is at ver 2, not if_ver 0");
    }

    #[test]
    fn a_tombstone_counts_as_absent_for_if_ver() {
        let limits = Limits::default();
        let mut room = empty(&limits);
        submit(
            &StateKind,
            &mut room,
            "u1",
            2,
            set("k", Value::Int(1), None),
            &limits,
        )
        .unwrap();
        submit(&StateKind, &mut room, "u1", 3, del("k", None), &limits).unwrap();
        let refusal = refused(&room, set("k", Value::Int(2), Some(3)), &limits);
        assert_eq!(refusal.code, RefuseCode::Conflict);
        submit(
            &StateKind,
            &mut room,
            "u1",
            4,
            set("k", Value::Int(2), Some(0)),
            &limits,
        )
        .unwrap();
    }

    #[test]
    fn set_with_a_stale_if_ver_is_a_conflict() {
        let limits = Limits::default();
        let mut room = empty(&limits);
        submit(
            &StateKind,
            &mut room,
            "u1",
            2,
            set("k", Value::Int(1), None),
            &limits,
        )
        .unwrap();
        submit(
            &StateKind,
            &mut room,
            "u2",
            3,
            set("k", Value::Int(2), None),
            &limits,
        )
        .unwrap();
        let refusal = refused(&room, set("k", Value::Int(3), Some(2)), &limits);
        assert_eq!(refusal.code, RefuseCode::Conflict);
    }

    #[test]
    fn set_refuses_bad_keys_as_invalid() {
        let limits = Limits::default();
        let room = empty(&limits);
        let refusal = refused(&room, set("", Value::Int(1), None), &limits);
        assert_eq!(refusal.code, RefuseCode::Invalid);
        let long = "k".repeat(257);
        let refusal = refused(&room, set(&long, Value::Int(1), None), &limits);
        assert_eq!(refusal.code, RefuseCode::Invalid);
        assert_eq!(refusal.msg, "field \"key\" of 257 bytes, must be 1..=256");
        let longest = "k".repeat(256);
        assert!(StateKind
            .reduce(
                &room,
                &set(&longest, Value::Int(1), None),
                &ctx("u1", 2),
                &limits
            )
            .is_ok());
    }

    #[test]
    fn set_refuses_a_value_over_the_limit_as_too_large() {
        let limits = Limits::default();
        let room = empty(&limits);
        // A string of n bytes is n + 2 bytes of JSON.
        let big = s(&"x".repeat(32 * 1024 - 1));
        let refusal = refused(&room, set("k", big, None), &limits);
        assert_eq!(
            refusal,
            Refusal::new(
                RefuseCode::TooLarge,
                "value of 32769 bytes exceeds limit of 32768"
            )
        );
        let largest = s(&"x".repeat(32 * 1024 - 2));
        assert!(StateKind
            .reduce(&room, &set("k", largest, None), &ctx("u1", 2), &limits)
            .is_ok());
    }

    #[test]
    fn set_past_the_key_limit_is_refused_with_limit() {
        let limits = Limits {
            max_keys: 2,
            ..Limits::default()
        };
        let mut room = empty(&limits);
        submit(
            &StateKind,
            &mut room,
            "u1",
            2,
            set("a", Value::Int(1), None),
            &limits,
        )
        .unwrap();
        submit(
            &StateKind,
            &mut room,
            "u1",
            3,
            set("b", Value::Int(1), None),
            &limits,
        )
        .unwrap();
        let refusal = refused(&room, set("c", Value::Int(1), None), &limits);
        assert_eq!(
            refusal,
            Refusal::new(RefuseCode::Limit, "room of 3 keys would exceed limit of 2")
        );
        // Overwriting an existing key does not add one.
        submit(
            &StateKind,
            &mut room,
            "u1",
            4,
            set("b", Value::Int(2), None),
            &limits,
        )
        .unwrap();
        submit(&StateKind, &mut room, "u1", 5, del("a", None), &limits).unwrap();
        submit(
            &StateKind,
            &mut room,
            "u1",
            6,
            set("c", Value::Int(1), None),
            &limits,
        )
        .unwrap();
    }

    #[test]
    fn set_past_the_byte_limit_is_refused_with_limit() {
        let limits = Limits {
            max_room_bytes: 10,
            ..Limits::default()
        };
        let mut room = empty(&limits);
        // "a" + "\"123456\"" is 1 + 8 = 9 bytes.
        submit(
            &StateKind,
            &mut room,
            "u1",
            2,
            set("a", s("123456"), None),
            &limits,
        )
        .unwrap();
        let refusal = refused(&room, set("b", Value::Int(12), None), &limits);
        assert_eq!(refusal.code, RefuseCode::Limit);
        assert_eq!(refusal.msg, "room of 12 bytes would exceed limit of 10");
        submit(
            &StateKind,
            &mut room,
            "u1",
            3,
            set("a", s("1234567"), None),
            &limits,
        )
        .unwrap();
        assert_eq!(room.live_bytes(), 10);
    }

    #[test]
    fn a_room_over_its_limits_may_still_shrink() {
        let mut room = empty(&Limits::default());
        let _ = submit(
            &StateKind,
            &mut room,
            "u1",
            2,
            set("a", s("123456"), None),
            &Limits::default(),
        );
        let lowered = Limits {
            max_room_bytes: 5,
            ..Limits::default()
        };
        submit(
            &StateKind,
            &mut room,
            "u1",
            3,
            set("a", s("1"), None),
            &lowered,
        )
        .unwrap();
        let refusal = refused(&room, set("a", s("12345"), None), &lowered);
        assert_eq!(refusal.code, RefuseCode::Limit);
    }

    #[test]
    fn del_removes_the_key_and_checks_if_ver() {
        let limits = Limits::default();
        let mut room = empty(&limits);
        submit(
            &StateKind,
            &mut room,
            "u1",
            2,
            set("k", Value::Int(1), None),
            &limits,
        )
        .unwrap();
        assert_eq!(
            refused(&room, del("k", Some(3)), &limits).code,
            RefuseCode::Conflict
        );
        assert_eq!(
            refused(&room, del("k", Some(0)), &limits).code,
            RefuseCode::Conflict
        );
        submit(&StateKind, &mut room, "u1", 3, del("k", Some(2)), &limits).unwrap();
        assert_eq!(room.live_keys(), 0);
    }

    #[test]
    fn del_of_a_missing_key_is_invalid_unless_if_ver_expects_a_version() {
        let limits = Limits::default();
        let mut room = empty(&limits);
        assert_eq!(
            refused(&room, del("k", None), &limits).code,
            RefuseCode::Invalid
        );
        assert_eq!(
            refused(&room, del("k", Some(0)), &limits).code,
            RefuseCode::Invalid
        );
        assert_eq!(
            refused(&room, del("k", Some(4)), &limits).code,
            RefuseCode::Conflict
        );
        // A tombstone is as missing as a key never set.
        submit(
            &StateKind,
            &mut room,
            "u1",
            2,
            set("k", Value::Int(1), None),
            &limits,
        )
        .unwrap();
        submit(&StateKind, &mut room, "u1", 3, del("k", None), &limits).unwrap();
        assert_eq!(
            refused(&room, del("k", None), &limits).code,
            RefuseCode::Invalid
        );
        assert_eq!(
            refused(&room, del("k", Some(3)), &limits).code,
            RefuseCode::Conflict
        );
    }

    #[test]
    fn incr_counts_a_missing_key_as_zero_and_defaults_by_to_one() {
        let limits = Limits::default();
        let mut room = empty(&limits);
        submit(
            &StateKind,
            &mut room,
            "u1",
            2,
            incr("score/red", None, None),
            &limits,
        )
        .unwrap();
        submit(
            &StateKind,
            &mut room,
            "u1",
            3,
            incr("score/red", Some(-5), Some(2)),
            &limits,
        )
        .unwrap();
        assert_eq!(
            room.get("score/red").and_then(|s| s.value.clone()),
            Some(Value::Int(-4))
        );
        let refusal = refused(&room, incr("score/red", None, Some(2)), &limits);
        assert_eq!(refusal.code, RefuseCode::Conflict);
    }

    #[test]
    fn incr_of_a_non_integer_is_invalid() {
        let limits = Limits::default();
        let mut room = empty(&limits);
        submit(
            &StateKind,
            &mut room,
            "u1",
            2,
            set("k", Value::Float(1.5), None),
            &limits,
        )
        .unwrap();
        let refusal = refused(&room, incr("k", None, None), &limits);
        assert_eq!(refusal.code, RefuseCode::Invalid);
        let op = Value::map([
            ("type", s("incr")),
            ("key", s("n")),
            ("by", Value::Float(1.0)),
        ]);
        let refusal = refused(&room, op, &limits);
        assert_eq!(refusal.msg, "field \"by\" must be an integer");
    }

    #[test]
    fn incr_that_overflows_is_invalid() {
        let limits = Limits::default();
        let mut room = empty(&limits);
        submit(
            &StateKind,
            &mut room,
            "u1",
            2,
            set("k", Value::Int(i64::MAX), None),
            &limits,
        )
        .unwrap();
        let refusal = refused(&room, incr("k", None, None), &limits);
        assert_eq!(refusal.code, RefuseCode::Invalid);
        assert!(refusal.msg.contains("overflows"), "{}", refusal.msg);
        submit(
            &StateKind,
            &mut room,
            "u1",
            3,
            incr("n", Some(i64::MIN), None),
            &limits,
        )
        .unwrap();
        assert_eq!(
            refused(&room, incr("n", Some(-1), None), &limits).code,
            RefuseCode::Invalid
        );
    }

    #[test]
    fn incr_past_the_key_limit_is_refused_with_limit() {
        let limits = Limits {
            max_keys: 1,
            ..Limits::default()
        };
        let mut room = empty(&limits);
        submit(
            &StateKind,
            &mut room,
            "u1",
            2,
            incr("a", None, None),
            &limits,
        )
        .unwrap();
        assert_eq!(
            refused(&room, incr("b", None, None), &limits).code,
            RefuseCode::Limit
        );
    }

    #[test]
    fn malformed_ops_are_invalid_and_name_the_field() {
        let limits = Limits::default();
        let room = empty(&limits);
        let cases = [
            (Value::map([("type", s("put"))]), "\"put\""),
            (
                Value::map([("type", s("set")), ("value", Value::Null)]),
                "\"key\"",
            ),
            (
                Value::map([("type", s("set")), ("key", s("k"))]),
                "\"value\"",
            ),
            (
                Value::map([
                    ("type", s("set")),
                    ("key", Value::Int(1)),
                    ("value", Value::Null),
                ]),
                "\"key\"",
            ),
            (set("k", Value::Null, Some(-1)), "\"if_ver\""),
            (
                Value::map([
                    ("type", s("set")),
                    ("key", s("k")),
                    ("value", Value::Null),
                    ("if_ver", s("3")),
                ]),
                "\"if_ver\"",
            ),
            (
                Value::map([("type", s("del")), ("key", s("k")), ("value", Value::Null)]),
                "\"value\"",
            ),
            (
                Value::map([
                    ("type", s("incr")),
                    ("key", s("k")),
                    ("step", Value::Int(1)),
                ]),
                "\"step\"",
            ),
        ];
        for (op, named) in cases {
            let refusal = refused(&room, op, &limits);
            assert_eq!(refusal.code, RefuseCode::Invalid);
            assert!(refusal.msg.contains(named), "{} lacks {named}", refusal.msg);
        }
    }

    /// Keys the model test uses: two ordinary ones, an empty one and one over the
    /// 4-byte key limit.
    const KEYS: [&str; 4] = ["a", "bb", "", "toolong"];

    #[derive(Debug, Clone)]
    enum IfVer {
        /// Whatever the model says the key's version is now.
        Current,
        Exact(i64),
    }

    #[derive(Debug, Clone)]
    enum ModelOp {
        Set(usize, Value, Option<IfVer>),
        Del(usize, Option<IfVer>),
        Incr(usize, Option<i64>, Option<IfVer>),
    }

    fn arb_if_ver() -> impl Strategy<Value = Option<IfVer>> {
        prop_oneof![
            2 => Just(None),
            2 => Just(Some(IfVer::Current)),
            1 => (-1i64..6).prop_map(|v| Some(IfVer::Exact(v))),
        ]
    }

    fn arb_model_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            (-3i64..3).prop_map(Value::Int),
            Just(Value::Int(i64::MAX)),
            Just(s("x")),
            // 2 + 12 = 14 bytes of JSON, over the 12-byte value limit.
            Just(s("abcdefghijkl")),
            Just(Value::Null),
        ]
    }

    fn arb_model_op() -> impl Strategy<Value = ModelOp> {
        prop_oneof![
            (0usize..4, arb_model_value(), arb_if_ver())
                .prop_map(|(k, v, i)| ModelOp::Set(k, v, i)),
            (0usize..4, arb_if_ver()).prop_map(|(k, i)| ModelOp::Del(k, i)),
            (
                0usize..4,
                prop_oneof![Just(None), (-2i64..3).prop_map(Some), Just(Some(i64::MAX))],
                arb_if_ver()
            )
                .prop_map(|(k, b, i)| ModelOp::Incr(k, b, i)),
        ]
    }

    /// The model's entries: key -> (value, ver), `None` value for a tombstone.
    type Model = BTreeMap<String, (Option<Value>, u64)>;

    fn model_ver(model: &Model, key: &str) -> u64 {
        match model.get(key) {
            Some((Some(_), ver)) => *ver,
            _ => 0,
        }
    }

    fn model_bytes(model: &Model) -> usize {
        model
            .iter()
            .filter_map(|(k, (v, _))| v.as_ref().map(|v| k.len() + v.json_size()))
            .sum()
    }

    /// What the rules say about writing `new` under `key`.
    fn expected_write(
        model: &Model,
        key: &str,
        new: &Value,
        limits: &Limits,
    ) -> Option<RefuseCode> {
        let old = model.get(key).and_then(|(v, _)| v.as_ref());
        let live = model.values().filter(|(v, _)| v.is_some()).count();
        if old.is_none() && live + 1 > limits.max_keys {
            return Some(RefuseCode::Limit);
        }
        let before = model_bytes(model);
        let after =
            before - old.map_or(0, |o| key.len() + o.json_size()) + key.len() + new.json_size();
        (after > limits.max_room_bytes && after > before).then_some(RefuseCode::Limit)
    }

    const USERS: [&str; 3] = ["u0", "u1", "u2"];
    const NAMES: &[&str] = &[
        "type", "key", "value", "if_ver", "by", "entries", "a", "set", "del", "incr",
    ];

    proptest! {
        #[test]
        fn reducer_and_apply_match_a_simple_model(
            ops in proptest::collection::vec((0usize..3, arb_model_op()), 0..50),
            prune_every in 3u64..10,
        ) {
            let limits = Limits {
                max_keys: 2,
                max_room_bytes: 20,
                max_value_bytes: 12,
                max_key_bytes: 4,
                ..Limits::default()
            };
            let mut room = empty(&limits);
            let mut model = Model::new();
            let mut floor = 0u64;
            for (i, (user, op)) in ops.into_iter().enumerate() {
                let seq = i as u64 + 2;
                let key_code = |k: &str| (k.is_empty() || k.len() > 4).then_some(RefuseCode::Invalid);
                let resolve = |model: &Model, key: &str, if_ver: &Option<IfVer>| match if_ver {
                    None => None,
                    Some(IfVer::Current) => Some(model_ver(model, key) as i64),
                    Some(IfVer::Exact(v)) => Some(*v),
                };
                let ver_code = |model: &Model, key: &str, if_ver: Option<i64>| match if_ver {
                    Some(v) if v < 0 => Some(RefuseCode::Invalid),
                    Some(v) if v as u64 != model_ver(model, key) => Some(RefuseCode::Conflict),
                    _ => None,
                };
                let (value, expected, new) = match &op {
                    ModelOp::Set(k, v, if_ver) => {
                        let key = KEYS[*k];
                        let if_ver = resolve(&model, key, if_ver);
                        let expected = key_code(key)
                            .or(if_ver.filter(|v| *v < 0).map(|_| RefuseCode::Invalid))
                            .or((v.json_size() > 12).then_some(RefuseCode::TooLarge))
                            .or_else(|| ver_code(&model, key, if_ver))
                            .or_else(|| expected_write(&model, key, v, &limits));
                        (set(key, v.clone(), if_ver), expected, Some(v.clone()))
                    }
                    ModelOp::Del(k, if_ver) => {
                        let key = KEYS[*k];
                        let if_ver = resolve(&model, key, if_ver);
                        let missing = model_ver(&model, key) == 0;
                        let expected = key_code(key)
                            .or(if_ver.filter(|v| *v < 0).map(|_| RefuseCode::Invalid))
                            .or_else(|| match (missing, if_ver) {
                                (true, None | Some(0)) => Some(RefuseCode::Invalid),
                                _ => ver_code(&model, key, if_ver),
                            });
                        (del(key, if_ver), expected, None)
                    }
                    ModelOp::Incr(k, by, if_ver) => {
                        let key = KEYS[*k];
                        let if_ver = resolve(&model, key, if_ver);
                        let current = match model.get(key) {
                            Some((Some(Value::Int(n)), _)) => Some(*n),
                            Some((Some(_), _)) => None,
                            _ => Some(0),
                        };
                        let sum = current.and_then(|c| c.checked_add(by.unwrap_or(1)));
                        let new = Value::Int(sum.unwrap_or(0));
                        let expected = key_code(key)
                            .or(if_ver.filter(|v| *v < 0).map(|_| RefuseCode::Invalid))
                            .or_else(|| ver_code(&model, key, if_ver))
                            .or(sum.is_none().then_some(RefuseCode::Invalid))
                            .or((new.json_size() > 12).then_some(RefuseCode::TooLarge))
                            .or_else(|| expected_write(&model, key, &new, &limits));
                        (incr(key, *by, if_ver), expected, Some(new))
                    }
                };
                let result = submit(&StateKind, &mut room, USERS[user], seq, value, &limits);
                prop_assert_eq!(code(&result), expected, "{:?}", op);
                if expected.is_none() {
                    let key = match &op {
                        ModelOp::Set(k, ..) | ModelOp::Del(k, ..) | ModelOp::Incr(k, ..) => KEYS[*k],
                    };
                    model.insert(key.to_owned(), (new, seq));
                }
                if seq % prune_every == 1 {
                    floor = seq - 2;
                    room.prune_tombstones(floor);
                    model.retain(|_, (v, ver)| v.is_some() || *ver > floor);
                    prop_assert_eq!(room.changed_since(floor - 1), None);
                }
                let actual: Model = room
                    .changed_since(floor)
                    .expect("the floor itself is never below the floor")
                    .into_iter()
                    .map(|(k, slot)| (k.to_owned(), (slot.value.clone(), slot.ver)))
                    .collect();
                let expected_changes: Model = model
                    .iter()
                    .filter(|(_, (_, ver))| *ver > floor)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                prop_assert_eq!(actual, expected_changes);
                let live: Vec<(String, Value)> = room
                    .entries()
                    .map(|(k, slot)| (k.to_owned(), slot.value.clone().expect("entries are live")))
                    .collect();
                let model_live: Vec<(String, Value)> = model
                    .iter()
                    .filter_map(|(k, (v, _))| v.clone().map(|v| (k.clone(), v)))
                    .collect();
                prop_assert_eq!(live, model_live);
                prop_assert_eq!(room.live_bytes(), model_bytes(&model));
            }
        }

        #[test]
        fn reduce_never_panics_on_arbitrary_values(
            ops in proptest::collection::vec(
                prop_oneof![arb_value(NAMES), arb_op_like(&["set", "del", "incr"], NAMES)],
                1..30,
            ),
            init in arb_value(NAMES),
        ) {
            let limits = Limits {
                max_keys: 3,
                max_room_bytes: 200,
                max_value_bytes: 60,
                max_key_bytes: 4,
                ..Limits::default()
            };
            if let Ok(changes) = create(&init, &ctx("u0", 1), &limits) {
                let mut room = RoomState::new();
                apply_checked(&mut room, 1, &changes);
            }
            let mut room = empty(&limits);
            for (i, op) in ops.into_iter().enumerate() {
                let _ = submit(&StateKind, &mut room, USERS[i % 3], i as u64 + 2, op, &limits);
            }
        }
    }
}
