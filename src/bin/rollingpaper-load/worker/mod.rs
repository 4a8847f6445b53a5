//! One generator thread: a mio `Poll` over the connections of the papers it owns
//! (every member of a paper lives on one thread, so a send's expected deliveries
//! are counted where its receipts are). Connects with bounded concurrency, then
//! runs the steps the main thread sends: scheduled sends (open loop: a send never
//! waits for a reply), receipts matched by the marker in each note's `data`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::stream::Stream;
use crate::target::Target;
use crate::wire::{self, Handshake};

mod sockets;

/// Largest server frame accepted (a snapshot of a full paper fits).
const MAX_FRAME: usize = 64 * 1024 * 1024;
/// Sends made in one loop turn at most, so reads are not starved while catching up.
const SEND_BUDGET: usize = 20_000;
/// Output capacity kept by an idle connection.
const KEEP_OUT: usize = 64 * 1024;
/// How long the close phase waits for the server's answers.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// What every thread shows the progress line.
#[derive(Default)]
pub struct Progress {
    pub opened: AtomicU64,
    pub failed: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

pub struct Setup {
    pub papers: Vec<String>,
    pub members: usize,
    pub senders: usize,
    pub notes: usize,
    pub note_bytes: usize,
    /// Servers to connect to, round-robin by connection.
    pub targets: Vec<Target>,
    /// The TLS client configuration, when a target is `wss://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Signs a token per member (`--token-secret`), for servers with auth on.
    pub tokens: Option<std::sync::Arc<crate::Tokens>>,
    pub sources: Vec<IpAddr>,
    pub concurrency: usize,
    pub connect_timeout: Duration,
    pub connect_deadline: Instant,
    pub base: Instant,
    pub progress: Arc<Progress>,
    pub seed: u64,
}

/// One step: sends in `[start, measure_end)` at `rate` per sender; sends made in
/// `[measure_start, measure_end)` are counted, and their receipts until `drain_end`.
#[derive(Debug, Clone, Copy)]
pub struct StepPlan {
    pub rate: f64,
    pub start_us: u64,
    pub measure_start_us: u64,
    pub measure_end_us: u64,
    pub drain_end_us: u64,
}

pub enum Command {
    Step(StepPlan),
    Close,
}

pub enum Report {
    Connected { ok: u64, failed: u64, first_error: Option<String>, certificate_refused: Option<String> },
    Step(Box<StepReport>),
}

pub struct StepReport {
    /// Senders whose connection is open.
    pub senders: u64,
    pub sent: u64,
    pub expected: u64,
    pub received: u64,
    pub rx_bytes: u64,
    pub errors: BTreeMap<String, u64>,
    pub closed: u64,
    pub first_close: Option<String>,
    pub latency_us: Histogram<u64>,
    pub lag_us: Histogram<u64>,
}

impl StepReport {
    pub fn new() -> Self {
        StepReport {
            senders: 0,
            sent: 0,
            expected: 0,
            received: 0,
            rx_bytes: 0,
            errors: BTreeMap::new(),
            closed: 0,
            first_close: None,
            latency_us: histogram(),
            lag_us: histogram(),
        }
    }

    pub fn add(&mut self, other: &StepReport) {
        self.senders += other.senders;
        self.sent += other.sent;
        self.expected += other.expected;
        self.received += other.received;
        self.rx_bytes += other.rx_bytes;
        for (code, n) in &other.errors {
            *self.errors.entry(code.clone()).or_default() += n;
        }
        self.closed += other.closed;
        if self.first_close.is_none() {
            self.first_close.clone_from(&other.first_close);
        }
        self.latency_us.add(&other.latency_us).expect("same bounds");
        self.lag_us.add(&other.lag_us).expect("same bounds");
    }
}

/// Microseconds from 1 to 100 s, three significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid bounds")
}

enum Phase {
    NotStarted,
    Connecting {
        since_us: u64,
    },
    Handshake {
        since_us: u64,
        buf: Vec<u8>,
    },
    /// Upgraded, waiting for the snapshot.
    Joining {
        since_us: u64,
    },
    Open,
    Closed,
}

