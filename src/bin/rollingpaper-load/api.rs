//! `rollingpaper-load api`: the backend API's note writes (PROTOCOL.md 7)
//! against one node while members edit the same papers over WebSocket.
//!
//! The members join first (papers x members, each on a thread of its own, as
//! the abuse mode's honest members do); `--senders` of each paper send an
//! `upsert` of their own note at `--rate` (open loop), their first sends spread
//! evenly over one period (not all in the same instant). Then `--writers` API
//! writers, each on a thread of its own, `PUT /api/papers/{paper}/notes/{id}`
//! back to back (a closed loop: the next once the last is answered), each
//! request on a connection of its own (the server keeps no connection alive),
//! the papers in turn, the notes `api0`.. of each. Every writer connects from
//! its own loopback address, so that closed connections never exhaust one
//! address's ports.
//!
//! Measured over the window (after `--warmup`): the API writes answered in it,
//! per second, their latency from connecting to the whole answer (p50, p99,
//! max) and their statuses; the members' edits sent in it and their
//! edit-to-`saved` latency (an edit never confirmed counts with what it waited
//! until the end of the drain); the server's CPU and RSS, and the generator's
//! own CPU (its writers and members may be what limits the rate).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::abuse::honest;
use crate::abuse::quantiles;
use crate::abuse::ws::{self, Dial};
use crate::report::{self, round};
use crate::target::Transport;

/// API writes and member edits while members edit the same papers.
#[derive(clap::Args, Debug)]
pub struct ApiArgs {
    /// Server address (host:port or ws://host[:port]; loopback only, no TLS):
    /// the members join its papers and the writers call its `/api`.
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: String,
    /// The server's API key (its --api-key).
    #[arg(long, env = "LOAD_API_KEY", hide_env_values = true)]
    api_key: String,
    /// The server's pid: its CPU and RSS are read from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Another process to measure over the window, as NAME=PID (repeatable;
    /// e.g. redis=1234): its CPU (cores) and RSS, reported under `watched`.
    #[arg(long, value_name = "NAME=PID", value_parser = crate::parse_watch)]
    watch_pid: Vec<(String, u32)>,
    /// Papers the members edit and the writers write to.
    #[arg(long, default_value_t = 20)]
    papers: usize,
    /// Members (WebSocket sessions) per paper.
    #[arg(long, default_value_t = 10)]
    members: usize,
    /// Members of each paper that edit (each its own note).
    #[arg(long, default_value_t = 10)]
    senders: usize,
    /// Edits a second per sender.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Size of a note's `data`, the members' and the API's, bytes.
    #[arg(long, default_value_t = 200)]
    note_bytes: usize,
    /// Concurrent API writers, each sending its next PUT once the last is
    /// answered (0: the members alone, for comparison).
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Notes of each paper the API writes (`api0`..).
    #[arg(long, default_value_t = 10)]
    api_notes: usize,
    /// Seconds of edits and API writes before the window.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Seconds after the window for the members' last `saved`.
    #[arg(long, default_value_t = 3.0)]
    drain: f64,
    /// Prefix of the paper ids (default: one unique to this run).
    #[arg(long)]
    paper_prefix: Option<String>,
    /// Print the report as JSON on standard output.
    #[arg(long)]
    json: bool,
    /// No progress lines on standard error.
    #[arg(long)]
    quiet: bool,
}

/// The members' source address; each writer has its own, 127.0.1.(w + 1).
const MEMBER_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
/// How long one API request may take, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest answer read.
const MAX_ANSWER: usize = 1 << 20;

fn check(args: &ApiArgs) -> Result<(), String> {
    let times = [args.warmup, args.duration, args.drain];
    if times.iter().any(|t| !(t.is_finite() && (0.0..=3600.0).contains(t))) || args.duration < 1.0 {
        return Err("--duration is 1 to 3600 s, --warmup and --drain 0 to 3600 s".into());
    }
    if args.papers == 0 || args.members == 0 || args.senders > args.members {
        return Err("at least one paper and member; --senders at most --members".into());
    }
    if args.papers * args.members > 10_000 || args.writers > 250 || args.api_notes == 0 || args.api_notes > 1000 {
        return Err("bounded: up to 10000 members, 250 writers, 1 to 1000 --api-notes".into());
    }
    if !(args.rate > 0.0 && args.rate <= 100.0) {
        return Err("--rate is above 0, at most 100".into());
    }
    if !(40..=1 << 20).contains(&args.note_bytes) {
        return Err("--note-bytes is 40 to 1048576".into());
    }
    if args.api_key.len() < 32 {
        return Err("--api-key is the server's key, at least 32 bytes".into());
    }
    Ok(())
}

