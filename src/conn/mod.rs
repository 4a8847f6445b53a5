//! One TCP connection and its phase: reading the HTTP request, answering it, or
//! speaking WebSocket. Knows sockets, HTTP and frames, never what a note is.

pub mod http;

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;

use crate::auth::Role;
use crate::rate::TokenBucket;
use tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tungstenite::WebSocket;

/// Output capacity kept by a connection once its queue is empty; more is freed, so
/// a burst does not pin memory on thousands of idle connections.
/// Above the largest note (16 KiB by default) with its message around it, so that
/// a paper of large notes does not free and allocate again for every message.
const KEEP_OUT_CAPACITY: usize = 32 * 1024;

/// The socket with its outbound queue. tungstenite writes its own frames (pongs,
/// close replies) through `Write`, which only appends to the queue, so they stay
/// in order with the broadcast frames queued directly; the event loop flushes the
/// queue to the socket once per turn.
pub struct Io {
    pub stream: TcpStream,
    pub out: Outbox,
    /// Bytes read since the loop last collected them for its metrics.
    pub bytes_in: u64,
}

impl Io {
    pub fn new(stream: TcpStream) -> Self {
        Io { stream, out: Outbox::default(), bytes_in: 0 }
    }

    /// Writes what is queued until done or the socket is full.
    ///
    /// # Errors
    /// The socket failed: the peer is gone.
    pub fn flush(&mut self) -> io::Result<Flushed> {
        self.out.write_to(&mut self.stream)
    }
}

/// How far a flush got.
#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Everything queued is in the kernel.
    Done,
    /// The socket is full; the rest goes when it is writable again.
    Blocked,
}

/// One connection's outbound bytes: queued by the loop, written once per turn.
#[derive(Debug, Default)]
pub struct Outbox {
    buf: Vec<u8>,
    /// Bytes of `buf` already written to the socket.
    sent: usize,
    /// Where whole WebSocket frames start in `buf`; what lies before is written or
    /// is the HTTP head. Lets a slow consumer's queue be cut at a frame boundary.
    frames_from: usize,
}

impl Outbox {
    /// Queues bytes; nothing touches the socket until `write_to`.
    pub fn queue(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Queues the HTTP head that comes before the first frame.
    pub fn queue_head(&mut self, head: &[u8]) {
        self.queue(head);
        self.frames_from = self.buf.len();
    }

    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }

    /// Writes what is queued until done or `sink` would block.
    ///
    /// # Errors
    /// The sink failed.
    pub fn write_to(&mut self, sink: &mut impl Write) -> io::Result<Flushed> {
        while self.sent < self.buf.len() {
            match sink.write(&self.buf[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.compact();
                    return Ok(Flushed::Blocked);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.buf.clear();
        self.sent = 0;
        self.frames_from = 0;
        if self.buf.capacity() > KEEP_OUT_CAPACITY {
            self.buf = Vec::new();
        }
        Ok(Flushed::Done)
    }

    /// Drops every queued frame not yet begun on the wire (a slow consumer's
    /// backlog), keeping the one partly written so the stream stays valid.
    pub fn drop_queued(&mut self) {
        self.skip_sent_frames();
        let keep = if self.sent > self.frames_from {
            self.frames_from + frame_len(&self.buf[self.frames_from..]).unwrap_or(0)
        } else {
            self.frames_from
        };
        self.buf.truncate(keep.max(self.sent));
    }

    fn skip_sent_frames(&mut self) {
        while let Some(len) = frame_len(&self.buf[self.frames_from..]) {
            if self.frames_from + len > self.sent {
                break;
            }
            self.frames_from += len;
        }
    }

    /// Frees the written part of the queue once it is large.
    fn compact(&mut self) {
        self.skip_sent_frames();
        if self.frames_from >= KEEP_OUT_CAPACITY && self.frames_from * 2 >= self.buf.len() {
            self.buf.drain(..self.frames_from);
            self.sent -= self.frames_from;
            self.frames_from = 0;
        }
    }
}

/// The length of the server frame at the start of `buf`, if it is all there.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let b1 = *buf.get(1)?;
    let (header, len) = match b1 & 0x7F {
        126 => (4, u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize),
        127 => (10, u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize),
        n => (2, n as usize),
    };
    let total = header + if b1 & 0x80 != 0 { 4 } else { 0 } + len;
    (buf.len() >= total).then_some(total)
}

impl Read for Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stream.read(buf)?;
        self.bytes_in += n as u64;
        Ok(n)
    }
}

