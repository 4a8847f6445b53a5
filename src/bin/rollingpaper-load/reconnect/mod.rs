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
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde_json::{json, Value};

use crate::report;
use crate::stream::Stream;
use crate::target::Target;
use crate::wire::{self, Handshake};

mod notes;
mod outcome;
mod sockets;

use notes::*;
use outcome::Outcome;

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
    /// Server address (host:port, ws://host[:port] or wss://host[:port]; on
    /// loopback only); the restarted server must listen on the same one.
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: String,
    #[command(flatten)]
    tls: crate::tls::TlsArgs,
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
    stream: Option<Stream>,
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
    target: Target,
    /// The TLS client configuration, for a `wss://` target.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The server's certificate, refused by TLS: no retry, the run aborts.
    certificate_refused: Option<String>,
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
    let target = crate::target::parse(&args.target)?;
    let tls = crate::tls::client_config(target.is_tls(), &args.tls)?;
    let planned = args.papers * args.members;
    let nofile = crate::raise_nofile();
    if planned as u64 + 64 > nofile {
        return Err(format!(
            "{planned} sessions need more open files than the limit of {nofile} (ulimit -n): lower --papers or --members"
        ));
    }
    let mut run = Run::new(args, target, tls)?;
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

impl<'a> Run<'a> {
    fn new(args: &'a ReconnectArgs, target: Target, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Self, String> {
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
            tls,
            certificate_refused: None,
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
        if let Some(why) = &self.certificate_refused {
            out.aborted = Some(why.clone());
            return out;
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
        if let Some(why) = &self.certificate_refused {
            out.aborted = Some(why.clone());
        }
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
            match full_snapshot(&self.target, self.tls.as_ref(), &self.papers[p], &format!("check{p}")) {
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
