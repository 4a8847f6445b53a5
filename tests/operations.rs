//! PROTOCOL.md section 1 for operators and the main backend: `/papers`,
//! `/readyz`, `/metrics`.

use serde_json::{json, Value};

use crate::common::{eventually, Redis, Server};

fn paper(server: &Server, id: &str) -> (u16, Value) {
    let (status, head, body) = server.get(&format!("/papers/{id}"));
    if status == 200 {
        assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{head}");
    }
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[test]
fn papers_api_serves_the_snapshot_from_memory_or_redis() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &["--paper-linger", "0"]);
    assert_eq!(
        paper(&server, "never-written"),
        (200, json!({"paper": "never-written", "completed": false, "meta": {"data": {}, "v": 0}, "notes": []}))
    );
    assert_eq!(paper(&server, "bad.id").0, 400);
    assert_eq!(server.get("/papers/p1/x").0, 404);

    let mut a = server.join("p-api", "user=u1");
    a.upsert("n1", json!({"text": "hi"}));
    let v = a.next_of("upsert")["v"].as_u64().unwrap();
    // In memory, on whichever loop owns it.
    let (status, doc) = paper(&server, "p-api");
    assert_eq!(status, 200);
    assert_eq!(
        doc,
        json!({"paper": "p-api", "completed": false, "meta": {"data": {}, "v": 0}, "notes": [{"id": "n1", "author": "u1", "data": {"text": "hi"}, "v": v}]})
    );
    // Out of memory: read back from Redis.
    loop {
        if a.next_of("saved")["v"].as_u64() >= Some(v) {
            break;
        }
    }
    a.close();
    let restarted = Server::redis(&redis, &[]);
    assert_eq!(paper(&restarted, "p-api").1, doc);
}

#[test]
fn readyz_follows_redis_and_healthz_does_not() {
    let mut redis = Redis::start();
    let server = Server::redis(&redis, &[]);
    eventually("ready", || (server.get("/readyz").0 == 200).then_some(()));
    redis.stop();
    eventually("not ready without Redis", || (server.get("/readyz").0 == 503).then_some(()));
    assert_eq!(server.get("/healthz").0, 200);
    redis.restart();
    eventually("ready again", || (server.get("/readyz").0 == 200).then_some(()));
    let memory = Server::memory(&[]);
    assert_eq!(memory.get("/readyz").0, 200);
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn metrics_count_what_happened() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &[]);
    let mut a = server.join("p-metrics", "");
    let mut b = server.join("p-metrics", "");
    for i in 0..3 {
        a.upsert(&format!("n{i}"), json!({}));
    }
    a.send_text("not json");
    for _ in 0..3 {
        b.next_of("upsert");
    }
    a.next_of("error");
    let (status, head, text) = server.get("/metrics");
    assert_eq!(status, 200);
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert_eq!(metric(&text, "rollingpaper_sessions"), 2.0);
    assert_eq!(metric(&text, "rollingpaper_messages_in_total{type=\"upsert\"}"), 3.0);
    assert_eq!(metric(&text, "rollingpaper_refusals_total{code=\"invalid_json\"}"), 1.0);
    assert!(metric(&text, "rollingpaper_messages_out_total{type=\"upsert\"}") >= 6.0);
    assert!(metric(&text, "rollingpaper_broadcast_recipients_total") >= 6.0);
    assert!(metric(&text, "rollingpaper_received_bytes_total") > 0.0);
    assert!(metric(&text, "rollingpaper_papers") >= 1.0);
    // Up once the writer has connected (it loads its scripts first), which may
    // come after the first joins on a busy machine.
    eventually("redis_up", || {
        let (_, _, text) = server.get("/metrics");
        (metric(&text, "rollingpaper_redis_up") == 1.0).then_some(())
    });
    eventually("the edits written", || {
        let (_, _, text) = server.get("/metrics");
        (metric(&text, "rollingpaper_redis_ops_written_total") >= 3.0).then_some(())
    });
    let (_, _, text) = server.get("/metrics");
    assert!(metric(&text, "rollingpaper_write_behind_seconds_count") >= 3.0);
    assert_eq!(metric(&text, "rollingpaper_backlog"), 0.0);
}

#[test]
fn papers_api_with_the_memory_store() {
    let server = Server::memory(&[]);
    assert_eq!(
        paper(&server, "p-mem"),
        (200, json!({"paper": "p-mem", "completed": false, "meta": {"data": {}, "v": 0}, "notes": []}))
    );
    let mut a = server.join("p-mem", "user=u1");
    a.upsert("n1", json!({"t": 1}));
    let v = a.next_of("upsert")["v"].as_u64().unwrap();
    let expected = json!({"paper": "p-mem", "completed": false, "meta": {"data": {}, "v": 0}, "notes": [{"id": "n1", "author": "u1", "data": {"t": 1}, "v": v}]});
    assert_eq!(paper(&server, "p-mem"), (200, expected));
}
