//! `rollingpaper-load abuse`: hostile clients against one node while honest
//! clients edit other papers (issue 24's hostile-traffic run, PROTOCOL.md 1.2:
//! no client's traffic within the limits can make Redis busy for others or
//! grow memory without bound).
//!
//! Before the window: the honest members join their papers, and (with
//! `joiners`) one hostile session fills the large paper. Over the window, every
//! hostile kind runs at once (see `hostile`), the honest senders edit at their
//! rate, and from outside the sessions the run samples Redis's `PING` latency
//! (every 100 ms, its own connection), Redis's `used_memory`, the server's RSS,
//! its backlog gauges (`/metrics`) and its `/healthz` latency (every second).
//! After the window the honest members wait for their last `saved` (the drain).
//!
//! Thresholds (each can be moved by a flag; missing one exits 3):
//! - Redis `PING` p99 over the window under `--max-ping-p99-ms` (50); a `PING`
//!   not answered `+PONG` within 1 s (an error such as `BUSY`, a timeout)
//!   counts as at least 1 s, and every latency counts from when the sample was
//!   due, so a stall counts once per sample it covered;
//! - the honest edits' edit-to-`saved` p99 under `--max-saved-p99-ms` (250),
//!   an edit never confirmed counting with the time it waited until the end of
//!   the drain;
//! - the server's RSS and Redis's `used_memory` flat over the second half: the
//!   greatest sample of the window's last quarter at most `--flat-ratio` (1.10)
//!   times the greatest of its third quarter plus `--flat-slack-mib` (16 MiB);
//!   a quarter without a sample (Redis not answering `INFO`) is not flat.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::report::round;
use crate::target::Transport;

// The honest members and the WebSocket client serve the api mode too.
pub(crate) mod honest;
mod hostile;
mod sample;
pub(crate) mod ws;

use hostile::{Limits, Sender, Span, Tally, Unread};
use ws::Dial;

const KINDS: [&str; 7] = ["churn", "wide", "deletes", "pings", "joiners", "heads", "gets"];

