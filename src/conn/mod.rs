//! One TCP connection and its lifecycle: reading the HTTP request, answering it,
//! or speaking WebSocket, then closing. Every move between phases happens here,
//! taking the old phase by value, so no phase is ever half set; each step tells
//! the event loop what to do next with a `Next`. Knows sockets, HTTP and frames,
//! never what a note is.

pub mod http;
pub mod io;

use std::sync::Arc;
use std::time::Instant;

use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use crate::auth::Role;
use crate::protocol::CloseReason;
use crate::rate::TokenBucket;
pub use io::{Drained, Flushed, Io, Outbox, Part};

/// Messages read from one connection before others get their turn.
pub const MAX_MESSAGES_PER_READ: usize = 64;
/// Bytes read and dropped from one connection per turn (input after a close, or
/// after a plain reply), so that a flood on one socket never stalls the others.
const DISCARD_BUDGET: usize = 64 * 1024;

/// tungstenite's settings for a session: frames are written to `Io` at once (it
/// buffers them itself), and the read buffer starts at 1 KiB, which most client
/// messages fit, and grows only for a larger frame, up to the message limit: an
/// idle connection costs about 2.4 KiB in all.
pub fn websocket_config(max_message_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
}

fn server_websocket(mut io: Io, head: &[u8], already_read: Vec<u8>, config: WebSocketConfig) -> WebSocket<Io> {
    io.out.queue_head(head);
    WebSocket::from_partially_read(io, already_read, WsRole::Server, Some(config))
}

/// Where the head of an HTTP answer ends (its blank line included).
fn head_end(bytes: &[u8]) -> usize {
    bytes.windows(4).position(|w| w == b"\r\n\r\n").map_or(bytes.len(), |at| at + 4)
}

/// What the event loop does with a connection after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing more now.
    Continue,
    /// The read budget is spent with input left: read again next turn.
    ReadAgain,
    /// End the session with this close code (PROTOCOL.md 3.3).
    Close(CloseReason),
    /// Drop the connection at the end of the turn.
    Drop,
}

/// Who an upgraded client is, before it joins its paper.
#[derive(Clone)]
pub struct Visitor {
    pub paper: Arc<str>,
    pub user: Arc<str>,
    pub name: Arc<str>,
    pub role: Role,
    /// `?since=V`: resume from the greatest version the client saw.
    pub since: Option<u64>,
}

/// A member's side of its session: PROTOCOL.md's session, once joined.
pub struct Membership {
    pub paper: Arc<str>,
    /// The member id (`you`, `from`).
    pub member: Arc<str>,
    pub user: Arc<str>,
    pub role: Role,
    pub bucket: TokenBucket,
    /// Versions of this member's edits handed to the store and not yet
    /// reported on, in the order they were made.
    pub unresolved: std::collections::VecDeque<u64>,
    /// The greatest version reported written and not yet confirmed `saved`: it
    /// waits while an earlier-made edit with a lower version is unresolved.
    pub confirmable: u64,
}

/// What a closing connection still reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterClose {
    /// Frames, until the peer's close frame or EOF.
    Frames,
    /// Raw bytes, dropped unparsed: the peer broke the framing. Our side is shut
    /// once the close frame is out.
    Discard,
}

/// A backend API call (PROTOCOL.md 7) on the loop that owns its paper.
pub struct ApiCall {
    pub paper: Arc<str>,
    pub action: crate::api::Action,
    /// When its request was read (the latency histogram).
    pub started: Instant,
}

/// Where a connection is in its life. Each phase owns what it needs.
pub enum Phase {
    /// Reading the HTTP request head, then an API call's body. `body_end`: once
    /// an API call's head is read, where its body ends in `buf` (only then may
    /// more than a head's bytes be read); `continued`: `100 Continue` was sent.
    Request { io: Io, buf: Vec<u8>, body_end: Option<usize>, continued: bool },
    /// Writing a plain HTTP reply; dropped once written.
    Reply { io: Io },
    /// `GET /papers/{paper}` waiting for the paper to be read.
    Reading { io: Io, paper: Arc<str> },
    /// An upgrade request waiting for its paper, not answered yet: an erased
    /// paper (410) or a revoked user (403) is refused before the upgrade
    /// (PROTOCOL.md 7). `buf` holds the head (`head_len` bytes) and what followed.
    Admitting { io: Io, buf: Vec<u8>, head_len: usize, upgrade: Box<http::Upgrade>, asked: Instant },
    /// A backend API call waiting for its paper, or for Redis.
    Api { io: Io, call: Box<ApiCall> },
    /// Upgraded, waiting for its paper to be read; no snapshot yet, and what the
    /// client sends waits in the socket.
    /// `asked`: when the upgrade was asked for, from which the joiner waits.
    Joining { ws: WebSocket<Io>, visitor: Visitor, asked: Instant },
    /// A member: the session of PROTOCOL.md section 3.
    Open { ws: WebSocket<Io>, membership: Membership },
    /// `/echo` (`--echo`): every message comes back as it was sent.
    Echo { ws: WebSocket<Io> },
    /// A close frame is queued or received; the socket is dropped once the output
    /// is written and the peer closed too, or at the close deadline.
    Closing { ws: WebSocket<Io>, after: AfterClose },
    /// Only inside `Conn::morph`, while a phase is being replaced.
    Detached,
}

