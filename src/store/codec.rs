//! How notes are stored in Redis (PROTOCOL.md section 4): the value the writer
//! stores, which the write script reads its version from, and the paper the
//! loader builds back from a paper's hashes.

use std::io::Write as _;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{NoteValue, StoredPaper};
use crate::protocol::{is_valid_id, FieldVersions, MAX_VERSION};

/// A Redis hash as its field/value pairs, as bytes: a value that is not UTF-8
/// must cost one note, not the whole paper.
pub type Hash = Vec<(Vec<u8>, Vec<u8>)>;

/// The value of a note in Redis: `{"author","data","v"}`, or `{"deleted":true,"v"}`
/// for a deleted one; once a patch changed a field after the last upsert, the
/// field versions `"fv":{"base":[v,"node"],"changed":{..}}` follow `data` (1.1),
/// with `"floor":[v,"node"]` last in them once removed fields' versions were
/// folded (1.2); with several nodes, `"node"` (the
/// writer of `v`, for ties) comes just before `v`. `v`, the greatest version of
/// the note, comes last on purpose: the write script reads it from the end.
pub fn encode_note(author: &str, data: Option<&str>, fields: Option<&FieldVersions>, node: &str, v: u64) -> String {
    let mut b = Vec::with_capacity(32 + author.len() + data.map_or(0, str::len));
    match data {
        Some(data) => {
            b.extend_from_slice(br#"{"author":"#);
            json_string(&mut b, author);
            b.extend_from_slice(br#","data":"#);
            b.extend_from_slice(data.as_bytes());
            if let Some(fv) = fields {
                let _ = write!(b, r#","fv":{{"base":[{},"#, fv.base.0);
                json_string(&mut b, &fv.base.1);
                b.extend_from_slice(br#"],"changed":{"#);
                for (i, (key, (v, node))) in fv.changed.iter().enumerate() {
                    if i > 0 {
                        b.push(b',');
                    }
                    json_string(&mut b, key);
                    let _ = write!(b, ":[{v},");
                    json_string(&mut b, node);
                    b.push(b']');
                }
                b.push(b'}');
                if let Some((v, node)) = &fv.floor {
                    let _ = write!(b, r#","floor":[{v},"#);
                    json_string(&mut b, node);
                    b.push(b']');
                }
                b.push(b'}');
            }
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

/// The paper's cover in its meta hash (1.1): `{"data","v"}`, with `"node"`
/// before `v` with several nodes (the write script reads both from the end).
pub fn encode_cover(data: &str, node: &str, v: u64) -> String {
    let mut b = Vec::with_capacity(24 + data.len());
    b.extend_from_slice(br#"{"data":"#);
    b.extend_from_slice(data.as_bytes());
    if !node.is_empty() {
        b.extend_from_slice(br#","node":"#);
        json_string(&mut b, node);
    }
    let _ = write!(b, r#","v":{v}}}"#);
    String::from_utf8(b).expect("JSON is UTF-8")
}

/// A stored cover, if it is one this server can read.
pub fn read_cover(value: &[u8]) -> Option<NoteValue> {
    #[derive(Deserialize)]
    struct StoredCover<'a> {
        #[serde(borrow)]
        data: &'a RawValue,
        #[serde(default)]
        node: String,
        v: u64,
    }
    let cover: StoredCover = serde_json::from_slice(value).ok()?;
    if !(1..=MAX_VERSION).contains(&cover.v) || !cover.data.get().starts_with('{') {
        return None;
    }
    Some(NoteValue {
        author: Arc::from(""),
        data: Some(Arc::from(cover.data.get())),
        v: cover.v,
        node: Arc::from(cover.node),
        fields: None,
    })
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
    fv: Option<StoredFieldVersions>,
    #[serde(default)]
    node: String,
    v: u64,
}

/// `"fv":{"base":[v,"node"],"changed":{"field":[v,"node"]},"floor":[v,"node"]}`;
/// values stored before 1.2 have no floor.
#[derive(Deserialize)]
struct StoredFieldVersions {
    base: (u64, String),
    #[serde(default)]
    changed: std::collections::BTreeMap<String, (u64, String)>,
    #[serde(default)]
    floor: Option<(u64, String)>,
}

/// Builds a paper from its two hashes. A value this server cannot have written
/// (not UTF-8, not a JSON note, a version outside [1, 2^53)) is skipped with a
/// warning and counted, rather than stopping every session of the paper; the
/// write script treats the same values as absent (PROTOCOL.md 2, 1.1).
/// Returns the paper and how many values were skipped.
pub fn parse_paper(paper: &str, notes: Hash, meta: Hash) -> (StoredPaper, u64) {
    let mut stored = StoredPaper::default();
    let mut skipped = 0;
    for (id, value) in notes {
        match (String::from_utf8(id), read_note(&value)) {
            (Ok(id), Some(note)) if is_valid_id(&id) => stored.notes.push((id, note)),
            (id, _) => {
                skipped += 1;
                let id = id.unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
                log::warn!(
                    "skipping note {id:?} of paper {paper}: unreadable stored value {:?}",
                    String::from_utf8_lossy(&value)
                );
            }
        }
    }
    let field = |name: &str| meta.iter().find(|(k, _)| k == name.as_bytes()).map(|(_, v)| v.as_slice());
    let number = |name: &str| {
        field(name).and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok()).filter(|v| *v <= MAX_VERSION)
    };
    stored.horizon = number("horizon").unwrap_or(0);
    stored.cover = field("cover").and_then(read_cover);
    stored.resume_floor = number("resume_floor").unwrap_or(0);
    if field("completed") == Some(b"1") {
        stored.completed_by = Some(String::from_utf8_lossy(field("completed_by").unwrap_or_default()).into_owned());
    }
    (stored, skipped)
}

/// The revocations of a paper (PROTOCOL.md 7): user -> unix seconds; an entry
/// that is not a number is skipped.
pub fn parse_revoked(revoked: Hash) -> Vec<(String, u64)> {
    revoked
        .into_iter()
        .filter_map(|(user, until)| {
            let user = String::from_utf8(user).ok()?;
            let until = std::str::from_utf8(&until).ok()?.trim().parse::<u64>().ok()?;
            Some((user, until))
        })
        .collect()
}

/// A stored note value, if it is one this server can read.
pub fn read_note(value: &[u8]) -> Option<NoteValue> {
    let value = std::str::from_utf8(value).ok()?;
    let note: StoredNote = serde_json::from_str(value).ok()?;
    if !(1..=MAX_VERSION).contains(&note.v) {
        return None;
    }
    let data = match note.data {
        _ if note.deleted => None,
        Some(data) if data.get().starts_with('{') => Some(Arc::from(data.get())),
        _ => return None,
    };
    let fields = match note.fv {
        Some(fv) if data.is_some() => {
            let versions = std::iter::once(fv.base.0)
                .chain(fv.changed.values().map(|(v, _)| *v))
                .chain(fv.floor.as_ref().map(|(v, _)| *v));
            if versions.clone().any(|v| !(1..=MAX_VERSION).contains(&v)) || versions.max() != Some(note.v) {
                return None;
            }
            let changed = fv.changed.into_iter().map(|(k, (v, n))| (k, (v, Arc::from(n)))).collect();
            let floor = fv.floor.map(|(v, n)| (v, Arc::from(n)));
            Some(Arc::new(FieldVersions { base: (fv.base.0, Arc::from(fv.base.1)), changed, floor }))
        }
        _ => None,
    };
    Some(NoteValue { author: Arc::from(note.author), data, v: note.v, node: Arc::from(note.node), fields })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_end_with_v() {
        let stored = encode_note("u1", Some(r#"{"v":1}"#), None, "", 77);
        let value: serde_json::Value = serde_json::from_str(&stored).unwrap();
        assert_eq!(value, serde_json::json!({"author":"u1","data":{"v":1},"v":77}));
        assert!(stored.ends_with(r#","v":77}"#));
        assert_eq!(encode_note("u1", None, None, "", 78), r#"{"deleted":true,"v":78}"#);
        assert_eq!(encode_note("u1", None, None, "n2", 78), r#"{"deleted":true,"node":"n2","v":78}"#);
    }

    #[test]
    fn field_versions_are_stored_and_read_back() {
        let fv = FieldVersions {
            base: (10, Arc::from("a")),
            changed: [("x".to_string(), (12, Arc::from("b")))].into_iter().collect(),
            floor: None,
        };
        let stored = encode_note("u1", Some(r#"{"x":1}"#), Some(&fv), "b", 12);
        assert!(stored.ends_with(r#","node":"b","v":12}"#), "{stored}");
        let note = read_note(stored.as_bytes()).unwrap();
        assert_eq!(note.fields.as_deref(), Some(&fv));
        assert_eq!(note.v, 12);
    }

    #[test]
    fn the_floor_is_stored_and_read_back_and_counts_in_v() {
        let fv = FieldVersions {
            base: (10, Arc::from("a")),
            changed: [("x".to_string(), (12, Arc::from("b")))].into_iter().collect(),
            floor: Some((14, Arc::from("a"))),
        };
        let stored = encode_note("u1", Some(r#"{"x":1}"#), Some(&fv), "a", 14);
        assert!(stored.contains(r#","fv":{"base":[10,"a"],"changed":{"x":[12,"b"]},"floor":[14,"a"]},"#), "{stored}");
        assert_eq!(read_note(stored.as_bytes()).unwrap().fields.as_deref(), Some(&fv));
        // Only a floor: the removals it folded are all there is.
        let only = FieldVersions { changed: Default::default(), ..fv.clone() };
        let stored = encode_note("u1", Some(r#"{"x":1}"#), Some(&only), "a", 14);
        assert_eq!(read_note(stored.as_bytes()).unwrap().fields.as_deref(), Some(&only));
        // The floor is a version like the others: in range, and never above v.
        let read = |s: &str| read_note(s.as_bytes()).map(|n| n.v);
        assert_eq!(read(r#"{"author":"a","data":{},"fv":{"base":[1,""],"floor":[3,""]},"v":3}"#), Some(3));
        assert_eq!(read(r#"{"author":"a","data":{},"fv":{"base":[1,""],"floor":[3,""]},"v":2}"#), None);
        assert_eq!(read(r#"{"author":"a","data":{},"fv":{"base":[1,""],"floor":[0,""]},"v":1}"#), None);
        assert_eq!(read(r#"{"author":"a","data":{},"fv":{"base":[1,""],"floor":[9007199254740992,""]},"v":1}"#), None);
        // What was stored before 1.2 reads as before.
        let old = read_note(br#"{"author":"a","data":{},"fv":{"base":[1,""],"changed":{"y":[2,""]}},"v":2}"#).unwrap();
        assert_eq!(old.fields.unwrap().floor, None);
    }

    #[test]
    fn reads_back_what_the_writer_stores() {
        let notes = vec![
            ("n1".to_string(), encode_note("u1", Some(r#"{"text":"hi"}"#), None, "", 7)),
            ("n2".to_string(), encode_note("u2", None, None, "b", 9)),
            ("bad".to_string(), "not json".to_string()),
        ];
        let notes = notes.into_iter().map(|(k, v)| (k.into_bytes(), v.into_bytes())).collect();
        let meta = vec![(b"completed".to_vec(), b"1".to_vec()), (b"completed_by".to_vec(), b"u1".to_vec())];
        let (stored, skipped) = parse_paper("p1", notes, meta);
        assert_eq!(skipped, 1);
        assert_eq!(stored.notes.len(), 2);
        assert_eq!(stored.notes[0].1.data.as_deref(), Some(r#"{"text":"hi"}"#));
        assert_eq!(stored.notes[0].1.v, 7);
        assert_eq!(stored.notes[1].1.data, None);
        assert_eq!(&*stored.notes[1].1.node, "b");
        assert_eq!(stored.completed_by.as_deref(), Some("u1"));
    }

    #[test]
    fn foreign_values_are_skipped_by_the_rules_of_protocol_2() {
        let read = |s: &[u8]| read_note(s).map(|n| n.v);
        assert_eq!(read(br#"{"author":"a","data":{},"v":9007199254740991}"#), Some(MAX_VERSION));
        for bad in [
            &br#"{"author":"a","data":{},"v":9007199254740992}"#[..],
            br#"{"author":"a","data":{},"v":18446744073709551615}"#,
            br#"{"author":"a","data":{},"v":0}"#,
            br#"{"author":"a","data":{},"v":-1}"#,
            br#"{"author":"a","data":{},"v":1.5}"#,
            br#"{"author":"a","data":{},"v":"x"}"#,
            br#"{"author":"a","data":[1],"v":5}"#,
            b"{\"author\":\"a\",\"data\":{\"t\":\"\xff\"},\"v\":5}",
            b"not json",
        ] {
            assert_eq!(read(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(read(br#"{"deleted":true,"node":"b","v":3}"#), Some(3));
    }
}
