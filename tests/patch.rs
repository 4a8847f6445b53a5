//! PROTOCOL.md 2, 3.1 and 3.2 (1.1): field patches, each field last-writer-wins
//! on its own, on one node and across nodes.

use rollingpaper::store::keys;
use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::common::{eventually, token, unix_now, Client, Redis, Server, SECRET};

/// A client's notes (id -> data), kept by applying messages in order.
#[derive(Default, Debug, PartialEq)]
struct Notes(BTreeMap<String, Map<String, Value>>);

impl Notes {
    fn from_snapshot(snapshot: &Value) -> Notes {
        let mut notes = Notes::default();
        for n in snapshot["notes"].as_array().unwrap() {
            notes.0.insert(n["id"].as_str().unwrap().into(), n["data"].as_object().unwrap().clone());
        }
        notes
    }

    fn apply(&mut self, msg: &Value) {
        let id = msg["id"].as_str().unwrap_or_default().to_string();
        match msg["type"].as_str() {
            Some("upsert") => {
                self.0.insert(id, msg["data"].as_object().unwrap().clone());
            }
            Some("delete") => {
                self.0.remove(&id);
            }
            Some("patch") => {
                let note = self.0.entry(id).or_default();
                for (k, v) in msg["data"].as_object().unwrap() {
                    if v.is_null() {
                        note.remove(k);
                    } else {
                        note.insert(k.clone(), v.clone());
                    }
                }
            }
            _ => {}
        }
    }
}

fn data_in_redis(redis: &Redis, paper: &str, id: &str) -> Value {
    redis.note(paper, id).unwrap()["data"].clone()
}

/// Waits for `saved` covering `v`.
fn saved(client: &mut Client, v: u64) {
    while client.next_of("saved")["v"].as_u64().unwrap() < v {}
}

#[test]
fn a_patch_changes_only_its_fields_everywhere() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &[]);
    let mut a = server.join("p-patch", "user=ann");
    let mut b = server.join("p-patch", "user=bob");
    a.upsert("n1", json!({"x": 1, "y": 2, "text": "hi"}));
    let v0 = a.next_of("upsert")["v"].as_u64().unwrap();
    b.next_of("upsert");
    a.send(json!({"type": "patch", "id": "n1", "data": {"x": 5, "y": null}, "ref": "p1"}));
    let sent = a.next_of("patch");
    assert_eq!(sent["data"], json!({"x": 5, "y": null}));
    assert_eq!((sent["from"].as_str(), sent["ref"].as_str()), (Some(a.you.as_str()), Some("p1")));
    let v = sent["v"].as_u64().unwrap();
    assert!(v > v0);
    assert_eq!(b.next_of("patch")["data"], json!({"x": 5, "y": null}));
    saved(&mut a, v);
    assert_eq!(data_in_redis(&redis, "p-patch", "n1"), json!({"x": 5, "text": "hi"}));
    let fresh = Server::redis(&redis, &[]).join("p-patch", "");
    let n1 = &fresh.snapshot["notes"][0];
    assert_eq!((n1["data"].clone(), n1["v"].as_u64()), (json!({"x": 5, "text": "hi"}), Some(v)));
}

