//! Write rules of "state" rooms: who may set, increment or delete which keys.
//!
//! A room created with `"rules": [{"keys": PATTERN, "write": "member" | "creator"}, ...]`
//! in its `init` accepts a write to a key only through the first rule whose pattern
//! matches it. In a pattern `*` matches any run of characters (`/` included) and
//! `{user}` matches the writing user's id, so `user/{user}/*` is each user's own space.
//! `write` says who else the rule requires: `member` (the default) is anyone who may use
//! the room, `creator` is the user who created it. A key that lies in another user's
//! `{user}` space, a rule for the creator only, or a key no rule covers is refused
//! `forbidden`. A room without `rules` lets every member write every key (as before
//! rules existed). The rules are kept as a private fact of the room, so they are logged
//! with the creation and replayed like any other change.

use super::{Fields, Refusal, RefuseCode};
use crate::value::Value;

/// Most rules one room may have.
pub const MAX_RULES: usize = 64;

/// Longest pattern, in bytes.
pub const MAX_PATTERN_BYTES: usize = 256;

/// Who a rule lets write, beyond what its `{user}` part requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    Member,
    Creator,
}

/// One part of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    /// `*`: any run of characters.
    Any,
    /// `{user}`: the writer's id.
    User,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    pattern: String,
    parts: Vec<Part>,
    writer: Writer,
}

/// Checks `init.rules` and returns what the room keeps (the value as given), or `None`
/// when `init` has no rules.
pub(super) fn from_init(rules: Option<&Value>) -> Result<Option<Value>, Refusal> {
    match rules {
        None => Ok(None),
        Some(value) => parse(value).map(|_| Some(value.clone())),
    }
}

/// May `user` write `key`, under the room's kept `rules` and its `creator`?
pub(super) fn check_write(
    rules: Option<&Value>,
    creator: Option<&str>,
    user: &str,
    key: &str,
) -> Result<(), Refusal> {
    let Some(rules) = rules else {
        return Ok(());
    };
    let forbidden = |msg: String| Err(Refusal::new(RefuseCode::Forbidden, msg));
    for rule in parse(rules)? {
        if matches(&rule.parts, key, Some(user)) {
            return match rule.writer {
                Writer::Member => Ok(()),
                Writer::Creator if creator == Some(user) => Ok(()),
                Writer::Creator => forbidden(format!(
                    "key \"{key}\" is writable by the room's creator only (rule \"{}\")",
                    rule.pattern
                )),
            };
        }
        if matches(&rule.parts, key, None) {
            return forbidden(format!(
                "key \"{key}\" belongs to another user (rule \"{}\")",
                rule.pattern
            ));
        }
    }
    forbidden(format!("no write rule of this room covers key \"{key}\""))
}

fn parse(value: &Value) -> Result<Vec<Rule>, Refusal> {
    let Value::List(list) = value else {
        return Err(Refusal::invalid("field \"rules\" must be a list"));
    };
    if list.len() > MAX_RULES {
        return Err(Refusal::invalid(format!(
            "field \"rules\" has {} rules, the limit is {MAX_RULES}",
            list.len()
        )));
    }
    list.iter().map(parse_rule).collect()
}

fn parse_rule(value: &Value) -> Result<Rule, Refusal> {
    let Value::Map(map) = value else {
        return Err(Refusal::invalid("each rule must be a map"));
    };
    let fields = Fields { map };
    if let Some(name) = map
        .keys()
        .find(|name| !["keys", "write"].contains(&name.as_str()))
    {
        return Err(Refusal::invalid(format!("unknown rule field \"{name}\"")));
    }
    let pattern = fields.str("keys")?;
    if pattern.is_empty() || pattern.len() > MAX_PATTERN_BYTES {
        return Err(Refusal::invalid(format!(
            "rule \"keys\" of {} bytes, must be 1..={MAX_PATTERN_BYTES}",
            pattern.len()
        )));
    }
    let writer = match fields.opt("write") {
        None => Writer::Member,
        Some(Value::Str(who)) if who == "member" => Writer::Member,
        Some(Value::Str(who)) if who == "creator" => Writer::Creator,
        Some(_) => {
            return Err(Refusal::invalid(
                "rule \"write\" must be \"member\" or \"creator\"",
            ))
        }
    };
    Ok(Rule {
        pattern: pattern.to_owned(),
        parts: parts(pattern),
        writer,
    })
}