impl Phase {
    pub fn io(&mut self) -> Option<&mut Io> {
        match self {
            Phase::Request { io, .. }
            | Phase::Reply { io }
            | Phase::Reading { io, .. }
            | Phase::Admitting { io, .. }
            | Phase::Api { io, .. } => Some(io),
            Phase::Joining { ws, .. } | Phase::Open { ws, .. } | Phase::Echo { ws } | Phase::Closing { ws, .. } => {
                Some(ws.get_mut())
            }
            Phase::Detached => None,
        }
    }

    /// A WebSocket session that has not begun to close.
    pub fn is_session(&self) -> bool {
        matches!(self, Phase::Joining { .. } | Phase::Open { .. } | Phase::Echo { .. })
    }
}

/// What reading a request head gave.
pub enum RequestStep {
    /// The head is not complete yet.
    Wait,
    /// The client went away, or the socket failed.
    Drop,
    /// The head is read: answer it (a reply) or route it.
    Parsed(Result<http::Parsed, http::Reply>),
    /// An API call's body is not all here, and the client was just told to send
    /// it (`100 Continue`): flush.
    Continue,
}

/// The next thing an open session read.
pub enum Incoming {
    Message(Message),
    /// Nothing more for now.
    Dry,
    /// The read failed; what to do about it.
    Failed(Next),
}

pub struct Conn {
    pub phase: Phase,
    /// Unique for the process: slab keys are reused, serials are not.
    pub serial: u64,
    pub peer: std::net::SocketAddr,
    /// When this phase must be over (a new member: when its snapshot must be
    /// written); `None` only for sessions, which the loop's pings and idle timeout
    /// watch instead.
    pub deadline: Option<Instant>,
    /// On the loop's flush list already.
    pub flush_queued: bool,
    /// Readable data may be left in the socket (a read budget ran out, or the
    /// conn was not reading while it joined).
    pub read_pending: bool,
    /// Holds one of the node's session slots (`--max-connections`).
    pub counted: bool,
    /// Holds one of its address's request-head slots (`Node::take_head`).
    pub head: bool,
    /// Where it was accepted.
    pub listener: http::Listener,
    /// A `HEAD` request: its answer goes without the body.
    pub head_only: bool,
    /// What its output buffers held when last flushed (the loop's gauge).
    pub held_out: usize,
    /// Output allowed beyond `--max-outbound-bytes` until the queue first empties:
    /// the snapshot, which may be large, is not a sign of a slow reader. It must be
    /// written by the member's first deadline, or the member is a slow consumer.
    pub grace: usize,
    /// When the client last sent anything (idle timeout).
    pub last_seen: Instant,
    /// On the loop's reap list: nothing more is done with it this turn.
    pub doomed: bool,
}

impl Conn {
    pub fn new(io: Io, serial: u64, peer: std::net::SocketAddr, deadline: Instant) -> Self {
        Conn {
            phase: Phase::Request { io, buf: Vec::new(), body_end: None, continued: false },
            listener: http::Listener::Public,
            head_only: false,
            serial,
            peer,
            deadline: Some(deadline),
            flush_queued: false,
            read_pending: false,
            counted: false,
            head: false,
            held_out: 0,
            grace: 0,
            last_seen: Instant::now(),
            doomed: false,
        }
    }

    /// Replaces the phase by value. `f` always hands back a phase, so the
    /// connection can never be left detached from its socket.
    fn morph<T>(&mut self, f: impl FnOnce(Phase) -> (Phase, T)) -> T {
        let (phase, out) = f(std::mem::replace(&mut self.phase, Phase::Detached));
        self.phase = phase;
        out
    }

