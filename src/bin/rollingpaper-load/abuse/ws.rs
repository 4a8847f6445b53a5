//! A small blocking WebSocket client for the abuse mode: one thread per
//! session, every read bounded by a deadline, every write by a timeout. Speaks
//! plain `ws://` only, from a chosen loopback source address (so that each kind
//! of client is its own "address" to the server), with the frames of `wire`.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use crate::wire::{self, Handshake};

/// Largest server frame read (the snapshot of a paper at its limits fits).
const MAX_FRAME: usize = 64 * 1024 * 1024;
/// How long a blocking write may wait for the server to take bytes.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A TCP connection to `addr` from `source` (when both are of one family), with
/// a receive buffer of `rcvbuf` bytes if given (set before connecting, so that
/// the window stays small), within `timeout`.
///
/// # Errors
/// The socket cannot be made, bound or connected in time.
pub fn tcp(
    addr: SocketAddr,
    source: Option<IpAddr>,
    rcvbuf: Option<usize>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if let Some(ip) = source.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    if let Some(n) = rcvbuf {
        socket.set_recv_buffer_size(n)?;
    }
    socket.connect_timeout(&addr.into(), timeout)?;
    let tcp: TcpStream = socket.into();
    tcp.set_nodelay(true)?;
    tcp.set_write_timeout(Some(WRITE_TIMEOUT))?;
    Ok(tcp)
}

/// One message from the server, as far as the abuse mode cares.
pub enum Msg {
    Text(Vec<u8>),
    Pong,
    /// The close frame's code, if it had one.
    Close(Option<u16>),
}

/// Where to connect and as whom.
#[derive(Clone)]
pub struct Dial {
    pub addr: SocketAddr,
    /// The `Host` header.
    pub host: String,
    pub source: Option<IpAddr>,
}

/// An open session.
pub struct Ws {
    tcp: TcpStream,
    buf: Vec<u8>,
    /// Where the unread bytes of `buf` start.
    pos: usize,
    frag: Vec<u8>,
    masks: wire::Masks,
    out: Vec<u8>,
    scratch: Vec<u8>,
}

impl Ws {
    /// Connects and upgrades; the snapshot is left to `read`.
    ///
    /// # Errors
    /// No connection, a refused upgrade, or no answer before `deadline`.
    pub fn open(dial: &Dial, paper: &str, user: &str, deadline: Instant, seed: u64) -> Result<Ws, String> {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
        let mut tcp = tcp(dial.addr, dial.source, None, left).map_err(|e| format!("connect: {e}"))?;
        tcp.write_all(&wire::upgrade_request(&dial.host, paper, user, None, None))
            .map_err(|e| format!("upgrade request: {e}"))?;
        let accept = tungstenite::handshake::derive_accept_key(wire::KEY.as_bytes());
        let mut buf = Vec::new();
        let mut scratch = vec![0u8; 64 * 1024];
        loop {
            match wire::read_handshake(&buf, &accept) {
                Handshake::Upgraded { len } => {
                    buf.drain(..len);
                    break;
                }
                Handshake::Refused(why) => return Err(why),
                Handshake::Partial => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("no upgrade answer in time".into());
            }
            tcp.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            match tcp.read(&mut scratch) {
                Ok(0) => return Err("closed during the upgrade".into()),
                Ok(n) => buf.extend_from_slice(&scratch[..n]),
                Err(e) if timed_out(&e) => return Err("no upgrade answer in time".into()),
                Err(e) => return Err(format!("upgrade: {e}")),
            }
        }
        Ok(Ws { tcp, buf, pos: 0, frag: Vec::new(), masks: wire::Masks::new(seed), out: Vec::new(), scratch })
    }

    /// Sends one text frame.
    ///
    /// # Errors
    /// The connection failed, or the server took nothing for the write timeout.
    pub fn send_text(&mut self, payload: &[u8]) -> io::Result<()> {
        self.send(wire::OP_TEXT, payload)
    }

