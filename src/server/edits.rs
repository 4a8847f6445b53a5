//! What a member's message does (PROTOCOL.md 3.2 and 3.3): the paper decides
//! (rights, limits, version), the op goes to the store's backlog, the edit is
//! applied and fanned out once, and `saved` follows when the store reports the
//! write.

use std::cmp::Reverse;

use super::cluster::relay_of;
use super::event_loop::EventLoop;
use super::session::Relaying;
use crate::conn::Phase;
use crate::metrics::{In, Out};
use crate::paper::{Edit, Note};
use crate::protocol::{self, ClientMsg, ErrorCode, Refusal};
use crate::store::{NoteValue, Op, Origin, Submitted, Written};

impl EventLoop {
    pub(super) fn on_text(&mut self, key: usize, text: &str) {
        match protocol::parse_client_msg(text, self.node.settings.max_note_bytes) {
            Ok(msg) => self.on_message(key, msg),
            Err(refusal) => {
                self.metrics().message_in(In::Invalid);
                self.refuse(key, &refusal);
            }
        }
    }

    pub(super) fn refuse(&mut self, key: usize, refusal: &Refusal) {
        let metrics = &self.node.loop_metrics[self.index];
        metrics.refusal(refusal.code);
        metrics.message_out(Out::Error, 1);
        let bytes = self.frame.error(refusal);
        self.conns.send(key, bytes);
    }

    fn on_message(&mut self, key: usize, msg: ClientMsg) {
        let Some(conn) = self.conns.slab.get(key) else { return };
        let Phase::Open { membership, .. } = &conn.phase else { return };
        let (paper_id, member_id, user, role) =
            (membership.paper.clone(), membership.member.clone(), membership.user.clone(), membership.role);
        let origin = Origin { loop_index: self.index, conn: key, serial: conn.serial };
        let Some(paper) = self.papers.paper_mut(&paper_id) else { return };
        let limits = self.node.settings.limits;
        let metrics = &self.node.loop_metrics[self.index];
        metrics.message_in(In::of(&msg));

        let (edit, reference) = match msg {
            ClientMsg::Ping => {
                metrics.message_out(Out::Pong, 1);
                let pong = self.frame.pong();
                return self.conns.send(key, pong);
            }
            ClientMsg::Cursor { data } => {
                let cursor = self.frame.cursor(&member_id, &data);
                self.conns.fanout(paper.members(), Some(key), cursor, Out::Cursor, metrics);
                return self.relay_frame(&paper_id, None, Relaying::Transient);
            }
            ClientMsg::Complete { reference } => {
                if let Err(code) = paper.check_complete(role) {
                    return self.refuse(key, &Refusal::from(code).with_ref(reference));
                }
                let snapshot = protocol::paper_document(&paper_id, true, paper.live_notes());
                self.frame.completed(&user);
                let relay = relay_of(&self.node, &self.frame);
                let op = Op::Complete { paper: paper_id.clone(), by: user.clone(), snapshot, origin, relay };
                match self.store.submit(op) {
                    Submitted::Full => {
                        return self.refuse(key, &Refusal::from(ErrorCode::Unavailable).with_ref(reference))
                    }
                    Submitted::Queued => paper.unwritten += 1,
                    Submitted::Written => {}
                }
                paper.complete(&user).expect("checked above");
                log::info!("paper {paper_id} completed by {user}");
                let completed = self.frame.completed(&user);
                self.conns.fanout(paper.members(), None, completed, Out::Completed, metrics);
                return;
            }
            ClientMsg::Upsert { id, data, reference } => {
                (paper.prepare_upsert(&id, data, (&user, role), &mut self.clock, &limits), reference)
            }
            ClientMsg::Delete { id, reference } => {
                (paper.prepare_delete(&id, (&user, role), &mut self.clock), reference)
            }
        };
        let edit: Edit = match edit {
            Ok(edit) => edit,
            Err(code) => return self.refuse(key, &Refusal::from(code).with_ref(reference)),
        };
        // Encoded before it is queued: with `--cluster` the same JSON is relayed.
        let v = edit.note.v;
        let kind = match &edit.note.data {
            Some(data) => {
                self.frame.upsert(&edit.id, &edit.note.author, data, v, &member_id, reference.as_deref());
                Out::Upsert
            }
            None => {
                self.frame.delete(&edit.id, v, &member_id, reference.as_deref());
                Out::Delete
            }
        };
        let relay = relay_of(&self.node, &self.frame);
        let op = Op::Note { paper: paper_id, id: edit.id.clone(), note: note_to_store(&edit.note), origin, relay };
        let submitted = self.store.submit(op);
        match submitted {
            Submitted::Full => return self.refuse(key, &Refusal::from(ErrorCode::Unavailable).with_ref(reference)),
            Submitted::Queued => paper.unwritten += 1,
            Submitted::Written => {}
        }
        paper.apply(edit);
        self.conns.fanout(paper.members(), None, self.frame.bytes(), kind, metrics);
        if submitted == Submitted::Written {
            metrics.message_out(Out::Saved, 1);
            let saved = self.frame.saved(v);
            self.conns.send(key, saved);
        }
    }

    /// Edits now in Redis: the papers may be dropped from memory later, and each
    /// session hears `saved` once for the highest version of its own.
    pub(super) fn on_written(&mut self, mut written: Vec<Written>) {
        for w in &written {
            if let Some(paper) = self.papers.paper_mut(&w.paper) {
                paper.unwritten = paper.unwritten.saturating_sub(1);
            }
        }
        written.sort_unstable_by_key(|w| (w.origin.conn, w.origin.serial, Reverse(w.v)));
        written.dedup_by_key(|w| (w.origin.conn, w.origin.serial));
        for w in written {
            let still_here =
                self.conns.live(w.origin.conn, w.origin.serial).is_some_and(|c| matches!(c.phase, Phase::Open { .. }));
            if still_here && w.v > 0 {
                self.metrics().message_out(Out::Saved, 1);
                let saved = self.frame.saved(w.v);
                self.conns.send(w.origin.conn, saved);
            }
        }
    }
}

/// A note as the store writes it.
pub fn note_to_store(note: &Note) -> NoteValue {
    NoteValue { author: note.author.clone(), data: note.data.clone(), v: note.v, node: note.node.clone() }
}

/// A note the store read, in the paper's terms.
pub fn note_from_store(note: NoteValue) -> Note {
    Note { author: note.author, data: note.data, v: note.v, node: note.node }
}