fn parts(pattern: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut rest = pattern;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix("{user}") {
            parts.extend((!text.is_empty()).then(|| Part::Text(std::mem::take(&mut text))));
            parts.push(Part::User);
            rest = after;
        } else if c == '*' {
            parts.extend((!text.is_empty()).then(|| Part::Text(std::mem::take(&mut text))));
            parts.push(Part::Any);
            rest = &rest[1..];
        } else {
            text.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    parts.extend((!text.is_empty()).then_some(Part::Text(text)));
    parts
}

/// Does `key` match `parts`? `{user}` is `user` when given, else any non-empty run
/// without `/` (someone's id).
fn matches(parts: &[Part], key: &str, user: Option<&str>) -> bool {
    let Some((first, rest)) = parts.split_first() else {
        return key.is_empty();
    };
    match first {
        Part::Text(text) => key
            .strip_prefix(text.as_str())
            .is_some_and(|after| matches(rest, after, user)),
        Part::User => match user {
            Some(user) => key
                .strip_prefix(user)
                .is_some_and(|after| matches(rest, after, Some(user))),
            None => {
                let segment = key.find('/').unwrap_or(key.len());
                (1..=segment)
                    .filter(|end| key.is_char_boundary(*end))
                    .any(|end| matches(rest, &key[end..], None))
            }
        },
        Part::Any => (0..=key.len())
            .filter(|start| key.is_char_boundary(*start))
            .any(|start| matches(rest, &key[start..], user)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(list: Value) -> Value {
        from_init(Some(&list))
            .expect("valid rules")
            .expect("rules given")
    }

    fn rule(keys: &str, write: &str) -> Value {
        Value::map([
            ("keys", Value::Str(keys.into())),
            ("write", Value::Str(write.into())),
        ])
    }

    fn code(result: Result<(), Refusal>) -> Option<RefuseCode> {
        result.err().map(|refusal| refusal.code)
    }

    #[test]
    fn a_user_space_is_writable_by_its_user_only() {
        let kept = rules(Value::List(vec![rule("user/{user}/*", "member")]));
        let check = |user, key| code(check_write(Some(&kept), Some("alice"), user, key));
        assert_eq!(check("bob", "user/bob/hp"), None);
        assert_eq!(check("bob", "user/bob/deep/er"), None);
        assert_eq!(check("bob", "user/alice/hp"), Some(RefuseCode::Forbidden));
        assert_eq!(check("alice", "user/bob/hp"), Some(RefuseCode::Forbidden));
        // A key no rule covers is refused too.
        assert_eq!(check("bob", "board"), Some(RefuseCode::Forbidden));
    }

    #[test]
    fn creator_rules_admit_the_creator_only_and_the_first_match_decides() {
        let kept = rules(Value::List(vec![
            rule("config/*", "creator"),
            rule("*", "member"),
        ]));
        let check = |user, key| code(check_write(Some(&kept), Some("alice"), user, key));
        assert_eq!(check("alice", "config/title"), None);
        assert_eq!(check("bob", "config/title"), Some(RefuseCode::Forbidden));
        assert_eq!(check("bob", "chat/1"), None);
    }

    #[test]
    fn without_rules_every_member_writes_every_key() {
        assert_eq!(code(check_write(None, Some("alice"), "bob", "any")), None);
    }

    #[test]
    fn malformed_rules_are_invalid() {
        for bad in [
            Value::Int(1),
            Value::List(vec![Value::Int(1)]),
            Value::List(vec![rule("", "member")]),
            Value::List(vec![rule("a", "owner")]),
            Value::List(vec![Value::map([
                ("keys", Value::Str("a".into())),
                ("who", Value::Null),
            ])]),
            Value::List(vec![rule("a", "member"); MAX_RULES + 1]),
        ] {
            let refusal = from_init(Some(&bad)).expect_err("malformed rules");
            assert_eq!(refusal.code, RefuseCode::Invalid, "{bad:?}");
        }
    }

    #[test]
    fn patterns_match_literally_outside_stars_and_user() {
        let glob = parts("a*b{user}");
        assert!(matches(&glob, "axxbu1", Some("u1")));
        assert!(!matches(&glob, "axxbu2", Some("u1")));
        assert!(matches(&glob, "abu2", None));
        assert!(!matches(&glob, "ab", None), "{{user}} is never empty");
        assert!(!matches(&parts("exact"), "exactly", None));
    }
}
