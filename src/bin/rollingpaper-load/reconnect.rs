//! `rollingpaper-load reconnect`: what resuming with `since` (PROTOCOL.md 3.1,
//! 1.1) saves when a server restarts. Opens papers x members on one mio `Poll`
//! (optionally filling each paper first), lets one member per paper make a few
//! edits, says it is ready (a file) and waits while the caller restarts the
//! server on the same address; then every session reconnects, with `?since=`
//! the greatest `v` it saw, or without. It measures what the new server sent
//! each session until its snapshot was whole, how long after the new server's
//! start every session had one, and the new server's CPU seconds by then.
//! Member 0 of each paper holds the paper's notes, and a sample of them checks
//! that what it holds after the reconnect (a `since` snapshot merged in) equals
//! a fresh full snapshot. Every wait is bounded.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde_json::{json, Value};

use crate::report;
use crate::wire::{self, Handshake};

/// Largest server frame accepted (a snapshot of a full paper fits).
const MAX_FRAME: usize = 64 * 1024 * 1024;
/// Reads from one socket in one loop turn at most, so one busy socket does not
/// starve the others; the rest waits on the leftover list.
const READS_PER_TURN: usize = 64;
/// Pause before a refused reconnect tries again (plus up to as much jitter).
const RETRY_US: u64 = 50_000;
/// How long the edits may take to reach every member.
const EDIT_WAIT: Duration = Duration::from_secs(30);

/// Reconnecting sessions after a graceful restart, with `since` or without.
#[derive(clap::Args, Debug)]
pub struct ReconnectArgs {
    /// Server address (127.0.0.0/8 or [::1] only); the restarted server must
    /// listen on the same one.
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: String,
    /// Papers to open.
    #[arg(long, default_value_t = 500)]
    papers: usize,
    /// Members (sessions) per paper.
    #[arg(long, default_value_t = 20)]
    members: usize,
    /// Notes per paper that --fill writes.
    #[arg(long, default_value_t = 200)]
    notes: usize,
    /// Size of each note's `data` written by --fill and the edits, compact JSON bytes.
    #[arg(long, default_value_t = 1024)]
    note_bytes: usize,
    /// Member 0 of each paper writes --notes notes before the others join.
    #[arg(long)]
    fill: bool,
    /// Seconds from the end of the fill to the edits. A since snapshot holds
    /// every note within the server's resume window (60 s of versions) below
    /// the version the client saw, so only a fill older than that is left out.
    #[arg(long, default_value_t = 0.0)]
    settle: f64,
    /// Edits per paper before the restart, by member 0: a delete of the oldest
    /// note, a new note, and replacements of the next oldest ones.
    #[arg(long, default_value_t = 4)]
    edits: usize,
    /// Reconnect with `?since=` the greatest `v` each session saw (on), or
    /// without (off: full snapshots).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    since: String,
    /// Prefix of the paper ids: the same in every round that shares the data.
    #[arg(long, default_value = "rc")]
    paper_prefix: String,
    /// Pid of the server before the restart.
    #[arg(long)]
    server_pid: Option<u32>,
    /// File in which the caller writes the restarted server's pid; its start
    /// time and CPU are read from /proc.
    #[arg(long)]
    server_pid_file: Option<PathBuf>,
    /// File created once every session holds its paper and the edits: the
    /// caller restarts the server then (SIGTERM, then a new one on the same address).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Seconds, once ready, for the old server to close every session, and
    /// again for the new one to give every session its snapshot.
    #[arg(long, default_value_t = 120.0)]
    restart_timeout: f64,
    /// Upgrades in progress at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Seconds one connection may take to get its snapshot.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Seconds the first connect phase (fill included) may take.
    #[arg(long, default_value_t = 300.0)]
    connect_deadline: f64,
    /// Papers whose member 0 compares what it holds after the reconnect with a
    /// fresh full snapshot (spread over the papers).
    #[arg(long, default_value_t = 20)]
    check: usize,
    /// Print the report as JSON on standard output.
    #[arg(long)]
    json: bool,
    /// No progress lines on standard error.
    #[arg(long)]
    quiet: bool,
}

/// A paper as a session holds it: note id -> (`v`, `data`).
type Notes = BTreeMap<String, (u64, Value)>;

