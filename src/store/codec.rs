//! How notes are stored in Redis (PROTOCOL.md section 4): the value the writer
//! stores, which the write script reads its version from, and the paper the
//! loader builds back from a paper's hashes.

use std::io::Write as _;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{NoteValue, StoredPaper};

/// A Redis hash as its field/value pairs.
pub type Hash = Vec<(String, String)>;

/// The value of a note in Redis: `{"author","data","v"}`, or `{"deleted":true,"v"}`
/// for a deleted one; with several nodes, `"node"` (the writer, for ties) comes
/// just before `v`. `v` comes last on purpose: the conditional write script reads
/// both from the end of the value.
pub fn encode_note(author: &str, data: Option<&str>, node: &str, v: u64) -> String {
    let mut b = Vec::with_capacity(32 + author.len() + data.map_or(0, str::len));
    match data {
        Some(data) => {
            b.extend_from_slice(br#"{"author":"#);
            json_string(&mut b, author);
            b.extend_from_slice(br#","data":"#);
            b.extend_from_slice(data.as_bytes());
        }
        None => b.extend_from_slice(br#"{"deleted":true"#),
    }
    if !node.is_empty() {
        b.extend_from_slice(br#","node":"#);
        json_string(&mut b, node);
    }
    let _ = write!(b, r#","v":{v}}}"#);
    String::from_utf8(b).expect("JSON is UTF-8")
}

fn json_string(b: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *b, s).expect("writing to a Vec cannot fail");
}

#[derive(Deserialize)]
struct StoredNote<'a> {
    #[serde(default)]
    author: String,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    node: String,
    v: u64,
}

/// Builds a paper from its two hashes. A value this server cannot have written is
/// skipped with an error, rather than stopping every session of the paper.
pub fn parse_paper(paper: &str, notes: Hash, meta: Hash) -> StoredPaper {
    let mut stored = StoredPaper::default();
    for (id, value) in notes {
        match serde_json::from_str::<StoredNote>(&value) {
            Ok(note) if note.deleted => stored.notes.push((
                id,
                NoteValue { author: Arc::from(note.author), data: None, v: note.v, node: Arc::from(note.node) },
            )),
            Ok(StoredNote { author, data: Some(data), v, node, .. }) if data.get().starts_with('{') => {
                let data = Some(Arc::from(data.get()));
                stored.notes.push((id, NoteValue { author: Arc::from(author), data, v, node: Arc::from(node) }))
            }
            _ => log::error!("skipping note {id} of paper {paper}: unreadable stored value {value:?}"),
        }
    }
    let field = |name: &str| meta.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    if field("completed") == Some("1") {
        stored.completed_by = Some(field("completed_by").unwrap_or_default().to_string());
    }
    stored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_end_with_v() {
        let stored = encode_note("u1", Some(r#"{"v":1}"#), "", 77);
        let value: serde_json::Value = serde_json::from_str(&stored).unwrap();
        assert_eq!(value, serde_json::json!({"author":"u1","data":{"v":1},"v":77}));
        assert!(stored.ends_with(r#","v":77}"#));
        assert_eq!(encode_note("u1", None, "", 78), r#"{"deleted":true,"v":78}"#);
        assert_eq!(encode_note("u1", None, "n2", 78), r#"{"deleted":true,"node":"n2","v":78}"#);
    }

    #[test]
    fn reads_back_what_the_writer_stores() {
        let notes = vec![
            ("n1".to_string(), encode_note("u1", Some(r#"{"text":"hi"}"#), "", 7)),
            ("n2".to_string(), encode_note("u2", None, "b", 9)),
            ("bad".to_string(), "not json".to_string()),
        ];
        let meta = vec![("completed".to_string(), "1".to_string()), ("completed_by".to_string(), "u1".to_string())];
        let stored = parse_paper("p1", notes, meta);
        assert_eq!(stored.notes.len(), 2);
        assert_eq!(stored.notes[0].1.data.as_deref(), Some(r#"{"text":"hi"}"#));
        assert_eq!(stored.notes[0].1.v, 7);
        assert_eq!(stored.notes[1].1.data, None);
        assert_eq!(&*stored.notes[1].1.node, "b");
        assert_eq!(stored.completed_by.as_deref(), Some("u1"));
    }
}
