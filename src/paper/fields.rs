//! Field-level last-writer-wins (PROTOCOL.md 2, 1.1): every top-level field of
//! a note's `data` has a version; an upsert gives every field its version, a
//! patch only the fields it names, and each field keeps the greater (version,
//! node) whatever the order in which changes arrive, so every node converges.
//!
//! 1.2, bounded field versions: a removed field keeps its version only while it
//! is among the note's newest removals ([`MAX_REMOVED`] of them, with at most
//! [`MAX_REMOVED_KEY_BYTES`] of keys); older ones fold into the note's floor,
//! which a field the note does not have is taken to be at. The write script
//! (`src/store/scripts/write_notes.lua`) follows the same rule step by step, so
//! that Redis and every node hold the same note.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::value::RawValue;

use super::clock::newer;
use super::Note;
use crate::protocol::FieldVersions;

/// Removed fields whose versions a note keeps at most (PROTOCOL.md 2, 1.2).
pub const MAX_REMOVED: usize = 64;
/// The bytes of their keys a note keeps at most, counted as stored (JSON strings,
/// quotes included): a key can be long, and the overhead must stay fixed.
pub const MAX_REMOVED_KEY_BYTES: usize = 4096;

/// A note's data as its fields, raw.
type Fields = BTreeMap<String, Box<RawValue>>;

/// A version and the node that wrote it (ties go to the greater node).
type Version = (u64, Arc<str>);

/// The fields of a patch, raw; `None` removes one.
pub type PatchFields = Vec<(String, Option<Box<RawValue>>)>;

fn fields_of(data: &str) -> Fields {
    serde_json::from_str(data).unwrap_or_default()
}

fn encode(fields: &Fields) -> Arc<str> {
    Arc::from(serde_json::to_string(fields).expect("raw values serialize"))
}

fn is_newer(a: &Version, b: &Version) -> bool {
    newer((a.0, &a.1), (b.0, &b.1))
}

/// The version of field `key` of a live note whose fields are `data`: its own
/// once a patch changed it, else its last upsert's; a field the note does not
/// have is at the floor when that is higher (its removal may be folded into it).
fn version_of<'a>(note: &'a Note, data: &Fields, key: &str) -> (u64, &'a str) {
    let Some(fv) = &note.fields else { return (note.v, &note.node) };
    if let Some((v, node)) = fv.changed.get(key) {
        return (*v, node);
    }
    match &fv.floor {
        Some(floor) if !data.contains_key(key) && is_newer(floor, &fv.base) => (floor.0, &floor.1),
        _ => (fv.base.0, &fv.base.1),
    }
}

/// The base (last upsert) version of a live note.
pub fn base_of(note: &Note) -> (u64, &str) {
    note.fields.as_ref().map_or((note.v, &note.node), |fv| (fv.base.0, &fv.base.1))
}

/// The note after an upsert `new` reaches a live note `current` with field
/// versions; `None` when it changes nothing (every field is newer already).
/// The floor stays while it is above the upsert.
pub fn merge_upsert(current: &Note, new: &Note) -> Option<Note> {
    let fv = current.fields.as_ref()?;
    if !newer((new.v, &new.node), (fv.base.0, &fv.base.1)) {
        return None;
    }
    let mut data = fields_of(new.data.as_deref()?);
    let current_data = fields_of(current.data.as_deref().unwrap_or("{}"));
    let mut changed = BTreeMap::new();
    for (key, (v, node)) in &fv.changed {
        // A field a patch set after this upsert keeps its value (or its removal).
        if newer((*v, node), (new.v, &new.node)) {
            match current_data.get(key) {
                Some(value) => data.insert(key.clone(), value.clone()),
                None => data.remove(key),
            };
            changed.insert(key.clone(), (*v, node.clone()));
        }
    }
    let base = (new.v, new.node.clone());
    Some(with_versions(new.author.clone(), &data, base, changed, fv.floor.clone()))
}

/// A note built from its fields and versions, removed fields folded; its `v`
/// is the greatest of its versions, the floor's included.
fn with_versions(
    author: Arc<str>,
    data: &Fields,
    base: Version,
    mut changed: BTreeMap<String, Version>,
    floor: Option<Version>,
) -> Note {
    let mut floor = floor.filter(|floor| is_newer(floor, &base));
    fold(data, &mut changed, &mut floor);
    let (v, node) = changed.values().chain(&floor).fold(base.clone(), |best, version| {
        if is_newer(version, &best) {
            version.clone()
        } else {
            best
        }
    });
    let fields = (!changed.is_empty() || floor.is_some()).then(|| Arc::new(FieldVersions { base, changed, floor }));
    Note { author, data: Some(encode(data)), v, node, fields }
}

