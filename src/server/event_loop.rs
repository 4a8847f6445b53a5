//! One event loop thread: a mio `Poll`, its connections in a slab, and the papers
//! it owns. Each turn polls, dispatches by token, drains the inbox, resumes reads
//! left over by a budget, runs timers, flushes every connection with output once,
//! and drops the closed ones. Nothing here blocks.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Receiver;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::{Message, WebSocket};

use super::inbox::{owner_loop, Handoff, InboxMsg, LoopHandle};
use super::node::Node;
use crate::conn::http::{self, Parsed, Reply, Route, Upgrade};
use crate::conn::{self, Conn, Flushed, Io, Phase, Session, Visitor};
use crate::metrics::{bump, LoopMetrics};
use crate::paper::registry::{Lookup, Registry};
use crate::paper::RemoteMember;
use crate::paper::{Edit, Member, Note, VersionClock};
use crate::protocol::{self, ClientMsg, CloseReason, ErrorCode, Frame, Refusal};
use crate::rate::{TokenBucket, Verdict};
use crate::store::{LoadRequest, Op, Origin, Presence, StoreHandle, Written};

pub const LISTENER: Token = Token(usize::MAX - 1);
pub const WAKER: Token = Token(usize::MAX);

/// Messages read from one connection before others get their turn.
const MAX_MESSAGES_PER_READ: usize = 64;
/// How long a closing session may take to answer the close frame and drain.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest sleep of a loop with nothing to do; timers run at this resolution.
const TICK: Duration = Duration::from_millis(100);
/// How often idle papers are looked for.
const EVICT_EVERY: Duration = Duration::from_secs(1);
/// A WebSocket ping frame without payload: the server's keep-alive.
const PING_FRAME: [u8; 2] = [0x89, 0x00];

/// The connections of a loop and their pending output. Separate from the papers
/// so that a broadcast can borrow a paper's members and the connections at once.
struct Sessions {
    conns: Slab<Conn>,
    /// Connections with output to write this turn, each once.
    flush_list: Vec<usize>,
}

impl Sessions {
    /// Queues an encoded frame for one connection. Whether it keeps up is judged
    /// when its output is written, not here: one turn may queue a burst that a
    /// healthy reader takes at once.
    fn send(&mut self, key: usize, bytes: &[u8]) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        let Some(io) = conn.phase.io() else { return };
        io.out.queue(bytes);
        if !conn.flush_queued {
            conn.flush_queued = true;
            self.flush_list.push(key);
        }
    }

    /// Queues the same encoded frame for every member but `except`: one copy each,
    /// no allocation once the output buffers have grown. Returns the recipients.
    fn broadcast(&mut self, members: &[Member], except: Option<usize>, bytes: &[u8]) -> u64 {
        let mut recipients = 0;
        for member in members {
            if Some(member.key) != except {
                self.send(member.key, bytes);
                recipients += 1;
            }
        }
        recipients
    }

    fn queue_flush(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.flush_queued {
                conn.flush_queued = true;
                self.flush_list.push(key);
            }
        }
    }
}

/// How a WebSocket read ended.
enum ReadEnd {
    /// The socket has no more data for now.
    Drained,
    /// The budget ran out; more may be waiting.
    Budget,
    /// The session ended (closed, failed or removed).
    Ended,
}

pub struct EventLoop {
    index: usize,
    poll: Poll,
    listener: Option<TcpListener>,
    sessions: Sessions,
    papers: Registry,
    inbox: Receiver<InboxMsg>,
    loops: Arc<[LoopHandle]>,
    store: StoreHandle,
    node: Arc<Node>,
    clock: VersionClock,
    /// Scratch for encoding one server message at a time.
    frame: Frame,
    /// Connections whose read budget ran out last turn.
    read_list: Vec<usize>,
    /// Deadlines in the order they were set, with the serial they were set for.
    request_deadlines: VecDeque<(Instant, usize, u64)>,
    close_deadlines: VecDeque<(Instant, usize, u64)>,
    /// Token expiries (seconds since the epoch), soonest first.
    expiries: BinaryHeap<Reverse<(u64, usize, u64)>>,
    /// Sessions joined or waiting on this loop.
    session_count: u64,
    stopping: Option<Instant>,
    /// Sessions still to close while stopping, and how many there were.
    draining: VecDeque<(usize, u64)>,
    drain_total: usize,
    next_eviction: Instant,
    next_ping: Instant,
}

