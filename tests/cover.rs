//! PROTOCOL.md 3.1 and 3.2 (1.1): the paper's cover, `meta`.

use rollingpaper::store::keys;
use serde_json::{json, Value};

use crate::common::{token, unix_now, Redis, Server, SECRET};

fn cover_in_redis(redis: &Redis, paper: &str) -> Option<Value> {
    redis.hget(&keys::meta(paper), "cover").map(|c| serde_json::from_str(&c).unwrap())
}

#[test]
fn the_owner_sets_the_cover_and_everyone_sees_it_everywhere() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &[]);
    let mut a = server.join("p-cover", "user=ann");
    assert_eq!(a.snapshot["meta"], json!({"data": {}, "v": 0}), "no cover yet");
    let mut b = server.join("p-cover", "user=bob");
    let cover = json!({"title": "Happy birthday, Kim", "to": "Kim", "occasion": "birthday"});
    a.send(json!({"type": "meta", "data": cover, "ref": "m1"}));
    let sent = a.next_of("meta");
    assert_eq!(
        (sent["data"].clone(), sent["from"].clone(), sent["ref"].clone()),
        (cover.clone(), json!(a.you), json!("m1"))
    );
    let v = sent["v"].as_u64().unwrap();
    assert_eq!(b.next_of("meta")["data"], cover);
    loop {
        if a.next_of("saved")["v"].as_u64().unwrap() >= v {
            break;
        }
    }
    assert_eq!(cover_in_redis(&redis, "p-cover").unwrap(), json!({"data": cover, "v": v}));
    // A fresh node reads it back, in snapshots and GET /papers.
    drop(a);
    drop(b);
    let again = Server::redis(&redis, &[]);
    let c = again.join("p-cover", "");
    assert_eq!(c.snapshot["meta"], json!({"data": cover, "v": v}));
    let (status, _, body) = again.get("/papers/p-cover");
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["meta"], json!({"data": cover, "v": v}));
}

#[test]
fn the_sealed_snapshot_holds_the_cover() {
    let redis = Redis::start();
    let server = Server::redis(&redis, &[]);
    let mut a = server.join("p-sealed-cover", "user=ann");
    a.send(json!({"type": "meta", "data": {"title": "Bye"}}));
    let v = a.next_of("meta")["v"].as_u64().unwrap();
    a.send(json!({"type": "complete"}));
    a.next_of("completed");
    let entries: Vec<(String, Vec<(String, String)>)> =
        redis::cmd("XRANGE").arg("rp:papers:completed").arg("-").arg("+").query(&mut redis.conn()).unwrap();
    let snapshot: Value = serde_json::from_str(&entries[0].1.iter().find(|(k, _)| k == "snapshot").unwrap().1).unwrap();
    assert_eq!(snapshot["meta"], json!({"data": {"title": "Bye"}, "v": v}));
    a.send(json!({"type": "meta", "data": {"title": "Again"}, "ref": "late"}));
    let refused = a.next_of("error");
    assert_eq!((refused["code"].as_str(), refused["ref"].as_str()), (Some("paper_completed"), Some("late")));
}

#[test]
fn only_the_owner_sets_the_cover_and_it_has_the_size_limit_of_a_note() {
    let server = Server::memory(&["--jwt-secret", SECRET, "--max-note-bytes", "100"]);
    let exp = unix_now() + 600;
    let mut writer = server.join("p-rights", &format!("token={}", token("w", "p-rights", "writer", exp)));
    writer.send(json!({"type": "meta", "data": {"title": "mine"}, "ref": "w1"}));
    let refused = writer.next_of("error");
    assert_eq!((refused["code"].as_str(), refused["ref"].as_str()), (Some("forbidden"), Some("w1")));
    let mut owner = server.join("p-rights", &format!("token={}", token("o", "p-rights", "owner", exp)));
    owner.send(json!({"type": "meta", "data": {"title": "x".repeat(200)}, "ref": "o1"}));
    assert_eq!(owner.next_of("error")["code"], "too_large");
    owner.send(json!({"type": "meta", "data": [1], "ref": "o2"}));
    assert_eq!(owner.next_of("error")["code"], "invalid_message");
    owner.send(json!({"type": "meta", "data": {"title": "ok"}}));
    assert_eq!(writer.next_of("meta")["data"], json!({"title": "ok"}));
}

#[test]
fn concurrent_covers_on_two_nodes_converge_on_the_greater_version() {
    let redis = Redis::start();
    let node = |id: &str| Server::redis(&redis, &["--cluster", "--node-id", id]);
    let (a_node, b_node) = (node("a"), node("b"));
    let mut a = a_node.join("p-two", "user=ann");
    let mut b = b_node.join("p-two", "user=bob");
    a.send(json!({"type": "meta", "data": {"title": "from a"}}));
    b.send(json!({"type": "meta", "data": {"title": "from b"}}));
    // Each sees its own, and the other's if it is newer: the last meta each
    // receives is the winner, the same everywhere.
    // Under load a node may relay the other's cover before it reads its own
    // member's: each one's own is the one with its `from`.
    let own = |client: &mut crate::common::Client| loop {
        let you = client.snapshot["you"].clone();
        let meta = client.next_of("meta");
        if meta["from"] == you {
            break meta;
        }
    };
    let mine_a = own(&mut a);
    let mine_b = own(&mut b);
    let winner = if (mine_a["v"].as_u64(), "a") > (mine_b["v"].as_u64(), "b") { mine_a } else { mine_b };
    let stored = crate::common::eventually("the winner in Redis", || {
        let cover = cover_in_redis(&redis, "p-two")?;
        (cover["v"] == winner["v"]).then_some(cover)
    });
    assert_eq!(stored["data"], winner["data"]);
    for server in [&a_node, &b_node] {
        crate::common::eventually("every node to hold the winner", || {
            (server.join("p-two", "").snapshot["meta"]["data"] == winner["data"]).then_some(())
        });
    }
}

#[test]
fn a_cover_counts_as_a_write_of_the_paper_in_its_meta_hash() {
    // PROTOCOL.md 4: `created_ms` (first write), `updated_ms` (every write),
    // `completed` 0 or 1, whatever the first write is.
    let redis = Redis::start();
    let server = Server::redis(&redis, &[]);
    let mut a = server.join("p-cover-first", "user=ann");
    let now_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let meta = |field: &str| redis.hget(&keys::meta("p-cover-first"), field);
    let mut set_cover = |title: &str| {
        a.send(json!({"type": "meta", "data": {"title": title}}));
        let v = a.next_of("meta")["v"].as_u64().unwrap();
        while a.next_of("saved")["v"].as_u64().unwrap() < v {}
    };
    let before = now_ms();
    set_cover("first");
    let created: u64 = meta("created_ms").expect("created_ms after a cover alone").parse().unwrap();
    assert!(created >= before, "created_ms {created} before the write at {before}");
    assert_eq!(meta("updated_ms").map(|u| u.parse::<u64>().unwrap()), Some(created));
    assert_eq!(meta("completed").as_deref(), Some("0"));

    let later = now_ms().max(created + 1);
    while now_ms() < later {}
    set_cover("second");
    let updated: u64 = meta("updated_ms").unwrap().parse().unwrap();
    assert!(updated >= later, "updated_ms {updated} not moved past {later}");
    assert_eq!(meta("created_ms").unwrap().parse::<u64>().unwrap(), created, "created_ms stays the first write's");
}
