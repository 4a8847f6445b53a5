//! Several nodes on one Redis (PROTOCOL.md section 6), as one loop sees them:
//! what this loop publishes for the others, what they published (applied only
//! when it advances a note, so that every node converges whatever the order of
//! arrival), a paper read again after the relay was away, and nodes gone.

use std::collections::HashSet;
use std::sync::Arc;

use super::event_loop::EventLoop;
use super::node::Node;
use super::session::Relaying;
use crate::metrics::{bump, Out};
use crate::paper::{clock, Cover, Edit, Note, Patch, RemoteMember, StoredPaper};
use crate::protocol::{self, Frame, NoteView, Relayed};
use crate::store::{Op, Presence, Submitted};

impl EventLoop {
    /// Publishes what was just encoded (a join, leave or cursor) to the other nodes.
    pub(super) fn relay_frame(&self, paper: &Arc<str>, presence: Option<Presence>, relaying: Relaying) {
        let Some(relay) = relay_of(&self.node, &self.frame) else { return };
        let op = Op::Relay { paper: paper.clone(), presence, relay };
        match relaying {
            Relaying::Transient => self.store.submit_transient(op),
            Relaying::Leave => self.store.submit_always(op),
            Relaying::Kept => {
                if self.store.submit(op) == Submitted::Full {
                    log::warn!("backlog full: presence on paper {paper} is not relayed");
                    self.presence_dropped.set(true);
                }
            }
        }
    }

    /// A message another node published: applied now, or kept until the paper is read.
    pub(super) fn on_relayed(&mut self, paper: &Arc<str>, node: Arc<str>, message: String) {
        if !self.papers.hold_relayed(paper, &node, &message) {
            self.apply_relayed(paper, node, &message);
        }
    }

