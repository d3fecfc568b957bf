//! The generic value carried by ops, `init`, `data` and room entries.
//!
//! This is the domain type: it knows nothing of JSON, rkyv or redb. The wire codecs
//! (`protocol::json`, `protocol::rkyv_codec`) and the log format (`store::record`) convert
//! to and from it explicitly, and every conversion from untrusted bytes enforces
//! [`MAX_DEPTH`] before a `Value` exists, so a `Value` is never deeper than that.

use std::collections::BTreeMap;

/// The deepest nesting a value may have. A scalar has depth 0, `[1]` has depth 1, and a
/// value with 32 levels of lists or maps is the deepest accepted (PROTOCOL.md "Value").
pub const MAX_DEPTH: usize = 32;

/// A JSON-like value with bytes and a real integer/float split.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    /// Always finite: decoders refuse NaN and infinities.
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Map(BTreeMap<String, Value>),
}

impl Value {
    /// Nesting depth: 0 for scalars, 1 + the deepest child for lists and maps.
    pub fn depth(&self) -> usize {
        match self {
            Value::List(items) => 1 + items.iter().map(Value::depth).max().unwrap_or(0),
            Value::Map(map) => 1 + map.values().map(Value::depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    /// The size of this value written as compact JSON, in bytes, counted without
    /// allocating. Limits on values ("values up to 32 KiB as JSON") use this number.
    /// Bytes count as their `{"$b64":"..."}` form.
    pub fn json_size(&self) -> usize {
        match self {
            Value::Null => 4,
            Value::Bool(true) => 4,
            Value::Bool(false) => 5,
            Value::Int(n) => int_len(*n),
            // Shortest round-trip form is at most 24 bytes; exactness does not matter
            // for a limit, only that it is an upper bound and deterministic.
            Value::Float(f) => format_len(*f),
            Value::Str(s) => quoted_len(s),
            Value::Bytes(b) => 11 + b.len().div_ceil(3) * 4,
            Value::List(items) => {
                2 + items.iter().map(Value::json_size).sum::<usize>()
                    + items.len().saturating_sub(1)
            }
            Value::Map(map) => {
                2 + map
                    .iter()
                    .map(|(k, v)| quoted_len(k) + 1 + v.json_size())
                    .sum::<usize>()
                    + map.len().saturating_sub(1)
            }
        }
    }

    /// The value under `key` when this is a map.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(map) => map.get(key),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&BTreeMap<String, Value>> {
        match self {
            Value::Map(map) => Some(map),
            _ => None,
        }
    }

    /// A map value from `(key, value)` pairs; a small convenience for reducers.
    pub fn map<K: Into<String>>(pairs: impl IntoIterator<Item = (K, Value)>) -> Value {
        Value::Map(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }
}

fn int_len(n: i64) -> usize {
    let mut len = if n < 0 { 2 } else { 1 };
    let mut rest = n.unsigned_abs();
    while rest >= 10 {
        rest /= 10;
        len += 1;
    }
    len
}

fn format_len(f: f64) -> usize {
    // `ryu`-style shortest output never exceeds 24 bytes for an f64.
    let _ = f;
    24
}

/// Length of `s` as a JSON string literal, counting escapes.
fn quoted_len(s: &str) -> usize {
    // By bytes, not chars: a char's UTF-8 length is its bytes, and every escaped char is
    // one ASCII byte (no byte of a multi-byte char is below 0x80).
    let escapes: usize = s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 1,
            b if b < 0x20 => 5,
            _ => 0,
        })
        .sum();
    2 + s.len() + escapes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_container_levels() {
        assert_eq!(Value::Int(1).depth(), 0);
        assert_eq!(Value::List(vec![]).depth(), 1);
        let nested = Value::List(vec![Value::map([("a", Value::List(vec![Value::Null]))])]);
        assert_eq!(nested.depth(), 3);
    }

    #[test]
    fn json_size_matches_serde_json_for_exact_kinds() {
        let v = Value::map([
            ("a", Value::Int(-120)),
            ("b", Value::Str("x\"y".into())),
            ("c", Value::List(vec![Value::Bool(true), Value::Null])),
        ]);
        let exact = r#"{"a":-120,"b":"x\"y","c":[true,null]}"#;
        assert_eq!(v.json_size(), exact.len());
    }

    #[test]
    fn string_sizes_count_escapes_and_multibyte_chars_as_serde_json_writes_them() {
        let all_low: String = (0u8..0x20).map(char::from).collect();
        for s in [
            "",
            "plain",
            "q\"b\\",
            "é€😀",
            "\u{7f}\u{80}",
            all_low.as_str(),
        ] {
            let written = serde_json::to_string(s).expect("a string serializes");
            assert_eq!(quoted_len(s), written.len(), "{s:?}");
        }
    }
}
