//! What a reconnect round measured, and its report.

use super::*;

/// What one run found.
#[derive(Default)]
pub(super) struct Outcome {
    pub(super) connected: u64,
    pub(super) connect_failed: u64,
    pub(super) connect_error: Option<String>,
    pub(super) connect_seconds: f64,
    pub(super) fill_written: u64,
    pub(super) edits_sent: u64,
    pub(super) edits_expected: u64,
    pub(super) edits_received: u64,
    pub(super) closed_by_server: u64,
    pub(super) close_reasons: BTreeMap<String, u64>,
    pub(super) wait_close_seconds: f64,
    pub(super) reconnect: Counts,
    /// From the new server's start until every session had its snapshot.
    pub(super) seconds_from_start: Option<f64>,
    /// From the first reconnect attempt until every session had its snapshot.
    pub(super) seconds_from_first_attempt: Option<f64>,
    pub(super) server_cpu: Option<f64>,
    pub(super) tool_cpu: Option<f64>,
    pub(super) new_pid: Option<String>,
    pub(super) checked: u64,
    pub(super) matched: u64,
    pub(super) first_mismatch: Option<String>,
    pub(super) aborted: Option<String>,
}

impl Outcome {
    pub(super) fn passed(&self, planned: usize) -> bool {
        self.aborted.is_none() && self.reconnect.ok == planned as u64 && self.matched == self.checked
    }

    pub(super) fn report(&self, args: &ReconnectArgs, planned: usize) -> Value {
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

    pub(super) fn summary(&self, args: &ReconnectArgs, planned: usize) -> String {
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
