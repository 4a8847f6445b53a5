//! rollingpaper-load: a load generator that speaks PROTOCOL.md only, so it can
//! drive any server that does. Opens papers x members over loopback with bounded
//! handshake concurrency, lets some members of each paper send `upsert`s on a
//! schedule (open loop), and measures every member's receipts: how many arrive
//! and how late. Speaks `ws://`, or `wss://` through a TLS terminator. Every
//! phase is bounded in time; targets outside loopback are refused.

mod abuse;
mod api;
mod reconnect;
mod report;
mod stream;
mod target;
mod tls;
mod wire;
mod worker;

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use serde_json::json;

use report::{CpuSample, StepResult, Watched};
use target::Target;
use worker::{Command, Progress, Report, Setup, StepPlan, StepReport, Worker};

/// Load generator for rollingpaper (PROTOCOL.md), over ws:// or wss://.
/// Loopback targets only.
///
/// Exit status: 0 the run passed its thresholds (none by default), 1 no
/// connection succeeded or a server's TLS certificate was refused, 2 bad
/// arguments, 3 a threshold was missed.
#[derive(Parser, Debug)]
#[command(name = "rollingpaper-load", version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Server address: host:port, ws://host[:port] or wss://host[:port] (TLS,
    /// for instance through nginx; the certificate must name the host, and an
    /// IP address needs an IP SAN). On loopback only: 127.0.0.0/8, [::1] or a
    /// name resolving there. Several (comma-separated or repeated): connections
    /// go round-robin, so each paper's members are split across the nodes (a
    /// relay benchmark of `--cluster` nodes).
    #[arg(long, default_value = "127.0.0.1:8080", value_delimiter = ',')]
    target: Vec<String>,
    #[command(flatten)]
    tls: tls::TlsArgs,
    /// Papers to open.
    #[arg(long, default_value_t = 10)]
    papers: usize,
    /// Members (connections) per paper.
    #[arg(long, default_value_t = 10)]
    members: usize,
    /// Members per paper that send `upsert`s (0: idle connections only).
    #[arg(long, default_value_t = 2)]
    senders: usize,
    /// Messages per second per sender (the first step's rate in a sweep).
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    /// Size of each note's `data`, compact JSON bytes.
    #[arg(long, default_value_t = 200)]
    note_bytes: usize,
    /// Distinct notes the senders of a paper write (at least one per sender);
    /// filled before the first step.
    #[arg(long, default_value_t = 0)]
    notes: usize,
    /// Seconds of sending before the measured window.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to wait for late receipts after the window at most.
    #[arg(long, default_value_t = 3.0)]
    drain: f64,
    /// Upgrades in progress at once, over all threads.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Seconds one connection may take to get its snapshot.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Seconds the whole connect phase may take.
    #[arg(long, default_value_t = 180.0)]
    connect_deadline: f64,
    /// Generator threads (each owns whole papers).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// The server's pid: its CPU and RSS are read from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Another process to measure over the same windows, as NAME=PID
    /// (repeatable; e.g. redis=1234 or node-b=5678): its CPU seconds over each
    /// measured window and its RSS at the end, reported under `watched`.
    #[arg(long, value_name = "NAME=PID", value_parser = parse_watch)]
    watch_pid: Vec<(String, u32)>,
    /// Raise the rate step by step on the same connections until fewer than 99%
    /// of deliveries arrive or p99 passes --p99-bound-ms.
    #[arg(long)]
    sweep: bool,
    /// Factor between sweep steps.
    #[arg(long, default_value_t = 1.5)]
    sweep_factor: f64,
    /// Sweep steps at most.
    #[arg(long, default_value_t = 12)]
    sweep_steps: usize,
    /// p99 latency bound of a good sweep step, ms.
    #[arg(long, default_value_t = 50.0)]
    p99_bound_ms: f64,
    /// Prefix of the paper ids (default: one unique to this run).
    #[arg(long)]
    paper_prefix: Option<String>,
    /// Pass/fail: the least share of deliveries that must arrive (0 to 1, e.g.
    /// 0.999) in the result (the last step, or a sweep's last good one); below it,
    /// exit 3.
    #[arg(long)]
    min_delivered: Option<f64>,
    /// Pass/fail: the greatest p99 latency allowed in the result, ms; over it, exit 3.
    #[arg(long)]
    max_p99_ms: Option<f64>,
    /// Sign a token per member with this HS256 secret (the server's --jwt-secret),
    /// so that runs work with auth on. Each member's `sub` is its user id.
    #[arg(long, env = "LOAD_TOKEN_SECRET", hide_env_values = true)]
    token_secret: Option<String>,
    /// Role in the minted tokens: writer or owner (senders need to write).
    #[arg(long, default_value = "writer", value_parser = ["writer", "owner"])]
    token_role: String,
    /// `aud` of the minted tokens (the server's --jwt-audience).
    #[arg(long)]
    token_audience: Option<String>,
    /// Print the report as JSON on standard output.
    #[arg(long)]
    json: bool,
    /// No progress line on standard error.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Subcommand, Debug)]
