//! What a member's message does (PROTOCOL.md 3.2 and 3.3): the paper decides
//! (rights, limits, version), the op goes to the store's backlog, the edit is
//! applied and fanned out once, and `saved` follows when the store reports the
//! write.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cluster::relay_of;
use super::conns::Conns;
use super::event_loop::EventLoop;
use super::session::Relaying;
use crate::auth::Role;
use crate::conn::Phase;
use crate::metrics::{In, LoopMetrics, Out};
use crate::paper::{clock, Health, Note, Paper, StoredPaper};
use crate::protocol::{self, ClientMsg, ErrorCode, Frame, Refusal};
use crate::store::{Effect, LoadPurpose, LoadRequest, NoteValue, Op, Origin, Outcome, StoreHandle, Submitted, Written};

impl EventLoop {
    pub(super) fn on_text(&mut self, key: usize, text: &str) {
        self.read_at = Instant::now();
        match protocol::parse_client_msg(text, self.node.settings.max_note_bytes) {
            Ok(msg) => self.on_message(key, msg),
            Err(refusal) => {
                self.metrics.message_in(In::Invalid);
                self.refuse(key, &refusal);
            }
        }
    }

    pub(super) fn refuse(&mut self, key: usize, refusal: &Refusal) {
        let metrics = &self.metrics;
        metrics.refusal(refusal.code);
        metrics.message_out(Out::Error, 1);
        let bytes = self.frame.error(refusal);
        self.conns.send(key, bytes);
    }

    fn on_message(&mut self, key: usize, msg: ClientMsg) {
        let Some(conn) = self.conns.slab.get(key) else { return };
        let Phase::Open { membership, .. } = &conn.phase else { return };
        let editor = Editor {
            paper: membership.paper.clone(),
            from: membership.member.clone(),
            user: membership.user.clone(),
            role: membership.role,
            origin: Origin { loop_index: self.index, conn: key, serial: conn.serial },
        };
        let metrics = &self.metrics;
        metrics.message_in(In::of(&msg));
        let (change, reference) = match msg {
            ClientMsg::Ping => {
                metrics.message_out(Out::Pong, 1);
                let pong = self.frame.pong();
                return self.conns.send(key, pong);
            }
            ClientMsg::Cursor { data } => {
                let Some(paper) = self.papers.paper(&editor.paper) else { return };
                let cursor = self.frame.cursor(&editor.from, &data);
                self.conns.fanout(paper.members(), Some(key), cursor, Out::Cursor, metrics);
                return self.relay_frame(&editor.paper, None, Relaying::Transient);
            }
            ClientMsg::Complete { reference } => return self.member_completes(key, &editor, reference),
            ClientMsg::Upsert { id, data, reference } => (Change::Upsert { id, data }, reference),
            ClientMsg::Delete { id, reference } => (Change::Delete { id }, reference),
            ClientMsg::Patch { id, data, reference } => (Change::Patch { id, data }, reference),
            ClientMsg::Meta { data, reference } => (Change::Meta { data }, reference),
        };
        match self.edit(&editor, change, reference.clone()) {
            Err(code) => self.refuse(key, &Refusal::from(code).with_ref(reference)),
            Ok(Edited::Queued(v)) => {
                if let Some(Phase::Open { membership, .. }) = self.conns.slab.get_mut(key).map(|c| &mut c.phase) {
                    membership.unresolved.push_back(v);
                }
            }
            Ok(Edited::Written(v)) => {
                let metrics = &self.metrics;
                saved_now(&mut self.frame, &mut self.conns, metrics, key, v);
            }
        }
    }