/// A key's bytes as the note stores it: a JSON string, quotes included (as
/// serde_json escapes it, which is what the write script sees and counts).
fn stored_len(key: &str) -> usize {
    2 + key
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// Folds the versions of removed fields (those in `changed` that `data` lacks)
/// into `floor` (PROTOCOL.md 2, 1.2): by (version, node), the oldest go until
/// at most [`MAX_REMOVED`] remain with at most [`MAX_REMOVED_KEY_BYTES`] of keys,
/// and the floor rises to the greatest that went; one at or below the floor
/// tells nothing the floor does not, and goes too. So removals of one version
/// go together (the floor reaches them all at once), and which ones go does not
/// depend on their keys' order: the write script gets the same result.
fn fold(data: &Fields, changed: &mut BTreeMap<String, Version>, floor: &mut Option<Version>) {
    let at_or_below =
        |version: &Version, floor: &Option<Version>| floor.as_ref().is_some_and(|f| !is_newer(version, f));
    let mut removed: Vec<(&String, &Version)> = changed.iter().filter(|(key, _)| !data.contains_key(*key)).collect();
    let mut count = removed.len();
    let mut bytes: usize = removed.iter().map(|(key, _)| stored_len(key)).sum();
    let within = |count: usize, bytes: usize| count <= MAX_REMOVED && bytes <= MAX_REMOVED_KEY_BYTES;
    if within(count, bytes) && !removed.iter().any(|(_, version)| at_or_below(version, floor)) {
        return;
    }
    removed.sort_unstable_by(|a, b| (a.1 .0, &a.1 .1).cmp(&(b.1 .0, &b.1 .1)));
    let mut new_floor = floor.clone();
    let mut dropped = Vec::new();
    let mut i = 0;
    while i < removed.len() {
        let version = removed[i].1;
        let end = i + removed[i..].iter().take_while(|(_, v)| *v == version).count();
        if !at_or_below(version, &new_floor) {
            if within(count, bytes) {
                break;
            }
            new_floor = Some(version.clone());
        }
        for (key, _) in &removed[i..end] {
            count -= 1;
            bytes -= stored_len(key);
            dropped.push((*key).clone());
        }
        i = end;
    }
    for key in dropped {
        changed.remove(&key);
    }
    *floor = new_floor;
}

/// A patch of `fields` (a `null` removes one) at version (`v`, `node`) on a live
/// note: the note after it and the fields it advanced, or `None` when it
/// advances none. A field the note does not have at or below its floor is not
/// advanced (PROTOCOL.md 2, 1.2).
pub fn merge_patch(
    current: &Note,
    fields: &[(String, Option<Box<RawValue>>)],
    v: u64,
    node: &Arc<str>,
) -> Option<(Note, PatchFields)> {
    current.data.as_ref()?;
    let mut data = fields_of(current.data.as_deref().unwrap_or("{}"));
    let (base, mut changed, floor) = match &current.fields {
        Some(fv) => (fv.base.clone(), fv.changed.clone(), fv.floor.clone()),
        None => ((current.v, current.node.clone()), BTreeMap::new(), None),
    };
    let mut advanced = Vec::new();
    for (key, value) in fields {
        let (fv, fnode) = version_of(current, &data, key);
        if !newer((v, node), (fv, fnode)) {
            continue;
        }
        match value {
            Some(value) => data.insert(key.clone(), value.clone()),
            None => data.remove(key),
        };
        changed.insert(key.clone(), (v, node.clone()));
        advanced.push((key.clone(), value.clone()));
    }
    if advanced.is_empty() {
        return None;
    }
    Some((with_versions(current.author.clone(), &data, base, changed, floor), advanced))
}

/// The `data` of a patch message: the advanced fields, `null` for removals.
pub fn patch_data(advanced: &[(String, Option<Box<RawValue>>)]) -> String {
    let map: BTreeMap<&str, Option<&RawValue>> = advanced.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
    serde_json::to_string(&map).expect("raw values serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(data: &str, v: u64) -> Note {
        Note { author: Arc::from("a"), data: Some(Arc::from(data)), v, node: Arc::from(""), fields: None }
    }

    fn patch(pairs: &[(&str, Option<&str>)]) -> Vec<(String, Option<Box<RawValue>>)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.map(|v| RawValue::from_string(v.to_string()).unwrap()))).collect()
    }

    fn data(n: &Note) -> serde_json::Value {
        serde_json::from_str(n.data.as_deref().unwrap()).unwrap()
    }

    #[test]
    fn patches_of_different_fields_both_survive_in_any_order() {
        let n = Arc::from("");
        let start = note(r#"{"x":1,"t":"hi"}"#, 10);
        let drag = patch(&[("x", Some("5"))]);
        let typing = patch(&[("t", Some("\"hello\""))]);
        let (a, _) = merge_patch(&start, &drag, 12, &n).unwrap();
        let (a, _) = merge_patch(&a, &typing, 11, &n).unwrap();
        let (b, _) = merge_patch(&start, &typing, 11, &n).unwrap();
        let (b, _) = merge_patch(&b, &drag, 12, &n).unwrap();
        assert_eq!(data(&a), serde_json::json!({"x":5,"t":"hello"}));
        assert_eq!(a, b);
        assert_eq!(a.v, 12);
    }

    #[test]
    fn the_same_field_keeps_the_greater_version() {
        let n = Arc::from("");
        let start = note(r#"{"x":1}"#, 10);
        let (a, _) = merge_patch(&start, &patch(&[("x", Some("2"))]), 12, &n).unwrap();
        assert!(merge_patch(&a, &patch(&[("x", Some("3"))]), 11, &n).is_none(), "older: not advanced");
        let (removed, advanced) = merge_patch(&a, &patch(&[("x", None)]), 13, &n).unwrap();
        assert_eq!(data(&removed), serde_json::json!({}));
        assert_eq!(patch_data(&advanced), r#"{"x":null}"#);
        assert!(merge_patch(&removed, &patch(&[("x", Some("9"))]), 12, &n).is_none(), "the removal is newer");
    }

    fn removal(keys: impl IntoIterator<Item = String>) -> Vec<(String, Option<Box<RawValue>>)> {
        keys.into_iter().map(|k| (k, None)).collect()
    }

    fn floor(n: &Note) -> Option<(u64, &str)> {
        n.fields.as_ref()?.floor.as_ref().map(|(v, node)| (*v, &**node))
    }

    fn removed(n: &Note) -> usize {
        let data: Fields = fields_of(n.data.as_deref().unwrap());
        n.fields.as_ref().map_or(0, |fv| fv.changed.keys().filter(|k| !data.contains_key(*k)).count())
    }

    #[test]
    fn removing_many_new_fields_at_once_folds_them_all_into_the_floor() {
        let n = Arc::from("a");
        let start = note(r#"{"text":"hi"}"#, 10);
        let keys = (0..225).map(|i| format!("{i:x>64}"));
        let (churned, advanced) = merge_patch(&start, &removal(keys), 11, &n).unwrap();
        assert_eq!(advanced.len(), 225, "members are sent every field");
        assert_eq!(data(&churned), serde_json::json!({"text": "hi"}));
        assert_eq!((floor(&churned), removed(&churned)), (Some((11, "a")), 0), "one version goes whole");
        assert_eq!((churned.v, &*churned.node), (11, "a"), "v stays the greatest, the floor's");
        // A field the note does not have, at or below the floor, is not applied;
        // above it, it is.
        let set = patch(&[(&format!("{:x>64}", 7), Some("1"))]);
        assert!(merge_patch(&churned, &set, 11, &Arc::from("")).is_none());
        assert!(merge_patch(&churned, &patch(&[("new", Some("1"))]), 10, &n).is_none());
        let (back, _) = merge_patch(&churned, &set, 12, &n).unwrap();
        assert_eq!(data(&back)[format!("{:x>64}", 7)], 1);
        // A field the note has is still weighed against its own version.
        let (text, _) = merge_patch(&churned, &patch(&[("text", Some("\"late\""))]), 10, &Arc::from("z")).unwrap();
        assert_eq!(data(&text)["text"], "late");
    }

    #[test]
    fn a_note_keeps_the_newest_64_removed_versions() {
        let n = Arc::from("");
        let mut current = note(r#"{"text":"hi"}"#, 10);
        for i in 0..70u64 {
            current = merge_patch(&current, &removal([format!("k{i}")]), 11 + i, &n).unwrap().0;
        }
        // k0..k5 (11..=16) went, the floor is the greatest of them.
        assert_eq!((removed(&current), floor(&current)), (MAX_REMOVED, Some((16, ""))));
        let fv = current.fields.as_deref().unwrap();
        assert!(!fv.changed.contains_key("k5") && fv.changed.contains_key("k6"));
        assert_eq!(current.v, 80);
        // k3 removed at 14 is under the floor: a late set at 15 stays out, as
        // it would have against the removal; k6 removed at 17 keeps its own.
        assert!(merge_patch(&current, &patch(&[("k3", Some("1"))]), 15, &n).is_none());
        assert!(merge_patch(&current, &patch(&[("k6", Some("1"))]), 16, &n).is_none());
        assert!(merge_patch(&current, &patch(&[("k6", Some("1"))]), 18, &n).is_some());
        // A late removal of a field the note has, at or below the floor, leaves
        // no version behind: the floor already says it.
        let (gone, _) = merge_patch(&current, &patch(&[("text", None)]), 12, &n).unwrap();
        assert_eq!(data(&gone), serde_json::json!({}));
        assert!(!gone.fields.as_deref().unwrap().changed.contains_key("text"));
        assert_eq!(removed(&gone), MAX_REMOVED);
    }

    #[test]
    fn long_keys_are_kept_within_their_bytes() {
        let n = Arc::from("");
        let mut current = note("{}", 10);
        for i in 0..50u64 {
            current = merge_patch(&current, &removal([format!("{i:y>100}")]), 11 + i, &n).unwrap().0;
        }
        // 102 bytes a key as stored: 40 of them fit in 4,096.
        assert_eq!((removed(&current), floor(&current)), (40, Some((20, ""))));
        assert_eq!(stored_len("a\"b\n\u{1}"), 2 + 1 + 2 + 1 + 2 + 6);
    }

    #[test]
    fn an_upsert_keeps_the_floor_only_while_it_is_above() {
        let n: Arc<str> = Arc::from("");
        let start = note(r#"{"t":"a"}"#, 10);
        let (churned, _) = merge_patch(&start, &removal((0..100).map(|i| format!("k{i}"))), 20, &n).unwrap();
        assert_eq!(floor(&churned), Some((20, "")));
        let older = merge_upsert(&churned, &note(r#"{"t":"b"}"#, 15)).unwrap();
        assert_eq!((data(&older), floor(&older), older.v), (serde_json::json!({"t":"b"}), Some((20, "")), 20));
        assert!(merge_patch(&older, &patch(&[("k1", Some("1"))]), 19, &n).is_none(), "still folded");
        assert!(merge_patch(&older, &patch(&[("t", Some("1"))]), 16, &n).is_some(), "t is at 15");
        let newer = merge_upsert(&older, &note(r#"{"t":"c"}"#, 25)).unwrap();
        assert_eq!((newer.fields, newer.v), (None, 25));
    }

    #[test]
    fn the_write_script_folds_with_the_same_limits() {
        let script = include_str!("../store/scripts/write_notes.lua");
        assert!(script.contains(&format!("local MAX_REMOVED = {MAX_REMOVED}\n")));
        assert!(script.contains(&format!("local MAX_REMOVED_KEY_BYTES = {MAX_REMOVED_KEY_BYTES}\n")));
    }

    #[test]
    fn an_upsert_keeps_fields_patched_after_it() {
        let n: Arc<str> = Arc::from("");
        let start = note(r#"{"x":1,"t":"a"}"#, 10);
        let (patched, _) = merge_patch(&start, &patch(&[("x", Some("7"))]), 13, &n).unwrap();
        let upsert = note(r#"{"x":2,"t":"b","c":1}"#, 12);
        let merged = merge_upsert(&patched, &upsert).unwrap();
        assert_eq!(data(&merged), serde_json::json!({"x":7,"t":"b","c":1}));
        assert_eq!(merged.v, 13);
        // In the other order the upsert applies whole, then the newer patch.
        let (other, _) = merge_patch(&upsert, &patch(&[("x", Some("7"))]), 13, &n).unwrap();
        assert_eq!(data(&other), data(&merged));
        let newest = note(r#"{"t":"c"}"#, 14);
        let replaced = merge_upsert(&merged, &newest).unwrap();
        assert_eq!(data(&replaced), serde_json::json!({"t":"c"}));
        assert!(replaced.fields.is_none());
    }
}
