//! The hostile clients of the abuse mode. Each stays within every limit of
//! PROTOCOL.md (rate and burst, `max_note_bytes`, `max_message_bytes`) and
//! still costs the server or Redis far more than its messages' size:
//!
//! - `churn`: a note, then patches each naming ~225 new 64-character fields set
//!   to `null` (the note's `data` never grows; its removed-field versions do);
//! - `wide`: notes of `max_note_bytes`, replaced whole and patched field by
//!   field (~200 fields a patch);
//! - `deletes`: deletes of ids never created, and create-then-delete of fresh ids;
//! - `pings`: `ping` messages and WebSocket ping frames;
//! - `joiners`: waves of sessions that join a large paper and never read;
//! - `gets` (run only when named): waves of `GET /papers/{paper}` of the
//!   same paper whose replies are never read;
//! - `heads`: request heads sent a byte a second, never finished.
//!
//! Every loop stops at the run's end; every connect, read and write has a timeout.

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use super::ws::{self, Dial, Msg, Pacer, Ws};
use crate::wire;

/// What one kind of hostile client did, shared by its threads.
#[derive(Default)]
pub struct Tally {
    /// Messages (and ping frames) sent.
    pub sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Messages received (of any type but `error`).
    pub received: AtomicU64,
    /// Sessions (or sockets) opened.
    pub opened: AtomicU64,
    /// Sessions (or sockets) open now.
    pub open: AtomicU64,
    pub failed: AtomicU64,
    /// `error` codes received, close codes (`close 1013`), and failures, counted.
    pub events: Mutex<BTreeMap<String, u64>>,
    pub first_failure: Mutex<Option<String>>,
}

impl Tally {
    pub fn event(&self, what: impl Into<String>) {
        *self.events.lock().unwrap().entry(what.into()).or_default() += 1;
    }

    fn failure(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let short = why.split(':').next().unwrap_or("").trim().to_string();
        self.event(format!("failed: {short}"));
        self.first_failure.lock().unwrap().get_or_insert(why);
    }

    fn sent(&self, bytes: usize) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "sent": self.sent.load(Ordering::Relaxed),
            "bytes_sent": self.bytes_sent.load(Ordering::Relaxed),
            "received": self.received.load(Ordering::Relaxed),
            "opened": self.opened.load(Ordering::Relaxed),
            "failed": self.failed.load(Ordering::Relaxed),
            "events": *self.events.lock().unwrap(),
            "first_failure": *self.first_failure.lock().unwrap(),
        })
    }
}

/// The kinds that are sessions sending messages on a schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    Churn,
    Wide,
    Deletes,
    Pings,
}

impl Sender {
    pub fn name(self) -> &'static str {
        match self {
            Sender::Churn => "churn",
            Sender::Wide => "wide",
            Sender::Deletes => "deletes",
            Sender::Pings => "pings",
        }
    }
}

/// One thing to send.
enum Out {
    Text(Vec<u8>),
    Ping(Vec<u8>),
}

/// Notes a `wide` session cycles over.
const WIDE_NOTES: u64 = 20;

/// What a sending session sends next.
struct Script {
    kind: Sender,
    /// Messages made so far.
    n: u64,
    /// Fields named so far (`churn`: every one new).
    fields_named: u64,
    churn_fields: usize,
    max_note_bytes: usize,
    /// `wide`: the field names of its notes.
    wide_names: Vec<String>,
}

impl Script {
    fn new(kind: Sender, churn_fields: usize, max_note_bytes: usize, salt: usize) -> Script {
        // `"name":"12345678",` is 78 bytes for a 64-character name; room is kept
        // for the braces and the padding field.
        let count = max_note_bytes.saturating_sub(40) / 78;
        let wide_names = (0..count).map(|i| format!("w{salt:03}{i:060}")).collect();
        Script { kind, n: 0, fields_named: 0, churn_fields, max_note_bytes, wide_names }
    }