/// Hostile clients against one node while honest clients edit other papers.
#[derive(clap::Args, Debug)]
pub struct AbuseArgs {
    /// Server address (host:port or ws://host[:port]; loopback only, no TLS).
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: String,
    /// The Redis the server writes to (host:port, loopback only): sampled over
    /// connections of its own (`PING`, `INFO memory`), never through the server.
    #[arg(long, default_value = "127.0.0.1:6379")]
    redis: String,
    /// The server's pid: its RSS and CPU are read from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Seconds of the window: hostile traffic and honest edits throughout.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Seconds after the window for the honest edits' last `saved`.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// Hostile kinds to run, comma-separated: churn, wide, deletes, pings,
    /// joiners, heads; and gets (waves of `GET /papers/{paper}` of the large
    /// paper, never read: as many as joiners), run only when named.
    #[arg(long, value_delimiter = ',', default_value = "churn,wide,deletes,pings,joiners,heads")]
    kinds: Vec<String>,
    /// The server's per-session rate (its --rate): hostile sessions send at
    /// 95% of it, as fast as they may.
    #[arg(long, default_value_t = 50.0)]
    allowed_rate: f64,
    /// The server's per-session burst (its --burst): a fresh hostile session
    /// starts with 95% of it at once.
    #[arg(long, default_value_t = 200.0)]
    allowed_burst: f64,
    /// The server's max_note_bytes: the size of the hostile notes.
    #[arg(long, default_value_t = 16 * 1024)]
    max_note_bytes: usize,
    /// Sessions of null-field patch churn (each on its own paper).
    #[arg(long, default_value_t = 2)]
    churn_sessions: usize,
    /// New fields set to null in each churn patch (64 characters each).
    #[arg(long, default_value_t = 225)]
    churn_fields: usize,
    /// Sessions writing max-size notes and patching every field of them.
    #[arg(long, default_value_t = 2)]
    wide_sessions: usize,
    /// Sessions deleting fresh ids (never created, or created and deleted).
    #[arg(long, default_value_t = 2)]
    delete_sessions: usize,
    /// Sessions sending `ping` messages and ping frames.
    #[arg(long, default_value_t = 2)]
    ping_sessions: usize,
    /// Notes of max_note_bytes in the paper the joiners join.
    #[arg(long, default_value_t = 200)]
    large_notes: usize,
    /// Never-reading joiners in each wave.
    #[arg(long, default_value_t = 300)]
    joiners: usize,
    /// Waves of joiners, spread evenly over the window (each held until its end).
    #[arg(long, default_value_t = 4)]
    joiner_waves: usize,
    /// Connections sending an unfinished request head, a byte a second.
    #[arg(long, default_value_t = 200)]
    heads: usize,
    /// Papers of honest members.
    #[arg(long, default_value_t = 4)]
    honest_papers: usize,
    /// Members per honest paper.
    #[arg(long, default_value_t = 5)]
    honest_members: usize,
    /// Members of each honest paper that edit.
    #[arg(long, default_value_t = 2)]
    honest_senders: usize,
    /// Edits a second per honest sender.
    #[arg(long, default_value_t = 2.0)]
    honest_rate: f64,
    /// Size of an honest note's `data`, bytes.
    #[arg(long, default_value_t = 200)]
    honest_note_bytes: usize,
    /// Seconds per row of the timeline.
    #[arg(long, default_value_t = 5.0)]
    interval: f64,
    /// Pass/fail: Redis `PING` p99 under this, ms.
    #[arg(long, default_value_t = 50.0)]
    max_ping_p99_ms: f64,
    /// Pass/fail: honest edit-to-`saved` p99 under this, ms.
    #[arg(long, default_value_t = 250.0)]
    max_saved_p99_ms: f64,
    /// Pass/fail, RSS and Redis used_memory flat over the second half: the
    /// window's last quarter's greatest sample at most this times the third
    /// quarter's, plus --flat-slack-mib.
    #[arg(long, default_value_t = 1.10)]
    flat_ratio: f64,
    /// MiB added to the bound of --flat-ratio.
    #[arg(long, default_value_t = 16.0)]
    flat_slack_mib: f64,
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

/// Source addresses on 127.0.0.0/8, one per kind of client, so that the server
/// sees each kind as another address (per-address caps apply to each alone).
const HONEST_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const JOINER_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const HEAD_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const HOSTILE_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
const PROBE_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);
const GET_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

fn check(args: &AbuseArgs) -> Result<(), String> {
    for k in &args.kinds {
        if !KINDS.contains(&k.as_str()) {
            return Err(format!("--kinds: {k} is not one of {}", KINDS.join(", ")));
        }
    }
    let times = [args.duration, args.drain, args.interval];
    if times.iter().any(|t| !(t.is_finite() && (0.0..=3600.0).contains(t)))
        || args.duration < 1.0
        || args.interval < 0.1
    {
        return Err("--duration is 1 to 3600 s, --drain 0 to 3600 s, --interval at least 0.1 s".into());
    }
    if !(args.allowed_rate > 0.0 && args.allowed_rate <= 10_000.0 && args.allowed_burst >= 1.0) {
        return Err("--allowed-rate is above 0 (at most 10000), --allowed-burst at least 1".into());
    }
    if !(args.honest_rate > 0.0 && args.honest_rate <= 100.0) {
        return Err("--honest-rate is above 0, at most 100".into());
    }
    if args.honest_papers == 0 || args.honest_members == 0 || args.honest_senders > args.honest_members {
        return Err("at least one honest paper and member; --honest-senders at most --honest-members".into());
    }
    let counts = [args.churn_sessions, args.wide_sessions, args.delete_sessions, args.ping_sessions];
    if counts.iter().any(|&n| n > 100) || args.joiners * args.joiner_waves > 20_000 || args.heads > 10_000 {
        return Err("bounded: up to 100 sessions of each sending kind, 20000 joiners, 10000 heads".into());
    }
    if args.large_notes > 100_000 || args.churn_fields == 0 || args.churn_fields > 10_000 {
        return Err("--large-notes up to 100000, --churn-fields 1 to 10000".into());
    }
    if !(args.flat_ratio >= 1.0 && args.flat_slack_mib >= 0.0) {
        return Err("--flat-ratio is at least 1, --flat-slack-mib not negative".into());
    }
    Ok(())
}

