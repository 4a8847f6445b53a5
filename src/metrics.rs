//! Counters, gauges and histograms, and their Prometheus text exposition. Each
//! event loop owns its counters (only its thread writes them, so an update is a
//! plain load and store, no locked instruction); a scrape sums them on whichever
//! loop answers `/metrics`. The store's threads own theirs the same way, and the
//! process's own figures are read from `/proc` at the scrape.

mod process;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::protocol::{ClientMsg, CloseReason, ErrorCode};

/// Adds to a counter that only the calling thread writes.
pub fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Upper bounds of every duration histogram: nanoseconds, and the `le` label.
/// One set for all, from a loop turn (tens of microseconds) to a write behind a
/// Redis outage (seconds).
const BOUNDS: [(u64, &str); 18] = [
    (50_000, "0.00005"),
    (100_000, "0.0001"),
    (250_000, "0.00025"),
    (500_000, "0.0005"),
    (1_000_000, "0.001"),
    (2_500_000, "0.0025"),
    (5_000_000, "0.005"),
    (10_000_000, "0.01"),
    (25_000_000, "0.025"),
    (50_000_000, "0.05"),
    (100_000_000, "0.1"),
    (250_000_000, "0.25"),
    (500_000_000, "0.5"),
    (1_000_000_000, "1"),
    (2_500_000_000, "2.5"),
    (5_000_000_000, "5"),
    (10_000_000_000, "10"),
    (30_000_000_000, "30"),
];

/// A histogram of durations with fixed buckets, written by one thread: an
/// observation is two plain stores (its own bucket and the sum), no lock, no
/// allocation. The scrape adds the buckets up into Prometheus's cumulative ones.
#[derive(Default)]
pub struct Histogram {
    /// Per bucket, not cumulative; the last is past every bound (`+Inf`).
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, duration: Duration) {
        let ns = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BOUNDS.partition_point(|&(bound, _)| bound < ns);
        bump(&self.buckets[bucket], 1);
        bump(&self.sum_ns, ns);
    }
}

/// Client messages, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum In {
    Upsert,
    Delete,
    Cursor,
    Complete,
    Ping,
    Meta,
    Patch,
    /// Refused before its type was known to be valid.
    Invalid,
}

impl In {
    const ALL: [In; 8] = [In::Upsert, In::Delete, In::Cursor, In::Complete, In::Ping, In::Meta, In::Patch, In::Invalid];

    pub fn of(msg: &ClientMsg) -> In {
        match msg {
            ClientMsg::Upsert { .. } => In::Upsert,
            ClientMsg::Delete { .. } => In::Delete,
            ClientMsg::Cursor { .. } => In::Cursor,
            ClientMsg::Complete { .. } => In::Complete,
            ClientMsg::Meta { .. } => In::Meta,
            ClientMsg::Patch { .. } => In::Patch,
            ClientMsg::Ping => In::Ping,
        }
    }

    fn name(self) -> &'static str {
        match self {
            In::Upsert => "upsert",
            In::Delete => "delete",
            In::Cursor => "cursor",
            In::Complete => "complete",
            In::Ping => "ping",
            In::Meta => "meta",
            In::Patch => "patch",
            In::Invalid => "invalid",
        }
    }
}

/// Server messages, as counted (one per recipient).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    Snapshot,
    Upsert,
    Delete,
    Cursor,
    Join,
    Leave,
    Completed,
    Saved,
    Pong,
    Error,
    Meta,
    Patch,
}

impl Out {
    const ALL: [Out; 12] = [
        Out::Snapshot,
        Out::Upsert,
        Out::Delete,
        Out::Cursor,
        Out::Join,
        Out::Leave,
        Out::Completed,
        Out::Saved,
        Out::Pong,
        Out::Error,
        Out::Meta,
        Out::Patch,
    ];

    fn name(self) -> &'static str {
        match self {
            Out::Snapshot => "snapshot",
            Out::Upsert => "upsert",
            Out::Delete => "delete",
            Out::Cursor => "cursor",
            Out::Join => "join",
            Out::Leave => "leave",
            Out::Completed => "completed",
            Out::Saved => "saved",
            Out::Pong => "pong",
            Out::Error => "error",
            Out::Meta => "meta",
            Out::Patch => "patch",
        }
    }
}
const CODES: [ErrorCode; 10] = [
    ErrorCode::InvalidJson,
    ErrorCode::InvalidMessage,
    ErrorCode::TooLarge,
    ErrorCode::Forbidden,
    ErrorCode::PaperCompleted,
    ErrorCode::NotFound,
    ErrorCode::PaperFull,
    ErrorCode::RateLimited,
    ErrorCode::Unavailable,
    ErrorCode::WriteFailed,
];