enum Mode {
    /// Sessions reconnecting after a graceful server restart, with `since` or
    /// without (rollingpaper-load reconnect --help).
    Reconnect(reconnect::ReconnectArgs),
    /// Hostile clients within every limit against one node while honest
    /// clients edit other papers: Redis PING latency, edit-to-saved latency,
    /// RSS, backlog and Redis memory over time, with pass/fail thresholds
    /// (exit 3 when one is missed).
    Abuse(abuse::AbuseArgs),
    /// Backend API writes (PUT of notes, one connection per request) against
    /// one node while members edit the same papers over WebSocket: API writes
    /// per second and their latency, side by side with the members'
    /// edit-to-saved latency (rollingpaper-load api --help).
    Api(api::ApiArgs),
}

/// Mints the members' tokens, as the main backend would.
pub struct Tokens {
    key: jsonwebtoken::EncodingKey,
    role: String,
    audience: Option<String>,
    /// Expiry of every token: after the whole run, so no session is closed with 1008.
    exp: u64,
}

impl Tokens {
    pub fn mint(&self, user: &str, paper: &str) -> String {
        let mut claims = json!({"sub": user, "paper": paper, "role": self.role, "exp": self.exp, "name": user});
        if let Some(aud) = &self.audience {
            claims["aud"] = json!(aud);
        }
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &self.key).expect("HS256 signs any claims")
    }
}

/// The run's verdict against `--min-delivered` and `--max-p99-ms`: what was missed.
fn missed_thresholds(args: &Args, result: Option<&StepResult>) -> Vec<String> {
    let mut missed = Vec::new();
    if args.min_delivered.is_none() && args.max_p99_ms.is_none() {
        return missed;
    }
    let Some(result) = result else {
        missed.push("no step completed, so nothing can pass".to_string());
        return missed;
    };
    if let Some(min) = args.min_delivered {
        if result.ratio() < min {
            missed.push(format!("delivered {:.4} of deliveries, below --min-delivered {min}", result.ratio()));
        }
    }
    if let Some(max) = args.max_p99_ms {
        if result.p99_ms() > max {
            missed.push(format!("p99 {:.3} ms, over --max-p99-ms {max}", result.p99_ms()));
        }
    }
    missed
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match &args.mode {
        Some(Mode::Reconnect(mode)) => reconnect::main(mode),
        Some(Mode::Abuse(mode)) => abuse::main(mode),
        Some(Mode::Api(mode)) => api::main(mode),
        None => run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rollingpaper-load: {e}");
            ExitCode::from(2)
        }
    }
}

/// One `--watch-pid NAME=PID`.
fn parse_watch(arg: &str) -> Result<(String, u32), String> {
    let (name, pid) = arg.split_once('=').ok_or("expected NAME=PID, e.g. redis=1234")?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(format!("{name:?}: a name is letters, digits, '-', '_' or '.'"));
    }
    let pid = pid.parse().map_err(|_| format!("{pid:?} is not a process id"))?;
    Ok((name.to_string(), pid))
}

