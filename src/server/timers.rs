//! Everything a loop does by the clock: connection deadlines, token expiries,
//! loads that take too long, pings and the idle timeout, dropping idle papers
//! from memory, and the ordered stop (sessions closed over `--drain-seconds`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::event_loop::EventLoop;
use super::session::CLOSE_TIMEOUT;
use crate::conn::Phase;
use crate::protocol::CloseReason;
use crate::store::Op;

/// How often idle papers are looked for.
const EVICT_EVERY: Duration = Duration::from_secs(1);
/// A WebSocket ping frame without payload: the server's keep-alive.
const PING_FRAME: [u8; 2] = [0x89, 0x00];

/// A loop that was told to stop: its sessions still to close, and how many
/// there were.
pub struct Stopping {
    since: Instant,
    draining: VecDeque<(usize, u64)>,
    total: usize,
}

/// A loop's clock, owned: connection deadlines and token expiries (each with
/// the serial of the connection it was set for: a connection that moved on is
/// skipped when its entry comes due), and when to ping and to evict next.
pub struct Timers {
    deadlines: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    expiries: BinaryHeap<Reverse<(u64, usize, u64)>>,
    next_ping: Instant,
    next_eviction: Instant,
}

impl Timers {
    pub fn new(now: Instant, ping_interval: Duration) -> Timers {
        Timers {
            deadlines: BinaryHeap::new(),
            expiries: BinaryHeap::new(),
            next_ping: now + ping_interval,
            next_eviction: now + EVICT_EVERY,
        }
    }

    /// The connection `key` (with `serial`) must be past its phase at `at`.
    pub fn deadline(&mut self, at: Instant, key: usize, serial: u64) {
        self.deadlines.push(Reverse((at, key, serial)));
    }

    /// The session `key` (with `serial`) ends when its token expires (unix seconds).
    pub fn expiry(&mut self, exp: u64, key: usize, serial: u64) {
        self.expiries.push(Reverse((exp, key, serial)));
    }

    /// The next deadline due by `now`, taken.
    fn due_deadline(&mut self, now: Instant) -> Option<(usize, u64)> {
        let &Reverse((at, key, serial)) = self.deadlines.peek()?;
        (at <= now).then(|| {
            self.deadlines.pop();
            (key, serial)
        })
    }

    /// The next token expiry due by `now` (unix seconds), taken.
    fn due_expiry(&mut self, now: u64) -> Option<(usize, u64)> {
        let &Reverse((exp, key, serial)) = self.expiries.peek()?;
        (exp <= now).then(|| {
            self.expiries.pop();
            (key, serial)
        })
    }

    /// Whether it is time to ping (then not again for `interval`).
    fn ping_due(&mut self, now: Instant, interval: Duration) -> bool {
        let due = now >= self.next_ping;
        if due {
            self.next_ping = now + interval;
        }
        due
    }

    /// Whether it is time to look for idle papers (then not again for `EVICT_EVERY`).
    fn eviction_due(&mut self, now: Instant) -> bool {
        let due = now >= self.next_eviction;
        if due {
            self.next_eviction = now + EVICT_EVERY;
        }
        due
    }

    /// Entries held, due or not (the `timer_entries` gauge).
    pub fn len(&self) -> usize {
        self.deadlines.len() + self.expiries.len()
    }
}

impl EventLoop {
    pub(super) fn run_timers(&mut self) {
        let now = Instant::now();
        self.expire_deadlines(now);
        self.expire_tokens();
        if self.stopping.is_some() {
            self.drain(now);
        }
        self.expire_loads(now);
        if !self.probes.is_empty() {
            self.run_probes(now);
        }
        if self.timers.ping_due(now, self.node.settings.ping_interval) {
            self.ping_or_close_idle(now);
        }
        if self.timers.eviction_due(now) {
            self.evict_idle_papers(now);
            self.erased.expire(now);
            self.prune_tombstones();
            self.publish_gauges();
            // Joins dropped while the backlog was full are mended once it drains.
            if self.presence_dropped.get() && !self.store.is_busy() {
                self.presence_dropped.set(false);
                self.reannounce();
            }
        }
    }

    /// Connections whose phase outlived its deadline: a joiner is told the paper
    /// is unavailable, anything else is dropped.
    fn expire_deadlines(&mut self, now: Instant) {
        while let Some((key, serial)) = self.timers.due_deadline(now) {
            let Some(conn) = self.conns.live(key, serial) else { continue };
            if conn.deadline.is_none_or(|d| d > now) {
                continue; // moved on to a phase with another deadline, or none
            }
            match conn.phase {
                Phase::Joining { .. } => self.end_session(key, CloseReason::PaperUnavailable),
                Phase::Admitting { .. } => {
                    self.leave_paper(key);
                    self.paper_unavailable(key);
                }
                Phase::Api { .. } => self.call_timed_out(key),
                // Its snapshot is not written yet: it does not read.
                Phase::Open { .. } => self.end_session(key, CloseReason::SlowConsumer),
                Phase::Reading { .. } => {
                    // Stop waiting for the read (it may never be answered), then say so.
                    self.leave_paper(key);
                    self.paper_unavailable(key);
                    self.set_deadline(key, now + self.node.settings.handshake_timeout);
                }
                _ => self.conns.doom(key),
            }
        }
    }

