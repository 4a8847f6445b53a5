//! PROTOCOL.md section 4: what Redis holds, and what each failure loses (nothing).

use rollingpaper::store::keys;
use serde_json::{json, Value};

use crate::common::{eventually, Client, Redis, Server};

/// Sends upserts `from..to` of notes `n{i}` and waits until every one came back.
/// Returns the last version.
fn write_notes(client: &mut Client, from: usize, to: usize) -> u64 {
    for i in from..to {
        client.upsert(&format!("n{i}"), json!({"i": i}));
    }
    let mut last = 0;
    for _ in from..to {
        last = client.next_of("upsert")["v"].as_u64().unwrap();
    }
    last
}

/// Waits for a `saved` that covers version `v`.
fn saved_up_to(client: &mut Client, v: u64) {
    loop {
        if client.next_of("saved")["v"].as_u64().unwrap() >= v {
            return;
        }
    }
}

#[test]
fn edits_are_written_with_the_key_layout_and_confirmed_as_saved() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &[]);
    let mut a = server.join("p1", "user=u1");
    a.upsert("n1", json!({"text": "hi"}));
    a.upsert("n2", json!({}));
    a.send(json!({"type": "delete", "id": "n2"}));
    let v1 = a.next_of("upsert")["v"].as_u64().unwrap();
    a.next_of("upsert");
    let v_delete = a.next_of("delete")["v"].as_u64().unwrap();
    saved_up_to(&mut a, v_delete);

    assert_eq!(redis.note("p1", "n1"), Some(json!({"author": "u1", "data": {"text": "hi"}, "v": v1})));
    assert_eq!(redis.note("p1", "n2"), Some(json!({"deleted": true, "v": v_delete})));
    let meta: std::collections::HashMap<String, String> = redis.hgetall(&keys::meta("p1")).into_iter().collect();
    assert_eq!(meta.get("completed").map(String::as_str), Some("0"));
    let created: u64 = meta["created_ms"].parse().unwrap();
    let updated: u64 = meta["updated_ms"].parse().unwrap();
    assert!(created > 1_600_000_000_000 && updated >= created);
}

#[test]
fn a_restarted_server_keeps_notes_and_continues_above_their_versions() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &[]);
    let mut a = server.join("p-restart", "user=u1");
    let v = write_notes(&mut a, 0, 3);
    saved_up_to(&mut a, v);
    assert!(server.terminate().success());

    let server = Server::redis(&redis, &[]);
    let mut b = server.join("p-restart", "user=u2");
    let notes = b.snapshot["notes"].as_array().unwrap().clone();
    assert_eq!(notes.len(), 3);
    assert_eq!(notes.iter().map(|n| n["v"].as_u64().unwrap()).max(), Some(v));
    assert!(notes.iter().all(|n| n["author"] == "u1"));
    b.upsert("n2", json!({"again": true}));
    let replaced = b.next_of("upsert");
    assert!(replaced["v"].as_u64().unwrap() > v);
    assert_eq!(replaced["author"], "u1");
}

#[test]
fn sigterm_right_after_a_burst_of_2000_edits_leaves_all_in_redis() {
    let redis = Redis::start();
    // Far above the default rate limit: this burst is the point.
    let server = Server::redis(&redis, &["--max-notes", "5000", "--rate", "100000", "--burst", "5000"]);
    let mut a = server.join("p-burst", "");
    write_notes(&mut a, 0, 2000);
    server.signal("TERM");
    assert_eq!(a.closed().0, 1001, "sessions are closed with 1001");
    let mut server = server;
    assert!(server.wait().success());
    let notes = redis.hgetall(&keys::notes("p-burst"));
    assert_eq!(notes.len(), 2000);
    for (id, value) in notes {
        let value: Value = serde_json::from_str(&value).unwrap();
        assert_eq!(format!("n{}", value["data"]["i"]), id);
    }
}

#[test]
fn redis_stopped_and_restarted_mid_stream_loses_nothing() {
    // Every write fsynced: what Redis acknowledged before the kill survives it
    // (with the default `everysec`, Redis itself may lose its last second).
    let mut redis = Redis::start_with(&["--appendfsync", "always"]);
    let server = Server::redis(&redis, &[]);
    let mut a = server.join("p-outage", "");
    let mut b = server.join("p-outage", "");
    write_notes(&mut a, 0, 100);
    redis.stop();
    // Edits go on while Redis is away: broadcast at once, written later.
    let last = write_notes(&mut a, 100, 200);
    assert_eq!(b.next_of("upsert")["id"], "n0");
    redis.restart();
    saved_up_to(&mut a, last);
    let notes = redis.hgetall(&keys::notes("p-outage"));
    assert_eq!(notes.len(), 200);
}