    /// The socket and where it was accepted, for a hand-over to another loop;
    /// only while reading the request.
    pub fn into_io(self) -> Option<Io> {
        match self.phase {
            Phase::Request { io, .. } => Some(io),
            _ => None,
        }
    }

    /// Reads the request head (at most `http::MAX_REQUEST_BYTES` of it), and
    /// an authorized API call's body (at most `policy.max_body`, checked at its
    /// head), and parses the head. Only a call whose head is read and allowed
    /// may hold more than a head's bytes here.
    pub fn read_request(&mut self, policy: &http::Policy, bytes_in: &mut u64) -> RequestStep {
        let Phase::Request { io, buf, body_end, continued } = &mut self.phase else { return RequestStep::Wait };
        loop {
            let budget = body_end.unwrap_or(http::MAX_REQUEST_BYTES).saturating_sub(buf.len()).max(1);
            let drained = io::read_dry(&mut io.stream, budget, |chunk| {
                *bytes_in += chunk.len() as u64;
                buf.extend_from_slice(chunk);
            });
            if matches!(drained, Drained::Failed) {
                return RequestStep::Drop;
            }
            let parsed = http::parse(buf, policy, self.listener);
            if let Ok(http::Parsed::Complete { len, route: http::Route::Api(head) }) = &parsed {
                let end = len + head.body_len;
                if buf.len() < end {
                    if matches!(drained, Drained::Eof) {
                        return RequestStep::Drop;
                    }
                    let first = body_end.replace(end).is_none();
                    // The head's budget ran out: the body's bytes may wait in the
                    // socket, and no new event would say so (edge-triggered).
                    if first && matches!(drained, Drained::Budget) {
                        continue;
                    }
                    if head.expects_continue && !*continued {
                        *continued = true;
                        io.out.queue(b"HTTP/1.1 100 Continue\r\n\r\n");
                        return RequestStep::Continue;
                    }
                    return RequestStep::Wait;
                }
            }
            return match parsed {
                Ok(http::Parsed::Partial) if matches!(drained, Drained::Eof) => RequestStep::Drop,
                Ok(http::Parsed::Partial) => RequestStep::Wait,
                parsed => {
                    self.head_only = http::is_head(buf);
                    RequestStep::Parsed(parsed)
                }
            };
        }
    }

    /// An API call's body, once `read_request` found it all there.
    pub fn request_body(&self, head_len: usize, body_len: usize) -> &[u8] {
        match &self.phase {
            Phase::Request { buf, .. } => buf.get(head_len..head_len + body_len).unwrap_or_default(),
            _ => &[],
        }
    }

    /// A request not answered yet -> Reply: queues the whole answer (its head
    /// alone for a `HEAD`). The deadline stays: a reply must be read within the
    /// time a request may take.
    pub fn reply(&mut self, bytes: &[u8]) -> bool {
        let bytes = if self.head_only { &bytes[..head_end(bytes)] } else { bytes };
        self.morph(|phase| match phase {
            Phase::Request { mut io, .. }
            | Phase::Reading { mut io, .. }
            | Phase::Admitting { mut io, .. }
            | Phase::Api { mut io, .. } => {
                io.out.queue(bytes);
                (Phase::Reply { io }, true)
            }
            other => (other, false),
        })
    }

    /// The same, from parts: a body shared with other replies is queued by
    /// reference. The first part holds the head.
    pub fn reply_parts(&mut self, parts: &[Part]) -> bool {
        if self.head_only {
            let Some(Part::Bytes(first)) = parts.first() else { return false };
            let head = &first[..head_end(first)];
            return self.reply(head);
        }
        self.morph(|phase| match phase {
            Phase::Request { mut io, .. }
            | Phase::Reading { mut io, .. }
            | Phase::Admitting { mut io, .. }
            | Phase::Api { mut io, .. } => {
                io.out.queue_parts(parts);
                (Phase::Reply { io }, true)
            }
            other => (other, false),
        })
    }

    /// Request -> Admitting: an upgrade waits for its paper before it is answered.
    pub fn admit(&mut self, upgrade: http::Upgrade, buf: Vec<u8>, head_len: usize) -> bool {
        self.morph(|phase| match phase {
            Phase::Request { io, .. } => {
                let upgrade = Box::new(upgrade);
                (Phase::Admitting { io, buf, head_len, upgrade, asked: Instant::now() }, true)
            }
            other => (other, false),
        })
    }

