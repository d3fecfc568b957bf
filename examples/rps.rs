//! Rock-paper-scissors as a room kind, on roomd's public API only: the normal server
//! plus kind `rps`. Run it with `cargo run --release --example rps` (it takes every
//! `roomd` flag and subcommand).
//!
//! - `create` with kind `rps` and `init` `{}`.
//! - `{"type":"join"}`: the first two users to join are the players (joining again is
//!   a no-op); anyone else is refused `forbidden`.
//! - `{"type":"move","move":"rock"|"paper"|"scissors"}`: players only (`forbidden`), one
//!   move per round (a second is `conflict`).
//!
//! Entries: `players` (user ids), `round` (from 1), `score/<user>`, `move/<user>` (seen
//! only by that user until the round ends), and `last` =
//! `{"round","moves":{user: move},"winner":user|null}`, written in the event of the
//! round's second move together with the deletion of both `move/` entries and the next
//! `round`. Until then nobody but the first mover sees any trace of the first move, on
//! any read path: roomd hides entries written with `Changes::put_for` and every event
//! that touched them.

use roomd::kind::{Changes, Ctx, Fields, Limits, Refusal, RefuseCode, RoomKind, RoomState};
use roomd::value::Value;

const MOVES: [&str; 3] = ["rock", "paper", "scissors"];

/// The rules of rock-paper-scissors.
struct Rps;

impl Rps {
    fn players(state: &RoomState) -> Vec<String> {
        match state.live("players") {
            Some(Value::List(players)) => players
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        }
    }

    fn move_key(user: &str) -> String {
        format!("move/{user}")
    }

    fn score_key(user: &str) -> String {
        format!("score/{user}")
    }

    /// True when `a` beats `b`.
    fn beats(a: &str, b: &str) -> bool {
        matches!(
            (a, b),
            ("rock", "scissors") | ("paper", "rock") | ("scissors", "paper")
        )
    }
}

impl RoomKind for Rps {
    fn name(&self) -> &str {
        "rps"
    }

    fn init(&self, init: &Value, _ctx: &Ctx, _limits: &Limits) -> Result<Changes, Refusal> {
        Fields::init(init)?.only(&[])?;
        Ok(Changes::default()
            .put("players", Value::List(vec![]))
            .put("round", Value::Int(1)))
    }

    fn reduce(
        &self,
        state: &RoomState,
        op: &Value,
        ctx: &Ctx,
        _limits: &Limits,
    ) -> Result<Changes, Refusal> {
        let (kind, fields) = Fields::op(op)?;
        let mut players = Rps::players(state);
        match kind {
            "join" => {
                fields.only(&[])?;
                if players.iter().any(|p| p == ctx.user) {
                    return Ok(Changes::default());
                }
                if players.len() >= 2 {
                    return Err(Refusal::new(
                        RefuseCode::Forbidden,
                        "the game already has two players",
                    ));
                }
                players.push(ctx.user.to_owned());
                let list = players.into_iter().map(Value::Str).collect();
                Ok(Changes::default()
                    .put("players", Value::List(list))
                    .put(Rps::score_key(ctx.user), Value::Int(0)))
            }
            "move" => {
                fields.only(&["move"])?;
                let chosen = fields.str("move")?;
                if !MOVES.contains(&chosen) {
                    return Err(Refusal::invalid(format!(
                        "field \"move\" is \"{chosen}\", must be rock, paper or scissors"
                    )));
                }
                if !players.iter().any(|p| p == ctx.user) {
                    return Err(Refusal::new(RefuseCode::Forbidden, "only players move"));
                }
                let round = state.live("round").and_then(Value::as_i64).unwrap_or(1);
                if state.live(&Rps::move_key(ctx.user)).is_some() {
                    return Err(Refusal::new(
                        RefuseCode::Conflict,
                        format!("already moved in round {round}"),
                    ));
                }
                let other = players.iter().find(|p| *p != ctx.user);
                let other_move = other.and_then(|o| {
                    let key = Rps::move_key(o);
                    state.live(&key).and_then(Value::as_str).map(str::to_owned)
                });
                let (Some(other), Some(other_move)) = (other, other_move) else {
                    // The first move of the round: seen by its player alone.
                    return Ok(Changes::default().put_for(
                        Rps::move_key(ctx.user),
                        Value::Str(chosen.to_owned()),
                        [ctx.user],
                    ));
                };
                let winner = if Rps::beats(chosen, &other_move) {
                    Some(ctx.user)
                } else if Rps::beats(&other_move, chosen) {
                    Some(other.as_str())
                } else {
                    None
                };
                let last = Value::map([
                    ("round", Value::Int(round)),
                    (
                        "moves",
                        Value::map([
                            (ctx.user, Value::Str(chosen.to_owned())),
                            (other.as_str(), Value::Str(other_move)),
                        ]),
                    ),
                    (
                        "winner",
                        winner.map_or(Value::Null, |w| Value::Str(w.to_owned())),
                    ),
                ]);
                // The mover's own move was never written (it goes straight into
                // `last`); deleting it would leave a tombstone everyone sees.
                let mut changes = Changes::default()
                    .put("last", last)
                    .delete(Rps::move_key(other))
                    .put("round", Value::Int(round.saturating_add(1)));
                if let Some(winner) = winner {
                    let key = Rps::score_key(winner);
                    let score = state.live(&key).and_then(Value::as_i64).unwrap_or(0);
                    changes = changes.put(key, Value::Int(score.saturating_add(1)));
                }
                Ok(changes)
            }
            other => Err(Refusal::invalid(format!(
                "unknown op type \"{other}\" for an rps room"
            ))),
        }
    }
}

fn main() {
    roomd::Server::new().kind(Rps).main();
}

/// The same allocator as the `roomd` binary (see its `main.rs`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