#[test]
fn patches_are_refused_as_replacing_the_note_would_be() {
    let server = Server::memory(&["--jwt-secret", SECRET, "--max-note-bytes", "60"]);
    let exp = unix_now() + 600;
    let join =
        |user: &str, role: &str| server.join("p-rights", &format!("token={}", token(user, "p-rights", role, exp)));
    let mut ann = join("ann", "writer");
    ann.send(json!({"type": "upsert", "id": "n1", "data": {"t": "a"}}));
    ann.next_of("upsert");
    let mut bob = join("bob", "writer");
    let refusal = |c: &mut Client, msg: Value| -> String {
        c.send(msg);
        c.next_of("error")["code"].as_str().unwrap().to_string()
    };
    assert_eq!(refusal(&mut bob, json!({"type": "patch", "id": "n1", "data": {"t": "b"}})), "forbidden");
    let mut viewer = join("vi", "viewer");
    assert_eq!(refusal(&mut viewer, json!({"type": "patch", "id": "n1", "data": {"t": "b"}})), "forbidden");
    assert_eq!(refusal(&mut ann, json!({"type": "patch", "id": "nope", "data": {"t": "b"}})), "not_found");
    assert_eq!(refusal(&mut ann, json!({"type": "patch", "id": "n1", "data": [1]})), "invalid_message");
    // A patch that names no field is a mistake to fix, not an edit to retry.
    let empty = json!({"type": "patch", "id": "n1", "data": {}, "ref": "e"});
    ann.send(empty);
    let error = ann.next_of("error");
    assert_eq!((error["code"].as_str(), error["ref"].as_str()), (Some("invalid_message"), Some("e")), "{error}");
    let long = "x".repeat(50);
    assert_eq!(
        refusal(&mut ann, json!({"type": "patch", "id": "n1", "data": {"more": long}, "ref": "r"})),
        "too_large"
    );
    let mut owner = join("olga", "owner");
    owner.send(json!({"type": "patch", "id": "n1", "data": {"t": "moderated"}}));
    assert_eq!(ann.next_of("patch")["data"], json!({"t": "moderated"}));
}

#[test]
fn concurrent_patches_on_two_nodes_keep_both_fields_and_the_newest_of_one() {
    let redis = Redis::start();
    let node = |id: &str| Server::redis(&redis, &["--cluster", "--node-id", id, "--rate", "1000", "--burst", "1000"]);
    let (a_node, b_node) = (node("a"), node("b"));
    let mut a = a_node.join("p-race", "user=ann");
    let mut b = b_node.join("p-race", "user=bob");
    a.upsert("n1", json!({"x": 0, "text": ""}));
    a.next_of("upsert");
    b.next_of("upsert");
    let mut views = [Notes::from_snapshot(&a_node.join("p-race", "").snapshot), Notes::default()];
    views[1] = views[0].0.clone().into_iter().collect::<BTreeMap<_, _>>().into();
    // One drags while the other types, over and over; the same field too.
    for i in 0..20 {
        a.send(json!({"type": "patch", "id": "n1", "data": {"x": i, "same": format!("a{i}")}}));
        b.send(json!({"type": "patch", "id": "n1", "data": {"text": format!("t{i}"), "same": format!("b{i}")}}));
    }
    // Everyone ends with x from ann, text from bob, and one winner for `same`.
    let expect_final = |data: &Value| data["x"] == 19 && data["text"] == "t19" && data["same"].is_string();
    let stored = eventually("both fields in Redis", || {
        let data = data_in_redis(&redis, "p-race", "n1");
        expect_final(&data).then_some(data)
    });
    // Each client applies what it receives, in order, without merging, and
    // ends where Redis is.
    let until = crate::common::deadline();
    for (client, view) in [&mut a, &mut b].into_iter().zip(views.iter_mut()) {
        while Value::Object(view.0["n1"].clone()) != stored {
            match client.event(until) {
                crate::common::Event::Msg(msg) => view.apply(&msg),
                crate::common::Event::Closed(frame) => panic!("closed: {frame:?}"),
            }
        }
    }
    for server in [&a_node, &b_node] {
        eventually("every node to hold what Redis holds", || {
            (server.join("p-race", "").snapshot["notes"][0]["data"] == stored).then_some(())
        });
    }
}

impl From<BTreeMap<String, Map<String, Value>>> for Notes {
    fn from(map: BTreeMap<String, Map<String, Value>>) -> Self {
        Notes(map)
    }
}

/// How many of the servers' writers have a command held by `CLIENT PAUSE`.
/// Writer connections Redis holds in a paused `EVALSHA`.
fn writers_held(redis: &Redis) -> usize {
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut redis.conn()).unwrap();
    list.lines().filter(|l| l.contains("name=rp-writer") && l.contains("cmd=evalsha")).count()
}

