//! The honest clients of the abuse mode: members of their own papers, some of
//! them editing at a normal rate, every one reading all it is sent. What they
//! measure is edit-to-`saved`: from sending an `upsert` to the `saved` that
//! covers its version (PROTOCOL.md 3.1). An edit never confirmed (refused, or
//! not saved by the end of the drain) counts with the time it waited until
//! then, a lower bound of its latency.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::ws::{Dial, Msg, Ws};

/// Everything the honest members measured, shared by their threads.
#[derive(Default)]
pub struct Ledger {
    /// Each confirmed edit: when `saved` came (seconds from the window's
    /// start), and the edit's latency in ms.
    pub saved: Mutex<Vec<(f64, f64)>>,
    /// Each edit never confirmed: when it was sent, and how long it waited (ms).
    pub unsaved: Mutex<Vec<(f64, f64)>>,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// Refusals by code, closes by code, failures.
    pub events: Mutex<BTreeMap<String, u64>>,
}

impl Ledger {
    fn event(&self, what: impl Into<String>) {
        *self.events.lock().unwrap().entry(what.into()).or_default() += 1;
    }
}

/// One honest member's part.
pub struct Member {
    pub dial: Dial,
    pub paper: String,
    pub user: String,
    /// Edits a second, if it sends.
    pub rate: Option<f64>,
    pub note_bytes: usize,
    pub seed: u64,
    /// When its first edit goes, after the window's start (the api mode
    /// spreads its members over a period, so that they do not all send in
    /// the same instant; the abuse mode does not).
    pub offset: Duration,
}

/// When the window starts, and when sending and reading stop.
#[derive(Clone, Copy)]
pub struct Window {
    pub start: Instant,
    pub send_end: Instant,
    pub drain_end: Instant,
}

/// An edit sent and not confirmed yet.
struct Pending {
    r: String,
    sent: Instant,
    v: Option<u64>,
}

/// Connects (says so on `ready`: true if joined), waits for the window on `go`,
/// then edits and reads until the drain ends. Every wait is bounded.
pub fn member(m: Member, ready: mpsc::Sender<bool>, go: mpsc::Receiver<Window>, ledger: &Ledger) {
    let join_deadline = Instant::now() + Duration::from_secs(30);
    let first = join(&m, join_deadline, ledger);
    let _ = ready.send(first.is_some());
    let Ok(window) = go.recv_timeout(Duration::from_secs(600)) else { return };
    let mut session = first;
    let mut pending: Vec<Pending> = Vec::new();
    let period = m.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let mut next_send = window.start + m.offset;
    let mut seq = 0u64;
    let mut pad = String::new();
    while Instant::now() < window.drain_end {
        let now = Instant::now();
        let sending = period.is_some() && now < window.send_end;
        if !sending && pending.is_empty() {
            break;
        }
        let Some((ws, you)) = session.as_mut() else {
            // Edits sent on the lost connection are never confirmed now.
            if now >= window.send_end {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            session = join(&m, (now + Duration::from_secs(5)).min(window.send_end), ledger);
            continue;
        };
        if let (true, Some(period)) = (sending, period) {
            if now >= next_send {
                let r = format!("e{seq}");
                pad.clear();
                pad.extend(std::iter::repeat_n('x', m.note_bytes.saturating_sub(40)));
                let msg = format!(
                    r#"{{"type":"upsert","id":"{}","data":{{"text":"edit {seq}","pad":"{pad}"}},"ref":"{r}"}}"#,
                    m.user
                );
                seq += 1;
                // Open loop: a late send does not move the schedule.
                next_send += period;
                if let Err(e) = ws.send_text(msg.as_bytes()) {
                    ledger.event(format!("send failed: {}", e.kind()));
                    session = None;
                    continue;
                }
                ledger.sent.fetch_add(1, Ordering::Relaxed);
                pending.push(Pending { r, sent: now, v: None });
            }
        }
        let until = if sending { next_send.min(window.send_end) } else { window.drain_end };
        let read = ws.read(until);
        match read {
            Ok(Some(Msg::Text(text))) => {
                ledger.received.fetch_add(1, Ordering::Relaxed);
                if let Ok(msg) = serde_json::from_slice::<Value>(&text) {
                    on_message(&msg, you, &mut pending, &window, ledger);
                }
            }
            Ok(Some(Msg::Close(code))) => {
                ledger.event(format!("close {}", code.map_or("without a code".into(), |c| c.to_string())));
                session = None;
            }
            Ok(Some(Msg::Pong) | None) => {}
            Err(e) => {
                ledger.event(format!("ended: {e}"));
                session = None;
            }
        }
        if session.is_none() {
            give_up(&mut pending, &window, ledger);
        }
    }
    give_up(&mut pending, &window, ledger);
}

fn on_message(msg: &Value, you: &str, pending: &mut Vec<Pending>, window: &Window, ledger: &Ledger) {
    match msg["type"].as_str().unwrap_or_default() {
        "upsert" if msg["from"] == you => {
            let r = msg["ref"].as_str().unwrap_or_default();
            if let Some(p) = pending.iter_mut().find(|p| p.r == r) {
                p.v = msg["v"].as_u64();
            }
        }
        "saved" => {
            let Some(saved) = msg["v"].as_u64() else { return };
            let now = Instant::now();
            let at = now.saturating_duration_since(window.start).as_secs_f64();
            let mut done = ledger.saved.lock().unwrap();
            pending.retain(|p| match p.v {
                Some(v) if v <= saved => {
                    done.push((at, now.duration_since(p.sent).as_secs_f64() * 1e3));
                    false
                }
                _ => true,
            });
        }
        "error" => {
            ledger.event(format!("error {}", msg["code"].as_str().unwrap_or("?")));
            if let Some(r) = msg["ref"].as_str() {
                if let Some(i) = pending.iter().position(|p| p.r == r) {
                    let p = pending.remove(i);
                    unsaved(&p, window, ledger);
                }
            }
        }
        _ => {}
    }
}

fn unsaved(p: &Pending, window: &Window, ledger: &Ledger) {
    let sent = p.sent.saturating_duration_since(window.start).as_secs_f64();
    let waited = window.drain_end.saturating_duration_since(p.sent).as_secs_f64() * 1e3;
    ledger.unsaved.lock().unwrap().push((sent, waited));
}

fn give_up(pending: &mut Vec<Pending>, window: &Window, ledger: &Ledger) {
    for p in pending.drain(..) {
        unsaved(&p, window, ledger);
    }
}

/// A session and its `you`, once the snapshot came.
fn join(m: &Member, deadline: Instant, ledger: &Ledger) -> Option<(Ws, String)> {
    let mut ws = match Ws::open(&m.dial, &m.paper, &m.user, deadline, m.seed) {
        Ok(ws) => ws,
        Err(e) => {
            ledger.event(format!("join failed: {}", e.split(':').next().unwrap_or("")));
            return None;
        }
    };
    loop {
        match ws.read(deadline) {
            Ok(Some(Msg::Text(text))) => {
                let msg: Value = serde_json::from_slice(&text).ok()?;
                if msg["type"] == "snapshot" {
                    return Some((ws, msg["you"].as_str().unwrap_or_default().to_string()));
                }
            }
            Ok(Some(Msg::Pong)) => {}
            Ok(Some(Msg::Close(code))) => {
                ledger.event(format!("join closed {code:?}"));
                return None;
            }
            Ok(None) => {
                ledger.event("join: no snapshot in time");
                return None;
            }
            Err(e) => {
                ledger.event(format!("join: {e}"));
                return None;
            }
        }
    }
}
