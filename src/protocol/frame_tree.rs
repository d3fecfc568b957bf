//! A client JSON frame as parsed for decoding (`json::decode`). The frame's own fields
//! become a light tree that holds objects as member lists in source order and borrows
//! every key and string from the frame unless it has escapes, so the field names and the
//! tag cost no allocation. Its value (`op`, `init`, `data`) is built straight into the
//! domain [`Value`] while it is parsed ([`ValueSeed`]): each of its strings is copied
//! once, and no tree of it is made first.
//!
//! It keeps the duplicate-key rule of `json.rs` (the first of a repeated key is kept and
//! the repetition reported). A frame's members are compared while the object is small
//! (a frame's are) and through a set once it has more than [`LINEAR_MEMBERS`] members; a
//! value's maps find repeated keys as they are built. So a hostile frame of many keys
//! costs no quadratic time. serde_json's recursion limit (128) bounds the nesting, as
//! for every JSON input.

use std::borrow::Cow;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashSet};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::de::{Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::value::{Value, MAX_DEPTH};

/// Members an object is searched by comparison before it gets a key set.
const LINEAR_MEMBERS: usize = 16;

/// One parsed JSON value.
#[derive(Debug)]
pub(super) enum Tree<'de> {
    Null,
    Bool(bool),
    Int(i64),
    /// An integer above `i64::MAX` (a value error, kept for its message).
    Big(u64),
    /// serde_json yields finite floats only.
    Float(f64),
    /// Borrowed from the frame unless it has escapes.
    Str(Cow<'de, str>),
    List(Vec<Tree<'de>>),
    /// Members in source order, each key once (the first of a repeated key).
    Object(Members<'de>),
}

/// An object's members: keys borrowed from the frame unless they have escapes.
pub(super) type Members<'de> = Vec<(Cow<'de, str>, Tree<'de>)>;

/// A parsed value and the first object key it repeats (see `json::Parsed`, the same
/// rules).
pub(super) struct ParsedTree<'de> {
    pub(super) tree: Tree<'de>,
    /// The first key repeated within one object, at any depth: for an object, a key
    /// repeated in the object itself, else the first of its members' (in source order).
    duplicate: Option<String>,
}

impl<'de> ParsedTree<'de> {
    fn plain(tree: Tree<'de>) -> ParsedTree<'de> {
        ParsedTree {
            tree,
            duplicate: None,
        }
    }
}

impl<'de> Deserialize<'de> for ParsedTree<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ParsedTree<'de>, D::Error> {
        deserializer.deserialize_any(TreeVisitor)
    }
}

/// An object key: borrowed from the frame unless it has escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Cow<'de, str>, D::Error> {
        deserializer.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(s))
    }

    fn visit_str<E>(self, s: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(s))
    }
}

struct TreeVisitor;