#[test]
fn a_patch_that_loses_the_race_to_another_nodes_delete_is_not_found_and_nothing_else() {
    // Bob's node deletes the note while Ann's node, which has not heard of it
    // yet, patches it; Redis applies the delete first. The patch is told
    // `not_found` (PROTOCOL.md 3.2), the delete reaches Ann's members, and the
    // paper takes edits on: no `write_failed`, no `unavailable`.
    lost_race(&[]);
}

#[test]
fn a_patch_that_loses_to_a_delete_the_horizon_dropped_is_not_found_too() {
    // With one tombstone kept, a second delete drops the first note's tombstone
    // before Ann's patch of it reaches Redis: the note is simply not there, and
    // its version is at or below the horizon (PROTOCOL.md 4, 1.1).
    lost_race(&["--max-tombstones", "1"]);
}

/// The race, made certain: Ann's node is cut from Redis (a fault proxy) while
/// Bob deletes the note (and, with a tiny horizon, another after it), and
/// Ann patches it; then the link is back and Ann's patch reaches Redis last.
fn lost_race(flags: &[&str]) {
    let redis = Redis::start();
    let proxy = crate::common::proxy::Proxy::start(redis.port);
    let node = |id: &str, url: &str| {
        let args = [&["--store", "redis", "--redis", url, "--cluster", "--node-id", id][..], flags].concat();
        Server::start(&args)
    };
    let (a_node, b_node) = (node("a", &proxy.redis_url()), node("b", &redis.url()));
    let mut ann = a_node.join("p-lost-race", "user=ann");
    let mut bob = b_node.join("p-lost-race", "user=bob");
    for id in ["n1", "n0"] {
        ann.send(json!({"type": "upsert", "id": id, "data": {"x": 0, "text": "hi"}}));
        let v = ann.next_of("upsert")["v"].as_u64().unwrap();
        while ann.next_of("saved")["v"].as_u64() < Some(v) {}
        assert_eq!(bob.next_of("upsert")["id"], id);
    }

    proxy.set(crate::common::proxy::Mode::Cut);
    let deletes: &[&str] = if flags.is_empty() { &["n1"] } else { &["n1", "n0"] };
    for id in deletes {
        bob.send(json!({"type": "delete", "id": id, "ref": id}));
        let v = bob.next_of("delete")["v"].as_u64().unwrap();
        while bob.next_of("saved")["v"].as_u64() < Some(v) {}
    }
    if !flags.is_empty() {
        assert_eq!(redis.hget(&keys::notes("p-lost-race"), "n1"), None, "n1's tombstone is past the horizon");
    }
    ann.send(json!({"type": "patch", "id": "n1", "data": {"x": 5}, "ref": "drag"}));
    assert_eq!(ann.next_of("patch")["ref"], "drag");
    proxy.set(crate::common::proxy::Mode::Pass);

    let mut told = None;
    let mut deleted = false;
    while told.is_none() || !deleted {
        let m = ann.next_of_any(&["error", "delete", "saved", "snapshot"]);
        match m["type"].as_str() {
            Some("error") => told = Some(m),
            Some("delete") => deleted = m["id"] == "n1",
            Some("snapshot") => panic!("the paper was read again as after a refusal for good: {m}"),
            _ => {}
        }
    }
    let told = told.unwrap();
    assert_eq!((told["code"].as_str(), told["ref"].as_str()), (Some("not_found"), Some("drag")), "{told}");
    // Redis keeps the delete (or, past the horizon, nothing), and the paper takes the next edit.
    let stored = redis.hget(&keys::notes("p-lost-race"), "n1");
    assert!(stored.as_ref().is_none_or(|s| s.starts_with(r#"{"deleted":true"#)), "{stored:?}");
    ann.send(json!({"type": "upsert", "id": "n2", "data": {}, "ref": "next"}));
    let v2 = ann.next_of_any(&["upsert", "error"]);
    assert_eq!(v2["type"], "upsert", "{v2}");
    let v2 = v2["v"].as_u64().unwrap();
    while ann.next_of("saved")["v"].as_u64() < Some(v2) {}
    // Ann's node shows what Redis holds: n1 is gone there too.
    let fresh = a_node.join("p-lost-race", "user=cat");
    let ids: Vec<&str> = fresh.snapshot["notes"].as_array().unwrap().iter().filter_map(|n| n["id"].as_str()).collect();
    assert!(!ids.contains(&"n1"), "{ids:?}");
}

/// A node of a cluster that takes a session's edits as fast as it sends them.
fn fast_node(redis: &Redis, id: &str) -> Server {
    Server::redis(redis, &["--cluster", "--node-id", id, "--rate", "10000", "--burst", "10000"])
}

/// A note as a snapshot shows it: (data, v).
fn note_of(snapshot: &Value, id: &str) -> (Value, u64) {
    let notes = snapshot["notes"].as_array().unwrap();
    let note = notes.iter().find(|n| n["id"] == id).unwrap_or_else(|| panic!("no note {id} in {snapshot}"));
    (note["data"].clone(), note["v"].as_u64().unwrap())
}

/// The stored form of a note is bounded whatever patches it receives (PROTOCOL.md 2,
/// 1.2): a stored note is at most `max_note_bytes` of data plus this.
const FIXED_OVERHEAD: usize = 8 * 1024;

#[test]
fn removing_new_fields_over_and_over_keeps_the_stored_note_bounded() {
    // One session creates a note, then patches it with hundreds of new
    // 64-character fields set to null at a time: `data` stays {"text":"hi"}, and
    // so must what Redis stores, while the other node and Redis agree exactly.
    let redis = Redis::start();
    let (a_node, b_node) = (fast_node(&redis, "a"), fast_node(&redis, "b"));
    let mut a = a_node.join("p-churn", "user=ann");
    let mut b = b_node.join("p-churn", "user=bob");
    a.upsert("n1", json!({"text": "hi"}));
    a.next_of("upsert");
    b.next_of("upsert");
    let mut last = 0;
    for i in 0..200 {
        let data: Map<String, Value> =
            (0..225).map(|j| (format!("{:x>64}", format!("{i}-{j}")), Value::Null)).collect();
        a.send(json!({"type": "patch", "id": "n1", "data": data}));
        last = a.next_of("patch")["v"].as_u64().unwrap();
        if i % 20 == 19 {
            // Bob's node follows through Redis: it is sent what Redis applied.
            while b.next_of("patch")["v"].as_u64().unwrap() < last {}
        }
    }
    saved(&mut a, last);
    let stored = redis.hget(&keys::notes("p-churn"), "n1").unwrap();
    assert!(stored.len() < 16 * 1024 + FIXED_OVERHEAD, "stored note of {} bytes", stored.len());
    let expected = (json!({"text": "hi"}), last);
    assert_eq!(
        (data_in_redis(&redis, "p-churn", "n1"), redis.note("p-churn", "n1").unwrap()["v"].as_u64().unwrap()),
        expected
    );
    for server in [&a_node, &b_node] {
        assert_eq!(note_of(&server.join("p-churn", "").snapshot, "n1"), expected);
    }
    let fresh = Server::redis(&redis, &[]);
    assert_eq!(note_of(&fresh.join("p-churn", "").snapshot, "n1"), expected);
    // The floor keeps what the dropped versions said: an old patch of one of
    // those fields, relayed late, would not be applied.
    let fv = &redis.note("p-churn", "n1").unwrap()["fv"];
    assert_eq!(fv["floor"][0].as_u64(), Some(last), "{fv}");
}

#[test]
fn many_patches_of_a_large_note_are_written_in_one_cheap_call() {
    // The writer is held by a paused Redis while one session sends 1,500 patches
    // of a 16 KB note; once Redis takes writes again they go out in one call,
    // which must decode the note once, not once per patch (PROTOCOL.md 4, 1.2).
    let redis = Redis::start_with(&["--slowlog-log-slower-than", "300000"]);
    let server = Server::redis(&redis, &["--rate", "10000", "--burst", "10000"]);
    let mut a = server.join("p-heavy", "user=ann");
    let text = |i: usize| format!("{i:x>150}");
    let data: Map<String, Value> = (0..100).map(|f| (format!("f{f:02}"), Value::from(text(f)))).collect();
    a.upsert("n1", Value::Object(data));
    let v = a.next_of("upsert")["v"].as_u64().unwrap();
    saved(&mut a, v);

    let mut conn = redis.conn();
    redis::cmd("CLIENT").arg("PAUSE").arg(60_000).arg("WRITE").exec(&mut conn).unwrap();
    let patch = |i: usize| json!({"type": "patch", "id": "n1", "data": {format!("f{:02}", i % 100): text(i)}});
    a.send(patch(0));
    a.next_of("patch");
    eventually("the writer to be held", || (writers_held(&redis) == 1).then_some(()));
    for i in 1..1500 {
        a.send(patch(i));
    }
    let mut last = 0;
    for _ in 1..1500 {
        last = a.next_of("patch")["v"].as_u64().unwrap();
    }
    redis::cmd("SLOWLOG").arg("RESET").exec(&mut conn).unwrap();
    redis::cmd("CLIENT").arg("UNPAUSE").exec(&mut conn).unwrap();
    saved(&mut a, last);

    type Entry = (u64, u64, u64, Vec<Vec<u8>>, String, String);
    let slow: Vec<Entry> = redis::cmd("SLOWLOG").arg("GET").arg(128).query(&mut conn).unwrap();
    let scripts: Vec<(u64, String)> = slow
        .iter()
        .map(|(_, _, micros, args, _, _)| (*micros, String::from_utf8_lossy(&args[0]).to_lowercase()))
        .filter(|(_, command)| command.starts_with("eval"))
        .collect();
    assert!(scripts.is_empty(), "script calls slower than 300 ms (microseconds, command): {scripts:?}");
    let stored = redis.note("p-heavy", "n1").unwrap();
    assert_eq!(stored["data"][format!("f{:02}", 1499 % 100)], text(1499));
    assert_eq!(note_of(&server.join("p-heavy", "").snapshot, "n1"), (stored["data"].clone(), last));
}

/// The write script, as the writer loads it (src/store/writer.rs).
fn write_notes_script() -> redis::Script {
    let readable = include_str!("../src/store/scripts/readable.lua");
    let write_notes = include_str!("../src/store/scripts/write_notes.lua");
    redis::Script::new(&format!("{readable}{write_notes}"))
}

/// A small deterministic generator (xorshift), so that a failure can be replayed.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn the_write_script_merges_and_folds_exactly_as_the_nodes_do() {
    // Random changes of one note (patches that set and remove fields, some of
    // them late, bursts of removals past the caps, upserts and deletes, from two
    // nodes) go through a paper in memory and through the write script, several
    // to a call: Redis must hold exactly the note the paper holds, field
    // versions and floor included, and answer each change as the paper did.
    use rollingpaper::paper::{Edit, Note, Paper, Patch, StoredPaper, VersionClock};
    use rollingpaper::store::codec::{encode_note, read_note};
    use serde_json::value::RawValue;
    use std::sync::Arc;

    let redis = Redis::start();
    let mut conn = redis.conn();
    let script = write_notes_script();
    // Mostly long keys for even seeds (the cap on bytes binds first), mostly
    // short ones for odd seeds (the cap on count binds first).
    let keys = |seed: u64, i: u64| {
        if i.is_multiple_of(4) != seed.is_multiple_of(2) {
            format!("{i:k>100}")
        } else {
            format!("k{i}")
        }
    };
    let mut floors = 0;
    for seed in 1..=6u64 {
        let paper_id = format!("p-model-{seed}");
        let mut dice = Dice(0x9E37_79B9_7F4A_7C15 ^ seed);
        let mut clock = VersionClock::new(Arc::from("a"));
        let mut paper = Paper::new(Arc::from(paper_id.as_str()), StoredPaper::default(), &mut clock);
        let id: Arc<str> = Arc::from("n");
        let mut now = 1_000u64;
        let mut ops = 0;
        while ops < 1500 {
            let mut call = script.key(keys::notes(&paper_id));
            call.key(keys::meta(&paper_id)).key(keys::tombstones(&paper_id));
            call.key(keys::erased(&paper_id));
            call.arg(1).arg("").arg(1_000_000_000).arg(1_000_000);
            let mut expected = Vec::new();
            for _ in 0..=dice.below(16) {
                ops += 1;
                now += 1 + dice.below(3);
                let late = if dice.below(10) < 3 { dice.below(40) } else { 0 };
                let v = now - late;
                let node: Arc<str> = Arc::from(["a", "b"][dice.below(2) as usize]);
                let roll = dice.below(100);
                if ops == 1 || roll < 3 {
                    let data: Map<String, Value> =
                        (0..dice.below(6)).map(|_| (keys(seed, dice.below(90)), json!(dice.below(100)))).collect();
                    let data = serde_json::to_string(&data).unwrap();
                    let note = Note { author: Arc::from("u"), data: Some(Arc::from(data)), v, node, fields: None };
                    let value = encode_note(&note.author, note.data.as_deref(), None, &note.node, v);
                    call.arg("w").arg("n").arg(value).arg(v).arg(&*note.node).arg("").arg(0);
                    expected.push(if paper.apply(Edit { id: id.clone(), note }) { 1 } else { 2 });
                } else if roll < 4 {
                    let author = paper.note(&id).map_or_else(|| Arc::from(""), |n| n.author.clone());
                    let value = encode_note(&author, None, None, &node, v);
                    call.arg("w").arg("n").arg(value).arg(v).arg(&*node).arg("").arg(0);
                    let note = Note { author, data: None, v, node, fields: None };
                    expected.push(if paper.apply(Edit { id: id.clone(), note }) { 1 } else { 2 });
                } else {
                    let (count, removals) =
                        if roll < 12 { (30 + 40 * (roll % 2), 100) } else { (1 + dice.below(6), 50) };
                    let fields: BTreeMap<String, Option<Box<RawValue>>> = (0..count)
                        .map(|_| {
                            let value = dice.below(100);
                            let value = (value >= removals).then(|| RawValue::from_string(value.to_string()).unwrap());
                            (keys(seed, dice.below(90)), value)
                        })
                        .collect();
                    call.arg("p")
                        .arg("n")
                        .arg(serde_json::to_string(&fields).unwrap())
                        .arg(v)
                        .arg(&*node)
                        .arg("")
                        .arg(0);
                    let code = match paper.note(&id) {
                        None => 6,
                        Some(note) if note.data.is_none() => 5,
                        Some(_) => {
                            let patch = Patch { id: id.clone(), fields: fields.into_iter().collect(), v, node };
                            if paper.apply_patch(&patch).is_some() {
                                1
                            } else {
                                2
                            }
                        }
                    };
                    expected.push(code);
                }
            }
            let codes: Vec<i64> = call.invoke(&mut conn).unwrap();
            assert_eq!(codes, expected, "seed {seed}, op {ops}: codes");
            let stored = redis.hget(&keys::notes(&paper_id), "n").unwrap();
            let held = read_note(stored.as_bytes()).unwrap_or_else(|| panic!("unreadable: {stored}"));
            let note = paper.note(&id).unwrap();
            // A tombstone is stored without its author.
            let author = if held.data.is_some() { held.author } else { note.author.clone() };
            let held = Note { author, data: held.data, v: held.v, node: held.node, fields: held.fields };
            assert_eq!(&held, note, "seed {seed}, op {ops}: Redis holds {stored}");
            if let Some(fv) = &note.fields {
                let data: Map<String, Value> = serde_json::from_str(note.data.as_deref().unwrap()).unwrap();
                assert!(fv.changed.keys().filter(|k| !data.contains_key(*k)).count() <= 64);
                floors += usize::from(fv.floor.is_some());
            }
        }
    }
    assert!(floors > 100, "the floor was there after {floors} calls only");
}

/// Reads a session's messages into its view until one satisfies `done`.
fn follow(client: &mut Client, view: &mut Notes, mut done: impl FnMut(&Value) -> bool) {
    let until = crate::common::deadline();
    loop {
        match client.event(until) {
            crate::common::Event::Msg(msg) => {
                assert_ne!(msg["type"], "error", "{msg}");
                view.apply(&msg);
                if done(&msg) {
                    return;
                }
            }
            crate::common::Event::Closed(frame) => panic!("closed: {frame:?}"),
        }
    }
}

#[test]
fn removed_field_churn_on_two_nodes_converges_everywhere() {
    // Two sessions on two nodes remove fields of one note and set them again,
    // both at once, round after round, far past the 64 removed fields whose
    // versions a note keeps (PROTOCOL.md 2, 1.2). Each round ends when each
    // side has heard the other's last patch (a marker field of its own), so
    // what each side sends next is newer than the round before. Every node,
    // Redis (as a fresh node and `GET /papers` read it), every snapshot and
    // every client's view end with the same note.
    let redis = Redis::start();
    let (a_node, b_node) = (fast_node(&redis, "a"), fast_node(&redis, "b"));
    let mut a = a_node.join("p-fold", "user=ann");
    let mut b = b_node.join("p-fold", "user=bob");
    // Two keys in three are long, so that the cap on key bytes binds too.
    let key = |i: u64| if i.is_multiple_of(3) { format!("f{i}") } else { format!("{i:f>90}") };
    let start: Map<String, Value> = (0..200).map(|i| (key(i), json!(0))).collect();
    a.upsert("n1", Value::Object(start.clone()));
    a.next_of("upsert");
    b.next_of("upsert");
    let mut views = [Notes::default(), Notes::default()];
    for view in &mut views {
        view.0.insert("n1".into(), start.clone());
    }
    let mut dice = [Dice(0x2545_F491_4F6C_DD1D), Dice(0x9E37_79B9_7F4A_7C15)];
    let markers = ["ma", "mb"];
    for round in 0..30 {
        for (side, client) in [&mut a, &mut b].into_iter().enumerate() {
            for _ in 0..3 {
                let mut data = Map::new();
                for _ in 0..2 {
                    data.insert(key(dice[side].below(200)), Value::Null);
                }
                data.insert(key(dice[side].below(200)), json!(format!("{side}-{round}")));
                client.send(json!({"type": "patch", "id": "n1", "data": data}));
            }
            client.send(json!({"type": "patch", "id": "n1", "data": {markers[side]: round}}));
        }
        for (side, client) in [&mut a, &mut b].into_iter().enumerate() {
            let other = markers[1 - side];
            follow(client, &mut views[side], |msg| msg["type"] == "patch" && msg["data"][other] == round);
        }
    }
    let value = redis.note("p-fold", "n1").unwrap();
    let stored = (value["data"].clone(), value["v"].as_u64().unwrap());
    let fv = &value["fv"];
    assert!(fv["floor"][0].as_u64().is_some(), "no floor: {fv}");
    let removed = fv["changed"].as_object().unwrap().keys().filter(|k| stored.0.get(k.as_str()).is_none()).count();
    assert!(removed <= 64, "{removed} removed fields kept");
    // Each client, applying what it received in order, ends where Redis is.
    let until = crate::common::deadline();
    for (client, view) in [&mut a, &mut b].into_iter().zip(views.iter_mut()) {
        while Value::Object(view.0["n1"].clone()) != stored.0 {
            match client.event(until) {
                crate::common::Event::Msg(msg) => view.apply(&msg),
                crate::common::Event::Closed(frame) => panic!("closed: {frame:?}"),
            }
        }
    }
    for server in [&a_node, &b_node, &Server::redis(&redis, &[])] {
        assert_eq!(note_of(&server.join("p-fold", "").snapshot, "n1"), stored);
        let (status, _, body) = server.get("/papers/p-fold");
        assert_eq!(status, 200);
        assert_eq!(note_of(&serde_json::from_str(&body).unwrap(), "n1"), stored);
    }
}