/// `host:port` on loopback.
fn loopback(what: &str, text: &str) -> Result<SocketAddr, String> {
    let addr = text
        .to_socket_addrs()
        .map_err(|e| format!("{what} {text}: {e}"))?
        .next()
        .ok_or_else(|| format!("{what} {text} resolves to nothing"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("refusing {what} {text}: not a loopback address"));
    }
    Ok(addr)
}

/// Runs the mode; the exit status as in `main` (3: a threshold was missed).
///
/// # Errors
/// Bad arguments, an address off loopback, a TLS target.
pub fn main(args: &AbuseArgs) -> Result<ExitCode, String> {
    check(args)?;
    let target = crate::target::parse(&args.target)?;
    if !matches!(target.transport, Transport::Plain) {
        return Err("the abuse mode speaks ws:// only".into());
    }
    let redis = loopback("--redis", &args.redis)?;
    let nofile = crate::raise_nofile();
    let waves = 1 + usize::from(args.kinds.iter().any(|k| k == "gets"));
    let sockets =
        args.joiners * args.joiner_waves * waves + args.heads + args.honest_papers * args.honest_members + 200;
    if sockets as u64 > nofile {
        return Err(format!("{sockets} sockets need more open files than the limit of {nofile} (ulimit -n)"));
    }
    let on = |k: &str| args.kinds.iter().any(|x| x == k);
    let run_id = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let prefix = args.paper_prefix.clone().unwrap_or_else(|| format!("abuse{:x}", run_id % (1 << 40)));
    let dial = |source: Ipv4Addr| Dial {
        addr: target.addr,
        host: target.authority.clone(),
        source: target.addr.is_ipv4().then_some(IpAddr::V4(source)),
    };
    let limits = Arc::new(Limits {
        rate: args.allowed_rate,
        burst: args.allowed_burst,
        churn_fields: args.churn_fields,
        max_note_bytes: args.max_note_bytes,
    });
    let say = |line: String| {
        if !args.quiet {
            eprintln!("abuse: {line}");
        }
    };

    // The honest members join first.
    let ledger = Arc::new(honest::Ledger::default());
    let (ready_tx, ready) = mpsc::channel();
    let mut go = Vec::new();
    let mut threads = Vec::new();
    for p in 0..args.honest_papers {
        for m in 0..args.honest_members {
            let member = honest::Member {
                dial: dial(HONEST_SOURCE),
                paper: format!("{prefix}-honest-{p}"),
                user: format!("u{m}"),
                rate: (m < args.honest_senders).then_some(args.honest_rate),
                note_bytes: args.honest_note_bytes,
                seed: run_id ^ ((p * 1000 + m) as u64) << 16,
                offset: Duration::ZERO,
            };
            let (tx, rx) = mpsc::channel();
            go.push(tx);
            let (ready, ledger) = (ready_tx.clone(), ledger.clone());
            threads.push(thread::spawn(move || honest::member(member, ready, rx, &ledger)));
        }
    }
    drop(ready_tx);
    let members = args.honest_papers * args.honest_members;
    let mut joined = 0;
    for _ in 0..members {
        match ready.recv_timeout(Duration::from_secs(60)) {
            Ok(true) => joined += 1,
            Ok(false) => {}
            Err(_) => break,
        }
    }
    say(format!("{joined} of {members} honest members joined"));

    // The large paper, before the window.
    let big = format!("{prefix}-big");
    let mut filled = None;
    if (on("joiners") || on("gets")) && args.joiners > 0 && args.joiner_waves > 0 {
        let deadline = Instant::now() + Duration::from_secs(120);
        let result = hostile::fill(&dial(HOSTILE_SOURCE), &big, args.large_notes, &limits, deadline);
        say(format!("filled {big}: {result:?}"));
        filled = Some(result);
    }

    // Room for the hostile sessions to open before the window.
    let start = Instant::now() + Duration::from_secs(1);
    let end = start + Duration::from_secs_f64(args.duration);
    let drain_end = end + Duration::from_secs_f64(args.drain);
    let window = honest::Window { start, send_end: end, drain_end };
    for tx in go {
        let _ = tx.send(window);
    }

    // The samplers, over the window and the drain.
    let pinger = thread::spawn(move || sample::pings(redis, Duration::from_millis(100), start, drain_end));
    let server = target.addr;
    let probe_source = server.is_ipv4().then_some(IpAddr::V4(PROBE_SOURCE));
    let server_pid = args.server_pid;
    let prober = thread::spawn(move || {
        sample::probes(redis, server, probe_source, server_pid, Duration::from_secs(1), start, drain_end)
    });

    // The hostile clients, over the window.
    let mut tallies: BTreeMap<&'static str, Arc<Tally>> = BTreeMap::new();
    let senders = [
        (Sender::Churn, args.churn_sessions),
        (Sender::Wide, args.wide_sessions),
        (Sender::Deletes, args.delete_sessions),
        (Sender::Pings, args.ping_sessions),
    ];
    for (kind, count) in senders {
        if !on(kind.name()) || count == 0 {
            continue;
        }
        let tally = tallies.entry(kind.name()).or_default().clone();
        for i in 0..count {
            let (d, limits, tally) = (dial(HOSTILE_SOURCE), limits.clone(), tally.clone());
            let paper = format!("{prefix}-{}-{i}", kind.name());
            let span = Span { start, end };
            threads.push(thread::spawn(move || hostile::sender(&d, &paper, kind, i, &limits, span, &tally)));
        }
    }
    let waves = [("joiners", JOINER_SOURCE, Unread::Join), ("gets", GET_SOURCE, Unread::Get)];
    for (kind, source, what) in waves {
        if !on(kind) || !matches!(filled, Some(Ok(_))) {
            continue;
        }
        let tally = tallies.entry(kind).or_default().clone();
        let (d, per_wave, big) = (dial(source), args.joiners, big.clone());
        let every = Duration::from_secs_f64(args.duration / args.joiner_waves as f64);
        let span = Span { start, end };
        threads.push(thread::spawn(move || hostile::unread_waves(&d, &big, what, per_wave, every, span, &tally)));
    }
    if on("heads") && args.heads > 0 {
        let tally = tallies.entry("heads").or_default().clone();
        let (d, count, paper) = (dial(HEAD_SOURCE), args.heads, format!("{prefix}-heads"));
        threads.push(thread::spawn(move || {
            wait_until(start);
            hostile::heads(&d, &paper, count, end, &tally);
        }));
    }

    // Progress, until the drain ends.
    while Instant::now() < drain_end {
        thread::sleep(drain_end.saturating_duration_since(Instant::now()).min(Duration::from_secs(5)));
        let t = start.elapsed().as_secs_f64();
        let sent: u64 = tallies.values().map(|t| t.sent.load(Ordering::Relaxed)).sum();
        let open: Vec<String> =
            tallies.iter().map(|(k, t)| format!("{k} {}", t.open.load(Ordering::Relaxed))).collect();
        say(format!(
            "[{t:5.1} s] hostile sent {sent}, open: {}; honest sent {}, saved {}",
            open.join(", "),
            ledger.sent.load(Ordering::Relaxed),
            ledger.saved.lock().unwrap().len()
        ));
    }
    for t in threads {
        let _ = t.join();
    }
    let pings = pinger.join().unwrap_or_default();
    let probes = prober.join().unwrap_or_default();

    let report = Report::new(args, &pings, &probes, &ledger);
    let missed = report.missed(args);
    let out = json!({
        "target": target.to_string(),
        "redis": redis.to_string(),
        "paper_prefix": prefix,
        "window_seconds": args.duration,
        "drain_seconds": args.drain,
        "kinds": args.kinds,
        "allowed": {"rate": args.allowed_rate, "burst": args.allowed_burst, "max_note_bytes": args.max_note_bytes},
        "honest": {
            "papers": args.honest_papers, "members": args.honest_members, "joined": joined,
            "senders": args.honest_senders, "rate": args.honest_rate,
            "sent": ledger.sent.load(Ordering::Relaxed),
            "received": ledger.received.load(Ordering::Relaxed),
            "events": *ledger.events.lock().unwrap(),
        },
        "large_paper": filled.map(|f| match f {
            Ok(n) => json!({"paper": big, "notes": n}),
            Err(e) => json!({"paper": big, "error": e}),
        }),
        "hostile": tallies.iter().map(|(k, t)| (k.to_string(), t.to_json())).collect::<serde_json::Map<_, _>>(),
        "summary": report.summary(),
        "timeline": report.timeline(args),
        "samples": probes.iter().map(|p| json!({
            "at": round(p.at, 3), "rss_kib": p.rss_kib, "cpu_seconds": p.cpu_seconds, "used_memory": p.used_memory,
            "backlog": p.backlog, "healthz_ms": p.healthz_ms.map(|m| round(m, 3)),
        })).collect::<Vec<_>>(),
        "thresholds": {
            "max_ping_p99_ms": args.max_ping_p99_ms,
            "max_saved_p99_ms": args.max_saved_p99_ms,
            "flat_ratio": args.flat_ratio,
            "flat_slack_mib": args.flat_slack_mib,
            "passed": missed.is_empty(),
            "missed": missed,
        },
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out).expect("JSON"));
    } else {
        println!("{}", serde_json::to_string_pretty(&out["summary"]).expect("JSON"));
    }
    for why in &missed {
        eprintln!("rollingpaper-load: threshold missed: {why}");
    }
    Ok(if joined == 0 {
        ExitCode::from(1)
    } else if !missed.is_empty() {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

fn wait_until(t: Instant) {
    let now = Instant::now();
    if now < t {
        thread::sleep(t - now);
    }
}

/// The `q` quantile (nearest rank) of `values`, sorted in place.
fn quantile(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1])
}