impl<'de> Visitor<'de> for TreeVisitor {
    type Value = ParsedTree<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<ParsedTree<'de>, E> {
        Ok(ParsedTree::plain(Tree::Bool(b)))
    }

    fn visit_i64<E>(self, n: i64) -> Result<ParsedTree<'de>, E> {
        Ok(ParsedTree::plain(Tree::Int(n)))
    }

    fn visit_u64<E>(self, n: u64) -> Result<ParsedTree<'de>, E> {
        Ok(ParsedTree::plain(match i64::try_from(n) {
            Ok(n) => Tree::Int(n),
            Err(_) => Tree::Big(n),
        }))
    }

    fn visit_f64<E>(self, f: f64) -> Result<ParsedTree<'de>, E> {
        Ok(ParsedTree::plain(if f.is_finite() {
            Tree::Float(f)
        } else {
            Tree::Null
        }))
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<ParsedTree<'de>, E> {
        Ok(ParsedTree::plain(Tree::Str(Cow::Borrowed(s))))
    }

    fn visit_str<E>(self, s: &str) -> Result<ParsedTree<'de>, E> {
        Ok(ParsedTree::plain(Tree::Str(Cow::Owned(s.to_owned()))))
    }

    fn visit_string<E>(self, s: String) -> Result<ParsedTree<'de>, E> {
        Ok(ParsedTree::plain(Tree::Str(Cow::Owned(s))))
    }

    fn visit_unit<E>(self) -> Result<ParsedTree<'de>, E> {
        Ok(ParsedTree::plain(Tree::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ParsedTree<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        let mut duplicate = None;
        while let Some(item) = seq.next_element::<ParsedTree<'de>>()? {
            duplicate = duplicate.or(item.duplicate);
            items.push(item.tree);
        }
        Ok(ParsedTree {
            duplicate,
            ..ParsedTree::plain(Tree::List(items))
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<ParsedTree<'de>, A::Error> {
        let object = members(&mut access, |_, access| {
            let member: ParsedTree<'de> = access.next_value()?;
            Ok((member.tree, member.duplicate))
        })?;
        let duplicate = object.duplicate();
        Ok(ParsedTree {
            tree: Tree::Object(object.members),
            duplicate,
        })
    }
}

/// An object's members as [`members`] reads them.
pub(super) struct Object<'de, T> {
    /// In source order, each key once (the first of a repeated key).
    pub(super) members: Vec<(Cow<'de, str>, T)>,
    /// A key repeated in the object itself (the first one).
    pub(super) own_duplicate: Option<String>,
    /// Its members whose values repeat a key, with that key, in source order.
    pub(super) member_duplicates: Vec<(String, String)>,
}

impl<T> Object<'_, T> {
    /// The first key the object repeats, at any depth: its own, else its members'.
    fn duplicate(&self) -> Option<String> {
        self.own_duplicate
            .clone()
            .or_else(|| self.member_duplicates.first().map(|(_, key)| key.clone()))
    }
}

/// Reads an object's members, each value through `value` (given the key), which also
/// says the first key repeated inside that value. Keys are compared while the object is
/// small and through a set once it has more than [`LINEAR_MEMBERS`] members, so a
/// hostile frame of many keys costs no quadratic time.
fn members<'de, A, T>(
    access: &mut A,
    mut value: impl FnMut(&str, &mut A) -> Result<(T, Option<String>), A::Error>,
) -> Result<Object<'de, T>, A::Error>
where
    A: MapAccess<'de>,
{
    let mut members: Vec<(Cow<'de, str>, T)> = Vec::with_capacity(4);
    // Built once the object outgrows a linear search.
    let mut keys: Option<HashSet<Cow<'de, str>>> = None;
    let mut own_duplicate: Option<String> = None;
    let mut member_duplicates = Vec::new();
    while let Some(key) = access.next_key_seed(KeySeed)? {
        let (member, inner_duplicate) = value(&key, access)?;
        if let Some(inner) = inner_duplicate {
            member_duplicates.push((key.clone().into_owned(), inner));
        }
        let repeated = match &mut keys {
            Some(keys) => !keys.insert(key.clone()),
            None => members.iter().any(|(known, _)| *known == key),
        };
        if repeated {
            own_duplicate.get_or_insert(key.into_owned());
            continue;
        }
        members.push((key, member));
        if keys.is_none() && members.len() > LINEAR_MEMBERS {
            keys = Some(members.iter().map(|(key, _)| key.clone()).collect());
        }
    }
    Ok(Object {
        members,
        own_duplicate,
        member_duplicates,
    })
}

/// Moves the member `name` out of an object's members.
pub(super) fn take<'de, T>(members: &mut Vec<(Cow<'de, str>, T)>, name: &str) -> Option<T> {
    let at = members.iter().position(|(key, _)| key == name)?;
    Some(members.swap_remove(at).1)
}

/// The member `name` of an object's members.
pub(super) fn get<'a, 'de, T>(members: &'a [(Cow<'de, str>, T)], name: &str) -> Option<&'a T> {
    members
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, member)| member)
}

