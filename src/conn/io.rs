//! A connection's bytes: the socket with its outbound queue (its own bytes, and
//! bytes shared with other connections by reference, cut only at frame
//! boundaries), the read until the socket is dry (with a budget, so one peer
//! cannot hold the loop), and what a failed WebSocket read means. `WouldBlock`
//! is folded here and never travels up.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};

use mio::net::TcpStream;

use super::Next;
use crate::protocol::CloseReason;
use crate::shared::Shared;

/// Output capacity kept by a connection once its queue is empty; more is freed, so
/// a burst does not pin memory on thousands of idle connections.
/// Above the largest note (16 KiB by default) with its message around it, so that
/// a paper of large notes does not free and allocate again for every message.
const KEEP_OUT_CAPACITY: usize = 32 * 1024;
/// Segments handed to one vectored write.
const MAX_SLICES: usize = 16;

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

/// A part of what is queued at once: bytes copied into the queue, or shared
/// bytes it only refers to.
#[derive(Clone, Copy)]
pub enum Part<'a> {
    Bytes(&'a [u8]),
    Shared(&'a Shared),
}

/// A run of queued bytes: this connection's own, or a part of bytes shared with
/// other connections (a snapshot's common part), which costs this queue nothing.
#[derive(Debug)]
enum Segment {
    Owned(Vec<u8>),
    Shared { shared: Shared, from: usize, to: usize },
}

impl Segment {
    fn bytes(&self) -> &[u8] {
        match self {
            Segment::Owned(buf) => buf,
            Segment::Shared { shared, from, to } => &shared.bytes()[*from..*to],
        }
    }

    fn len(&self) -> usize {
        match self {
            Segment::Owned(buf) => buf.len(),
            Segment::Shared { from, to, .. } => to - from,
        }
    }

    /// Keeps the first `len` bytes.
    fn truncate(&mut self, len: usize) {
        match self {
            Segment::Owned(buf) => buf.truncate(len),
            Segment::Shared { from, to, .. } => *to = (*from + len).min(*to),
        }
    }

    /// Drops the first `len` bytes.
    fn advance(&mut self, len: usize) {
        match self {
            Segment::Owned(buf) => {
                buf.drain(..len);
            }
            Segment::Shared { from, .. } => *from += len,
        }
    }
}

/// The segments before an outbox's tail: allocated only while shared bytes are
/// queued, so that an outbox of broadcasts stays as small as a plain buffer.
// Boxed on purpose: one pointer on every connection instead of a deque's four
// words, and the box exists only while a snapshot is queued.
#[allow(clippy::box_collection)]
#[derive(Debug, Default)]
struct Front(Option<Box<VecDeque<Segment>>>);

impl Front {
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|d| d.is_empty())
    }

    fn iter(&self) -> impl Iterator<Item = &Segment> {
        self.0.iter().flat_map(|d| d.iter())
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Segment> {
        self.0.iter_mut().flat_map(|d| d.iter_mut())
    }

    fn push_back(&mut self, segment: Segment) {
        self.0.get_or_insert_default().push_back(segment);
    }

    fn front(&self) -> Option<&Segment> {
        self.0.as_ref()?.front()
    }

    fn front_mut(&mut self) -> Option<&mut Segment> {
        self.0.as_mut()?.front_mut()
    }

    fn back_mut(&mut self) -> Option<&mut Segment> {
        self.0.as_mut()?.back_mut()
    }

    fn pop_front(&mut self) -> Option<Segment> {
        let segment = self.0.as_mut()?.pop_front();
        if self.is_empty() {
            self.0 = None;
        }
        segment
    }

    fn pop_back(&mut self) -> Option<Segment> {
        let segment = self.0.as_mut()?.pop_back();
        if self.is_empty() {
            self.0 = None;
        }
        segment
    }

    fn clear(&mut self) {
        self.0 = None;
    }
}

