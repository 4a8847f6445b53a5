//! A WebSocket session's life on its paper's loop (PROTOCOL.md section 3): the
//! upgrade, waiting for the paper, joining (snapshot to the joiner, `join` to
//! the others), reading messages under the rate limit, leaving and closing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tungstenite::Message;

use super::event_loop::EventLoop;
use crate::conn::http::{Reply, Upgrade};
use crate::conn::{Incoming, Next, Phase, Visitor, MAX_MESSAGES_PER_READ};
use crate::metrics::{bump, In, Out};
use crate::paper::registry::Lookup;
use crate::paper::{Member, Resume};
use crate::protocol::{self, CloseReason, ErrorCode, PaperView, Refusal};
use crate::rate::{TokenBucket, Verdict};
use crate::store::{self, LoadPurpose, LoadRequest, Presence};

/// How long a closing session may take to answer the close frame and drain.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Message bytes read from one session before the loop's other sessions get
/// their turn (the rest is read in the next turn).
const READ_BYTES_PER_TURN: usize = 32 * 1024;
/// Past the load timeout, how long a joiner may still wait before it is closed:
/// a safety net, the load's own timeout comes first.
const JOIN_GRACE: Duration = Duration::from_secs(1);

impl EventLoop {
    /// Holds an upgrade request until its paper is in memory: the checks that
    /// need the paper (erased: 410, revoked: 403; PROTOCOL.md 7) come before
    /// the 101.
    pub(super) fn admit_session(&mut self, key: usize, upgrade: Upgrade, buf: Vec<u8>, head_len: usize) {
        let paper: Arc<str> = Arc::from(upgrade.paper.as_str());
        let Some(conn) = self.conns.slab.get_mut(key) else { return };
        if !conn.admit(upgrade, buf, head_len) {
            return;
        }
        let settings = &self.node.settings;
        self.set_deadline(key, Instant::now() + settings.load_timeout + JOIN_GRACE);
        if self.stopping.is_some() {
            return self.open_and_close(key, CloseReason::ShuttingDown);
        }
        if self.is_erased(&paper) {
            return self.reply(key, &Reply::text(410, "this paper was erased"));
        }
        self.find_paper(key, paper);
    }

    /// Answers 101, then closes the session at once (PROTOCOL.md 3.1: a joiner
    /// whose paper cannot be read is closed with 1013).
    pub(super) fn open_and_close(&mut self, key: usize, reason: CloseReason) {
        if self.open_session(key) {
            self.end_session(key, reason);
        }
    }

    /// Admitting -> Joining: answers 101. Returns whether it did.
    pub(super) fn open_session(&mut self, key: usize) -> bool {
        let Some(conn) = self.conns.slab.get(key) else { return false };
        let Phase::Admitting { upgrade, .. } = &conn.phase else { return false };
        let (serial, peer) = (conn.serial, conn.peer);
        let member_id = self.member_id(serial);
        let user: Arc<str> = upgrade.user.as_deref().map_or_else(|| Arc::from(member_id.as_str()), Arc::from);
        let name: Arc<str> = upgrade.name.as_deref().map_or_else(|| user.clone(), Arc::from);
        let paper: Arc<str> = Arc::from(upgrade.paper.as_str());
        let (ws_key, expires, since) = (upgrade.key.clone(), upgrade.expires, upgrade.since);
        log::debug!("session {member_id} from {peer} opens paper {paper} as {user}");
        let visitor = Visitor { paper, user, name, role: upgrade.role, since };
        let ws_config = self.node.settings.ws_config;
        let Some(conn) = self.conns.slab.get_mut(key) else { return false };
        if !conn.upgrade(&ws_key, ws_config, visitor) {
            return false;
        }
        self.metrics.http_response(101);
        if let Some(exp) = expires {
            self.timers.expiry(exp, key, serial);
        }
        self.session_count += 1;
        self.publish_gauges();
        self.conns.queue_flush(key);
        true
    }

