//! Partitions (PROTOCOL.md 3.1, 3.3, 6): a node cut from Redis while another
//! node goes on never gives a wrong answer once the link is back. The cut is
//! real: node b reaches Redis through a fault proxy (`common::proxy`).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::common::proxy::{Direction, Mode, Proxy};
use crate::common::*;

fn node(redis_url: &str, id: &str) -> Server {
    Server::start(&["--store", "redis", "--redis", redis_url, "--cluster", "--node-id", id])
}

/// Notes as `id -> (v, data)`.
fn notes_of(notes: &Value) -> BTreeMap<String, (u64, Value)> {
    let notes = notes.as_array().unwrap_or_else(|| panic!("no notes array: {notes}"));
    notes
        .iter()
        .map(|n| (n["id"].as_str().unwrap().to_string(), (n["v"].as_u64().unwrap(), n["data"].clone())))
        .collect()
}

/// The parsed snapshot of the paper's stream entry, once there is one.
fn stream_entry(redis: &Redis, paper: &str) -> Value {
    eventually("the stream entry", || {
        let entries: Vec<(String, Vec<(String, String)>)> =
            redis::cmd("XRANGE").arg("rp:papers:completed").arg("-").arg("+").query(&mut redis.conn()).ok()?;
        entries.into_iter().find_map(|(_, fields)| {
            let fields: BTreeMap<String, String> = fields.into_iter().collect();
            (fields.get("paper").map(String::as_str) == Some(paper))
                .then(|| serde_json::from_str(&fields["snapshot"]).unwrap())
        })
    })
}

#[test]
fn a_node_cut_from_redis_while_the_paper_is_sealed_shows_exactly_the_sealed_notes() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let a_node = node(&redis.url(), "a");
    let b_node = node(&proxy.redis_url(), "b");
    let mut a = a_node.join("p-cut", "user=ann");
    let mut b = b_node.join("p-cut", "user=bob");
    a.send(json!({"type": "upsert", "id": "n1", "data": {"text": "before"}, "ref": "r1"}));
    let v1 = a.next_of("upsert")["v"].as_u64().unwrap();
    while a.next_of("saved")["v"].as_u64().unwrap() < v1 {}
    assert_eq!(b.next_of("upsert")["id"], "n1");

    // Node b is cut from Redis; a member on b edits, and b broadcasts it.
    proxy.set(Mode::Cut);
    b.send(json!({"type": "upsert", "id": "n2", "data": {"text": "while cut"}, "ref": "rb"}));
    assert_eq!(b.next_of("upsert")["ref"], "rb");
    // Meanwhile the owner seals the paper on node a.
    a.send(json!({"type": "complete"}));
    let on_a = a.next_of("completed");
    let entry = stream_entry(&redis, "p-cut");
    assert_eq!(notes_of(&on_a["notes"]), notes_of(&entry["notes"]));

    proxy.set(Mode::Pass);
    // Node b's member is told its edit lost to the seal, and is sent the paper
    // exactly as sealed, in either order.
    let (mut refused, mut completed) = (None, None);
    while refused.is_none() || completed.is_none() {
        let msg = b.next_of_any(&["error", "completed"]);
        if msg["type"] == "error" {
            assert_eq!((&msg["code"], &msg["ref"]), (&json!("paper_completed"), &json!("rb")), "{msg}");
            refused = Some(msg);
        } else {
            completed = Some(msg);
        }
    }
    let completed = completed.unwrap();
    assert_eq!(notes_of(&completed["notes"]), notes_of(&entry["notes"]), "b's completed is the stream entry");
    assert!(!b.drain().iter().any(|m| m["type"] == "saved"), "the refused edit is never saved");
    // So is what node b serves, to a new member and over HTTP.
    let (status, _, body) = b_node.get("/papers/p-cut");
    assert_eq!(status, 200);
    let served: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(served["completed"], true);
    assert_eq!(notes_of(&served["notes"]), notes_of(&entry["notes"]), "GET /papers on b");
    let late = b_node.join("p-cut", "user=cat");
    assert_eq!(notes_of(&late.snapshot["notes"]), notes_of(&entry["notes"]), "a new member of b");
}

#[test]
fn a_half_open_then_slow_link_to_redis_loses_nothing_and_holds_up_only_its_node() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let a_node = node(&redis.url(), "a");
    let b_node = node(&proxy.redis_url(), "b");
    let mut a = a_node.join("p-direct", "user=ann");
    let mut members: Vec<Client> = (0..6).map(|i| b_node.join(&format!("p-proxied-{i}"), "user=bob")).collect();

    // Redis gets node b's writes, but its answers never come back (half open).
    // Six papers' edits: one pipeline of six calls whose replies never come.
    proxy.set_direction(Direction::Down, Mode::BlackHole);
    let mut versions = Vec::new();
    for (i, b) in members.iter_mut().enumerate() {
        b.send(json!({"type": "upsert", "id": "n1", "data": {"text": "half open", "i": i}}));
        versions.push(b.next_of("upsert")["v"].as_u64().unwrap());
    }
    // Node a is not held up by it.
    for i in 0..3 {
        a.send(json!({"type": "upsert", "id": format!("m{i}"), "data": {"i": i}}));
        let va = a.next_of("upsert")["v"].as_u64().unwrap();
        while a.next_of("saved")["v"].as_u64().unwrap() < va {}
    }
    // Then a slow link: each edit is confirmed only once Redis holds it, within
    // one I/O timeout of the link failing, not one per reply that never came.
    proxy.set(Mode::Delay(std::time::Duration::from_millis(50)));
    for (i, (b, v)) in members.iter_mut().zip(&versions).enumerate() {
        while b.next_of("saved")["v"].as_u64().unwrap() < *v {}
        let stored = redis.note(&format!("p-proxied-{i}"), "n1").expect("n1 in Redis once saved");
        assert_eq!(stored["v"].as_u64(), Some(*v));
        assert_eq!(stored["data"], json!({"text": "half open", "i": i}));
    }
    proxy.set(Mode::Pass);
    let b = &mut members[0];
    b.send(json!({"type": "upsert", "id": "n2", "data": {}}));
    let v2 = b.next_of("upsert")["v"].as_u64().unwrap();
    while b.next_of("saved")["v"].as_u64().unwrap() < v2 {}
}
