//! The sockets of a reconnect run: connecting with retries, reading frames and
//! messages, writing.

use super::*;

impl Run<'_> {
    /// Connects `keys` with bounded concurrency until each has its snapshot or
    /// failed (for good: a retry gives up at `deadline`).
    pub(super) fn connect(&mut self, keys: &[usize], deadline: Instant, phase: &str) {
        for &k in keys {
            self.queue.push(Reverse((0, k)));
        }
        loop {
            let now = self.now_us();
            let deadline_us = deadline.saturating_duration_since(self.base).as_micros() as u64;
            while self.in_flight < self.args.connect_concurrency {
                let Some(&Reverse((at, key))) = self.queue.peek() else { break };
                if at > now {
                    break;
                }
                self.queue.pop();
                self.in_flight += 1;
                if let Err(e) = self.start_connect(key, now) {
                    self.fail(key, format!("connect: {e}"));
                }
            }
            self.scan_timeouts(now, deadline_us);
            // Every other session would meet the refused certificate too.
            if now >= deadline_us || self.certificate_refused.is_some() {
                while let Some(Reverse((_, key))) = self.queue.pop() {
                    self.sessions[key].phase = Phase::Closed;
                    self.counts.failed += 1;
                    if self.certificate_refused.is_none() {
                        self.note_error("the phase's deadline passed".into());
                    }
                }
            }
            if self.queue.is_empty() && self.in_flight == 0 {
                return;
            }
            if self.reconnecting && self.new_pid.is_none() {
                self.read_pid_file();
            }
            let wait = if self.in_flight < self.args.connect_concurrency && !self.queue.is_empty() { 5 } else { 20 };
            self.turn(Duration::from_millis(wait));
            self.show(phase);
        }
    }

    pub(super) fn start_connect(&mut self, key: usize, now: u64) -> io::Result<()> {
        use socket2::{Domain, Protocol, SockAddr, Socket, Type};
        let socket = Socket::new(Domain::for_address(self.target.addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        match socket.connect(&SockAddr::from(self.target.addr)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let mut stream = Stream::new(TcpStream::from_std(socket.into()), &self.target, self.tls.as_ref())?;
        self.poll.registry().register(&mut stream, Token(key), Interest::READABLE | Interest::WRITABLE)?;
        let s = &mut self.sessions[key];
        let user = format!("u{}m{}", s.paper, s.member);
        let since = (self.reconnecting && self.since && s.max_v > 0).then_some(s.max_v);
        s.out = wire::upgrade_request(&self.target.authority, &self.papers[s.paper as usize], &user, None, since);
        s.written = 0;
        s.inbuf.clear();
        s.frag.clear();
        s.to_snapshot = 0;
        s.stream = Some(stream);
        s.phase = Phase::Connecting { since_us: now };
        Ok(())
    }

    pub(super) fn scan_timeouts(&mut self, now: u64, deadline_us: u64) {
        if now < self.last_scan + 100_000 {
            return;
        }
        self.last_scan = now;
        let timeout = (self.args.connect_timeout * 1e6) as u64;
        for key in 0..self.sessions.len() {
            let since = match &self.sessions[key].phase {
                Phase::Connecting { since_us } | Phase::Handshake { since_us, .. } | Phase::Joining { since_us } => {
                    *since_us
                }
                _ => continue,
            };
            if now > since + timeout || now >= deadline_us {
                let what = match self.sessions[key].phase {
                    Phase::Connecting { .. } => "TCP connect",
                    Phase::Handshake { .. } => "the upgrade answer",
                    _ => "the snapshot",
                };
                self.fail(key, format!("timed out waiting for {what}"));
            }
        }
    }

    pub(super) fn read_pid_file(&mut self) {
        let Some(path) = &self.args.server_pid_file else { return };
        let Ok(text) = std::fs::read_to_string(path) else { return };
        let pid = text.trim();
        let old = self.args.server_pid.map(|p| p.to_string());
        if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && Some(pid) != old.as_deref() {
            self.new_pid = Some(pid.to_string());
        }
    }

    pub(super) fn note_error(&mut self, error: String) {
        if self.counts.first_error.is_none() {
            self.counts.first_error = Some(error);
        }
    }

    /// A connection that did not get its snapshot: tried again later while
    /// reconnecting (the server may not be up yet), else failed for good.
    pub(super) fn fail(&mut self, key: usize, error: String) {
        self.drop_stream(key);
        let s = &mut self.sessions[key];
        if !matches!(s.phase, Phase::Connecting { .. } | Phase::Handshake { .. } | Phase::Joining { .. }) {
            return;
        }
        self.in_flight -= 1;
        if self.retry && self.certificate_refused.is_none() {
            s.phase = Phase::Idle;
            let jitter = u64::from(u32::from_le_bytes(self.masks.next())) % RETRY_US;
            self.queue.push(Reverse((self.base.elapsed().as_micros() as u64 + RETRY_US + jitter, key)));
            self.counts.retries += 1;
            *self.counts.retry_reasons.entry(error).or_default() += 1;
            return;
        }
        s.phase = Phase::Closed;
        self.counts.failed += 1;
        self.note_error(error);
    }

    /// An open session that the server ended.
    pub(super) fn closed(&mut self, key: usize, why: String) {
        if !matches!(self.sessions[key].phase, Phase::Open) {
            return self.fail(key, why);
        }
        self.drop_stream(key);
        self.sessions[key].phase = Phase::Closed;
        *self.counts.closes.entry(why).or_default() += 1;
    }

    pub(super) fn drop_stream(&mut self, key: usize) {
        let s = &mut self.sessions[key];
        if let Some(mut stream) = s.stream.take() {
            let _ = self.poll.registry().deregister(&mut stream);
        }
        s.out = Vec::new();
        s.inbuf = Vec::new();
        s.frag = Vec::new();
    }

    // ---- the loop ---------------------------------------------------------------------

    /// One loop turn: poll, handle events and leftovers.
    pub(super) fn turn(&mut self, timeout: Duration) {
        let mut events = Events::with_capacity(4096);
        let timeout = if self.read_again.is_empty() { timeout } else { Duration::ZERO };
        if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                self.note_error(format!("poll failed: {e}"));
                std::thread::sleep(timeout);
            }
        }
        for event in events.iter() {
            self.on_event(event.token().0);
        }
        for key in std::mem::take(&mut self.read_again) {
            self.read(key);
        }
    }

    pub(super) fn on_event(&mut self, key: usize) {
        let Some(s) = self.sessions.get_mut(key) else { return };
        if let Phase::Connecting { since_us } = s.phase {
            let Some(stream) = &s.stream else { return };
            match stream.tcp().take_error() {
                Ok(Some(e)) | Err(e) => return self.fail(key, format!("connect: {e}")),
                Ok(None) => {}
            }
            match stream.tcp().peer_addr() {
                Ok(_) => s.phase = Phase::Handshake { since_us, buf: Vec::new() },
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => return self.fail(key, format!("connect: {e}")),
            }
        }
        if self.write(key).is_ok() {
            self.read(key);
        }
    }

    pub(super) fn read(&mut self, key: usize) {
        let mut scratch = std::mem::take(&mut self.scratch);
        for round in 0.. {
            if round == READS_PER_TURN {
                self.read_again.push(key);
                break;
            }
            let Some(stream) = self.sessions[key].stream.as_mut() else { break };
            match stream.read(&mut scratch) {
                Ok(0) => {
                    self.closed(key, "end of stream".into());
                    break;
                }
                Ok(n) => {
                    self.counts.rx_bytes += n as u64;
                    if let Err(e) = self.on_bytes(key, &scratch[..n]) {
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

    /// A read error ends the connection; a refused certificate is not retried
    /// (waiting does not cure it) and aborts the run.
    fn read_failed(&mut self, key: usize, e: &io::Error) {
        let why = crate::tls::read_failure(e, &mut self.certificate_refused);
        self.closed(key, why);
    }

    pub(super) fn on_bytes(&mut self, key: usize, bytes: &[u8]) -> Result<(), String> {
        let s = &mut self.sessions[key];
        let mut buf = match &mut s.phase {
            Phase::Handshake { buf, since_us } => {
                buf.extend_from_slice(bytes);
                match wire::read_handshake(buf, &self.accept) {
                    Handshake::Partial => return Ok(()),
                    Handshake::Refused(why) => return Err(why),
                    Handshake::Upgraded { len } => {
                        let rest = buf.split_off(len);
                        let since_us = *since_us;
                        s.to_snapshot += len as u64;
                        s.phase = Phase::Joining { since_us };
                        rest
                    }
                }
            }
            _ => {
                let mut buf = std::mem::take(&mut s.inbuf);
                buf.extend_from_slice(bytes);
                buf
            }
        };
        let mut used = 0;
        let result = loop {
            match wire::server_frame(&buf[used..], MAX_FRAME) {
                Ok(Some((frame, len))) => {
                    let (fin, opcode) = (frame.fin, frame.opcode);
                    let payload = frame.payload.to_vec();
                    used += len;
                    if let Err(e) = self.on_frame(key, fin, opcode, &payload, len) {
                        break Err(e);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        if result.is_ok() {
            buf.drain(..used);
            if let Some(s) = self.sessions.get_mut(key).filter(|s| s.stream.is_some()) {
                s.inbuf = buf;
            }
        }
        result
    }

    pub(super) fn on_frame(
        &mut self,
        key: usize,
        fin: bool,
        opcode: u8,
        payload: &[u8],
        len: usize,
    ) -> Result<(), String> {
        let s = &mut self.sessions[key];
        if matches!(s.phase, Phase::Joining { .. }) {
            s.to_snapshot += len as u64;
        }
        match opcode {
            wire::OP_TEXT | wire::OP_CONTINUATION if fin && s.frag.is_empty() => self.on_text(key, payload),
            wire::OP_TEXT | wire::OP_CONTINUATION => {
                s.frag.extend_from_slice(payload);
                if fin {
                    let whole = std::mem::take(&mut s.frag);
                    self.on_text(key, &whole)?;
                }
                Ok(())
            }
            wire::OP_PING => {
                let mask = self.masks.next();
                wire::client_frame(&mut s.out, wire::OP_PONG, payload, mask);
                self.write(key).map_err(|()| "write failed".to_string())
            }
            wire::OP_PONG => Ok(()),
            wire::OP_CLOSE => {
                let code = payload.get(..2).map_or(0, |c| u16::from_be_bytes([c[0], c[1]]));
                // Answer it, as RFC 6455 asks; the server closes the connection.
                let mask = self.masks.next();
                wire::client_frame(&mut s.out, wire::OP_CLOSE, &payload[..payload.len().min(2)], mask);
                let _ = self.write(key);
                Err(format!("close {code}"))
            }
            wire::OP_BINARY => Err("the server sent a binary frame".into()),
            op => Err(format!("unknown opcode {op}")),
        }
    }

    pub(super) fn on_text(&mut self, key: usize, text: &[u8]) -> Result<(), String> {
        let kind = wire::message_type(text);
        let reconnecting = self.reconnecting;
        let s = &mut self.sessions[key];
        if let Phase::Joining { .. } = s.phase {
            if kind == b"error" {
                return Err(format!("refused before the snapshot: {}", wire::error_code(text)));
            }
            if kind != b"snapshot" {
                return Err(format!("first message was {:?}, not a snapshot", String::from_utf8_lossy(kind)));
            }
            s.phase = Phase::Open;
            s.joined = true;
            // `since` comes before the notes: look no further for it.
            let head = &text[..memchr::memmem::find(text, br#""notes":"#).unwrap_or(text.len())];
            let resumed = memchr::memmem::find(head, br#""since":"#).is_some();
            if !reconnecting {
                s.max_v = s.max_v.max(wire::max_version(text));
            }
            if let Some(notes) = &mut s.notes {
                let value: Value = serde_json::from_slice(text).map_err(|e| format!("snapshot: {e}"))?;
                apply_snapshot(notes, &value);
            }
            let bytes = s.to_snapshot;
            self.in_flight -= 1;
            self.counts.ok += 1;
            if reconnecting {
                self.counts.snapshot_bytes += bytes;
                if resumed {
                    self.counts.since_snapshots += 1;
                } else {
                    self.counts.full_snapshots += 1;
                }
                if self.queue.is_empty() && self.in_flight == 0 {
                    // The last one: the new server's CPU now.
                    if self.new_pid.is_none() {
                        self.read_pid_file();
                    }
                    let cpu = self.new_pid.as_deref().and_then(report::cpu_seconds);
                    self.all_in = Some((Instant::now(), cpu));
                }
            }
            return Ok(());
        }
        match kind {
            b"error" => *self.counts.errors.entry(wire::error_code(text)).or_default() += 1,
            b"upsert" | b"delete" => {
                self.counts.edit_receipts += 1;
                if kind == b"upsert" {
                    s.fill_left = s.fill_left.saturating_sub(1);
                }
                s.max_v = s.max_v.max(wire::max_version(text));
                if let Some(notes) = &mut s.notes {
                    let value: Value = serde_json::from_slice(text).map_err(|e| format!("{e}"))?;
                    apply_change(notes, &value);
                }
            }
            _ => s.max_v = s.max_v.max(wire::max_version(text)),
        }
        Ok(())
    }

    /// Writes what is queued; a full socket resumes on its writable event.
    pub(super) fn write(&mut self, key: usize) -> Result<(), ()> {
        let s = &mut self.sessions[key];
        if matches!(s.phase, Phase::Connecting { .. }) {
            return Ok(());
        }
        let Some(stream) = s.stream.as_mut() else { return Err(()) };
        // TLS records that a full socket did not take before; nothing on plain TCP.
        if let Err(e) = stream.flush() {
            self.closed(key, format!("write: {e}"));
            return Err(());
        }
        while s.written < s.out.len() {
            match stream.write(&s.out[s.written..]) {
                Ok(0) => {
                    self.closed(key, "write: the socket accepts nothing".into());
                    return Err(());
                }
                Ok(n) => s.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.closed(key, format!("write: {e}"));
                    return Err(());
                }
            }
        }
        s.out.clear();
        s.written = 0;
        Ok(())
    }

    // ---- the fill and the edits ---------------------------------------------------------
}
