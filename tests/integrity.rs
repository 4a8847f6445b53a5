//! PROTOCOL.md 2, 3.1, 3.3 and 4 (version 1.1): what the server does with values
//! it did not write itself (foreign versions, unreadable bytes, keys of the wrong
//! type), and what `saved`, `write_failed` and `completed` promise while Redis
//! misbehaves. Each test is one reproduction or one rule, checked the way a user
//! would check it: by the messages received and by what Redis holds.

use rollingpaper::store::keys;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{deadline, eventually, Client, Paused, Redis, Server, PATIENCE};

/// 2^53: versions are integers in [1, 2^53).
const V_LIMIT: u64 = 1 << 53;
/// A version the server assigns today is a clock reading above this.
const V_FLOOR: u64 = 1_600_000_000_000_000;

/// A note as a user compares it: `id -> {author, data, v}`.
type Notes = BTreeMap<String, Value>;

// ---- members that remember what they were sent ------------------------------------

/// A session plus every message it received after its first snapshot, so that
/// its view of the paper can be rebuilt the way a client builds it.
struct Member {
    client: Client,
    seen: Vec<Value>,
}

/// What one bounded read of a session gave.
enum Got {
    Msg(Value),
    Quiet,
    Closed,
}

impl Member {
    fn join(server: &Server, paper: &str, user: &str) -> Member {
        Member { client: server.join(paper, &format!("user={user}")), seen: Vec::new() }
    }

    fn you(&self) -> &str {
        &self.client.you
    }

    fn send(&mut self, msg: Value) {
        self.client.send(msg);
    }

    fn upsert(&mut self, id: &str, data: Value, r: &str) {
        self.send(json!({"type": "upsert", "id": id, "data": data, "ref": r}));
    }

    fn delete(&mut self, id: &str, r: &str) {
        self.send(json!({"type": "delete", "id": id, "ref": r}));
    }

    /// One message before `until`, without panicking on silence or a close.
    fn read(&mut self, until: Instant) -> Got {
        loop {
            if Instant::now() >= until {
                return Got::Quiet;
            }
            match self.client.ws.read() {
                Ok(tungstenite::Message::Text(text)) => {
                    let msg: Value = serde_json::from_str(&text).unwrap();
                    self.seen.push(msg.clone());
                    return Got::Msg(msg);
                }
                Ok(tungstenite::Message::Close(_)) => return Got::Closed,
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return Got::Closed,
            }
        }
    }

    /// The first message matching `pred` within `within`, or `None`.
    fn wait_for(&mut self, within: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let until = Instant::now() + within;
        loop {
            match self.read(until) {
                Got::Msg(msg) if pred(&msg) => return Some(msg),
                Got::Msg(_) => {}
                Got::Quiet | Got::Closed => return None,
            }
        }
    }

    /// The first message matching `pred`; panics with `what` at the deadline.
    fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        match self.wait_for(PATIENCE, pred) {
            Some(msg) => msg,
            None => panic!("{} never received {what}; it got {:?}", self.you(), self.seen),
        }
    }

    /// The server's answer to the message with ref `r`: its broadcast or its refusal.
    fn reply_to(&mut self, r: &str) -> Value {
        self.expect(&format!("the answer to ref {r}"), |m| m["ref"] == r)
    }

    /// The broadcast of the edit with ref `r`; panics on its refusal.
    fn accepted(&mut self, r: &str) -> u64 {
        let reply = self.reply_to(r);
        assert_ne!(reply["type"], "error", "edit {r} refused: {reply}");
        version(&reply)
    }

    /// Waits for a `saved` covering `v`; panics if an error with `r` comes first.
    fn saved(&mut self, v: u64, r: &str) -> u64 {
        let msg = self.expect(&format!("a saved covering {v} (ref {r})"), |m| {
            (m["type"] == "saved" && m["v"].as_u64().is_some_and(|s| s >= v)) || (m["type"] == "error" && m["ref"] == r)
        });
        assert_eq!(msg["type"], "saved", "edit {r} at v {v} was refused after its broadcast: {msg}");
        version(&msg)
    }

    /// Everything queued for this session now (a ping barrier).
    fn drain(&mut self) -> Vec<Value> {
        self.send(json!({"type": "ping"}));
        let from = self.seen.len();
        self.expect("pong", |m| m["type"] == "pong");
        self.seen[from..].to_vec()
    }

    /// The paper as this member sees it: its snapshot with every message applied
    /// in order, as PROTOCOL.md 3.1 says a client does.
    fn view(&self) -> Notes {
        let mut notes = notes_of(&self.client.snapshot["notes"]);
        for msg in &self.seen {
            match msg["type"].as_str() {
                Some("snapshot") if msg.get("since").is_some() => {
                    for note in msg["notes"].as_array().unwrap() {
                        let id = note["id"].as_str().unwrap().to_string();
                        if note.get("deleted").is_some() {
                            notes.remove(&id);
                        } else {
                            notes.insert(id, note_value(note));
                        }
                    }
                }
                Some("snapshot") => notes = notes_of(&msg["notes"]),
                Some("completed") => notes = notes_of(&msg["notes"]),
                Some("upsert") => {
                    notes.insert(msg["id"].as_str().unwrap().to_string(), note_value(msg));
                }
                Some("delete") => {
                    notes.remove(msg["id"].as_str().unwrap());
                }
                _ => {}
            }
        }
        notes
    }
}