    /// Request -> Api: a call waits for its paper or for Redis.
    pub fn start_call(&mut self, call: ApiCall) -> bool {
        self.morph(|phase| match phase {
            Phase::Request { io, .. } => (Phase::Api { io, call: Box::new(call) }, true),
            other => (other, false),
        })
    }

    /// Request -> Reading: a `GET /papers` waits for its paper.
    pub fn wait_for_paper(&mut self, paper: Arc<str>) -> bool {
        self.morph(|phase| match phase {
            Phase::Request { io, .. } => (Phase::Reading { io, paper }, true),
            other => (other, false),
        })
    }

    /// Admitting -> Joining: answers 101; the head took `head_len` bytes, and
    /// what followed it belongs to the session.
    pub fn upgrade(&mut self, ws_key: &str, config: WebSocketConfig, visitor: Visitor) -> bool {
        let upgraded = self.morph(|phase| match phase {
            Phase::Admitting { io, mut buf, head_len, asked, .. } => {
                let rest = buf.split_off(head_len.min(buf.len()));
                let ws = server_websocket(io, &http::switching_protocols(ws_key), rest, config);
                (Phase::Joining { ws, visitor, asked }, true)
            }
            other => (other, false),
        });
        if upgraded {
            // Bytes that came with the request head are read once the session is open.
            self.read_pending = true;
            self.last_seen = Instant::now();
        }
        upgraded
    }

    /// Request -> Echo (`--echo`).
    pub fn open_echo(&mut self, head_len: usize, ws_key: &str, config: WebSocketConfig) -> bool {
        let opened = self.morph(|phase| match phase {
            Phase::Request { io, mut buf, .. } => {
                let rest = buf.split_off(head_len.min(buf.len()));
                (Phase::Echo { ws: server_websocket(io, &http::switching_protocols(ws_key), rest, config) }, true)
            }
            other => (other, false),
        });
        if opened {
            self.deadline = None;
            self.read_pending = true;
            self.last_seen = Instant::now();
        }
        opened
    }

    /// Joining -> Open: returns who joined.
    pub fn join(&mut self, member: Arc<str>, bucket: TokenBucket) -> Option<Visitor> {
        let joined = self.morph(|phase| match phase {
            Phase::Joining { ws, visitor, .. } => {
                let membership = Membership {
                    paper: visitor.paper.clone(),
                    member,
                    user: visitor.user.clone(),
                    role: visitor.role,
                    bucket,
                    unresolved: std::collections::VecDeque::new(),
                    confirmable: 0,
                };
                (Phase::Open { ws, membership }, Some(visitor))
            }
            other => (other, None),
        });
        if joined.is_some() {
            self.deadline = None;
        }
        joined
    }

    /// A session (Joining, Open, Echo) -> Closing: queues the close frame (or,
    /// after the peer's close, tungstenite's echo of it). A slow consumer's
    /// queue is dropped first, so that the close frame is what it reads next;
    /// so is any closing session's queue past `max_outbound` (an unread
    /// snapshot): memory is not held for a session that is over.
    pub fn close(&mut self, reason: CloseReason, deadline: Instant, max_outbound: usize) -> bool {
        let closed = self.morph(|phase| match phase {
            Phase::Joining { mut ws, .. } | Phase::Open { mut ws, .. } | Phase::Echo { mut ws } => {
                let out = &mut ws.get_mut().out;
                if reason == CloseReason::SlowConsumer || out.pending() > max_outbound {
                    out.drop_queued();
                }
                let frame = CloseFrame { code: reason.code(), reason: reason.text().into() };
                // Either way the frame lands in `Io`, which cannot fail.
                let _ = if reason == CloseReason::Normal { ws.flush() } else { ws.close(Some(frame)) };
                // After a framing error the rest of the input cannot be parsed.
                let after = match reason {
                    CloseReason::MessageTooBig | CloseReason::ProtocolError | CloseReason::InvalidUtf8 => {
                        AfterClose::Discard
                    }
                    _ => AfterClose::Frames,
                };
                (Phase::Closing { ws, after }, true)
            }
            other => (other, false),
        });
        if closed {
            self.deadline = Some(deadline);
        }
        closed
    }

    /// The next message of an open session, or why there is none.
    pub fn next_message(&mut self) -> Incoming {
        let Phase::Open { ws, .. } = &mut self.phase else { return Incoming::Failed(Next::Continue) };
        match ws.read() {
            Ok(message) => Incoming::Message(message),
            Err(e) if io::would_block(&e) => Incoming::Dry,
            Err(e) => Incoming::Failed(io::after_read_error(&e)),
        }
    }