struct Conn {
    stream: Option<Stream>,
    phase: Phase,
    paper: u32,
    out: Vec<u8>,
    written: usize,
    queued: bool,
    /// An incomplete frame left from the last read.
    inbuf: Vec<u8>,
    /// A fragmented message being put together.
    frag: Vec<u8>,
    /// The highest sequence number seen from each sender of the paper.
    last_seq: Box<[u32]>,
}

struct Sender_ {
    conn: usize,
    paper: u32,
    index: u32,
    seq: u32,
}

pub struct Worker {
    setup: Setup,
    poll: Poll,
    conns: Vec<Conn>,
    /// Open members of each paper.
    open: Vec<u64>,
    senders: Vec<Sender_>,
    next_connect: usize,
    in_flight: usize,
    ok: u64,
    failed: u64,
    first_error: Option<String>,
    /// A server's certificate that TLS refused: connecting stops, the run fails.
    certificate_refused: Option<String>,
    connect_reported: bool,
    flush_list: Vec<usize>,
    /// Connections whose read budget ran out with data left.
    read_again: Vec<usize>,
    scratch: Vec<u8>,
    msg: Vec<u8>,
    masks: wire::Masks,
    accept: String,
    plan: Option<StepPlan>,
    /// Counted window of the current (or last) step.
    window: (u64, u64),
    due: BinaryHeap<Reverse<(u64, u32)>>,
    stats: StepReport,
    last_timeout_scan: u64,
    commands: Receiver<Command>,
    reports: Sender<Report>,
}

impl Worker {
    /// # Errors
    /// The poll could not be created.
    pub fn new(setup: Setup, commands: Receiver<Command>, reports: Sender<Report>) -> io::Result<Self> {
        let members = setup.members;
        let mut conns = Vec::with_capacity(setup.papers.len() * members);
        let mut senders = Vec::new();
        for p in 0..setup.papers.len() {
            for m in 0..members {
                if m < setup.senders {
                    senders.push(Sender_ { conn: conns.len(), paper: p as u32, index: m as u32, seq: 0 });
                }
                conns.push(Conn {
                    stream: None,
                    phase: Phase::NotStarted,
                    paper: p as u32,
                    out: Vec::new(),
                    written: 0,
                    queued: false,
                    inbuf: Vec::new(),
                    frag: Vec::new(),
                    last_seq: Box::new([]),
                });
            }
        }
        let accept = tungstenite::handshake::derive_accept_key(wire::KEY.as_bytes());
        Ok(Worker {
            open: vec![0; setup.papers.len()],
            masks: wire::Masks::new(setup.seed),
            poll: Poll::new()?,
            setup,
            conns,
            senders,
            next_connect: 0,
            in_flight: 0,
            ok: 0,
            failed: 0,
            first_error: None,
            certificate_refused: None,
            connect_reported: false,
            flush_list: Vec::new(),
            read_again: Vec::new(),
            scratch: vec![0; 256 * 1024],
            msg: Vec::new(),
            accept,
            plan: None,
            window: (u64::MAX, u64::MAX),
            due: BinaryHeap::new(),
            stats: StepReport::new(),
            last_timeout_scan: 0,
            commands,
            reports,
        })
    }

    fn now_us(&self) -> u64 {
        self.setup.base.elapsed().as_micros() as u64
    }