pub(crate) fn quantiles(mut values: Vec<f64>) -> Value {
    let n = values.len();
    let p50 = quantile(&mut values, 0.5);
    let p99 = quantile(&mut values, 0.99);
    let max = values.last().copied();
    json!({"n": n, "p50": p50.map(|v| round(v, 3)), "p99": p99.map(|v| round(v, 3)), "max": max.map(|v| round(v, 3))})
}

/// Flatness of one series over the second half of the window.
struct Flat {
    q3_max: Option<f64>,
    q4_max: Option<f64>,
    bound: Option<f64>,
    flat: bool,
}

impl Flat {
    /// `series`: (seconds from the start, value in MiB) over the window.
    fn of(series: &[(f64, Option<f64>)], window: f64, ratio: f64, slack: f64) -> Flat {
        let max_in = |lo: f64, hi: f64| {
            series.iter().filter(|(t, _)| *t >= lo && *t < hi).filter_map(|(_, v)| *v).reduce(f64::max)
        };
        let q3_max = max_in(window * 0.5, window * 0.75);
        let q4_max = max_in(window * 0.75, window + 1e-9);
        let bound = q3_max.map(|m| m * ratio + slack);
        let flat = matches!((q4_max, bound), (Some(q4), Some(b)) if q4 <= b);
        Flat { q3_max, q4_max, bound, flat }
    }

