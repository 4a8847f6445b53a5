//! Backend API calls (PROTOCOL.md 7, 1.2) on the loop that owns their paper.
//! A write takes the path of a member's edit (`edits::edit`): versioned,
//! broadcast with `"from":"api"`, relayed, written behind; it is answered once
//! the store reports it, by the rule of `saved`. Erasing and revoking are
//! written first and then carried out here, and on the other nodes through the
//! relay.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::edits::{Change, Edited, Editor};
use super::event_loop::EventLoop;
use crate::api::{self, Action};
use crate::auth::Role;
use crate::conn::http::Reply;
use crate::conn::{ApiCall, Phase};
use crate::protocol::{self, CloseReason, ErrorCode, MemberView};
use crate::store::{Op, Origin, Outcome, Submitted, Written};

/// Seconds since the epoch.
pub(super) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl EventLoop {
    /// A call handed to this loop: it waits for Redis at most `--api-timeout`.
    pub(super) fn start_call(&mut self, key: usize, call: ApiCall) {
        let paper = call.paper.clone();
        let Some(conn) = self.conns.slab.get_mut(key) else { return };
        if !conn.start_call(call) {
            return;
        }
        self.set_deadline(key, Instant::now() + self.node.settings.api_timeout);
        if self.is_erased(&paper) {
            return self.answer_call(key, &api::gone());
        }
        if self.stopping.is_some() {
            return;
        }
        let in_memory = self.papers.paper(&paper).is_some();
        match self.call_of(key).map(|c| &c.action) {
            Some(Action::Erase | Action::Revoke { .. }) => self.serve_call(key),
            // Presence of a paper nobody holds here: read once, not kept.
            Some(Action::Presence) if !in_memory => {
                if self.node.settings.paper_linger.is_none() {
                    return self.answer_call(key, &api::presence(&paper, std::iter::empty()));
                }
                let deadline = Instant::now() + self.node.settings.load_timeout;
                self.read_once(key, paper, deadline);
            }
            // A change, a seal, or presence of a paper held here: the paper in memory.
            Some(_) => {
                let deadline = Instant::now() + self.node.settings.load_timeout;
                self.wait_for_paper(key, paper, deadline);
            }
            None => {}
        }
    }

    fn call_of(&self, key: usize) -> Option<&ApiCall> {
        match self.conns.slab.get(key).map(|c| &c.phase) {
            Some(Phase::Api { call, .. }) => Some(call),
            _ => None,
        }
    }

    /// A paper read for one call: presence, from what Redis holds.
    pub(super) fn answer_read_call(&mut self, key: usize, paper: &Arc<str>, stored: &crate::store::StoredPaper) {
        if stored.erased_for.is_some() {
            return self.answer_call(key, &api::gone());
        }
        let members = stored.remote_members.iter().map(|m| MemberView { id: &m.id, user: &m.user, name: &m.name });
        self.answer_call(key, &api::presence(paper, members));
    }

    /// Carries a call out, its paper in memory (or not needed).
    pub(super) fn serve_call(&mut self, key: usize) {
        let Some(conn) = self.conns.slab.get(key) else { return };
        let Phase::Api { call, .. } = &conn.phase else { return };
        let origin = Origin { loop_index: self.index, conn: key, serial: conn.serial };
        let paper_id = call.paper.clone();
        let action = call.action.clone();
        if self.is_erased(&paper_id) {
            return self.answer_call(key, &api::gone());
        }
        let editor = Editor {
            paper: paper_id.clone(),
            from: Arc::from(api::FROM),
            user: Arc::from(api::DEFAULT_AUTHOR),
            role: Role::Owner,
            origin,
        };
        let change = match action {
            Action::PutNote { id, data, author } => {
                let editor = Editor { user: author, ..editor };
                return self.call_edit(key, &editor, Change::Upsert { id, data });
            }
            Action::PatchNote { id, data } => Change::Patch { id, data },
            Action::DeleteNote { id } => Change::Delete { id },
            Action::PutMeta { data } => Change::Meta { data },
            Action::Complete => return self.call_complete(key, &editor),
            Action::Presence => {
                let Some(paper) = self.papers.paper(&paper_id) else { return };
                let reply = api::presence(&paper_id, paper.all_members());
                return self.answer_call(key, &reply);
            }
            Action::Erase => {
                let retention_ms = self.node.settings.erase_retention.as_millis() as u64;
                let relay = self.node_message(protocol::erased_message());
                let op = Op::Erase { paper: paper_id.clone(), retention_ms, origin, relay };
                return match self.store.submit(op) {
                    Submitted::Full => self.answer_call(key, &api::refusal(ErrorCode::Unavailable)),
                    Submitted::Queued => {}
                    Submitted::Written => {
                        self.erase_here(&paper_id, self.node.settings.erase_retention);
                        self.answer_call(key, &api::done());
                    }
                };
            }
            Action::Revoke { user, until } => {
                let until = until.unwrap_or_else(|| unix_now() + self.node.settings.revoke_retention.as_secs());
                let relay = self.node_message(&protocol::revoked_message(&user, until));
                let op = Op::Revoke { paper: paper_id.clone(), user: user.clone(), until, origin, relay };
                return match self.store.submit(op) {
                    Submitted::Full => self.answer_call(key, &api::refusal(ErrorCode::Unavailable)),
                    Submitted::Queued => {}
                    Submitted::Written => {
                        self.revoke_here(&paper_id, &user, until);
                        self.answer_call(key, &api::done());
                    }
                };
            }
        };
        self.call_edit(key, &editor, change);
    }

    /// With `--cluster`, a message for the other nodes: this node's id, a
    /// newline, the JSON.
    fn node_message(&self, json: &str) -> Option<Box<str>> {
        self.node.cluster.then(|| format!("{}\n{json}", self.node.node_id).into_boxed_str())
    }

    fn call_edit(&mut self, key: usize, editor: &Editor, change: Change) {
        self.read_at = Instant::now();
        match self.edit(editor, change, None) {
            Err(code) => self.answer_call(key, &api::refusal(code)),
            Ok(Edited::Written(v)) => self.answer_call(key, &api::written(v)),
            Ok(Edited::Queued(_)) => {}
        }
    }

    /// `POST .../complete`: the sealed snapshot, whether sealed now or before.
    fn call_complete(&mut self, key: usize, editor: &Editor) {
        let Some(paper) = self.papers.paper(&editor.paper) else { return };
        if paper.is_completed() {
            return self.answer_sealed(key, &editor.paper.clone());
        }
        match self.complete(editor, None) {
            Err(code) => self.answer_call(key, &api::refusal(code)),
            Ok(Submitted::Written) => self.answer_sealed(key, &editor.paper.clone()),
            Ok(_) => {}
        }
    }

    /// Answers a call with the sealed paper's document.
    fn answer_sealed(&mut self, key: usize, paper: &Arc<str>) {
        self.observe_call(key, 200);
        self.reply_paper(key, paper);
    }

    /// A completion of this loop's call is sealed in Redis (and applied here).
    pub(super) fn call_sealed(&mut self, origin: Origin, paper: &Arc<str>) {
        if self.conns.live(origin.conn, origin.serial).is_some_and(|c| matches!(c.phase, Phase::Api { .. })) {
            self.answer_sealed(origin.conn, paper);
        }
    }

    /// What the store made of a call's op: its answer (PROTOCOL.md 7, by the
    /// rule of `saved`).
    pub(super) fn call_written(&mut self, key: usize, w: &Written) {
        let Some(action) = self.call_of(key).map(|c| c.action.kind()) else { return };
        let reply = match w.outcome {
            // Carried out by `on_written` already.
            Outcome::Saved if matches!(action, api::Kind::Erase | api::Kind::Revoke) => api::done(),
            Outcome::Saved => api::written(w.v),
            Outcome::Sealed => api::refusal(ErrorCode::PaperCompleted),
            Outcome::Failed | Outcome::BelowHorizon => api::refusal(ErrorCode::WriteFailed),
            Outcome::Gone => api::refusal(ErrorCode::NotFound),
            Outcome::Erased => api::gone(),
        };
        self.answer_call(key, &reply);
    }

    /// Answers a call (an API refusal, or its result) and counts it.
    pub(super) fn answer_call(&mut self, key: usize, reply: &Reply) {
        self.observe_call(key, reply.status);
        self.reply(key, reply);
    }

    fn observe_call(&self, key: usize, status: u16) {
        if let Some(call) = self.call_of(key) {
            self.metrics.api_call(call.action.kind(), status, call.started.elapsed());
        }
    }

    /// A call Redis did not answer within `--api-timeout`: 504, its change may
    /// still be written (every write route can be retried).
    pub(super) fn call_timed_out(&mut self, key: usize) {
        self.leave_paper(key);
        self.answer_call(key, &api::timeout());
        self.set_deadline(key, Instant::now() + self.node.settings.handshake_timeout);
    }

    /// Whether a paper is erased, as far as this loop knows.
    pub(super) fn is_erased(&mut self, paper: &str) -> bool {
        self.erased.until(paper, Instant::now()).is_some()
    }

    /// The paper is erased (here, by another node, or found so in Redis) for
    /// `left` more: its sessions close with 4410, its waiters are refused, and
    /// it leaves memory.
    pub(super) fn erase_here(&mut self, paper_id: &Arc<str>, left: Duration) {
        let until = Instant::now().checked_add(left).unwrap_or_else(|| Instant::now() + Duration::from_secs(1 << 40));
        self.erased.insert(paper_id.clone(), until);
        let members: Vec<usize> =
            self.papers.paper(paper_id).map(|p| p.members().iter().map(|m| m.key).collect()).unwrap_or_default();
        if !members.is_empty() {
            log::info!("paper {paper_id} was erased: closing its {} sessions here with 4410", members.len());
        }
        for key in members {
            self.end_session(key, CloseReason::Erased);
        }
        for key in self.papers.remove(paper_id) {
            self.refuse_erased(key);
        }
        self.node.paper_failing(paper_id, None);
        self.store.forget(paper_id.clone());
        self.publish_gauges();
    }

    /// A connection waiting for an erased paper is answered 410.
    pub(super) fn refuse_erased(&mut self, key: usize) {
        match self.conns.slab.get(key).map(|c| &c.phase) {
            Some(Phase::Api { .. }) => self.answer_call(key, &api::gone()),
            Some(Phase::Admitting { .. } | Phase::Reading { .. }) => {
                self.reply(key, &Reply::text(410, "this paper was erased"))
            }
            _ => {}
        }
    }

    /// `user` may not join the paper until `until`: its sessions here close with 4403.
    pub(super) fn revoke_here(&mut self, paper_id: &Arc<str>, user: &Arc<str>, until: u64) {
        let Some(paper) = self.papers.paper_mut(paper_id) else { return };
        let keys = paper.revoke(user, until);
        if until <= unix_now() {
            return;
        }
        for key in keys {
            self.end_session(key, CloseReason::Revoked);
        }
    }
}
