//! Why a room refused or failed a request, and the contract code each reason maps to.
//!
//! Every answer a room gives that is not a success is a [`RoomError`]; the session
//! turns it into a `nack` or `error`, the HTTP API into a status and a JSON body, both
//! through [`RoomError::code`], the one place reasons meet wire codes.

use crate::kind::Refusal;
use crate::protocol::codes::Code;
use crate::protocol::ids::RoomId;

/// A room's refusal or failure.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RoomError {
    /// The room does not exist (never created, or deleted).
    #[error("no room {0}")]
    NotFound(RoomId),
    /// A `DELETE` is in progress: the room is as good as gone.
    #[error("room {0} is being deleted")]
    Deleting(RoomId),
    /// A `create` while a `DELETE` is in progress: retry once it is gone.
    #[error("room {0} is being deleted; retry")]
    CreateWhileDeleting(RoomId),
    /// The room was deleted while this subscriber was subscribed.
    #[error("room {0} was deleted")]
    Deleted(RoomId),
    /// The room is moving to another node (`roomd cluster rebalance`): re-send with the
    /// same op id, or subscribe again with `since`, in a moment.
    #[error(
        "room {0} is moving to another node; retry in a moment (same op id, or sub with since)"
    )]
    Moving(RoomId),
    #[error("room {0} exists")]
    Exists(RoomId),
    /// The store could not load the room; every request is refused until it is retried.
    #[error("room unavailable: {0}")]
    LoadFailed(String),
    /// The commit of this op (or of one before it) failed; nothing of it was applied.
    #[error("store failure, nothing applied: {0}")]
    CommitFailed(String),
    /// The store could not be asked to delete the room.
    #[error("cannot delete now: {0}")]
    DeleteRefused(String),
    /// The store failed while deleting the room.
    #[error("store failure: {0}")]
    DeleteFailed(String),
    /// The room's actor stopped with the request still queued.
    #[error("the room restarted; retry the op")]
    Restarted,
    #[error("user {user} already created {created} rooms, the limit")]
    TooManyRooms { user: String, created: usize },
    #[error("unknown kind `{0}` (use {1})")]
    UnknownKind(String, String),
    /// The room kind's code panicked on this op; nothing of it was applied, the room
    /// keeps serving.
    #[error("the room's rules failed on this op; it was not applied")]
    KindPanicked,
    /// The room kind's rules refused the op.
    #[error("{}", .0.msg)]
    Refused(Refusal),
    /// Refused before the room saw it (malformed, over the rate), by the session or the
    /// HTTP API; the room still answers a re-sent op id from its record first.
    #[error("{1}")]
    Rejected(Code, String),
}

impl RoomError {
    /// The contract code (PROTOCOL.md "Codes") of this reason.
    pub fn code(&self) -> Code {
        match self {
            RoomError::NotFound(_) | RoomError::Deleting(_) | RoomError::Deleted(_) => {
                Code::NotFound
            }
            RoomError::Exists(_) => Code::Exists,
            RoomError::CreateWhileDeleting(_)
            | RoomError::LoadFailed(_)
            | RoomError::CommitFailed(_)
            | RoomError::DeleteRefused(_)
            | RoomError::DeleteFailed(_)
            | RoomError::Restarted
            | RoomError::Moving(_)
            | RoomError::KindPanicked => Code::Unavailable,
            RoomError::TooManyRooms { .. } => Code::Limit,
            RoomError::UnknownKind(..) => Code::Invalid,
            RoomError::Refused(refusal) => refusal.code.into(),
            RoomError::Rejected(code, _) => *code,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::RefuseCode;

    fn room() -> RoomId {
        RoomId::parse("r1").expect("a valid id")
    }

    #[test]
    fn each_reason_maps_to_its_contract_code() {
        let cases = [
            (RoomError::NotFound(room()), "not_found", "no room r1"),
            (
                RoomError::Deleting(room()),
                "not_found",
                "room r1 is being deleted",
            ),
            (
                RoomError::CreateWhileDeleting(room()),
                "unavailable",
                "room r1 is being deleted; retry",
            ),
            (RoomError::Exists(room()), "exists", "room r1 exists"),
            (
                RoomError::KindPanicked,
                "unavailable",
                "the room's rules failed on this op; it was not applied",
            ),
            (
                RoomError::Refused(Refusal::new(RefuseCode::Conflict, "ver 3, not 2")),
                "conflict",
                "ver 3, not 2",
            ),
            (
                RoomError::Rejected(Code::RateLimited, "over 20 ops/s".into()),
                "rate_limited",
                "over 20 ops/s",
            ),
            (
                RoomError::TooManyRooms {
                    user: "u".into(),
                    created: 2,
                },
                "limit",
                "user u already created 2 rooms, the limit",
            ),
        ];
        for (error, code, text) in cases {
            assert_eq!(error.code().as_str(), code, "{error:?}");
            assert_eq!(error.to_string(), text);
        }
    }
}