    fn to_json(&self) -> Value {
        let r = |v: Option<f64>| v.map(|v| round(v, 1));
        json!({"q3_max_mib": r(self.q3_max), "q4_max_mib": r(self.q4_max), "bound_mib": r(self.bound), "flat": self.flat})
    }
}

/// What the samples say, over the window and per interval.
struct Report<'a> {
    window: f64,
    pings: &'a [sample::Ping],
    probes: &'a [sample::Probe],
    saved: Vec<(f64, f64)>,
    unsaved: Vec<(f64, f64)>,
    rss: Flat,
    used: Flat,
}

const MIB: f64 = 1024.0 * 1024.0;

impl<'a> Report<'a> {
    fn new(args: &AbuseArgs, pings: &'a [sample::Ping], probes: &'a [sample::Probe], ledger: &honest::Ledger) -> Self {
        let window = args.duration;
        let in_window: Vec<&sample::Probe> = probes.iter().filter(|p| p.at <= window).collect();
        let rss: Vec<(f64, Option<f64>)> =
            in_window.iter().map(|p| (p.at, p.rss_kib.map(|k| k as f64 / 1024.0))).collect();
        let used: Vec<(f64, Option<f64>)> =
            in_window.iter().map(|p| (p.at, p.used_memory.map(|b| b as f64 / MIB))).collect();
        Report {
            window,
            pings,
            probes,
            saved: ledger.saved.lock().unwrap().clone(),
            unsaved: ledger.unsaved.lock().unwrap().clone(),
            rss: Flat::of(&rss, window, args.flat_ratio, args.flat_slack_mib),
            used: Flat::of(&used, window, args.flat_ratio, args.flat_slack_mib),
        }
    }