    /// Finds a paper for a joiner or a reader: at once if it is in memory, else
    /// once it has been read.
    pub(super) fn find_paper(&mut self, key: usize, paper: Arc<str>) {
        let keeps_every_paper = self.node.settings.paper_linger.is_none();
        let reading = self.conns.slab.get(key).is_some_and(|c| matches!(c.phase, Phase::Reading { .. }));
        if keeps_every_paper && reading && self.papers.paper(&paper).is_none() {
            // Reading a paper nobody opened answers it empty without keeping it: a
            // store that never forgets a paper would keep it for good.
            let body = protocol::paper_document(
                &PaperView { id: &paper, completed: false, cover_data: "{}", cover_v: 0 },
                std::iter::empty(),
            );
            let reply = Reply { status: 200, extra_headers: "", content_type: "application/json", body };
            return self.reply(key, &reply);
        }
        let deadline = Instant::now() + self.node.settings.load_timeout;
        if reading && self.papers.paper(&paper).is_none() {
            // Unanswered by then (Redis unreachable), the reader gets 503.
            self.set_deadline(key, deadline + JOIN_GRACE);
            return self.read_once(key, paper, deadline);
        }
        self.wait_for_paper(key, paper, deadline);
    }

    /// The connection `key` waits for a paper kept in memory: served at once if
    /// it is there, else once it is read (the first waiter starts the read).
    pub(super) fn wait_for_paper(&mut self, key: usize, paper: Arc<str>, deadline: Instant) {
        let lookup = self.papers.lookup(&paper, key, deadline);
        self.publish_gauges();
        match lookup {
            Lookup::Ready => self.paper_ready(key),
            Lookup::Waiting => {}
            Lookup::StartLoad(attempt) => {
                let purpose = LoadPurpose::Join(attempt);
                let request = LoadRequest { paper: paper.clone(), purpose, loop_index: self.index, deadline };
                if let Some(stored) = self.store.load(request) {
                    self.on_loaded(&paper, purpose, stored);
                }
            }
        }
    }

    /// A paper not in memory read for one request only (`GET /papers`, an API
    /// presence call), neither kept nor subscribed to, so that reads of many
    /// papers nobody holds cost nothing once answered.
    pub(super) fn read_once(&mut self, key: usize, paper: Arc<str>, deadline: Instant) {
        let Some(serial) = self.conns.slab.get(key).map(|c| c.serial) else { return };
        let read = self.reads.start(key, serial);
        let purpose = LoadPurpose::Read(read);
        let request = LoadRequest { paper: paper.clone(), purpose, loop_index: self.index, deadline };
        if let Some(stored) = self.store.read_once(request) {
            self.on_loaded(&paper, purpose, stored);
        }
    }

    /// A paper read for one `GET /papers` (or one API call): answered, then forgotten.
    fn answer_read(&mut self, paper: &Arc<str>, read: u64, stored: store::StoredPaper) {
        let Some((key, serial)) = self.reads.finish(read) else { return };
        match self.conns.live(key, serial).map(|c| &c.phase) {
            Some(Phase::Api { .. }) => self.answer_read_call(key, paper, &stored),
            Some(Phase::Reading { .. }) if stored.erased_for.is_some() => self.refuse_erased(key),
            Some(Phase::Reading { .. }) => {
                let read = crate::paper::Paper::new(paper.clone(), super::stored::paper(stored), &mut self.clock);
                self.reply_read(key, &read);
            }
            _ => {}
        }
    }

    /// A paper read from storage: the joiners it was read for join, a read that
    /// keeps nothing is answered, what another node changed while the relay was
    /// away is merged, or a paper Redis refused to write is taken back. An
    /// erased paper (PROTOCOL.md 7) is erased here too.
    pub(super) fn on_loaded(&mut self, paper: &Arc<str>, purpose: LoadPurpose, stored: store::StoredPaper) {
        if let LoadPurpose::Read(read) = purpose {
            return self.answer_read(paper, read, stored);
        }
        // Erased in Redis, or here while it was read (the read may have come
        // first): nothing of it is kept.
        if let Some(left) = stored.erased_for {
            return self.erase_here(paper, left.min(self.node.settings.erase_retention));
        }
        if let Some(until) = self.erased.until(paper, Instant::now()) {
            return self.erase_here(paper, until.saturating_duration_since(Instant::now()));
        }
        let stored = super::stored::paper(stored);
        let attempt = match purpose {
            LoadPurpose::Join(attempt) => attempt,
            LoadPurpose::Merge => return self.merge_stored(paper, stored),
            LoadPurpose::Probe => return self.on_probed(paper, stored),
            LoadPurpose::Read(_) => return,
        };
        let Some((waiters, relayed)) = self.papers.finish_load(paper, attempt, stored, &mut self.clock) else {
            return;
        };
        if let Some(loaded) = self.papers.paper_mut(paper) {
            loaded.prune(crate::paper::clock::now_ms(), &self.node.settings.limits);
        }
        // What other nodes sent while the paper was read, then the joiners: their
        // snapshots hold it all.
        for (node, message) in relayed {
            self.apply_relayed(paper, node, &message);
        }
        for key in waiters {
            self.load_waited(key);
            self.paper_ready(key);
        }
    }

