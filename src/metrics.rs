//! Counters and gauges, and their Prometheus text exposition. Each event loop
//! owns its counters (only its thread writes them, so an update is a plain load
//! and store, no locked instruction); a scrape sums them on whichever loop
//! answers `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::protocol::{ClientMsg, ErrorCode};

/// Adds to a counter that only the calling thread writes.
pub fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
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
}

/// Upper bounds of the write-behind latency histogram, in seconds.
const LATENCY_BOUNDS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0];

/// The writer thread's counters (only it writes them).
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
    latency_buckets: [AtomicU64; LATENCY_BOUNDS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
}

impl WriterMetrics {
    /// Records the time from an edit's acceptance to its write in Redis.
    pub fn write_latency(&self, latency: Duration) {
        let secs = latency.as_secs_f64();
        for (bound, bucket) in LATENCY_BOUNDS.iter().zip(&self.latency_buckets) {
            if secs <= *bound {
                bump(bucket, 1);
            }
        }
        bump(&self.latency_count, 1);
        bump(&self.latency_sum_us, latency.as_micros() as u64);
    }
}

/// What the store side reports at a scrape.
pub struct StoreView<'a> {
    pub writer: &'a WriterMetrics,
    pub backlog: usize,
    pub backlog_limit: usize,
}

/// The Prometheus text exposition of every counter.
pub fn render(loops: &[LoopMetrics], store: Option<StoreView>, connections: usize, sockets: usize) -> String {
    let mut out = String::with_capacity(4096);
    let sum = |f: &dyn Fn(&LoopMetrics) -> u64| loops.iter().map(f).sum::<u64>();
    let mut metric = |name: &str, kind: &str, help: &str, rows: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP rollingpaper_{name} {help}\n# TYPE rollingpaper_{name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(out, "rollingpaper_{name}{labels} {value}");
        }
    };
    let one = |v: u64| vec![(String::new(), v)];

    metric(
        "connections",
        "gauge",
        "WebSocket sessions admitted by this node (each holds a slot of --max-connections).",
        &one(connections as u64),
    );
    metric("sessions", "gauge", "WebSocket sessions open (joining or member).", &one(sum(&|l| get(&l.sessions))));
    let per_loop: Vec<_> =
        loops.iter().enumerate().map(|(i, l)| (format!("{{loop=\"{i}\"}}"), get(&l.sessions))).collect();
    metric("loop_sessions", "gauge", "Sessions open per event loop.", &per_loop);
    metric("papers", "gauge", "Papers in memory.", &one(sum(&|l| get(&l.papers))));
    metric("sockets", "gauge", "Sockets open in any phase (each holds a slot of --max-sockets).", &one(sockets as u64));
    metric(
        "ping_frames_refused_total",
        "counter",
        "WebSocket ping frames over the rate limit, dropped without a pong.",
        &one(sum(&|l| get(&l.ping_frames_refused))),
    );
    metric(
        "timer_entries",
        "gauge",
        "Entries in the loops' deadline and token-expiry heaps.",
        &one(sum(&|l| get(&l.timer_entries))),
    );
    metric(
        "connections_accepted_total",
        "counter",
        "TCP connections accepted.",
        &one(sum(&|l| get(&l.connections_accepted))),
    );
    let rows: Vec<_> = In::ALL
        .iter()
        .map(|&t| (format!("{{type=\"{}\"}}", t.name()), sum(&|l| get(&l.messages_in[t as usize]))))
        .collect();
    metric("messages_in_total", "counter", "Client messages received, by type.", &rows);
    let rows: Vec<_> = Out::ALL
        .iter()
        .map(|&t| (format!("{{type=\"{}\"}}", t.name()), sum(&|l| get(&l.messages_out[t as usize]))))
        .collect();
    metric("messages_out_total", "counter", "Server messages queued, one per recipient, by type.", &rows);
    let rows: Vec<_> = CODES
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("{{code=\"{}\"}}", c.as_str()), sum(&|l| get(&l.refusals[i]))))
        .collect();
    metric("refusals_total", "counter", "Client messages refused, by error code.", &rows);
    metric("bytes_in_total", "counter", "Bytes read from clients.", &one(sum(&|l| get(&l.bytes_in))));
    metric("bytes_out_total", "counter", "Bytes written to clients.", &one(sum(&|l| get(&l.bytes_out))));
    metric(
        "broadcasts_total",
        "counter",
        "Messages fanned out to a paper's members (each counted once, whatever the recipients).",
        &one(sum(&|l| get(&l.broadcasts))),
    );
    metric(
        "broadcast_recipients_total",
        "counter",
        "Recipients of broadcasts (fan-out = this / broadcasts_total).",
        &one(sum(&|l| get(&l.broadcast_recipients))),
    );
    metric(
        "slow_consumers_total",
        "counter",
        "Sessions closed for not keeping up with their output.",
        &one(sum(&|l| get(&l.slow_consumers))),
    );

    let stored = store.as_ref().map_or(0, |s| get(&s.writer.corrupt_values));
    let rows = [
        ("{source=\"redis\"}".to_string(), stored),
        ("{source=\"relay\"}".to_string(), sum(&|l| get(&l.corrupt_relayed))),
    ];
    metric(
        "corrupt_values_total",
        "counter",
        "Notes skipped as unreadable (PROTOCOL.md 2), by where they came from.",
        &rows,
    );

    if let Some(store) = store {
        let w = store.writer;
        metric(
            "backlog",
            "gauge",
            "Ops waiting for the Redis writer (edits, completions, presence, relayed messages).",
            &one(store.backlog as u64),
        );
        metric("backlog_limit", "gauge", "Ops the backlog holds at most.", &one(store.backlog_limit as u64));
        let _ = writeln!(
            out,
            "# HELP rollingpaper_backlog_oldest_age_seconds Age of the oldest edit not yet written.\n\
             # TYPE rollingpaper_backlog_oldest_age_seconds gauge\n\
             rollingpaper_backlog_oldest_age_seconds {}",
            get(&w.oldest_age_ms) as f64 / 1000.0
        );
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP rollingpaper_{name} {help}\n# TYPE rollingpaper_{name} {kind}\nrollingpaper_{name} {value}"
            );
        };
        metric("redis_up", "gauge", "1 while the writer reaches Redis.", u64::from(w.redis_up.load(Ordering::Relaxed)));
        metric("redis_batches_total", "counter", "Pipelines written to Redis.", get(&w.batches));
        metric("redis_commands_total", "counter", "Redis commands sent in written pipelines.", get(&w.commands));
        metric("redis_ops_written_total", "counter", "Ops written to Redis.", get(&w.ops_written));
        metric("redis_errors_total", "counter", "Failed Redis writes (each batch is sent again).", get(&w.errors));
        metric("redis_reconnects_total", "counter", "Connections the writer opened to Redis.", get(&w.reconnects));
        let _ = writeln!(
            out,
            "# HELP rollingpaper_failed_ops_total Ops Redis refused for good, by reason (their senders got write_failed).\n\
             # TYPE rollingpaper_failed_ops_total counter\n\
             rollingpaper_failed_ops_total{{reason=\"refused\"}} {}",
            get(&w.failed_ops)
        );
        let _ = writeln!(
            out,
            "# HELP rollingpaper_write_behind_seconds Time from an edit's acceptance to its write in Redis.\n\
             # TYPE rollingpaper_write_behind_seconds histogram"
        );
        for (bound, bucket) in LATENCY_BOUNDS.iter().zip(&w.latency_buckets) {
            let _ = writeln!(out, "rollingpaper_write_behind_seconds_bucket{{le=\"{bound}\"}} {}", get(bucket));
        }
        let count = get(&w.latency_count);
        let _ = writeln!(out, "rollingpaper_write_behind_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "rollingpaper_write_behind_seconds_sum {}", get(&w.latency_sum_us) as f64 / 1e6);
        let _ = writeln!(out, "rollingpaper_write_behind_seconds_count {count}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format_with_sums_over_loops() {
        let loops = [LoopMetrics::default(), LoopMetrics::default()];
        loops[0].message_in(In::Upsert);
        loops[1].message_in(In::Upsert);
        loops[1].refusal(ErrorCode::RateLimited);
        bump(&loops[0].sessions, 3);
        let writer = WriterMetrics::default();
        writer.write_latency(Duration::from_millis(3));
        writer.oldest_age_ms.store(1500, Ordering::Relaxed);
        let text = render(&loops, Some(StoreView { writer: &writer, backlog: 7, backlog_limit: 10 }), 4, 5);
        assert!(text.contains("rollingpaper_messages_in_total{type=\"upsert\"} 2\n"), "{text}");
        assert!(text.contains("rollingpaper_refusals_total{code=\"rate_limited\"} 1\n"));
        assert!(text.contains("rollingpaper_loop_sessions{loop=\"0\"} 3\n"));
        assert!(text.contains("rollingpaper_backlog 7\n"));
        assert!(text.contains("rollingpaper_backlog_oldest_age_seconds 1.5\n"));
        assert!(text.contains("rollingpaper_write_behind_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(text.contains("rollingpaper_write_behind_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("rollingpaper_write_behind_seconds_count 1\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("rollingpaper_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