    fn ping_ms(&self, lo: f64, hi: f64) -> Vec<f64> {
        self.pings.iter().filter(|p| p.at >= lo && p.at < hi).map(|p| p.ms).collect()
    }

    /// Every honest edit's latency (an unconfirmed one: what it waited).
    fn saved_ms(&self) -> Vec<f64> {
        self.saved.iter().chain(&self.unsaved).map(|(_, ms)| *ms).collect()
    }

    fn summary(&self) -> Value {
        let pings: Vec<&sample::Ping> = self.pings.iter().filter(|p| p.at < self.window).collect();
        let in_window = |p: &&sample::Probe| p.at <= self.window;
        let backlog_max: BTreeMap<String, f64> =
            self.probes.iter().filter(in_window).flat_map(|p| p.backlog.iter()).fold(
                BTreeMap::new(),
                |mut m, (k, v)| {
                    let e = m.entry(k.clone()).or_insert(*v);
                    *e = e.max(*v);
                    m
                },
            );
        let health: Vec<f64> = self.probes.iter().filter(in_window).filter_map(|p| p.healthz_ms).collect();
        let health_failed = self.probes.iter().filter(in_window).filter(|p| p.healthz_ms.is_none()).count();
        json!({
            "redis_ping_ms": quantiles(self.ping_ms(0.0, self.window)),
            "redis_ping_failed": pings.iter().filter(|p| !p.ok).count(),
            "redis_ping_busy": pings.iter().filter(|p| p.busy).count(),
            "saved_ms": quantiles(self.saved_ms()),
            "honest_edits": self.saved.len() + self.unsaved.len(),
            "honest_unsaved": self.unsaved.len(),
            "server_rss": self.rss.to_json(),
            "redis_used_memory": self.used.to_json(),
            "used_memory_unread": self.probes.iter().filter(in_window).filter(|p| p.used_memory.is_none()).count(),
            "backlog_max": backlog_max,
            "healthz_ms": quantiles(health),
            "healthz_failed": health_failed,
        })
    }