    pub fn run(mut self) {
        let mut events = Events::with_capacity(4096);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.note_error(format!("poll failed: {e}"));
                    break;
                }
            }
            for event in events.iter() {
                self.on_event(event.token().0);
            }
            for key in std::mem::take(&mut self.read_again) {
                self.read_conn(key);
            }
            let now = self.now_us();
            self.connect_more(now);
            match self.commands.try_recv() {
                Ok(Command::Step(plan)) => self.begin_step(plan),
                Ok(Command::Close) | Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
            }
            self.send_due(self.now_us());
            self.flush();
            self.end_step_if_done(self.now_us());
            let p = &self.setup.progress;
            p.opened.store(self.ok, Ordering::Relaxed);
            p.failed.store(self.failed, Ordering::Relaxed);
            p.sent.store(self.stats.sent, Ordering::Relaxed);
            p.received.store(self.stats.received, Ordering::Relaxed);
        }
        self.close_all();
    }

    fn poll_timeout(&self) -> Duration {
        let now = self.now_us();
        if !self.read_again.is_empty() {
            return Duration::ZERO;
        }
        if let Some(Reverse((due, _))) = self.due.peek() {
            return Duration::from_micros(due.saturating_sub(now).min(5_000));
        }
        if self.plan.is_some() || !self.connect_reported {
            return Duration::from_millis(5);
        }
        Duration::from_millis(20)
    }

    fn note_error(&mut self, error: String) {
        if self.first_error.is_none() {
            self.first_error = Some(error);
        }
    }

    // ---- connecting -------------------------------------------------------------------

    fn connect_more(&mut self, now: u64) {
        if self.connect_reported {
            return;
        }
        let deadline_us = self.setup.connect_deadline.saturating_duration_since(self.setup.base).as_micros() as u64;
        while self.in_flight < self.setup.concurrency
            && self.next_connect < self.conns.len()
            && now < deadline_us
            && self.certificate_refused.is_none()
        {
            let key = self.next_connect;
            self.next_connect += 1;
            self.in_flight += 1;
            if let Err(e) = self.start_connect(key, now) {
                self.fail(key, format!("connect: {e}"));
            }
        }
        // Bounded: each connection has its own timeout, the phase a deadline.
        if now >= self.last_timeout_scan + 100_000 {
            self.last_timeout_scan = now;
            let timeout = self.setup.connect_timeout.as_micros() as u64;
            for key in 0..self.next_connect {
                let since = match &self.conns[key].phase {
                    Phase::Connecting { since_us }
                    | Phase::Handshake { since_us, .. }
                    | Phase::Joining { since_us } => *since_us,
                    _ => continue,
                };
                if now >= deadline_us || now > since + timeout {
                    let what = match self.conns[key].phase {
                        Phase::Connecting { .. } => "TCP connect",
                        Phase::Handshake { .. } => "the upgrade answer",
                        _ => "the snapshot",
                    };
                    self.fail(key, format!("timed out waiting for {what}"));
                }
            }
        }
        // The rest would meet the same certificate: not started, so the run ends soon.
        if now >= deadline_us || self.certificate_refused.is_some() {
            while self.next_connect < self.conns.len() {
                self.failed += 1;
                self.next_connect += 1;
                if self.certificate_refused.is_none() {
                    self.note_error("the connect phase deadline passed".into());
                }
            }
        }
        if self.next_connect == self.conns.len() && self.in_flight == 0 {
            self.connect_reported = true;
            let report = Report::Connected {
                ok: self.ok,
                failed: self.failed,
                first_error: self.first_error.clone(),
                certificate_refused: self.certificate_refused.clone(),
            };
            let _ = self.reports.send(report);
        }
    }

    fn begin_step(&mut self, plan: StepPlan) {
        self.stats = StepReport::new();
        self.window = (plan.measure_start_us, plan.measure_end_us);
        self.due.clear();
        let interval = 1e6 / plan.rate;
        for (i, sender) in self.senders.iter().enumerate() {
            if matches!(self.conns[sender.conn].phase, Phase::Open) {
                self.stats.senders += 1;
                // Spread the senders' phases over one interval: no synchronised bursts.
                let offset = (interval * ((i as f64 * 0.618_034) % 1.0)) as u64;
                self.due.push(Reverse((plan.start_us + offset, i as u32)));
            }
        }
        self.plan = Some(plan);
    }

    fn send_due(&mut self, now: u64) {
        let Some(plan) = self.plan else { return };
        let interval = (1e6 / plan.rate).max(1.0);
        let per_sender_notes = |index: u32, senders: usize, notes: usize| {
            notes.saturating_sub(index as usize).div_ceil(senders).max(1) as u32
        };
        for _ in 0..SEND_BUDGET {
            let Some(&Reverse((due, i))) = self.due.peek() else { break };
            if due > now {
                break;
            }
            self.due.pop();
            // Due times are kept fractional in spirit: the rounding error is below 1 µs a send.
            let next = due + interval as u64;
            if next < plan.measure_end_us {
                self.due.push(Reverse((next, i)));
            }
            if due >= plan.measure_end_us {
                continue;
            }
            let sender = &mut self.senders[i as usize];
            let key = sender.conn;
            if !matches!(self.conns[key].phase, Phase::Open) {
                continue;
            }
            sender.seq += 1;
            let notes = per_sender_notes(sender.index, self.setup.senders, self.setup.notes);
            let note = sender.index + self.setup.senders as u32 * (sender.seq % notes);
            let t = self.setup.base.elapsed().as_micros() as u64;
            self.msg.clear();
            wire::upsert_message(&mut self.msg, note, sender.index, sender.seq, t, self.setup.note_bytes);
            if t >= self.window.0 && t < self.window.1 {
                self.stats.sent += 1;
                self.stats.expected += self.open[sender.paper as usize];
                self.stats.lag_us.saturating_record(t.saturating_sub(due).max(1));
            }
            let mask = self.masks.next();
            wire::client_frame(&mut self.conns[key].out, wire::OP_TEXT, &self.msg, mask);
            self.queue_flush(key);
        }
    }

    fn end_step_if_done(&mut self, now: u64) {
        let Some(plan) = self.plan else { return };
        let all_in = self.stats.received >= self.stats.expected;
        if now >= plan.drain_end_us || (now >= plan.measure_end_us && all_in) {
            self.plan = None;
            self.due.clear();
            let mut report = StepReport::new();
            std::mem::swap(&mut report, &mut self.stats);
            // Later receipts of this step's sends are no longer counted anywhere.
            self.window = (u64::MAX, u64::MAX);
            let _ = self.reports.send(Report::Step(Box::new(report)));
        }
    }

    // ---- output -------------------------------------------------------------------------

    fn queue_flush(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if !conn.queued {
            conn.queued = true;
            self.flush_list.push(key);
        }
    }

    fn flush(&mut self) {
        let list = std::mem::take(&mut self.flush_list);
        for &key in &list {
            self.conns[key].queued = false;
            let _ = self.write_conn(key);
        }
        self.flush_list = list;
        self.flush_list.clear();
    }

    /// Writes what is queued; a full socket resumes on its writable event.
    fn write_conn(&mut self, key: usize) -> Result<(), ()> {
        let conn = &mut self.conns[key];
        if matches!(conn.phase, Phase::Connecting { .. }) {
            return Ok(());
        }
        let Some(stream) = conn.stream.as_mut() else { return Err(()) };
        // TLS records that a full socket did not take before (this may be their
        // writable event); nothing on plain TCP.
        if let Err(e) = stream.flush() {
            self.closed(key, format!("write: {e}"));
            return Err(());
        }
        while conn.written < conn.out.len() {
            match stream.write(&conn.out[conn.written..]) {
                Ok(0) => {
                    self.closed(key, "write: the socket accepts nothing".into());
                    return Err(());
                }
                Ok(n) => conn.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.closed(key, format!("write: {e}"));
                    return Err(());
                }
            }
        }
        conn.out.clear();
        conn.written = 0;
        if conn.out.capacity() > KEEP_OUT {
            conn.out = Vec::new();
        }
        Ok(())
    }

    /// Sends every open session a close frame, waits briefly for the server's
    /// answers, and drops every socket.
    fn close_all(&mut self) {
        for key in 0..self.conns.len() {
            if matches!(self.conns[key].phase, Phase::Open) {
                let mask = self.masks.next();
                wire::client_frame(&mut self.conns[key].out, wire::OP_CLOSE, &1000u16.to_be_bytes(), mask);
                let _ = self.write_conn(key);
            }
        }
        let until = Instant::now() + CLOSE_WAIT;
        let mut events = Events::with_capacity(4096);
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut left = self.conns.iter().filter(|c| c.stream.is_some()).count();
        while left > 0 && Instant::now() < until {
            if self.poll.poll(&mut events, Some(Duration::from_millis(20))).is_err() {
                break;
            }
            for event in events.iter() {
                let Some(conn) = self.conns.get_mut(event.token().0) else { continue };
                let Some(stream) = conn.stream.as_mut() else { continue };
                let gone = loop {
                    match stream.read(&mut scratch) {
                        Ok(0) => break true,
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => break true,
                    }
                };
                if gone {
                    conn.stream = None;
                    left -= 1;
                }
            }
        }
        self.conns.clear();
    }
}