enum Phase {
    /// Not connected (before the first connect, or waiting to reconnect).
    Idle,
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

struct Session {
    paper: u32,
    member: u32,
    stream: Option<TcpStream>,
    phase: Phase,
    out: Vec<u8>,
    written: usize,
    /// An incomplete frame left from the last read.
    inbuf: Vec<u8>,
    /// A fragmented message being put together.
    frag: Vec<u8>,
    /// The greatest note version seen in any message: the `since` of a resume.
    max_v: u64,
    /// Bytes read on this connection until its snapshot was whole.
    to_snapshot: u64,
    /// What the paper holds, kept by member 0 only.
    notes: Option<Notes>,
    /// Upserts of the fill still to come back.
    fill_left: usize,
    /// It had its snapshot in the first connect phase (so it reconnects).
    joined: bool,
}

#[derive(Default)]
struct Counts {
    ok: u64,
    failed: u64,
    retries: u64,
    /// Why attempts were retried, by error.
    retry_reasons: BTreeMap<String, u64>,
    first_error: Option<String>,
    errors: BTreeMap<String, u64>,
    closes: BTreeMap<String, u64>,
    edit_receipts: u64,
    since_snapshots: u64,
    full_snapshots: u64,
    snapshot_bytes: u64,
    rx_bytes: u64,
}

struct Run<'a> {
    args: &'a ReconnectArgs,
    poll: Poll,
    sessions: Vec<Session>,
    papers: Vec<String>,
    target: SocketAddr,
    host: String,
    base: Instant,
    masks: wire::Masks,
    accept: String,
    scratch: Vec<u8>,
    /// Sessions waiting to connect, by the time they may (retries wait).
    queue: BinaryHeap<Reverse<(u64, usize)>>,
    in_flight: usize,
    /// Failures before the snapshot are retried (while the server restarts).
    retry: bool,
    /// Resume with `since`.
    since: bool,
    /// In the reconnect phase: snapshots are counted, not scanned for versions.
    reconnecting: bool,
    read_again: Vec<usize>,
    counts: Counts,
    /// The restarted server, once its pid is known.
    new_pid: Option<String>,
    /// When the last session got its snapshot, and the new server's CPU seconds then.
    all_in: Option<(Instant, Option<f64>)>,
    last_scan: u64,
    last_show: Instant,
}

