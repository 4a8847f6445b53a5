//! One event loop thread: a mio `Poll`, its connections in a slab, and the papers
//! it owns. Each turn polls, dispatches by token, drains the inbox, resumes reads
//! left over by a budget, runs timers, flushes every connection with output once,
//! then drops the connections marked to go. Nothing here blocks.
//!
//! The work itself lives beside this file, one responsibility each:
//! `admission` (accepting, HTTP routes, hand-over between loops), `session`
//! (upgrade, join, reading under the rate limit, leaving, closing), `edits`
//! (what a member's message does, `saved`), `cluster` (other nodes' changes),
//! `timers` (deadlines, pings, eviction, shutdown).

use std::cell::Cell;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};

use super::conns::Conns;
use super::inbox::{owner_loop, InboxMsg, LoopHandle};
use super::node::Node;
use super::reads::{Erasures, Reads};
use super::session::CLOSE_TIMEOUT;
use super::timers::{Stopping, Timers};
use crate::conn::{Next, Phase};
use crate::metrics::{bump, LoopMetrics};
use crate::paper::registry::Registry;
use crate::paper::VersionClock;
use crate::protocol::Frame;
use crate::store::{StoreEvent, StoreHandle};

pub const LISTENER: Token = Token(usize::MAX - 1);
pub const INTERNAL_LISTENER: Token = Token(usize::MAX - 2);
pub const WAKER: Token = Token(usize::MAX);

/// The longest sleep of a loop with nothing to do; timers run at this resolution.
const TICK: Duration = Duration::from_millis(100);

pub struct EventLoop {
    pub(super) index: usize,
    /// This loop's counters (the node renders every loop's).
    pub(super) metrics: Arc<LoopMetrics>,
    pub(super) poll: Poll,
    /// `None` once stopping.
    pub(super) listener: Option<TcpListener>,
    /// `--internal-listen` (PROTOCOL.md 7): the backend API, `/metrics` and
    /// `/readyz`; `None` without one, and once stopping.
    pub(super) internal: Option<TcpListener>,
    /// The last accept stopped at the socket cap or the descriptor limit, with
    /// connections possibly left in the queue: accept again next turn.
    pub(super) accept_retry: bool,
    pub(super) conns: Conns,
    pub(super) papers: Registry,
    inbox: Receiver<InboxMsg>,
    pub(super) loops: Arc<[LoopHandle]>,
    pub(super) store: StoreHandle,
    pub(super) node: Arc<Node>,
    pub(super) clock: VersionClock,
    /// Scratch for encoding one server message at a time.
    pub(super) frame: Frame,
    /// When the client message being handled was read (`edit_broadcast_seconds`).
    pub(super) read_at: Instant,
    /// Connections whose read budget ran out last turn.
    pub(super) read_list: Vec<usize>,
    /// Deadlines, token expiries, and when to ping and evict next.
    pub(super) timers: Timers,
    /// Papers read for one request each, kept by nobody.
    pub(super) reads: Reads,
    /// Bytes held by this loop's connections' own output buffers, as last flushed.
    pub(super) output_held: usize,
    /// A presence join was dropped (backlog full): announce the members again
    /// once the backlog has room.
    pub(super) presence_dropped: Cell<bool>,
    /// WebSocket sessions on this loop, joining or joined.
    pub(super) session_count: u64,
    pub(super) stopping: Option<Stopping>,
    /// Papers Redis refused to write: when to read each again, and the wait after.
    pub(super) probes: Vec<(Instant, Duration, Arc<str>)>,
    /// Papers erased (PROTOCOL.md 7): they answer 410 and take no write.
    pub(super) erased: Erasures,
}