    /// One change to a paper, by a member or the backend API (PROTOCOL.md 3.2
    /// and 7): the paper decides (rights, limits, version), the frame is
    /// encoded once (and relayed with `--cluster`), the op goes to the store's
    /// backlog (refused `unavailable` when it is full), then the change is
    /// applied and fanned out to every member, the sender included.
    pub(super) fn edit(
        &mut self,
        editor: &Editor,
        change: Change,
        reference: Option<String>,
    ) -> Result<Edited, ErrorCode> {
        let Some(paper) = self.papers.paper_mut(&editor.paper) else { return Err(ErrorCode::Unavailable) };
        let limits = self.node.settings.limits;
        let metrics = &self.metrics;
        let (author, role, from, origin) = ((&editor.user, editor.role), editor.role, &*editor.from, editor.origin);
        let paper_id = editor.paper.clone();
        let reference_box = reference.as_deref().map(Box::from);
        match change {
            Change::Patch { id, data } => {
                let held = paper.note(&id).map_or(0, |n| n.v);
                let patch = paper.prepare_patch(&id, &data, author, &mut self.clock, &limits)?;
                let v = patch.v;
                // Only the fields it advances are applied and sent (all of them, for
                // a version from this clock: it is above every field's).
                let advanced = paper.patch_result(&patch).ok_or(ErrorCode::Unavailable)?;
                self.frame.patch(&patch.id, &advanced, v, from, reference.as_deref());
                let relay = relay_of(&self.node, &self.frame);
                let op = Op::Patch {
                    paper: paper_id,
                    id: patch.id.clone(),
                    patch: advanced.into_boxed_str(),
                    v,
                    node: patch.node.clone(),
                    held,
                    origin,
                    reference: reference_box,
                    relay,
                };
                let submitted = submit_edit(&self.store, paper, op)?;
                paper.apply_patch(&patch);
                self.conns.fanout(paper.members(), None, self.frame.bytes(), Out::Patch, metrics);
                Ok(submitted.edited(v))
            }
            Change::Meta { data } => {
                let cover = paper.prepare_cover(data, role, &mut self.clock)?;
                let v = cover.v;
                self.frame.meta(&cover.data, v, from, reference.as_deref());
                let relay = relay_of(&self.node, &self.frame);
                let stored = NoteValue {
                    author: Arc::from(""),
                    data: Some(cover.data.clone()),
                    v,
                    node: cover.node.clone(),
                    fields: None,
                };
                let op = Op::Cover { paper: paper_id, cover: stored, origin, reference: reference_box, relay };
                let submitted = submit_edit(&self.store, paper, op)?;
                paper.apply_cover(cover);
                self.conns.fanout(paper.members(), None, self.frame.bytes(), Out::Meta, metrics);
                Ok(submitted.edited(v))
            }
            Change::Upsert { .. } | Change::Delete { .. } => {
                let edit = match change {
                    Change::Upsert { id, data } => paper.prepare_upsert(&id, data, author, &mut self.clock, &limits)?,
                    Change::Delete { id } => paper.prepare_delete(&id, author, &mut self.clock)?,
                    _ => unreachable!(),
                };
                // What `apply` would not take is neither sent to the store nor broadcast.
                if !paper.can_apply(&edit) {
                    return Err(ErrorCode::Unavailable);
                }
                // Encoded before it is queued: with `--cluster` the same JSON is relayed.
                let v = edit.note.v;
                let kind = match &edit.note.data {
                    Some(data) => {
                        self.frame.upsert(&edit.id, &edit.note.author, data, v, from, reference.as_deref());
                        Out::Upsert
                    }
                    None => {
                        self.frame.delete(&edit.id, v, from, reference.as_deref());
                        Out::Delete
                    }
                };
                let relay = relay_of(&self.node, &self.frame);
                let note = super::stored::note_value(&edit.note);
                let op =
                    Op::Note { paper: paper_id, id: edit.id.clone(), note, origin, reference: reference_box, relay };
                let submitted = submit_edit(&self.store, paper, op)?;
                paper.apply(edit);
                if kind == Out::Delete {
                    paper.prune(clock::now_ms(), &limits);
                }
                self.conns.fanout(paper.members(), None, self.frame.bytes(), kind, metrics);
                metrics.edit_broadcast.observe(self.read_at.elapsed());
                Ok(submitted.edited(v))
            }
        }
    }

