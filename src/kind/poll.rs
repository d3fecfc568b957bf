//! The "poll" room kind: its `init` and its ops (`vote`, `retract`, `close`).
//!
//! Public entries are `question`, `options`, `count/<i>` per option, `total` and
//! `closed`. Who voted for what is private (`vote/<user>` = the option index), as is the
//! `creator`, the only user who may close the poll.
//!
//! Refusals are checked in one order: the op's shape (`invalid`), then `closed`, then
//! `forbidden`, then what the op refers to (`invalid`: option out of range, no vote).

use super::{Changes, Ctx, Fields, Limits, Refusal, RefuseCode, RoomKind, RoomState};
use crate::value::Value;

/// The built-in "poll" kind.
#[derive(Debug, Clone, Copy, Default)]
pub struct PollKind;

impl RoomKind for PollKind {
    fn name(&self) -> &str {
        "poll"
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

    fn private_op(&self, op: &Value) -> bool {
        // Who voted for what is not public: a vote or retract names both.
        matches!(
            op.get("type").and_then(Value::as_str),
            Some("vote" | "retract")
        )
    }
}

const MAX_QUESTION_BYTES: usize = 4096;
const MAX_OPTION_BYTES: usize = 1024;
const MIN_OPTIONS: usize = 2;
const MAX_OPTIONS: usize = 32;

fn count_key(option: usize) -> String {
    format!("count/{option}")
}

fn vote_key(user: &str) -> String {
    format!("vote/{user}")
}

fn create(init: &Value, ctx: &Ctx, _limits: &Limits) -> Result<Changes, Refusal> {
    let fields = Fields::init(init)?;
    fields.only(&["question", "options"])?;
    let question = fields.str("question")?;
    if !(1..=MAX_QUESTION_BYTES).contains(&question.len()) {
        return Err(Refusal::invalid(format!(
            "field \"question\" of {} bytes, must be 1..={MAX_QUESTION_BYTES}",
            question.len()
        )));
    }
    let options = match fields.required("options")? {
        Value::List(options) => options,
        _ => return Err(Refusal::invalid("field \"options\" must be a list")),
    };
    if !(MIN_OPTIONS..=MAX_OPTIONS).contains(&options.len()) {
        return Err(Refusal::invalid(format!(
            "field \"options\" has {} options, must be {MIN_OPTIONS}..={MAX_OPTIONS}",
            options.len()
        )));
    }
    for (i, option) in options.iter().enumerate() {
        let text = option.as_str().ok_or_else(|| {
            Refusal::invalid(format!("field \"options\" item {i} must be a string"))
        })?;
        if !(1..=MAX_OPTION_BYTES).contains(&text.len()) {
            return Err(Refusal::invalid(format!(
                "field \"options\" item {i} of {} bytes, must be 1..={MAX_OPTION_BYTES}",
                text.len()
            )));
        }
    }
    let mut public = vec![
        ("question".to_owned(), Some(Value::Str(question.to_owned()))),
        ("options".to_owned(), Some(Value::List(options.clone()))),
    ];
    public.extend((0..options.len()).map(|i| (count_key(i), Some(Value::Int(0)))));
    public.push(("total".to_owned(), Some(Value::Int(0))));
    public.push(("closed".to_owned(), Some(Value::Bool(false))));
    Ok(Changes {
        public,
        private: vec![("creator".to_owned(), Some(Value::Str(ctx.user.to_owned())))],
    })
}

fn reduce(state: &RoomState, op: &Value, ctx: &Ctx, _limits: &Limits) -> Result<Changes, Refusal> {
    let (kind, fields) = Fields::op(op)?;
    match kind {
        "vote" => {
            fields.only(&["option"])?;
            let option = fields.int("option")?;
            refuse_if_closed(state)?;
            let n_options = match state.live("options") {
                Some(Value::List(options)) => options.len(),
                _ => 0,
            };
            let option = usize::try_from(option)
                .ok()
                .filter(|i| *i < n_options)
                .ok_or_else(|| {
                    Refusal::invalid(format!(
                        "field \"option\" is {option}, must be 0..{n_options}"
                    ))
                })?;
            let previous = current_vote(state, ctx.user);
            if previous == Some(option) {
                return Ok(Changes::default());
            }
            let mut public = vec![(
                count_key(option),
                Some(Value::Int(count(state, option).saturating_add(1))),
            )];
            match previous {
                Some(previous) => public.push((
                    count_key(previous),
                    Some(Value::Int(count(state, previous).saturating_sub(1))),
                )),
                None => public.push((
                    "total".to_owned(),
                    Some(Value::Int(total(state).saturating_add(1))),
                )),
            }
            Ok(Changes {
                public,
                private: vec![(vote_key(ctx.user), Some(Value::Int(saturating_i64(option))))],
            })
        }
        "retract" => {
            fields.only(&[])?;
            refuse_if_closed(state)?;
            let previous = current_vote(state, ctx.user)
                .ok_or_else(|| Refusal::invalid("user has no vote to retract"))?;
            Ok(Changes {
                public: vec![
                    (
                        count_key(previous),
                        Some(Value::Int(count(state, previous).saturating_sub(1))),
                    ),
                    (
                        "total".to_owned(),
                        Some(Value::Int(total(state).saturating_sub(1))),
                    ),
                ],
                private: vec![(vote_key(ctx.user), None)],
            })
        }
        "close" => {
            fields.only(&[])?;
            refuse_if_closed(state)?;
            if state.private("creator").and_then(Value::as_str) != Some(ctx.user) {
                return Err(Refusal::new(
                    RefuseCode::Forbidden,
                    "only the creator may close the poll",
                ));
            }
            Ok(Changes {
                public: vec![("closed".to_owned(), Some(Value::Bool(true)))],
                private: vec![],
            })
        }
        other => Err(Refusal::invalid(format!(
            "unknown op type \"{other}\" for a poll room"
        ))),
    }
}

fn refuse_if_closed(state: &RoomState) -> Result<(), Refusal> {
    match state.live("closed") {
        Some(Value::Bool(true)) => Err(Refusal::new(RefuseCode::Closed, "the poll is closed")),
        _ => Ok(()),
    }
}

/// The option `user` voted for, if any.
fn current_vote(state: &RoomState, user: &str) -> Option<usize> {
    state
        .private(&vote_key(user))
        .and_then(Value::as_i64)
        .and_then(|i| usize::try_from(i).ok())
}

/// The tally of `option`. Tallies are bounded by the number of users, so the saturating
/// `+ 1` and `- 1` applied to them only guard against a corrupt state, never clip.
fn count(state: &RoomState, option: usize) -> i64 {
    state
        .live(&count_key(option))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

fn total(state: &RoomState) -> i64 {
    state.live("total").and_then(Value::as_i64).unwrap_or(0)
}

fn saturating_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn lunch() -> Value {
        Value::map([
            ("question", s("Lunch?")),
            (
                "options",
                Value::List(vec![s("pizza"), s("sushi"), s("soup")]),
            ),
        ])
    }

    fn poll(limits: &Limits) -> RoomState {
        created(&PollKind, lunch(), limits)
    }

    fn vote(option: i64) -> Value {
        Value::map([("type", s("vote")), ("option", Value::Int(option))])
    }

    fn retract() -> Value {
        Value::map([("type", s("retract"))])
    }

    fn close() -> Value {
        Value::map([("type", s("close"))])
    }

    fn int(room: &RoomState, key: &str) -> Option<i64> {
        room.live(key).and_then(Value::as_i64)
    }

    #[test]
    fn create_writes_question_options_zero_counts_and_open() {
        let limits = Limits::default();
        let room = poll(&limits);
        let keys: Vec<&str> = room.entries().map(|(key, _)| key).collect();
        assert_eq!(
            keys,
            ["closed", "count/0", "count/1", "count/2", "options", "question", "total"]
        );
        assert_eq!(room.live("question"), Some(&s("Lunch?")));
        assert_eq!(int(&room, "count/2"), Some(0));
        assert_eq!(int(&room, "total"), Some(0));
        assert_eq!(room.live("closed"), Some(&Value::Bool(false)));
        assert_eq!(room.private("creator"), Some(&s("u0")));
    }

    #[test]
    fn create_refuses_malformed_init() {
        let limits = Limits::default();
        let two = || Value::List(vec![s("a"), s("b")]);
        let cases = [
            (Value::Null, "\"question\""),
            (Value::map::<&str>([]), "\"question\""),
            (Value::map([("options", two())]), "\"question\""),
            (Value::map([("question", s("q"))]), "\"options\""),
            (
                Value::map([("question", s("")), ("options", two())]),
                "\"question\"",
            ),
            (
                Value::map([("question", s(&"q".repeat(4097))), ("options", two())]),
                "4097",
            ),
            (
                Value::map([("question", Value::Int(1)), ("options", two())]),
                "\"question\"",
            ),
            (
                Value::map([("question", s("q")), ("options", s("a,b"))]),
                "\"options\"",
            ),
            (
                Value::map([("question", s("q")), ("options", Value::List(vec![s("a")]))]),
                "has 1 options",
            ),
            (
                Value::map([
                    ("question", s("q")),
                    ("options", Value::List(vec![s("a"); 33])),
                ]),
                "has 33 options",
            ),
            (
                Value::map([
                    ("question", s("q")),
                    ("options", Value::List(vec![s("a"), Value::Int(2)])),
                ]),
                "item 1",
            ),
            (
                Value::map([
                    ("question", s("q")),
                    ("options", Value::List(vec![s("a"), s("")])),
                ]),
                "item 1",
            ),
            (
                Value::map([
                    ("question", s("q")),
                    ("options", Value::List(vec![s("a"), s(&"b".repeat(1025))])),
                ]),
                "1025",
            ),
            (
                Value::map([
                    ("question", s("q")),
                    ("options", two()),
                    ("multi", Value::Bool(true)),
                ]),
                "\"multi\"",
            ),
        ];
        for (init, named) in cases {
            let refusal = create(&init, &ctx("u0", 1), &limits).unwrap_err();
            assert_eq!(refusal.code, RefuseCode::Invalid, "{init:?}");
            assert!(refusal.msg.contains(named), "{} lacks {named}", refusal.msg);
        }
        let widest = Value::map([
            ("question", s(&"q".repeat(4096))),
            ("options", Value::List(vec![s(&"o".repeat(1024)); 32])),
        ]);
        assert!(create(&widest, &ctx("u0", 1), &limits).is_ok());
    }

    #[test]
    fn vote_counts_the_option_and_the_total() {
        let limits = Limits::default();
        let mut room = poll(&limits);
        submit(&PollKind, &mut room, "a", 2, vote(1), &limits).unwrap();
        submit(&PollKind, &mut room, "b", 3, vote(1), &limits).unwrap();
        assert_eq!(int(&room, "count/1"), Some(2));
        assert_eq!(int(&room, "total"), Some(2));
        assert_eq!(room.private("vote/a"), Some(&Value::Int(1)));
    }

    #[test]
    fn vote_again_moves_the_vote() {
        let limits = Limits::default();
        let mut room = poll(&limits);
        submit(&PollKind, &mut room, "a", 2, vote(0), &limits).unwrap();
        submit(&PollKind, &mut room, "a", 3, vote(2), &limits).unwrap();
        assert_eq!(int(&room, "count/0"), Some(0));
        assert_eq!(int(&room, "count/2"), Some(1));
        assert_eq!(int(&room, "total"), Some(1));
        assert_eq!(room.private("vote/a"), Some(&Value::Int(2)));
    }

    #[test]
    fn voting_for_the_same_option_again_changes_nothing() {
        let limits = Limits::default();
        let mut room = poll(&limits);
        submit(&PollKind, &mut room, "a", 2, vote(1), &limits).unwrap();
        let changes = submit(&PollKind, &mut room, "a", 3, vote(1), &limits).unwrap();
        assert!(changes.is_empty());
        assert_eq!(room.get("count/1").map(|slot| slot.ver), Some(2));
    }

    #[test]
    fn vote_for_an_option_out_of_range_is_invalid() {
        let limits = Limits::default();
        let room = poll(&limits);
        for option in [3, -1, i64::MAX, i64::MIN] {
            let refusal = PollKind
                .reduce(&room, &vote(option), &ctx("a", 2), &limits)
                .unwrap_err();
            assert_eq!(refusal.code, RefuseCode::Invalid);
            assert!(refusal.msg.contains("\"option\""), "{}", refusal.msg);
        }
        let op = Value::map([("type", s("vote")), ("option", s("1"))]);
        let refusal = PollKind
            .reduce(&room, &op, &ctx("a", 2), &limits)
            .unwrap_err();
        assert_eq!(refusal.msg, "field \"option\" must be an integer");
    }

    #[test]
    fn retract_removes_the_vote() {
        let limits = Limits::default();
        let mut room = poll(&limits);
        submit(&PollKind, &mut room, "a", 2, vote(1), &limits).unwrap();
        submit(&PollKind, &mut room, "a", 3, retract(), &limits).unwrap();
        assert_eq!(int(&room, "count/1"), Some(0));
        assert_eq!(int(&room, "total"), Some(0));
        assert_eq!(room.private("vote/a"), None);
    }

    #[test]
    fn retract_without_a_vote_is_invalid() {
        let limits = Limits::default();
        let room = poll(&limits);
        let refusal = PollKind
            .reduce(&room, &retract(), &ctx("a", 2), &limits)
            .unwrap_err();
        assert_eq!(refusal.code, RefuseCode::Invalid);
    }

    #[test]
    fn close_by_the_creator_closes_the_poll() {
        let limits = Limits::default();
        let mut room = poll(&limits);
        submit(&PollKind, &mut room, "u0", 2, close(), &limits).unwrap();
        assert_eq!(room.live("closed"), Some(&Value::Bool(true)));
    }

    #[test]
    fn close_by_anyone_else_is_forbidden() {
        let limits = Limits::default();
        let room = poll(&limits);
        let refusal = PollKind
            .reduce(&room, &close(), &ctx("a", 2), &limits)
            .unwrap_err();
        assert_eq!(refusal.code, RefuseCode::Forbidden);
    }

    #[test]
    fn after_close_votes_retracts_and_closes_are_closed() {
        let limits = Limits::default();
        let mut room = poll(&limits);
        submit(&PollKind, &mut room, "a", 2, vote(0), &limits).unwrap();
        submit(&PollKind, &mut room, "u0", 3, close(), &limits).unwrap();
        for (user, op) in [
            ("a", vote(1)),
            ("b", vote(0)),
            ("a", retract()),
            ("u0", close()),
        ] {
            let refusal = PollKind
                .reduce(&room, &op, &ctx(user, 4), &limits)
                .unwrap_err();
            assert_eq!(refusal.code, RefuseCode::Closed, "{op:?}");
        }
        // Closed is checked before forbidden.
        let refusal = PollKind
            .reduce(&room, &close(), &ctx("a", 4), &limits)
            .unwrap_err();
        assert_eq!(refusal.code, RefuseCode::Closed);
    }

    #[test]
    fn unknown_op_types_and_fields_are_invalid() {
        let limits = Limits::default();
        let room = poll(&limits);
        for (op, named) in [
            (Value::map([("type", s("reopen"))]), "\"reopen\""),
            (
                Value::map([("type", s("retract")), ("option", Value::Int(1))]),
                "\"option\"",
            ),
            (
                Value::map([("type", s("close")), ("now", Value::Bool(true))]),
                "\"now\"",
            ),
            (Value::map([("type", s("vote"))]), "\"option\""),
        ] {
            let refusal = PollKind
                .reduce(&room, &op, &ctx("u0", 2), &limits)
                .unwrap_err();
            assert_eq!(refusal.code, RefuseCode::Invalid);
            assert!(refusal.msg.contains(named), "{}", refusal.msg);
        }
    }

    #[derive(Debug, Clone)]
    enum ModelOp {
        Vote(i64),
        Retract,
        Close,
    }

    fn arb_model_op() -> impl Strategy<Value = ModelOp> {
        prop_oneof![
            6 => (-1i64..5).prop_map(ModelOp::Vote),
            2 => Just(ModelOp::Retract),
            1 => Just(ModelOp::Close),
        ]
    }

    const USERS: [&str; 3] = ["u0", "u1", "u2"];
    const NAMES: &[&str] = &[
        "type", "option", "vote", "retract", "close", "question", "options",
    ];

    proptest! {
        #[test]
        fn reducer_and_apply_match_a_simple_model(
            ops in proptest::collection::vec((0usize..3, arb_model_op()), 0..40),
        ) {
            let limits = Limits::default();
            let mut room = poll(&limits);
            let n_options = 3usize;
            let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
            let mut closed = false;
            for (i, (user, op)) in ops.into_iter().enumerate() {
                let user = USERS[user];
                let seq = i as u64 + 2;
                let (value, expected) = match op {
                    ModelOp::Vote(option) => {
                        let expected = if closed {
                            Some(RefuseCode::Closed)
                        } else if !(0..n_options as i64).contains(&option) {
                            Some(RefuseCode::Invalid)
                        } else {
                            None
                        };
                        (vote(option), expected)
                    }
                    ModelOp::Retract => {
                        let expected = if closed {
                            Some(RefuseCode::Closed)
                        } else if !votes.contains_key(user) {
                            Some(RefuseCode::Invalid)
                        } else {
                            None
                        };
                        (retract(), expected)
                    }
                    ModelOp::Close => {
                        let expected = if closed {
                            Some(RefuseCode::Closed)
                        } else if user != "u0" {
                            Some(RefuseCode::Forbidden)
                        } else {
                            None
                        };
                        (close(), expected)
                    }
                };
                let result = submit(&PollKind, &mut room, user, seq, value, &limits);
                prop_assert_eq!(code(&result), expected, "{:?} by {}", op, user);
                if expected.is_none() {
                    match op {
                        ModelOp::Vote(option) => {
                            votes.insert(user, option as usize);
                        }
                        ModelOp::Retract => {
                            votes.remove(user);
                        }
                        ModelOp::Close => closed = true,
                    }
                }
                for option in 0..n_options {
                    let expected = votes.values().filter(|v| **v == option).count() as i64;
                    prop_assert_eq!(int(&room, &count_key(option)), Some(expected));
                }
                prop_assert_eq!(int(&room, "total"), Some(votes.len() as i64));
                prop_assert_eq!(room.live("closed"), Some(&Value::Bool(closed)));
                for user in USERS {
                    let expected = votes.get(user).map(|v| Value::Int(*v as i64));
                    prop_assert_eq!(room.private(&vote_key(user)), expected.as_ref());
                }
            }
        }

        #[test]
        fn reduce_never_panics_on_arbitrary_values(
            ops in proptest::collection::vec(
                prop_oneof![arb_value(NAMES), arb_op_like(&["vote", "retract", "close"], NAMES)],
                1..20,
            ),
            init in arb_value(NAMES),
        ) {
            let limits = Limits::default();
            let _ = create(&init, &ctx("u0", 1), &limits);
            let mut room = poll(&limits);
            for (i, op) in ops.into_iter().enumerate() {
                let _ = submit(&PollKind, &mut room, USERS[i % 3], i as u64 + 2, op, &limits);
            }
        }
    }
}