impl Write for Io {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.queue(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

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

pub fn server_websocket(io: Io, already_read: Vec<u8>, config: WebSocketConfig) -> WebSocket<Io> {
    WebSocket::from_partially_read(io, already_read, WsRole::Server, Some(config))
}

/// Who an upgraded client is, before it joins its paper.
pub struct Visitor {
    pub paper: Arc<str>,
    pub user: Arc<str>,
    pub name: Arc<str>,
    pub role: Role,
}

/// A member's side of its session.
pub struct Session {
    pub paper: Arc<str>,
    /// The member id (`you`, `from`).
    pub member: Arc<str>,
    pub user: Arc<str>,
    pub role: Role,
    pub bucket: TokenBucket,
}

/// Where a connection is in its life. Each phase owns what it needs.
pub enum Phase {
    /// Reading the HTTP request head.
    Request { io: Io, buf: Vec<u8> },
    /// Writing a plain HTTP reply; closed once written.
    Reply { io: Io },
    /// `GET /papers/{paper}` waiting for the paper to be read.
    Reading { io: Io, paper: Arc<str> },
    /// Upgraded, waiting for its paper to be read; no snapshot yet, and what the
    /// client sends waits in the socket.
    Joining { ws: WebSocket<Io>, visitor: Visitor },
    /// A member: the session of PROTOCOL.md section 3.
    Open { ws: WebSocket<Io>, session: Session },
    /// `/echo` (`--echo`): every message comes back as it was sent.
    Echo { ws: WebSocket<Io> },
    /// A close frame is queued or received; the socket is dropped once the output
    /// is written and the peer closed too, or at the loop's close deadline. With
    /// `discard`, the peer broke the framing: what it sends now is read and
    /// dropped unparsed, and our side is shut once the close frame is out.
    Closing { ws: WebSocket<Io>, discard: bool },
    /// Transient, while a phase is being replaced.
    Gone,
}

impl Phase {
    pub fn io(&mut self) -> Option<&mut Io> {
        match self {
            Phase::Request { io, .. } | Phase::Reply { io } | Phase::Reading { io, .. } => Some(io),
            Phase::Joining { ws, .. } | Phase::Open { ws, .. } | Phase::Echo { ws } | Phase::Closing { ws, .. } => {
                Some(ws.get_mut())
            }
            Phase::Gone => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Phase::Request { .. } => "request",
            Phase::Reply { .. } => "reply",
            Phase::Reading { .. } => "reading",
            Phase::Joining { .. } => "joining",
            Phase::Open { .. } => "open",
            Phase::Echo { .. } => "echo",
            Phase::Closing { .. } => "closing",
            Phase::Gone => "gone",
        }
    }
}

pub struct Conn {
    pub phase: Phase,
    /// Unique for the process: slab keys are reused, serials are not.
    pub serial: u64,
    pub peer: SocketAddr,
    /// On the loop's flush list already.
    pub flush_queued: bool,
    /// Readable data may be left in the socket (a read budget ran out, or the
    /// conn was not reading while it joined).
    pub read_pending: bool,
    /// Holds one of the node's session slots (`--max-connections`).
    pub counted: bool,
    /// Output allowed beyond `--max-outbound-bytes` until the queue first empties:
    /// the snapshot, which may be large, is not a sign of a slow reader.
    pub grace: usize,
    /// When the client last sent anything (idle timeout).
    pub last_seen: Instant,
}

impl Conn {
    pub fn new(io: Io, serial: u64, peer: SocketAddr) -> Self {
        Conn {
            phase: Phase::Request { io, buf: Vec::new() },
            serial,
            peer,
            flush_queued: false,
            read_pending: false,
            counted: false,
            grace: 0,
            last_seen: Instant::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_lengths_are_read_from_headers() {
        assert_eq!(frame_len(&[0x81, 3, b'a', b'b', b'c']), Some(5));
        assert_eq!(frame_len(&[0x81, 3, b'a']), None);
        let mut medium = vec![0x81, 126, 0x01, 0x00];
        medium.resize(4 + 256, b'x');
        assert_eq!(frame_len(&medium), Some(260));
        assert_eq!(frame_len(&[0x88]), None);
    }

    /// A sink that takes `room` bytes, then would block.
    struct Tight {
        got: Vec<u8>,
        room: usize,
    }

    impl Write for Tight {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_slow_consumers_queue_is_cut_after_the_frame_on_the_wire() {
        let mut out = Outbox::default();
        let head = b"HTTP/1.1 101\r\n\r\n".len();
        out.queue_head(b"HTTP/1.1 101\r\n\r\n");
        let frame = [0x81, 3, b'a', b'b', b'c'];
        for _ in 0..4 {
            out.queue(&frame);
        }
        let mut sink = Tight { got: Vec::new(), room: head + 5 + 2 };
        assert_eq!(out.write_to(&mut sink).unwrap(), Flushed::Blocked);
        out.drop_queued();
        // The second frame is on the wire already: it is finished, the rest dropped.
        assert_eq!(out.pending(), 3);
        sink.room = 100;
        assert_eq!(out.write_to(&mut sink).unwrap(), Flushed::Done);
        assert_eq!(sink.got.len(), head + 10);
        assert_eq!(out.pending(), 0);
    }

    #[test]
    fn a_queue_not_yet_begun_is_dropped_whole() {
        let mut out = Outbox::default();
        out.queue(&[0x81, 1, b'x']);
        out.drop_queued();
        assert_eq!(out.pending(), 0);
    }
}