/// The members of a frame that carry a domain value (`op`, `init`, `data`): built into
/// the [`Value`] while the frame is parsed, never held as a tree.
const VALUE_FIELDS: [&str; 3] = ["op", "init", "data"];

/// One member of a client frame.
#[derive(Debug)]
pub(super) enum Field<'de> {
    /// A member named in [`VALUE_FIELDS`]: its domain value, or why it breaks the
    /// value rules of PROTOCOL.md (the messages of [`into_value`]).
    Value(Result<Value, String>),
    /// Any other member, as parsed.
    Tree(Tree<'de>),
}

impl Field<'_> {
    /// The member's domain value, under the value rules of PROTOCOL.md.
    pub(super) fn into_value(self) -> Result<Value, String> {
        match self {
            Field::Value(value) => value,
            Field::Tree(tree) => into_value(tree, 0),
        }
    }
}

/// A client frame as parsed for `json::decode`. The frame is parsed in full either
/// way, so a syntax error anywhere in it is found as serde_json finds it.
pub(super) enum ParsedFrame<'de> {
    Object(Object<'de, Field<'de>>),
    /// Valid JSON that is not an object.
    NotObject,
}

impl<'de> Deserialize<'de> for ParsedFrame<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ParsedFrame<'de>, D::Error> {
        deserializer.deserialize_any(FrameVisitor)
    }
}

/// The top level of a client frame: an object's value members go through
/// [`ValueSeed`], the others become trees; anything else is parsed as a tree (the same
/// nesting limit, the same errors) and reported as [`ParsedFrame::NotObject`].
struct FrameVisitor;

impl<'de> Visitor<'de> for FrameVisitor {
    type Value = ParsedFrame<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<ParsedFrame<'de>, E> {
        Ok(ParsedFrame::NotObject)
    }

    fn visit_i64<E>(self, _: i64) -> Result<ParsedFrame<'de>, E> {
        Ok(ParsedFrame::NotObject)
    }

    fn visit_u64<E>(self, _: u64) -> Result<ParsedFrame<'de>, E> {
        Ok(ParsedFrame::NotObject)
    }

    fn visit_f64<E>(self, _: f64) -> Result<ParsedFrame<'de>, E> {
        Ok(ParsedFrame::NotObject)
    }

    fn visit_borrowed_str<E>(self, _: &'de str) -> Result<ParsedFrame<'de>, E> {
        Ok(ParsedFrame::NotObject)
    }

    fn visit_str<E>(self, _: &str) -> Result<ParsedFrame<'de>, E> {
        Ok(ParsedFrame::NotObject)
    }

    fn visit_string<E>(self, _: String) -> Result<ParsedFrame<'de>, E> {
        Ok(ParsedFrame::NotObject)
    }

    fn visit_unit<E>(self) -> Result<ParsedFrame<'de>, E> {
        Ok(ParsedFrame::NotObject)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<ParsedFrame<'de>, A::Error> {
        TreeVisitor.visit_seq(seq)?;
        Ok(ParsedFrame::NotObject)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<ParsedFrame<'de>, A::Error> {
        let object = members(&mut access, |key, access| {
            if VALUE_FIELDS.contains(&key) {
                let member = access.next_value_seed(ValueSeed { depth: 0 })?;
                Ok((Field::Value(member.value), member.duplicate))
            } else {
                let member: ParsedTree<'de> = access.next_value()?;
                Ok((Field::Tree(member.tree), member.duplicate))
            }
        })?;
        Ok(ParsedFrame::Object(object))
    }
}

/// A value built straight into the domain [`Value`] as it is parsed, and the first
/// object key it repeats (the rule of [`ParsedTree`]).
pub(super) struct Built {
    /// The value, or why it breaks the value rules: the first reason [`into_value`]
    /// would give for the same text, in the same words.
    pub(super) value: Result<Value, String>,
    pub(super) duplicate: Option<String>,
}