    /// One row per `--interval`, over the window and the drain.
    fn timeline(&self, args: &AbuseArgs) -> Vec<Value> {
        let end = args.duration + args.drain;
        let mut rows = Vec::new();
        let mut lo = 0.0;
        while lo < end - 1e-9 {
            // A row never straddles the end of the window.
            let hi = (lo + args.interval).min(if lo < args.duration { args.duration } else { end });
            let probes: Vec<&sample::Probe> = self.probes.iter().filter(|p| p.at >= lo && p.at < hi).collect();
            let max = |f: &dyn Fn(&sample::Probe) -> Option<f64>| probes.iter().filter_map(|p| f(p)).reduce(f64::max);
            let saved: Vec<f64> = self.saved.iter().filter(|(t, _)| *t >= lo && *t < hi).map(|(_, ms)| *ms).collect();
            let unsaved = self.unsaved.iter().filter(|(t, _)| *t >= lo && *t < hi).count();
            let pings = self.ping_ms(lo, hi);
            // The server's CPU over the row: from the last sample at or before
            // its start to the last at or before its end.
            let cpu = |p: &sample::Probe| Some((p.at, p.cpu_seconds?));
            let first = self.probes.iter().filter(|p| p.at <= lo + 1e-9).filter_map(cpu).next_back();
            let last = self.probes.iter().filter(|p| p.at <= hi + 1e-9).filter_map(cpu).next_back();
            let cores = match (first, last) {
                (Some(a), Some(b)) if b.0 > a.0 => Some(round((b.1 - a.1) / (b.0 - a.0), 2)),
                _ => None,
            };
            let failed = self.pings.iter().filter(|p| p.at >= lo && p.at < hi && !p.ok).count();
            let busy = self.pings.iter().filter(|p| p.at >= lo && p.at < hi && p.busy).count();
            rows.push(json!({
                "from": round(lo, 1),
                "to": round(hi, 1),
                "phase": if lo < args.duration { "window" } else { "drain" },
                "redis_ping_ms": quantiles(pings),
                "redis_ping_failed": failed,
                "redis_ping_busy": busy,
                "saved_ms": quantiles(saved),
                "unsaved_sent": unsaved,
                "server_cpu_cores": cores,
                "server_rss_mib": max(&|p| p.rss_kib.map(|k| k as f64 / 1024.0)).map(|v| round(v, 1)),
                "redis_used_memory_mib": max(&|p| p.used_memory.map(|b| b as f64 / MIB)).map(|v| round(v, 1)),
                "backlog": max(&|p| p.backlog.get("rollingpaper_backlog").copied()),
                "backlog_bytes": max(&|p| p.backlog.get("rollingpaper_backlog_bytes").copied()),
                "healthz_ms": max(&|p| p.healthz_ms).map(|v| round(v, 1)),
            }));
            lo = hi;
        }
        rows
    }

    fn missed(&self, args: &AbuseArgs) -> Vec<String> {
        let mut missed = Vec::new();
        match quantile(&mut self.ping_ms(0.0, self.window), 0.99) {
            Some(p99) if p99 < args.max_ping_p99_ms => {}
            Some(p99) => missed.push(format!("Redis PING p99 {p99:.1} ms, not under {} ms", args.max_ping_p99_ms)),
            None => missed.push("no Redis PING sample".into()),
        }
        match quantile(&mut self.saved_ms(), 0.99) {
            Some(p99) if p99 < args.max_saved_p99_ms => {}
            Some(p99) => missed.push(format!(
                "honest edit-to-saved p99 {p99:.1} ms, not under {} ms ({} of {} edits never saved)",
                args.max_saved_p99_ms,
                self.unsaved.len(),
                self.saved.len() + self.unsaved.len()
            )),
            None => missed.push("no honest edit was sent".into()),
        }
        for (name, flat) in [("server RSS", &self.rss), ("Redis used_memory", &self.used)] {
            if !flat.flat {
                let mib = |v: Option<f64>| v.map_or("no sample".to_string(), |v| format!("{v:.1} MiB"));
                missed.push(format!(
                    "{name} not flat over the second half: last quarter's max {}, third quarter's max {} (bound {})",
                    mib(flat.q4_max),
                    mib(flat.q3_max),
                    mib(flat.bound)
                ));
            }
        }
        missed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.99), Some(99.0));
        assert_eq!(quantile(&mut v, 0.5), Some(50.0));
        assert_eq!(quantile(&mut [7.0], 0.99), Some(7.0));
        assert_eq!(quantile(&mut [], 0.99), None);
    }

    #[test]
    fn flat_compares_the_last_quarter_with_the_third() {
        let series = |f: &dyn Fn(f64) -> f64| (0..60).map(|t| (t as f64, Some(f(t as f64)))).collect::<Vec<_>>();
        assert!(Flat::of(&series(&|_| 100.0), 60.0, 1.1, 16.0).flat);
        // Growing 1 MiB a second: the last quarter ends 14 MiB above the third's max.
        assert!(Flat::of(&series(&|t| 100.0 + t), 60.0, 1.1, 4.0).flat);
        assert!(!Flat::of(&series(&|t| 100.0 + 10.0 * t), 60.0, 1.1, 16.0).flat);
        let missing: Vec<(f64, Option<f64>)> = (0..60).map(|t| (t as f64, (t < 40).then_some(1.0))).collect();
        assert!(!Flat::of(&missing, 60.0, 1.1, 16.0).flat);
    }
}
