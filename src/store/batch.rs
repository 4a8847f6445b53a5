//! A batch of ops grouped for one pipeline: per paper, its note writes (the
//! last whole write of each note only: the earlier ones are older versions of
//! it; patches each), its last cover, its completion; and the ops only relayed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::codec::{encode_cover, encode_note};
use super::{Op, Queued};

/// Ops taken from the backlog for one pipeline.
pub const MAX_BATCH: usize = 2048;
/// What one paper's script call may carry (PROTOCOL.md 4, 1.2: every call does a
/// bounded amount of work): at most `CALL_OPS` ops, and at most `CALL_BYTES` of
/// work, counted as the bytes of what it writes plus, for each note it touches,
/// the largest stored note it may have to read and write back (`Budget`). The
/// write script reads each note once per call, so that is its cost: about 5 ms
/// of Redis time at most on a 2-core machine. Ops past it wait for the next
/// batch, in their order; other papers' ops go meanwhile.
pub const CALL_OPS: usize = 256;
pub const CALL_BYTES: usize = 192 * 1024;
/// The same for a whole pipeline: Redis serves other clients between its calls,
/// but every op in it waits for the last reply.
pub const BATCH_BYTES: usize = 512 * 1024;
/// How the work of a call is counted. A patch parses the note it changes: at
/// most `note_read` bytes (the largest note, with its field versions:
/// PROTOCOL.md 2, 1.2), once per call. A whole write (an upsert or a delete)
/// only reads the stored value's end to compare versions, unless that looks
/// newer: `note_scan`.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub note_read: usize,
    pub note_scan: usize,
}

impl Budget {
    /// For notes of at most `max_note_bytes`: their data, field versions of
    /// fields still there (about as many bytes again), and the removed fields'
    /// versions a note keeps (a fixed part).
    pub fn for_notes(max_note_bytes: usize) -> Budget {
        let note_read = 2 * max_note_bytes + 8 * 1024;
        Budget { note_read, note_scan: note_read / 8 }
    }

    /// The work `op` adds to its paper's call; `first_touch` when it is the
    /// call's first op on its note.
    pub fn cost(&self, op: &Op, first_touch: bool) -> usize {
        let touch = |read: usize| if first_touch { read } else { 0 };
        match op {
            Op::Patch { .. } => op.bytes() + touch(self.note_read),
            Op::Note { .. } | Op::Cover { .. } => op.bytes() + touch(self.note_scan),
            // The seal reads the whole paper: it goes alone.
            Op::Complete { .. } => CALL_BYTES,
            Op::Prune { .. } => 1024,
            // An erase deletes the paper's keys: as much work as a seal.
            Op::Erase { .. } => CALL_BYTES,
            Op::Relay { .. } | Op::Revoke { .. } => op.bytes(),
        }
    }
}

/// Which of `held` go in the next batch, within the budgets (a batch of at most
/// `MAX_BATCH` ops and `BATCH_BYTES`, each paper's call within `CALL_OPS` and
/// `CALL_BYTES`), of papers that are `ready`. First the oldest op of every
/// paper, so that no paper waits behind another's backlog (a client that sent
/// its whole allowance of 16 KiB notes); then the rest, oldest first. A paper
/// stops at the first op it cannot take, so its ops stay in order. A `suspect`
/// paper goes alone, one op at a time, when its op is the first ready.
pub fn select(
    held: &[Queued],
    budget: &Budget,
    mut ready: impl FnMut(&Arc<str>) -> bool,
    suspect: impl Fn(&str) -> bool,
) -> Vec<bool> {
    let mut batch = Selection { take: vec![false; held.len()], calls: HashMap::new(), bytes: 0, count: 0 };
    let mut skipped: HashSet<&str> = HashSet::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for (i, queued) in held.iter().enumerate() {
        let paper = queued.op.paper();
        if batch.count >= MAX_BATCH {
            break;
        }
        if skipped.contains(&**paper) || seen.contains(&**paper) {
            continue;
        }
        if !ready(paper) {
            skipped.insert(paper);
            continue;
        }
        if suspect(paper) {
            if batch.count == 0 {
                batch.take[i] = true;
                return batch.take;
            }
            // Its turn comes when it is first.
            skipped.insert(paper);
            continue;
        }
        seen.insert(paper);
        batch.try_take(i, queued, budget);
    }
    for (i, queued) in held.iter().enumerate() {
        if batch.count >= MAX_BATCH {
            break;
        }
        if !batch.take[i] && seen.contains(&**queued.op.paper()) {
            batch.try_take(i, queued, budget);
        }
    }
    batch.take
}