/// A message's `v`, which must be a normal version.
fn version(msg: &Value) -> u64 {
    let v = msg["v"].as_u64().unwrap_or_else(|| panic!("no integer v in {msg}"));
    assert!(v > V_FLOOR && v < V_LIMIT - 1, "not a normal version: {msg}");
    v
}

fn note_value(note: &Value) -> Value {
    json!({"author": note["author"], "data": note["data"], "v": note["v"]})
}

fn notes_of(list: &Value) -> Notes {
    let list = list.as_array().unwrap_or_else(|| panic!("not a notes array: {list}"));
    list.iter().map(|n| (n["id"].as_str().unwrap().to_string(), note_value(n))).collect()
}

fn ids(notes: &Notes) -> Vec<&str> {
    notes.keys().map(String::as_str).collect()
}

// ---- Redis as a user reads it --------------------------------------------------------

fn hset(redis: &Redis, key: &str, field: &str, value: impl redis::ToRedisArgs) {
    let _: i64 = redis::cmd("HSET").arg(key).arg(field).arg(value).query(&mut redis.conn()).unwrap();
}

fn run(redis: &Redis, args: &[&str]) {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    let _: redis::Value = cmd.query(&mut redis.conn()).unwrap();
}

/// The live notes of a paper in Redis (tombstones left out).
fn live_in_redis(redis: &Redis, paper: &str) -> Notes {
    redis
        .hgetall(&keys::notes(paper))
        .into_iter()
        .filter_map(|(id, value)| {
            let value: Value = serde_json::from_str(&value).unwrap();
            value.get("deleted").is_none().then(|| (id, note_value(&value)))
        })
        .collect()
}

/// The stream entries for `paper`, each its parsed `snapshot`.
fn stream_entries(redis: &Redis, paper: &str) -> Vec<Value> {
    let entries: Vec<(String, Vec<(String, String)>)> =
        redis::cmd("XRANGE").arg("rp:papers:completed").arg("-").arg("+").query(&mut redis.conn()).unwrap();
    entries
        .into_iter()
        .filter_map(|(_, fields)| {
            let fields: BTreeMap<String, String> = fields.into_iter().collect();
            (fields.get("paper").map(String::as_str) == Some(paper))
                .then(|| serde_json::from_str(&fields["snapshot"]).unwrap())
        })
        .collect()
}

/// The single stream entry of a sealed paper, once it is there.
fn sealed_entry(redis: &Redis, paper: &str) -> Value {
    let mut entries = eventually(&format!("the stream entry of {paper}"), || {
        let entries = stream_entries(redis, paper);
        (!entries.is_empty()).then_some(entries)
    });
    assert_eq!(entries.len(), 1, "one stream entry per sealed paper: {entries:?}");
    let entry = entries.remove(0);
    assert_eq!((&entry["paper"], &entry["completed"]), (&json!(paper), &json!(true)), "{entry}");
    entry
}

