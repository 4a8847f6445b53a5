//! Snapshots and `GET /papers` bodies, under the node's bound on the bytes being
//! written (`--max-snapshot-bytes-in-flight`). What every full snapshot of a
//! paper version and its document have in common is encoded once and shared by
//! every joiner and reader that still writes it; only the few bytes that differ
//! (the frame header, `you`, `members`, the HTTP head) are each connection's own.

use std::sync::Arc;

use super::event_loop::EventLoop;
use crate::conn::http::{self, Reply};
use crate::conn::Part;
use crate::metrics::bump;
use crate::paper::Resume;
use crate::protocol::{self as frame, CloseReason, NoteView, DOCUMENT_END};
use crate::shared::Shared;

/// A connection's own part of a snapshot above this size is counted in flight
/// too (a since-snapshot, the `members` of a crowded paper), not just copied.
const OWN_AT_MOST: usize = 32 * 1024;

impl EventLoop {
    /// The shared body of a paper's current version: the one some connection
    /// still writes, or a new one. `bounded`: `None` when a new one would pass
    /// the node's bound (the caller refuses); otherwise it is made whatever the
    /// bound (members already joined must get their snapshot).
    pub(super) fn paper_body(&mut self, paper_id: &str, bounded: bool) -> Option<Shared> {
        let paper = self.papers.paper_mut(paper_id)?;
        if let Some(body) = paper.shared_body() {
            return Some(body);
        }
        let in_flight = &self.node.in_flight;
        if bounded && in_flight.is_full() {
            return None;
        }
        let bytes = frame::paper_body(&paper.view(), paper.live_notes());
        if bounded && !in_flight.has_room(bytes.len()) {
            return None;
        }
        let body = Shared::new(bytes, in_flight);
        paper.remember_body(&body);
        Some(body)
    }

    /// Queues a full snapshot for the member `you`: its own start, the shared
    /// body, its own `members`. Returns the frame's length.
    pub(super) fn send_full_snapshot(&mut self, key: usize, paper_id: &str, you: &str, body: &Shared) -> usize {
        let Some(paper) = self.papers.paper(paper_id) else { return 0 };
        let end = frame::snapshot_end(paper.all_members());
        let end_len = end.len();
        let start = self.frame.snapshot_start(paper_id, you, body.len() + end_len);
        let total = start.len() + body.len() + end_len;
        if end_len > OWN_AT_MOST {
            let end = Shared::new(end, &self.node.in_flight);
            self.conns.send_parts(key, &[Part::Bytes(start), Part::Shared(body), Part::Shared(&end)]);
        } else {
            self.conns.send_parts(key, &[Part::Bytes(start), Part::Shared(body), Part::Bytes(&end)]);
        }
        total
    }

    /// Queues what a member resuming `since` a version may have missed
    /// (PROTOCOL.md 3.1, 1.1), or the full snapshot when that is what it needs.
    /// Returns the frame's length; `None` when a large one would pass the bound.
    pub(super) fn send_since_snapshot(&mut self, key: usize, paper_id: &str, you: &str, since: u64) -> Option<usize> {
        if matches!(self.papers.paper(paper_id)?.resume(since), Resume::Full) {
            let body = self.paper_body(paper_id, true)?;
            return Some(self.send_full_snapshot(key, paper_id, you, &body));
        }
        let paper = self.papers.paper(paper_id)?;
        let Resume::Since(since, changed) = paper.resume(since) else { return None };
        let live = changed.iter().filter_map(|c| {
            let data = c.note.data.as_deref()?;
            Some(NoteView { id: c.id, author: &c.note.author, data, v: c.note.v })
        });
        let deleted = changed.iter().filter(|c| c.note.data.is_none()).map(|c| (c.id, c.note.v));
        let snapshot = self.frame.snapshot_since(&paper.view(), you, Some(since), live, deleted, paper.all_members());
        let len = snapshot.len();
        if len <= OWN_AT_MOST {
            self.conns.send(key, snapshot);
            return Some(len);
        }
        let in_flight = &self.node.in_flight;
        if !in_flight.has_room(len) {
            return None;
        }
        let shared = Shared::new(snapshot.to_vec(), in_flight);
        self.conns.send_parts(key, &[Part::Shared(&shared)]);
        Some(len)
    }

    /// `GET /papers/{paper}` of a paper in memory: the body of its version,
    /// shared with every other reply and snapshot of it, or 503 past the bound.
    pub(super) fn reply_paper(&mut self, key: usize, paper_id: &Arc<str>) {
        match self.paper_body(paper_id, true) {
            Some(body) => self.reply_body(key, paper_id, &body),
            None => self.refuse_read(key),
        }
    }

    /// `GET /papers/{paper}` of a paper read for this request alone.
    pub(super) fn reply_read(&mut self, key: usize, paper: &crate::paper::Paper) {
        let bytes = frame::paper_body(&paper.view(), paper.live_notes());
        if !self.node.in_flight.has_room(bytes.len()) {
            return self.refuse_read(key);
        }
        let body = Shared::new(bytes, &self.node.in_flight);
        self.reply_body(key, &paper.id, &body);
    }

    /// A read past the node's bound: retry shortly.
    fn refuse_read(&mut self, key: usize) {
        bump(&self.metrics.snapshots_refused, 1);
        let mut reply = Reply::text(503, "this node is writing as many snapshots as it may; retry shortly");
        reply.extra_headers = "Retry-After: 1\r\n";
        self.reply(key, &reply);
    }

    /// A joiner past the node's bound: closed with 1013 `server_busy`, to retry.
    pub(super) fn refuse_joiner(&mut self, key: usize) {
        bump(&self.metrics.snapshots_refused, 1);
        self.end_session(key, CloseReason::Busy);
    }

    fn reply_body(&mut self, key: usize, paper_id: &str, body: &Shared) {
        let start = frame::document_start(paper_id);
        let length = start.len() + body.len() + DOCUMENT_END.len();
        let mut own = http::head(200, "application/json", "", length).into_bytes();
        own.extend_from_slice(&start);
        let Some(conn) = self.conns.slab.get_mut(key) else { return };
        if conn.reply_parts(&[Part::Bytes(&own), Part::Shared(body), Part::Bytes(DOCUMENT_END)]) {
            self.metrics.http_response(200);
            self.conns.queue_flush(key);
        }
    }
}
