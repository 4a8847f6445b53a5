//! Messages between nodes (PROTOCOL.md 6): what another node relayed, read
//! back for what this node must apply before passing it on, and the sealed
//! notes a `completed` carries.

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
    /// The sending node's resume floor for the paper (between nodes only).
    ResumeFloor {
        v: u64,
    },
    /// 1.1: the paper's cover.
    Meta {
        data: String,
        v: u64,
    },
    /// 1.1: fields of a note (`null` removes one).
    Patch {
        id: String,
        data: String,
        v: u64,
    },
    /// 1.2: the main backend erased the paper (between nodes only).
    Erased,
    /// 1.2: the main backend revoked a user until a unix second (between nodes only).
    Revoked {
        user: String,
        until: u64,
    },
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
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    until: Option<u64>,
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
        "resume_floor" => Relayed::ResumeFloor { v: v? },
        "patch" => Relayed::Patch {
            id: e.id.filter(|id| is_valid_id(id))?,
            data: e.data.filter(|d| d.get().starts_with('{'))?.get().to_string(),
            v: v?,
        },
        "meta" => Relayed::Meta { data: e.data.filter(|d| d.get().starts_with('{'))?.get().to_string(), v: v? },
        "erased" => Relayed::Erased,
        "revoked" => Relayed::Revoked { user: e.user?, until: e.until? },
        _ => return None,
    })
}

/// The message that relays a paper's resume floor to the other nodes (never
/// sent to clients).
pub fn resume_floor_message(v: u64) -> String {
    format!(r#"{{"type":"resume_floor","v":{v}}}"#)
}

/// The message that tells the other nodes a paper was erased (never sent to clients).
pub fn erased_message() -> &'static str {
    r#"{"type":"erased"}"#
}

/// The message that tells the other nodes a user was revoked (never sent to clients).
pub fn revoked_message(user: &str, until: u64) -> String {
    serde_json::json!({"type": "revoked", "user": user, "until": until}).to_string()
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