/// The close codes of PROTOCOL.md 3.3.
const CLOSE_CODES: [u16; 10] = [1000, 1001, 1002, 1007, 1008, 1009, 1011, 1013, 4403, 4410];

/// The statuses the HTTP surface answers with (PROTOCOL.md 1 and 7, and 431 for
/// an oversized request head).
const STATUSES: [u16; 15] = [101, 200, 204, 400, 401, 403, 404, 409, 410, 413, 426, 431, 500, 503, 504];

/// The statuses a backend API call is answered with (PROTOCOL.md 7), by route.
const API_STATUSES: [u16; 10] = [200, 204, 400, 404, 409, 410, 413, 500, 503, 504];

/// One event loop's counters.
#[derive(Default)]
pub struct LoopMetrics {
    pub sessions: AtomicU64,
    pub papers: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub messages_in: [AtomicU64; In::ALL.len()],
    pub messages_out: [AtomicU64; Out::ALL.len()],
    pub refusals: [AtomicU64; CODES.len()],
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub broadcasts: AtomicU64,
    pub broadcast_recipients: AtomicU64,
    pub slow_consumers: AtomicU64,
    /// Relayed messages skipped as unreadable (a version out of range, ...).
    pub corrupt_relayed: AtomicU64,
    /// WebSocket ping frames past the rate limit, dropped without a pong.
    pub ping_frames_refused: AtomicU64,
    /// Entries of the loop's deadline and token-expiry heaps.
    pub timer_entries: AtomicU64,
    /// Sessions closed, by close code (`CLOSE_CODES`).
    pub closes: [AtomicU64; CLOSE_CODES.len()],
    /// HTTP answers, by status (`STATUSES`).
    pub http_responses: [AtomicU64; STATUSES.len()],
    /// Backend API calls answered, by route (`api::Kind::ALL`) and status (`API_STATUSES`).
    pub api_calls: [[AtomicU64; API_STATUSES.len()]; crate::api::Kind::ALL.len()],
    /// How long API calls took, from their request to their answer.
    pub api_latency: Histogram,
    /// Connections closed at accept: their address held its cap of unfinished heads.
    pub heads_refused: AtomicU64,
    /// Joiners (1013 `server_busy`) and reads (503) refused at the snapshot bound.
    pub snapshots_refused: AtomicU64,
    /// Bytes the loop's connections hold in output buffers of their own (gauge).
    pub output_buffer_bytes: AtomicU64,
    /// From reading a member's edit to queueing it for the last member.
    pub edit_broadcast: Histogram,
    /// From a joiner's upgrade to its snapshot (or its 1013), for joiners whose
    /// paper had to be read.
    pub load_wait: Histogram,
    /// From poll's return to the end of the turn: how late the next poll is.
    pub loop_turn: Histogram,
}

impl LoopMetrics {
    pub fn message_in(&self, kind: In) {
        bump(&self.messages_in[kind as usize], 1);
    }

    pub fn message_out(&self, kind: Out, recipients: u64) {
        bump(&self.messages_out[kind as usize], recipients);
    }

    pub fn refusal(&self, code: ErrorCode) {
        if let Some(i) = CODES.iter().position(|c| *c == code) {
            bump(&self.refusals[i], 1);
        }
    }

    pub fn close(&self, reason: CloseReason) {
        let code = u16::from(reason.code());
        if let Some(i) = CLOSE_CODES.iter().position(|c| *c == code) {
            bump(&self.closes[i], 1);
        }
    }

    /// Counts an HTTP answer; a status outside `STATUSES` is not counted.
    pub fn api_call(&self, kind: crate::api::Kind, status: u16, took: Duration) {
        if let Some(i) = API_STATUSES.iter().position(|s| *s == status) {
            bump(&self.api_calls[kind as usize][i], 1);
        }
        self.api_latency.observe(took);
    }

    pub fn http_response(&self, status: u16) {
        if let Some(i) = STATUSES.iter().position(|s| *s == status) {
            bump(&self.http_responses[i], 1);
        }
    }
}