    /// What a fresh session sends first.
    fn opening(&self) -> Vec<Out> {
        match self.kind {
            Sender::Churn => vec![Out::Text(br#"{"type":"upsert","id":"n0","data":{"text":"hi"}}"#.to_vec())],
            _ => Vec::new(),
        }
    }

    fn next(&mut self) -> Out {
        let n = self.n;
        self.n += 1;
        match self.kind {
            Sender::Churn => {
                let mut m = br#"{"type":"patch","id":"n0","data":{"#.to_vec();
                for i in 0..self.churn_fields {
                    if i > 0 {
                        m.push(b',');
                    }
                    m.extend_from_slice(format!("\"f{:063}\":null", self.fields_named).as_bytes());
                    self.fields_named += 1;
                }
                m.extend_from_slice(b"}}");
                Out::Text(m)
            }
            Sender::Wide => {
                let note = (n / 2) % WIDE_NOTES;
                let upsert = n.is_multiple_of(2);
                let kind = if upsert { "upsert" } else { "patch" };
                let mut data = b"{".to_vec();
                for (i, name) in self.wide_names.iter().enumerate() {
                    if i > 0 {
                        data.push(b',');
                    }
                    data.extend_from_slice(format!("\"{name}\":\"{:08}\"", (n + i as u64) % 100_000_000).as_bytes());
                }
                if upsert {
                    // Padded to exactly `max_note_bytes` of compact JSON.
                    data.extend_from_slice(br#","pad":""#);
                    let used = data.len() + 2;
                    data.resize(data.len() + self.max_note_bytes.saturating_sub(used), b'x');
                    data.push(b'"');
                }
                data.push(b'}');
                let mut m = format!(r#"{{"type":"{kind}","id":"w{note}","data":"#).into_bytes();
                m.extend_from_slice(&data);
                m.push(b'}');
                Out::Text(m)
            }
            Sender::Deletes => {
                let c = n / 3;
                Out::Text(
                    match n % 3 {
                        0 => format!(r#"{{"type":"delete","id":"never{c}"}}"#),
                        1 => format!(r#"{{"type":"upsert","id":"t{c}","data":{{"t":{c}}}}}"#),
                        _ => format!(r#"{{"type":"delete","id":"t{c}"}}"#),
                    }
                    .into_bytes(),
                )
            }
            Sender::Pings if n.is_multiple_of(2) => Out::Text(br#"{"type":"ping"}"#.to_vec()),
            Sender::Pings => Out::Ping(vec![b'p'; 125]),
        }
    }
}

/// The limits the hostile clients stay under, and where they connect.
pub struct Limits {
    pub rate: f64,
    pub burst: f64,
    pub churn_fields: usize,
    pub max_note_bytes: usize,
}

/// When a sending session runs.
#[derive(Clone, Copy)]
pub struct Span {
    pub start: Instant,
    pub end: Instant,
}

/// One sending session of `kind` on its own paper from `span.start` until
/// `span.end`: opened before the start (so that every kind is under way when
/// the window opens, whatever the others do to the server), and opened again
/// (after a pause) whenever the server closes it.
pub fn sender(dial: &Dial, paper: &str, kind: Sender, index: usize, limits: &Limits, span: Span, tally: &Tally) {
    let mut script = Script::new(kind, limits.churn_fields, limits.max_note_bytes, index);
    let user = format!("h-{}-{index}", kind.name());
    let mut seed = 0x5EED ^ (index as u64) << 8;
    let end = span.end;
    let mut first = match Ws::open(dial, paper, &user, span.start.max(Instant::now() + Duration::from_secs(5)), seed) {
        Ok(ws) => Some(ws),
        Err(e) => {
            tally.failure(format!("open: {e}"));
            None
        }
    };
    let now = Instant::now();
    if now < span.start {
        thread::sleep(span.start - now);
    }
    while Instant::now() < end {
        seed += 1;
        let deadline = (Instant::now() + Duration::from_secs(5)).min(end);
        let opened = match first.take() {
            Some(ws) => Ok(ws),
            None => Ws::open(dial, paper, &user, deadline, seed),
        };
        let mut ws = match opened {
            Ok(ws) => ws,
            Err(e) => {
                tally.failure(format!("open: {e}"));
                thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        tally.opened.fetch_add(1, Ordering::Relaxed);
        tally.open.fetch_add(1, Ordering::Relaxed);
        // A new session starts with a full allowance, as the server's does.
        let mut pacer = Pacer::under(limits.rate, limits.burst);
        let mut queue: VecDeque<Out> = script.opening().into();
        let ended = run_session(&mut ws, &mut script, &mut queue, &mut pacer, end, tally);
        tally.open.fetch_sub(1, Ordering::Relaxed);
        if let Err(why) = ended {
            tally.event(why);
            thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Sends on the pacer's schedule and reads in between, until `end` (`Ok`) or
/// until the session ends (`Err`: why, as an event name).
fn run_session(
    ws: &mut Ws,
    script: &mut Script,
    queue: &mut VecDeque<Out>,
    pacer: &mut Pacer,
    end: Instant,
    tally: &Tally,
) -> Result<(), String> {
    loop {
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        if pacer.ready() {
            let out = queue.pop_front().unwrap_or_else(|| script.next());
            pacer.take();
            let (sent, len) = match &out {
                Out::Text(t) => (ws.send_text(t), t.len()),
                Out::Ping(p) => (ws.send_ping(p), p.len()),
            };
            sent.map_err(|e| format!("send failed: {}", e.kind()))?;
            tally.sent(len);
        }
        let until = pacer.next_at().min(end);
        loop {
            match ws.read(until) {
                Ok(Some(Msg::Text(text))) => {
                    if wire::message_type(&text) == b"error" {
                        let code = wire::error_code(&text);
                        // The churn note is gone (deleted by nobody, or a write failed): made again.
                        if code == "not_found" && script.kind == Sender::Churn {
                            queue.extend(script.opening());
                        }
                        tally.event(format!("error {code}"));
                    } else {
                        tally.received.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Some(Msg::Pong)) => {
                    tally.received.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(Msg::Close(code))) => {
                    return Err(format!("close {}", code.map_or("without a code".into(), |c| c.to_string())));
                }
                Ok(None) => break,
                Err(e) => return Err(format!("ended: {e}")),
            }
        }
    }
}

/// Writes `notes` notes of `max_note_bytes` into `paper` (the paper the
/// joiners join), paced under the allowance, and waits for their echoes.
/// Returns how many were echoed.
///
/// # Errors
/// The session could not be opened, or ended before every note was echoed.
pub fn fill(dial: &Dial, paper: &str, notes: usize, limits: &Limits, deadline: Instant) -> Result<usize, String> {
    let mut ws = Ws::open(dial, paper, "h-filler", deadline, 0xF111)?;
    let mut pacer = Pacer::under(limits.rate, limits.burst);
    let (mut sent, mut echoed) = (0, 0);
    let mut data = Vec::new();
    while echoed < notes {
        if Instant::now() >= deadline {
            return Err(format!("{echoed} of {notes} notes echoed in time"));
        }
        if sent < notes && pacer.ready() {
            data.clear();
            wire::note_data(&mut data, 0, sent as u32, 0, limits.max_note_bytes);
            let mut m = format!(r#"{{"type":"upsert","id":"big{sent}","data":"#).into_bytes();
            m.extend_from_slice(&data);
            m.push(b'}');
            ws.send_text(&m).map_err(|e| format!("fill: {e}"))?;
            pacer.take();
            sent += 1;
        }
        let until = if sent < notes { pacer.next_at() } else { deadline };
        while let Some(msg) = ws.read(until.min(deadline))? {
            match msg {
                Msg::Text(t) if wire::message_type(&t) == b"upsert" => echoed += 1,
                Msg::Text(t) if wire::message_type(&t) == b"error" => {
                    return Err(format!("the fill was refused: {}", wire::error_code(&t)));
                }
                Msg::Close(code) => return Err(format!("the fill's session was closed ({code:?})")),
                _ => {}
            }
            if echoed >= notes {
                break;
            }
        }
    }
    Ok(echoed)
}

/// What each connection of a never-reading wave asks for.
#[derive(Clone, Copy)]
pub enum Unread {
    /// A WebSocket session (the snapshot follows the `101`).
    Join,
    /// `GET /papers/{paper}` (the paper follows the `200` head).
    Get,
}

/// Waves of `per_wave` connections to `paper` that never read, one wave every
/// `every` from `span.start`, until `span.end`. Each reads the head of its
/// answer and nothing more (a small receive window, so that the snapshot or
/// the paper stays queued in the server), and is held open until the end.
pub fn unread_waves(
    dial: &Dial,
    paper: &str,
    what: Unread,
    per_wave: usize,
    every: Duration,
    span: Span,
    tally: &Tally,
) {
    let (start, end) = (span.start, span.end);
    let (request, status): (Vec<u8>, &[u8]) = match what {
        Unread::Join => (wire::upgrade_request(&dial.host, paper, "h-joiner", None, None), b"HTTP/1.1 101"),
        Unread::Get => {
            let get = format!("GET /papers/{paper} HTTP/1.1\r\nHost: {}\r\n\r\n", dial.host);
            (get.into_bytes(), b"HTTP/1.1 200")
        }
    };
    let mut held: Vec<TcpStream> = Vec::new();
    let mut wave_at = start;
    while wave_at < end {
        let now = Instant::now();
        if now < wave_at {
            thread::sleep(wave_at - now);
        }
        // A wave that cannot finish before the next one stops there.
        let wave_end = (wave_at + every).min(end);
        for _ in 0..per_wave {
            if Instant::now() >= wave_end {
                tally.event("wave cut short");
                break;
            }
            match open_without_reading(dial, &request, status, wave_end) {
                Ok(tcp) => {
                    held.push(tcp);
                    tally.opened.fetch_add(1, Ordering::Relaxed);
                    tally.open.store(held.len() as u64, Ordering::Relaxed);
                }
                Err(e) => tally.failure(e),
            }
        }
        tally.event("wave");
        wave_at += every;
    }
    let now = Instant::now();
    if now < end {
        thread::sleep(end - now);
    }
    tally.open.store(0, Ordering::Relaxed);
}

fn open_without_reading(dial: &Dial, request: &[u8], status: &[u8], deadline: Instant) -> Result<TcpStream, String> {
    let left =
        |cap: Duration| deadline.saturating_duration_since(Instant::now()).min(cap).max(Duration::from_millis(1));
    let mut tcp = ws::tcp(dial.addr, dial.source, Some(4096), left(Duration::from_secs(2)))
        .map_err(|e| format!("connect: {e}"))?;
    tcp.write_all(request).map_err(|e| format!("upgrade request: {e}"))?;
    // The head only: a byte at a time is cheap for a few hundred bytes.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.set_read_timeout(Some(left(Duration::from_secs(5)))).map_err(|e| e.to_string())?;
        match tcp.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) => return Err("closed before the answer".into()),
            Err(e) => return Err(format!("answer: {e}")),
        }
        if head.len() > 4096 {
            return Err("answer head over 4 KiB".into());
        }
    }
    if !head.starts_with(status) {
        let line = String::from_utf8_lossy(&head).lines().next().unwrap_or("").to_string();
        return Err(format!("refused: {line}"));
    }
    Ok(tcp)
}

/// Most sockets `heads` opens in one second (initially, and again after drops).
const HEAD_OPENS_PER_TICK: usize = 50;

/// `count` connections each sending a request head one byte a second, never
/// finishing it; one the server drops is opened again, until `end`.
pub fn heads(dial: &Dial, paper: &str, count: usize, end: Instant, tally: &Tally) {
    // A header value that never ends: the head is never complete.
    let prefix = format!("GET /ws/{paper} HTTP/1.1\r\nHost: {}\r\nX-Slow: ", dial.host).into_bytes();
    let byte_at = |i: usize| if i < prefix.len() { prefix[i] } else { b'a' };
    let mut socks: Vec<Option<(TcpStream, usize)>> = (0..count).map(|_| None).collect();
    let mut tick = Instant::now();
    while tick < end {
        let mut opened = 0;
        let mut open = 0;
        for slot in &mut socks {
            if Instant::now() >= end {
                break;
            }
            if let Some((tcp, _)) = slot {
                // The server closed it, or answered (408, 503): either way it is gone.
                let mut peek = [0u8; 1];
                let gone = match tcp.peek(&mut peek) {
                    Ok(_) => true,
                    Err(e) => !ws::timed_out(&e),
                };
                if gone {
                    tally.event("dropped by the server");
                    *slot = None;
                }
            }
            if slot.is_none() && opened < HEAD_OPENS_PER_TICK {
                opened += 1;
                match ws::tcp(dial.addr, dial.source, None, Duration::from_millis(500))
                    .and_then(|tcp| tcp.set_nonblocking(true).map(|()| tcp))
                {
                    Ok(tcp) => {
                        tally.opened.fetch_add(1, Ordering::Relaxed);
                        *slot = Some((tcp, 0));
                    }
                    Err(e) => tally.failure(format!("connect: {e}")),
                }
            }
            if let Some((tcp, sent)) = slot {
                match tcp.write(&[byte_at(*sent)]) {
                    Ok(_) => {
                        *sent += 1;
                        tally.sent(1);
                        open += 1;
                    }
                    Err(e) if ws::timed_out(&e) => open += 1,
                    Err(_) => {
                        tally.event("dropped by the server");
                        *slot = None;
                    }
                }
            }
        }
        tally.open.store(open, Ordering::Relaxed);
        tick += Duration::from_secs(1);
        let now = Instant::now();
        if now < tick {
            thread::sleep((tick - now).min(end.saturating_duration_since(now)));
        } else {
            tick = now;
        }
    }
    tally.open.store(0, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(out: Out) -> Vec<u8> {
        match out {
            Out::Text(t) => t,
            Out::Ping(_) => panic!("a ping frame"),
        }
    }

    #[test]
    fn churn_patches_name_new_fields_within_the_note_limit() {
        let mut script = Script::new(Sender::Churn, 225, 16 * 1024, 0);
        let first: serde_json::Value = serde_json::from_slice(&text(script.next())).unwrap();
        let second: serde_json::Value = serde_json::from_slice(&text(script.next())).unwrap();
        let (a, b) = (first["data"].as_object().unwrap(), second["data"].as_object().unwrap());
        assert_eq!((a.len(), b.len()), (225, 225));
        assert!(a.keys().all(|k| k.len() == 64 && !b.contains_key(k)));
        assert!(a.values().all(serde_json::Value::is_null));
        assert!(serde_json::to_vec(&first["data"]).unwrap().len() <= 16 * 1024);
    }

    #[test]
    fn wide_notes_are_exactly_the_limit_and_patches_name_every_field() {
        let mut script = Script::new(Sender::Wide, 225, 16 * 1024, 3);
        let upsert: serde_json::Value = serde_json::from_slice(&text(script.next())).unwrap();
        let patch: serde_json::Value = serde_json::from_slice(&text(script.next())).unwrap();
        assert_eq!((upsert["type"].as_str(), patch["type"].as_str()), (Some("upsert"), Some("patch")));
        assert_eq!(upsert["id"], patch["id"]);
        assert_eq!(serde_json::to_vec(&upsert["data"]).unwrap().len(), 16 * 1024);
        let fields = patch["data"].as_object().unwrap();
        assert!(fields.len() > 150, "{}", fields.len());
        assert!(fields.keys().all(|k| k.len() == 64));
    }

    #[test]
    fn delete_storms_mix_never_created_ids_with_create_and_delete() {
        let mut script = Script::new(Sender::Deletes, 0, 1024, 0);
        let types: Vec<serde_json::Value> =
            (0..6).map(|_| serde_json::from_slice(&text(script.next())).unwrap()).collect();
        assert_eq!(types[0]["type"], "delete");
        assert_eq!((types[1]["type"].as_str(), types[2]["type"].as_str()), (Some("upsert"), Some("delete")));
        assert_eq!(types[1]["id"], types[2]["id"]);
        assert_ne!(types[0]["id"], types[3]["id"]);
    }
}
