//! The "chat" room kind: its `init`, its ops (`post`, `edit`, `delete`) and the
//! eviction of the oldest message beyond the room's `history`.
//!
//! Messages are public entries `msg/<seq>` = `{"user","text","ts"}` (plus `"edited"`
//! once edited). Private `creator` and `history` are written once, at creation. The
//! index of live message seqs that eviction reads is `RoomState::numbered("msg")`, which
//! `RoomState::apply` keeps for any kind.

use super::{Changes, Ctx, Fields, Limits, Refusal, RefuseCode, RoomKind, RoomState};
use crate::value::Value;

/// The built-in "chat" kind.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChatKind;

impl RoomKind for ChatKind {
    fn name(&self) -> &str {
        "chat"
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

/// The public key of the message posted as event `seq`.
fn message_key(seq: u64) -> String {
    format!("msg/{seq}")
}

fn create(init: &Value, ctx: &Ctx, limits: &Limits) -> Result<Changes, Refusal> {
    let fields = Fields::init(init)?;
    fields.only(&["history"])?;
    let history = match fields.opt_int("history")? {
        None => limits.default_chat_history,
        Some(n) => match usize::try_from(n) {
            Ok(n) if (1..=limits.max_chat_history).contains(&n) => n,
            _ => {
                return Err(Refusal::invalid(format!(
                    "field \"history\" is {n}, must be 1..={}",
                    limits.max_chat_history
                )))
            }
        },
    };
    Ok(Changes {
        public: vec![],
        private: vec![
            ("creator".to_owned(), Some(Value::Str(ctx.user.to_owned()))),
            (
                "history".to_owned(),
                Some(Value::Int(saturating_i64(history))),
            ),
        ],
    })
}

fn reduce(state: &RoomState, op: &Value, ctx: &Ctx, limits: &Limits) -> Result<Changes, Refusal> {
    let (kind, fields) = Fields::op(op)?;
    match kind {
        "post" => {
            fields.only(&["text"])?;
            let text = checked_text(&fields, limits)?;
            post(state, text, ctx, limits)
        }
        "edit" => {
            fields.only(&["msg", "text"])?;
            let seq = fields.int("msg")?;
            let text = checked_text(&fields, limits)?;
            let (key, message) = own_message(state, seq, ctx)?;
            // Messages are maps written by `post`; anything else is rebuilt from empty.
            let mut edited = message.as_map().cloned().unwrap_or_default();
            edited.insert("text".to_owned(), Value::Str(text.to_owned()));
            edited.insert("edited".to_owned(), Value::Int(ctx.now_ms));
            Ok(Changes {
                public: vec![(key, Some(Value::Map(edited)))],
                private: vec![],
            })
        }
        "delete" => {
            fields.only(&["msg"])?;
            let seq = fields.int("msg")?;
            let (key, _) = own_message(state, seq, ctx)?;
            Ok(Changes {
                public: vec![(key, None)],
                private: vec![],
            })
        }
        other => Err(Refusal::invalid(format!(
            "unknown op type \"{other}\" for a chat room"
        ))),
    }
}

/// Adds the message and evicts the oldest ones beyond the room's history.
fn post(state: &RoomState, text: &str, ctx: &Ctx, limits: &Limits) -> Result<Changes, Refusal> {
    let message = Value::map([
        ("user", Value::Str(ctx.user.to_owned())),
        ("text", Value::Str(text.to_owned())),
        ("ts", Value::Int(ctx.now_ms)),
    ]);
    // `create` always records a history of at least 1; the fallback only keeps a room
    // that skipped its creation event from evicting the message being posted.
    let history = state
        .private("history")
        .and_then(Value::as_i64)
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| *n >= 1)
        .unwrap_or(limits.default_chat_history.max(1));
    // Only existing messages are evicted, never the one being posted (history >= 1).
    // Event seqs are never reused, so `ctx.seq` is not live; skipping it anyway keeps a
    // key from appearing twice in `Changes` whatever the caller passes.
    let n_evicted = (state.n_numbered("msg") + 1).saturating_sub(history);
    let mut public: Vec<(String, Option<Value>)> = state
        .numbered("msg")
        .filter(|seq| *seq != ctx.seq)
        .take(n_evicted)
        .map(|seq| (message_key(seq), None))
        .collect();
    public.push((message_key(ctx.seq), Some(message)));
    Ok(Changes {
        public,
        private: vec![],
    })
}

/// The `text` field, 1..=max_text_bytes bytes.
fn checked_text<'a>(fields: &Fields<'a>, limits: &Limits) -> Result<&'a str, Refusal> {
    let text = fields.str("text")?;
    if text.is_empty() {
        return Err(Refusal::invalid("field \"text\" is empty"));
    }
    if text.len() > limits.max_text_bytes {
        return Err(Refusal::new(
            RefuseCode::TooLarge,
            format!(
                "text of {} bytes exceeds limit of {}",
                text.len(),
                limits.max_text_bytes
            ),
        ));
    }
    Ok(text)
}

