//! One event loop thread: a mio `Poll`, its connections in a slab, and the papers
//! it owns. Each turn polls, dispatches by token, drains the inbox, resumes reads
//! left over by a budget, runs timers, flushes every connection with output once,
//! and drops the closed ones. Nothing here blocks.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use super::inbox::{InboxMsg, LoopHandle};
use crate::config::{Config, StoreKind};
use crate::conn::http::{self, Parsed, Reply, Route, Upgrade};
use crate::conn::{self, Conn, Flushed, Io, Phase};
use crate::paper::registry::{Lookup, Registry};
use crate::paper::{Edit, Member, PaperLimits, VersionClock};
use crate::protocol::{self, ClientMsg, CloseReason, ErrorCode, Frame, Refusal};
use crate::store::{LoadRequest, Op, Origin, StoreHandle, Written};

pub const LISTENER: Token = Token(usize::MAX - 1);
pub const WAKER: Token = Token(usize::MAX);

/// Messages read from one connection before others get their turn.
const MAX_MESSAGES_PER_READ: usize = 64;
/// How long a client may take to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing session may take to answer the close frame and drain.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest sleep of a loop with nothing to do; timers run at this resolution.
const TICK: Duration = Duration::from_millis(100);
/// How often idle papers are looked for.
const EVICT_EVERY: Duration = Duration::from_secs(1);

/// What every loop needs to know of the configuration.
pub struct Settings {
    pub limits: PaperLimits,
    pub max_note_bytes: usize,
    pub max_outbound_bytes: usize,
    pub load_timeout: Duration,
    /// `None`: papers stay in memory for good (the memory store).
    pub paper_linger: Option<Duration>,
    pub ws_config: WebSocketConfig,
}

impl Settings {
    pub fn from_config(config: &Config) -> Self {
        Settings {
            limits: PaperLimits { max_notes: config.max_notes, max_members: config.max_members },
            max_note_bytes: config.max_note_bytes,
            max_outbound_bytes: config.max_outbound_bytes,
            load_timeout: config.load_timeout(),
            paper_linger: (config.store == StoreKind::Redis).then(|| config.paper_linger()),
            ws_config: conn::websocket_config(config.max_message_bytes),
        }
    }
}

/// The connections of a loop and their pending output. Separate from the papers
/// so that a broadcast can borrow a paper's members and the connections at once.
struct Sessions {
    conns: Slab<Conn>,
    /// Connections with output to write this turn, each once.
    flush_list: Vec<usize>,
    /// Connections whose output went over `max_outbound_bytes`.
    slow_list: Vec<usize>,
    max_outbound_bytes: usize,
}

