//! What a run measured, as JSON and as a human summary, and the process figures
//! read from /proc (the tool's own CPU, the server's CPU and RSS).

use std::time::Instant;

use serde_json::{json, Value};

use crate::worker::StepReport;

/// CPU time of a process (all its threads), in seconds.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks.max(1.0))
}

/// How long ago a process started, in seconds (to the clock tick, 10 ms), from
/// its start time in /proc/PID/stat and the system's uptime.
pub fn started_seconds_ago(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    // Field 22 of stat, counted from the state (field 3).
    let start_ticks: f64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime").ok()?.split_whitespace().next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((uptime - start_ticks / ticks.max(1.0)).max(0.0))
}

/// Resident set size of a process, in KiB.
pub fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU of the tool, of the server and of the watched processes (`--watch-pid`),
/// taken at one instant.
pub struct CpuSample {
    pub at: Instant,
    pub tool: Option<f64>,
    pub server: Option<f64>,
    /// In the order of `--watch-pid`.
    pub watched: Vec<Option<f64>>,
}

impl CpuSample {
    pub fn take(server_pid: Option<&str>, watch: &[(String, u32)]) -> Self {
        CpuSample {
            at: Instant::now(),
            tool: cpu_seconds("self"),
            server: server_pid.and_then(cpu_seconds),
            watched: watch.iter().map(|(_, pid)| cpu_seconds(&pid.to_string())).collect(),
        }
    }
}

/// A process given with `--watch-pid`, over one window.
pub struct Watched {
    pub name: String,
    pub pid: u32,
    /// CPU seconds over the measured window (none when /proc could not be read).
    pub cpu: Option<f64>,
    pub rss_kib: Option<u64>,
}

/// One step's figures, everything a reader checks.
pub struct StepResult {
    pub rate: f64,
    pub duration: f64,
    pub planned: u64,
    pub totals: StepReport,
    /// CPU seconds over the measured window.
    pub tool_cpu: Option<f64>,
    pub server_cpu: Option<f64>,
    pub server_rss_kib: Option<u64>,
    pub watched: Vec<Watched>,
    pub window: f64,
}

impl StepResult {
    pub fn ratio(&self) -> f64 {
        if self.totals.expected == 0 {
            return 1.0;
        }
        self.totals.received as f64 / self.totals.expected as f64
    }

    pub fn p99_ms(&self) -> f64 {
        ms(self.totals.latency_us.value_at_quantile(0.99))
    }

    pub fn to_json(&self) -> Value {
        let t = &self.totals;
        let lat = &t.latency_us;
        let per_delivery =
            self.server_cpu.filter(|_| t.received > 0).map(|cpu| round(cpu * 1e6 / t.received as f64, 3));
        json!({
            "rate": self.rate,
            "duration_seconds": self.duration,
            "senders": t.senders,
            "messages_planned": self.planned,
            "messages_sent": t.sent,
            "deliveries_expected": t.expected,
            "deliveries_received": t.received,
            "delivery_ratio": round(self.ratio(), 6),
            "deliveries_per_second": round(t.received as f64 / self.duration, 1),
            "bytes_received_per_edit": if t.sent > 0 { Some(round(t.rx_bytes as f64 / t.sent as f64, 1)) } else { None },
            "latency_ms": {
                "p50": ms(lat.value_at_quantile(0.5)),
                "p90": ms(lat.value_at_quantile(0.9)),
                "p99": ms(lat.value_at_quantile(0.99)),
                "p99_9": ms(lat.value_at_quantile(0.999)),
                "max": ms(lat.max()),
            },
            "send_lag_ms": {"p99": ms(t.lag_us.value_at_quantile(0.99)), "max": ms(t.lag_us.max())},
            "errors": t.errors,
            "sessions_closed": t.closed,
            "first_close": t.first_close,
            "tool_cpu_cores": self.tool_cpu.map(|c| round(c / self.window, 3)),
            "server_cpu_cores": self.server_cpu.map(|c| round(c / self.window, 3)),
            "server_cpu_seconds": self.server_cpu.map(|c| round(c, 3)),
            "server_cpu_us_per_delivery": per_delivery,
            "server_rss_kib": self.server_rss_kib,
            "watched": self.watched.iter().map(|w| (w.name.clone(), json!({
                "pid": w.pid,
                "cpu_seconds": w.cpu.map(|c| round(c, 3)),
                "cpu_cores": w.cpu.map(|c| round(c / self.window, 3)),
                "rss_kib": w.rss_kib,
            }))).collect::<serde_json::Map<_, _>>(),
        })
    }

    pub fn summary(&self) -> String {
        let t = &self.totals;
        let lat = &t.latency_us;
        let mut s = format!(
            "  rate {:.1}/s per sender x {} senders for {:.1} s\n  messages sent {} of {} planned\n  \
             deliveries {} of {} expected ({:.3}%), {:.0}/s\n  latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  \
             p99.9 {:.3}  max {:.3}\n  send lag ms: p99 {:.3}  max {:.3}\n",
            self.rate,
            t.senders,
            self.duration,
            t.sent,
            self.planned,
            t.received,
            t.expected,
            self.ratio() * 100.0,
            t.received as f64 / self.duration,
            ms(lat.value_at_quantile(0.5)),
            ms(lat.value_at_quantile(0.9)),
            ms(lat.value_at_quantile(0.99)),
            ms(lat.value_at_quantile(0.999)),
            ms(lat.max()),
            ms(t.lag_us.value_at_quantile(0.99)),
            ms(t.lag_us.max()),
        );
        if t.sent > 0 {
            s += &format!("  bytes received per edit {:.0}\n", t.rx_bytes as f64 / t.sent as f64);
        }
        if let Some(cpu) = self.tool_cpu {
            s += &format!("  tool CPU {:.2} cores\n", cpu / self.window);
        }
        if let Some(cpu) = self.server_cpu {
            s += &format!("  server CPU {:.2} cores", cpu / self.window);
            if t.received > 0 {
                s += &format!(", {:.2} µs per delivery", cpu * 1e6 / t.received as f64);
            }
            s.push('\n');
        }
        if let Some(rss) = self.server_rss_kib {
            s += &format!("  server RSS {rss} KiB\n");
        }
        for w in &self.watched {
            match w.cpu {
                Some(cpu) => {
                    s += &format!("  {} (pid {}) CPU {cpu:.3} s ({:.2} cores)\n", w.name, w.pid, cpu / self.window)
                }
                None => s += &format!("  {} (pid {}): not readable in /proc\n", w.name, w.pid),
            }
        }
        if !t.errors.is_empty() {
            s += &format!("  refusals: {:?}\n", t.errors);
        }
        if t.closed > 0 {
            s += &format!(
                "  sessions closed during the step: {} (first: {})\n",
                t.closed,
                t.first_close.as_deref().unwrap_or("")
            );
        }
        s
    }
}

pub fn ms(us: u64) -> f64 {
    round(us as f64 / 1000.0, 3)
}

pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}