/// A batch being chosen: which ops it takes, each paper's call, its totals.
struct Selection<'a> {
    take: Vec<bool>,
    calls: HashMap<&'a str, Call<'a>>,
    bytes: usize,
    count: usize,
}

/// One paper's script call being filled.
struct Call<'a> {
    ops: usize,
    bytes: usize,
    notes: HashSet<&'a str>,
    /// An op of the paper did not fit: none after it may go either.
    closed: bool,
}

impl<'a> Selection<'a> {
    fn try_take(&mut self, i: usize, queued: &'a Queued, budget: &Budget) {
        let call = self.calls.entry(queued.op.paper()).or_insert_with(|| Call {
            ops: 0,
            bytes: 0,
            notes: HashSet::new(),
            closed: false,
        });
        if call.closed {
            return;
        }
        let note = match &queued.op {
            Op::Note { id, .. } | Op::Patch { id, .. } => Some(&**id),
            _ => None,
        };
        // An erase or a revocation goes in a call of its own: what the paper's
        // ops before it did is written first, what came after it goes next,
        // so that each is reported as what Redis made of it.
        let alone = matches!(queued.op, Op::Erase { .. } | Op::Revoke { .. });
        if alone && call.ops > 0 {
            call.closed = true;
            return;
        }
        let first_touch = note.is_none_or(|id| !call.notes.contains(id));
        let cost = budget.cost(&queued.op, first_touch);
        let fits_call = call.ops == 0 || (call.ops < CALL_OPS && call.bytes + cost <= CALL_BYTES);
        let fits_batch = self.count == 0 || self.bytes + cost <= BATCH_BYTES;
        if !(fits_call && fits_batch) {
            call.closed = true;
            return;
        }
        call.ops += 1;
        call.bytes += cost;
        call.closed = alone;
        if let Some(id) = note {
            call.notes.insert(id);
        }
        self.bytes += cost;
        self.count += 1;
        self.take[i] = true;
    }
}

pub struct PaperWrites<'a> {
    pub paper: &'a str,
    /// Note id -> index in `notes`.
    index: HashMap<&'a str, usize>,
    pub notes: Vec<NoteWrite<'a>>,
    /// The last cover of the batch, and every op of it.
    pub cover: Option<CoverWrite<'a>>,
    /// A completion: its op, and who completes.
    pub complete: Option<(usize, &'a str)>,
    /// An erase or a revocation: alone in its paper's call (`select`).
    pub alone: Option<usize>,
    /// Ops that only ask for the tombstones past retention to go: the note
    /// script prunes at every call, with notes to write or without.
    pub prune: Vec<usize>,
}
impl PaperWrites<'_> {
    /// Every op of the paper in this batch.
    pub fn ops(&self) -> Vec<usize> {
        let notes = self.notes.iter().flat_map(|n| n.ops.iter().copied());
        let cover = self.cover.iter().flat_map(|c| c.ops.iter().copied());
        let complete = self.complete.map(|(i, _)| i);
        notes.chain(cover).chain(complete).chain(self.alone).chain(self.prune.iter().copied()).collect()
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
                    alone: None,
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
                            let (v, node) = (note.v, &*note.node);
                            let entry = NoteWrite { kind: WHOLE, id, value, v, node, relay, held: 0, ops: vec![i] };
                            writes.notes.push(entry);
                        }
                    }
                }
                Op::Patch { id, patch, v, node, held, relay, .. } => {
                    writes.index.insert(id, writes.notes.len());
                    let relay = relay.as_deref().unwrap_or_default();
                    let value = patch.to_string();
                    let held = *held;
                    writes.notes.push(NoteWrite { kind: PATCH, id, value, v: *v, node, relay, held, ops: vec![i] });
                }
                Op::Cover { cover, relay, .. } => {
                    let value = encode_cover(cover.data.as_deref().unwrap_or("{}"), &cover.node, cover.v);
                    let relay = relay.as_deref().unwrap_or_default();
                    let mut ops = writes.cover.take().map_or_else(Vec::new, |c| c.ops);
                    ops.push(i);
                    writes.cover = Some(CoverWrite { value, v: cover.v, node: &cover.node, relay, ops });
                }
                Op::Complete { by, .. } => writes.complete = Some((i, by)),
                Op::Prune { .. } => writes.prune.push(i),
                Op::Erase { .. } | Op::Revoke { .. } => writes.alone = Some(i),
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
    /// A patch's note version as its node held it (0 for a whole write).
    pub held: u64,
    pub ops: Vec<usize>,
}

