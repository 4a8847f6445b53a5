//! A connection's bytes: the socket with its outbound queue, the read until the
//! socket is dry (with a budget, so one peer cannot hold the loop), and what a
//! failed WebSocket read means. `WouldBlock` is folded here and never travels up.

use std::io::{self, Read, Write};

use mio::net::TcpStream;

use super::Next;
use crate::protocol::CloseReason;

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

    /// Where the queue ends now; `truncate_to` takes it back there.
    pub fn mark(&self) -> usize {
        self.buf.len()
    }

    /// Drops what was queued after `mark` (nothing of it can be on the wire yet:
    /// the socket is written only by `write_to`).
    pub fn truncate_to(&mut self, mark: usize) {
        if mark >= self.sent && mark <= self.buf.len() {
            self.buf.truncate(mark);
        }
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

/// How a read until the socket was dry ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// The socket has nothing more for now.
    Dry,
    /// The budget is spent; more may be waiting (the loop reads again next turn).
    Budget,
    /// The peer closed its side.
    Eof,
    /// The socket failed.
    Failed,
}

/// Reads at most `budget` bytes, handing each chunk to `sink`, until the socket
/// would block. The one read loop of the server's plain (non-WebSocket) reads.
pub fn read_dry(stream: &mut impl Read, mut budget: usize, mut sink: impl FnMut(&[u8])) -> Drained {
    let mut chunk = [0u8; 4096];
    while budget > 0 {
        let want = chunk.len().min(budget);
        match stream.read(&mut chunk[..want]) {
            Ok(0) => return Drained::Eof,
            Ok(n) => {
                budget -= n;
                sink(&chunk[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Drained::Dry,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Drained::Failed,
        }
    }
    Drained::Budget
}

/// A WebSocket read that found no complete message: not an error.
pub fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// What a failed WebSocket read means: a broken rule of RFC 6455 gets its close
/// code, a vanished peer is dropped.
pub fn after_read_error(e: &tungstenite::Error) -> Next {
    use tungstenite::error::ProtocolError;
    use tungstenite::Error;
    match e {
        Error::Capacity(_) => Next::Close(CloseReason::MessageTooBig),
        Error::Utf8(_) => Next::Close(CloseReason::InvalidUtf8),
        Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => Next::Drop,
        Error::Protocol(_) => Next::Close(CloseReason::ProtocolError),
        _ => Next::Drop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

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
    fn reads_stop_at_the_budget_or_the_end() {
        let mut got = Vec::new();
        let mut input = Cursor::new(vec![7u8; 10_000]);
        assert_eq!(read_dry(&mut input, 6_000, |b| got.extend_from_slice(b)), Drained::Budget);
        assert_eq!(got.len(), 6_000);
        assert_eq!(read_dry(&mut input, 6_000, |b| got.extend_from_slice(b)), Drained::Eof);
        assert_eq!(got.len(), 10_000);
    }

    #[test]
    fn a_queue_not_yet_begun_is_dropped_whole() {
        let mut out = Outbox::default();
        out.queue(&[0x81, 1, b'x']);
        out.drop_queued();
        assert_eq!(out.pending(), 0);
    }
}
