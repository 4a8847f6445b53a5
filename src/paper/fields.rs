//! Field-level last-writer-wins (PROTOCOL.md 2, 1.1): every top-level field of
//! a note's `data` has a version; an upsert gives every field its version, a
//! patch only the fields it names, and each field keeps the greater (version,
//! node) whatever the order in which changes arrive, so every node converges.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::value::RawValue;

use super::clock::newer;
use super::Note;
use crate::protocol::FieldVersions;

/// A note's data as its fields, raw.
type Fields = BTreeMap<String, Box<RawValue>>;

/// The fields of a patch, raw; `None` removes one.
pub type PatchFields = Vec<(String, Option<Box<RawValue>>)>;

fn fields_of(data: &str) -> Fields {
    serde_json::from_str(data).unwrap_or_default()
}

fn encode(fields: &Fields) -> Arc<str> {
    Arc::from(serde_json::to_string(fields).expect("raw values serialize"))
}

/// The version of field `key` of a live note.
fn version_of<'a>(note: &'a Note, key: &str) -> (u64, &'a str) {
    match &note.fields {
        Some(fv) => fv.changed.get(key).map_or((fv.base.0, &fv.base.1), |(v, n)| (*v, n)),
        None => (note.v, &note.node),
    }
}

/// The base (last upsert) version of a live note.
pub fn base_of(note: &Note) -> (u64, &str) {
    note.fields.as_ref().map_or((note.v, &note.node), |fv| (fv.base.0, &fv.base.1))
}

/// The note after an upsert `new` reaches a live note `current` with field
/// versions; `None` when it changes nothing (every field is newer already).
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
    Some(with_versions(new.author.clone(), &data, (new.v, new.node.clone()), changed))
}

/// A note built from its fields and versions; its `v` is the greatest of them.
fn with_versions(
    author: Arc<str>,
    data: &Fields,
    base: (u64, Arc<str>),
    changed: BTreeMap<String, (u64, Arc<str>)>,
) -> Note {
    let (v, node) = changed.values().fold((base.0, base.1.clone()), |best, (v, n)| {
        if newer((*v, n), (best.0, &best.1)) {
            (*v, n.clone())
        } else {
            best
        }
    });
    let fields = (!changed.is_empty()).then(|| Arc::new(FieldVersions { base, changed }));
    Note { author, data: Some(encode(data)), v, node, fields }
}

/// A patch of `fields` (a `null` removes one) at version (`v`, `node`) on a live
/// note: the note after it and the fields it advanced, or `None` when it
/// advances none.
pub fn merge_patch(
    current: &Note,
    fields: &[(String, Option<Box<RawValue>>)],
    v: u64,
    node: &Arc<str>,
) -> Option<(Note, PatchFields)> {
    current.data.as_ref()?;
    let mut data = fields_of(current.data.as_deref().unwrap_or("{}"));
    let (base, mut changed) = match &current.fields {
        Some(fv) => (fv.base.clone(), fv.changed.clone()),
        None => ((current.v, current.node.clone()), BTreeMap::new()),
    };
    let mut advanced = Vec::new();
    for (key, value) in fields {
        let (fv, fnode) = version_of(current, key);
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
    Some((with_versions(current.author.clone(), &data, base, changed), advanced))
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