/// Runs the mode; the exit status as in `main`.
///
/// # Errors
/// Bad arguments, a target off loopback, too few open files, no poll.
pub fn main(args: &ReconnectArgs) -> Result<ExitCode, String> {
    if args.papers == 0 || args.members == 0 || args.connect_concurrency == 0 {
        return Err("--papers, --members and --connect-concurrency must be at least 1".into());
    }
    if args.fill && (args.notes == 0 || args.notes > 100_000) {
        return Err("--fill needs --notes from 1 to 100000".into());
    }
    if [args.settle, args.restart_timeout, args.connect_timeout, args.connect_deadline]
        .iter()
        .any(|v| !(v.is_finite() && (0.0..=3600.0).contains(v)))
    {
        return Err("times must be between 0 and 3600 s".into());
    }
    let target = crate::loopback_target(&args.target)?;
    let planned = args.papers * args.members;
    let nofile = crate::raise_nofile();
    if planned as u64 + 64 > nofile {
        return Err(format!(
            "{planned} sessions need more open files than the limit of {nofile} (ulimit -n): lower --papers or --members"
        ));
    }
    let mut run = Run::new(args, target)?;
    let outcome = run.run();
    run.close_all();
    let report = outcome.report(args, planned);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("JSON"));
    } else {
        println!("{}", outcome.summary(args, planned));
    }
    Ok(if outcome.connected == 0 {
        ExitCode::from(1)
    } else if !outcome.passed(planned) {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// What one run found.
#[derive(Default)]
struct Outcome {
    connected: u64,
    connect_failed: u64,
    connect_error: Option<String>,
    connect_seconds: f64,
    fill_written: u64,
    edits_sent: u64,
    edits_expected: u64,
    edits_received: u64,
    closed_by_server: u64,
    close_reasons: BTreeMap<String, u64>,
    wait_close_seconds: f64,
    reconnect: Counts,
    /// From the new server's start until every session had its snapshot.
    seconds_from_start: Option<f64>,
    /// From the first reconnect attempt until every session had its snapshot.
    seconds_from_first_attempt: Option<f64>,
    server_cpu: Option<f64>,
    tool_cpu: Option<f64>,
    new_pid: Option<String>,
    checked: u64,
    matched: u64,
    first_mismatch: Option<String>,
    aborted: Option<String>,
}

impl Outcome {
    fn passed(&self, planned: usize) -> bool {
        self.aborted.is_none() && self.reconnect.ok == planned as u64 && self.matched == self.checked
    }

    fn report(&self, args: &ReconnectArgs, planned: usize) -> Value {
        let r = &self.reconnect;
        let per = |x: u64| if r.ok > 0 { Some(report::round(x as f64 / r.ok as f64, 1)) } else { None };
        json!({
            "mode": "reconnect",
            "since": args.since == "on",
            "target": args.target,
            "papers": args.papers,
            "members": args.members,
            "notes": args.notes,
            "note_bytes": args.note_bytes,
            "fill": args.fill,
            "settle_seconds": args.settle,
            "connections": {
                "planned": planned,
                "ok": self.connected,
                "failed": self.connect_failed,
                "first_error": self.connect_error,
                "seconds": report::round(self.connect_seconds, 3),
            },
            "fill_upserts": self.fill_written,
            "edits": {"sent": self.edits_sent, "deliveries_expected": self.edits_expected, "deliveries_received": self.edits_received},
            "restart": {
                "sessions_closed_by_server": self.closed_by_server,
                "close_reasons": self.close_reasons,
                "seconds_waiting_for_closes": report::round(self.wait_close_seconds, 3),
            },
            "reconnect": {
                "sessions": planned,
                "ok": r.ok,
                "failed": r.failed,
                "retries": r.retries,
                "retry_reasons": r.retry_reasons,
                "first_error": r.first_error,
                "refusals": r.errors,
                "snapshots_since": r.since_snapshots,
                "snapshots_full": r.full_snapshots,
                "bytes_until_snapshots": r.snapshot_bytes,
                "bytes_until_snapshot_per_session": per(r.snapshot_bytes),
                "bytes_received_all": r.rx_bytes,
                "seconds_from_server_start": self.seconds_from_start.map(|s| report::round(s, 3)),
                "seconds_from_first_attempt": self.seconds_from_first_attempt.map(|s| report::round(s, 3)),
                "server_pid": self.new_pid,
                "server_cpu_seconds": self.server_cpu.map(|s| report::round(s, 3)),
                "tool_cpu_seconds": self.tool_cpu.map(|s| report::round(s, 3)),
            },
            "check": {"papers": self.checked, "matched": self.matched, "first_mismatch": self.first_mismatch},
            "aborted": self.aborted,
            "passed": self.passed(planned),
        })
    }

    fn summary(&self, args: &ReconnectArgs, planned: usize) -> String {
        let r = &self.reconnect;
        let f = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.3}"));
        let mut s = format!(
            "{} papers x {} members, since {}\nconnected {} of {planned} in {:.1} s ({} failed)\n\
             edits: {} sent, {} of {} deliveries\nrestart: {} sessions closed by the server {:?}\n\
             reconnect: {} ok, {} failed, {} retries; {} since and {} full snapshots\n  \
             bytes until the snapshots {} ({} per session), all bytes {}\n  \
             seconds from the new server's start {}, from the first attempt {}\n  \
             new server CPU seconds {}, tool CPU seconds {}\ncheck: {} of {} papers match a full snapshot",
            args.papers,
            args.members,
            args.since,
            self.connected,
            self.connect_seconds,
            self.connect_failed,
            self.edits_sent,
            self.edits_received,
            self.edits_expected,
            self.closed_by_server,
            self.close_reasons,
            r.ok,
            r.failed,
            r.retries,
            r.since_snapshots,
            r.full_snapshots,
            r.snapshot_bytes,
            r.snapshot_bytes.checked_div(r.ok).unwrap_or(0),
            r.rx_bytes,
            f(self.seconds_from_start),
            f(self.seconds_from_first_attempt),
            f(self.server_cpu),
            f(self.tool_cpu),
            self.matched,
            self.checked,
        );
        for (what, text) in [("connect error", &self.connect_error), ("reconnect error", &r.first_error)] {
            if let Some(e) = text {
                s += &format!("\nfirst {what}: {e}");
            }
        }
        if let Some(m) = &self.first_mismatch {
            s += &format!("\nfirst mismatch: {m}");
        }
        if let Some(why) = &self.aborted {
            s += &format!("\naborted: {why}");
        }
        s
    }
}

impl<'a> Run<'a> {
    fn new(args: &'a ReconnectArgs, target: SocketAddr) -> Result<Self, String> {
        let mut sessions = Vec::with_capacity(args.papers * args.members);
        for p in 0..args.papers {
            for m in 0..args.members {
                sessions.push(Session {
                    paper: p as u32,
                    member: m as u32,
                    stream: None,
                    phase: Phase::Idle,
                    out: Vec::new(),
                    written: 0,
                    inbuf: Vec::new(),
                    frag: Vec::new(),
                    max_v: 0,
                    to_snapshot: 0,
                    notes: (m == 0).then(Notes::new),
                    fill_left: 0,
                    joined: false,
                });
            }
        }
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        Ok(Run {
            args,
            poll: Poll::new().map_err(|e| format!("poll: {e}"))?,
            sessions,
            papers: (0..args.papers).map(|p| format!("{}-{p}", args.paper_prefix)).collect(),
            target,
            host: target.to_string(),
            base: Instant::now(),
            masks: wire::Masks::new(seed),
            accept: tungstenite::handshake::derive_accept_key(wire::KEY.as_bytes()),
            scratch: vec![0; 256 * 1024],
            queue: BinaryHeap::new(),
            in_flight: 0,
            retry: false,
            since: args.since == "on",
            reconnecting: false,
            read_again: Vec::new(),
            counts: Counts::default(),
            new_pid: None,
            all_in: None,
            last_scan: 0,
            last_show: Instant::now(),
        })
    }

    fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    fn show(&mut self, phase: &str) {
        if self.args.quiet || self.last_show.elapsed() < Duration::from_secs(2) {
            return;
        }
        self.last_show = Instant::now();
        let c = &self.counts;
        eprintln!(
            "[{:6.1} s] {phase}: {} ok, {} failed, {} in flight, {} retries",
            self.base.elapsed().as_secs_f64(),
            c.ok,
            c.failed,
            self.in_flight,
            c.retries
        );
    }

    /// The phases in order; the outcome says how far they came.
    fn run(&mut self) -> Outcome {
        let mut out = Outcome::default();
        let members = self.args.members;
        let deadline = self.base + Duration::from_secs_f64(self.args.connect_deadline);
        let mut fill_done = Instant::now();
        if self.args.fill {
            let first: Vec<usize> = (0..self.papers.len()).map(|p| p * members).collect();
            self.connect(&first, deadline, "connecting member 0");
            out.fill_written = self.fill(deadline);
            fill_done = Instant::now();
            let rest: Vec<usize> = (0..self.sessions.len()).filter(|k| k % members != 0).collect();
            self.connect(&rest, deadline, "connecting");
        } else {
            let all: Vec<usize> = (0..self.sessions.len()).collect();
            self.connect(&all, deadline, "connecting");
        }
        out.connected = self.counts.ok;
        out.connect_failed = self.counts.failed;
        out.connect_error = self.counts.first_error.clone();
        out.connect_seconds = self.base.elapsed().as_secs_f64();
        if !self.args.quiet {
            eprintln!("connected {} of {} in {:.1} s", out.connected, self.sessions.len(), out.connect_seconds);
        }
        if out.connected == 0 {
            out.aborted = Some("no session connected".into());
            return out;
        }

        if self.args.fill && self.args.settle > 0.0 {
            let until = fill_done + Duration::from_secs_f64(self.args.settle);
            while Instant::now() < until {
                self.turn(until.saturating_duration_since(Instant::now()).min(Duration::from_millis(200)));
                self.show("settling past the resume window");
            }
        }
        (out.edits_sent, out.edits_expected) = self.edit();
        let until = Instant::now() + EDIT_WAIT;
        while self.counts.edit_receipts < out.edits_expected && Instant::now() < until {
            self.turn(Duration::from_millis(20));
        }
        out.edits_received = self.counts.edit_receipts;

        // Ready: the caller restarts the server; the old one closes every session.
        if let Some(path) = &self.args.ready_file {
            if let Err(e) = std::fs::write(path, "ready\n") {
                out.aborted = Some(format!("cannot write {}: {e}", path.display()));
                return out;
            }
        }
        let waiting = Instant::now();
        let until = waiting + Duration::from_secs_f64(self.args.restart_timeout);
        while self.sessions.iter().any(|s| s.stream.is_some()) && Instant::now() < until {
            self.turn(Duration::from_millis(20));
            self.show("waiting for the server to close the sessions");
        }
        out.wait_close_seconds = waiting.elapsed().as_secs_f64();
        out.closed_by_server = self.counts.closes.values().sum();
        out.close_reasons = std::mem::take(&mut self.counts.closes);
        if self.sessions.iter().any(|s| s.stream.is_some()) {
            out.aborted = Some("the server did not close every session within --restart-timeout".into());
            return out;
        }

        // Reconnect every session that had been open.
        let again: Vec<usize> = (0..self.sessions.len()).filter(|&k| self.sessions[k].joined).collect();
        for &k in &again {
            self.sessions[k].phase = Phase::Idle;
            self.sessions[k].to_snapshot = 0;
        }
        self.counts = Counts::default();
        self.retry = true;
        self.reconnecting = true;
        let tool_before = report::cpu_seconds("self");
        let first_attempt = Instant::now();
        let deadline = first_attempt + Duration::from_secs_f64(self.args.restart_timeout);
        self.connect(&again, deadline, "reconnecting");
        out.tool_cpu = report::cpu_seconds("self").zip(tool_before).map(|(a, b)| a - b);
        if let Some((at, cpu)) = self.all_in {
            out.seconds_from_first_attempt = Some(at.duration_since(first_attempt).as_secs_f64());
            out.server_cpu = cpu;
            // The server's start, to the clock tick, from its age now.
            let pid = self.new_pid.clone();
            let started = pid.as_deref().and_then(report::started_seconds_ago);
            out.seconds_from_start = started.map(|ago| ago - at.elapsed().as_secs_f64());
        }
        out.new_pid = self.new_pid.clone();
        out.reconnect = std::mem::take(&mut self.counts);
        if !self.args.quiet {
            eprintln!("reconnected {} of {} ({} failed)", out.reconnect.ok, again.len(), out.reconnect.failed);
        }
        self.check(&mut out);
        out
    }

    // ---- connecting ---------------------------------------------------------------------

    /// Connects `keys` with bounded concurrency until each has its snapshot or
    /// failed (for good: a retry gives up at `deadline`).
    fn connect(&mut self, keys: &[usize], deadline: Instant, phase: &str) {
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
            if now >= deadline_us {
                while let Some(Reverse((_, key))) = self.queue.pop() {
                    self.sessions[key].phase = Phase::Closed;
                    self.counts.failed += 1;
                    self.note_error("the phase's deadline passed".into());
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

    fn start_connect(&mut self, key: usize, now: u64) -> io::Result<()> {
        use socket2::{Domain, Protocol, SockAddr, Socket, Type};
        let socket = Socket::new(Domain::for_address(self.target), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        match socket.connect(&SockAddr::from(self.target)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let mut stream = TcpStream::from_std(socket.into());
        self.poll.registry().register(&mut stream, Token(key), Interest::READABLE | Interest::WRITABLE)?;
        let s = &mut self.sessions[key];
        let user = format!("u{}m{}", s.paper, s.member);
        let since = (self.reconnecting && self.since && s.max_v > 0).then_some(s.max_v);
        s.out = wire::upgrade_request(&self.host, &self.papers[s.paper as usize], &user, None, since);
        s.written = 0;
        s.inbuf.clear();
        s.frag.clear();
        s.to_snapshot = 0;
        s.stream = Some(stream);
        s.phase = Phase::Connecting { since_us: now };
        Ok(())
    }

    fn scan_timeouts(&mut self, now: u64, deadline_us: u64) {
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

    fn read_pid_file(&mut self) {
        let Some(path) = &self.args.server_pid_file else { return };
        let Ok(text) = std::fs::read_to_string(path) else { return };
        let pid = text.trim();
        let old = self.args.server_pid.map(|p| p.to_string());
        if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && Some(pid) != old.as_deref() {
            self.new_pid = Some(pid.to_string());
        }
    }

    fn note_error(&mut self, error: String) {
        if self.counts.first_error.is_none() {
            self.counts.first_error = Some(error);
        }
    }

    /// A connection that did not get its snapshot: tried again later while
    /// reconnecting (the server may not be up yet), else failed for good.
    fn fail(&mut self, key: usize, error: String) {
        self.drop_stream(key);
        let s = &mut self.sessions[key];
        if !matches!(s.phase, Phase::Connecting { .. } | Phase::Handshake { .. } | Phase::Joining { .. }) {
            return;
        }
        self.in_flight -= 1;
        if self.retry {
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
    fn closed(&mut self, key: usize, why: String) {
        if !matches!(self.sessions[key].phase, Phase::Open) {
            return self.fail(key, why);
        }
        self.drop_stream(key);
        self.sessions[key].phase = Phase::Closed;
        *self.counts.closes.entry(why).or_default() += 1;
    }

    fn drop_stream(&mut self, key: usize) {
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
    fn turn(&mut self, timeout: Duration) {
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

    fn on_event(&mut self, key: usize) {
        let Some(s) = self.sessions.get_mut(key) else { return };
        if let Phase::Connecting { since_us } = s.phase {
            let Some(stream) = &s.stream else { return };
            match stream.take_error() {
                Ok(Some(e)) | Err(e) => return self.fail(key, format!("connect: {e}")),
                Ok(None) => {}
            }
            match stream.peer_addr() {
                Ok(_) => s.phase = Phase::Handshake { since_us, buf: Vec::new() },
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => return self.fail(key, format!("connect: {e}")),
            }
        }
        if self.write(key).is_ok() {
            self.read(key);
        }
    }

    fn read(&mut self, key: usize) {
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
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.closed(key, format!("read: {e}"));
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    fn on_bytes(&mut self, key: usize, bytes: &[u8]) -> Result<(), String> {
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

    fn on_frame(&mut self, key: usize, fin: bool, opcode: u8, payload: &[u8], len: usize) -> Result<(), String> {
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

    fn on_text(&mut self, key: usize, text: &[u8]) -> Result<(), String> {
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
    fn write(&mut self, key: usize) -> Result<(), ()> {
        let s = &mut self.sessions[key];
        if matches!(s.phase, Phase::Connecting { .. }) {
            return Ok(());
        }
        let Some(stream) = s.stream.as_mut() else { return Err(()) };
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

    /// Member 0 of each paper writes --notes notes; returns the upserts sent,
    /// after waiting (bounded) for each to come back.
    fn fill(&mut self, deadline: Instant) -> u64 {
        let mut sent = 0;
        let notes = self.args.notes;
        let mut msg = Vec::new();
        for key in (0..self.sessions.len()).step_by(self.args.members) {
            if !matches!(self.sessions[key].phase, Phase::Open) {
                continue;
            }
            for i in 0..notes {
                msg.clear();
                let t = self.now_us();
                note_upsert(&mut msg, &format!("n{i}"), i as u32, t, self.args.note_bytes);
                let mask = self.masks.next();
                wire::client_frame(&mut self.sessions[key].out, wire::OP_TEXT, &msg, mask);
            }
            self.sessions[key].fill_left = notes;
            sent += notes as u64;
            let _ = self.write(key);
        }
        while Instant::now() < deadline && self.sessions.iter().any(|s| s.fill_left > 0 && s.stream.is_some()) {
            self.turn(Duration::from_millis(20));
            self.show("filling");
        }
        if !self.counts.errors.is_empty() {
            self.note_error(format!(
                "refusals during the fill: {:?} (raise the server's --rate and --burst)",
                self.counts.errors
            ));
        }
        sent
    }

    /// Member 0 of each paper makes --edits edits; returns (edits sent,
    /// deliveries expected: every open member of the paper gets each).
    fn edit(&mut self) -> (u64, u64) {
        let (mut sent, mut expected) = (0, 0);
        // The fill's echoes are not the edits'.
        self.counts.edit_receipts = 0;
        let mut open = vec![0u64; self.papers.len()];
        for s in &self.sessions {
            if matches!(s.phase, Phase::Open) {
                open[s.paper as usize] += 1;
            }
        }
        let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut msg = Vec::new();
        for key in (0..self.sessions.len()).step_by(self.args.members) {
            let s = &self.sessions[key];
            let (Phase::Open, Some(notes)) = (&s.phase, &s.notes) else { continue };
            let mut oldest: Vec<(u64, String)> = notes.iter().map(|(id, (v, _))| (*v, id.clone())).collect();
            oldest.sort_unstable();
            let mut edits = Vec::new();
            for i in 0..self.args.edits {
                msg.clear();
                let t = self.now_us();
                match (i, oldest.get(i.saturating_sub(1))) {
                    (0, _) if !oldest.is_empty() => {
                        msg.extend_from_slice(format!(r#"{{"type":"delete","id":"{}"}}"#, oldest[0].1).as_bytes());
                    }
                    (1, _) => note_upsert(&mut msg, &format!("e{stamp}"), i as u32, t, self.args.note_bytes),
                    (_, Some((_, id))) => note_upsert(&mut msg, id, i as u32, t, self.args.note_bytes),
                    _ => note_upsert(&mut msg, &format!("e{stamp}x{i}"), i as u32, t, self.args.note_bytes),
                }
                edits.push(std::mem::take(&mut msg));
            }
            let paper = self.sessions[key].paper as usize;
            for text in edits {
                let mask = self.masks.next();
                wire::client_frame(&mut self.sessions[key].out, wire::OP_TEXT, &text, mask);
                sent += 1;
                expected += open[paper];
            }
            let _ = self.write(key);
        }
        (sent, expected)
    }

    // ---- the check and the end ----------------------------------------------------------

    /// Compares what member 0 of some papers holds with a fresh full snapshot.
    fn check(&mut self, out: &mut Outcome) {
        let papers = self.papers.len();
        let count = self.args.check.min(papers);
        for i in 0..count {
            let p = i * papers / count;
            let s = &self.sessions[p * self.args.members];
            let (Phase::Open, Some(held)) = (&s.phase, &s.notes) else { continue };
            out.checked += 1;
            match full_snapshot(self.target, &self.host, &self.papers[p], &format!("check{p}")) {
                Ok(full) if &full == held => out.matched += 1,
                Ok(full) => {
                    out.first_mismatch.get_or_insert_with(|| describe_difference(&self.papers[p], held, &full));
                }
                Err(e) => {
                    out.first_mismatch.get_or_insert_with(|| format!("{}: no full snapshot: {e}", self.papers[p]));
                }
            }
        }
    }

    /// Sends every open session a close frame, waits briefly for the server to
    /// end them, and drops every socket.
    fn close_all(&mut self) {
        for key in 0..self.sessions.len() {
            if matches!(self.sessions[key].phase, Phase::Open) && self.sessions[key].stream.is_some() {
                let mask = self.masks.next();
                wire::client_frame(&mut self.sessions[key].out, wire::OP_CLOSE, &1000u16.to_be_bytes(), mask);
                let _ = self.write(key);
            }
        }
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until && self.sessions.iter().any(|s| s.stream.is_some()) {
            self.turn(Duration::from_millis(20));
        }
        for key in 0..self.sessions.len() {
            self.drop_stream(key);
        }
    }
}

/// An `upsert` of note `id` with generated `data`.
fn note_upsert(out: &mut Vec<u8>, id: &str, seq: u32, t_us: u64, note_bytes: usize) {
    out.extend_from_slice(br#"{"type":"upsert","id":"#);
    out.extend_from_slice(serde_json::to_string(id).expect("a string").as_bytes());
    out.extend_from_slice(br#","data":"#);
    wire::note_data(out, 0, seq, t_us, note_bytes);
    out.push(b'}');
}

/// A snapshot applied to what a session holds: one with `since` is merged
/// (deleted notes removed), one without replaces it all (PROTOCOL.md 3.1).
fn apply_snapshot(notes: &mut Notes, snapshot: &Value) {
    if snapshot.get("since").is_none() {
        notes.clear();
    }
    for note in snapshot["notes"].as_array().into_iter().flatten() {
        apply_note(notes, note);
    }
}

fn apply_note(notes: &mut Notes, note: &Value) {
    let Some(id) = note["id"].as_str() else { return };
    if note["deleted"] == Value::Bool(true) {
        notes.remove(id);
    } else {
        notes.insert(id.to_string(), (note["v"].as_u64().unwrap_or(0), note["data"].clone()));
    }
}

/// An `upsert` or `delete` applied to what a session holds.
fn apply_change(notes: &mut Notes, msg: &Value) {
    let Some(id) = msg["id"].as_str() else { return };
    match msg["type"].as_str() {
        Some("upsert") => {
            notes.insert(id.to_string(), (msg["v"].as_u64().unwrap_or(0), msg["data"].clone()));
        }
        Some("delete") => {
            notes.remove(id);
        }
        _ => {}
    }
}

fn describe_difference(paper: &str, held: &Notes, full: &Notes) -> String {
    let missing = full.keys().find(|id| !held.contains_key(*id));
    let extra = held.keys().find(|id| !full.contains_key(*id));
    let changed = held.iter().find(|(id, n)| full.get(*id).is_some_and(|f| f != *n)).map(|(id, _)| id);
    format!(
        "{paper}: held {} notes, a full snapshot {}; first missing {missing:?}, first extra {extra:?}, first different {changed:?}",
        held.len(),
        full.len()
    )
}

/// A full snapshot of `paper` on a blocking connection of its own (bounded: 10 s).
///
/// # Errors
/// Anything that keeps the snapshot from arriving whole in time.
fn full_snapshot(target: SocketAddr, host: &str, paper: &str, user: &str) -> Result<Notes, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream =
        std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_millis(500))).map_err(|e| e.to_string())?;
    stream.write_all(&wire::upgrade_request(host, paper, user, None, None)).map_err(|e| format!("write: {e}"))?;
    let accept = tungstenite::handshake::derive_accept_key(wire::KEY.as_bytes());
    let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 64 * 1024]);
    let mut upgraded = false;
    let mut frag = Vec::new();
    while Instant::now() < deadline {
        match stream.read(&mut chunk) {
            Ok(0) => return Err("the server closed the connection".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(e) => return Err(format!("read: {e}")),
        }
        if !upgraded {
            match wire::read_handshake(&buf, &accept) {
                Handshake::Partial => continue,
                Handshake::Refused(why) => return Err(why),
                Handshake::Upgraded { len } => {
                    buf.drain(..len);
                    upgraded = true;
                }
            }
        }
        while let Some((frame, len)) = wire::server_frame(&buf, MAX_FRAME)? {
            if matches!(frame.opcode, wire::OP_TEXT | wire::OP_CONTINUATION) {
                frag.extend_from_slice(frame.payload);
                if frame.fin {
                    let value: Value = serde_json::from_slice(&frag).map_err(|e| format!("snapshot: {e}"))?;
                    if value["type"] != "snapshot" || value.get("since").is_some() {
                        return Err(format!("first message was not a full snapshot: {}", value["type"]));
                    }
                    let mut notes = Notes::new();
                    apply_snapshot(&mut notes, &value);
                    let mut close = Vec::new();
                    wire::client_frame(&mut close, wire::OP_CLOSE, &1000u16.to_be_bytes(), [1, 2, 3, 4]);
                    let _ = stream.write_all(&close);
                    return Ok(notes);
                }
            }
            buf.drain(..len);
        }
    }
    Err("no snapshot within 10 s".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_since_snapshot_merges_and_a_full_one_replaces() {
        let mut held = Notes::new();
        apply_snapshot(
            &mut held,
            &json!({"type":"snapshot","notes":[{"id":"a","v":1,"data":{"t":1}},{"id":"b","v":2,"data":{"t":2}}]}),
        );
        apply_change(&mut held, &json!({"type":"upsert","id":"c","v":5,"data":{"t":3}}));
        apply_snapshot(
            &mut held,
            &json!({"type":"snapshot","since":5,"notes":[{"id":"c","v":6,"data":{"t":4}},{"id":"a","deleted":true,"v":7}]}),
        );
        let ids: Vec<_> = held.iter().map(|(id, (v, _))| (id.as_str(), *v)).collect();
        assert_eq!(ids, vec![("b", 2), ("c", 6)]);
        apply_snapshot(&mut held, &json!({"type":"snapshot","notes":[{"id":"d","v":9,"data":{}}]}));
        assert_eq!(held.keys().collect::<Vec<_>>(), vec!["d"]);
    }

    #[test]
    fn notes_written_are_valid_upserts() {
        let mut out = Vec::new();
        note_upsert(&mut out, "n7", 3, 99, 1024);
        let value: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!((value["type"].as_str(), value["id"].as_str()), (Some("upsert"), Some("n7")));
        assert_eq!(serde_json::to_vec(&value["data"]).unwrap().len(), 1024);
    }
}