// ---- the server's own pages -------------------------------------------------------

/// The sum of every sample of a metric (all label sets), 0 when absent.
fn metric(server: &Server, name: &str) -> f64 {
    let (status, _, body) = server.get("/metrics");
    assert_eq!(status, 200);
    samples(&body, name).iter().map(|(_, value)| value).sum()
}

/// The samples of a metric as `(labels, value)`.
fn samples(body: &str, name: &str) -> Vec<(String, f64)> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = if let Some(labelled) = rest.strip_prefix('{') {
                let (labels, value) = labelled.split_once('}')?;
                (labels.to_string(), value)
            } else if rest.starts_with(' ') {
                (String::new(), rest)
            } else {
                return None;
            };
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// Whether `text` holds `word` as a whole word (a paper id, not part of "paper").
fn names(text: &str, word: &str) -> bool {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-')).any(|w| w == word)
}

fn node(redis: &Redis, id: &str) -> Server {
    let server = Server::redis(redis, &["--cluster", "--node-id", id, "--rate", "100000", "--burst", "100000"]);
    eventually(&format!("node {id} ready"), || (server.get("/readyz").0 == 200).then_some(()));
    server
}

/// A clean stop: SIGTERM, exit status 0.
fn stops_cleanly(server: Server) {
    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM: {status}");
}

/// Upserts a note with a ref and waits until it is broadcast and saved; returns `v`.
fn write_saved(member: &mut Member, id: &str, data: Value, r: &str) -> u64 {
    member.upsert(id, data, r);
    let v = member.accepted(r);
    member.saved(v, r);
    v
}

/// A paper that works: a normal version, `saved`, and Redis holding the note.
fn paper_works(server: &Server, redis: &Redis, paper: &str) {
    let mut m = Member::join(server, paper, "ok");
    let v = write_saved(&mut m, "fine", json!({"ok": true}), &format!("{paper}-fine"));
    assert_eq!(redis.note(paper, "fine"), Some(json!({"author": "ok", "data": {"ok": true}, "v": v})));
}

// ---- foreign versions (PROTOCOL.md 2) ---------------------------------------------------