fn check(args: &Args) -> Result<(), String> {
    let positive = [("--rate", args.rate), ("--duration", args.duration), ("--sweep-factor", args.sweep_factor - 1.0)];
    if let Some((name, _)) = positive.iter().find(|(_, v)| !(v.is_finite() && *v > 0.0)) {
        return Err(format!("{name} must be positive (--sweep-factor above 1)"));
    }
    if [args.warmup, args.drain, args.connect_timeout, args.connect_deadline]
        .iter()
        .any(|v| !(v.is_finite() && *v >= 0.0))
    {
        return Err("times must be finite and not negative".into());
    }
    if args.papers == 0 || args.members == 0 || args.threads == 0 || args.connect_concurrency == 0 {
        return Err("--papers, --members, --threads and --connect-concurrency must be at least 1".into());
    }
    if args.senders > args.members {
        return Err("--senders cannot exceed --members".into());
    }
    if args.rate > 100_000.0 || args.duration > 3600.0 || args.warmup > 600.0 || args.drain > 600.0 {
        return Err("a run is bounded: --rate up to 100000, --duration 3600 s, --warmup and --drain 600 s".into());
    }
    if args.sweep_steps == 0 || args.sweep_steps > 50 {
        return Err("--sweep-steps must be 1 to 50".into());
    }
    if args.min_delivered.is_some_and(|m| !(0.0..=1.0).contains(&m)) {
        return Err("--min-delivered is a share between 0 and 1, for example 0.999".into());
    }
    if args.max_p99_ms.is_some_and(|m| !(m.is_finite() && m > 0.0)) {
        return Err("--max-p99-ms must be above 0, for example 50".into());
    }
    if args.token_secret.as_deref().is_some_and(str::is_empty) {
        return Err("--token-secret is empty; give the server's --jwt-secret".into());
    }
    Ok(())
}

/// Raises the open-file limit to its hard limit; returns the limit in force.
fn raise_nofile() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

