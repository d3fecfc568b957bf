//! The room-kind API: the one trait through which a kind, built-in or an application's,
//! says what its rooms are.
//!
//! A kind is pure rules: from (state, op, user, time, seq) to [`Changes`] or a
//! [`Refusal`]. The server records the changes in the log, so recovery, resume, `?at=`,
//! `/events` and `roomd log` replay them without running the kind's code again; a kind
//! that changes its rules later never changes a room's past. Which entries each viewer
//! may see travels in the changes too ([`Changes::put_for`]), so every read path can
//! filter without asking the kind.

use std::sync::Arc;

use super::{Changes, Ctx, Limits, Refusal, RoomState};
use crate::value::Value;

/// The rules of one room kind.
///
/// Implementations must be pure and deterministic: no clock (use `ctx.now_ms`), no IO,
/// no randomness (derive it from `ctx.seq` if needed), no interior state. A panic does
/// not take the room down (the op is nacked `unavailable` and logged with the room and
/// the op) but is a bug.
///
/// ```
/// use roomd::kind::{Changes, Ctx, Fields, Limits, Refusal, RoomKind, RoomState};
/// use roomd::value::Value;
///
/// /// A counter anyone may bump.
/// struct Counter;
///
/// impl RoomKind for Counter {
///     fn name(&self) -> &str {
///         "counter"
///     }
///
///     fn init(&self, _init: &Value, _ctx: &Ctx, _limits: &Limits) -> Result<Changes, Refusal> {
///         Ok(Changes::default().put("n", Value::Int(0)))
///     }
///
///     fn reduce(
///         &self,
///         state: &RoomState,
///         op: &Value,
///         _ctx: &Ctx,
///         _limits: &Limits,
///     ) -> Result<Changes, Refusal> {
///         let (kind, fields) = Fields::op(op)?;
///         match kind {
///             "bump" => {
///                 fields.only(&[])?;
///                 let n = state.live("n").and_then(Value::as_i64).unwrap_or(0);
///                 Ok(Changes::default().put("n", Value::Int(n.saturating_add(1))))
///             }
///             other => Err(Refusal::invalid(format!("unknown op type \"{other}\""))),
///         }
///     }
/// }
/// ```
pub trait RoomKind: Send + Sync + 'static {
    /// The name clients pass as `kind` in `create`, recorded in the log with the room.
    /// Fixed for the life of every room of this kind.
    fn name(&self) -> &str;

    /// Validates `init` and returns the changes of the creation event (seq 1;
    /// `ctx.user` is the creator), or refuses it.
    fn init(&self, init: &Value, ctx: &Ctx, limits: &Limits) -> Result<Changes, Refusal>;

    /// Validates `op` by `ctx.user` against `state` and returns what it changes, or
    /// refuses it. `state` is the room after every earlier event.
    fn reduce(
        &self,
        state: &RoomState,
        op: &Value,
        ctx: &Ctx,
        limits: &Limits,
    ) -> Result<Changes, Refusal>;

    /// True when `GET /api/rooms/{room}/events` must hide this op's author and body
    /// from callers who are not admins (a poll's votes). Events whose changes touch
    /// entries hidden from the caller are hidden whatever this says.
    fn private_op(&self, _op: &Value) -> bool {
        false
    }
}

/// A shared handle on a kind, as the registry and the rooms hold it.
pub type KindRef = Arc<dyn RoomKind>;