    /// A member's `complete`: sealed once Redis has sealed it.
    fn member_completes(&mut self, key: usize, editor: &Editor, reference: Option<String>) {
        let Some(paper) = self.papers.paper_mut(&editor.paper) else { return };
        if let Err(code) = paper.check_complete(editor.role) {
            return self.refuse(key, &Refusal::from(code).with_ref(reference));
        }
        if let Err(code) = self.complete(editor, reference.as_deref().map(Box::from)) {
            self.refuse(key, &Refusal::from(code).with_ref(reference));
        }
    }

    /// Hands a completion to the store: the paper is sealed once Redis has sealed
    /// it (edits from now on would lose the race), at once with the memory store.
    pub(super) fn complete(&mut self, editor: &Editor, reference: Option<Box<str>>) -> Result<Submitted, ErrorCode> {
        let Some(paper) = self.papers.paper_mut(&editor.paper) else { return Err(ErrorCode::Unavailable) };
        let op =
            Op::Complete { paper: editor.paper.clone(), by: editor.user.clone(), origin: editor.origin, reference };
        let submitted = self.store.submit(op);
        match submitted {
            Submitted::Full => return Err(ErrorCode::Unavailable),
            Submitted::Queued => {
                paper.unwritten += 1;
                paper.health = Health::Sealing;
            }
            Submitted::Written => {
                let notes = protocol::notes_json(paper.live_notes());
                if paper.complete(&editor.user).is_ok() {
                    log::info!("paper {} completed by {}", editor.paper, editor.user);
                    let completed = self.frame.completed(&editor.user, &notes);
                    let metrics = &self.metrics;
                    self.conns.fanout(paper.members(), None, completed, Out::Completed, metrics);
                }
            }
        }
        Ok(submitted)
    }

    /// What became of ops, in the order they were made: `saved` for what Redis
    /// holds (PROTOCOL.md 3.1, 1.1: once every earlier-made edit with a lower
    /// version is resolved too), `paper_completed` for an edit the seal beat,
    /// `write_failed` for what Redis refused for good, each with the edit's `ref`.
    pub(super) fn on_written(&mut self, written: Vec<Written>) {
        let mut touched = Vec::new();
        for w in written {
            if let Some(paper) = self.papers.paper_mut(&w.paper) {
                paper.written(w.note.as_ref());
            }
            if let (Outcome::Gone | Outcome::BelowHorizon, Some(note)) = (w.outcome, &w.note) {
                self.on_gone(&w.paper, note);
            }
            let (key, serial) = (w.origin.conn, w.origin.serial);
            let is_call = self.conns.live(key, serial).is_some_and(|c| matches!(c.phase, Phase::Api { .. }));
            // An erase or a revocation Redis holds is carried out here, whether
            // or not its call is still waiting for its answer.
            match (&w.effect, w.outcome) {
                (Some(Effect::Erased { for_ms }), Outcome::Saved) => {
                    self.erase_here(&w.paper, Duration::from_millis(*for_ms));
                }
                (Some(Effect::Revoked { user, until }), Outcome::Saved) => self.revoke_here(&w.paper, user, *until),
                _ => {}
            }
            if w.outcome == Outcome::Erased {
                // Erased by another node, whose relayed erase this node missed:
                // what Redis says is what this node does.
                self.erase_here(&w.paper, ERASED_HEARD.min(self.node.settings.erase_retention));
            }
            if is_call {
                self.call_written(key, &w);
                continue;
            }
            let Some(conn) = self.conns.slab.get_mut(key).filter(|c| c.serial == serial && !c.doomed) else {
                continue;
            };
            let Phase::Open { membership, .. } = &mut conn.phase else { continue };
            if w.v > 0 {
                if let Some(at) = membership.unresolved.iter().position(|&u| u == w.v) {
                    membership.unresolved.remove(at);
                }
            }
            let reference = w.reference.map(String::from);
            match w.outcome {
                Outcome::Saved if w.v > 0 => {
                    membership.confirmable = membership.confirmable.max(w.v);
                    if !touched.contains(&key) {
                        touched.push(key);
                    }
                }
                Outcome::Saved => {}
                Outcome::Sealed => self.refuse(key, &Refusal::from(ErrorCode::PaperCompleted).with_ref(reference)),
                Outcome::Failed => self.refuse(key, &Refusal::from(ErrorCode::WriteFailed).with_ref(reference)),
                Outcome::Gone => self.refuse(key, &Refusal::from(ErrorCode::NotFound).with_ref(reference)),
                Outcome::BelowHorizon | Outcome::Erased => {
                    self.refuse(key, &Refusal::from(ErrorCode::WriteFailed).with_ref(reference))
                }
            }
        }
        for key in touched {
            let Some(Phase::Open { membership, .. }) = self.conns.slab.get_mut(key).map(|c| &mut c.phase) else {
                continue;
            };
            let v = membership.confirmable;
            if v == 0 || membership.unresolved.iter().any(|&u| u <= v) {
                continue; // an earlier-made edit below it is not written yet
            }
            membership.confirmable = 0;
            self.metrics.message_out(Out::Saved, 1);
            let saved = self.frame.saved(v);
            self.conns.send(key, saved);
        }
    }

