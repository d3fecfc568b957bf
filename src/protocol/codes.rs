//! Reply codes (nack/error) and WebSocket close codes, mapped in one place.

use crate::kind::RefuseCode;

/// The `code` of a `nack` or `error` (PROTOCOL.md), also the HTTP error `code`.
///
/// Also part of the rkyv schema: the variant order is the format.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[repr(u8)]
pub enum Code {
    BadFrame,
    Invalid,
    NotFound,
    Exists,
    Forbidden,
    Conflict,
    Closed,
    RateLimited,
    TooLarge,
    Limit,
    Gone,
    Unavailable,
}

impl Code {
    /// Every code, in declaration order (`Code` is `repr(u8)`, so `code as usize` is its
    /// position here; a test checks it).
    pub const ALL: [Code; 12] = [
        Code::BadFrame,
        Code::Invalid,
        Code::NotFound,
        Code::Exists,
        Code::Forbidden,
        Code::Conflict,
        Code::Closed,
        Code::RateLimited,
        Code::TooLarge,
        Code::Limit,
        Code::Gone,
        Code::Unavailable,
    ];

    /// The code whose [`Code::as_str`] is `name`, if any.
    pub fn from_name(name: &str) -> Option<Code> {
        Code::ALL.into_iter().find(|code| code.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Code::BadFrame => "bad_frame",
            Code::Invalid => "invalid",
            Code::NotFound => "not_found",
            Code::Exists => "exists",
            Code::Forbidden => "forbidden",
            Code::Conflict => "conflict",
            Code::Closed => "closed",
            Code::RateLimited => "rate_limited",
            Code::TooLarge => "too_large",
            Code::Limit => "limit",
            Code::Gone => "gone",
            Code::Unavailable => "unavailable",
        }
    }

    /// The HTTP status of PROTOCOL.md "HTTP API" for this code.
    pub fn http_status(self) -> u16 {
        match self {
            Code::BadFrame | Code::Invalid => 400,
            Code::Forbidden => 403,
            Code::NotFound => 404,
            Code::Exists | Code::Conflict | Code::Closed => 409,
            Code::Gone => 410,
            Code::TooLarge => 413,
            Code::RateLimited | Code::Limit => 429,
            Code::Unavailable => 503,
        }
    }
}

impl From<RefuseCode> for Code {
    fn from(code: RefuseCode) -> Code {
        match code {
            RefuseCode::Invalid => Code::Invalid,
            RefuseCode::Forbidden => Code::Forbidden,
            RefuseCode::Conflict => Code::Conflict,
            RefuseCode::Closed => Code::Closed,
            RefuseCode::TooLarge => Code::TooLarge,
            RefuseCode::Limit => Code::Limit,
        }
    }
}

/// WebSocket close codes (PROTOCOL.md "Close codes").
pub mod close {
    /// Frame larger than the limit.
    pub const TOO_LARGE: u16 = 1009;
    /// Invalid UTF-8 in a text frame (RFC 6455).
    pub const INVALID_UTF8: u16 = 1007;
    /// Any other RFC 6455 protocol error.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Slow consumer: the outbound queue overflowed.
    pub const SLOW_CONSUMER: u16 = 4001;
    /// Server shutting down.
    pub const SHUTTING_DOWN: u16 = 4002;
    /// Heartbeat timeout.
    pub const HEARTBEAT_TIMEOUT: u16 = 4008;
    /// Too many bad frames.
    pub const PROTOCOL_VIOLATION: u16 = 4400;
    /// Missing, bad or expired token.
    pub const UNAUTHORIZED: u16 = 4401;
    /// An admin disconnected the user (1.1); the client should not reconnect on its own.
    pub const DISCONNECTED: u16 = 4403;
    /// Too many connections (per IP or in total).
    pub const TOO_MANY: u16 = 4429;
}

#[cfg(test)]
mod tests {
    use super::Code;

    #[test]
    fn every_code_sits_at_its_discriminant_and_reads_back_by_name() {
        for (index, code) in Code::ALL.into_iter().enumerate() {
            assert_eq!(code as usize, index);
            assert_eq!(Code::from_name(code.as_str()), Some(code));
        }
        assert_eq!(Code::from_name("no_such_code"), None);
    }
}
