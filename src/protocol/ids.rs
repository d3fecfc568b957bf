//! Room ids, op ids and epochs as they appear on the wire.

use std::fmt;
use std::sync::Arc;

/// Longest room id (PROTOCOL.md "Words").
pub const MAX_ROOM_ID: usize = 128;

/// A room id that matches the contract pattern. Built only by [`RoomId::parse`], where
/// a room id enters the server (a client frame, an HTTP path), so nothing past that
/// boundary checks it again.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(Arc<str>);

/// A room id that does not match the contract pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("room id must match ^[A-Za-z0-9_.:-]{{1,128}}$")]
pub struct InvalidRoomId;

impl RoomId {
    pub fn parse(room: &str) -> Result<RoomId, InvalidRoomId> {
        if valid_room_id(room) {
            Ok(RoomId(Arc::from(room)))
        } else {
            Err(InvalidRoomId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A room id reads as the string it is (store keys, log fields, JSON).
impl std::ops::Deref for RoomId {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for RoomId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for RoomId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Longest op id (`id` of `create` and `op`, WebSocket and HTTP), in bytes. The contract
/// sets none; roomd's choice (README, "Where the contract is silent"): every op id is
/// held in the room's dedup window and echoed in its ack, so an unbounded one is memory
/// for the taking. Twice [`MAX_ROOM_ID`], so an id built from a room id and a prefix or
/// counter always fits.
pub const MAX_OP_ID: usize = 256;

/// An op id over [`MAX_OP_ID`] bytes (answered `invalid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("op id of {0} bytes exceeds limit of {MAX_OP_ID}")]
pub struct OpIdTooLong(pub usize);

/// Checks an op id where it enters the server (a client frame, an HTTP body), before
/// it reaches a room.
pub fn check_op_id(id: &str) -> Result<(), OpIdTooLong> {
    if id.len() > MAX_OP_ID {
        return Err(OpIdTooLong(id.len()));
    }
    Ok(())
}

/// Checks a room id against `^[A-Za-z0-9_.:-]{1,128}$`, not made of dots only.
pub fn valid_room_id(room: &str) -> bool {
    (1..=MAX_ROOM_ID).contains(&room.len())
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
        && !room.bytes().all(|b| b == b'.')
}

/// An epoch as JSON shows it: 16 lowercase hex chars.
pub fn epoch_hex(epoch: u64) -> String {
    format!("{epoch:016x}")
}

/// Parses a JSON epoch; anything but 16 hex chars is `None` (a foreign epoch).
pub fn parse_epoch(s: &str) -> Option<u64> {
    if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_ids_follow_the_contract_pattern() {
        assert!(valid_room_id("poll:lunch"));
        assert!(valid_room_id("a.b-c_d:9"));
        assert!(!valid_room_id(""));
        assert!(!valid_room_id(".."));
        assert!(!valid_room_id("has space"));
        assert!(!valid_room_id("é"));
        assert!(valid_room_id(&"x".repeat(128)));
        assert!(!valid_room_id(&"x".repeat(129)));
    }

    #[test]
    fn room_ids_parse_only_when_valid() {
        assert_eq!(
            RoomId::parse("poll:lunch").map(|id| id.to_string()),
            Ok("poll:lunch".into())
        );
        assert_eq!(
            RoomId::parse("has space").map_err(|e| e.to_string()),
            Err("room id must match ^[A-Za-z0-9_.:-]{1,128}$".into())
        );
    }

    #[test]
    fn epochs_round_trip_as_16_hex_chars() {
        assert_eq!(epoch_hex(0x9f), "000000000000009f");
        assert_eq!(parse_epoch(&epoch_hex(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_epoch("9f"), None);
        assert_eq!(parse_epoch("zzzzzzzzzzzzzzzz"), None);
    }
}