    /// The paper a connection waited for is in memory.
    pub(super) fn paper_ready(&mut self, key: usize) {
        match self.conns.slab.get(key).map(|c| &c.phase) {
            Some(Phase::Admitting { upgrade, .. }) => {
                let paper = upgrade.paper.as_str();
                let user = upgrade.user.clone();
                let now = super::api::unix_now();
                let revoked = match (user, self.papers.paper_mut(paper)) {
                    (Some(user), Some(paper)) => paper.is_revoked(&user, now),
                    _ => false,
                };
                if revoked {
                    return self.reply(key, &Reply::text(403, "your access to this paper was revoked"));
                }
                if self.open_session(key) {
                    self.load_waited(key);
                    self.join(key);
                }
            }
            Some(Phase::Joining { .. }) => self.join(key),
            Some(Phase::Api { .. }) => self.serve_call(key),
            Some(Phase::Reading { paper, .. }) => {
                let paper = paper.clone();
                self.reply_paper(key, &paper);
            }
            _ => {}
        }
    }

    /// The paper a connection waited for could not be read in time.
    pub(super) fn paper_unavailable(&mut self, key: usize) {
        self.load_waited(key);
        match self.conns.slab.get(key).map(|c| &c.phase) {
            // Answered as before 1.2: upgraded, then closed with 1013.
            Some(Phase::Admitting { .. }) => self.open_and_close(key, CloseReason::PaperUnavailable),
            Some(Phase::Api { .. }) => {
                let reply = crate::api::error(503, "unavailable", "the paper cannot be read from Redis now; retry");
                self.answer_call(key, &reply);
            }
            Some(Phase::Joining { .. }) => self.end_session(key, CloseReason::PaperUnavailable),
            Some(Phase::Reading { .. }) => {
                self.reply(key, &Reply::text(503, "the paper cannot be read from Redis now; retry later"))
            }
            _ => {}
        }
    }

    /// Makes a waiting session a member: snapshot to it, `join` to the others.
    fn join(&mut self, key: usize) {
        let Some(conn) = self.conns.slab.get(key) else { return };
        let Phase::Joining { visitor, .. } = &conn.phase else { return };
        let Some(paper) = self.papers.paper(&visitor.paper) else { return };
        if paper.is_full_of_members(&self.node.settings.limits) {
            return self.end_session(key, CloseReason::PaperFull);
        }
        let (paper_id, since) = (visitor.paper.clone(), visitor.since);
        // Before it joins: a full snapshot's body is shared with other joiners of
        // this version, or must fit under the node's bound.
        let full = since.is_none_or(|since| matches!(paper.resume(since), Resume::Full));
        let body = match full.then(|| self.paper_body(&paper_id, true)) {
            Some(None) => return self.refuse_joiner(key),
            Some(body) => body,
            None => None,
        };
        let Some(conn) = self.conns.slab.get(key) else { return };
        let member_id: Arc<str> = Arc::from(self.member_id(conn.serial));
        let bucket = TokenBucket::new(self.node.settings.burst, Instant::now());
        let conn = &mut self.conns.slab[key];
        let Some(visitor) = conn.join(member_id.clone(), bucket) else { return };
        let read_pending = conn.read_pending;
        let member = Member { id: member_id.clone(), user: visitor.user, name: visitor.name, key };

        let metrics = &self.metrics;
        let Some(paper) = self.papers.paper_mut(&visitor.paper) else { return };
        let join = self.frame.join(&member.view());
        self.conns.fanout(paper.members(), None, join, Out::Join, metrics);
        let presence = self.node.cluster.then(|| presence_entry(&self.node.node_id, &member));
        paper.add_member(member);
        self.relay_frame(&visitor.paper, presence, Relaying::Kept);
        let snapshot_len = match body {
            Some(body) => self.send_full_snapshot(key, &paper_id, &member_id, &body),
            // What the client may have missed since the version it saw; it merges it.
            None => match since.and_then(|since| self.send_since_snapshot(key, &paper_id, &member_id, since)) {
                Some(len) => len,
                None => return self.refuse_joiner(key),
            },
        };
        self.conns.slab[key].grace = snapshot_len;
        // A member that never reads must not pin its snapshot (the whole paper)
        // until the idle timeout: unwritten by then, it is a slow consumer.
        self.set_deadline(key, Instant::now() + self.node.settings.handshake_timeout);
        self.metrics.message_out(Out::Snapshot, 1);
        if read_pending {
            self.read_list.push(key);
        }
    }

