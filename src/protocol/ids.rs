//! Room ids and epochs as they appear on the wire.

/// Longest room id (PROTOCOL.md "Words").
pub const MAX_ROOM_ID: usize = 128;

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
    fn epochs_round_trip_as_16_hex_chars() {
        assert_eq!(epoch_hex(0x9f), "000000000000009f");
        assert_eq!(parse_epoch(&epoch_hex(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_epoch("9f"), None);
        assert_eq!(parse_epoch("zzzzzzzzzzzzzzzz"), None);
    }
}
