//! What the abuse mode watches from outside the server's sessions: Redis's
//! `PING` latency and `used_memory` over their own connections (never through
//! the server), and the server's RSS (/proc), backlog (`/metrics`) and
//! `/healthz` latency (over HTTP from an address of their own).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use super::ws;
use crate::report;

/// A `PING` not answered `+PONG` within this counts as at least this long.
pub const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// One scheduled `PING`.
pub struct Ping {
    /// When it was due, in seconds from the window's start.
    pub at: f64,
    /// From when it was due to its answer (so a stall counts for every sample
    /// due during it, not once), ms.
    pub ms: f64,
    /// Answered `+PONG` (not an error such as `BUSY`, not a timeout).
    pub ok: bool,
    /// Answered `BUSY` (a script ran past Redis's busy threshold).
    pub busy: bool,
}

/// A minimal RESP connection: inline commands out, one reply back.
struct Resp {
    tcp: TcpStream,
    buf: Vec<u8>,
}

/// One RESP reply, as far as the sampler needs it.
enum Reply {
    Simple(String),
    Error(String),
    Bulk(Vec<u8>),
}

impl Resp {
    fn connect(addr: SocketAddr, timeout: Duration) -> Result<Resp, String> {
        let tcp = ws::tcp(addr, None, None, timeout).map_err(|e| format!("connect: {e}"))?;
        Ok(Resp { tcp, buf: Vec::new() })
    }

    /// Sends `args` as a RESP array and reads the reply, within `timeout`.
    fn call(&mut self, args: &[&str], timeout: Duration) -> Result<Reply, String> {
        let deadline = Instant::now() + timeout;
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out += &format!("${}\r\n{a}\r\n", a.len());
        }
        self.tcp.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        self.tcp.write_all(out.as_bytes()).map_err(|e| format!("write: {e}"))?;
        self.buf.clear();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(reply) = parse(&self.buf)? {
                return Ok(reply);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("timed out".into());
            }
            self.tcp.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            match self.tcp.read(&mut chunk) {
                Ok(0) => return Err("closed".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if ws::timed_out(&e) => return Err("timed out".into()),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// The reply at the start of `buf`, once it is whole.
fn parse(buf: &[u8]) -> Result<Option<Reply>, String> {
    let Some(end) = memchr::memmem::find(buf, b"\r\n") else { return Ok(None) };
    let line = String::from_utf8_lossy(&buf[1..end]).into_owned();
    match buf.first() {
        Some(b'+') => Ok(Some(Reply::Simple(line))),
        Some(b'-') => Ok(Some(Reply::Error(line))),
        Some(b'$') => {
            let len: i64 = line.parse().map_err(|_| format!("bad bulk length {line:?}"))?;
            if len < 0 {
                return Ok(Some(Reply::Bulk(Vec::new())));
            }
            let start = end + 2;
            let stop = start + len as usize;
            Ok((buf.len() >= stop + 2).then(|| Reply::Bulk(buf[start..stop].to_vec())))
        }
        Some(b':') => Ok(Some(Reply::Simple(line))),
        _ => Err(format!("an unexpected reply {line:?}")),
    }
}

/// `PING` every `every` from `start` until `end`, over one connection (opened
/// again after a failure). A sample due while an earlier one is still waiting
/// is sent as soon as that one ends, and its latency counts from when it was due.
pub fn pings(redis: SocketAddr, every: Duration, start: Instant, end: Instant) -> Vec<Ping> {
    let mut out = Vec::new();
    let mut conn: Option<Resp> = None;
    let mut due = start;
    while due < end {
        let now = Instant::now();
        if now < due {
            thread::sleep(due - now);
        } else if now >= end {
            // Behind past the window's end (Redis stalled): what was due and
            // never sent waited at least until now.
            let failed_ms = PING_TIMEOUT.as_secs_f64() * 1e3;
            while due < end {
                let at = due.duration_since(start).as_secs_f64();
                out.push(Ping { at, ms: ((now - due).as_secs_f64() * 1e3).max(failed_ms), ok: false, busy: false });
                due += every;
            }
            break;
        }
        let at = due.duration_since(start).as_secs_f64();
        let answer = match conn.as_mut() {
            Some(c) => c.call(&["PING"], PING_TIMEOUT),
            None => Resp::connect(redis, PING_TIMEOUT).and_then(|c| {
                let c = conn.insert(c);
                c.call(&["PING"], PING_TIMEOUT)
            }),
        };
        let ok = matches!(&answer, Ok(Reply::Simple(s)) if s == "PONG");
        let busy = matches!(&answer, Ok(Reply::Error(e)) if e.starts_with("BUSY"));
        let mut ms = due.elapsed().as_secs_f64() * 1e3;
        if !ok {
            // An error (BUSY), a timeout or no connection: at least the timeout.
            ms = ms.max(PING_TIMEOUT.as_secs_f64() * 1e3);
            if answer.is_err() {
                conn = None;
            }
        }
        out.push(Ping { at, ms, ok, busy });
        due += every;
    }
    out
}

/// One probe of memory, backlog and health.
#[derive(Default)]
pub struct Probe {
    pub at: f64,
    pub rss_kib: Option<u64>,
    /// The server's CPU seconds so far (all threads).
    pub cpu_seconds: Option<f64>,
    /// Redis's `used_memory` (bytes), when `INFO memory` answered.
    pub used_memory: Option<u64>,
    /// The server's `rollingpaper_backlog*` gauges, when `/metrics` answered.
    pub backlog: BTreeMap<String, f64>,
    /// `/healthz` answered `200 ok` within 2 s; none when it did not, or when
    /// the sample was skipped because an earlier request was still waiting.
    pub healthz_ms: Option<f64>,
}

/// Every `every` from `start` until `end`: the server's RSS and Redis's
/// `used_memory` (one thread), its `/metrics` gauges and `/healthz` latency
/// (another, so that a slow server does not delay the memory samples).
pub fn probes(
    redis: SocketAddr,
    server: SocketAddr,
    http_source: Option<IpAddr>,
    server_pid: Option<u32>,
    every: Duration,
    start: Instant,
    end: Instant,
) -> Vec<Probe> {
    let http = thread::spawn(move || {
        let mut out = Vec::new();
        each(every, start, end, |at| {
            let backlog = http_get(server, http_source, "/metrics").map(|b| backlog_gauges(&b)).unwrap_or_default();
            let t = Instant::now();
            let healthz_ms = http_get(server, http_source, "/healthz")
                .filter(|b| b.trim() == "ok")
                .map(|_| t.elapsed().as_secs_f64() * 1e3);
            out.push((at, backlog, healthz_ms));
        });
        out
    });
    let mut out = Vec::new();
    let mut conn: Option<Resp> = None;
    each(every, start, end, |at| {
        let rss_kib = server_pid.and_then(|p| report::rss_kib(&p.to_string()));
        let cpu_seconds = server_pid.and_then(|p| report::cpu_seconds(&p.to_string()));
        let info = match conn.as_mut() {
            Some(c) => c.call(&["INFO", "memory"], PING_TIMEOUT),
            None => {
                Resp::connect(redis, PING_TIMEOUT).and_then(|c| conn.insert(c).call(&["INFO", "memory"], PING_TIMEOUT))
            }
        };
        if info.is_err() {
            conn = None;
        }
        let used_memory = match info {
            Ok(Reply::Bulk(text)) => String::from_utf8_lossy(&text)
                .lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|n| n.trim().parse().ok()),
            _ => None,
        };
        out.push(Probe { at, rss_kib, cpu_seconds, used_memory, ..Probe::default() });
    });
    // Matched by the time they were due: a slow server makes the HTTP thread
    // skip samples (those stay empty: not answered in time).
    let mut http: BTreeMap<u64, (BTreeMap<String, f64>, Option<f64>)> = http
        .join()
        .unwrap_or_default()
        .into_iter()
        .map(|(at, backlog, healthz_ms)| ((at * 1e3).round() as u64, (backlog, healthz_ms)))
        .collect();
    for probe in &mut out {
        if let Some((backlog, healthz_ms)) = http.remove(&((probe.at * 1e3).round() as u64)) {
            probe.backlog = backlog;
            probe.healthz_ms = healthz_ms;
        }
    }
    out
}

/// Calls `f` with the time due (seconds from `start`) every `every` until `end`;
/// a call that overruns skips the samples it covered.
fn each(every: Duration, start: Instant, end: Instant, mut f: impl FnMut(f64)) {
    let mut due = start;
    while due < end {
        let now = Instant::now();
        if now < due {
            thread::sleep(due - now);
        }
        f(due.duration_since(start).as_secs_f64());
        due += every;
        while due + every < Instant::now() {
            due += every;
        }
    }
}

/// The body of a `GET`, if the answer was `200` within 2 s.
fn http_get(server: SocketAddr, source: Option<IpAddr>, path: &str) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut tcp = ws::tcp(server, source, None, Duration::from_secs(2)).ok()?;
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: abuse\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut body = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        tcp.set_read_timeout(Some(left)).ok()?;
        match tcp.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(_) => return None,
        }
        if body.len() > 16 << 20 {
            return None;
        }
    }
    let text = String::from_utf8_lossy(&body);
    let (head, rest) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| rest.to_string())
}