/// The store threads' counters: the writer's, and the few of the loader and
/// the relay (each field is written by one thread only, unless it says so).
#[derive(Default)]
pub struct WriterMetrics {
    pub batches: AtomicU64,
    pub ops_written: AtomicU64,
    pub commands: AtomicU64,
    pub errors: AtomicU64,
    pub reconnects: AtomicU64,
    /// Age in milliseconds of the oldest op not yet written.
    pub oldest_age_ms: AtomicU64,
    pub redis_up: AtomicBool,
    /// Ops Redis refused for good (their senders got `write_failed`).
    pub failed_ops: AtomicU64,
    /// Stored values skipped as unreadable by the loader (any thread adds).
    pub corrupt_values: AtomicU64,
    /// From an op's acceptance to its write in Redis.
    pub write_behind: Histogram,
    /// From an op's acceptance to the writer taking it from the backlog.
    pub backlog_wait: Histogram,
    /// From sending a pipeline to Redis to having its replies.
    pub redis_round_trip: Histogram,
    /// Messages the writer had Redis publish to the other nodes (`--cluster`).
    pub relayed_out: AtomicU64,
    /// Messages of other nodes the relay thread received (`--cluster`; the
    /// relay thread writes it).
    pub relayed_in: AtomicU64,
}

/// What the store side reports at a scrape.
pub struct StoreView<'a> {
    pub writer: &'a WriterMetrics,
    pub backlog: usize,
    pub backlog_limit: usize,
    pub backlog_bytes: usize,
    pub backlog_bytes_limit: usize,
}

/// The Prometheus text exposition of every metric.
pub fn render(
    loops: &[std::sync::Arc<LoopMetrics>],
    store: Option<StoreView>,
    connections: usize,
    sockets: usize,
) -> String {
    let mut x = Exposition(String::with_capacity(16 * 1024));
    render_loops(&mut x, loops, store.as_ref(), connections, sockets);
    if let Some(store) = store {
        render_store(&mut x, &store);
    }
    render_process(&mut x);
    x.0
}

