//! PROTOCOL.md 3.1 and 4 (1.1): the tombstone horizon bounds a paper, and a
//! client that reconnects with `?since=V` gets what it missed, never less.

use rollingpaper::store::keys;
use std::collections::BTreeMap;
use std::io::{Read, Write};

use serde_json::{json, Value};

use crate::common::{upgrade_request, Client, Redis, Server};

/// A client's view: note id -> (data, v); a snapshot without `since` replaces
/// it, one with `since` is merged into it.
#[derive(Default, Debug, PartialEq)]
struct View(BTreeMap<String, (Value, u64)>);

impl View {
    fn apply_snapshot(&mut self, snapshot: &Value) {
        if snapshot.get("since").is_none() {
            self.0.clear();
        }
        for note in snapshot["notes"].as_array().unwrap() {
            let id = note["id"].as_str().unwrap().to_string();
            if note["deleted"] == true {
                self.0.remove(&id);
            } else {
                self.0.insert(id, (note["data"].clone(), note["v"].as_u64().unwrap()));
            }
        }
    }

    fn apply(&mut self, msg: &Value) {
        let id = msg["id"].as_str().map(str::to_string);
        match msg["type"].as_str() {
            Some("upsert") => {
                self.0.insert(id.unwrap(), (msg["data"].clone(), msg["v"].as_u64().unwrap()));
            }
            Some("delete") => {
                self.0.remove(&id.unwrap());
            }
            _ => {}
        }
    }

    /// The greatest version seen.
    fn greatest(&self, seen: u64) -> u64 {
        self.0.values().map(|(_, v)| *v).max().unwrap_or(0).max(seen)
    }
}

/// Sends an edit and waits for its echo and its `saved`; returns its version.
fn edit_saved(client: &mut Client, msg: Value) -> u64 {
    client.send(msg);
    let kind = client.next_of_any(&["upsert", "delete"]);
    let v = kind["v"].as_u64().unwrap();
    loop {
        if client.next_of("saved")["v"].as_u64().unwrap() >= v {
            return v;
        }
    }
}

fn joined_view(client: &Client) -> View {
    let mut view = View::default();
    view.apply_snapshot(&client.snapshot);
    view
}

#[test]
fn a_paper_never_grows_past_its_live_notes_plus_max_tombstones() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &["--max-tombstones", "5", "--rate", "100000", "--burst", "100000"]);
    let mut a = server.join("p-churn", "");
    edit_saved(&mut a, json!({"type": "upsert", "id": "keep", "data": {"k": 1}}));
    // Ten times the cap of fresh ids, each created and deleted.
    for i in 0..50 {
        let id = format!("t{i}");
        edit_saved(&mut a, json!({"type": "upsert", "id": id, "data": {}}));
        edit_saved(&mut a, json!({"type": "delete", "id": id}));
    }
    let notes = redis.hgetall(&keys::notes("p-churn"));
    assert!(notes.len() <= 1 + 5, "Redis holds {} notes", notes.len());
    let tombstones: usize = redis::cmd("ZCARD").arg(keys::tombstones("p-churn")).query(&mut redis.conn()).unwrap();
    assert!(tombstones <= 5);
    let horizon: u64 = redis.hget(&keys::meta("p-churn"), "horizon").unwrap().parse().unwrap();
    assert!(horizon > 0, "the horizon rose");
    // A stale write below the horizon to a dropped note brings nothing back:
    // a fresh joiner on a fresh node sees only the live note.
    drop(a);
    let fresh = Server::redis(&redis, &[]);
    let b = fresh.join("p-churn", "");
    let ids: Vec<&str> = b.snapshot["notes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["keep"]);
}

#[test]
fn a_resumed_client_gets_what_it_missed_and_ends_with_a_fresh_clients_view() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &[]);
    let mut a = server.join("p-resume", "user=ann");
    let mut b = server.join("p-resume", "user=bob");
    let mut view = joined_view(&a);
    for id in ["n1", "n2", "n3"] {
        edit_saved(&mut b, json!({"type": "upsert", "id": id, "data": {"t": id}}));
        view.apply(&a.next_of("upsert"));
    }
    let seen = view.greatest(0);
    a.close();
    // While ann is away: a delete, a change, a new note.
    edit_saved(&mut b, json!({"type": "delete", "id": "n1"}));
    edit_saved(&mut b, json!({"type": "upsert", "id": "n2", "data": {"t": "changed"}}));
    edit_saved(&mut b, json!({"type": "upsert", "id": "n4", "data": {"t": "new"}}));

    let again = server.join("p-resume", &format!("user=ann&since={seen}"));
    assert_eq!(again.snapshot["since"], seen, "a since snapshot: {}", again.snapshot);
    let deleted = again.snapshot["notes"].as_array().unwrap().iter().any(|n| n["id"] == "n1" && n["deleted"] == true);
    assert!(deleted, "the delete after V arrives as a deleted entry: {}", again.snapshot);
    view.apply_snapshot(&again.snapshot);
    let fresh = server.join("p-resume", "user=cy");
    assert_eq!(view, joined_view(&fresh));
}