    /// An edit applies only if it advances the note's version; presence and
    /// cursors pass on. What applies goes to this node's members unchanged.
    pub(super) fn apply_relayed(&mut self, paper_id: &Arc<str>, node: Arc<str>, message: &str) {
        let Some(paper) = self.papers.paper_mut(paper_id) else { return };
        let Some(relayed) = protocol::parse_relayed(message) else {
            log::warn!("skipping a relayed message from node {node} that this server cannot read: {message:.200}");
            bump(&self.metrics.corrupt_relayed, 1);
            return;
        };
        let sealed = paper.is_completed();
        let (kind, pass_on) = match relayed {
            // Once sealed here, nothing changes the notes: an edit another node took
            // before it heard of the completion is not shown (nor written).
            Relayed::Upsert { .. } | Relayed::Delete { .. } if sealed => (Out::Upsert, false),
            Relayed::Upsert { id, author, data, v } => {
                self.clock.observe(v);
                let id: Arc<str> = Arc::from(id);
                let note =
                    Note { author: Arc::from(author), data: Some(Arc::from(data.as_str())), v, node, fields: None };
                // Relayed only once Redis applied it: it is there.
                if !paper.apply_held(Edit { id: id.clone(), note }) {
                    return;
                }
                // Fields patched after this upsert kept their values here: members
                // are sent the note as it now is, not the upsert as sent.
                let Some(now) = paper.note(&id).filter(|n| n.data.as_deref() != Some(data.as_str())) else {
                    let bytes = self.frame.raw(message);
                    let metrics = &self.metrics;
                    self.conns.fanout(paper.members(), None, bytes, Out::Upsert, metrics);
                    return;
                };
                // With the note's own version (the greatest of its fields), as snapshots say it.
                let (author, data, v) =
                    (now.author.clone(), now.data.clone().unwrap_or_else(|| Arc::from("{}")), now.v);
                let bytes = self.frame.upsert(&id, &author, &data, v, from_of(message), None);
                self.conns.fanout(paper.members(), None, bytes, Out::Upsert, &self.metrics);
                return;
            }
            Relayed::Delete { id, v } => {
                self.clock.observe(v);
                let author = paper.note(&id).map_or_else(|| Arc::from(""), |n| n.author.clone());
                let applied =
                    paper.apply(Edit { id: Arc::from(id), note: Note { author, data: None, v, node, fields: None } });
                paper.prune(clock::now_ms(), &self.node.settings.limits);
                (Out::Delete, applied)
            }
            Relayed::Completed { by, notes: Some(notes) } => {
                // The paper exactly as sealed: members replace their view with it.
                let _ = paper;
                return self.on_sealed(paper_id, &by, &notes, false);
            }
            Relayed::Completed { by, notes: None } => (Out::Completed, paper.complete(&Arc::from(by)).is_ok()),
            Relayed::Join { id, user, name } => {
                let member = RemoteMember { id: Arc::from(id), user: Arc::from(user), name: Arc::from(name), node };
                (Out::Join, paper.add_remote(member))
            }
            Relayed::Leave { id } => (Out::Leave, paper.remove_remote(&id)),
            Relayed::Cursor => (Out::Cursor, true),
            Relayed::Patch { .. } | Relayed::Meta { .. } if sealed => (Out::Patch, false),
            Relayed::Patch { id, data, v } => {
                self.clock.observe(v);
                let Ok(fields) = serde_json::from_str::<std::collections::BTreeMap<String, _>>(&data) else { return };
                let patch = Patch { id: Arc::from(id), fields: fields.into_iter().collect(), v, node };
                // Members are sent only the fields this node advanced.
                let Some(advanced) = paper.apply_patch(&patch) else { return };
                let bytes = self.frame.patch(&patch.id, &advanced, v, from_of(message), None);
                self.conns.fanout(paper.members(), None, bytes, Out::Patch, &self.metrics);
                return;
            }
            Relayed::Meta { data, v } => {
                self.clock.observe(v);
                (Out::Meta, paper.apply_cover(Cover { data: Arc::from(data), v, node }))
            }
            Relayed::ResumeFloor { v } => {
                paper.raise_floor(v);
                return;
            }
            // 1.2: the main backend erased the paper or revoked a user on
            // another node (PROTOCOL.md 7): carried out here too.
            Relayed::Erased => {
                let _ = paper;
                return self.erase_here(paper_id, self.node.settings.erase_retention);
            }
            Relayed::Revoked { user, until } => {
                let _ = paper;
                return self.revoke_here(paper_id, &Arc::from(user), until);
            }
        };
        if let Some(floor) = paper.take_raised_floor() {
            self.relay_floor(paper_id, floor);
        }
        let Some(paper) = self.papers.paper(paper_id) else { return };
        if pass_on {
            let bytes = self.frame.raw(message);
            self.conns.fanout(paper.members(), None, bytes, kind, &self.metrics);
        }
    }