fn run(args: &Args) -> Result<ExitCode, String> {
    check(args)?;
    let targets: Vec<Target> = args.target.iter().map(|t| target::parse(t)).collect::<Result<_, _>>()?;
    let tls = tls::client_config(targets.iter().any(Target::is_tls), &args.tls)?;
    let target = &targets[0];
    let connections = args.papers * args.members;
    let nofile = raise_nofile();
    if connections as u64 + 64 > nofile {
        return Err(format!(
            "{connections} connections need more open files than the limit of {nofile} (ulimit -n): \
             lower --papers or --members, or raise the hard limit"
        ));
    }
    let server_pid = args.server_pid.map(|p| p.to_string());
    let server_pid = server_pid.as_deref();
    let notes = args.notes.max(args.senders);
    let run_id = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let prefix = args.paper_prefix.clone().unwrap_or_else(|| format!("load{:x}", run_id % (1 << 40)));
    // More source addresses than one on IPv4 loopback: TIME_WAIT from a previous
    // run does not exhaust a single ephemeral port range.
    let sources: Vec<IpAddr> = match target.addr.ip() {
        IpAddr::V4(_) if connections > 5_000 => (1..=8).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i))).collect(),
        _ => Vec::new(),
    };

    let run_seconds = args.connect_deadline
        + args.warmup
        + args.duration * if args.sweep { args.sweep_steps as f64 } else { 1.0 }
        + args.drain * 2.0
        + 600.0;
    let tokens = args.token_secret.as_ref().map(|secret| Tokens {
        key: jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        role: args.token_role.clone(),
        audience: args.token_audience.clone(),
        exp: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) + run_seconds as u64,
    });
    let tokens = tokens.map(Arc::new);

    let base = Instant::now();
    let connect_deadline = base + Duration::from_secs_f64(args.connect_deadline);
    let threads = args.threads.min(args.papers);
    let progress: Vec<Arc<Progress>> = (0..threads).map(|_| Arc::new(Progress::default())).collect();
    let (report_tx, reports) = mpsc::channel();
    let mut commands = Vec::new();
    let mut handles = Vec::new();
    let rss_before = server_pid.and_then(report::rss_kib);
    for (t, progress) in progress.iter().enumerate() {
        let papers = (0..args.papers).filter(|p| p % threads == t).map(|p| format!("{prefix}-{p}")).collect();
        let setup = Setup {
            papers,
            members: args.members,
            senders: args.senders,
            notes,
            note_bytes: args.note_bytes,
            targets: targets.clone(),
            tls: tls.clone(),
            tokens: tokens.clone(),
            sources: sources.clone(),
            concurrency: (args.connect_concurrency / threads).max(1),
            connect_timeout: Duration::from_secs_f64(args.connect_timeout),
            connect_deadline,
            base,
            progress: progress.clone(),
            seed: run_id ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        };
        let (tx, rx) = mpsc::channel();
        let worker = Worker::new(setup, rx, report_tx.clone()).map_err(|e| format!("poll: {e}"))?;
        commands.push(tx);
        handles.push(std::thread::Builder::new().name(format!("load-{t}")).spawn(move || worker.run()).unwrap());
    }
    drop(report_tx);
    let show = Show { quiet: args.quiet, tty: std::io::stderr().is_terminal(), progress: &progress, base };

    // Connect.
    let (mut ok, mut failed, mut first_error) = (0u64, 0u64, None::<String>);
    let mut certificate_refused = None::<String>;
    let mut waiting = threads;
    let until = connect_deadline + Duration::from_secs(5);
    while waiting > 0 {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            first_error.get_or_insert_with(|| "a generator thread did not finish connecting".into());
            break;
        }
        match reports.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(Report::Connected { ok: o, failed: f, first_error: e, certificate_refused: c }) => {
                ok += o;
                failed += f;
                if first_error.is_none() {
                    first_error = e;
                }
                if certificate_refused.is_none() {
                    certificate_refused = c;
                }
                waiting -= 1;
            }
            Ok(Report::Step(_)) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => show.line(&format!("connecting: {connections} planned")),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let connect_seconds = base.elapsed().as_secs_f64();
    show.done();
    let rss_connected = server_pid.and_then(report::rss_kib);
    if !args.quiet {
        eprintln!("connected {ok} of {connections} in {connect_seconds:.1} s, {failed} failed");
    }

    let mut steps: Vec<StepResult> = Vec::new();
    let mut stopped = None;
    // A refused certificate is a setup error, not a measurement: no step runs.
    let measure = ok > 0 && waiting == 0 && certificate_refused.is_none();
    if measure && args.senders > 0 {
        // Fill the paper to --notes first: each sender writes its share once, slowly
        // enough for a per-session rate limit (PROTOCOL.md 3.3: 50/s, bursts of 200).
        let per_sender = notes.div_ceil(args.senders);
        if per_sender > 1 {
            let fill_rate = 40.0;
            let fill = per_sender as f64 / fill_rate;
            run_step(&commands, &reports, &show, server_pid, &args.watch_pid, base, fill_rate, 0.0, fill, 0.0, 1.0, 0);
        }
        let mut rate = args.rate;
        let count = if args.sweep { args.sweep_steps } else { 1 };
        for i in 0..count {
            let planned = (rate * args.duration) as u64;
            let step = run_step(
                &commands,
                &reports,
                &show,
                server_pid,
                &args.watch_pid,
                base,
                rate,
                args.warmup,
                0.0,
                args.duration,
                args.drain,
                planned,
            );
            let Some(step) = step else {
                stopped = Some("a generator thread did not report in time".to_string());
                break;
            };
            if !args.quiet {
                eprintln!("step {} at {rate:.1}/s:\n{}", i + 1, step.summary());
            }
            let bad = if step.ratio() < 0.99 {
                Some(format!("{:.2}% of deliveries arrived at {rate:.1}/s", step.ratio() * 100.0))
            } else if step.p99_ms() > args.p99_bound_ms {
                Some(format!("p99 {:.1} ms over {} ms at {rate:.1}/s", step.p99_ms(), args.p99_bound_ms))
            } else {
                None
            };
            steps.push(step);
            if args.sweep {
                if let Some(bad) = bad {
                    stopped = Some(bad);
                    break;
                }
            }
            rate *= args.sweep_factor;
        }
    } else if measure {
        // Idle connections: hold them for the window, measure the server meanwhile.
        let step = run_step(
            &commands,
            &reports,
            &show,
            server_pid,
            &args.watch_pid,
            base,
            1.0,
            0.0,
            0.0,
            args.duration,
            0.0,
            0,
        );
        steps.extend(step);
    }

    for tx in &commands {
        let _ = tx.send(Command::Close);
    }
    for handle in handles {
        let _ = handle.join();
    }

    let last_good = if args.sweep {
        let good: Vec<&StepResult> =
            steps.iter().filter(|s| s.ratio() >= 0.99 && s.p99_ms() <= args.p99_bound_ms).collect();
        good.last().copied()
    } else {
        steps.last()
    };
    let missed = missed_thresholds(args, last_good);
    let per_conn = match (rss_before, rss_connected) {
        (Some(b), Some(a)) if ok > 0 => Some(report::round(a.saturating_sub(b) as f64 / ok as f64, 3)),
        _ => None,
    };
    let out = json!({
        "target": targets.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        "papers": args.papers,
        "members": args.members,
        "senders": args.senders,
        "note_bytes": args.note_bytes,
        "notes": notes,
        "connections": {
            "planned": connections,
            "ok": ok,
            "failed": failed,
            "first_error": first_error,
            "certificate_refused": certificate_refused,
            "seconds": report::round(connect_seconds, 3),
        },
        "server_rss_kib_before": rss_before,
        "server_rss_kib_connected": rss_connected,
        "server_rss_kib_per_connection": per_conn,
        "steps": steps.iter().map(StepResult::to_json).collect::<Vec<_>>(),
        "result": last_good.map(StepResult::to_json),
        "sweep": args.sweep.then(|| json!({
            "last_good_rate": last_good.map(|s| s.rate),
            "stopped_because": stopped,
        })),
        "thresholds": {
            "min_delivered": args.min_delivered,
            "max_p99_ms": args.max_p99_ms,
            "passed": missed.is_empty(),
            "missed": missed,
        },
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out).expect("JSON"));
    } else {
        println!(
            "target {}: {} papers x {} members, {} senders each, {} B notes",
            args.target.join(","),
            args.papers,
            args.members,
            args.senders,
            args.note_bytes
        );
        println!("connections: {ok} ok, {failed} failed of {connections} in {connect_seconds:.1} s");
        if let Some(e) = &first_error {
            println!("  first error: {e}");
        }
        if let (Some(b), Some(a)) = (rss_before, rss_connected) {
            println!("server RSS {b} KiB before, {a} KiB connected ({} KiB per connection)", per_conn.unwrap_or(0.0));
        }
        match (args.sweep, last_good) {
            (true, Some(step)) => println!("sustained (last good step):\n{}", step.summary()),
            (true, None) => println!("no sweep step was good"),
            (false, Some(step)) => println!("result:\n{}", step.summary()),
            (false, None) => println!("no step ran"),
        }
        if let Some(why) = &stopped {
            println!("sweep stopped: {why}");
        }
    }
    if let Some(why) = &certificate_refused {
        eprintln!("rollingpaper-load: {why}");
    }
    for why in &missed {
        eprintln!("rollingpaper-load: threshold missed: {why}");
    }
    Ok(if ok == 0 || certificate_refused.is_some() {
        ExitCode::from(1)
    } else if !missed.is_empty() {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs one step on every thread and sums it up; `None` when a thread did not
/// report within the step's time plus a margin.
#[allow(clippy::too_many_arguments)]
fn run_step(
    commands: &[mpsc::Sender<Command>],
    reports: &mpsc::Receiver<Report>,
    show: &Show,
    server_pid: Option<&str>,
    watch: &[(String, u32)],
    base: Instant,
    rate: f64,
    warmup: f64,
    fill: f64,
    duration: f64,
    drain: f64,
    planned_per_sender: u64,
) -> Option<StepResult> {
    let us = |s: f64| (s * 1e6) as u64;
    let start = base.elapsed().as_micros() as u64 + 50_000;
    let measure_start = start + us(warmup + fill);
    let plan = StepPlan {
        rate,
        start_us: start,
        measure_start_us: measure_start,
        measure_end_us: measure_start + us(duration),
        drain_end_us: measure_start + us(duration + drain),
    };
    for tx in commands {
        let _ = tx.send(Command::Step(plan));
    }
    let at = |t_us: u64| base + Duration::from_micros(t_us);
    show.wait_until(at(plan.measure_start_us), "warm-up");
    let first = CpuSample::take(server_pid, watch);
    show.wait_until(at(plan.measure_end_us), "measuring");
    let last = CpuSample::take(server_pid, watch);
    let rss = server_pid.and_then(report::rss_kib);
    let mut totals = StepReport::new();
    let mut waiting = commands.len();
    let until = at(plan.drain_end_us) + Duration::from_secs(10);
    while waiting > 0 {
        let left = until.saturating_duration_since(Instant::now());
        match reports.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(Report::Step(r)) => {
                totals.add(&r);
                waiting -= 1;
            }
            Ok(Report::Connected { .. }) => {}
            Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => show.line("draining"),
            Err(_) => {
                show.done();
                return None;
            }
        }
    }
    show.done();
    let window = last.at.duration_since(first.at).as_secs_f64().max(1e-3);
    let diff = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
    Some(StepResult {
        rate,
        duration,
        planned: planned_per_sender * totals.senders,
        tool_cpu: diff(first.tool, last.tool),
        server_cpu: diff(first.server, last.server),
        server_rss_kib: rss,
        watched: watch
            .iter()
            .zip(first.watched.iter().zip(&last.watched))
            .map(|((name, pid), (a, b))| Watched {
                name: name.clone(),
                pid: *pid,
                cpu: diff(*a, *b),
                rss_kib: report::rss_kib(&pid.to_string()),
            })
            .collect(),
        window,
        totals,
    })
}

/// The progress line on standard error.
struct Show<'a> {
    quiet: bool,
    tty: bool,
    progress: &'a [Arc<Progress>],
    base: Instant,
}