#[test]
fn a_since_below_the_horizon_gets_a_full_snapshot() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &["--max-tombstones", "1", "--rate", "100000", "--burst", "100000"]);
    let mut a = server.join("p-old", "");
    let first = edit_saved(&mut a, json!({"type": "upsert", "id": "n0", "data": {}}));
    for i in 1..4 {
        let id = format!("n{i}");
        edit_saved(&mut a, json!({"type": "upsert", "id": id, "data": {}}));
        edit_saved(&mut a, json!({"type": "delete", "id": id}));
    }
    let b = server.join("p-old", &format!("since={first}"));
    assert!(b.snapshot.get("since").is_none(), "below the horizon: a full snapshot: {}", b.snapshot);
    assert_eq!(b.snapshot["notes"].as_array().unwrap().len(), 1);
}

#[test]
fn resuming_on_another_node_gets_what_was_missed() {
    let redis = Redis::start();
    let node = |id: &str| Server::redis(&redis, &["--cluster", "--node-id", id]);
    let (a_node, b_node) = (node("a"), node("b"));
    let mut a = a_node.join("p-move", "user=ann");
    let mut view = joined_view(&a);
    for id in ["n1", "n2"] {
        edit_saved(&mut a, json!({"type": "upsert", "id": id, "data": {"t": id}}));
    }
    view.0.clear();
    let seen = edit_saved(&mut a, json!({"type": "upsert", "id": "n3", "data": {}}));
    view.apply_snapshot(&a_node.join("p-move", "").snapshot);
    drop(a);
    drop(a_node);
    // The paper changes on b (read there from Redis), then ann comes back there.
    let mut bob = b_node.join("p-move", "user=bob");
    edit_saved(&mut bob, json!({"type": "delete", "id": "n2"}));
    edit_saved(&mut bob, json!({"type": "upsert", "id": "n5", "data": {"t": 5}}));
    let again = b_node.join("p-move", &format!("user=ann&since={seen}"));
    assert_eq!(again.snapshot["since"], seen, "{}", again.snapshot);
    view.apply_snapshot(&again.snapshot);
    assert_eq!(view, joined_view(&b_node.join("p-move", "")));
}