/// One connection's outbound bytes: queued by the loop, written once per turn.
///
/// Positions are counted in bytes since the connection began, so a mark stays
/// valid while written bytes go. The queue is `front` (segments, only once
/// shared bytes were queued) then `tail`, an owned buffer: a broadcast is one
/// copy into `tail` and one write from it, as with a single buffer, and shared
/// bytes are referenced, never copied.
#[derive(Debug, Default)]
pub struct Outbox {
    front: Front,
    tail: Vec<u8>,
    /// Position of the first byte held (of `front`, or of `tail` when `front` is empty).
    base: usize,
    /// Position up to which bytes are written to the socket.
    sent: usize,
    /// Position of the end of the queue.
    end: usize,
    /// Where whole WebSocket frames start; what lies before is written, is the
    /// HTTP head, or is a frame begun on the wire that must be finished. Lets a
    /// slow consumer's queue be cut at a frame boundary.
    frames_from: usize,
}

impl Outbox {
    /// Queues bytes; nothing touches the socket until `write_to`.
    pub fn queue(&mut self, bytes: &[u8]) {
        self.tail.extend_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Queues bytes shared with other connections, by reference.
    pub fn queue_shared(&mut self, shared: &Shared) {
        if shared.is_empty() {
            return;
        }
        if !self.tail.is_empty() {
            self.front.push_back(Segment::Owned(std::mem::take(&mut self.tail)));
        } else if self.front.is_empty() {
            self.base = self.end;
        }
        self.front.push_back(Segment::Shared { shared: shared.clone(), from: 0, to: shared.len() });
        self.end += shared.len();
    }

    /// Queues parts in order: one frame, or one reply, written from pieces.
    pub fn queue_parts(&mut self, parts: &[Part]) {
        for part in parts {
            match part {
                Part::Bytes(bytes) => self.queue(bytes),
                Part::Shared(shared) => self.queue_shared(shared),
            }
        }
    }

    /// Queues the HTTP head that comes before the first frame.
    pub fn queue_head(&mut self, head: &[u8]) {
        self.queue(head);
        self.frames_from = self.end;
    }

    /// Where the queue ends now; `truncate_to` takes it back there.
    pub fn mark(&self) -> usize {
        self.end
    }

    /// Drops what was queued after `mark` (nothing of it can be on the wire yet:
    /// the socket is written only by `write_to`).
    pub fn truncate_to(&mut self, mark: usize) {
        if mark >= self.sent && mark <= self.end {
            self.cut(mark);
        }
    }

    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.end - self.sent
    }

    /// Bytes this connection's own buffers hold (shared bytes are counted by
    /// their owner, once for every connection).
    pub fn held(&self) -> usize {
        let owned = self.front.iter().map(|s| match s {
            Segment::Owned(buf) => buf.capacity(),
            Segment::Shared { .. } => 0,
        });
        owned.sum::<usize>() + self.tail.capacity()
    }

    /// Where `tail` starts.
    fn tail_start(&self) -> usize {
        self.end - self.tail.len()
    }

    /// Every run of bytes held, in order, from position `base`.
    fn runs(&self) -> impl Iterator<Item = &[u8]> {
        self.front.iter().map(Segment::bytes).chain(std::iter::once(self.tail.as_slice()))
    }