/// The unlabelled `rollingpaper_backlog*` gauges of a Prometheus text page
/// (histograms' series left out).
fn backlog_gauges(page: &str) -> BTreeMap<String, f64> {
    page.lines()
        .filter(|l| l.starts_with("rollingpaper_backlog"))
        .filter_map(|l| l.split_once(' '))
        .filter(|(name, _)| {
            !name.contains('{') && !name.ends_with("_bucket") && !name.ends_with("_sum") && !name.ends_with("_count")
        })
        .filter_map(|(name, value)| Some((name.to_string(), value.trim().parse().ok()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_replies_are_parsed_once_whole() {
        assert!(matches!(parse(b"+PONG\r\n"), Ok(Some(Reply::Simple(s))) if s == "PONG"));
        assert!(matches!(parse(b"-BUSY Redis is busy\r\n"), Ok(Some(Reply::Error(s))) if s.starts_with("BUSY")));
        assert!(matches!(parse(b"$5\r\nab"), Ok(None)));
        assert!(matches!(parse(b"$5\r\nabcde\r\n"), Ok(Some(Reply::Bulk(b))) if b == b"abcde"));
        assert!(matches!(parse(b"+PON"), Ok(None)));
    }

    #[test]
    fn only_backlog_gauges_are_kept() {
        let page = "# HELP x\nrollingpaper_backlog 7\nrollingpaper_backlog_limit 100\n\
                    rollingpaper_backlog_wait_seconds_bucket{le=\"0.1\"} 3\nrollingpaper_backlog_wait_seconds_sum 1\n\
                    rollingpaper_backlog_bytes 4096\nrollingpaper_redis_up 1\n";
        let gauges = backlog_gauges(page);
        assert_eq!(gauges.len(), 3);
        assert_eq!(gauges["rollingpaper_backlog"], 7.0);
        assert_eq!(gauges["rollingpaper_backlog_bytes"], 4096.0);
    }
}