impl EventLoop {
    pub fn new(
        index: usize,
        poll: Poll,
        (mut listener, mut internal): (TcpListener, Option<TcpListener>),
        inbox: Receiver<InboxMsg>,
        loops: Arc<[LoopHandle]>,
        store: StoreHandle,
        node: Arc<Node>,
    ) -> io::Result<Self> {
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        if let Some(internal) = &mut internal {
            poll.registry().register(internal, INTERNAL_LISTENER, Interest::READABLE)?;
        }
        let now = Instant::now();
        Ok(EventLoop {
            index,
            metrics: node.loop_metrics[index].clone(),
            poll,
            listener: Some(listener),
            internal,
            accept_retry: false,
            conns: Conns::new(node.in_flight.clone()),
            papers: Registry::new(),
            inbox,
            loops,
            store,
            clock: VersionClock::new(node.node_id.clone()),
            frame: Frame::new(),
            read_at: now,
            read_list: Vec::new(),
            timers: Timers::new(now, node.settings.ping_interval),
            reads: Reads::default(),
            output_held: 0,
            presence_dropped: Cell::new(false),
            session_count: 0,
            stopping: None,
            probes: Vec::new(),
            erased: Erasures::default(),
            node,
        })
    }

    /// Runs until stopped and every session is closed.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            if let Err(e) = self.poll(&mut events) {
                log::error!("event loop {} cannot poll: {e}", self.index);
                return;
            }
            let turn = Instant::now();
            self.dispatch(&events);
            self.drain_inbox();
            self.resume_reads();
            self.run_timers();
            self.flush();
            self.reap();
            if self.accept_retry {
                self.accept();
                self.accept_internal();
            }
            self.metrics.loop_turn.observe(turn.elapsed());
            if self.finished() {
                return;
            }
        }
    }

    /// Waits for events; not at all when work is left over from the last turn.
    fn poll(&mut self, events: &mut Events) -> io::Result<()> {
        let busy = !self.read_list.is_empty() || self.conns.has_output();
        let timeout = if busy { Duration::ZERO } else { TICK };
        match self.poll.poll(events, Some(timeout)) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            other => other,
        }
    }

    fn dispatch(&mut self, events: &Events) {
        for event in events.iter() {
            match event.token() {
                LISTENER => self.accept(),
                INTERNAL_LISTENER => self.accept_internal(),
                WAKER => {} // the inbox is drained below, woken or not
                Token(key) => {
                    if event.is_writable() {
                        self.conns.queue_flush(key);
                    }
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        self.on_readable(key);
                    }
                }
            }
        }
    }

    /// Reads what a connection sent, as its phase expects.
    pub(super) fn on_readable(&mut self, key: usize) {
        let Some(conn) = self.conns.slab.get_mut(key) else { return };
        if conn.doomed {
            return;
        }
        conn.read_pending = false;
        let next = match conn.phase {
            Phase::Request { .. } => return self.read_request(key),
            Phase::Open { .. } => return self.read_messages(key),
            Phase::Joining { .. } | Phase::Admitting { .. } => {
                // Read once the session is open: its messages need the paper.
                conn.read_pending = true;
                return;
            }
            Phase::Echo { .. } => {
                conn.last_seen = Instant::now();
                let next = conn.read_echo();
                self.conns.queue_flush(key);
                next
            }
            Phase::Closing { .. } => {
                let next = conn.read_leftovers();
                self.conns.queue_flush(key);
                next
            }
            Phase::Reply { .. } | Phase::Reading { .. } | Phase::Api { .. } => conn.read_leftovers(),
            Phase::Detached => Next::Continue,
        };
        self.act(key, next);
    }

    /// Does what a connection's step asked for.
    pub(super) fn act(&mut self, key: usize, next: Next) {
        match next {
            Next::Continue => {}
            Next::ReadAgain => {
                if let Some(conn) = self.conns.slab.get_mut(key) {
                    conn.read_pending = true;
                    self.read_list.push(key);
                }
            }
            Next::Close(reason) => self.end_session(key, reason),
            Next::Drop => self.conns.doom(key),
        }
    }

    fn drain_inbox(&mut self) {
        while let Ok(msg) = self.inbox.try_recv() {
            match msg {
                InboxMsg::Adopt(adopted) => self.adopt(adopted),
                InboxMsg::Store(StoreEvent::Written(written)) => self.on_written(written),
                InboxMsg::Store(StoreEvent::Loaded { paper, purpose, stored }) => {
                    self.on_loaded(&paper, purpose, stored)
                }
                InboxMsg::Store(StoreEvent::Sealed { paper, by, notes, origin }) => {
                    self.on_sealed(&paper, &by, &notes, origin.is_some());
                    if let Some(origin) = origin {
                        self.call_sealed(origin, &paper);
                    }
                }
                InboxMsg::Store(StoreEvent::Failed { paper, error }) => self.on_failed(&paper, error),
                InboxMsg::Store(StoreEvent::Relayed { paper, node, message }) => self.on_relayed(&paper, node, message),
                InboxMsg::Store(StoreEvent::NodeGone(node)) => self.node_gone(&node),
                InboxMsg::Store(StoreEvent::Reannounce) => self.reannounce(),
                InboxMsg::Stop => self.stop(),
            }
        }
    }

    fn resume_reads(&mut self) {
        for key in std::mem::take(&mut self.read_list) {
            if self.conns.slab.get(key).is_some_and(|c| c.read_pending) {
                self.on_readable(key);
            }
        }
    }

    /// Writes every queued output once; what is done or broken is marked to go.
    fn flush(&mut self) {
        let max_outbound = self.node.settings.max_outbound_bytes;
        let mut written = 0;
        while let Some(key) = self.conns.next_to_flush() {
            let Some(conn) = self.conns.slab.get_mut(key) else { continue };
            conn.flush_queued = false;
            if conn.doomed {
                continue;
            }
            let Some(io) = conn.phase.io() else { continue };
            let before = io.out.pending();
            let flushed = io.flush();
            written += before.saturating_sub(io.out.pending()) as u64;
            let held = io.out.held();
            self.output_held = self.output_held + held - conn.held_out;
            conn.held_out = held;
            let next = conn.after_flush(flushed, max_outbound);
            if matches!(conn.phase, Phase::Closing { .. }) && conn.phase.io().is_some_and(|io| io.out.pending() == 0) {
                // The close frame is out (a slow consumer's may have waited long for
                // room): from here the usual close handshake time applies.
                let soon = Instant::now() + CLOSE_TIMEOUT;
                if conn.deadline.is_some_and(|d| d > soon) {
                    self.set_deadline(key, soon);
                }
            }
            // A slow consumer's close frame is queued here and written in this
            // same pass: its key is back on the flush list.
            self.act(key, next);
        }
        bump(&self.metrics.bytes_out, written);
        self.metrics.output_buffer_bytes.store(self.output_held as u64, Ordering::Relaxed);
    }

    /// Drops the connections marked this turn (Redis's `beforeSleep` order: after
    /// the flush, so that nothing looks a connection up once it may be gone).
    fn reap(&mut self) {
        for key in self.conns.take_doomed() {
            self.remove(key);
        }
    }

    /// Drops a connection: a member leaves its paper first, and its session slot
    /// goes back to the node.
    fn remove(&mut self, key: usize) {
        self.leave_paper(key);
        let Some(conn) = self.conns.slab.try_remove(key) else { return };
        self.node.release_socket();
        self.output_held -= conn.held_out;
        if conn.head {
            self.node.release_head(conn.peer.ip());
        }
        if conn.counted {
            self.node.release(conn.peer.ip());
            self.session_count = self.session_count.saturating_sub(1);
        }
        self.compact_timers();
        if conn.counted {
            self.publish_gauges();
        }
        let mut phase = conn.phase;
        if let Some(io) = phase.io() {
            let _ = self.poll.registry().deregister(&mut io.stream);
        }
    }

    /// A joiner stops waiting for its paper to be read (it joins, or is closed).
    pub(super) fn load_waited(&self, key: usize) {
        if let Some(Phase::Joining { asked, .. }) = self.conns.slab.get(key).map(|c| &c.phase) {
            self.metrics.load_wait.observe(asked.elapsed());
        }
    }

    /// Publishes this loop's gauges; cheap enough to call at every change.
    pub(super) fn publish_gauges(&self) {
        let metrics = &self.metrics;
        metrics.papers.store(self.papers.len() as u64, Ordering::Relaxed);
        metrics.sessions.store(self.session_count, Ordering::Relaxed);
        metrics.timer_entries.store(self.timers.len() as u64, Ordering::Relaxed);
    }

    pub(super) fn owner_of(&self, paper: &str) -> usize {
        owner_loop(paper, self.loops.len())
    }

    /// A session's id: short, unique for the process, and with `--cluster` among
    /// the nodes too.
    pub(super) fn member_id(&self, serial: u64) -> String {
        if self.node.cluster {
            format!("c{serial}-{}", self.node.node_id)
        } else {
            format!("c{serial}")
        }
    }
}
