//! A worker's sockets: connecting, reading frames and messages, failures.

use super::*;

impl Worker {
    pub(super) fn start_connect(&mut self, key: usize, now: u64) -> io::Result<()> {
        use socket2::{Domain, Protocol, SockAddr, Socket, Type};
        let target = &self.setup.targets[key % self.setup.targets.len()];
        let socket = Socket::new(Domain::for_address(target.addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        if !self.setup.sources.is_empty() {
            // Several source addresses: more than one ephemeral port range.
            let source = self.setup.sources[key % self.setup.sources.len()];
            socket.bind(&SockAddr::from(SocketAddr::new(source, 0)))?;
        }
        match socket.connect(&SockAddr::from(target.addr)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let mut stream = Stream::new(TcpStream::from_std(socket.into()), target, self.setup.tls.as_ref())?;
        self.poll.registry().register(&mut stream, Token(key), Interest::READABLE | Interest::WRITABLE)?;
        let conn = &mut self.conns[key];
        let paper = &self.setup.papers[conn.paper as usize];
        let user = format!("lg{}", key);
        let token = self.setup.tokens.as_ref().map(|t| t.mint(&user, paper));
        conn.out = wire::upgrade_request(&target.authority, paper, &user, token.as_deref(), None);
        conn.written = 0;
        conn.stream = Some(stream);
        conn.phase = Phase::Connecting { since_us: now };
        Ok(())
    }

    /// A connection that never opened.
    pub(super) fn fail(&mut self, key: usize, error: String) {
        self.drop_stream(key);
        let conn = &mut self.conns[key];
        if matches!(conn.phase, Phase::Closed | Phase::Open) {
            return;
        }
        conn.phase = Phase::Closed;
        self.in_flight -= 1;
        self.failed += 1;
        self.note_error(error);
    }

    /// A connection that was open and ended.
    pub(super) fn closed(&mut self, key: usize, why: String) {
        if !matches!(self.conns[key].phase, Phase::Open) {
            return self.fail(key, why);
        }
        self.drop_stream(key);
        let conn = &mut self.conns[key];
        conn.phase = Phase::Closed;
        self.open[conn.paper as usize] -= 1;
        self.stats.closed += 1;
        if self.stats.first_close.is_none() {
            self.stats.first_close = Some(why);
        }
    }

    pub(super) fn drop_stream(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if let Some(mut stream) = conn.stream.take() {
            let _ = self.poll.registry().deregister(&mut stream);
        }
        conn.out = Vec::new();
        conn.inbuf = Vec::new();
    }

    // ---- events -------------------------------------------------------------------------

    pub(super) fn on_event(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        if let Phase::Connecting { since_us } = conn.phase {
            let Some(stream) = &conn.stream else { return };
            match stream.tcp().take_error() {
                Ok(Some(e)) | Err(e) => return self.fail(key, format!("connect: {e}")),
                Ok(None) => {}
            }
            match stream.tcp().peer_addr() {
                Ok(_) => conn.phase = Phase::Handshake { since_us, buf: Vec::new() },
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => return self.fail(key, format!("connect: {e}")),
            }
        }
        if self.write_conn(key).is_err() {
            return;
        }
        self.read_conn(key);
    }

    pub(super) fn read_conn(&mut self, key: usize) {
        let mut scratch = std::mem::take(&mut self.scratch);
        // Bounded: a socket that keeps filling yields after this many reads and is
        // put on the leftover list (edge-triggered: no new event would come).
        for round in 0.. {
            if round == 64 {
                self.read_again.push(key);
                break;
            }
            let Some(stream) = self.conns[key].stream.as_mut() else { break };
            match stream.read(&mut scratch) {
                Ok(0) => {
                    self.closed(key, "the server closed the connection".into());
                    break;
                }
                Ok(n) => {
                    let now = self.now_us();
                    if now >= self.window.0 && now < self.window.1 {
                        self.stats.rx_bytes += n as u64;
                    }
                    if let Err(e) = self.on_bytes(key, &scratch[..n], now) {
                        self.closed(key, e);
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // Also a TLS read that yields before the socket is empty.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.read_failed(key, &e);
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    /// A read error ends the connection; a refused certificate also stops the
    /// connect phase (every other connection would meet it too).
    fn read_failed(&mut self, key: usize, e: &io::Error) {
        let why = crate::tls::read_failure(e, &mut self.certificate_refused);
        self.closed(key, why);
    }

    pub(super) fn on_bytes(&mut self, key: usize, bytes: &[u8], now: u64) -> Result<(), String> {
        if let Phase::Handshake { buf, since_us } = &mut self.conns[key].phase {
            buf.extend_from_slice(bytes);
            match wire::read_handshake(buf, &self.accept) {
                Handshake::Partial => return Ok(()),
                Handshake::Refused(why) => return Err(why),
                Handshake::Upgraded { len } => {
                    let rest = buf.split_off(len);
                    let since_us = *since_us;
                    self.conns[key].phase = Phase::Joining { since_us };
                    return self.on_frames(key, rest, now);
                }
            }
        }
        let conn = &mut self.conns[key];
        if conn.inbuf.is_empty() {
            let used = self.read_frames(key, bytes, now)?;
            if let Some(conn) = self.conns.get_mut(key).filter(|c| c.stream.is_some()) {
                conn.inbuf.extend_from_slice(&bytes[used..]);
            }
            Ok(())
        } else {
            conn.inbuf.extend_from_slice(bytes);
            let buf = std::mem::take(&mut conn.inbuf);
            self.on_frames(key, buf, now)
        }
    }

    pub(super) fn on_frames(&mut self, key: usize, mut buf: Vec<u8>, now: u64) -> Result<(), String> {
        let used = self.read_frames(key, &buf, now)?;
        buf.drain(..used);
        if let Some(conn) = self.conns.get_mut(key).filter(|c| c.stream.is_some()) {
            conn.inbuf = buf;
        }
        Ok(())
    }

    /// Handles every whole frame in `buf`; returns the bytes used.
    pub(super) fn read_frames(&mut self, key: usize, buf: &[u8], now: u64) -> Result<usize, String> {
        let mut used = 0;
        while let Some((frame, len)) = wire::server_frame(&buf[used..], MAX_FRAME)? {
            used += len;
            match frame.opcode {
                wire::OP_TEXT | wire::OP_CONTINUATION if frame.fin && self.conns[key].frag.is_empty() => {
                    self.on_text(key, frame.payload, now)?;
                }
                wire::OP_TEXT | wire::OP_CONTINUATION => {
                    let mut frag = std::mem::take(&mut self.conns[key].frag);
                    frag.extend_from_slice(frame.payload);
                    if frame.fin {
                        self.on_text(key, &frag, now)?;
                        frag.clear();
                    }
                    self.conns[key].frag = frag;
                }
                wire::OP_BINARY => return Err("the server sent a binary frame".into()),
                wire::OP_PING => {
                    let mask = self.masks.next();
                    wire::client_frame(&mut self.conns[key].out, wire::OP_PONG, frame.payload, mask);
                    self.queue_flush(key);
                }
                wire::OP_PONG => {}
                wire::OP_CLOSE => {
                    let code = frame.payload.get(..2).map_or(0, |c| u16::from_be_bytes([c[0], c[1]]));
                    let reason = String::from_utf8_lossy(frame.payload.get(2..).unwrap_or(b""));
                    return Err(format!("closed by the server: {code} {reason}"));
                }
                op => return Err(format!("unknown opcode {op}")),
            }
        }
        Ok(used)
    }

    pub(super) fn on_text(&mut self, key: usize, text: &[u8], now: u64) -> Result<(), String> {
        let kind = wire::message_type(text);
        let conn = &mut self.conns[key];
        if let Phase::Joining { .. } = conn.phase {
            if kind == b"error" {
                return Err(format!("refused before the snapshot: {}", wire::error_code(text)));
            }
            if kind != b"snapshot" {
                return Err(format!("first message was {:?}, not a snapshot", String::from_utf8_lossy(kind)));
            }
            conn.phase = Phase::Open;
            conn.last_seq = vec![0; self.setup.senders].into_boxed_slice();
            for m in wire::markers(text) {
                if let Some(last) = conn.last_seq.get_mut(m.sender as usize) {
                    *last = (*last).max(m.seq);
                }
            }
            self.open[conn.paper as usize] += 1;
            self.in_flight -= 1;
            self.ok += 1;
            return Ok(());
        }
        if kind == b"error" {
            *self.stats.errors.entry(wire::error_code(text)).or_default() += 1;
            return Ok(());
        }
        let (from, to) = self.window;
        for m in wire::markers(text) {
            let Some(last) = conn.last_seq.get_mut(m.sender as usize) else { continue };
            // Messages with the whole paper repeat older notes: only a newer send counts.
            if m.seq <= *last {
                continue;
            }
            *last = m.seq;
            if m.t_us >= from && m.t_us < to {
                self.stats.received += 1;
                self.stats.latency_us.saturating_record(now.saturating_sub(m.t_us).max(1));
            }
        }
        Ok(())
    }

    // ---- sending ------------------------------------------------------------------------
}
