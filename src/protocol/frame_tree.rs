//! A client JSON frame as parsed for decoding (`json::decode`): a light tree that holds
//! objects as member lists in source order and borrows every key and string from the
//! frame unless it has escapes, so the frame's own field names and its tag cost no
//! allocation, and the op's strings are copied once, into the domain [`Value`].
//!
//! It keeps the duplicate-key rule of `json.rs` (the first of a repeated key is kept and
//! the repetition reported), found by comparing keys while an object is small (a frame's
//! objects are: `op`, a `since`) and through a set once it has more than
//! [`LINEAR_MEMBERS`] members, so a hostile frame of many keys costs no quadratic time.
//! serde_json's recursion limit (128) bounds the nesting, as for every JSON input.

use std::borrow::Cow;
use std::collections::HashSet;

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

/// A parsed value and the object keys it repeats (see `json::Parsed`, the same rules).
pub(super) struct ParsedTree<'de> {
    pub(super) tree: Tree<'de>,
    /// The first key repeated within one object, at any depth.
    duplicate: Option<String>,
    /// For an object: a key repeated in the object itself.
    pub(super) own_duplicate: Option<String>,
    /// For an object: its members whose values repeat a key, with that key.
    pub(super) member_duplicates: Vec<(String, String)>,
}

impl<'de> ParsedTree<'de> {
    fn plain(tree: Tree<'de>) -> ParsedTree<'de> {
        ParsedTree {
            tree,
            duplicate: None,
            own_duplicate: None,
            member_duplicates: Vec::new(),
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
        let mut members: Members<'de> = Vec::with_capacity(4);
        // Built once the object outgrows a linear search.
        let mut keys: Option<HashSet<Cow<'de, str>>> = None;
        let mut own_duplicate: Option<String> = None;
        let mut member_duplicates = Vec::new();
        while let Some(key) = access.next_key_seed(KeySeed)? {
            let member: ParsedTree<'de> = access.next_value()?;
            if let Some(inner) = member.duplicate {
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
            members.push((key, member.tree));
            if keys.is_none() && members.len() > LINEAR_MEMBERS {
                keys = Some(members.iter().map(|(key, _)| key.clone()).collect());
            }
        }
        let duplicate = own_duplicate
            .clone()
            .or_else(|| member_duplicates.first().map(|(_, key)| key.clone()));
        Ok(ParsedTree {
            tree: Tree::Object(members),
            duplicate,
            own_duplicate,
            member_duplicates,
        })
    }
}

/// Moves the member `name` out of an object's members.
pub(super) fn take<'de>(members: &mut Members<'de>, name: &str) -> Option<Tree<'de>> {
    let at = members.iter().position(|(key, _)| key == name)?;
    Some(members.swap_remove(at).1)
}

/// The member `name` of an object's members.
pub(super) fn get<'a, 'de>(
    members: &'a [(Cow<'de, str>, Tree<'de>)],
    name: &str,
) -> Option<&'a Tree<'de>> {
    members
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, tree)| tree)
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