#[test]
fn a_full_backlog_refuses_edits_with_unavailable_and_loses_none() {
    let mut redis = Redis::start();
    let server = Server::redis(&redis, &["--backlog-limit", "5"]);
    let mut a = server.join("p-backlog", "");
    let mut b = server.join("p-backlog", "");
    redis.stop();
    for i in 0..8 {
        a.send(json!({"type": "upsert", "id": format!("n{i}"), "data": {}, "ref": format!("r{i}")}));
    }
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    while accepted.len() + refused.len() < 8 {
        let msg = a.next();
        match msg["type"].as_str() {
            Some("upsert") => accepted.push(msg["ref"].as_str().unwrap().to_string()),
            Some("error") => {
                assert_eq!(msg["code"], "unavailable");
                refused.push(msg["ref"].as_str().unwrap().to_string());
            }
            _ => {}
        }
    }
    assert_eq!(accepted, ["r0", "r1", "r2", "r3", "r4"]);
    assert_eq!(refused, ["r5", "r6", "r7"]);
    // A refused edit was not applied: the other member never saw it.
    let ids: Vec<Value> = b.drain().into_iter().filter(|m| m["type"] == "upsert").map(|m| m["id"].clone()).collect();
    assert_eq!(ids.len(), 5);

    redis.restart();
    let mut last_v = 0;
    while last_v == 0 {
        last_v = a.next_of("saved")["v"].as_u64().unwrap();
    }
    eventually("the five accepted edits in Redis", || {
        (redis.hgetall(&keys::notes("p-backlog")).len() == 5).then_some(())
    });
    a.upsert("n9", json!({}));
    assert_eq!(a.next_of("upsert")["id"], "n9");
}

#[test]
fn a_backlog_full_in_bytes_refuses_edits_with_unavailable_and_loses_none() {
    // PROTOCOL.md 4, 1.2: the backlog is bounded in bytes too. 256 KiB hold about
    // sixteen notes of 15 KB, far below --backlog-limit.
    let mut redis = Redis::start();
    let server = Server::redis(&redis, &["--backlog-bytes", "262144", "--cluster", "--node-id", "n1"]);
    let mut a = server.join("p-bytes", "");
    let b = server.join("p-bytes", "");
    redis.stop();
    let text = "x".repeat(15_000);
    let total = 40;
    for i in 0..total {
        a.send(json!({"type": "upsert", "id": format!("n{i}"), "data": {"text": text}, "ref": format!("r{i}")}));
    }
    let (mut accepted, mut refused) = (Vec::new(), Vec::new());
    while accepted.len() + refused.len() < total {
        let msg = a.next();
        match msg["type"].as_str() {
            Some("upsert") => accepted.push(msg["ref"].as_str().unwrap().to_string()),
            Some("error") => {
                assert_eq!(msg["code"], "unavailable", "{msg}");
                refused.push(msg["ref"].as_str().unwrap().to_string());
            }
            _ => {}
        }
    }
    // Whichever limit is reached first refuses: here the bytes, after about sixteen.
    assert!((8..=17).contains(&accepted.len()), "accepted {} edits of 15 KB in 256 KiB", accepted.len());
    let expected: Vec<String> = (0..accepted.len()).map(|i| format!("r{i}")).collect();
    assert_eq!(accepted, expected, "the edits accepted are the first ones");
    let (_, _, metrics) = server.get("/metrics");
    let gauge = |name: &str| -> u64 {
        let line = metrics.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}"));
        line.split(' ').nth(1).unwrap().parse().unwrap()
    };
    assert!(gauge("rollingpaper_backlog_bytes") <= 262_144);
    assert_eq!(gauge("rollingpaper_backlog_bytes_limit"), 262_144);
    assert_eq!(server.get("/readyz").0, 503);
    // A leave is queued whatever the backlog holds: the member's presence entry goes.
    let leaver = b.snapshot["you"].as_str().unwrap().to_string();
    b.close();

    redis.restart();
    let last = accepted.len() - 1;
    eventually("every accepted edit in Redis", || {
        (redis.hgetall(&keys::notes("p-bytes")).len() == accepted.len()).then_some(())
    });
    assert!(redis.note("p-bytes", &format!("n{last}")).is_some());
    eventually("the leave written", || redis.hget(&keys::members("p-bytes"), &leaver).is_none().then_some(()));
    eventually("the backlog empty", || {
        let (_, _, metrics) = server.get("/metrics");
        metrics.lines().any(|l| l == "rollingpaper_backlog_bytes 0").then_some(())
    });
    a.upsert("n-after", json!({}));
    assert_eq!(a.next_of("upsert")["id"], "n-after");
}

#[test]
fn a_paper_that_cannot_be_read_closes_its_joiners_with_1013() {
    let mut redis = Redis::start();
    let server = Server::redis(&redis, &["--load-timeout", "1"]);
    redis.stop();
    let mut a = server.connect("/ws/p-unreadable");
    assert_eq!(a.closed().0, 1013);
    redis.restart();
    let a = server.join("p-unreadable", "");
    assert_eq!(a.snapshot["notes"], json!([]));
}