    /// Takes back the pong tungstenite queued for the ping it just returned: a ping
    /// past the rate limit is refused without an answer (PROTOCOL.md 3.3).
    pub fn drop_pong(&mut self) {
        let Phase::Open { ws, .. } = &mut self.phase else { return };
        let mark = ws.get_ref().out.mark();
        // tungstenite keeps the pong until its next write or flush; the flush puts
        // it in `Io` (which cannot fail), right after `mark`.
        let _ = ws.flush();
        ws.get_mut().out.truncate_to(mark);
    }

    /// `/echo`: sends every message back, through the same output path as sessions.
    pub fn read_echo(&mut self) -> Next {
        let Phase::Echo { ws } = &mut self.phase else { return Next::Continue };
        for _ in 0..MAX_MESSAGES_PER_READ {
            match ws.read() {
                Ok(message @ (Message::Text(_) | Message::Binary(_))) => {
                    let _ = ws.write(message);
                }
                Ok(Message::Close(_)) => return Next::Close(CloseReason::Normal),
                Ok(_) => {}
                Err(e) if io::would_block(&e) => {
                    let _ = ws.flush();
                    return Next::Continue;
                }
                Err(e) => return io::after_read_error(&e),
            }
        }
        Next::ReadAgain
    }

    /// Reads what a connection that expects nothing more sends: after a plain
    /// reply, while a read waits, or while closing.
    pub fn read_leftovers(&mut self) -> Next {
        match &mut self.phase {
            Phase::Reply { io } | Phase::Reading { io, .. } | Phase::Api { io, .. } => {
                match io::read_dry(&mut io.stream, DISCARD_BUDGET, |_| {}) {
                    Drained::Dry | Drained::Eof => Next::Continue,
                    Drained::Budget => Next::ReadAgain,
                    Drained::Failed => Next::Drop,
                }
            }
            Phase::Closing { ws, after: AfterClose::Discard } => {
                match io::read_dry(&mut ws.get_mut().stream, DISCARD_BUDGET, |_| {}) {
                    Drained::Dry => Next::Continue,
                    Drained::Budget => Next::ReadAgain,
                    Drained::Eof | Drained::Failed => Next::Drop,
                }
            }
            Phase::Closing { ws, after: AfterClose::Frames } => {
                for _ in 0..MAX_MESSAGES_PER_READ {
                    match ws.read() {
                        Ok(_) => {}
                        Err(e) if io::would_block(&e) => return Next::Continue,
                        // Closed by both sides, or failed: nothing more will be read.
                        Err(_) if ws.get_ref().out.pending() == 0 => return Next::Drop,
                        Err(_) => return Next::Continue,
                    }
                }
                Next::ReadAgain
            }
            _ => Next::Continue,
        }
    }

    /// What the outcome of a flush means: a finished reply or close is dropped, a
    /// session whose unread output passed `max_outbound` (plus the snapshot's
    /// grace) is a slow consumer.
    pub fn after_flush(&mut self, flushed: std::io::Result<Flushed>, max_outbound: usize) -> Next {
        match flushed {
            Err(_) => Next::Drop,
            Ok(Flushed::Blocked) => {
                let pending = self.phase.io().map_or(0, |io| io.out.pending());
                let slow = pending > max_outbound + self.grace;
                if slow && matches!(self.phase, Phase::Open { .. } | Phase::Joining { .. }) {
                    Next::Close(CloseReason::SlowConsumer)
                } else {
                    Next::Continue
                }
            }
            Ok(Flushed::Done) => {
                self.grace = 0;
                if let Phase::Open { .. } = self.phase {
                    // The snapshot is out: the member's pings and idle timeout take over.
                    self.deadline = None;
                }
                match &self.phase {
                    Phase::Reply { .. } => Next::Drop,
                    Phase::Closing { ws, after: AfterClose::Discard } => {
                        // Our close frame is out: say so with a FIN, then read until the
                        // peer's EOF, so that unread input never turns into a reset that
                        // could destroy the close frame in flight.
                        let _ = ws.get_ref().stream.shutdown(std::net::Shutdown::Write);
                        Next::Continue
                    }
                    Phase::Closing { ws, .. } if !ws.can_read() => Next::Drop,
                    _ => Next::Continue,
                }
            }
        }
    }
}