impl Sessions {
    /// Queues an encoded frame for one connection.
    fn send(&mut self, key: usize, bytes: &[u8]) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        let Some(io) = conn.phase.io() else { return };
        io.out.queue(bytes);
        if io.out.pending() > self.max_outbound_bytes {
            self.slow_list.push(key);
        }
        if !conn.flush_queued {
            conn.flush_queued = true;
            self.flush_list.push(key);
        }
    }

    /// Queues the same encoded frame for every member but `except`: one copy each,
    /// no allocation once the output buffers have grown.
    fn broadcast(&mut self, members: &[Member], except: Option<usize>, bytes: &[u8]) {
        for member in members {
            if Some(member.key) != except {
                self.send(member.key, bytes);
            }
        }
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
    settings: Arc<Settings>,
    clock: VersionClock,
    /// Scratch for encoding one server message at a time.
    frame: Frame,
    /// Connections whose read budget ran out last turn.
    read_list: Vec<usize>,
    /// Deadlines in the order they were set, with the serial they were set for.
    request_deadlines: VecDeque<(Instant, usize, u64)>,
    close_deadlines: VecDeque<(Instant, usize, u64)>,
    serials: Arc<AtomicU64>,
    stopping: Option<Instant>,
    next_eviction: Instant,
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
        settings: Arc<Settings>,
        serials: Arc<AtomicU64>,
    ) -> io::Result<Self> {
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(EventLoop {
            index,
            poll,
            listener: Some(listener),
            sessions: Sessions {
                conns: Slab::with_capacity(1024),
                flush_list: Vec::new(),
                slow_list: Vec::new(),
                max_outbound_bytes: settings.max_outbound_bytes,
            },
            papers: Registry::new(),
            inbox,
            loops,
            store,
            settings,
            clock: VersionClock::new(),
            frame: Frame::new(),
            read_list: Vec::new(),
            request_deadlines: VecDeque::new(),
            close_deadlines: VecDeque::new(),
            serials,
            stopping: None,
            next_eviction: Instant::now() + EVICT_EVERY,
        })
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
        self.stopping.is_some_and(|since| self.sessions.conns.is_empty() || since.elapsed() > CLOSE_TIMEOUT * 2)
    }

    // ---- accepting and routing -------------------------------------------------

    fn accept(&mut self) {
        loop {
            let Some(listener) = &self.listener else { return };
            match listener.accept() {
                Ok((stream, peer)) => {
                    let serial = self.serials.fetch_add(1, Ordering::Relaxed);
                    if let Some(key) = self.register(stream, peer, serial) {
                        self.request_deadlines.push_back((Instant::now() + REQUEST_TIMEOUT, key, serial));
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

    /// The loop that owns a paper: every session of one paper lives there.
    fn owner_of(&self, paper: &str) -> usize {
        // FNV-1a: stable and cheap; the spread only needs to be fair.
        let hash =
            paper.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        (hash % self.loops.len() as u64) as usize
    }

    fn on_readable(&mut self, key: usize) {
        let Some(conn) = self.sessions.conns.get_mut(key) else { return };
        match conn.phase {
            Phase::Request { .. } => self.read_request(key),
            Phase::Reply { .. } => self.discard_input(key),
            Phase::Joining { .. } => conn.read_pending = true,
            Phase::Open { .. } => self.read_messages(key),
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
        match http::parse(buf) {
            Ok(Parsed::Partial) => {}
            Ok(Parsed::Complete { route: Route::Reply(reply), .. }) | Err(reply) => self.reply(key, &reply),
            Ok(Parsed::Complete { len, route: Route::Upgrade(upgrade) }) => {
                let rest = buf.split_off(len);
                self.route_upgrade(key, upgrade, rest);
            }
        }
    }

    fn reply(&mut self, key: usize, reply: &Reply) {
        let Some(conn) = self.sessions.conns.get_mut(key) else { return };
        let Phase::Request { io, .. } = std::mem::replace(&mut conn.phase, Phase::Gone) else { return };
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

    /// Sends an upgrade to the loop that owns its paper, or starts it here.
    fn route_upgrade(&mut self, key: usize, upgrade: Upgrade, rest: Vec<u8>) {
        let owner = self.owner_of(&upgrade.paper);
        if owner == self.index || self.stopping.is_some() {
            return self.start_session(key, upgrade, rest);
        }
        let conn = self.sessions.conns.remove(key);
        let Phase::Request { mut io, .. } = conn.phase else { return };
        if let Err(e) = self.poll.registry().deregister(&mut io.stream) {
            log::warn!("cannot hand over a connection from {}: {e}", conn.peer);
            return;
        }
        self.loops[owner].send(InboxMsg::Adopt {
            stream: io.stream,
            peer: conn.peer,
            serial: conn.serial,
            upgrade,
            rest,
        });
    }

    fn adopt(&mut self, stream: TcpStream, peer: SocketAddr, serial: u64, upgrade: Upgrade, rest: Vec<u8>) {
        if self.stopping.is_some() {
            return; // dropped: the client retries elsewhere
        }
        if let Some(key) = self.register(stream, peer, serial) {
            self.start_session(key, upgrade, rest);
        }
    }

    // ---- sessions ----------------------------------------------------------------

    /// Answers 101 and joins the paper, or waits for it to be read.
    fn start_session(&mut self, key: usize, upgrade: Upgrade, rest: Vec<u8>) {
        let Some(conn) = self.sessions.conns.get_mut(key) else { return };
        let Phase::Request { mut io, .. } = std::mem::replace(&mut conn.phase, Phase::Gone) else { return };
        io.out.queue_head(&http::switching_protocols(&upgrade.key));
        let ws = conn::server_websocket(io, rest, self.settings.ws_config);
        let member_id = member_id(conn.serial);
        let user: Arc<str> = upgrade.user.map_or_else(|| Arc::from(member_id.as_str()), Arc::from);
        let name: Arc<str> = upgrade.name.map_or_else(|| user.clone(), Arc::from);
        let paper: Arc<str> = Arc::from(upgrade.paper);
        conn.phase = Phase::Joining { ws, paper: paper.clone(), user, name };
        // Bytes that came with the request head are read once the session is open.
        conn.read_pending = true;
        log::debug!("session {member_id} from {} opens paper {paper}", conn.peer);
        self.sessions.queue_flush(key);
        if self.stopping.is_some() {
            return self.end_session(key, CloseReason::ShuttingDown);
        }

        if matches!(self.store, StoreHandle::Memory) {
            self.papers.insert_empty(&paper, &mut self.clock);
        }
        let deadline = Instant::now() + self.settings.load_timeout;
        match self.papers.lookup(&paper, key, deadline) {
            Lookup::Ready => self.join(key),
            Lookup::Waiting => {}
            Lookup::StartLoad(attempt) => {
                if let StoreHandle::Redis { loads, .. } = &self.store {
                    let request = LoadRequest { paper, attempt, loop_index: self.index, deadline };
                    if loads.send(request).is_err() {
                        log::error!("the loader thread is gone");
                    }
                }
            }
        }
    }

    /// Makes a waiting session a member: snapshot to it, `join` to the others.
    fn join(&mut self, key: usize) {
        let Some(conn) = self.sessions.conns.get_mut(key) else { return };
        let Phase::Joining { paper: paper_id, .. } = &conn.phase else { return };
        let Some(paper) = self.papers.paper_mut(paper_id) else { return };
        if paper.is_full_of_members(&self.settings.limits) {
            return self.end_session(key, CloseReason::PaperFull);
        }
        let Phase::Joining { ws, paper: paper_id, user, name } = std::mem::replace(&mut conn.phase, Phase::Gone) else {
            return;
        };
        let member = Member { id: Arc::from(member_id(conn.serial)), user: user.clone(), name, key };
        let read_pending = conn.read_pending;
        conn.phase = Phase::Open { ws, paper: paper_id, member: member.id.clone(), user };

        let join = self.frame.join(&member.view());
        self.sessions.broadcast(paper.members(), None, join);
        paper.add_member(member);
        let you = &paper.members().last().expect("just added").id;
        let snapshot = self.frame.snapshot(
            &paper.id,
            you,
            paper.is_completed(),
            paper.live_notes(),
            paper.members().iter().map(Member::view),
        );
        self.sessions.send(key, snapshot);
        if read_pending {
            self.read_list.push(key);
        }
        self.close_slow_consumers();
    }

    /// Reads and handles messages until the socket is drained or the budget is spent.
    fn read_messages(&mut self, key: usize) {
        let end = self.read_budget(key);
        if let ReadEnd::Budget = end {
            self.read_list.push(key);
        }
        if let Some(conn) = self.sessions.conns.get_mut(key) {
            conn.read_pending = matches!(end, ReadEnd::Budget);
            // Pongs that tungstenite queued while reading move to the output now.
            if let Phase::Open { ws, .. } = &mut conn.phase {
                let _ = ws.flush();
                if ws.get_ref().out.pending() > 0 {
                    self.sessions.queue_flush(key);
                }
            }
        }
    }

    fn read_budget(&mut self, key: usize) -> ReadEnd {
        for _ in 0..MAX_MESSAGES_PER_READ {
            let Some(conn) = self.sessions.conns.get_mut(key) else { return ReadEnd::Ended };
            let Phase::Open { ws, .. } = &mut conn.phase else { return ReadEnd::Ended };
            match ws.read() {
                Ok(Message::Text(text)) => self.on_text(key, &text),
                Ok(Message::Binary(_)) => {
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

    /// A failed read: a broken rule of RFC 6455 gets its close code, a vanished peer
    /// is dropped.
    fn on_ws_error(&mut self, key: usize, e: tungstenite::Error) {
        use tungstenite::Error;
        let reason = match e {
            Error::Capacity(_) => CloseReason::MessageTooBig,
            Error::Utf8(_) => CloseReason::InvalidUtf8,
            Error::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake) => {
                return self.drop_session(key)
            }
            Error::Protocol(_) => CloseReason::ProtocolError,
            _ => return self.drop_session(key),
        };
        log::debug!("closing a session: {e}");
        self.end_session(key, reason);
    }

    fn on_text(&mut self, key: usize, text: &str) {
        match protocol::parse_client_msg(text, self.settings.max_note_bytes) {
            Ok(msg) => self.on_message(key, msg),
            Err(refusal) => self.refuse(key, &refusal),
        }
    }

    fn refuse(&mut self, key: usize, refusal: &Refusal) {
        let bytes = self.frame.error(refusal);
        self.sessions.send(key, bytes);
    }

    fn on_message(&mut self, key: usize, msg: ClientMsg) {
        let Some(conn) = self.sessions.conns.get(key) else { return };
        let Phase::Open { paper, member, user, .. } = &conn.phase else { return };
        let (paper_id, member_id, user) = (paper.clone(), member.clone(), user.clone());
        let origin = Origin { loop_index: self.index, conn: key, serial: conn.serial };
        let Some(paper) = self.papers.paper_mut(&paper_id) else { return };
        let limits = self.settings.limits;

        let (edit, reference) = match msg {
            ClientMsg::Ping => {
                let pong = self.frame.pong();
                return self.sessions.send(key, pong);
            }
            ClientMsg::Cursor { data } => {
                let cursor = self.frame.cursor(&member_id, &data);
                self.sessions.broadcast(paper.members(), Some(key), cursor);
                return self.close_slow_consumers();
            }
            ClientMsg::Complete => {
                if paper.is_completed() {
                    return self.refuse(key, &ErrorCode::PaperCompleted.into());
                }
                let snapshot = protocol::completed_snapshot(&paper_id, paper.live_notes());
                let op = Op::Complete { paper: paper_id.clone(), by: user.clone(), snapshot, origin };
                if !submit(&self.store, op, &mut paper.unwritten) {
                    return self.refuse(key, &ErrorCode::Unavailable.into());
                }
                paper.complete(&user).expect("checked above");
                log::info!("paper {paper_id} completed by {user}");
                let completed = self.frame.completed(&user);
                self.sessions.broadcast(paper.members(), None, completed);
                return self.close_slow_consumers();
            }
            ClientMsg::Upsert { id, data, reference } => {
                (paper.prepare_upsert(&id, data, &user, &mut self.clock, &limits), reference)
            }
            ClientMsg::Delete { id, reference } => (paper.prepare_delete(&id, &mut self.clock), reference),
        };
        let edit: Edit = match edit {
            Ok(edit) => edit,
            Err(code) => return self.refuse(key, &Refusal::from(code).with_ref(reference)),
        };
        let op = Op::Note { paper: paper_id, id: edit.id.clone(), note: edit.note.clone(), origin };
        if !submit(&self.store, op, &mut paper.unwritten) {
            return self.refuse(key, &Refusal::from(ErrorCode::Unavailable).with_ref(reference));
        }
        let v = edit.note.v;
        let bytes = match &edit.note.data {
            Some(data) => self.frame.upsert(&edit.id, &edit.note.author, data, v, &member_id, reference.as_deref()),
            None => self.frame.delete(&edit.id, v, &member_id, reference.as_deref()),
        };
        paper.apply(edit);
        self.sessions.broadcast(paper.members(), None, bytes);
        if matches!(self.store, StoreHandle::Memory) {
            let saved = self.frame.saved(v);
            self.sessions.send(key, saved);
        }
        self.close_slow_consumers();
    }

    /// Leaves the paper (telling the others) and starts the close handshake.
    fn end_session(&mut self, key: usize, reason: CloseReason) {
        self.leave_paper(key);
        let Some(conn) = self.sessions.conns.get_mut(key) else { return };
        let ws = match std::mem::replace(&mut conn.phase, Phase::Gone) {
            Phase::Joining { ws, .. } | Phase::Open { ws, .. } => ws,
            other => {
                conn.phase = other;
                return;
            }
        };
        let mut ws: WebSocket<Io> = ws;
        if reason == CloseReason::SlowConsumer {
            ws.get_mut().out.drop_queued();
        }
        log::debug!("session {} closes with {} {}", member_id(conn.serial), u16::from(reason.code()), reason.text());
        // After a close from the peer this queues tungstenite's echo of it; otherwise
        // our close frame. Either way the frame lands in `Io`, which cannot fail.
        let frame = CloseFrame { code: reason.code(), reason: reason.text().into() };
        let _ = if reason == CloseReason::Normal { ws.flush() } else { ws.close(Some(frame)) };
        conn.phase = Phase::Closing { ws, deadline: Instant::now() + CLOSE_TIMEOUT };
        self.close_deadlines.push_back((Instant::now() + CLOSE_TIMEOUT, key, conn.serial));
        self.sessions.queue_flush(key);
    }

    /// The peer is gone without a close handshake: leave and drop at once.
    fn drop_session(&mut self, key: usize) {
        if let Some(conn) = self.sessions.conns.get(key) {
            if matches!(conn.phase, Phase::Joining { .. } | Phase::Open { .. }) {
                log::debug!("session {} lost its connection", member_id(conn.serial));
            }
        }
        self.leave_paper(key);
        self.remove(key);
    }

    fn leave_paper(&mut self, key: usize) {
        let Some(conn) = self.sessions.conns.get(key) else { return };
        match &conn.phase {
            Phase::Joining { paper, .. } => self.papers.forget_waiter(paper, key),
            Phase::Open { paper, .. } => {
                let Some(paper) = self.papers.paper_mut(paper) else { return };
                let Some(member) = paper.remove_member(key) else { return };
                log::debug!("session {} left paper {}", member.id, paper.id);
                let leave = self.frame.leave(&member.id);
                self.sessions.broadcast(paper.members(), None, leave);
                self.close_slow_consumers();
            }
            _ => {}
        }
    }

    fn close_slow_consumers(&mut self) {
        while let Some(key) = self.sessions.slow_list.pop() {
            let slow = self.sessions.conns.get_mut(key).is_some_and(|c| {
                matches!(c.phase, Phase::Open { .. } | Phase::Joining { .. })
                    && c.phase.io().is_some_and(|io| io.out.pending() > self.sessions.max_outbound_bytes)
            });
            if slow {
                log::debug!("closing a slow consumer");
                self.end_session(key, CloseReason::SlowConsumer);
            }
        }
    }

    /// Reads a closing session until its peer's close frame or EOF.
    fn read_closing(&mut self, key: usize) {
        let Some(conn) = self.sessions.conns.get_mut(key) else { return };
        let Phase::Closing { ws, .. } = &mut conn.phase else { return };
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
                InboxMsg::Adopt { stream, peer, serial, upgrade, rest } => {
                    self.adopt(stream, peer, serial, upgrade, rest)
                }
                InboxMsg::Loaded { paper, attempt, stored } => {
                    if let Some(waiters) = self.papers.finish_load(&paper, attempt, stored, &mut self.clock) {
                        for key in waiters {
                            self.join(key);
                        }
                    }
                }
                InboxMsg::Written(written) => self.on_written(written),
                InboxMsg::Stop => self.stop(),
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
        written.sort_unstable_by_key(|w| (w.origin.conn, w.origin.serial, std::cmp::Reverse(w.v)));
        written.dedup_by_key(|w| (w.origin.conn, w.origin.serial));
        for w in written {
            let still_here = self
                .sessions
                .conns
                .get(w.origin.conn)
                .is_some_and(|c| c.serial == w.origin.serial && matches!(c.phase, Phase::Open { .. }));
            if still_here && w.v > 0 {
                let saved = self.frame.saved(w.v);
                self.sessions.send(w.origin.conn, saved);
            }
        }
        self.close_slow_consumers();
    }

    fn stop(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        self.stopping = Some(Instant::now());
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let keys: Vec<usize> = self.sessions.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            match self.sessions.conns[key].phase {
                Phase::Request { .. } | Phase::Reply { .. } => self.remove(key),
                Phase::Joining { .. } | Phase::Open { .. } => self.end_session(key, CloseReason::ShuttingDown),
                Phase::Closing { .. } | Phase::Gone => {}
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
        for key in self.papers.expire_loads(now) {
            self.end_session(key, CloseReason::PaperUnavailable);
        }
        if now >= self.next_eviction {
            self.next_eviction = now + EVICT_EVERY;
            if let Some(linger) = self.settings.paper_linger {
                for paper in self.papers.evict_idle(now, linger) {
                    log::debug!("paper {paper} left memory");
                }
            }
        }
    }

    fn is_phase(&self, key: usize, serial: u64, test: impl Fn(&Phase) -> bool) -> bool {
        self.sessions.conns.get(key).is_some_and(|c| c.serial == serial && test(&c.phase))
    }

    /// Writes every queued output once; drops what is done or broken.
    fn flush(&mut self) {
        while let Some(key) = self.sessions.flush_list.pop() {
            let Some(conn) = self.sessions.conns.get_mut(key) else { continue };
            conn.flush_queued = false;
            let Some(io) = conn.phase.io() else { continue };
            match io.flush() {
                Ok(Flushed::Blocked) => {}
                Ok(Flushed::Done) => match &conn.phase {
                    Phase::Reply { .. } => self.remove(key),
                    Phase::Closing { ws, .. } if !ws.can_read() => self.remove(key),
                    _ => {}
                },
                Err(_) => self.drop_session(key),
            }
        }
    }

    fn remove(&mut self, key: usize) {
        let Some(mut conn) = self.sessions.conns.try_remove(key) else { return };
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

/// A session's id: short, unique for the process.
fn member_id(serial: u64) -> String {
    format!("c{serial}")
}
