//! 4 (1.2): Redis is shared. No client's traffic, within every limit, keeps
//! Redis busy for anyone else: each write call is bounded, a note's stored form
//! is bounded whatever patches it receives, and other papers keep being saved.

use rollingpaper::store::keys;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::common::*;

/// A patch naming `fields` new 64-character fields, each set to `null`: it
/// changes nothing the note shows, and passes every size check.
fn null_churn(round: usize, fields: usize) -> Value {
    let data: Map<String, Value> =
        (0..fields).map(|f| (format!("{round:04}{f:04}{}", "f".repeat(56)), Value::Null)).collect();
    json!({"type": "patch", "id": "n", "data": data, "ref": format!("h{round}")})
}

#[test]
fn null_field_churn_within_the_limits_leaves_redis_free_for_other_papers() {
    // Redis answers BUSY to every other client once a script runs past 100 ms.
    let redis = Redis::start_with(&["--busy-reply-threshold", "100"]);
    let mut server = Server::redis(&redis, &[]);
    let mut hostile = server.join("p-churn", "");
    let mut honest = server.join("p-honest", "");
    hostile.upsert("n", json!({"text": "hi"}));
    hostile.next_of("upsert");

    // A reader outside the server: every PING must be answered, never BUSY.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, url) = (stop.clone(), redis.url());
        std::thread::spawn(move || {
            let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
            let (mut answers, mut busy, mut slowest) = (0, Vec::new(), Duration::ZERO);
            let until = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                let sent = Instant::now();
                match redis::cmd("PING").query::<String>(&mut conn) {
                    Ok(_) => answers += 1,
                    Err(e) => busy.push(e.to_string()),
                }
                slowest = slowest.max(sent.elapsed());
                std::thread::sleep(Duration::from_millis(20));
            }
            (answers, busy, slowest)
        })
    };

    // Within the burst (200 messages): 180 patches of 220 new fields each.
    let rounds = 180;
    for round in 0..rounds {
        hostile.send(null_churn(round, 220));
    }
    // Another paper's edits are saved meanwhile, each within the patience of a test.
    for i in 0..20 {
        honest.upsert(&format!("m{i}"), json!({"text": i}));
        let v = honest.next_of("upsert")["v"].as_u64().unwrap();
        loop {
            let saved = honest.next_of("saved")["v"].as_u64().unwrap();
            if saved >= v {
                break;
            }
        }
    }
    // The hostile session's patches are all applied and saved (nothing refused).
    let mut last_v = 0;
    for _ in 0..rounds {
        let msg = hostile.next_of_any(&["patch", "error"]);
        assert_eq!(msg["type"], "patch", "{msg}");
        last_v = last_v.max(msg["v"].as_u64().unwrap());
    }
    while hostile.next_of("saved")["v"].as_u64().unwrap() < last_v {}
    eventually("every patch written", || {
        let (_, _, metrics) = server.get("/metrics");
        metrics.lines().any(|l| l == "rollingpaper_backlog 0").then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    let (answers, busy, slowest) = sampler.join().unwrap();
    assert!(busy.is_empty(), "Redis refused {} of {} PINGs: {:?}", busy.len(), answers + busy.len(), busy.first());
    assert!(answers > 0);

    // The note's stored form stays within max_note_bytes and a fixed overhead.
    let stored = redis.hget(&keys::notes("p-churn"), "n").unwrap();
    assert!(stored.len() <= 16 * 1024 + 8 * 1024, "stored note is {} bytes", stored.len());
    let note: Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(note["data"], json!({"text": "hi"}));
    eprintln!("PING: {answers} answers, slowest {slowest:?}; stored note {} bytes", stored.len());

    // Nothing is left behind: a graceful stop writes everything and exits 0.
    server.signal("TERM");
    assert!(server.wait().success());
}