/// One API write: when it was answered (seconds from the start of the
/// warm-up), how long it took (ms), and its status (or why there was none).
struct Call {
    at: f64,
    ms: f64,
    status: Result<u16, String>,
}

/// Runs the mode: 0 when members joined and (with writers) API writes were
/// answered 200, 1 otherwise.
///
/// # Errors
/// Bad arguments, an address off loopback, a TLS target.
pub fn main(args: &ApiArgs) -> Result<ExitCode, String> {
    check(args)?;
    let target = crate::target::parse(&args.target)?;
    if !matches!(target.transport, Transport::Plain) {
        return Err("the api mode speaks ws:// and http:// only".into());
    }
    let nofile = crate::raise_nofile();
    let sockets = args.papers * args.members + args.writers + 64;
    if sockets as u64 > nofile {
        return Err(format!("{sockets} sockets need more open files than the limit of {nofile} (ulimit -n)"));
    }
    let run_id = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let prefix = args.paper_prefix.clone().unwrap_or_else(|| format!("api{:x}", run_id % (1 << 40)));
    let papers: Vec<String> = (0..args.papers).map(|p| format!("{prefix}-{p}")).collect();
    let say = |line: String| {
        if !args.quiet {
            eprintln!("api: {line}");
        }
    };
    let v4 = target.addr.is_ipv4();

    // The members join first.
    let ledger = Arc::new(honest::Ledger::default());
    let (ready_tx, ready) = mpsc::channel();
    let mut go = Vec::new();
    let mut threads = Vec::new();
    let members = args.papers * args.members;
    for (p, paper) in papers.iter().enumerate() {
        for m in 0..args.members {
            let member = honest::Member {
                dial: Dial {
                    addr: target.addr,
                    host: target.authority.clone(),
                    source: v4.then_some(IpAddr::V4(MEMBER_SOURCE)),
                },
                paper: paper.clone(),
                user: format!("u{m}"),
                rate: (m < args.senders).then_some(args.rate),
                note_bytes: args.note_bytes,
                seed: run_id ^ ((p * 1000 + m) as u64) << 16,
                // The senders spread evenly over one period, as people type.
                offset: Duration::from_secs_f64((p * args.members + m) as f64 / members as f64 / args.rate),
            };
            let (tx, rx) = mpsc::channel();
            go.push(tx);
            let (ready, ledger) = (ready_tx.clone(), ledger.clone());
            threads.push(thread::spawn(move || honest::member(member, ready, rx, &ledger)));
        }
    }
    drop(ready_tx);
    let mut joined = 0;
    for _ in 0..members {
        match ready.recv_timeout(Duration::from_secs(60)) {
            Ok(true) => joined += 1,
            Ok(false) => {}
            Err(_) => break,
        }
    }
    say(format!("{joined} of {members} members joined"));

    // Warm-up, window, drain: the members edit and the writers write from the
    // start of the warm-up to the end of the window.
    let start = Instant::now() + Duration::from_millis(200);
    let window_start = start + Duration::from_secs_f64(args.warmup);
    let end = window_start + Duration::from_secs_f64(args.duration);
    let drain_end = end + Duration::from_secs_f64(args.drain);
    for tx in go {
        let _ = tx.send(honest::Window { start, send_end: end, drain_end });
    }
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let pad = "x".repeat(args.note_bytes.saturating_sub(40));
    for w in 0..args.writers {
        let source = v4.then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 1, (w % 250 + 1) as u8)));
        let writer = Writer {
            addr: target.addr,
            host: target.authority.clone(),
            source,
            key: args.api_key.clone(),
            papers: papers.clone(),
            notes: args.api_notes,
            pad: pad.clone(),
            index: w,
            count: args.writers,
        };
        let calls = calls.clone();
        threads.push(thread::spawn(move || writer.run(start, end, &calls)));
    }

    let cpu = |pid: Option<u32>| pid.and_then(|p| report::cpu_seconds(&p.to_string()));
    wait_until(window_start);
    let watched = |_: ()| args.watch_pid.iter().map(|(_, pid)| cpu(Some(*pid))).collect::<Vec<_>>();
    let (cpu_start, tool_start, at_start) = (cpu(args.server_pid), report::cpu_seconds("self"), Instant::now());
    let watched_start = watched(());
    while Instant::now() < end {
        thread::sleep(end.saturating_duration_since(Instant::now()).min(Duration::from_secs(5)));
        let ok = calls.lock().unwrap().iter().filter(|c| c.status == Ok(200)).count();
        say(format!(
            "[{:5.1} s] API writes answered 200: {ok}; members sent {}, saved {}",
            start.elapsed().as_secs_f64(),
            ledger.sent.load(Ordering::Relaxed),
            ledger.saved.lock().unwrap().len()
        ));
    }
    let (cpu_end, tool_end, at_end) = (cpu(args.server_pid), report::cpu_seconds("self"), Instant::now());
    let watched_end = watched(());
    let rss = args.server_pid.and_then(|p| report::rss_kib(&p.to_string()));
    for t in threads {
        let _ = t.join();
    }

    let window = (args.warmup, args.warmup + args.duration);
    let calls = std::mem::take(&mut *calls.lock().unwrap());
    let in_window: Vec<&Call> = calls.iter().filter(|c| c.at >= window.0 && c.at < window.1).collect();
    let ok: Vec<f64> = in_window.iter().filter(|c| c.status == Ok(200)).map(|c| c.ms).collect();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    for call in &in_window {
        let key = match &call.status {
            Ok(status) => status.to_string(),
            Err(e) => e.clone(),
        };
        *statuses.entry(key).or_default() += 1;
    }
    // The members' edits sent in the window (a confirmed one was sent its
    // latency before its `saved`).
    let sent_in = |sent: f64| sent >= window.0 && sent < window.1;
    let saved: Vec<f64> =
        ledger.saved.lock().unwrap().iter().filter(|(at, ms)| sent_in(at - ms / 1e3)).map(|(_, ms)| *ms).collect();
    let unsaved: Vec<f64> =
        ledger.unsaved.lock().unwrap().iter().filter(|(sent, _)| sent_in(*sent)).map(|(_, ms)| *ms).collect();
    let edits = saved.len() + unsaved.len();
    let seconds = at_end.duration_since(at_start).as_secs_f64().max(1e-3);
    let cores = |a: Option<f64>, b: Option<f64>| Some(round((b? - a?) / seconds, 3));
    let out = json!({
        "target": target.to_string(),
        "paper_prefix": prefix,
        "papers": args.papers,
        "members": args.members,
        "senders": args.senders,
        "rate": args.rate,
        "note_bytes": args.note_bytes,
        "writers": args.writers,
        "api_notes": args.api_notes,
        "warmup_seconds": args.warmup,
        "window_seconds": args.duration,
        "drain_seconds": args.drain,
        "members_joined": joined,
        "api": {
            "answered": in_window.len(),
            "ok": ok.len(),
            "per_second": round(ok.len() as f64 / args.duration, 1),
            "latency_ms": quantiles(ok),
            "statuses": statuses,
        },
        "edits": {
            "sent": edits,
            "per_second": round(edits as f64 / args.duration, 1),
            "saved_ms": quantiles(saved.iter().chain(&unsaved).copied().collect()),
            "unsaved": unsaved.len(),
            "events": *ledger.events.lock().unwrap(),
        },
        "server": {"cpu_cores": cores(cpu_start, cpu_end), "rss_kib": rss},
        "tool_cpu_cores": cores(tool_start, tool_end),
        "watched": args.watch_pid.iter().zip(watched_start.iter().zip(&watched_end)).map(|((name, pid), (a, b))| {
            (name.clone(), json!({"pid": pid, "cpu_cores": cores(*a, *b), "rss_kib": report::rss_kib(&pid.to_string())}))
        }).collect::<serde_json::Map<_, _>>(),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out).expect("JSON"));
    } else {
        println!("{}", serde_json::to_string_pretty(&json!({"api": out["api"], "edits": out["edits"]})).expect("JSON"));
    }
    let failed = joined == 0 || (args.writers > 0 && out["api"]["ok"] == 0);
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn wait_until(t: Instant) {
    let now = Instant::now();
    if now < t {
        thread::sleep(t - now);
    }
}

