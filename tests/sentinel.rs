//! PROTOCOL.md section 4, Redis master failing over under Sentinel: nothing the
//! writer counted as written is lost, and clients see no error.

use rollingpaper::store::keys;
use serde_json::json;

use crate::common::{eventually, Client, Redis, Sentinel, Server};

/// Sends upserts `from..to` and returns the last version; fails on any error.
fn write(client: &mut Client, from: usize, to: usize) -> u64 {
    for i in from..to {
        client.upsert(&format!("n{i}"), json!({"i": i}));
    }
    let mut last = 0;
    let mut seen = 0;
    while seen < to - from {
        let m = client.next();
        assert_ne!(m["type"], "error", "no client error through a failover: {m}");
        if m["type"] == "upsert" {
            seen += 1;
            last = m["v"].as_u64().unwrap();
        }
    }
    last
}

fn saved(client: &mut Client, v: u64) {
    loop {
        let m = client.next();
        assert_ne!(m["type"], "error", "no client error through a failover: {m}");
        if m["type"] == "saved" && m["v"].as_u64().unwrap() >= v {
            return;
        }
    }
}

fn replicas(redis: &Redis) -> usize {
    let info: String = redis::cmd("INFO").arg("replication").query(&mut redis.conn()).unwrap_or_default();
    info.lines().find_map(|l| l.strip_prefix("connected_slaves:")).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

#[test]
fn a_master_failover_loses_nothing_that_was_counted_written() {
    let mut master = Redis::start();
    let of_master = ["--replicaof", "127.0.0.1", &master.port.to_string()].map(String::from);
    let of_master: Vec<&str> = of_master.iter().map(String::as_str).collect();
    let replicas_up = [Redis::start_with(&of_master), Redis::start_with(&of_master)];
    eventually("two replicas in sync", || (replicas(&master) == 2).then_some(()));
    let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start("main", master.port)).collect();
    let url = format!(
        "redis+sentinel://{}/main",
        sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect::<Vec<_>>().join(",")
    );
    let server = Server::start(&["--redis", &url, "--redis-wait-replicas", "1", "--rate", "10000", "--burst", "10000"]);
    let mut a = server.join("p-failover", "");
    let v = write(&mut a, 0, 50);
    saved(&mut a, v);

    let old = master.port;
    master.stop();
    let promoted =
        eventually("a sentinel to promote a replica", || sentinels[0].master_port("main").filter(|&port| port != old));
    let new_master = replicas_up.iter().find(|r| r.port == promoted).expect("a replica was promoted");
    let v = write(&mut a, 50, 100);
    saved(&mut a, v);
    let stored = new_master.hgetall(&keys::notes("p-failover"));
    assert_eq!(stored.len(), 100, "every edit counted as written is on the new master");
}

#[test]
fn with_wait_replicas_an_edit_is_saved_only_once_a_replica_has_it() {
    let master = Redis::start();
    let server = Server::redis(&master, &["--redis-wait-replicas", "1"]);
    let mut a = server.join("p-wait", "");
    let v = write(&mut a, 0, 1);
    // No replica: the batch is written to the master, but not counted as written.
    eventually("WAIT to fail for want of a replica", || {
        let (_, _, text) = server.get("/metrics");
        let backlog = text.lines().find_map(|l| l.strip_prefix("rollingpaper_backlog "))?;
        let errors = text.lines().find_map(|l| l.strip_prefix("rollingpaper_redis_errors_total "))?;
        (backlog == "1" && errors != "0").then_some(())
    });
    let _replica = Redis::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
    saved(&mut a, v);
}