/// The last cover of a paper in a batch (the earlier ones are older versions
/// of it), and every op of it.
pub struct CoverWrite<'a> {
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::store::Origin;

    fn patch(paper: &str, id: &str, bytes: usize) -> Queued {
        let origin = Origin { loop_index: 0, conn: 0, serial: 0 };
        let patch = format!(r#"{{"t":"{}"}}"#, "x".repeat(bytes)).into_boxed_str();
        let op = Op::Patch {
            paper: Arc::from(paper),
            id: Arc::from(id),
            patch,
            v: 1,
            node: Arc::from(""),
            held: 1,
            origin,
            reference: None,
            relay: None,
        };
        Queued { bytes: op.bytes(), op, at: Instant::now() }
    }

    fn taken(held: &[Queued], take: &[bool]) -> Vec<(String, String)> {
        let ids = held.iter().zip(take).filter(|(_, t)| **t);
        ids.map(|(q, _)| match &q.op {
            Op::Patch { paper, id, .. } => (paper.to_string(), id.to_string()),
            _ => unreachable!(),
        })
        .collect()
    }

    #[test]
    fn a_paper_with_many_large_patches_takes_one_call_and_the_others_go_on() {
        let budget = Budget::for_notes(16 * 1024);
        let mut held: Vec<Queued> = (0..2048).map(|_| patch("hog", "n", 16_000)).collect();
        held.push(patch("other", "m", 10));
        let take = select(&held, &budget, |_| true, |_| false);
        let taken = taken(&held, &take);
        let hog = taken.iter().filter(|(p, _)| p == "hog").count();
        // One read of the note, then each patch's bytes: about eleven fit in 192 KiB.
        assert!((2..=12).contains(&hog), "{hog} patches of 16 KB in one call");
        assert!(take[..hog].iter().all(|t| *t), "the hog's first ops, in order");
        assert!(taken.contains(&("other".into(), "m".into())), "another paper's op is not held up");
    }

    #[test]
    fn a_call_touches_a_bounded_number_of_notes_and_ops() {
        let budget = Budget::for_notes(16 * 1024);
        let held: Vec<Queued> = (0..1000).map(|i| patch("p", &format!("n{i}"), 10)).collect();
        let touched = select(&held, &budget, |_| true, |_| false).iter().filter(|t| **t).count();
        assert!(touched * budget.note_read <= CALL_BYTES + budget.note_read, "{touched} notes read in one call");
        let held: Vec<Queued> = (0..1000).map(|_| patch("p", "n", 10)).collect();
        let ops = select(&held, &budget, |_| true, |_| false).iter().filter(|t| **t).count();
        assert_eq!(ops, CALL_OPS);
    }

    #[test]
    fn every_paper_s_oldest_op_goes_before_another_paper_s_backlog() {
        let budget = Budget::for_notes(16 * 1024);
        // Hogs whose backlog alone fills many batches, then one small edit.
        let mut held: Vec<Queued> = Vec::new();
        for hog in 0..6 {
            held.extend((0..20).map(|i| patch(&format!("hog{hog}"), &format!("n{i}"), 16_000)));
        }
        held.push(patch("honest", "m", 10));
        let take = select(&held, &budget, |_| true, |_| false);
        assert!(take[held.len() - 1], "the honest paper's op waits behind others' backlogs");
        let taken = taken(&held, &take);
        let hog0 = taken.iter().filter(|(p, _)| p == "hog0").count();
        assert!(hog0 >= 1 && take[..hog0].iter().all(|t| *t), "each paper's ops in order");
    }

    #[test]
    fn a_suspect_paper_goes_alone_one_op_at_a_time() {
        let budget = Budget::for_notes(16 * 1024);
        let held = vec![patch("s", "a", 10), patch("p", "b", 10), patch("s", "c", 10), patch("p", "d", 10)];
        let take = select(&held, &budget, |_| true, |paper| paper == "s");
        assert_eq!(take, [true, false, false, false]);
        let rest = &held[1..];
        let take = select(rest, &budget, |_| true, |paper| paper == "s");
        assert_eq!(take, [true, false, true], "the suspect waits for its turn to be first");
        // A paper that is held back is skipped whole; the others go.
        let take = select(&held, &budget, |paper| &**paper != "s", |_| false);
        assert_eq!(take, [false, true, false, true]);
    }
}