/// The event loops' families: sessions, HTTP, messages, closes, latencies, the
/// API, and unreadable values (the store's among them).
fn render_loops(
    x: &mut Exposition,
    loops: &[std::sync::Arc<LoopMetrics>],
    store: Option<&StoreView>,
    connections: usize,
    sockets: usize,
) {
    let sum = |f: &dyn Fn(&LoopMetrics) -> u64| loops.iter().map(|l| f(l)).sum::<u64>();
    let per_loop = |f: &dyn Fn(&LoopMetrics) -> &Histogram| loops.iter().map(|l| f(l)).collect::<Vec<_>>();

    x.family("rollingpaper_build_info", "gauge", "The running version (the value is always 1).");
    x.sample("rollingpaper_build_info", &format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")), 1);
    x.one(
        "rollingpaper_connections",
        "gauge",
        "WebSocket sessions admitted by this node (each holds a slot of --max-connections).",
        connections,
    );
    x.one("rollingpaper_sessions", "gauge", "WebSocket sessions open (joining or member).", sum(&|l| get(&l.sessions)));
    let rows: Vec<_> = loops.iter().enumerate().map(|(i, l)| (format!("{{loop=\"{i}\"}}"), get(&l.sessions))).collect();
    x.rows("rollingpaper_loop_sessions", "gauge", "Sessions open per event loop.", &rows);
    x.one("rollingpaper_papers", "gauge", "Papers in memory.", sum(&|l| get(&l.papers)));
    x.one("rollingpaper_sockets", "gauge", "Sockets open in any phase (each holds a slot of --max-sockets).", sockets);
    x.one(
        "rollingpaper_ping_frames_refused_total",
        "counter",
        "WebSocket ping frames over the rate limit, dropped without a pong.",
        sum(&|l| get(&l.ping_frames_refused)),
    );
    x.one(
        "rollingpaper_timer_entries",
        "gauge",
        "Entries in the loops' deadline and token-expiry heaps.",
        sum(&|l| get(&l.timer_entries)),
    );
    x.one(
        "rollingpaper_connections_accepted_total",
        "counter",
        "TCP connections accepted.",
        sum(&|l| get(&l.connections_accepted)),
    );
    let rows: Vec<_> = STATUSES
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("{{status=\"{s}\"}}"), sum(&|l| get(&l.http_responses[i]))))
        .collect();
    x.rows("rollingpaper_http_responses_total", "counter", "HTTP answers, by status (101: upgrades).", &rows);
    let rows: Vec<_> = In::ALL
        .iter()
        .map(|&t| (format!("{{type=\"{}\"}}", t.name()), sum(&|l| get(&l.messages_in[t as usize]))))
        .collect();
    x.rows("rollingpaper_messages_in_total", "counter", "Client messages received, by type.", &rows);
    let rows: Vec<_> = Out::ALL
        .iter()
        .map(|&t| (format!("{{type=\"{}\"}}", t.name()), sum(&|l| get(&l.messages_out[t as usize]))))
        .collect();
    x.rows("rollingpaper_messages_out_total", "counter", "Server messages queued, one per recipient, by type.", &rows);
    let rows: Vec<_> = CODES
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("{{code=\"{}\"}}", c.as_str()), sum(&|l| get(&l.refusals[i]))))
        .collect();
    x.rows("rollingpaper_refusals_total", "counter", "Client messages refused, by error code.", &rows);
    let rows: Vec<_> = CLOSE_CODES
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("{{code=\"{c}\"}}"), sum(&|l| get(&l.closes[i]))))
        .collect();
    x.rows(
        "rollingpaper_closes_total",
        "counter",
        "WebSocket sessions closed, by close code (PROTOCOL.md 3.3), whichever side began.",
        &rows,
    );
    x.one("rollingpaper_received_bytes_total", "counter", "Bytes read from clients.", sum(&|l| get(&l.bytes_in)));
    x.one("rollingpaper_sent_bytes_total", "counter", "Bytes written to clients.", sum(&|l| get(&l.bytes_out)));
    x.one(
        "rollingpaper_broadcasts_total",
        "counter",
        "Messages fanned out to a paper's members (each counted once, whatever the recipients).",
        sum(&|l| get(&l.broadcasts)),
    );
    x.one(
        "rollingpaper_broadcast_recipients_total",
        "counter",
        "Recipients of broadcasts (fan-out = this / broadcasts_total).",
        sum(&|l| get(&l.broadcast_recipients)),
    );
    x.one(
        "rollingpaper_slow_consumers_total",
        "counter",
        "Sessions closed for not keeping up with their output.",
        sum(&|l| get(&l.slow_consumers)),
    );
    x.histogram(
        "rollingpaper_edit_broadcast_seconds",
        "Time from reading a member's edit to queueing it for the last member of its paper.",
        &per_loop(&|l| &l.edit_broadcast),
    );
    x.histogram(
        "rollingpaper_load_wait_seconds",
        "Time a joiner waited for its paper to be read (until its snapshot, or its 1013 close).",
        &per_loop(&|l| &l.load_wait),
    );
    let mut rows = Vec::new();
    for kind in crate::api::Kind::ALL {
        for (i, status) in API_STATUSES.iter().enumerate() {
            let count = sum(&|l| get(&l.api_calls[kind as usize][i]));
            rows.push((format!("{{route=\"{}\",status=\"{status}\"}}", kind.name()), count));
        }
    }
    x.rows(
        "rollingpaper_api_requests_total",
        "counter",
        "Backend API calls answered (PROTOCOL.md 7), by route and status.",
        &rows,
    );
    x.histogram(
        "rollingpaper_api_request_seconds",
        "Time from reading a backend API call to its answer (a write: until Redis holds it).",
        &per_loop(&|l| &l.api_latency),
    );
    x.histogram(
        "rollingpaper_loop_turn_seconds",
        "Event-loop lag: time from poll's return to the end of the turn.",
        &per_loop(&|l| &l.loop_turn),
    );

    let stored = store.map_or(0, |s| get(&s.writer.corrupt_values));
    let rows = [
        ("{source=\"redis\"}".to_string(), stored),
        ("{source=\"relay\"}".to_string(), sum(&|l| get(&l.corrupt_relayed))),
    ];
    x.rows(
        "rollingpaper_corrupt_values_total",
        "counter",
        "Notes skipped as unreadable (PROTOCOL.md 2), by where they came from.",
        &rows,
    );
}

