//! Realistic rooms for the micro-benches (`codec`, `reducers`, `coalesce`): a "state"
//! room of 1,000 keys holding small maps, a chat room of 500 messages, a poll of 10,000
//! voters, and the ops that built them.
//!
//! Every room is built the way the server builds it, through `RoomState::create`,
//! `reduce` and `apply`, so its entries, versions and private facts are what a live room
//! of that shape holds. Measuring is left to the benches.

use roomd::kind::{Changes, ChatKind, Ctx, KindRef, Limits, PollKind, RoomState, StateKind};
use roomd::value::Value;
use std::sync::Arc;

/// The room clock of event 1, in ms; each later event is 37 ms after the previous one.
const START_MS: i64 = 1_750_000_000_000;

/// Distinct users posting and writing in the rooms.
const N_USERS: u64 = 50;

/// A room and the seq of its last event, so the next op gets `head + 1`.
pub struct Room {
    pub kind: KindRef,
    pub state: RoomState,
    pub head: u64,
}

impl Room {
    /// A room of `kind` after its creation event (seq 1) by `user000`.
    pub fn create(kind: KindRef, init: &Value) -> Room {
        let user = user(0);
        let ctx = ctx(&user, 1);
        let changes = kind
            .init(init, &ctx, &Limits::default())
            .expect("the benches only build valid inits");
        let mut state = RoomState::new();
        state.apply(1, &changes);
        Room {
            kind,
            state,
            head: 1,
        }
    }

    /// Reduces and applies `op` by `user` as the next event and returns its changes.
    pub fn submit(&mut self, user: &str, op: &Value) -> Changes {
        let seq = self.head + 1;
        let changes = self
            .kind
            .reduce(&self.state, op, &ctx(user, seq), &Limits::default())
            .expect("the benches only submit ops their room accepts");
        self.state.apply(seq, &changes);
        self.head = seq;
        changes
    }
}

/// The context of event `seq` by `user`, with the room clock of that event.
pub fn ctx(user: &str, seq: u64) -> Ctx<'_> {
    Ctx {
        user,
        now_ms: START_MS + 37 * seq as i64,
        seq,
    }
}

/// One of [`N_USERS`] user ids, `user000` to `user049`.
pub fn user(i: u64) -> String {
    format!("user{:03}", i % N_USERS)
}

/// The key of object `i` in a state room: `obj/0000` to `obj/0999`.
pub fn object_key(i: u64) -> String {
    format!("obj/{i:04}")
}

/// A small map value like a game object or a form field: two ints, a name and a flag
/// (about 50 bytes as JSON). `round` changes the numbers, so writes really change it.
pub fn small_map(i: u64, round: u64) -> Value {
    Value::map([
        ("x", Value::Int((i * 7 + round * 13) as i64 % 1_000)),
        ("y", Value::Int(-((i * 11 + round * 3) as i64 % 1_000))),
        ("name", Value::Str(format!("player-{i}"))),
        ("ready", Value::Bool((i + round).is_multiple_of(2))),
    ])
}

/// A chat message text of 60 to 100 bytes.
pub fn message_text(i: u64) -> String {
    let words = "hello there, did anyone see the release notes for tonight's build?";
    format!("{words} #{i} {}", "x".repeat((i % 24) as usize))
}

pub fn set_op(key: &str, value: Value) -> Value {
    Value::map([
        ("type", Value::Str("set".into())),
        ("key", Value::Str(key.into())),
        ("value", value),
    ])
}

pub fn incr_op(key: &str, by: i64) -> Value {
    Value::map([
        ("type", Value::Str("incr".into())),
        ("key", Value::Str(key.into())),
        ("by", Value::Int(by)),
    ])
}

pub fn post_op(text: String) -> Value {
    Value::map([
        ("type", Value::Str("post".into())),
        ("text", Value::Str(text)),
    ])
}

pub fn vote_op(option: i64) -> Value {
    Value::map([
        ("type", Value::Str("vote".into())),
        ("option", Value::Int(option)),
    ])
}

/// A "state" room holding `n_keys` small maps under [`object_key`]s, each set once.
pub fn state_room(n_keys: u64) -> Room {
    let mut room = Room::create(Arc::new(StateKind), &Value::Null);
    for i in 0..n_keys {
        room.submit(&user(i), &set_op(&object_key(i), small_map(i, 0)));
    }
    room
}

/// A chat room with the default history (500) holding `n_messages` posts.
pub fn chat_room(n_messages: u64) -> Room {
    let mut room = Room::create(Arc::new(ChatKind), &Value::Null);
    for i in 0..n_messages {
        room.submit(&user(i), &post_op(message_text(i)));
    }
    room
}

/// A poll of `n_options` options in which `n_voters` distinct users (`voter0`...) voted.
pub fn poll_room(n_voters: u64, n_options: u64) -> Room {
    let options = (0..n_options)
        .map(|o| Value::Str(format!("option {o}")))
        .collect();
    let init = Value::map([
        ("question", Value::Str("Where do we meet next week?".into())),
        ("options", Value::List(options)),
    ]);
    let mut room = Room::create(Arc::new(PollKind), &init);
    for i in 0..n_voters {
        room.submit(&voter(i), &vote_op((i % n_options) as i64));
    }
    room
}

/// The id of poll voter `i`.
pub fn voter(i: u64) -> String {
    format!("voter{i}")
}