#[test]
fn a_stored_version_at_the_limit_limits_only_its_own_note() {
    let redis = Redis::start();
    hset(&redis, &keys::notes("poison"), "n0", format!(r#"{{"author":"x","data":{{}},"v":{}}}"#, V_LIMIT - 1));
    let server = Server::redis(&redis, &["--threads", "1"]);
    let mut a = Member::join(&server, "poison", "a");
    assert_eq!(
        notes_of(&a.client.snapshot["notes"]),
        Notes::from([("n0".into(), json!({"author": "x", "data": {}, "v": V_LIMIT - 1}))])
    );

    let v = write_saved(&mut a, "n1", json!({"t": 1}), "up-n1");
    assert_eq!(redis.note("poison", "n1"), Some(json!({"author": "a", "data": {"t": 1}, "v": v})));
    a.delete("n1", "del-n1");
    let v_del = a.accepted("del-n1");
    a.saved(v_del, "del-n1");
    assert_eq!(redis.note("poison", "n1"), Some(json!({"deleted": true, "v": v_del})));
    let fresh = Member::join(&server, "poison", "f");
    assert_eq!(ids(&notes_of(&fresh.client.snapshot["notes"])), ["n0"]);

    // n0 cannot advance: refused, not broadcast at an impossible version.
    a.upsert("n0", json!({"t": 2}), "up-n0");
    let reply = a.reply_to("up-n0");
    assert_eq!((&reply["type"], &reply["code"]), (&json!("error"), &json!("unavailable")), "{reply}");
    let later = a.drain();
    assert!(!later.iter().any(|m| m["type"] == "upsert" && m["id"] == "n0"), "{later:?}");

    paper_works(&server, &redis, "clean");
    stops_cleanly(server);
}

#[test]
fn stored_versions_out_of_range_are_skipped_and_counted() {
    let redis = Redis::start();
    let key = keys::notes("odd");
    let bad = ["18446744073709551615", "9007199254740992", "0", "-1", "1.5", r#""x""#];
    for (i, v) in bad.iter().enumerate() {
        hset(&redis, &key, &format!("bad{i}"), format!(r#"{{"author":"x","data":{{}},"v":{v}}}"#));
    }
    hset(&redis, &key, "good", r#"{"author":"x","data":{"ok":1},"v":1700000000000000}"#);
    let server = Server::redis(&redis, &[]);
    let before = metric(&server, "rollingpaper_corrupt_values_total");

    let joined = Instant::now();
    let mut a = Member::join(&server, "odd", "a");
    assert!(joined.elapsed() < Duration::from_secs(5), "the paper took {:?} to load", joined.elapsed());
    assert_eq!(ids(&notes_of(&a.client.snapshot["notes"])), ["good"]);
    let after = metric(&server, "rollingpaper_corrupt_values_total");
    assert!(after > before, "rollingpaper_corrupt_values_total went from {before} to {after}");

    let v = write_saved(&mut a, "bad0", json!({"new": true}), "r-bad0");
    assert_eq!(redis.note("odd", "bad0"), Some(json!({"author": "a", "data": {"new": true}, "v": v})));
    stops_cleanly(server);
}

#[test]
fn a_relayed_version_out_of_range_is_dropped() {
    let redis = Redis::start();
    let (node_a, node_b) = (node(&redis, "a"), node(&redis, "b"));
    let mut a = Member::join(&node_a, "relayed", "ann");
    let mut b = Member::join(&node_b, "relayed", "bob");
    a.expect("bob's join", |m| m["type"] == "join");

    let channel = &keys::channel("relayed");
    let poison = r#"zz
{"type":"upsert","id":"n0","author":"x","data":{},"v":18446744073709551615,"from":"c1-zz"}"#;
    // A valid message after it, on the same channel from the same publisher: once
    // it arrives, the one before it was handled.
    let marker = format!(
        "zz\n{}",
        json!({"type": "upsert", "id": "marker", "author": "x", "data": {}, "v": V_FLOOR + 1, "from": "c1-zz"})
    );
    run(&redis, &["PUBLISH", channel, poison]);
    run(&redis, &["PUBLISH", channel, &marker]);
    for member in [&mut a, &mut b] {
        member.expect("the marker", |m| m["type"] == "upsert" && m["id"] == "marker");
        assert!(!member.seen.iter().any(|m| m["id"] == "n0"), "{:?}", member.seen);
    }

    for (member, r) in [(&mut a, "after-a"), (&mut b, "after-b")] {
        let v = write_saved(member, r, json!({}), r);
        assert_eq!(redis.note("relayed", r).unwrap()["v"], v);
    }
    stops_cleanly(node_a);
    stops_cleanly(node_b);
}

#[test]
fn a_skipped_value_does_not_swallow_the_next_edit() {
    let redis = Redis::start();
    hset(&redis, &keys::notes("p4"), "n0", r#"{"author":"a","data":[1],"v":1839999999999999}"#);
    let server = Server::redis(&redis, &[]);
    let mut a = Member::join(&server, "p4", "a");
    assert!(ids(&notes_of(&a.client.snapshot["notes"])).is_empty(), "{}", a.client.snapshot);
    let v = write_saved(&mut a, "n0", json!({"fresh": true}), "r-n0");
    assert_eq!(redis.note("p4", "n0"), Some(json!({"author": "a", "data": {"fresh": true}, "v": v})));
    stops_cleanly(server);
}

#[test]
fn unreadable_bytes_are_skipped_and_the_paper_loads() {
    let redis = Redis::start();
    let raw: Vec<u8> = b"{\"author\":\"a\",\"data\":{\"t\":\"\xff\"},\"v\":5}".to_vec();
    hset(&redis, &keys::notes("bytes"), "broken", raw);
    hset(&redis, &keys::notes("bytes"), "good", r#"{"author":"a","data":{"t":"ok"},"v":1700000000000000}"#);
    hset(&redis, &keys::meta("bytes"), "completed", "0");
    hset(&redis, &keys::meta("bytes"), "completed_by", b"\xfe\xff".to_vec());
    let server = Server::redis(&redis, &[]);
    let before = metric(&server, "rollingpaper_corrupt_values_total");

    let mut joiner = Member { client: server.connect("/ws/bytes"), seen: Vec::new() };
    let first = match joiner.read(Instant::now() + Duration::from_secs(5)) {
        Got::Msg(msg) => msg,
        Got::Quiet => panic!("no snapshot within 5 s"),
        Got::Closed => panic!("closed instead of a snapshot"),
    };
    assert_eq!(first["type"], "snapshot", "{first}");
    assert_eq!(first["completed"], false, "{first}");
    assert_eq!(ids(&notes_of(&first["notes"])), ["good"]);
    let after = metric(&server, "rollingpaper_corrupt_values_total");
    assert!(after > before, "rollingpaper_corrupt_values_total went from {before} to {after}");
    stops_cleanly(server);
}

#[test]
fn an_out_of_range_retention_is_refused_at_start() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rollingpaper"))
        .args(["--listen", "127.0.0.1:0", "--store", "memory", "--completed-retention", "10000000000000000"])
        .env_clear()
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let until = deadline();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= until {
            // A server that started must not outlive the test.
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server started with --completed-retention 10000000000000000");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "exit status {status}; stderr: {stderr}");
    assert!(stderr.contains("--completed-retention"), "{stderr}");
    // The allowed range: some bound is stated in digits, next to a word for it.
    let says_range = ["between", "range", "at most", "up to", "..", "maximum"].iter().any(|w| stderr.contains(w));
    assert!(says_range && stderr.chars().any(|c| c.is_ascii_digit()), "no allowed range in: {stderr}");
}

// ---- write_failed and unavailable (PROTOCOL.md 3.3) -----------------------------------

/// A member of a paper whose key in Redis is turned into a string after it loaded:
/// the edit is broadcast, then refused with `write_failed`, never `saved`, while
/// another paper goes on. Returns the broken paper's member and the other's.
fn write_fails_for_one_paper(server: &Server, redis: &Redis, broken: &str, key: &str) -> (Member, Member) {
    let mut a = Member::join(server, broken, "a");
    let mut b = Member::join(server, "pb", "b");
    run(redis, &["SET", key, "oops"]);

    a.upsert("n1", json!({"t": 1}), "r1");
    let v1 = a.accepted("r1");
    let refusal = a.expect("write_failed for r1", |m| m["type"] == "error");
    assert_eq!((&refusal["code"], &refusal["ref"]), (&json!("write_failed"), &json!("r1")), "{refusal}");
    assert!(!a.seen.iter().any(|m| m["type"] == "saved" && m["v"].as_u64() >= Some(v1)), "{:?}", a.seen);

    // The other paper is not held up by it.
    let started = Instant::now();
    let vb = write_saved(&mut b, "m1", json!({"t": 2}), "rb");
    assert!(started.elapsed() < Duration::from_secs(5), "pb's edit took {:?}", started.elapsed());
    assert_eq!(redis.note("pb", "m1"), Some(json!({"author": "b", "data": {"t": 2}, "v": vb})));

    // The broken paper refuses new edits until it can be written again.
    a.upsert("n2", json!({"t": 3}), "r2");
    let reply = a.reply_to("r2");
    assert_eq!((&reply["type"], &reply["code"]), (&json!("error"), &json!("unavailable")), "{reply}");
    let later = a.drain();
    assert!(!later.iter().any(|m| m["type"] == "saved" && m["v"].as_u64() >= Some(v1)), "{later:?}");
    (a, b)
}

/// Sends the upsert again (every 100 ms, a retry as a client would) while the
/// paper answers `unavailable`, until it is accepted; waits for its `saved` and
/// returns its version.
fn saved_once_writable(a: &mut Member, id: &str, data: Value) -> u64 {
    let until = deadline();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let r = format!("again{attempt}");
        a.upsert(id, data.clone(), &r);
        let reply = a.reply_to(&r);
        if reply["type"] != "error" {
            let v = version(&reply);
            a.saved(v, &r);
            return v;
        }
        assert_eq!(reply["code"], "unavailable", "{reply}");
        assert!(Instant::now() < until && attempt < 200, "the paper never accepted an edit again");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_key_of_the_wrong_type_fails_one_paper_and_it_recovers() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &[]);
    let (mut a, _b) = write_fails_for_one_paper(&server, &redis, "pa", &keys::notes("pa"));

    eventually("/readyz to name pa and Redis's error", || {
        let (status, _, body) = server.get("/readyz");
        assert_eq!(status, 200, "Redis answers, so the node is ready: {body}");
        (names(&body, "pa") && body.contains("WRONGTYPE")).then_some(())
    });
    eventually("rollingpaper_failed_ops_total with a reason", || {
        let (_, _, metrics) = server.get("/metrics");
        let failed = samples(&metrics, "rollingpaper_failed_ops_total");
        failed.iter().any(|(labels, value)| labels.contains("reason=") && *value > 0.0).then_some(())
    });

    run(&redis, &["DEL", &keys::notes("pa")]);
    let v = saved_once_writable(&mut a, "n3", json!({"t": 4}));
    assert_eq!(redis.note("pa", "n3"), Some(json!({"author": "a", "data": {"t": 4}, "v": v})));

    // The correction: a full snapshot replaced what the member held, so its view
    // is what Redis holds (n1, broadcast but never stored, is gone).
    assert!(a.seen.iter().any(|m| m["type"] == "snapshot" && m.get("since").is_none()), "{:?}", a.seen);
    a.drain();
    assert_eq!(a.view(), live_in_redis(&redis, "pa"));
    stops_cleanly(server);
}

#[test]
fn a_meta_key_of_the_wrong_type_fails_only_its_paper() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &[]);
    write_fails_for_one_paper(&server, &redis, "pm", &keys::meta("pm"));
    stops_cleanly(server);
}

#[test]
fn a_paper_that_can_be_read_but_not_written_stays_unavailable_until_it_can_be_written() {
    // The loader never reads the tombstones key, but every write touches it: a
    // probe that only read would take the paper back, and its edits would fail
    // again, each time (PROTOCOL.md 3.3: `unavailable` until readable and writable).
    let redis = Redis::start();
    let mut server = Server::redis(&redis, &[]);
    let tombstones = &keys::tombstones("pt");
    let (mut a, _b) = write_fails_for_one_paper(&server, &redis, "pt", tombstones);
    // Two probes read the paper and find it cannot be written.
    for _ in 0..2 {
        server.wait_log("paper pt can be read but not written");
    }
    a.upsert("n4", json!({"t": 5}), "r4");
    let reply = a.reply_to("r4");
    assert_eq!((&reply["type"], &reply["code"]), (&json!("error"), &json!("unavailable")), "{reply}");
    assert!(!a.seen.iter().any(|m| m["type"] == "snapshot"), "taken back while unwritable: {:?}", a.seen);

    run(&redis, &["DEL", tombstones]);
    saved_once_writable(&mut a, "n5", json!({"t": 6}));
    assert!(!a.seen.iter().any(|m| m["type"] == "error" && m["code"] == "write_failed" && m["ref"] != "r1"));
    stops_cleanly(server);
}

#[test]
fn saved_waits_while_redis_does_not_answer() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &[]);
    let mut a = Member::join(&server, "paused", "a");
    write_saved(&mut a, "warm", json!({}), "warm");

    let paused = Paused::redis(&redis);
    a.upsert("n1", json!({"t": 1}), "r1");
    let v = a.accepted("r1");
    let early = a.wait_for(Duration::from_secs(1), |m| m["type"] == "saved" && m["v"].as_u64() >= Some(v));
    assert!(early.is_none(), "saved while Redis was stopped: {early:?}");
    drop(paused);
    a.saved(v, "r1");
    assert_eq!(redis.note("paused", "n1"), Some(json!({"author": "a", "data": {"t": 1}, "v": v})));
    stops_cleanly(server);
}

// ---- completion (PROTOCOL.md 3.1, 4) -------------------------------------------------

/// `completed` as received: from `by`, with the notes as sealed.
fn completed_notes(msg: &Value, by: &str) -> Notes {
    assert_eq!(msg["by"], by, "{msg}");
    assert!(msg["notes"].is_array(), "completed carries no notes: {msg}");
    notes_of(&msg["notes"])
}

#[test]
fn completed_carries_the_sealed_notes() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &[]);
    let mut a = Member::join(&server, "p9", "a");
    let mut b = Member::join(&server, "p9", "b");
    for i in 0..3 {
        a.upsert(&format!("n{i}"), json!({"i": i}), &format!("u{i}"));
        a.accepted(&format!("u{i}"));
    }
    b.delete("n1", "d1");
    let v = b.accepted("d1");
    b.saved(v, "d1");

    a.send(json!({"type": "complete"}));
    let for_a = completed_notes(&a.expect("completed", |m| m["type"] == "completed"), "a");
    let for_b = completed_notes(&b.expect("completed", |m| m["type"] == "completed"), "a");
    let entry = sealed_entry(&redis, "p9");
    assert_eq!(ids(&for_a), ["n0", "n2"]);
    assert_eq!(for_a, for_b);
    assert_eq!(for_a, notes_of(&entry["notes"]));
    assert_eq!(for_a, live_in_redis(&redis, "p9"));

    b.upsert("n5", json!({}), "late");
    let reply = b.reply_to("late");
    assert_eq!((&reply["type"], &reply["code"]), (&json!("error"), &json!("paper_completed")), "{reply}");
    stops_cleanly(server);
}

#[test]
fn the_seal_and_a_concurrent_edit_agree_everywhere() {
    let redis = Redis::start();
    let (node_a, node_b) = (node(&redis, "a"), node(&redis, "b"));
    let mut outcomes = (0, 0);
    for i in 0..16u64 {
        let paper = format!("seal{i}");
        let mut a = Member::join(&node_a, &paper, "a");
        let mut b = Member::join(&node_b, &paper, "b");
        a.expect("b's join", |m| m["type"] == "join");
        write_saved(&mut a, "base", json!({"i": i}), "base");
        b.expect("the base note", |m| m["type"] == "upsert" && m["id"] == "base");

        a.send(json!({"type": "complete"}));
        std::thread::sleep(Duration::from_micros(i % 6 * 1000));
        b.upsert("late", json!({"i": i}), "late");

        // b's edit is resolved either way, and b hears of the seal.
        let mut late_v = None;
        let mut saved = false;
        let mut refused = false;
        let until = deadline();
        while !(saved || refused) || !b.seen.iter().any(|m| m["type"] == "completed") {
            let msg = match b.read(until) {
                Got::Msg(msg) => msg,
                _ => panic!("{paper}: b's edit unresolved or no completed: {:?}", b.seen),
            };
            match msg["type"].as_str() {
                Some("upsert") if msg["ref"] == "late" => late_v = Some(version(&msg)),
                Some("saved") if late_v.is_some_and(|v| msg["v"].as_u64() >= Some(v)) => saved = true,
                Some("error") if msg["ref"] == "late" => {
                    assert_eq!(msg["code"], "paper_completed", "{paper}: {msg}");
                    refused = true;
                }
                _ => {}
            }
        }
        assert!(!(saved && refused), "{paper}: b's edit both saved and refused: {:?}", b.seen);
        let for_a = completed_notes(&a.expect("completed", |m| m["type"] == "completed"), "a");
        let for_b = completed_notes(b.seen.iter().find(|m| m["type"] == "completed").unwrap(), "a");
        let entry = sealed_entry(&redis, &paper);
        let stored = live_in_redis(&redis, &paper);
        assert_eq!(for_a, for_b, "{paper}");
        assert_eq!(for_a, notes_of(&entry["notes"]), "{paper}: completed vs the stream entry");
        assert_eq!(for_a, stored, "{paper}: completed vs the notes hash");
        assert_eq!(stored.contains_key("late"), saved, "{paper}: saved={saved}, stored {stored:?}");
        if saved {
            outcomes.0 += 1;
        } else {
            outcomes.1 += 1;
        }
    }
    for i in 0..16 {
        assert_eq!(stream_entries(&redis, &format!("seal{i}")).len(), 1, "seal{i}: one stream entry");
    }
    eprintln!("seal race: the edit won {} times, the seal {} times", outcomes.0, outcomes.1);
    stops_cleanly(node_a);
    stops_cleanly(node_b);
}