    /// Redis does not hold a note this node patched (another node deleted it,
    /// and the relayed delete may never come: its tombstone may be past the
    /// horizon already, or this node was cut from the relay meanwhile). The
    /// note goes here too, above every version it had, and the members are told.
    fn on_gone(&mut self, paper_id: &Arc<str>, id: &Arc<str>) {
        let Some(paper) = self.papers.paper_mut(paper_id) else { return };
        // No tombstone of a made-up version is kept: it could hide the note
        // written again elsewhere at a lower one. Members are told with the
        // version just above the one they last saw of it.
        let Some(v) = paper.forget_live(id) else { return };
        let bytes = self.frame.delete(id, v + 1, "", None);
        self.conns.fanout(paper.members(), None, bytes, Out::Delete, &self.metrics);
    }

    /// Redis sealed a paper: every member's view is replaced by the sealed notes.
    pub(super) fn on_sealed(&mut self, paper_id: &Arc<str>, by: &str, notes: &str, mine: bool) {
        let Some(paper) = self.papers.paper_mut(paper_id) else { return };
        if mine {
            paper.unwritten = paper.unwritten.saturating_sub(1);
        }
        let Some(sealed) = protocol::parse_notes(notes) else {
            log::error!("paper {paper_id} was sealed with notes this server cannot read");
            return;
        };
        let sealed = sealed
            .into_iter()
            .map(|n| {
                let note = Note {
                    author: Arc::from(&*n.author),
                    data: Some(Arc::from(n.data.get())),
                    v: n.v,
                    node: Arc::from(""),
                    fields: None,
                };
                (Arc::from(&*n.id), note)
            })
            .collect();
        let by: Arc<str> = Arc::from(by);
        if !paper.seal(&by, sealed) {
            return;
        }
        log::info!("paper {paper_id} completed by {by}");
        let completed = self.frame.completed(&by, notes);
        self.conns.fanout(paper.members(), None, completed, Out::Completed, &self.metrics);
    }

    /// Redis refused a paper's writes for good: it takes no edits until it can
    /// be read back (probed with backoff), and `/readyz` names it.
    pub(super) fn on_failed(&mut self, paper_id: &Arc<str>, error: String) {
        let Some(paper) = self.papers.paper_mut(paper_id) else { return };
        log::error!("paper {paper_id} cannot be written ({error}); its edits are refused until Redis takes them again");
        if !matches!(paper.health, Health::Failed(_)) {
            self.probes.push((Instant::now() + PROBE_FIRST, PROBE_FIRST, paper_id.clone()));
        }
        self.node.paper_failing(paper_id, Some(&error));
        paper.health = Health::Failed(error);
    }

    /// A failed paper read back from Redis: it takes edits again, and every member
    /// is sent the paper as Redis holds it (a full snapshot replaces its view).
    pub(super) fn on_probed(&mut self, paper_id: &Arc<str>, stored: StoredPaper) {
        let Some(paper) = self.papers.paper_mut(paper_id) else { return };
        if !matches!(paper.health, Health::Failed(_)) {
            return;
        }
        paper.replace(stored, &mut self.clock);
        self.node.paper_failing(paper_id, None);
        log::info!("paper {paper_id} is readable again; its members are sent it as Redis holds it");
        let members: Vec<(usize, Arc<str>)> = paper.members().iter().map(|m| (m.key, m.id.clone())).collect();
        // Members already joined get it whatever the bound: one body for them all.
        let Some(body) = self.paper_body(paper_id, false) else { return };
        for (key, you) in members {
            self.send_full_snapshot(key, paper_id, &you, &body);
            self.metrics.message_out(Out::Snapshot, 1);
        }
    }