/// The Redis store's families: the backlog, the writer, its latencies.
fn render_store(x: &mut Exposition, store: &StoreView) {
    let w = store.writer;
    x.one(
        "rollingpaper_backlog",
        "gauge",
        "Ops waiting for the Redis writer (edits, completions, presence, relayed messages).",
        store.backlog,
    );
    x.one("rollingpaper_backlog_limit", "gauge", "Ops the backlog holds at most.", store.backlog_limit);
    x.one("rollingpaper_backlog_bytes", "gauge", "Bytes held by ops waiting to be written.", store.backlog_bytes);
    x.one("rollingpaper_backlog_bytes_limit", "gauge", "Bytes the backlog holds at most.", store.backlog_bytes_limit);
    x.one(
        "rollingpaper_backlog_oldest_age_seconds",
        "gauge",
        "Age of the oldest edit not yet written.",
        get(&w.oldest_age_ms) as f64 / 1000.0,
    );
    x.one(
        "rollingpaper_redis_up",
        "gauge",
        "1 while the writer reaches Redis.",
        u64::from(w.redis_up.load(Ordering::Relaxed)),
    );
    x.one("rollingpaper_redis_batches_total", "counter", "Pipelines written to Redis.", get(&w.batches));
    x.one(
        "rollingpaper_redis_commands_total",
        "counter",
        "Redis commands sent in written pipelines.",
        get(&w.commands),
    );
    x.one("rollingpaper_redis_ops_written_total", "counter", "Ops written to Redis.", get(&w.ops_written));
    x.one(
        "rollingpaper_redis_errors_total",
        "counter",
        "Failed Redis writes (each batch is sent again).",
        get(&w.errors),
    );
    x.one(
        "rollingpaper_redis_reconnects_total",
        "counter",
        "Connections the writer opened to Redis.",
        get(&w.reconnects),
    );
    x.rows(
        "rollingpaper_failed_ops_total",
        "counter",
        "Ops Redis refused for good, by reason (their senders got write_failed).",
        &[("{reason=\"refused\"}".to_string(), get(&w.failed_ops))],
    );
    let rows = [
        ("{direction=\"in\"}".to_string(), get(&w.relayed_in)),
        ("{direction=\"out\"}".to_string(), get(&w.relayed_out)),
    ];
    x.rows(
        "rollingpaper_relayed_messages_total",
        "counter",
        "Messages between nodes (--cluster): in, received from other nodes; out, published by the writer.",
        &rows,
    );
    x.histogram(
        "rollingpaper_write_behind_seconds",
        "Time from an op's acceptance to its write in Redis.",
        &[&w.write_behind],
    );
    x.histogram(
        "rollingpaper_backlog_wait_seconds",
        "Time from an op's acceptance to the writer taking it from the backlog.",
        &[&w.backlog_wait],
    );
    x.histogram(
        "rollingpaper_redis_round_trip_seconds",
        "Time from sending a pipeline to Redis to having its replies.",
        &[&w.redis_round_trip],
    );
}

/// The process's own families, as Prometheus clients name them.
fn render_process(x: &mut Exposition) {
    if let Some(p) = process::read() {
        x.one("process_cpu_seconds_total", "counter", "User and system CPU time spent, in seconds.", p.cpu_seconds);
        x.one("process_resident_memory_bytes", "gauge", "Resident memory size, in bytes.", p.resident_bytes);
        x.one("process_open_fds", "gauge", "Open file descriptors.", p.open_fds);
        x.one("process_max_fds", "gauge", "The limit of open file descriptors.", p.max_fds);
        x.one(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process, in seconds since the Unix epoch.",
            p.start_time_seconds,
        );
    }
}

/// The text being written, one family at a time: its HELP and TYPE, then its samples.
/// The memory families, after `render`'s: output buffers and shared snapshot bytes.
pub fn render_memory(text: &mut String, loops: &[std::sync::Arc<LoopMetrics>], in_flight: &crate::shared::InFlight) {
    let mut x = Exposition(std::mem::take(text));
    let buffers = loops.iter().map(|l| get(&l.output_buffer_bytes)).sum::<u64>();
    x.one(
        "rollingpaper_request_heads_refused_total",
        "counter",
        "Connections closed at accept: their address held --max-connections-per-address unfinished request heads.",
        loops.iter().map(|l| get(&l.heads_refused)).sum::<u64>(),
    );
    x.one(
        "rollingpaper_output_buffer_bytes",
        "gauge",
        "Bytes held in connections' own output buffers (shared snapshot bytes are not in it).",
        buffers,
    );
    x.one(
        "rollingpaper_snapshot_bytes_in_flight",
        "gauge",
        "Bytes of snapshots, GET /papers bodies and large broadcasts held by connections, each buffer once.",
        in_flight.used(),
    );
    x.one(
        "rollingpaper_snapshots_refused_total",
        "counter",
        "Joiners closed with 1013 server_busy and GET /papers answered 503 at --max-snapshot-bytes-in-flight.",
        loops.iter().map(|l| get(&l.snapshots_refused)).sum::<u64>(),
    );
    x.one(
        "rollingpaper_snapshot_bytes_in_flight_limit",
        "gauge",
        "The bound on snapshot_bytes_in_flight (--max-snapshot-bytes-in-flight).",
        in_flight.limit(),
    );
    *text = x.0;
}

struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.0, "{name}{labels} {value}");
    }

    /// A family of one sample without labels.
    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, "", value);
    }

    /// A family of one sample per label set.
    fn rows(&mut self, name: &str, kind: &str, help: &str, rows: &[(String, u64)]) {
        self.family(name, kind, help);
        for (labels, value) in rows {
            self.sample(name, labels, value);
        }
    }

    /// A histogram summed over its writers: cumulative buckets, `+Inf`, sum, count.
    fn histogram(&mut self, name: &str, help: &str, parts: &[&Histogram]) {
        self.family(name, "histogram", help);
        let bucket = |i: usize| parts.iter().map(|h| get(&h.buckets[i])).sum::<u64>();
        let mut count = 0;
        for (i, (_, le)) in BOUNDS.iter().enumerate() {
            count += bucket(i);
            let _ = writeln!(self.0, "{name}_bucket{{le=\"{le}\"}} {count}");
        }
        count += bucket(BOUNDS.len());
        let sum_ns: u64 = parts.iter().map(|h| get(&h.sum_ns)).sum();
        let _ = writeln!(self.0, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(self.0, "{name}_sum {}", sum_ns as f64 / 1e9);
        let _ = writeln!(self.0, "{name}_count {count}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format_with_sums_over_loops() {
        let loops = [std::sync::Arc::new(LoopMetrics::default()), std::sync::Arc::new(LoopMetrics::default())];
        loops[0].message_in(In::Upsert);
        loops[1].message_in(In::Upsert);
        loops[1].refusal(ErrorCode::RateLimited);
        loops[0].close(CloseReason::Idle);
        loops[1].close(CloseReason::ShuttingDown);
        loops[1].http_response(404);
        bump(&loops[0].sessions, 3);
        let writer = WriterMetrics::default();
        writer.write_behind.observe(Duration::from_millis(3));
        writer.oldest_age_ms.store(1500, Ordering::Relaxed);
        let text = render(
            &loops,
            Some(StoreView {
                writer: &writer,
                backlog: 7,
                backlog_limit: 10,
                backlog_bytes: 900,
                backlog_bytes_limit: 1000,
            }),
            4,
            5,
        );
        assert!(text.contains("rollingpaper_messages_in_total{type=\"upsert\"} 2\n"), "{text}");
        assert!(text.contains("rollingpaper_refusals_total{code=\"rate_limited\"} 1\n"));
        assert!(text.contains("rollingpaper_closes_total{code=\"1001\"} 2\n"));
        assert!(text.contains("rollingpaper_http_responses_total{status=\"404\"} 1\n"));
        assert!(text.contains("rollingpaper_loop_sessions{loop=\"0\"} 3\n"));
        assert!(text.contains("rollingpaper_backlog 7\n"));
        assert!(text.contains("rollingpaper_backlog_oldest_age_seconds 1.5\n"));
        assert!(text.contains("rollingpaper_write_behind_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(text.contains("rollingpaper_write_behind_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("rollingpaper_write_behind_seconds_bucket{le=\"+Inf\"} 1\n"));
        assert!(text.contains("rollingpaper_write_behind_seconds_sum 0.003\n"));
        assert!(text.contains("rollingpaper_write_behind_seconds_count 1\n"));
        assert!(text.contains(&format!("rollingpaper_build_info{{version=\"{}\"}} 1\n", env!("CARGO_PKG_VERSION"))));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("rollingpaper_") || name.starts_with("process_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn histograms_sum_their_writers_into_cumulative_buckets() {
        let (a, b) = (Histogram::default(), Histogram::default());
        a.observe(Duration::from_nanos(50_000)); // on a bound: in its bucket
        a.observe(Duration::from_nanos(50_001));
        b.observe(Duration::from_secs(60)); // past every bound
        let mut x = Exposition(String::new());
        x.histogram("h", "help", &[&a, &b]);
        let text = x.0;
        assert!(text.contains("h_bucket{le=\"0.00005\"} 1\n"), "{text}");
        assert!(text.contains("h_bucket{le=\"0.0001\"} 2\n"), "{text}");
        assert!(text.contains("h_bucket{le=\"30\"} 2\n"), "{text}");
        assert!(text.contains("h_bucket{le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("h_count 3\n"), "{text}");
        assert!(text.contains("h_sum 60.000100001\n"), "{text}");
    }
}