    /// Writes what is queued until done or `sink` would block.
    ///
    /// # Errors
    /// The sink failed.
    pub fn write_to(&mut self, sink: &mut impl Write) -> io::Result<Flushed> {
        while self.sent < self.end {
            let result = if self.front.is_empty() {
                // The usual case (no snapshot queued): one buffer, one plain write.
                let from = self.sent - self.base;
                sink.write(&self.tail[from..])
            } else {
                self.write_runs(sink)
            };
            match result {
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
        self.frames_from = self.end;
        self.base = self.end;
        if !self.front.is_empty() {
            self.front.clear();
        }
        self.tail.clear();
        if self.tail.capacity() > KEEP_OUT_CAPACITY {
            self.tail = Vec::new();
        }
        Ok(Flushed::Done)
    }

    /// One vectored write of the runs not yet written (shared bytes are queued).
    #[cold]
    fn write_runs(&self, sink: &mut impl Write) -> io::Result<usize> {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut count = 0;
        let mut skip = self.sent - self.base;
        for run in self.runs() {
            if skip >= run.len() {
                skip -= run.len();
                continue;
            }
            slices[count] = IoSlice::new(&run[skip..]);
            skip = 0;
            count += 1;
            if count == MAX_SLICES {
                break;
            }
        }
        sink.write_vectored(&slices[..count])
    }

    /// Drops every queued frame not yet begun on the wire (a slow consumer's
    /// backlog), keeping the one partly written so the stream stays valid, and
    /// gives back the memory the dropped frames took.
    pub fn drop_queued(&mut self) {
        self.skip_sent_frames();
        let keep = if self.sent > self.frames_from {
            self.frames_from + self.frame_len_at(self.frames_from).unwrap_or(0)
        } else {
            self.frames_from
        };
        let keep = keep.max(self.sent);
        self.cut(keep);
        // What is left needs no more parsing: it is written, or the rest of one frame.
        self.frames_from = keep;
        self.discard_written(self.sent);
        let shrink = |buf: &mut Vec<u8>| {
            if buf.capacity() > KEEP_OUT_CAPACITY && buf.capacity() > 2 * buf.len() {
                *buf = buf.as_slice().to_vec();
            }
        };
        for segment in self.front.iter_mut() {
            if let Segment::Owned(buf) = segment {
                shrink(buf);
            }
        }
        shrink(&mut self.tail);
    }

    /// Takes the queue back to position `at` (at or after `base`).
    fn cut(&mut self, at: usize) {
        let tail_start = self.tail_start();
        if tail_start >= at {
            self.tail.clear();
            self.end = tail_start;
        } else {
            self.tail.truncate(at - tail_start);
            self.end = at;
            return;
        }
        while self.end > at {
            let Some(last) = self.front.back_mut() else { break };
            let start = self.end - last.len();
            if start >= at {
                self.end = start;
                self.front.pop_back();
            } else {
                last.truncate(at - start);
                self.end = at;
            }
        }
        if self.front.is_empty() {
            self.base = self.end;
        }
    }

    fn skip_sent_frames(&mut self) {
        while let Some(len) = self.frame_len_at(self.frames_from) {
            if self.frames_from + len > self.sent {
                break;
            }
            self.frames_from += len;
        }
    }

    /// The length of the server frame at position `at`, if it is all queued.
    fn frame_len_at(&self, at: usize) -> Option<usize> {
        if at < self.base {
            return None;
        }
        let mut header = [0u8; 10];
        let mut got = 0;
        let mut start = self.base;
        for run in self.runs() {
            let end = start + run.len();
            if end > at + got {
                let from = at + got - start;
                let n = (run.len() - from).min(header.len() - got);
                header[got..got + n].copy_from_slice(&run[from..from + n]);
                got += n;
                if got == header.len() {
                    break;
                }
            }
            start = end;
        }
        let total = frame_len(&header[..got])?;
        (at + total <= self.end).then_some(total)
    }

    /// Frees the written part of the queue once it is large: segments written
    /// whole at once, the written start of an owned buffer once it is large.
    #[cold]
    fn compact(&mut self) {
        self.skip_sent_frames();
        let written = self.frames_from.min(self.sent);
        self.pop_written(written);
        let done = written - self.base;
        let buf = match self.front.front_mut() {
            Some(Segment::Owned(buf)) => buf,
            Some(Segment::Shared { .. }) => return,
            None => &mut self.tail,
        };
        if done >= KEEP_OUT_CAPACITY && done * 2 >= buf.len() {
            buf.drain(..done);
            self.base += done;
        }
    }

    /// Drops the front segments that end at or before `upto` (written, and parsed).
    fn pop_written(&mut self, upto: usize) {
        while let Some(first) = self.front.front() {
            let first_end = self.base + first.len();
            if first_end > upto {
                break;
            }
            self.base = first_end;
            self.front.pop_front();
        }
    }

    /// Drops every byte before `upto` (written, and parsed).
    fn discard_written(&mut self, upto: usize) {
        self.pop_written(upto);
        let done = upto.saturating_sub(self.base);
        match self.front.front_mut() {
            Some(first) => {
                let done = done.min(first.len());
                first.advance(done);
                self.base += done;
            }
            None => {
                let done = done.min(self.tail.len());
                self.tail.drain(..done);
                self.base += done;
            }
        }
    }
}

/// The length of the server frame whose header starts `buf`; `None` if the
/// header is not all there.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let b1 = *buf.get(1)?;
    let (header, len) = match b1 & 0x7F {
        126 => (4, u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize),
        127 => (10, u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize),
        n => (2, n as usize),
    };
    Some(header + if b1 & 0x80 != 0 { 4 } else { 0 } + len)
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
        assert_eq!(frame_len(&[0x81, 3]), Some(5), "the header alone says the length");
        assert_eq!(frame_len(&[0x81, 126, 0x01]), None, "a header cut short");
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

    /// A frame's bytes, header included, of a text payload of `len` bytes of `fill`.
    fn text_frame(len: usize, fill: u8) -> Vec<u8> {
        let mut frame = vec![0x81];
        match len {
            0..=125 => frame.push(len as u8),
            126..=0xFFFF => {
                frame.push(126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                frame.push(127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        frame.resize(frame.len() + len, fill);
        frame
    }

    #[test]
    fn a_frame_of_owned_and_shared_parts_is_written_whole_and_cut_whole() {
        let in_flight = std::sync::Arc::new(crate::shared::InFlight::new(usize::MAX));
        let body = 100_000;
        let frame = text_frame(body, b's');
        let (header, payload) = frame.split_at(frame.len() - body);
        // A snapshot: the header and a per-joiner start, the shared middle, a per-joiner end.
        let shared = Shared::new(payload[10..body - 10].to_vec(), &in_flight);
        let mut out = Outbox::default();
        out.queue_head(b"HTTP/1.1 101\r\n\r\n");
        out.queue(header);
        out.queue(&payload[..10]);
        out.queue_shared(&shared);
        out.queue(&payload[body - 10..]);
        let after = [0x81, 3, b'a', b'b', b'c'];
        out.queue(&after);
        let mut sink = Tight { got: Vec::new(), room: 50_000 };
        assert_eq!(out.write_to(&mut sink).unwrap(), Flushed::Blocked);
        drop(shared);
        assert_eq!(in_flight.used(), body - 20, "the queue holds the shared part");
        // Cut in the middle of the shared part: that frame is finished, the next dropped.
        out.drop_queued();
        let mut close = Vec::new();
        close.extend_from_slice(&[0x88, 2, 0x03, 0xf5]);
        out.queue(&close);
        sink.room = usize::MAX;
        assert_eq!(out.write_to(&mut sink).unwrap(), Flushed::Done);
        let mut expected = b"HTTP/1.1 101\r\n\r\n".to_vec();
        expected.extend_from_slice(&frame);
        expected.extend_from_slice(&close);
        assert!(sink.got == expected, "the stream is not the frame then the close");
        assert_eq!(in_flight.used(), 0, "written shared bytes are let go");
    }

    #[test]
    fn dropping_a_queue_gives_its_memory_back() {
        let mut out = Outbox::default();
        let frame = text_frame(200_000, b'x');
        for _ in 0..20 {
            out.queue(&frame);
        }
        let mut sink = Tight { got: Vec::new(), room: 1_000 };
        assert_eq!(out.write_to(&mut sink).unwrap(), Flushed::Blocked);
        assert!(out.held() >= 20 * 200_000);
        out.drop_queued();
        assert_eq!(out.pending(), frame.len() - 1_000, "the frame begun is kept");
        assert!(out.held() < 2 * frame.len(), "{} bytes held after the drop", out.held());
        sink.room = usize::MAX;
        assert_eq!(out.write_to(&mut sink).unwrap(), Flushed::Done);
        assert!(sink.got == frame);
        assert!(out.held() <= KEEP_OUT_CAPACITY);
    }

    #[test]
    fn a_mark_survives_writes_and_takes_back_what_followed() {
        let mut out = Outbox::default();
        out.queue(&[0x81, 1, b'a']);
        let mut sink = Tight { got: Vec::new(), room: 2 };
        assert_eq!(out.write_to(&mut sink).unwrap(), Flushed::Blocked);
        let mark = out.mark();
        out.queue(&[0x8a, 0]);
        out.truncate_to(mark);
        assert_eq!(out.pending(), 1);
        sink.room = 10;
        assert_eq!(out.write_to(&mut sink).unwrap(), Flushed::Done);
        assert_eq!(sink.got, vec![0x81, 1, b'a']);
    }

    #[test]
    fn any_mix_of_parts_writes_and_cuts_leaves_a_stream_of_whole_frames() {
        let in_flight = std::sync::Arc::new(crate::shared::InFlight::new(usize::MAX));
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |below: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % below as u64) as usize
        };
        for round in 0..200 {
            let mut out = Outbox::default();
            let mut queued: Vec<Vec<u8>> = Vec::new();
            let mut sink = Tight { got: Vec::new(), room: 0 };
            let cut_at = next(16); // 12 and above: never cut
            for step in 0..12 {
                let len = [3, 100, 200, 70_000, 300_000][next(5)];
                let frame = text_frame(len, b'a' + (step as u8));
                if len > 1_000 && next(2) == 0 {
                    // A snapshot: its own start, a shared middle, its own end.
                    let (start, rest) = frame.split_at(frame.len() / 3);
                    let (middle, end) = rest.split_at(rest.len() / 2);
                    out.queue(start);
                    out.queue_shared(&Shared::new(middle.to_vec(), &in_flight));
                    out.queue(end);
                } else {
                    out.queue(&frame);
                }
                queued.push(frame);
                if next(4) == 0 {
                    // A pong taken back.
                    let mark = out.mark();
                    out.queue(&[0x8a, 0]);
                    out.truncate_to(mark);
                }
                sink.room = next(150_000);
                let _ = out.write_to(&mut sink).unwrap();
                if step == cut_at {
                    out.drop_queued();
                    out.queue(&[0x88, 0]);
                    break;
                }
            }
            sink.room = usize::MAX;
            assert_eq!(out.write_to(&mut sink).unwrap(), Flushed::Done);
            assert_eq!(out.pending(), 0);
            // What went out: whole frames, in order, the close frame last if cut.
            let mut at = 0;
            let mut frames = Vec::new();
            while at < sink.got.len() {
                let len = frame_len(&sink.got[at..]).expect("a frame header");
                assert!(at + len <= sink.got.len(), "round {round}: a frame cut short");
                frames.push(sink.got[at..at + len].to_vec());
                at += len;
            }
            let cut = frames.last().is_some_and(|f| f[..] == [0x88, 0]);
            if cut {
                frames.pop();
            }
            assert!(frames.len() <= queued.len());
            assert!(frames.iter().zip(&queued).all(|(a, b)| a == b), "round {round}: frames out of order");
            if !cut {
                assert_eq!(frames.len(), queued.len(), "round {round}: frames lost without a cut");
            }
            drop(out);
            assert_eq!(in_flight.used(), 0, "round {round}: shared bytes kept");
        }
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