#[test]
fn unwritten_edits_stay_in_memory_for_the_next_joiner() {
    let mut redis = Redis::start();
    let server = Server::redis(&redis, &["--paper-linger", "0"]);
    let mut a = server.join("p-linger", "");
    redis.stop();
    a.upsert("n1", json!({"kept": true}));
    a.next_of("upsert");
    a.close();
    // The paper has no member, but its edit is not in Redis yet: it must not be
    // read back from Redis without it.
    let b = server.join("p-linger", "");
    assert_eq!(b.snapshot["notes"][0]["data"], json!({"kept": true}));
    b.close();
    redis.restart();
    eventually("the edit in Redis", || redis.note("p-linger", "n1"));
    let c = server.join("p-linger", "");
    assert_eq!(c.snapshot["notes"][0]["data"], json!({"kept": true}));
}

#[test]
fn completion_writes_one_stream_entry_and_starts_retention() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &["--completed-retention", "3600"]);
    let mut a = server.join("p-sealed", "user=owner");
    let v = write_notes(&mut a, 0, 2);
    a.send(json!({"type": "complete"}));
    a.next_of("completed");
    a.send(json!({"type": "complete"}));
    assert_eq!(a.next_of("error")["code"], "paper_completed");

    let entries: Vec<(String, Vec<(String, String)>)> = eventually("the stream entry", || {
        let entries: Vec<(String, Vec<(String, String)>)> =
            redis::cmd("XRANGE").arg("rp:papers:completed").arg("-").arg("+").query(&mut redis.conn()).ok()?;
        (!entries.is_empty()).then_some(entries)
    });
    assert_eq!(entries.len(), 1);
    let fields: std::collections::HashMap<_, _> = entries[0].1.iter().cloned().collect();
    assert_eq!(fields["paper"], "p-sealed");
    let snapshot: Value = serde_json::from_str(&fields["snapshot"]).unwrap();
    assert_eq!(snapshot["paper"], "p-sealed");
    assert_eq!(snapshot["completed"], true);
    let notes = snapshot["notes"].as_array().unwrap();
    assert_eq!(notes.len(), 2);
    assert!(notes.iter().any(|n| n["v"].as_u64() == Some(v) && n["author"] == "owner"));

    assert_eq!(redis.hget(&keys::meta("p-sealed"), "completed").as_deref(), Some("1"));
    assert_eq!(redis.hget(&keys::meta("p-sealed"), "completed_by").as_deref(), Some("owner"));
    for key in [&keys::notes("p-sealed"), &keys::meta("p-sealed")] {
        let ttl: i64 = redis::cmd("TTL").arg(key).query(&mut redis.conn()).unwrap();
        assert!(ttl > 3500 && ttl <= 3600, "{key}: {ttl}");
    }

    // A restarted server knows the paper is sealed.
    assert!(server.terminate().success());
    let server = Server::redis(&redis, &[]);
    let mut b = server.join("p-sealed", "");
    assert_eq!(b.snapshot["completed"], true);
    b.upsert("n0", json!({}));
    assert_eq!(b.next_of("error")["code"], "paper_completed");
}

#[test]
fn stopping_with_redis_gone_says_how_many_edits_are_lost() {
    let mut redis = Redis::start();
    let mut server = Server::redis(&redis, &["--shutdown-timeout", "1"]);
    let mut a = server.join("p-lost", "");
    redis.stop();
    write_notes(&mut a, 0, 3);
    server.signal("TERM");
    server.wait_log("3 edits could not be written");
    assert_eq!(server.wait().code(), Some(1));
}

#[test]
fn a_server_started_without_redis_serves_and_catches_up() {
    let mut redis = Redis::start();
    redis.stop();
    let server = Server::redis(&redis, &["--load-timeout", "1"]);
    assert_eq!(server.get("/healthz").0, 200);
    // No snapshot that may miss notes: the joiner is told to come back.
    assert_eq!(server.connect("/ws/p-late").closed().0, 1013);
    redis.restart();
    let mut a = server.join("p-late", "");
    a.upsert("n1", json!({}));
    let v = a.next_of("upsert")["v"].as_u64().unwrap();
    saved_up_to(&mut a, v);
    assert!(redis.note("p-late", "n1").is_some());
}

#[test]
fn drain_seconds_spreads_the_closes_and_still_writes_everything() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &["--drain-seconds", "2"]);
    let mut clients: Vec<Client> = (0..6).map(|_| server.join("p-drain", "")).collect();
    let v = write_notes(&mut clients[0], 0, 3);
    server.signal("TERM");
    // Each client waits for its close on a thread of its own, noting when it came.
    let waiters: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            std::thread::spawn(move || {
                assert_eq!(client.closed().0, 1001);
                std::time::Instant::now()
            })
        })
        .collect();
    let closed_at: Vec<_> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
    let spread = closed_at.iter().max().unwrap().duration_since(*closed_at.iter().min().unwrap());
    assert!(spread >= std::time::Duration::from_millis(1000), "closed within {spread:?}");
    let mut server = server;
    assert!(server.wait().success());
    let stored = redis.note("p-drain", "n2").expect("written");
    assert_eq!(stored["v"].as_u64(), Some(v));
}
