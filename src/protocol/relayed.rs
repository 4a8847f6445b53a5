//! Messages other nodes relayed (PROTOCOL.md 6) and sealed notes, read back
//! and checked: anything this server would not have sent is `None`.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{is_valid_id, MAX_VERSION};

/// A message another node relayed (PROTOCOL.md 6): the JSON its members were
/// sent, read back for what this node must apply before passing it on.
#[derive(Debug, PartialEq, Eq)]
pub enum Relayed {
    Upsert {
        id: String,
        author: String,
        data: String,
        v: u64,
    },
    Delete {
        id: String,
        v: u64,
    },
    /// `notes`: the sealed notes as a raw JSON array (1.1; absent from older nodes).
    Completed {
        by: String,
        notes: Option<String>,
    },
    Join {
        id: String,
        user: String,
        name: String,
    },
    Leave {
        id: String,
    },
    Cursor,
}

#[derive(Deserialize)]
struct RelayedEnvelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    author: Option<String>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    v: Option<u64>,
    #[serde(default)]
    by: Option<String>,
    #[serde(default, borrow)]
    notes: Option<&'a RawValue>,
    #[serde(default, borrow)]
    member: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RelayedMember {
    id: String,
    user: String,
    name: String,
}

/// Reads a relayed message; `None` for anything this server would not have sent,
/// a version outside [1, 2^53) included (PROTOCOL.md 2, 1.1).
pub fn parse_relayed(message: &str) -> Option<Relayed> {
    let e: RelayedEnvelope = serde_json::from_str(message).ok()?;
    let v = e.v.filter(|v| (1..=MAX_VERSION).contains(v));
    Some(match e.kind.as_ref() {
        "upsert" => Relayed::Upsert {
            id: e.id.filter(|id| is_valid_id(id))?,
            author: e.author?,
            data: e.data.filter(|d| d.get().starts_with('{'))?.get().to_string(),
            v: v?,
        },
        "delete" => Relayed::Delete { id: e.id.filter(|id| is_valid_id(id))?, v: v? },
        "completed" => Relayed::Completed {
            by: e.by?,
            notes: match e.notes {
                None => None,
                Some(notes) => Some(parse_notes(notes.get()).map(|_| notes.get().to_string())?),
            },
        },
        "join" => {
            let m: RelayedMember = serde_json::from_str(e.member?.get()).ok()?;
            Relayed::Join { id: m.id, user: m.user, name: m.name }
        }
        "leave" => Relayed::Leave { id: serde_json::from_str(e.member?.get()).ok()? },
        "cursor" => Relayed::Cursor,
        _ => return None,
    })
}

/// A note of a sealed paper, as `completed` lists it.
#[derive(Debug, Deserialize)]
pub struct SealedNote<'a> {
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    #[serde(borrow)]
    pub author: Cow<'a, str>,
    #[serde(borrow)]
    pub data: &'a RawValue,
    pub v: u64,
}

/// Reads the notes of a sealed paper (a `completed` message's `notes`); `None`
/// when one of them is not a note this server would have sent.
pub fn parse_notes(json: &str) -> Option<Vec<SealedNote<'_>>> {
    let notes: Vec<SealedNote> = serde_json::from_str(json).ok()?;
    let valid =
        |n: &SealedNote| is_valid_id(&n.id) && (1..=MAX_VERSION).contains(&n.v) && n.data.get().starts_with('{');
    notes.iter().all(valid).then_some(notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Frame, MemberView};

    #[test]
    fn relayed_messages_read_back_what_was_sent() {
        let mut f = Frame::new();
        let text = |f: &Frame| std::str::from_utf8(f.payload()).unwrap().to_string();
        f.upsert("n1", "u1", r#"{"t":1}"#, 42, "c7", Some(r#""r""#));
        let expected = Relayed::Upsert { id: "n1".into(), author: "u1".into(), data: r#"{"t":1}"#.into(), v: 42 };
        assert_eq!(parse_relayed(&text(&f)), Some(expected));
        f.delete("n1", 43, "c7", None);
        assert_eq!(parse_relayed(&text(&f)), Some(Relayed::Delete { id: "n1".into(), v: 43 }));
        f.join(&MemberView { id: "c7", user: "u", name: "N" });
        let join = Relayed::Join { id: "c7".into(), user: "u".into(), name: "N".into() };
        assert_eq!(parse_relayed(&text(&f)), Some(join));
        f.leave("c7");
        assert_eq!(parse_relayed(&text(&f)), Some(Relayed::Leave { id: "c7".into() }));
        f.completed("u", "[]");
        assert_eq!(parse_relayed(&text(&f)), Some(Relayed::Completed { by: "u".into(), notes: Some("[]".into()) }));
        let far = r#"{"type":"upsert","id":"n1","author":"a","data":{},"v":18446744073709551615}"#;
        assert_eq!(parse_relayed(far), None, "a version past 2^53 is corrupt");
        let at_limit = r#"{"type":"delete","id":"n1","v":9007199254740992}"#;
        assert_eq!(parse_relayed(at_limit), None);
        f.cursor("c7", "{}");
        assert_eq!(parse_relayed(&text(&f)), Some(Relayed::Cursor));
        assert_eq!(parse_relayed(r#"{"type":"upsert","id":"bad id","author":"a","data":{},"v":1}"#), None);
        assert_eq!(parse_relayed("nonsense"), None);
        f.raw(r#"{"type":"pong"}"#);
        assert_eq!(f.payload(), br#"{"type":"pong"}"#);
    }
}