    /// Reads failed papers again once their backoff is over.
    pub(super) fn run_probes(&mut self, now: Instant) {
        let due: Vec<(Duration, Arc<str>)> = {
            let mut due = Vec::new();
            self.probes.retain(|(at, backoff, paper)| {
                if *at <= now {
                    due.push((*backoff, paper.clone()));
                    false
                } else {
                    true
                }
            });
            due
        };
        for (backoff, paper_id) in due {
            let failed = self.papers.paper(&paper_id).is_some_and(|p| matches!(p.health, Health::Failed(_)));
            if !failed {
                continue;
            }
            // A short read: the loader is shared, and the next probe comes anyway.
            let deadline = now + self.node.settings.load_timeout.min(Duration::from_secs(1));
            let request =
                LoadRequest { paper: paper_id.clone(), purpose: LoadPurpose::Probe, loop_index: self.index, deadline };
            if let Some(stored) = self.store.load(request) {
                self.on_probed(&paper_id, super::stored::paper(stored));
            }
            let next = (backoff * 2).min(PROBE_MAX);
            self.probes.push((now + backoff, next, paper_id));
        }
    }
}

/// How long a node that learnt of an erase from a write's outcome (not from
/// the eraser) takes the paper as erased before it reads Redis again: the
/// marker's own expiry is not known here.
const ERASED_HEARD: Duration = Duration::from_secs(60);

/// The first wait before a failed paper is read again, and the longest.
const PROBE_FIRST: Duration = Duration::from_millis(500);
const PROBE_MAX: Duration = Duration::from_secs(30);

/// Who makes a change: a member, or the backend API (`from` is `api`).
pub(super) struct Editor {
    pub paper: Arc<str>,
    /// The `from` of what is broadcast.
    pub from: Arc<str>,
    /// The author of a note it creates; who completes.
    pub user: Arc<str>,
    pub role: Role,
    /// Where the store reports the op's outcome.
    pub origin: Origin,
}

/// A change to a paper's notes or cover (PROTOCOL.md 3.2, 7).
pub(super) enum Change {
    Upsert { id: String, data: String },
    Delete { id: String },
    Patch { id: String, data: String },
    Meta { data: String },
}

/// A change made and broadcast, at this version: written later (`saved` waits
/// for the store's report), or already (the memory store).
pub(super) enum Edited {
    Queued(u64),
    Written(u64),
}

trait SubmittedExt {
    fn edited(self, v: u64) -> Edited;
}

impl SubmittedExt for Submitted {
    fn edited(self, v: u64) -> Edited {
        if self == Submitted::Written {
            Edited::Written(v)
        } else {
            Edited::Queued(v)
        }
    }
}

/// Hands an edit's op to the store; when it waits in the backlog, the paper
/// counts it unwritten. A full backlog refuses it (`unavailable`).
fn submit_edit(store: &StoreHandle, paper: &mut Paper, op: Op) -> Result<Submitted, ErrorCode> {
    let note = match &op {
        Op::Note { id, .. } | Op::Patch { id, .. } => Some(id.clone()),
        _ => None,
    };
    let submitted = store.submit(op);
    match submitted {
        Submitted::Full => return Err(ErrorCode::Unavailable),
        Submitted::Queued => match &note {
            Some(id) => paper.awaits_write(id),
            None => paper.unwritten += 1,
        },
        Submitted::Written => {}
    }
    Ok(submitted)
}

/// `saved` at once, for a store that holds an edit as soon as it is made.
fn saved_now(frame: &mut Frame, conns: &mut Conns, metrics: &LoopMetrics, key: usize, v: u64) {
    metrics.message_out(Out::Saved, 1);
    conns.send(key, frame.saved(v));
}