/// One API writer: `PUT`s of its share of the notes, back to back.
struct Writer {
    addr: SocketAddr,
    host: String,
    source: Option<IpAddr>,
    key: String,
    papers: Vec<String>,
    notes: usize,
    pad: String,
    /// This writer's index among `count`: it takes every `count`-th write.
    index: usize,
    count: usize,
}

impl Writer {
    /// Writes from `start` until `end`, recording every answer.
    fn run(&self, start: Instant, end: Instant, calls: &Mutex<Vec<Call>>) {
        wait_until(start);
        let mut mine = Vec::new();
        let mut k = self.index;
        while Instant::now() < end {
            let paper = &self.papers[k % self.papers.len()];
            let note = (k / self.papers.len()) % self.notes;
            let body = format!(r#"{{"data":{{"text":"api write {k}","pad":"{}"}}}}"#, self.pad);
            let head = format!(
                "PUT /api/papers/{paper}/notes/api{note} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                self.host,
                self.key,
                body.len()
            );
            let sent = Instant::now();
            let status = self.call(head.as_bytes(), body.as_bytes(), sent + REQUEST_TIMEOUT);
            let now = Instant::now();
            let ms = now.duration_since(sent).as_secs_f64() * 1e3;
            mine.push(Call { at: now.saturating_duration_since(start).as_secs_f64(), ms, status });
            k += self.count;
        }
        calls.lock().unwrap().extend(mine);
    }

    /// One request on a connection of its own: the answer's status once the
    /// server has sent it all and closed (so that the closed connection waits
    /// out on the server's side, not on this address's ports).
    fn call(&self, head: &[u8], body: &[u8], deadline: Instant) -> Result<u16, String> {
        let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let mut tcp = ws::tcp(self.addr, self.source, None, left()).map_err(|e| format!("connect: {}", e.kind()))?;
        tcp.write_all(head).and_then(|()| tcp.write_all(body)).map_err(|e| format!("send: {}", e.kind()))?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if Instant::now() >= deadline {
                return Err("no whole answer in time".into());
            }
            tcp.set_read_timeout(Some(left())).map_err(|e| e.to_string())?;
            match tcp.read(&mut buf) {
                Ok(0) => break,
                Ok(n) if answer.len() + n <= MAX_ANSWER => answer.extend_from_slice(&buf[..n]),
                Ok(_) => return Err("an answer over 1 MiB".into()),
                Err(e) if ws::timed_out(&e) => return Err("no whole answer in time".into()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read: {}", e.kind())),
            }
        }
        let line = answer.split(|&b| b == b'\n').next().unwrap_or_default();
        let status = std::str::from_utf8(line).ok().and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
        status.ok_or_else(|| "no status line".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ApiArgs,
    }

    #[test]
    fn arguments_are_bounded() {
        let parse = |extra: &[&str]| {
            let key = ["--api-key", "k-of-at-least-thirty-two-bytes-0123456789"];
            let cli = Cli::try_parse_from(["api"].iter().chain(&key).chain(extra)).unwrap();
            check(&cli.args)
        };
        assert!(parse(&[]).is_ok());
        assert!(parse(&["--senders", "11"]).is_err());
        assert!(parse(&["--writers", "251"]).is_err());
        assert!(parse(&["--duration", "0.5"]).is_err());
        assert!(parse(&["--api-notes", "0"]).is_err());
        let short = Cli::try_parse_from(["api", "--api-key", "short"]).unwrap();
        assert!(check(&short.args).is_err());
    }
}
