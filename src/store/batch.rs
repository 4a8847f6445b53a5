//! A batch of ops grouped for one pipeline: per paper, its note writes (the
//! last whole write of each note only: the earlier ones are older versions of
//! it; patches each), its last cover, its completion; and the ops only relayed.

use std::collections::HashMap;

use super::codec::{encode_cover, encode_note};
use super::{Op, Queued};

pub struct PaperWrites<'a> {
    pub paper: &'a str,
    /// Note id -> index in `notes`.
    index: HashMap<&'a str, usize>,
    pub notes: Vec<NoteWrite<'a>>,
    /// The last cover of the batch (value, v, node, relay) and every op of it.
    pub cover: Option<(String, u64, &'a str, &'a str, Vec<usize>)>,
    pub complete: Option<(usize, &'a str)>,
    /// Ops that only ask for the tombstones past retention to go: the note
    /// script prunes at every call, with notes to write or without.
    pub prune: Vec<usize>,
}
impl PaperWrites<'_> {
    /// Every op of the paper in this batch.
    pub fn ops(&self) -> Vec<usize> {
        let notes = self.notes.iter().flat_map(|n| n.ops.iter().copied());
        let cover = self.cover.iter().flat_map(|c| c.4.iter().copied());
        notes.chain(cover).chain(self.complete.map(|(i, _)| i)).chain(self.prune.iter().copied()).collect()
    }

    /// Whether the note script runs for the paper: notes to write, or tombstones to drop.
    pub fn runs_note_script(&self) -> bool {
        !self.notes.is_empty() || !self.prune.is_empty()
    }
}

/// The batch grouped by paper, and the ops that are only relayed, in order.
pub struct Plan<'a> {
    pub papers: Vec<PaperWrites<'a>>,
    pub relays: Vec<usize>,
}

impl<'a> Plan<'a> {
    /// Groups the ops of `batch` that are not `done` yet.
    pub fn of(batch: &'a [Queued], done: impl Fn(usize) -> bool) -> Plan<'a> {
        let mut papers: Vec<PaperWrites> = Vec::new();
        let mut by_paper: HashMap<&str, usize> = HashMap::new();
        let mut relays = Vec::new();
        for (i, Queued { op, .. }) in batch.iter().enumerate() {
            if done(i) {
                continue;
            }
            let at = *by_paper.entry(op.paper()).or_insert_with(|| {
                papers.push(PaperWrites {
                    paper: op.paper(),
                    index: HashMap::new(),
                    notes: Vec::new(),
                    cover: None,
                    complete: None,
                    prune: Vec::new(),
                });
                papers.len() - 1
            });
            let writes = &mut papers[at];
            match op {
                Op::Note { id, note, relay, .. } => {
                    let value =
                        encode_note(&note.author, note.data.as_deref(), note.fields.as_deref(), &note.node, note.v);
                    let relay = relay.as_deref().unwrap_or_default();
                    // A whole write replaces an earlier whole write of the note in
                    // the batch (an older version of it); patches are each sent.
                    match writes.index.get(&**id).filter(|&&slot| writes.notes[slot].kind == WHOLE) {
                        Some(&slot) => {
                            let entry = &mut writes.notes[slot];
                            (entry.value, entry.v, entry.node, entry.relay) = (value, note.v, &note.node, relay);
                            entry.ops.push(i);
                        }
                        None => {
                            writes.index.insert(id, writes.notes.len());
                            let entry =
                                NoteWrite { kind: WHOLE, id, value, v: note.v, node: &note.node, relay, ops: vec![i] };
                            writes.notes.push(entry);
                        }
                    }
                }
                Op::Patch { id, patch, v, node, relay, .. } => {
                    writes.index.insert(id, writes.notes.len());
                    let relay = relay.as_deref().unwrap_or_default();
                    let value = patch.to_string();
                    writes.notes.push(NoteWrite { kind: PATCH, id, value, v: *v, node, relay, ops: vec![i] });
                }
                Op::Cover { cover, relay, .. } => {
                    let value = encode_cover(cover.data.as_deref().unwrap_or("{}"), &cover.node, cover.v);
                    let relay = relay.as_deref().unwrap_or_default();
                    let mut ops = writes.cover.take().map_or_else(Vec::new, |c| c.4);
                    ops.push(i);
                    writes.cover = Some((value, cover.v, &cover.node, relay, ops));
                }
                Op::Complete { by, .. } => writes.complete = Some((i, by)),
                Op::Prune { .. } => writes.prune.push(i),
                Op::Relay { .. } => relays.push(i),
            }
        }
        Plan { papers, relays }
    }
}

/// The last write of one note in a batch (the earlier ones are older versions
/// of it), and every op of that note.
pub struct NoteWrite<'a> {
    /// `WHOLE` (an upsert or a delete) or `PATCH`.
    pub kind: &'static str,
    pub id: &'a str,
    pub value: String,
    pub v: u64,
    pub node: &'a str,
    /// The message relayed to the other nodes if Redis applies it ("" without).
    pub relay: &'a str,
    pub ops: Vec<usize>,
}

/// The kinds of note writes the write script takes.
const WHOLE: &str = "w";
const PATCH: &str = "p";