#[test]
fn a_large_papers_load_does_not_hold_up_another_papers() {
    let redis = Redis::start();
    // A paper of 300,000 stored notes takes its loader a while to read.
    let mut conn = redis.conn();
    for chunk in 0..30 {
        let mut pipe = redis::pipe();
        for i in 0..10_000 {
            let n = chunk * 10_000 + i;
            pipe.cmd("HSET")
                .arg(keys::notes("p-huge"))
                .arg(format!("n{n}"))
                .arg(format!(r#"{{"deleted":true,"v":{}}}"#, n + 1))
                .ignore();
        }
        pipe.query::<()>(&mut conn).unwrap();
    }
    let server = Server::redis(&redis, &["--load-timeout", "60"]);
    // The upgrade is answered once the paper is read (PROTOCOL.md 7: an erased
    // paper is refused before it): the request is sent, its answer read later.
    let mut huge = std::net::TcpStream::connect(server.addr).unwrap();
    huge.write_all(upgrade_request("/ws/p-huge", "").as_bytes()).unwrap();
    let small = server.join("p-small", "");
    assert_eq!(small.snapshot["type"], "snapshot");
    // The small paper was read while the huge one still was.
    huge.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let pending = matches!(huge.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    assert!(pending, "the huge paper's answer came first: loads waited on each other");
    huge.set_nonblocking(false).unwrap();
    huge.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(huge.read(&mut byte).unwrap(), 1, "the connection closed before its answer");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101 "), "{}", String::from_utf8_lossy(&head));
}

#[test]
fn a_change_arriving_late_makes_resuming_from_before_it_a_full_snapshot() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &["--cluster", "--node-id", "a"]);
    let mut a = server.join("p-late", "");
    let seen = edit_saved(&mut a, json!({"type": "upsert", "id": "n1", "data": {}}));
    // Another node's change, made two minutes ago and relayed only now (after an
    // outage): below `seen` minus the resume window.
    let old = seen - (120_000 << 10);
    let late =
        format!(r#"zz{}{{"type":"upsert","id":"n-late","author":"x","data":{{}},"v":{old},"from":"c1-zz"}}"#, "\n");
    let _: i64 = redis::cmd("PUBLISH").arg(keys::channel("p-late")).arg(late).query(&mut redis.conn()).unwrap();
    assert_eq!(a.next_of("upsert")["id"], "n-late");
    let again = server.join("p-late", &format!("since={seen}"));
    assert!(again.snapshot.get("since").is_none(), "a since snapshot would miss n-late: {}", again.snapshot);
    let ids: Vec<&str> =
        again.snapshot["notes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"n-late"));
}

#[test]
fn tombstones_past_retention_leave_redis_without_another_write() {
    // PROTOCOL.md 4 (1.1): past `tombstone_retention` a tombstone is dropped in
    // memory and in Redis, and the horizon rises, even if nobody writes again.
    let redis = Redis::start();
    let server = Server::redis(&redis, &["--tombstone-retention", "1"]);
    let mut a = server.join("p-quiet", "");
    edit_saved(&mut a, json!({"type": "upsert", "id": "keep", "data": {}}));
    edit_saved(&mut a, json!({"type": "upsert", "id": "gone", "data": {}}));
    let deleted = edit_saved(&mut a, json!({"type": "delete", "id": "gone"}));
    let notes = || redis.hgetall(&keys::notes("p-quiet"));
    assert!(notes().iter().any(|(id, _)| id == "gone"), "the tombstone is in Redis first");
    let updated = redis.hget(&keys::meta("p-quiet"), "updated_ms");
    crate::common::eventually("the tombstone to leave Redis", || {
        notes().iter().all(|(id, _)| id != "gone").then_some(())
    });
    let horizon: u64 = redis.hget(&keys::meta("p-quiet"), "horizon").unwrap().parse().unwrap();
    assert_eq!(horizon, deleted, "the horizon is the dropped tombstone's version");
    assert_eq!(notes().len(), 1, "the live note stays");
    assert_eq!(redis.hget(&keys::meta("p-quiet"), "updated_ms"), updated, "dropping is no write of the paper");
}

#[test]
fn the_horizon_holds_across_two_nodes() {
    let redis = Redis::start();
    let node = |id: &str| {
        Server::redis(
            &redis,
            &["--cluster", "--node-id", id, "--max-tombstones", "3", "--rate", "100000", "--burst", "100000"],
        )
    };
    let (a_node, b_node) = (node("a"), node("b"));
    let mut a = a_node.join("p-two-horizon", "");
    let mut b = b_node.join("p-two-horizon", "");
    edit_saved(&mut a, json!({"type": "upsert", "id": "keep", "data": {}}));
    let first = edit_saved(&mut a, json!({"type": "upsert", "id": "first", "data": {}}));
    // Created on one node, deleted on the other: thirty times the cap.
    for i in 0..30 {
        let id = format!("t{i}");
        edit_saved(&mut a, json!({"type": "upsert", "id": id, "data": {}}));
        crate::common::eventually("b to see the note", || {
            b.drain().iter().any(|m| m["type"] == "upsert" && m["id"] == id.as_str()).then_some(())
        });
        edit_saved(&mut b, json!({"type": "delete", "id": id}));
    }
    edit_saved(&mut b, json!({"type": "delete", "id": "first"}));
    // Node a learns of b's deletes through the relay, after b's `saved`.
    crate::common::eventually("a to see the last delete", || {
        a.drain().iter().any(|m| m["type"] == "delete" && m["id"] == "first").then_some(())
    });
    let stored = redis.hgetall(&keys::notes("p-two-horizon"));
    assert!(stored.len() <= 1 + 3, "Redis holds {} notes", stored.len());
    for server in [&a_node, &b_node] {
        let fresh = server.join("p-two-horizon", "");
        let ids: Vec<&str> =
            fresh.snapshot["notes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["keep"]);
        // A client that saw versions only below the horizon reloads whole.
        let old = server.join("p-two-horizon", &format!("since={first}"));
        assert!(old.snapshot.get("since").is_none(), "{}", old.snapshot);
    }
}