impl Built {
    fn plain(value: Result<Value, String>) -> Built {
        Built {
            value,
            duplicate: None,
        }
    }
}

/// Parses one value at nesting `depth` (0 for a frame's `op`) into a [`Built`]: the
/// one-pass form of a [`Tree`] and then [`into_value`], without the tree. Like the tree
/// it never fails on content (only serde_json's syntax and nesting errors), so a value
/// that breaks a rule is still parsed to its end, and a repeated key anywhere in it is
/// still found; what is built past an error is dropped.
#[derive(Clone, Copy)]
pub(super) struct ValueSeed {
    depth: usize,
}

fn too_deep() -> String {
    format!("value nested deeper than {MAX_DEPTH} levels")
}

impl<'de> DeserializeSeed<'de> for ValueSeed {
    type Value = Built;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Built, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed {
    type Value = Built;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Built, E> {
        Ok(Built::plain(Ok(Value::Bool(b))))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Built, E> {
        Ok(Built::plain(Ok(Value::Int(n))))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Built, E> {
        Ok(Built::plain(match i64::try_from(n) {
            Ok(n) => Ok(Value::Int(n)),
            Err(_) => Err(format!("integer {n} is outside the 64-bit signed range")),
        }))
    }

    fn visit_f64<E>(self, f: f64) -> Result<Built, E> {
        // serde_json yields finite floats only; the tree reads any other as null.
        Ok(Built::plain(Ok(if f.is_finite() {
            Value::Float(f)
        } else {
            Value::Null
        })))
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Built, E> {
        Ok(Built::plain(Ok(Value::Str(s.to_owned()))))
    }

    fn visit_str<E>(self, s: &str) -> Result<Built, E> {
        Ok(Built::plain(Ok(Value::Str(s.to_owned()))))
    }

    fn visit_string<E>(self, s: String) -> Result<Built, E> {
        Ok(Built::plain(Ok(Value::Str(s))))
    }

    fn visit_unit<E>(self) -> Result<Built, E> {
        Ok(Built::plain(Ok(Value::Null)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Built, A::Error> {
        let item_seed = ValueSeed {
            depth: self.depth + 1,
        };
        let mut items = Vec::new();
        // A list this deep is refused whatever it holds (`into_value` checks the depth
        // before its items).
        let mut error = (self.depth >= MAX_DEPTH).then(too_deep);
        let mut duplicate = None;
        while let Some(item) = seq.next_element_seed(item_seed)? {
            duplicate = duplicate.or(item.duplicate);
            match item.value {
                Ok(value) if error.is_none() => items.push(value),
                Ok(_) => {}
                Err(why) => {
                    if error.is_none() {
                        error = Some(why);
                        items = Vec::new();
                    }
                }
            }
        }
        Ok(Built {
            value: match error {
                Some(why) => Err(why),
                None => Ok(Value::List(items)),
            },
            duplicate,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Built, A::Error> {
        let member_seed = ValueSeed {
            depth: self.depth + 1,
        };
        // The map also finds a repeated key (a lookup per key, so many keys cost no
        // quadratic time); the first of a repeated key is kept, as in the tree. A member
        // whose value broke a rule holds null: the map is then refused anyway.
        let mut map = BTreeMap::new();
        let mut error: Option<String> = None;
        let mut own_duplicate: Option<String> = None;
        let mut member_duplicate: Option<String> = None;
        while let Some(key) = access.next_key_seed(KeySeed)? {
            let member = access.next_value_seed(member_seed)?;
            member_duplicate = member_duplicate.or(member.duplicate);
            match map.entry(key.into_owned()) {
                Entry::Occupied(slot) => {
                    own_duplicate.get_or_insert_with(|| slot.key().clone());
                }
                Entry::Vacant(slot) => match member.value {
                    Ok(value) => {
                        slot.insert(value);
                    }
                    Err(why) => {
                        error.get_or_insert(why);
                        slot.insert(Value::Null);
                    }
                },
            }
        }
        // In `into_value`'s order: an object of one `$b64` string is bytes at any
        // depth, then the depth, then its members' first error in source order (which
        // is the first met: members are not reordered before they are checked).
        let value = match map.first_key_value() {
            Some((key, Value::Str(b64))) if map.len() == 1 && key == "$b64" => BASE64
                .decode(b64.as_bytes())
                .map(Value::Bytes)
                .map_err(|e| format!("bad base64 in `$b64`: {e}")),
            _ if self.depth >= MAX_DEPTH => Err(too_deep()),
            _ => match error {
                Some(why) => Err(why),
                None => Ok(Value::Map(map)),
            },
        };
        Ok(Built {
            value,
            duplicate: own_duplicate.or(member_duplicate),
        })
    }
}

/// The domain value of a parsed value, under the value rules of PROTOCOL.md; the same
/// rules and messages as `json::to_value`.
pub(super) fn into_value(tree: Tree<'_>, depth: usize) -> Result<Value, String> {
    Ok(match tree {
        Tree::Null => Value::Null,
        Tree::Bool(b) => Value::Bool(b),
        Tree::Int(n) => Value::Int(n),
        Tree::Big(n) => return Err(format!("integer {n} is outside the 64-bit signed range")),
        Tree::Float(f) => Value::Float(f),
        Tree::Str(s) => Value::Str(s.into_owned()),
        Tree::List(items) => {
            if depth >= MAX_DEPTH {
                return Err(format!("value nested deeper than {MAX_DEPTH} levels"));
            }
            Value::List(
                items
                    .into_iter()
                    .map(|item| into_value(item, depth + 1))
                    .collect::<Result<_, _>>()?,
            )
        }
        Tree::Object(members) => {
            if let [(key, Tree::Str(b64))] = members.as_slice() {
                if key == "$b64" {
                    return BASE64
                        .decode(b64.as_bytes())
                        .map(Value::Bytes)
                        .map_err(|e| format!("bad base64 in `$b64`: {e}"));
                }
            }
            if depth >= MAX_DEPTH {
                return Err(format!("value nested deeper than {MAX_DEPTH} levels"));
            }
            // Inserted one by one (the keys are distinct, checked by the parse): for the
            // few members of an op, cheaper than collecting, sorting and bulk-building.
            let mut map = std::collections::BTreeMap::new();
            for (key, item) in members {
                map.insert(key.into_owned(), into_value(item, depth + 1)?);
            }
            Value::Map(map)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Outcome = Result<(Result<Value, String>, Option<String>), String>;

    /// A value parsed in one pass.
    fn one_pass(text: &str) -> Outcome {
        let mut de = serde_json::Deserializer::from_str(text);
        let built = ValueSeed { depth: 0 }
            .deserialize(&mut de)
            .map_err(|e| e.to_string())?;
        de.end().map_err(|e| e.to_string())?;
        Ok((built.value, built.duplicate))
    }

    /// The same value through a tree and then `into_value` (the decoder before the
    /// one-pass build, kept as the reference).
    fn by_tree(text: &str) -> Outcome {
        let parsed: ParsedTree = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Ok((into_value(parsed.tree, 0), parsed.duplicate))
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(r#""a""#.to_owned()),
            Just(r#""b""#.to_owned()),
            // The same key as "a", escaped: a repetition only the decoded keys show.
            Just(r#""\u0061""#.to_owned()),
            Just(r#""$b64""#.to_owned()),
            Just(r#""""#.to_owned()),
            "[a-z]{1,3}".prop_map(|s| format!(r#""{s}""#)),
        ]
    }

    fn scalar() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("false".to_owned()),
            any::<i64>().prop_map(|n| n.to_string()),
            (i64::MAX as u64..=u64::MAX).prop_map(|n| n.to_string()),
            Just("-9223372036854775809".to_owned()),
            any::<f64>()
                .prop_filter("JSON numbers are finite", |f| f.is_finite())
                .prop_map(|f| format!("{f:?}")),
            Just("1e400".to_owned()),
            Just(r#""AAE=""#.to_owned()),
            Just(r#""!!""#.to_owned()),
            Just(r#""tab\there \"q\" \u00e9""#.to_owned()),
            "[a-z0-9 ]{0,8}".prop_map(|s| format!(r#""{s}""#)),
        ]
    }

    /// JSON texts of values: repeated keys (plain and escaped), `$b64` objects, integers
    /// past i64, and nesting around the depth limit.
    fn value_text() -> impl Strategy<Value = String> {
        let tree = scalar().prop_recursive(6, 64, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5)
                    .prop_map(|items| format!("[{}]", items.join(","))),
                prop::collection::vec((key(), inner), 0..5).prop_map(|members| {
                    let members: Vec<String> =
                        members.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                    format!("{{{}}}", members.join(","))
                }),
            ]
        });
        (tree, 0..40usize, any::<bool>(), key()).prop_map(|(inner, levels, lists, key)| {
            if lists {
                format!("{}{inner}{}", "[".repeat(levels), "]".repeat(levels))
            } else {
                format!(
                    "{}{inner}{}",
                    format!("{{{key}:").repeat(levels),
                    "}".repeat(levels)
                )
            }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn one_pass_values_are_those_of_the_tree(text in value_text()) {
            prop_assert_eq!(one_pass(&text), by_tree(&text), "{}", text);
        }

        #[test]
        fn one_pass_syntax_errors_are_those_of_the_tree(text in value_text(), cut in any::<prop::sample::Index>()) {
            let mut end = cut.index(text.len() + 1);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let text = &text[..end];
            prop_assert_eq!(one_pass(text), by_tree(text), "{}", text);
        }
    }

    #[test]
    fn hand_picked_values_are_those_of_the_tree() {
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        let deep_map = |n: usize| format!("{}1{}", r#"{"a":"#.repeat(n), "}".repeat(n));
        let mut texts = vec![
            r#"{"$b64":"AAE="}"#.to_owned(),
            r#"{"$b64":"AAE=","x":1}"#.to_owned(),
            r#"{"$b64":1}"#.to_owned(),
            r#"{"$b64":"!!"}"#.to_owned(),
            r#"{"a":1,"a":2}"#.to_owned(),
            r#"{"a":1,"\u0061":2}"#.to_owned(),
            r#"[{"a":[1,{"b":1,"b":2}]},{"c":1,"c":1}]"#.to_owned(),
            r#"{"a":{"x":1,"x":2},"a":3}"#.to_owned(),
            r#"{"a":18446744073709551615,"b":[1e400]}"#.to_owned(),
            r#"{"b":18446744073709551615,"a":"x"}"#.to_owned(),
            format!(r#"{{"a":{},"b":18446744073709551615}}"#, deep(40)),
            format!(r#"[18446744073709551615,{}]"#, deep(40)),
            format!(r#"{}{{"$b64":"AAE="}}{}"#, "[".repeat(31), "]".repeat(31)),
            format!(r#"{}{{"$b64":"AAE="}}{}"#, "[".repeat(33), "]".repeat(33)),
            format!(r#"{}{{"$b64":"!!"}}{}"#, "[".repeat(40), "]".repeat(40)),
        ];
        for n in [31, 32, 33, 127, 128, 129, 200] {
            texts.push(deep(n));
            texts.push(deep_map(n));
        }
        let keys: Vec<String> = (0..40).map(|i| format!(r#""k{i}":{i}"#)).collect();
        texts.push(format!("{{{}}}", keys.join(",")));
        texts.push(format!(r#"{{{},"k5":0}}"#, keys.join(",")));
        for text in &texts {
            assert_eq!(one_pass(text), by_tree(text), "{text}");
        }
    }
}