/// The key and value of live message `seq`, if `ctx.user` wrote it.
fn own_message<'s>(
    state: &'s RoomState,
    seq: i64,
    ctx: &Ctx,
) -> Result<(String, &'s Value), Refusal> {
    let not_found = || Refusal::invalid(format!("message {seq} is not in the room"));
    let seq = u64::try_from(seq).map_err(|_| not_found())?;
    let key = message_key(seq);
    let message = state.live(&key).ok_or_else(not_found)?;
    if message.get("user").and_then(Value::as_str) != Some(ctx.user) {
        return Err(Refusal::new(
            RefuseCode::Forbidden,
            format!("message {seq} was written by another user"),
        ));
    }
    Ok((key, message))
}

fn saturating_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::Slot;
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn post_op(text: &str) -> Value {
        Value::map([("type", s("post")), ("text", s(text))])
    }

    fn edit_op(msg: i64, text: &str) -> Value {
        Value::map([
            ("type", s("edit")),
            ("msg", Value::Int(msg)),
            ("text", s(text)),
        ])
    }

    fn delete_op(msg: i64) -> Value {
        Value::map([("type", s("delete")), ("msg", Value::Int(msg))])
    }

    fn chat(history: Option<i64>, limits: &Limits) -> RoomState {
        let init = match history {
            Some(n) => Value::map([("history", Value::Int(n))]),
            None => Value::map::<&str>([]),
        };
        created(&ChatKind, init, limits)
    }

    fn message_keys(room: &RoomState) -> Vec<String> {
        room.entries().map(|(key, _)| key.to_owned()).collect()
    }

    #[test]
    fn create_records_creator_and_default_history() {
        let limits = Limits::default();
        let changes = create(&Value::Null, &ctx("alice", 1), &limits).unwrap();
        assert!(changes.public.is_empty());
        assert_eq!(
            changes.private,
            vec![
                ("creator".to_owned(), Some(s("alice"))),
                ("history".to_owned(), Some(Value::Int(500))),
            ]
        );
        let explicit = Value::map([("history", Value::Int(3))]);
        let changes = create(&explicit, &ctx("alice", 1), &limits).unwrap();
        assert_eq!(changes.private[1].1, Some(Value::Int(3)));
    }

    #[test]
    fn create_refuses_history_out_of_range_and_unknown_fields() {
        let limits = Limits::default();
        for init in [
            Value::map([("history", Value::Int(0))]),
            Value::map([("history", Value::Int(-1))]),
            Value::map([("history", Value::Int(10_001))]),
            Value::map([("history", s("5"))]),
            Value::map([("size", Value::Int(5))]),
            Value::Int(5),
        ] {
            let refusal = create(&init, &ctx("alice", 1), &limits).unwrap_err();
            assert_eq!(refusal.code, RefuseCode::Invalid, "{init:?}");
        }
        let refusal = create(
            &Value::map([("history", Value::Int(10_001))]),
            &ctx("a", 1),
            &limits,
        )
        .unwrap_err();
        assert_eq!(refusal.msg, "field \"history\" is 10001, must be 1..=10000");
        let refusal = create(
            &Value::map([("size", Value::Int(5))]),
            &ctx("a", 1),
            &limits,
        )
        .unwrap_err();
        assert_eq!(refusal.msg, "unknown field \"size\"");
    }

    #[test]
    fn post_adds_a_message_keyed_by_its_seq() {
        let limits = Limits::default();
        let mut room = chat(None, &limits);
        submit(&ChatKind, &mut room, "bob", 2, post_op("hi"), &limits).unwrap();
        assert_eq!(
            room.get("msg/2"),
            Some(&Slot {
                value: Some(Value::map([
                    ("user", s("bob")),
                    ("text", s("hi")),
                    ("ts", Value::Int(1002)),
                ])),
                ver: 2,
                audience: None,
            })
        );
    }

    #[test]
    fn post_refuses_empty_text_as_invalid() {
        let limits = Limits::default();
        let room = chat(None, &limits);
        let refusal = ChatKind
            .reduce(&room, &post_op(""), &ctx("bob", 2), &limits)
            .unwrap_err();
        assert_eq!(refusal.code, RefuseCode::Invalid);
        assert!(refusal.msg.contains("\"text\""));
    }

    #[test]
    fn post_refuses_text_over_the_limit_as_too_large() {
        let limits = Limits::default();
        let room = chat(None, &limits);
        let text = "x".repeat(5000);
        let refusal = ChatKind
            .reduce(&room, &post_op(&text), &ctx("bob", 2), &limits)
            .unwrap_err();
        assert_eq!(
            refusal,
            Refusal::new(
                RefuseCode::TooLarge,
                "text of 5000 bytes exceeds limit of 4096"
            )
        );
        let text = "x".repeat(4096);
        assert!(ChatKind
            .reduce(&room, &post_op(&text), &ctx("bob", 2), &limits)
            .is_ok());
    }

    #[test]
    fn post_refuses_wrong_field_types_and_unknown_fields() {
        let limits = Limits::default();
        let room = chat(None, &limits);
        for (op, named) in [
            (Value::map([("type", s("post"))]), "\"text\""),
            (
                Value::map([("type", s("post")), ("text", Value::Int(1))]),
                "\"text\"",
            ),
            (
                Value::map([("type", s("post")), ("text", s("a")), ("to", s("b"))]),
                "\"to\"",
            ),
            (Value::map([("type", s("shout"))]), "\"shout\""),
        ] {
            let refusal = ChatKind
                .reduce(&room, &op, &ctx("bob", 2), &limits)
                .unwrap_err();
            assert_eq!(refusal.code, RefuseCode::Invalid);
            assert!(refusal.msg.contains(named), "{}", refusal.msg);
        }
    }

    #[test]
    fn posting_beyond_history_evicts_the_oldest_message_in_the_same_changes() {
        let limits = Limits::default();
        let mut room = chat(Some(2), &limits);
        submit(&ChatKind, &mut room, "a", 2, post_op("one"), &limits).unwrap();
        submit(&ChatKind, &mut room, "a", 3, post_op("two"), &limits).unwrap();
        let changes = submit(&ChatKind, &mut room, "a", 4, post_op("three"), &limits).unwrap();
        assert_eq!(changes.public[0], ("msg/2".to_owned(), None));
        assert_eq!(message_keys(&room), ["msg/3", "msg/4"]);
        assert_eq!(room.get("msg/2"), Some(&Slot::new(None, 4)));
    }

    #[test]
    fn eviction_skips_deleted_messages() {
        let limits = Limits::default();
        let mut room = chat(Some(2), &limits);
        submit(&ChatKind, &mut room, "a", 2, post_op("one"), &limits).unwrap();
        submit(&ChatKind, &mut room, "a", 3, post_op("two"), &limits).unwrap();
        submit(&ChatKind, &mut room, "a", 4, delete_op(2), &limits).unwrap();
        let changes = submit(&ChatKind, &mut room, "a", 5, post_op("three"), &limits).unwrap();
        assert_eq!(changes.public.len(), 1, "nothing to evict: {changes:?}");
        let changes = submit(&ChatKind, &mut room, "a", 6, post_op("four"), &limits).unwrap();
        assert_eq!(changes.public[0], ("msg/3".to_owned(), None));
        assert_eq!(message_keys(&room), ["msg/5", "msg/6"]);
    }

    #[test]
    fn history_of_one_keeps_only_the_newest_message() {
        let limits = Limits::default();
        let mut room = chat(Some(1), &limits);
        for seq in 2..6 {
            submit(&ChatKind, &mut room, "a", seq, post_op("m"), &limits).unwrap();
            assert_eq!(message_keys(&room), [format!("msg/{seq}")]);
        }
    }

    #[test]
    fn edit_replaces_text_and_keeps_user_and_ts() {
        let limits = Limits::default();
        let mut room = chat(None, &limits);
        submit(&ChatKind, &mut room, "bob", 2, post_op("hi"), &limits).unwrap();
        submit(&ChatKind, &mut room, "bob", 3, edit_op(2, "hello"), &limits).unwrap();
        assert_eq!(
            room.get("msg/2"),
            Some(&Slot {
                value: Some(Value::map([
                    ("user", s("bob")),
                    ("text", s("hello")),
                    ("ts", Value::Int(1002)),
                    ("edited", Value::Int(1003)),
                ])),
                ver: 3,
                audience: None,
            })
        );
    }

    #[test]
    fn delete_removes_the_message() {
        let limits = Limits::default();
        let mut room = chat(None, &limits);
        submit(&ChatKind, &mut room, "bob", 2, post_op("hi"), &limits).unwrap();
        submit(&ChatKind, &mut room, "bob", 3, delete_op(2), &limits).unwrap();
        assert_eq!(room.entries().count(), 0);
        assert_eq!(room.get("msg/2"), Some(&Slot::new(None, 3)));
    }

    #[test]
    fn edit_or_delete_by_another_user_is_forbidden() {
        let limits = Limits::default();
        let mut room = chat(None, &limits);
        submit(&ChatKind, &mut room, "bob", 2, post_op("hi"), &limits).unwrap();
        for op in [edit_op(2, "mine now"), delete_op(2)] {
            let refusal = ChatKind
                .reduce(&room, &op, &ctx("eve", 3), &limits)
                .unwrap_err();
            assert_eq!(refusal.code, RefuseCode::Forbidden);
        }
    }

    #[test]
    fn edit_or_delete_of_a_message_not_in_the_room_is_invalid() {
        let limits = Limits::default();
        let mut room = chat(Some(1), &limits);
        submit(&ChatKind, &mut room, "bob", 2, post_op("hi"), &limits).unwrap();
        submit(&ChatKind, &mut room, "bob", 3, post_op("evicts 2"), &limits).unwrap();
        submit(&ChatKind, &mut room, "bob", 4, post_op("evicts 3"), &limits).unwrap();
        submit(&ChatKind, &mut room, "bob", 5, delete_op(4), &limits).unwrap();
        // 2 and 3 were evicted, 4 deleted, 1 is the creation event, 99 and -1 never were.
        for msg in [1, 2, 3, 4, 99, -1, i64::MIN] {
            for op in [edit_op(msg, "x"), delete_op(msg)] {
                let refusal = ChatKind
                    .reduce(&room, &op, &ctx("bob", 6), &limits)
                    .unwrap_err();
                assert_eq!(refusal.code, RefuseCode::Invalid, "{op:?}");
                assert!(refusal.msg.contains("not in the room"), "{}", refusal.msg);
            }
        }
    }

    #[test]
    fn edit_checks_its_text_like_post() {
        let limits = Limits::default();
        let mut room = chat(None, &limits);
        submit(&ChatKind, &mut room, "bob", 2, post_op("hi"), &limits).unwrap();
        let too_long = "x".repeat(4097);
        let refusal = ChatKind
            .reduce(&room, &edit_op(2, &too_long), &ctx("bob", 3), &limits)
            .unwrap_err();
        assert_eq!(refusal.code, RefuseCode::TooLarge);
        let refusal = ChatKind
            .reduce(&room, &edit_op(2, ""), &ctx("bob", 3), &limits)
            .unwrap_err();
        assert_eq!(refusal.code, RefuseCode::Invalid);
        let op = Value::map([("type", s("edit")), ("msg", s("2")), ("text", s("x"))]);
        let refusal = ChatKind
            .reduce(&room, &op, &ctx("bob", 3), &limits)
            .unwrap_err();
        assert!(refusal.msg.contains("\"msg\""), "{}", refusal.msg);
    }

    #[test]
    fn the_message_index_reads_only_canonical_message_keys() {
        let message_seq = |key| {
            super::super::numbered_key(key)
                .filter(|(prefix, _)| *prefix == "msg")
                .map(|(_, n)| n)
        };
        assert_eq!(message_seq("msg/12"), Some(12));
        assert_eq!(message_seq("msg/0"), Some(0));
        for key in ["msg/", "msg/+1", "msg/01", "msg/1a", "msgs/1", "count/1"] {
            assert_eq!(message_seq(key), None, "{key}");
        }
    }

    #[test]
    fn create_and_reduce_are_deterministic() {
        let limits = Limits::default();
        let mut room = chat(Some(2), &limits);
        submit(&ChatKind, &mut room, "bob", 2, post_op("hi"), &limits).unwrap();
        let op = post_op("again");
        assert_eq!(
            ChatKind.reduce(&room, &op, &ctx("bob", 3), &limits),
            ChatKind.reduce(&room, &op, &ctx("bob", 3), &limits)
        );
    }

    /// Ops the model test generates: message numbers are small so that live, evicted,
    /// deleted and never-posted messages are all hit.
    #[derive(Debug, Clone)]
    enum ModelOp {
        Post(String),
        Edit(i64, String),
        Delete(i64),
    }

    fn arb_text() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[a-z]{1,6}", "[a-z]{7,10}"]
    }

    fn arb_model_op() -> impl Strategy<Value = ModelOp> {
        prop_oneof![
            3 => arb_text().prop_map(ModelOp::Post),
            1 => (-1i64..30, arb_text()).prop_map(|(m, t)| ModelOp::Edit(m, t)),
            1 => (-1i64..30).prop_map(ModelOp::Delete),
        ]
    }

    /// A message in the model: (author, text, ts, edited).
    type ModelMessage = (String, String, i64, Option<i64>);

    const USERS: [&str; 3] = ["u0", "u1", "u2"];
    const NAMES: &[&str] = &["type", "text", "msg", "post", "edit", "delete", "history"];

    proptest! {
        #[test]
        fn reducer_and_apply_match_a_simple_model(
            history in 1i64..5,
            ops in proptest::collection::vec((0usize..3, arb_model_op()), 0..40),
        ) {
            // A text limit of 6 bytes makes "[a-z]{7,10}" too large.
            let limits = Limits { max_text_bytes: 6, ..Limits::default() };
            let mut room = chat(Some(history), &limits);
            let mut model: BTreeMap<u64, ModelMessage> = BTreeMap::new();
            for (i, (user, op)) in ops.into_iter().enumerate() {
                let user = USERS[user];
                let seq = i as u64 + 2;
                let now = ctx(user, seq).now_ms;
                let text_code = |t: &str| match t.len() {
                    0 => Some(RefuseCode::Invalid),
                    n if n > 6 => Some(RefuseCode::TooLarge),
                    _ => None,
                };
                let owner_code = |m: i64| match u64::try_from(m).ok().and_then(|m| model.get(&m)) {
                    None => Some(RefuseCode::Invalid),
                    Some((author, ..)) if author != user => Some(RefuseCode::Forbidden),
                    Some(_) => None,
                };
                let (value, expected) = match &op {
                    ModelOp::Post(t) => (post_op(t), text_code(t)),
                    ModelOp::Edit(m, t) => (edit_op(*m, t), text_code(t).or(owner_code(*m))),
                    ModelOp::Delete(m) => (delete_op(*m), owner_code(*m)),
                };
                let result = submit(&ChatKind, &mut room, user, seq, value, &limits);
                prop_assert_eq!(code(&result), expected, "{:?} by {}", op, user);
                if expected.is_none() {
                    match op {
                        ModelOp::Post(t) => {
                            model.insert(seq, (user.to_owned(), t, now, None));
                            while model.len() > history as usize {
                                model.pop_first();
                            }
                        }
                        ModelOp::Edit(m, t) => {
                            let message = model.get_mut(&(m as u64)).expect("checked live above");
                            message.1 = t;
                            message.3 = Some(now);
                        }
                        ModelOp::Delete(m) => {
                            model.remove(&(m as u64));
                        }
                    }
                }
                let expected_entries: Vec<(String, Value)> = model
                    .iter()
                    .map(|(seq, (user, text, ts, edited))| {
                        let mut fields = vec![
                            ("user", s(user)),
                            ("text", s(text)),
                            ("ts", Value::Int(*ts)),
                        ];
                        if let Some(edited) = edited {
                            fields.push(("edited", Value::Int(*edited)));
                        }
                        (message_key(*seq), Value::map(fields))
                    })
                    .collect::<BTreeMap<_, _>>()
                    .into_iter()
                    .collect();
                let actual: Vec<(String, Value)> = room
                    .entries()
                    .map(|(k, slot)| (k.to_owned(), slot.value.clone().expect("entries are live")))
                    .collect();
                prop_assert_eq!(actual, expected_entries);
                prop_assert_eq!(
                    room.numbered("msg").collect::<Vec<_>>(),
                    model.keys().copied().collect::<Vec<_>>()
                );
            }
        }

        #[test]
        fn reduce_never_panics_on_arbitrary_values(
            posts in 0usize..6,
            ops in proptest::collection::vec(
                prop_oneof![arb_value(NAMES), arb_op_like(&["post", "edit", "delete"], NAMES)],
                1..20,
            ),
            init in arb_value(NAMES),
        ) {
            let limits = Limits { max_text_bytes: 6, ..Limits::default() };
            let _ = create(&init, &ctx("u0", 1), &limits);
            let mut room = chat(Some(3), &limits);
            for seq in 0..posts as u64 {
                submit(&ChatKind, &mut room, USERS[seq as usize % 3], seq + 2, post_op("m"), &limits)
                    .expect("a short post is accepted");
            }
            for (i, op) in ops.into_iter().enumerate() {
                let seq = (posts + i) as u64 + 2;
                // Accepted ops are applied, so later ops meet the state they produced.
                let _ = submit(&ChatKind, &mut room, USERS[i % 3], seq, op, &limits);
            }
        }
    }
}