    /// Sends one WebSocket ping frame.
    ///
    /// # Errors
    /// As `send_text`.
    pub fn send_ping(&mut self, payload: &[u8]) -> io::Result<()> {
        self.send(wire::OP_PING, payload)
    }

    fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        self.out.clear();
        let mask = self.masks.next();
        wire::client_frame(&mut self.out, opcode, payload, mask);
        self.tcp.write_all(&self.out)
    }

    /// The next message, or `None` when `until` passes first. Server pings are
    /// answered here.
    ///
    /// # Errors
    /// The connection ended or the server broke the protocol.
    pub fn read(&mut self, until: Instant) -> Result<Option<Msg>, String> {
        loop {
            let parsed = wire::server_frame(&self.buf[self.pos..], MAX_FRAME)?;
            if let Some((frame, len)) = parsed {
                let (fin, opcode) = (frame.fin, frame.opcode);
                let payload = frame.payload.to_vec();
                self.pos += len;
                if self.pos > 1 << 20 && self.pos * 2 > self.buf.len() {
                    self.buf.drain(..self.pos);
                    self.pos = 0;
                }
                match opcode {
                    wire::OP_TEXT | wire::OP_CONTINUATION if fin => {
                        if self.frag.is_empty() {
                            return Ok(Some(Msg::Text(payload)));
                        }
                        self.frag.extend_from_slice(&payload);
                        return Ok(Some(Msg::Text(std::mem::take(&mut self.frag))));
                    }
                    wire::OP_TEXT | wire::OP_CONTINUATION => self.frag.extend_from_slice(&payload),
                    wire::OP_PING => self.send(wire::OP_PONG, &payload).map_err(|e| format!("pong: {e}"))?,
                    wire::OP_PONG => return Ok(Some(Msg::Pong)),
                    wire::OP_CLOSE => {
                        let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                        return Ok(Some(Msg::Close(code)));
                    }
                    _ => {}
                }
                continue;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.tcp.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            match self.tcp.read(&mut self.scratch) {
                Ok(0) => return Err("closed by the server".into()),
                Ok(n) => self.buf.extend_from_slice(&self.scratch[..n]),
                Err(e) if timed_out(&e) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

pub fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// A client-side copy of the server's per-session allowance (PROTOCOL.md 3.3:
/// a token bucket of `burst` refilled at `rate` a second), kept a little under
/// it, so that a session sends as fast as it may and is never `rate_limited`.
pub struct Pacer {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Pacer {
    /// 95% of `rate` and `burst` less 5%, starting full.
    pub fn under(rate: f64, burst: f64) -> Pacer {
        let burst = (burst * 0.95).floor().max(1.0);
        Pacer { rate: rate * 0.95, burst, tokens: burst, last: Instant::now() }
    }

    fn refill(&mut self, now: Instant) {
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
    }

    /// When the next message may go.
    pub fn next_at(&mut self) -> Instant {
        let now = Instant::now();
        self.refill(now);
        if self.tokens >= 1.0 {
            now
        } else {
            now + Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        }
    }

    /// Whether a message may go now.
    pub fn ready(&mut self) -> bool {
        self.refill(Instant::now());
        self.tokens >= 1.0
    }

    /// Takes one message's allowance (call when `next_at` has passed).
    pub fn take(&mut self) {
        self.refill(Instant::now());
        self.tokens -= 1.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_stays_under_the_allowance() {
        let mut pacer = Pacer::under(50.0, 200.0);
        let start = Instant::now();
        let mut sent = 0;
        // The burst goes at once, then about 47.5 a second.
        while pacer.ready() {
            pacer.take();
            sent += 1;
        }
        assert_eq!(sent, 190);
        let next = pacer.next_at();
        let wait = next.duration_since(start).as_secs_f64();
        assert!(wait > 0.015 && wait < 0.03, "{wait}");
    }
}