    /// Merges a paper read again from Redis: notes that advance are applied and
    /// sent to the members (with an empty `from`: no session of this node sent them).
    ///
    /// A paper Redis holds sealed is not merged: its notes are exactly what was
    /// sealed and handed to the main backend (PROTOCOL.md 3.1), so they replace
    /// what this node holds, as a relayed `completed` would. This node's edits
    /// made while it was cut from Redis were refused by the seal, and their
    /// senders are told `paper_completed` when the writer reports them.
    pub(super) fn merge_stored(&mut self, paper_id: &Arc<str>, stored: StoredPaper) {
        let Some(paper) = self.papers.paper_mut(paper_id) else { return };
        if let Some(by) = &stored.completed_by {
            if !paper.is_completed() {
                if let Some(cover) = stored.cover.clone() {
                    paper.apply_cover(cover);
                }
                let notes = sealed_notes_json(&stored);
                return self.on_sealed(paper_id, by, &notes, false);
            }
        }
        let metrics = &self.metrics;
        // Notes deleted while this node was away, whose tombstones the horizon
        // has dropped since: Redis holds nothing of them, so they go here too.
        let held: HashSet<&str> = stored.notes.iter().map(|(id, _)| id.as_str()).collect();
        for (id, v) in paper.forget_dropped(stored.horizon, &held) {
            let bytes = self.frame.delete(&id, v, "", None);
            self.conns.fanout(paper.members(), None, bytes, Out::Delete, metrics);
        }
        for (id, note) in stored.notes {
            self.clock.observe(note.v);
            let edit = Edit { id: Arc::from(id), note };
            let (v, data, author) = (edit.note.v, edit.note.data.clone(), edit.note.author.clone());
            let id = edit.id.clone();
            if !paper.apply_held(edit) {
                continue;
            }
            let (kind, bytes) = match &data {
                Some(data) => (Out::Upsert, self.frame.upsert(&id, &author, data, v, "", None)),
                None => (Out::Delete, self.frame.delete(&id, v, "", None)),
            };
            self.conns.fanout(paper.members(), None, bytes, kind, metrics);
        }
        if let Some(cover) = stored.cover {
            let (data, v) = (cover.data.clone(), cover.v);
            if paper.apply_cover(cover) {
                let bytes = self.frame.meta(&data, v, "", None);
                self.conns.fanout(paper.members(), None, bytes, Out::Meta, metrics);
            }
        }
        paper.prune(clock::now_ms(), &self.node.settings.limits);
        let raised = paper.take_raised_floor();
        if let Some(by) = stored.completed_by {
            let by: Arc<str> = Arc::from(by);
            let notes = protocol::notes_json(paper.live_notes());
            if paper.complete(&by).is_ok() {
                let bytes = self.frame.completed(&by, &notes);
                self.conns.fanout(paper.members(), None, bytes, Out::Completed, metrics);
            }
        }
        if let Some(floor) = raised {
            self.relay_floor(paper_id, floor);
        }
    }

    /// This node applied a change more than the resume window late: the other
    /// nodes raise their floor for the paper too.
    fn relay_floor(&self, paper: &Arc<str>, floor: u64) {
        if !self.node.cluster {
            return;
        }
        let relay = format!("{}\n{}", self.node.node_id, protocol::resume_floor_message(floor)).into_boxed_str();
        if self.store.submit(Op::Relay { paper: paper.clone(), presence: None, relay }) == Submitted::Full {
            log::warn!("backlog full: the resume floor of paper {paper} is not relayed");
        }
    }

    /// Another node stopped: its members leave every paper here.
    pub(super) fn node_gone(&mut self, node: &str) {
        let metrics = &self.metrics;
        for paper in self.papers.papers_mut() {
            for id in paper.remove_node(node) {
                let leave = self.frame.leave(&id);
                self.conns.fanout(paper.members(), None, leave, Out::Leave, metrics);
            }
        }
    }
}

/// The notes of a paper Redis holds sealed, as the completion script hands them
/// over: the live notes, by version.
fn sealed_notes_json(stored: &StoredPaper) -> String {
    let mut live: Vec<NoteView> = stored
        .notes
        .iter()
        .filter_map(|(id, note)| {
            let data = note.data.as_deref()?;
            Some(NoteView { id, author: &note.author, data, v: note.v })
        })
        .collect();
    live.sort_by_key(|n| n.v);
    protocol::notes_json(live.into_iter())
}

/// The `from` of a relayed message (the member on the other node), for a
/// message re-encoded here.
fn from_of(message: &str) -> &str {
    message.rsplit_once(r#""from":""#).and_then(|(_, rest)| rest.split_once('"')).map_or("", |(from, _)| from)
}

/// With `--cluster`, the message for other nodes: this node's id, a newline, and
/// the JSON just encoded for this node's members.
pub(super) fn relay_of(node: &Node, frame: &Frame) -> Option<Box<str>> {
    node.cluster.then(|| {
        let json = std::str::from_utf8(frame.payload()).expect("frames are JSON text");
        format!("{}\n{json}", node.node_id).into_boxed_str()
    })
}