    /// Drops heap entries of connections gone or moved on, once they outnumber the
    /// connections by far: a stale entry is skipped when due, but a token may be
    /// valid for days, and thousands of short sessions would each leave one.
    pub(super) fn compact_timers(&mut self) {
        let bound = 2 * self.conns.slab.len() + 64;
        let (timers, conns) = (&mut self.timers, &self.conns);
        if timers.expiries.len() > bound {
            timers.expiries.retain(|Reverse((_, key, serial))| {
                conns.live(*key, *serial).is_some_and(|c| matches!(c.phase, Phase::Joining { .. } | Phase::Open { .. }))
            });
        }
        if timers.deadlines.len() > bound {
            timers.deadlines.retain(|Reverse((at, key, serial))| {
                conns.live(*key, *serial).is_some_and(|c| c.deadline == Some(*at))
            });
        }
    }

    fn expire_tokens(&mut self) {
        let now_secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        while let Some((key, serial)) = self.timers.due_expiry(now_secs) {
            let is_session = self
                .conns
                .live(key, serial)
                .is_some_and(|c| matches!(c.phase, Phase::Joining { .. } | Phase::Open { .. }));
            if is_session {
                self.end_session(key, CloseReason::TokenExpired);
            }
        }
    }

    fn expire_loads(&mut self, now: Instant) {
        let (papers, waiters) = self.papers.expire_loads(now);
        for key in waiters {
            self.paper_unavailable(key);
        }
        for paper in papers {
            self.store.forget(paper);
        }
    }

    /// Tombstones past retention go (PROTOCOL.md 4, 1.1), in memory and in
    /// Redis, even if the paper is never written again; the cap is kept at each
    /// delete.
    fn prune_tombstones(&mut self) {
        let now_ms = crate::paper::clock::now_ms();
        let limits = self.node.settings.limits;
        for paper in self.papers.papers_mut() {
            if paper.prune(now_ms, &limits) > 0 {
                // Best effort: with the backlog full, the paper's next write prunes.
                let _ = self.store.submit(Op::Prune { paper: paper.id.clone() });
            }
        }
    }

    fn evict_idle_papers(&mut self, now: Instant) {
        let Some(linger) = self.node.settings.paper_linger else { return };
        for paper in self.papers.evict_idle(now, linger) {
            log::debug!("paper {paper} left memory");
            self.store.forget(paper);
        }
    }

    /// Pings every member, and closes the ones silent past the idle timeout (a
    /// browser answers pings by itself, so only a dead peer stays silent). An
    /// `/echo` connection silent that long is closed too.
    fn ping_or_close_idle(&mut self, now: Instant) {
        let idle_timeout = self.node.settings.idle_timeout;
        let mut idle = Vec::new();
        let mut pinged = Vec::new();
        for (key, conn) in &mut self.conns.slab {
            if conn.doomed || !matches!(conn.phase, Phase::Open { .. } | Phase::Echo { .. }) {
                continue;
            }
            if now.duration_since(conn.last_seen) >= idle_timeout {
                idle.push(key);
            } else if let Phase::Open { ws, .. } = &mut conn.phase {
                ws.get_mut().out.queue(&PING_FRAME);
                pinged.push(key);
            }
        }
        for key in pinged {
            self.conns.queue_flush(key);
        }
        for key in idle {
            self.end_session(key, CloseReason::Idle);
        }
    }

    pub(super) fn stop(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        if let Some(mut internal) = self.internal.take() {
            let _ = self.poll.registry().deregister(&mut internal);
        }
        let mut draining = VecDeque::new();
        let mut not_begun = Vec::new();
        let mut waiting = Vec::new();
        for (key, conn) in &self.conns.slab {
            match conn.phase {
                Phase::Request { .. } | Phase::Reply { .. } | Phase::Reading { .. } => not_begun.push(key),
                Phase::Admitting { .. } | Phase::Api { .. } => waiting.push(key),
                Phase::Joining { .. } | Phase::Open { .. } | Phase::Echo { .. } => {
                    draining.push_back((key, conn.serial))
                }
                Phase::Closing { .. } | Phase::Detached => {}
            }
        }
        for key in not_begun {
            self.conns.doom(key);
        }
        // Answered as they would be a moment later: an upgrade is closed with
        // 1001 as every session, a call is told to retry (its change, if handed
        // to the store, is still written).
        for key in waiting {
            self.leave_paper(key);
            if matches!(self.conns.slab.get(key).map(|c| &c.phase), Some(Phase::Api { .. })) {
                self.answer_call(key, &crate::api::error(503, "unavailable", "this node is shutting down; retry"));
            } else if self.open_session(key) {
                draining.push_back((key, self.conns.slab[key].serial));
            }
        }
        let total = draining.len();
        self.stopping = Some(Stopping { since: Instant::now(), draining, total });
        self.drain(Instant::now());
    }

    /// Closes the share of the sessions due by now: all at once without
    /// `--drain-seconds`, else evenly over that time.
    fn drain(&mut self, now: Instant) {
        let Some(stopping) = &mut self.stopping else { return };
        let spread = self.node.settings.drain.as_secs_f64();
        let share =
            if spread > 0.0 { (now.duration_since(stopping.since).as_secs_f64() / spread).min(1.0) } else { 1.0 };
        let due = (stopping.total as f64 * share).ceil() as usize;
        let mut closing = Vec::new();
        while stopping.total - stopping.draining.len() < due {
            let Some(entry) = stopping.draining.pop_front() else { break };
            closing.push(entry);
        }
        for (key, serial) in closing {
            if self.conns.live(key, serial).is_some_and(|c| c.phase.is_session()) {
                self.end_session(key, CloseReason::ShuttingDown);
            }
        }
    }

    /// Stopped, with every session closed (or given up on past its close time).
    pub(super) fn finished(&self) -> bool {
        self.stopping.as_ref().is_some_and(|s| {
            s.draining.is_empty()
                && (self.conns.slab.is_empty() || s.since.elapsed() > self.node.settings.drain + CLOSE_TIMEOUT * 2)
        })
    }
}