impl Show<'_> {
    fn line(&self, phase: &str) {
        if self.quiet {
            return;
        }
        let sum = |f: fn(&Progress) -> u64| self.progress.iter().map(|p| f(p)).sum::<u64>();
        let text = format!(
            "[{:6.1} s] {phase}: {} open, {} failed, {} sent, {} received",
            self.base.elapsed().as_secs_f64(),
            sum(|p| p.opened.load(Ordering::Relaxed)),
            sum(|p| p.failed.load(Ordering::Relaxed)),
            sum(|p| p.sent.load(Ordering::Relaxed)),
            sum(|p| p.received.load(Ordering::Relaxed)),
        );
        if self.tty {
            eprint!("\r{text}\x1b[K");
        } else {
            eprintln!("{text}");
        }
    }

    fn done(&self) {
        if !self.quiet && self.tty {
            eprintln!();
        }
    }

    /// Sleeps until `when`, showing progress every second (or every 5 s off a terminal).
    fn wait_until(&self, when: Instant, phase: &str) {
        let every = if self.tty { Duration::from_secs(1) } else { Duration::from_secs(5) };
        loop {
            let left = when.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(every));
            if !Instant::now().ge(&when) {
                self.line(phase);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watched_processes_are_name_equals_pid() {
        assert_eq!(parse_watch("shard-1=42"), Ok(("shard-1".to_string(), 42)));
        for bad in ["42", "=42", "redis=", "redis=x", "a b=1", "redis=-1"] {
            assert!(parse_watch(bad).is_err(), "{bad}");
        }
    }
}