impl EventLoop {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: usize,
        poll: Poll,
        mut listener: TcpListener,
        inbox: Receiver<InboxMsg>,
        loops: Arc<[LoopHandle]>,
        store: StoreHandle,
        node: Arc<Node>,
    ) -> io::Result<Self> {
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let now = Instant::now();
        Ok(EventLoop {
            index,
            poll,
            listener: Some(listener),
            sessions: Sessions { conns: Slab::with_capacity(1024), flush_list: Vec::new() },
            papers: Registry::new(),
            inbox,
            loops,
            store,
            clock: VersionClock::new(node.node_id.clone()),
            frame: Frame::new(),
            read_list: Vec::new(),
            request_deadlines: VecDeque::new(),
            close_deadlines: VecDeque::new(),
            expiries: BinaryHeap::new(),
            session_count: 0,
            stopping: None,
            draining: VecDeque::new(),
            drain_total: 0,
            next_eviction: now + EVICT_EVERY,
            next_ping: now + node.settings.ping_interval,
            node,
        })
    }

    fn metrics(&self) -> &LoopMetrics {
        &self.node.loop_metrics[self.index]
    }

    /// Publishes this loop's gauges; cheap enough to call at every change.
    fn publish_gauges(&self) {
        let metrics = self.metrics();
        metrics.papers.store(self.papers.len() as u64, Ordering::Relaxed);
        metrics.sessions.store(self.session_count, Ordering::Relaxed);
    }

    /// Runs until stopped and every session is closed.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = if self.read_list.is_empty() { TICK } else { Duration::ZERO };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("event loop {} cannot poll: {e}", self.index);
                return;
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {} // the inbox is drained below, woken or not
                    Token(key) => {
                        if event.is_writable() {
                            self.sessions.queue_flush(key);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.on_readable(key);
                        }
                    }
                }
            }
            self.drain_inbox();
            self.resume_reads();
            self.run_timers();
            self.flush();
            if self.finished() {
                return;
            }
        }
    }

    fn finished(&self) -> bool {
        self.stopping.is_some_and(|since| {
            self.draining.is_empty()
                && (self.sessions.conns.is_empty() || since.elapsed() > self.node.settings.drain + CLOSE_TIMEOUT * 2)
        })
    }

    // ---- accepting and routing -------------------------------------------------

    fn accept(&mut self) {
        loop {
            let Some(listener) = &self.listener else { return };
            match listener.accept() {
                Ok((stream, peer)) => {
                    bump(&self.metrics().connections_accepted, 1);
                    let serial = self.node.serials.fetch_add(1, Ordering::Relaxed);
                    if let Some(key) = self.register(stream, peer, serial) {
                        let deadline = Instant::now() + self.node.settings.handshake_timeout;
                        self.request_deadlines.push_back((deadline, key, serial));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors, most likely: the connection stays in the
                    // kernel's queue and is tried again at the next accept event.
                    log::warn!("cannot accept a connection: {e}");
                    return;
                }
            }
        }
    }

    fn register(&mut self, mut stream: TcpStream, peer: SocketAddr, serial: u64) -> Option<usize> {
        let entry = self.sessions.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(&mut stream, Token(key), Interest::READABLE | Interest::WRITABLE)
        {
            log::warn!("cannot register a connection from {peer}: {e}");
            return None;
        }
        // Small frames go out at once; the loop already batches a turn's output.
        let _ = stream.set_nodelay(true);
        entry.insert(Conn::new(Io::new(stream), serial, peer));
        Some(key)
    }

    /// Publishes what was just encoded (a join, leave or cursor) to the other nodes.
    fn relay_frame(&self, paper: &Arc<str>, presence: Option<Presence>, transient: bool) {
        let (Some(relay), StoreHandle::Redis { backlog, .. }) = (relay_of(&self.node, &self.frame), &self.store) else {
            return;
        };
        let op = Op::Relay { paper: paper.clone(), presence, relay };
        if transient {
            backlog.submit_transient(op);
        } else if backlog.submit(op).is_err() {
            log::warn!("backlog full: presence on paper {paper} is not relayed");
        }
    }

    fn owner_of(&self, paper: &str) -> usize {
        owner_loop(paper, self.loops.len())
    }

    fn on_readable(&mut self, key: usize) {
        let Some(conn) = self.sessions.conns.get_mut(key) else { return };
        match conn.phase {
            Phase::Request { .. } => self.read_request(key),
            Phase::Reply { .. } | Phase::Reading { .. } => self.discard_input(key),
            Phase::Joining { .. } => conn.read_pending = true,
            Phase::Open { .. } => self.read_messages(key),
            Phase::Echo { .. } => self.read_echo(key),
            Phase::Closing { .. } => self.read_closing(key),
            Phase::Gone => {}
        }
    }

    fn read_request(&mut self, key: usize) {
        let Some(conn) = self.sessions.conns.get_mut(key) else { return };
        let Phase::Request { io, buf } = &mut conn.phase else { return };
        let mut chunk = [0u8; 4096];
        loop {
            match io.stream.read(&mut chunk) {
                Ok(0) => return self.remove(key),
                Ok(n) => {
                    bump(&self.node.loop_metrics[self.index].bytes_in, n as u64);
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() >= http::MAX_REQUEST_BYTES {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.remove(key),
            }
        }
        match http::parse(buf, &self.node.policy) {
            Ok(Parsed::Partial) => {}
            Ok(Parsed::Complete { route: Route::Reply(reply), .. }) | Err(reply) => self.reply(key, &reply),
            Ok(Parsed::Complete { route: Route::Ready, .. }) => {
                let reply = match self.node.unready_reason() {
                    None => Reply::text(200, "ready"),
                    Some(reason) => Reply::text(503, &format!("not ready: {reason}")),
                };
                self.reply(key, &reply);
            }
            Ok(Parsed::Complete { route: Route::Metrics, .. }) => {
                let reply = Reply {
                    status: 200,
                    extra_headers: "",
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    body: self.node.render_metrics(),
                };
                self.reply(key, &reply);
            }
            Ok(Parsed::Complete { len, route: Route::Echo(ws_key) }) => {
                let rest = buf.split_off(len);
                let Phase::Request { mut io, .. } = std::mem::replace(&mut conn.phase, Phase::Gone) else { return };
                io.out.queue_head(&http::switching_protocols(&ws_key));
                conn.phase = Phase::Echo { ws: conn::server_websocket(io, rest, self.node.settings.ws_config) };
                conn.read_pending = true;
                self.read_list.push(key);
                self.sessions.queue_flush(key);
            }
            Ok(Parsed::Complete { route: Route::ReadPaper(paper), .. }) => {
                self.route(key, Handoff::ReadPaper { paper: Arc::from(paper) })
            }
            Ok(Parsed::Complete { len, route: Route::Upgrade(upgrade) }) => {
                // Behind a trusted proxy, the client is who the proxy says it is.
                let peer = self.node.client_address(conn.peer.ip(), upgrade.forwarded_for.as_deref());
                conn.peer = SocketAddr::new(peer, conn.peer.port());
                // The last check of PROTOCOL.md's order: the node's capacity.
                if !self.node.admit(peer) {
                    return self.reply(key, &Reply::text(503, "this node is at its connection limit; retry later"));
                }
                conn.counted = true;
                let rest = buf.split_off(len);
                self.route(key, Handoff::Upgrade { upgrade, rest });
            }
        }
    }

    fn reply(&mut self, key: usize, reply: &Reply) {
        let Some(conn) = self.sessions.conns.get_mut(key) else { return };
        let io = match std::mem::replace(&mut conn.phase, Phase::Gone) {
            Phase::Request { io, .. } | Phase::Reading { io, .. } => io,
            other => {
                conn.phase = other;
                return;
            }
        };
        conn.phase = Phase::Reply { io };
        self.sessions.send(key, &reply.to_bytes());
    }

    fn discard_input(&mut self, key: usize) {
        let Some(io) = self.sessions.conns.get_mut(key).and_then(|c| c.phase.io()) else { return };
        let mut chunk = [0u8; 1024];
        loop {
            match io.stream.read(&mut chunk) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => return self.remove(key),
            }
        }
    }

    /// Sends a request about a paper to the loop that owns the paper, or serves it here.
    fn route(&mut self, key: usize, handoff: Handoff) {
        let owner = self.owner_of(handoff.paper());
        if self.stopping.is_some() {
            // Not handed to another loop that may have stopped already: a session is
            // closed with 1001 at once, a read is told to come back.
            return match handoff {
                Handoff::Upgrade { .. } => self.start(key, handoff),
                Handoff::ReadPaper { .. } => self.reply(key, &Reply::text(503, "shutting down; retry")),
            };
        }
        if owner == self.index {
            return self.start(key, handoff);
        }
        let conn = self.sessions.conns.remove(key);
        let Phase::Request { mut io, .. } = conn.phase else { return };
        if let Err(e) = self.poll.registry().deregister(&mut io.stream) {
            log::warn!("cannot hand over a connection from {}: {e}", conn.peer);
            if conn.counted {
                self.node.release(conn.peer.ip());
            }
            return;
        }
        let msg =
            InboxMsg::Adopt { stream: io.stream, peer: conn.peer, serial: conn.serial, counted: conn.counted, handoff };
        self.loops[owner].send(msg);
    }

    fn adopt(&mut self, stream: TcpStream, peer: SocketAddr, serial: u64, counted: bool, handoff: Handoff) {
        match self.register(stream, peer, serial) {
            Some(key) => {
                self.sessions.conns[key].counted = counted;
                // While stopping, `start` closes a session with 1001 and answers a read 503.
                match handoff {
                    Handoff::ReadPaper { .. } if self.stopping.is_some() => {
                        self.reply(key, &Reply::text(503, "shutting down; retry"))
                    }
                    handoff => self.start(key, handoff),
                }
            }
            None if counted => self.node.release(peer.ip()),
            None => {}
        }
    }

    /// Starts what a request asked for, on the loop that owns its paper.
    fn start(&mut self, key: usize, handoff: Handoff) {
        match handoff {
            Handoff::Upgrade { upgrade, rest } => self.start_session(key, upgrade, rest),
            Handoff::ReadPaper { paper } => {
                let Some(conn) = self.sessions.conns.get_mut(key) else { return };
                let Phase::Request { io, .. } = std::mem::replace(&mut conn.phase, Phase::Gone) else { return };
                conn.phase = Phase::Reading { io, paper: paper.clone() };
                self.find_paper(key, paper);
            }
        }
    }

    /// Finds a paper for a joiner or a reader: at once if it is in memory, else
    /// once it has been read.
    fn find_paper(&mut self, key: usize, paper: Arc<str>) {
        if matches!(self.store, StoreHandle::Memory) && self.papers.paper(&paper).is_none() {
            // Reading a paper nobody opened answers it empty without keeping it: the
            // memory store never forgets a paper it holds.
            if self.sessions.conns.get(key).is_some_and(|c| matches!(c.phase, Phase::Reading { .. })) {
                let body = protocol::paper_document(&paper, false, std::iter::empty());
                let reply = Reply { status: 200, extra_headers: "", content_type: "application/json", body };
                return self.reply(key, &reply);
            }
            self.papers.insert_empty(&paper, &mut self.clock);
        }
        let deadline = Instant::now() + self.node.settings.load_timeout;
        let lookup = self.papers.lookup(&paper, key, deadline);
        self.publish_gauges();
        match lookup {
            Lookup::Ready => self.paper_ready(key),
            Lookup::Waiting => {}
            Lookup::StartLoad(attempt) => {
                if let StoreHandle::Redis { loads, .. } = &self.store {
                    loads.load(LoadRequest { paper, attempt, loop_index: self.index, deadline });
                }
            }
        }
    }

    /// The paper a connection waited for is in memory.
    fn paper_ready(&mut self, key: usize) {
        match self.sessions.conns.get(key).map(|c| &c.phase) {
            Some(Phase::Joining { .. }) => self.join(key),
            Some(Phase::Reading { paper, .. }) => {
                let body = match self.papers.paper(paper) {
                    Some(p) => protocol::paper_document(&p.id, p.is_completed(), p.live_notes()),
                    None => return,
                };
                let reply = Reply { status: 200, extra_headers: "", content_type: "application/json", body };
                self.reply(key, &reply);
            }
            _ => {}
        }
    }

    /// The paper a connection waited for could not be read in time.
    fn paper_unavailable(&mut self, key: usize) {
        match self.sessions.conns.get(key).map(|c| &c.phase) {
            Some(Phase::Joining { .. }) => self.end_session(key, CloseReason::PaperUnavailable),
            Some(Phase::Reading { .. }) => {
                self.reply(key, &Reply::text(503, "the paper cannot be read from Redis now; retry later"))
            }
            _ => {}
        }
    }

    // ---- sessions ----------------------------------------------------------------

    /// Answers 101 and joins the paper, or waits for it to be read.
    fn start_session(&mut self, key: usize, upgrade: Upgrade, rest: Vec<u8>) {
        let Some(conn) = self.sessions.conns.get_mut(key) else { return };
        let Phase::Request { mut io, .. } = std::mem::replace(&mut conn.phase, Phase::Gone) else { return };
        io.out.queue_head(&http::switching_protocols(&upgrade.key));
        let ws = conn::server_websocket(io, rest, self.node.settings.ws_config);
        let member_id = member_id(&self.node, conn.serial);
        let user: Arc<str> = upgrade.user.map_or_else(|| Arc::from(member_id.as_str()), Arc::from);
        let name: Arc<str> = upgrade.name.map_or_else(|| user.clone(), Arc::from);
        let paper: Arc<str> = Arc::from(upgrade.paper);
        log::debug!("session {member_id} from {} opens paper {paper} as {user}", conn.peer);
        conn.phase = Phase::Joining { ws, visitor: Visitor { paper: paper.clone(), user, name, role: upgrade.role } };
        // Bytes that came with the request head are read once the session is open.
        conn.read_pending = true;
        conn.last_seen = Instant::now();
        if let Some(exp) = upgrade.expires {
            self.expiries.push(Reverse((exp, key, conn.serial)));
        }
        self.session_count += 1;
        self.publish_gauges();
        self.sessions.queue_flush(key);
        if self.stopping.is_some() {
            return self.end_session(key, CloseReason::ShuttingDown);
        }
        self.find_paper(key, paper);
    }

    /// Makes a waiting session a member: snapshot to it, `join` to the others.
    fn join(&mut self, key: usize) {
        let Some(conn) = self.sessions.conns.get_mut(key) else { return };
        let Phase::Joining { visitor, .. } = &conn.phase else { return };
        let Some(paper) = self.papers.paper_mut(&visitor.paper) else { return };
        if paper.is_full_of_members(&self.node.settings.limits) {
            return self.end_session(key, CloseReason::PaperFull);
        }
        let Phase::Joining { ws, visitor } = std::mem::replace(&mut conn.phase, Phase::Gone) else { return };
        let member = Member {
            id: Arc::from(member_id(&self.node, conn.serial)),
            user: visitor.user.clone(),
            name: visitor.name,
            key,
        };
        let read_pending = conn.read_pending;
        let bucket = TokenBucket::new(self.node.settings.burst, Instant::now());
        let session =
            Session { paper: visitor.paper, member: member.id.clone(), user: visitor.user, role: visitor.role, bucket };
        conn.phase = Phase::Open { ws, session };

        let metrics = &self.node.loop_metrics[self.index];
        let join = self.frame.join(&member.view());
        let recipients = self.sessions.broadcast(paper.members(), None, join);
        metrics.message_out("join", recipients);
        let presence = self.node.cluster.then(|| Presence {
            member: member.id.clone(),
            entry: Some(
                serde_json::json!({"user": &*member.user, "name": &*member.name, "node": &*self.node.node_id})
                    .to_string(),
            ),
        });
        let paper_id = paper.id.clone();
        paper.add_member(member);
        self.relay_frame(&paper_id, presence, false);
        let Some(paper) = self.papers.paper(&paper_id) else { return };
        let you = &paper.members().last().expect("just added").id;
        let snapshot =
            self.frame.snapshot(&paper.id, you, paper.is_completed(), paper.live_notes(), paper.all_members());
        let snapshot_len = snapshot.len();
        self.sessions.send(key, snapshot);
        if let Some(conn) = self.sessions.conns.get_mut(key) {
            conn.grace = snapshot_len;
        }
        self.node.loop_metrics[self.index].message_out("snapshot", 1);
        if read_pending {
            self.read_list.push(key);
        }
    }

    /// Reads and handles messages until the socket is drained or the budget is spent.
    fn read_messages(&mut self, key: usize) {
        let end = self.read_budget(key);
        if let ReadEnd::Budget = end {
            self.read_list.push(key);
        }
        if let Some(conn) = self.sessions.conns.get_mut(key) {
            conn.read_pending = matches!(end, ReadEnd::Budget);
            if let Phase::Open { ws, .. } = &mut conn.phase {
                bump(&self.node.loop_metrics[self.index].bytes_in, std::mem::take(&mut ws.get_mut().bytes_in));
                // Pongs that tungstenite queued while reading move to the output now.
                let _ = ws.flush();
                if ws.get_ref().out.pending() > 0 {
                    self.sessions.queue_flush(key);
                }
            }
        }
    }

    fn read_budget(&mut self, key: usize) -> ReadEnd {
        let now = Instant::now();
        for _ in 0..MAX_MESSAGES_PER_READ {
            let Some(conn) = self.sessions.conns.get_mut(key) else { return ReadEnd::Ended };
            let Phase::Open { ws, session } = &mut conn.phase else { return ReadEnd::Ended };
            let message = ws.read();
            if !matches!(&message, Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock) {
                conn.last_seen = now;
            }
            if let Ok(Message::Text(_) | Message::Binary(_)) = &message {
                let settings = &self.node.settings;
                match session.bucket.take(settings.rate, settings.burst, now) {
                    Verdict::Pass => {}
                    Verdict::Refuse => {
                        let reference = match &message {
                            Ok(Message::Text(text)) => protocol::reference_of(text),
                            _ => None,
                        };
                        self.refuse(key, &Refusal::from(ErrorCode::RateLimited).with_ref(reference));
                        continue;
                    }
                    Verdict::Abuse => {
                        self.end_session(key, CloseReason::Abuse);
                        return ReadEnd::Ended;
                    }
                }
            }
            match message {
                Ok(Message::Text(text)) => self.on_text(key, &text),
                Ok(Message::Binary(_)) => {
                    self.metrics().message_in("invalid");
                    let refusal =
                        Refusal::new(ErrorCode::InvalidMessage, "binary frames are not accepted; send JSON text");
                    self.refuse(key, &refusal);
                }
                Ok(Message::Close(_)) => {
                    self.end_session(key, CloseReason::Normal);
                    return ReadEnd::Ended;
                }
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return ReadEnd::Drained,
                Err(e) => {
                    self.on_ws_error(key, e);
                    return ReadEnd::Ended;
                }
            }
        }
        ReadEnd::Budget
    }

    /// `/echo`: sends every message back, through the same framing and output path
    /// as sessions.
    fn read_echo(&mut self, key: usize) {
        for _ in 0..MAX_MESSAGES_PER_READ {
            let Some(Conn { phase: Phase::Echo { ws }, .. }) = self.sessions.conns.get_mut(key) else { return };
            match ws.read() {
                Ok(message @ (Message::Text(_) | Message::Binary(_))) => {
                    let _ = ws.write(message);
                }
                Ok(Message::Close(_)) => return self.end_session(key, CloseReason::Normal),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    let _ = ws.flush();
                    self.sessions.conns[key].read_pending = false;
                    self.sessions.queue_flush(key);
                    return;
                }
                Err(e) => return self.on_ws_error(key, e),
            }
        }
        self.sessions.conns[key].read_pending = true;
        self.read_list.push(key);
        self.sessions.queue_flush(key);
    }

    /// A failed read: a broken rule of RFC 6455 gets its close code, a vanished peer
    /// is dropped.
    fn on_ws_error(&mut self, key: usize, e: tungstenite::Error) {
        use tungstenite::Error;
        let reason = match e {
            Error::Capacity(_) => CloseReason::MessageTooBig,
            Error::Utf8(_) => CloseReason::InvalidUtf8,
            Error::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake) => {
                return self.remove(key)
            }
            Error::Protocol(_) => CloseReason::ProtocolError,
            _ => return self.remove(key),
        };
        log::debug!("closing a session: {e}");
        self.end_session(key, reason);
    }

    fn on_text(&mut self, key: usize, text: &str) {
        match protocol::parse_client_msg(text, self.node.settings.max_note_bytes) {
            Ok(msg) => self.on_message(key, msg),
            Err(refusal) => {
                self.metrics().message_in("invalid");
                self.refuse(key, &refusal);
            }
        }
    }

    fn refuse(&mut self, key: usize, refusal: &Refusal) {
        let metrics = &self.node.loop_metrics[self.index];
        metrics.refusal(refusal.code);
        metrics.message_out("error", 1);
        let bytes = self.frame.error(refusal);
        self.sessions.send(key, bytes);
    }

    fn on_message(&mut self, key: usize, msg: ClientMsg) {
        let Some(conn) = self.sessions.conns.get(key) else { return };
        let Phase::Open { session, .. } = &conn.phase else { return };
        let (paper_id, member_id, user, role) =
            (session.paper.clone(), session.member.clone(), session.user.clone(), session.role);
        let origin = Origin { loop_index: self.index, conn: key, serial: conn.serial };
        let Some(paper) = self.papers.paper_mut(&paper_id) else { return };
        let limits = self.node.settings.limits;
        let metrics = &self.node.loop_metrics[self.index];
        metrics.message_in(msg.kind());

        let (edit, reference) = match msg {
            ClientMsg::Ping => {
                metrics.message_out("pong", 1);
                let pong = self.frame.pong();
                return self.sessions.send(key, pong);
            }
            ClientMsg::Cursor { data } => {
                let cursor = self.frame.cursor(&member_id, &data);
                let recipients = self.sessions.broadcast(paper.members(), Some(key), cursor);
                metrics.message_out("cursor", recipients);
                bump(&metrics.broadcasts, 1);
                bump(&metrics.broadcast_recipients, recipients);
                return self.relay_frame(&paper_id, None, true);
            }
            ClientMsg::Complete { reference } => {
                if let Err(code) = paper.check_complete(role) {
                    return self.refuse(key, &Refusal::from(code).with_ref(reference));
                }
                let snapshot = protocol::paper_document(&paper_id, true, paper.live_notes());
                self.frame.completed(&user);
                let relay = relay_of(&self.node, &self.frame);
                let op = Op::Complete { paper: paper_id.clone(), by: user.clone(), snapshot, origin, relay };
                if !submit(&self.store, op, &mut paper.unwritten) {
                    return self.refuse(key, &Refusal::from(ErrorCode::Unavailable).with_ref(reference));
                }
                paper.complete(&user).expect("checked above");
                log::info!("paper {paper_id} completed by {user}");
                let completed = self.frame.completed(&user);
                let recipients = self.sessions.broadcast(paper.members(), None, completed);
                metrics.message_out("completed", recipients);
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
                "upsert"
            }
            None => {
                self.frame.delete(&edit.id, v, &member_id, reference.as_deref());
                "delete"
            }
        };
        let relay = relay_of(&self.node, &self.frame);
        let op = Op::Note { paper: paper_id, id: edit.id.clone(), note: edit.note.clone(), origin, relay };
        if !submit(&self.store, op, &mut paper.unwritten) {
            return self.refuse(key, &Refusal::from(ErrorCode::Unavailable).with_ref(reference));
        }
        let bytes = self.frame.bytes();
        paper.apply(edit);
        let recipients = self.sessions.broadcast(paper.members(), None, bytes);
        metrics.message_out(kind, recipients);
        bump(&metrics.broadcasts, 1);
        bump(&metrics.broadcast_recipients, recipients);
        if matches!(self.store, StoreHandle::Memory) {
            metrics.message_out("saved", 1);
            let saved = self.frame.saved(v);
            self.sessions.send(key, saved);
        }
    }

    /// Leaves the paper (telling the others) and starts the close handshake.
    fn end_session(&mut self, key: usize, reason: CloseReason) {
        self.leave_paper(key);
        let Some(conn) = self.sessions.conns.get_mut(key) else { return };
        let mut ws: WebSocket<Io> = match std::mem::replace(&mut conn.phase, Phase::Gone) {
            Phase::Joining { ws, .. } | Phase::Open { ws, .. } | Phase::Echo { ws } => ws,
            other => {
                conn.phase = other;
                return;
            }
        };
        if reason == CloseReason::SlowConsumer {
            bump(&self.node.loop_metrics[self.index].slow_consumers, 1);
            ws.get_mut().out.drop_queued();
        }
        log::debug!(
            "session {} closes with {} {}",
            member_id(&self.node, conn.serial),
            u16::from(reason.code()),
            reason.text()
        );
        // After a close from the peer this queues tungstenite's echo of it; otherwise
        // our close frame. Either way the frame lands in `Io`, which cannot fail.
        let frame = CloseFrame { code: reason.code(), reason: reason.text().into() };
        let _ = if reason == CloseReason::Normal { ws.flush() } else { ws.close(Some(frame)) };
        // After a framing error the rest of the input cannot be parsed: it is dropped.
        let discard =
            matches!(reason, CloseReason::MessageTooBig | CloseReason::ProtocolError | CloseReason::InvalidUtf8);
        conn.phase = Phase::Closing { ws, discard };
        self.close_deadlines.push_back((Instant::now() + CLOSE_TIMEOUT, key, conn.serial));
        self.sessions.queue_flush(key);
    }

    /// Takes a connection out of its paper: a member leaves (the others hear it), a
    /// waiter stops waiting.
    fn leave_paper(&mut self, key: usize) {
        let Some(conn) = self.sessions.conns.get(key) else { return };
        match &conn.phase {
            Phase::Joining { visitor, .. } => self.papers.forget_waiter(&visitor.paper, key),
            Phase::Reading { paper, .. } => self.papers.forget_waiter(paper, key),
            Phase::Open { session, .. } => {
                let Some(paper) = self.papers.paper_mut(&session.paper) else { return };
                let Some(member) = paper.remove_member(key) else { return };
                log::debug!("session {} left paper {}", member.id, paper.id);
                let leave = self.frame.leave(&member.id);
                let recipients = self.sessions.broadcast(paper.members(), None, leave);
                self.node.loop_metrics[self.index].message_out("leave", recipients);
                let paper_id = paper.id.clone();
                let presence = self.node.cluster.then(|| Presence { member: member.id.clone(), entry: None });
                self.relay_frame(&paper_id, presence, false);
            }
            _ => {}
        }
    }

    /// Reads a closing session until its peer's close frame or EOF.
    fn read_closing(&mut self, key: usize) {
        let Some(conn) = self.sessions.conns.get_mut(key) else { return };
        let Phase::Closing { ws, discard } = &mut conn.phase else { return };
        if *discard {
            let mut chunk = [0u8; 4096];
            loop {
                match ws.get_mut().stream.read(&mut chunk) {
                    Ok(0) => return self.remove(key),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(_) => return self.remove(key),
                }
            }
        }
        loop {
            match ws.read() {
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    // Closed by both sides, or failed: nothing more will be read.
                    if ws.get_ref().out.pending() == 0 {
                        return self.remove(key);
                    }
                    break;
                }
            }
        }
        self.sessions.queue_flush(key);
    }

    // ---- the inbox -----------------------------------------------------------------

    fn drain_inbox(&mut self) {
        while let Ok(msg) = self.inbox.try_recv() {
            match msg {
                InboxMsg::Adopt { stream, peer, serial, counted, handoff } => {
                    self.adopt(stream, peer, serial, counted, handoff)
                }
                // Read again after the relay's subscription was rebuilt (attempt 0 is
                // never a load's): merge what was missed.
                InboxMsg::Loaded { paper, attempt: 0, stored } => self.merge_stored(&paper, stored),
                InboxMsg::Loaded { paper, attempt, stored } => {
                    if let Some((waiters, relayed)) = self.papers.finish_load(&paper, attempt, stored, &mut self.clock)
                    {
                        // What other nodes sent while the paper was read, then the joiners:
                        // their snapshots hold it all.
                        for (node, message) in relayed {
                            self.apply_relayed(&paper, node, &message);
                        }
                        for key in waiters {
                            self.paper_ready(key);
                        }
                    }
                }
                InboxMsg::Relayed { paper, node, message } => {
                    if !self.papers.hold_relayed(&paper, &node, &message) {
                        self.apply_relayed(&paper, node, &message);
                    }
                }
                InboxMsg::NodeGone(node) => self.node_gone(&node),
                InboxMsg::Written(written) => self.on_written(written),
                InboxMsg::Stop => self.stop(),
            }
        }
    }

    /// A message from another node: an edit applies only if it advances the note's
    /// version (so every node converges whatever the order of arrival); presence
    /// and cursors pass on. What applies goes to this node's members unchanged.
    fn apply_relayed(&mut self, paper_id: &Arc<str>, node: Arc<str>, message: &str) {
        let Some(paper) = self.papers.paper_mut(paper_id) else { return };
        let Some(relayed) = protocol::parse_relayed(message) else {
            log::warn!("ignoring a relayed message from node {node} that this server cannot read");
            return;
        };
        let sealed = paper.is_completed();
        let (kind, pass_on) = match relayed {
            // Once sealed here, nothing changes the notes: an edit another node took
            // before it heard of the completion is not shown (nor written: see WRITE_NOTES).
            protocol::Relayed::Upsert { .. } | protocol::Relayed::Delete { .. } if sealed => ("upsert", false),
            protocol::Relayed::Upsert { id, author, data, v } => {
                self.clock.observe(v);
                let note = Note { author: Arc::from(author), data: Some(Arc::from(data)), v, node };
                ("upsert", paper.apply(Edit { id: Arc::from(id), note }))
            }
            protocol::Relayed::Delete { id, v } => {
                self.clock.observe(v);
                let author = paper.note(&id).map_or_else(|| Arc::from(""), |n| n.author.clone());
                ("delete", paper.apply(Edit { id: Arc::from(id), note: Note { author, data: None, v, node } }))
            }
            protocol::Relayed::Completed { by } => ("completed", paper.complete(&Arc::from(by)).is_ok()),
            protocol::Relayed::Join { id, user, name } => {
                let member = RemoteMember { id: Arc::from(id), user: Arc::from(user), name: Arc::from(name), node };
                ("join", paper.add_remote(member))
            }
            protocol::Relayed::Leave { id } => ("leave", paper.remove_remote(&id)),
            protocol::Relayed::Cursor => ("cursor", true),
        };
        if pass_on {
            let bytes = self.frame.raw(message);
            let recipients = self.sessions.broadcast(paper.members(), None, bytes);
            self.node.loop_metrics[self.index].message_out(kind, recipients);
        }
    }

    /// Merges a paper read again from Redis: notes that advance are applied and
    /// sent to the members (with an empty `from`: no session of this node sent them).
    fn merge_stored(&mut self, paper_id: &Arc<str>, stored: crate::paper::StoredPaper) {
        let Some(paper) = self.papers.paper_mut(paper_id) else { return };
        for (id, note) in stored.notes {
            self.clock.observe(note.v);
            let edit = Edit { id: Arc::from(id), note };
            let (v, data, author) = (edit.note.v, edit.note.data.clone(), edit.note.author.clone());
            let id = edit.id.clone();
            if !paper.apply(edit) {
                continue;
            }
            let (kind, bytes) = match &data {
                Some(data) => ("upsert", self.frame.upsert(&id, &author, data, v, "", None)),
                None => ("delete", self.frame.delete(&id, v, "", None)),
            };
            let recipients = self.sessions.broadcast(paper.members(), None, bytes);
            self.node.loop_metrics[self.index].message_out(kind, recipients);
        }
        if let Some(by) = stored.completed_by {
            let by: Arc<str> = Arc::from(by);
            if paper.complete(&by).is_ok() {
                let bytes = self.frame.completed(&by);
                self.sessions.broadcast(paper.members(), None, bytes);
            }
        }
    }

    /// Another node stopped: its members leave every paper here.
    fn node_gone(&mut self, node: &str) {
        for paper in self.papers.papers_mut() {
            for id in paper.remove_node(node) {
                let leave = self.frame.leave(&id);
                let recipients = self.sessions.broadcast(paper.members(), None, leave);
                self.node.loop_metrics[self.index].message_out("leave", recipients);
            }
        }
    }

    /// Edits now in Redis: the papers may be dropped from memory later, and each
    /// session hears `saved` once for the highest version of its own.
    fn on_written(&mut self, mut written: Vec<Written>) {
        for w in &written {
            if let Some(paper) = self.papers.paper_mut(&w.paper) {
                paper.unwritten = paper.unwritten.saturating_sub(1);
            }
        }
        written.sort_unstable_by_key(|w| (w.origin.conn, w.origin.serial, Reverse(w.v)));
        written.dedup_by_key(|w| (w.origin.conn, w.origin.serial));
        for w in written {
            let still_here = self
                .sessions
                .conns
                .get(w.origin.conn)
                .is_some_and(|c| c.serial == w.origin.serial && matches!(c.phase, Phase::Open { .. }));
            if still_here && w.v > 0 {
                self.node.loop_metrics[self.index].message_out("saved", 1);
                let saved = self.frame.saved(w.v);
                self.sessions.send(w.origin.conn, saved);
            }
        }
    }

    fn stop(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        self.stopping = Some(Instant::now());
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let keys: Vec<(usize, u64)> = self.sessions.conns.iter().map(|(key, c)| (key, c.serial)).collect();
        for (key, serial) in keys {
            match self.sessions.conns[key].phase {
                Phase::Request { .. } | Phase::Reply { .. } | Phase::Reading { .. } => self.remove(key),
                Phase::Joining { .. } | Phase::Open { .. } | Phase::Echo { .. } => {
                    self.draining.push_back((key, serial))
                }
                Phase::Closing { .. } | Phase::Gone => {}
            }
        }
        self.drain_total = self.draining.len();
        self.drain(Instant::now());
    }

    /// Closes the share of the sessions due by now: all at once without
    /// `--drain-seconds`, else evenly over that time.
    fn drain(&mut self, now: Instant) {
        let Some(since) = self.stopping else { return };
        let spread = self.node.settings.drain.as_secs_f64();
        let share = if spread > 0.0 { (now.duration_since(since).as_secs_f64() / spread).min(1.0) } else { 1.0 };
        let due = (self.drain_total as f64 * share).ceil() as usize;
        while self.drain_total - self.draining.len() < due {
            let Some((key, serial)) = self.draining.pop_front() else { break };
            if self
                .is_phase(key, serial, |p| matches!(p, Phase::Joining { .. } | Phase::Open { .. } | Phase::Echo { .. }))
            {
                self.end_session(key, CloseReason::ShuttingDown);
            }
        }
    }

    // ---- leftovers, timers, output -----------------------------------------------

    fn resume_reads(&mut self) {
        for key in std::mem::take(&mut self.read_list) {
            if self.sessions.conns.get(key).is_some_and(|c| c.read_pending) {
                self.on_readable(key);
            }
        }
    }

    fn run_timers(&mut self) {
        let now = Instant::now();
        while let Some(&(deadline, key, serial)) = self.request_deadlines.front() {
            if deadline > now {
                break;
            }
            self.request_deadlines.pop_front();
            if self.is_phase(key, serial, |p| matches!(p, Phase::Request { .. } | Phase::Reply { .. })) {
                self.remove(key);
            }
        }
        while let Some(&(deadline, key, serial)) = self.close_deadlines.front() {
            if deadline > now {
                break;
            }
            self.close_deadlines.pop_front();
            if self.is_phase(key, serial, |p| matches!(p, Phase::Closing { .. })) {
                self.remove(key);
            }
        }
        let now_secs = unix_secs();
        while let Some(&Reverse((exp, key, serial))) = self.expiries.peek() {
            if exp > now_secs {
                break;
            }
            self.expiries.pop();
            if self.is_phase(key, serial, |p| matches!(p, Phase::Joining { .. } | Phase::Open { .. })) {
                self.end_session(key, CloseReason::TokenExpired);
            }
        }
        if self.stopping.is_some() {
            self.drain(now);
        }
        let (papers, waiters) = self.papers.expire_loads(now);
        for key in waiters {
            self.paper_unavailable(key);
        }
        if let StoreHandle::Redis { loads, .. } = &self.store {
            for paper in papers {
                loads.forget(paper);
            }
        }
        if now >= self.next_ping {
            self.next_ping = now + self.node.settings.ping_interval;
            self.ping_or_close_idle(now);
        }
        if now >= self.next_eviction {
            self.next_eviction = now + EVICT_EVERY;
            if let Some(linger) = self.node.settings.paper_linger {
                for paper in self.papers.evict_idle(now, linger) {
                    log::debug!("paper {paper} left memory");
                    if let StoreHandle::Redis { loads, .. } = &self.store {
                        loads.forget(paper);
                    }
                }
            }
            self.publish_gauges();
        }
    }

    /// Pings every member, and closes the ones silent past the idle timeout (a
    /// browser answers pings by itself, so only a dead peer stays silent).
    fn ping_or_close_idle(&mut self, now: Instant) {
        let idle_timeout = self.node.settings.idle_timeout;
        let mut idle = Vec::new();
        for (key, conn) in &mut self.sessions.conns {
            let Phase::Open { ws, .. } = &mut conn.phase else { continue };
            if now.duration_since(conn.last_seen) >= idle_timeout {
                idle.push(key);
            } else {
                ws.get_mut().out.queue(&PING_FRAME);
                if !conn.flush_queued {
                    conn.flush_queued = true;
                    self.sessions.flush_list.push(key);
                }
            }
        }
        for key in idle {
            self.end_session(key, CloseReason::Idle);
        }
    }

    fn is_phase(&self, key: usize, serial: u64, test: impl Fn(&Phase) -> bool) -> bool {
        self.sessions.conns.get(key).is_some_and(|c| c.serial == serial && test(&c.phase))
    }

    /// Writes every queued output once; drops what is done or broken.
    fn flush(&mut self) {
        let mut written = 0;
        while let Some(key) = self.sessions.flush_list.pop() {
            let Some(conn) = self.sessions.conns.get_mut(key) else { continue };
            conn.flush_queued = false;
            let Some(io) = conn.phase.io() else { continue };
            let before = io.out.pending();
            let result = io.flush();
            written += (before - io.out.pending()) as u64;
            match result {
                Ok(Flushed::Blocked) => {
                    // The socket is full and more than the allowance still waits: this
                    // reader cannot keep up, and holding more for it would grow without end.
                    let slow = io.out.pending() > self.node.settings.max_outbound_bytes + conn.grace;
                    if slow && matches!(conn.phase, Phase::Open { .. } | Phase::Joining { .. }) {
                        self.end_session(key, CloseReason::SlowConsumer);
                    }
                }
                Ok(Flushed::Done) => {
                    conn.grace = 0;
                    match &conn.phase {
                        Phase::Reply { .. } => self.remove(key),
                        Phase::Closing { ws, discard: true } => {
                            // Our close frame is out: say so with a FIN, then read until the
                            // peer's EOF, so that unread input never turns into a reset that
                            // could destroy the close frame in flight.
                            let _ = ws.get_ref().stream.shutdown(std::net::Shutdown::Write);
                        }
                        Phase::Closing { ws, .. } if !ws.can_read() => self.remove(key),
                        _ => {}
                    }
                }
                Err(_) => self.remove(key),
            }
        }
        bump(&self.node.loop_metrics[self.index].bytes_out, written);
    }

    /// Drops a connection: a member leaves its paper first, and its session slot
    /// goes back to the node.
    fn remove(&mut self, key: usize) {
        if let Some(conn) = self.sessions.conns.get(key) {
            if matches!(conn.phase, Phase::Joining { .. } | Phase::Open { .. }) {
                log::debug!("session {} lost its connection", member_id(&self.node, conn.serial));
            }
        }
        self.leave_paper(key);
        let Some(mut conn) = self.sessions.conns.try_remove(key) else { return };
        if conn.counted {
            self.node.release(conn.peer.ip());
            self.session_count = self.session_count.saturating_sub(1);
            self.publish_gauges();
        }
        if let Some(io) = conn.phase.io() {
            let _ = self.poll.registry().deregister(&mut io.stream);
        }
    }
}

/// Hands an op to the store; false when the backlog is full.
fn submit(store: &StoreHandle, op: Op, unwritten: &mut usize) -> bool {
    match store {
        StoreHandle::Redis { backlog, .. } => {
            if backlog.submit(op).is_err() {
                return false;
            }
            *unwritten += 1;
            true
        }
        StoreHandle::Memory => true,
    }
}

fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A session's id: short, unique for the process, and with `--cluster` among the
/// nodes too.
fn member_id(node: &Node, serial: u64) -> String {
    if node.cluster {
        format!("c{serial}-{}", node.node_id)
    } else {
        format!("c{serial}")
    }
}

/// With `--cluster`, the message for other nodes: this node's id, a newline, and
/// the JSON just encoded for this node's members.
fn relay_of(node: &Node, frame: &Frame) -> Option<Box<str>> {
    node.cluster.then(|| {
        let json = std::str::from_utf8(frame.payload()).expect("frames are JSON text");
        format!("{}\n{json}", node.node_id).into_boxed_str()
    })
}