    /// Reads and handles messages until the socket is drained or the budget is spent.
    pub(super) fn read_messages(&mut self, key: usize) {
        let next = self.read_budget(key);
        let Some(conn) = self.conns.slab.get_mut(key) else { return };
        if let Phase::Open { ws, .. } = &mut conn.phase {
            bump(&self.metrics.bytes_in, std::mem::take(&mut ws.get_mut().bytes_in));
            // Pongs that tungstenite queued while reading move to the output now.
            let _ = ws.flush();
            if ws.get_ref().out.pending() > 0 {
                self.conns.queue_flush(key);
            }
        }
        self.act(key, next);
    }

    fn read_budget(&mut self, key: usize) -> Next {
        let now = Instant::now();
        let mut bytes = 0;
        for _ in 0..MAX_MESSAGES_PER_READ {
            // A turn's share of one session, in bytes too: 64 notes of 16 KiB
            // (a burst within the allowance) would hold every other session of
            // the loop for as long as they take to apply.
            if bytes >= READ_BYTES_PER_TURN {
                break;
            }
            let Some(conn) = self.conns.slab.get_mut(key) else { return Next::Continue };
            if conn.doomed || !matches!(conn.phase, Phase::Open { .. }) {
                return Next::Continue;
            }
            let message = match conn.next_message() {
                Incoming::Message(message) => message,
                Incoming::Dry => return Next::Continue,
                Incoming::Failed(next) => return next,
            };
            conn.last_seen = now;
            if let Message::Text(text) = &message {
                bytes += text.len();
            }
            let Phase::Open { membership, .. } = &mut conn.phase else { return Next::Continue };
            // Ping frames count too (PROTOCOL.md 3.3): tungstenite answers them itself.
            if let Message::Text(_) | Message::Binary(_) | Message::Ping(_) = &message {
                let settings = &self.node.settings;
                match membership.bucket.take(settings.rate, settings.burst, now) {
                    Verdict::Pass => {}
                    Verdict::Refuse if matches!(message, Message::Ping(_)) => {
                        // Refused without an answer: an error per ping would be output too.
                        conn.drop_pong();
                        bump(&self.metrics.ping_frames_refused, 1);
                        continue;
                    }
                    Verdict::Refuse => {
                        let reference = match &message {
                            Message::Text(text) => protocol::reference_of(text),
                            _ => None,
                        };
                        self.refuse(key, &Refusal::from(ErrorCode::RateLimited).with_ref(reference));
                        continue;
                    }
                    Verdict::Abuse => return Next::Close(CloseReason::Abuse),
                }
            }
            match message {
                Message::Text(text) => self.on_text(key, &text),
                Message::Binary(_) => {
                    self.metrics.message_in(In::Invalid);
                    let refusal =
                        Refusal::new(ErrorCode::InvalidMessage, "binary frames are not accepted; send JSON text");
                    self.refuse(key, &refusal);
                }
                Message::Close(_) => return Next::Close(CloseReason::Normal),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
        Next::ReadAgain
    }

    /// Leaves the paper (telling the others) and starts the close handshake.
    pub(super) fn end_session(&mut self, key: usize, reason: CloseReason) {
        if !self.conns.slab.get(key).is_some_and(|c| c.phase.is_session() && !c.doomed) {
            return;
        }
        self.leave_paper(key);
        let conn = &mut self.conns.slab[key];
        let serial = conn.serial;
        let max_outbound = self.node.settings.max_outbound_bytes;
        if !conn.close(reason, Instant::now() + CLOSE_TIMEOUT, max_outbound) {
            return;
        }
        // A slow consumer's close frame waits behind what the kernel holds for it:
        // it may resume reading up to the idle timeout and still get it (3.3, 1.1).
        // Unless the frame it was being sent is huge (a snapshot begun and never
        // read): that cannot be cut, and would pin the paper's bytes that long. A
        // smaller snapshot's bytes are shared with its other joiners, and count
        // against --max-snapshot-bytes-in-flight while they wait.
        let pending = conn.phase.io().map_or(0, |io| io.out.pending());
        let wait = if reason == CloseReason::SlowConsumer && pending <= max_outbound {
            self.node.settings.idle_timeout
        } else {
            CLOSE_TIMEOUT
        };
        if reason == CloseReason::SlowConsumer {
            bump(&self.metrics.slow_consumers, 1);
        }
        self.metrics.close(reason);
        log::debug!("session {} closes with {} {}", self.member_id(serial), u16::from(reason.code()), reason.text());
        self.set_deadline(key, Instant::now() + wait);
        self.conns.queue_flush(key);
    }

    /// Takes a connection out of its paper: a member leaves (the others hear it), a
    /// waiter stops waiting.
    pub(super) fn leave_paper(&mut self, key: usize) {
        let Some(conn) = self.conns.slab.get(key) else { return };
        match &conn.phase {
            Phase::Joining { visitor, .. } => self.papers.forget_waiter(&visitor.paper, key),
            Phase::Admitting { upgrade, .. } => self.papers.forget_waiter(&upgrade.paper, key),
            Phase::Api { call, .. } => {
                self.papers.forget_waiter(&call.paper, key);
                self.reads.forget(key);
            }
            Phase::Reading { paper, .. } => {
                self.papers.forget_waiter(paper, key);
                self.reads.forget(key);
            }
            Phase::Open { membership, .. } => {
                let Some(paper) = self.papers.paper_mut(&membership.paper) else { return };
                let Some(member) = paper.remove_member(key) else { return };
                log::debug!("session {} left paper {}", member.id, paper.id);
                let leave = self.frame.leave(&member.id);
                self.conns.fanout(paper.members(), None, leave, Out::Leave, &self.metrics);
                let paper_id = paper.id.clone();
                let presence = self.node.cluster.then(|| Presence { member: member.id.clone(), entry: None });
                self.relay_frame(&paper_id, presence, Relaying::Leave);
            }
            _ => {}
        }
    }

    /// Announces every member of this loop again (a `join` each, and its presence
    /// entry): other nodes may have declared this one gone and dropped them, or the
    /// relay was away while they joined.
    pub(super) fn reannounce(&mut self) {
        if !self.node.cluster {
            return;
        }
        let mut announced = 0;
        let papers: Vec<(Arc<str>, Vec<Member>)> =
            self.papers.papers_mut().map(|p| (p.id.clone(), p.members().to_vec())).collect();
        for (paper, members) in papers {
            for member in members {
                let presence = presence_entry(&self.node.node_id, &member);
                self.frame.join(&member.view());
                self.relay_frame(&paper, Some(presence), Relaying::Kept);
                announced += 1;
            }
        }
        if announced > 0 {
            log::info!("announced {announced} members again to the other nodes");
        }
    }
}

/// A member's presence entry (`rp:paper:{P}:members`), as this node writes it.
fn presence_entry(node_id: &str, member: &Member) -> Presence {
    let entry = serde_json::json!({"user": &*member.user, "name": &*member.name, "node": node_id});
    Presence { member: member.id.clone(), entry: Some(entry.to_string()) }
}

/// How a relayed message may be treated when the backlog is busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relaying {
    /// A join: kept unless the backlog is full (a lost one is mended: the loop
    /// announces its members again once the backlog has room).
    Kept,
    /// A leave: always kept, whatever the backlog holds, or other nodes would show
    /// a member that is gone for as long as the paper lives. Bounded by the joins.
    Leave,
    /// A cursor: dropped first, while the backlog is half full.
    Transient,
}
