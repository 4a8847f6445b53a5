//! PROTOCOL.md section 6: several nodes on one Redis, relaying through pub/sub.

use rollingpaper::store::keys;
use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::common::{eventually, Client, Redis, Server};

fn node(redis: &Redis, id: &str) -> Server {
    Server::redis(redis, &["--cluster", "--node-id", id, "--rate", "100000", "--burst", "100000"])
}

/// A paper's notes as `id -> (v, data)`.
fn notes_of(snapshot: &Value) -> BTreeMap<String, (u64, Value)> {
    snapshot["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap().to_string(), (n["v"].as_u64().unwrap(), n["data"].clone())))
        .collect()
}

fn notes_in_redis(redis: &Redis, paper: &str) -> BTreeMap<String, (u64, Value)> {
    redis
        .hgetall(&keys::notes(paper))
        .into_iter()
        .filter_map(|(id, value)| {
            let value: Value = serde_json::from_str(&value).unwrap();
            (value.get("deleted").is_none()).then(|| (id, (value["v"].as_u64().unwrap(), value["data"].clone())))
        })
        .collect()
}

fn members_of(client: &Client) -> Vec<String> {
    let mut ids: Vec<String> =
        client.snapshot["members"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
    ids.sort();
    ids
}

#[test]
fn edits_cross_nodes_in_both_directions() {
    let redis = Redis::start();
    let (a_node, b_node) = (node(&redis, "a"), node(&redis, "b"));
    let mut a = a_node.join("p-cross", "user=ann");
    let mut b = b_node.join("p-cross", "user=bob");
    a.send(json!({"type": "upsert", "id": "n1", "data": {"text": "from a"}, "ref": "r1"}));
    let seen = b.next_of("upsert");
    assert_eq!((seen["id"].as_str(), seen["author"].as_str()), (Some("n1"), Some("ann")));
    assert_eq!(seen["from"], a.you.as_str());
    assert_eq!(seen["data"], json!({"text": "from a"}));
    b.send(json!({"type": "delete", "id": "n1"}));
    let deleted = a.next_of("delete");
    assert_eq!(deleted["from"], b.you.as_str());
    assert!(deleted["v"].as_u64() > seen["v"].as_u64());
    b.send(json!({"type": "cursor", "data": {"x": 1}}));
    assert_eq!(a.next_of("cursor")["from"], b.you.as_str());
    assert_ne!(a.you, b.you, "member ids are unique across nodes");
}

#[test]
fn presence_spans_the_nodes() {
    let redis = Redis::start();
    let (a_node, b_node) = (node(&redis, "a"), node(&redis, "b"));
    let mut a = a_node.join("p-presence", "user=ann");
    eventually("ann's presence in Redis", || redis.hget(&keys::members("p-presence"), &a.you).map(|_| ()));
    let b = b_node.join("p-presence", "user=bob&name=Bob");
    assert_eq!(members_of(&b), {
        let mut both = vec![a.you.clone(), b.you.clone()];
        both.sort();
        both
    });
    let join = a.next_of("join");
    assert_eq!(join["member"], json!({"id": b.you, "user": "bob", "name": "Bob"}));
    // A third member on a sees both, wherever they are.
    let c = a_node.join("p-presence", "");
    assert_eq!(members_of(&c).len(), 3);
    let b_id = b.you.clone();
    b.close();
    assert_eq!(a.next_of("leave")["member"], b_id.as_str());
}

#[test]
fn members_of_a_node_that_died_leave_within_seconds() {
    let redis = Redis::start();
    let (a_node, b_node) = (node(&redis, "a"), node(&redis, "b"));
    let mut a = a_node.join("p-dead", "");
    let b = b_node.join("p-dead", "");
    a.next_of("join");
    b_node.signal("KILL");
    assert_eq!(a.next_of("leave")["member"], b.you.as_str());
}

#[test]
fn concurrent_conflicting_upserts_converge_everywhere() {
    let redis = Redis::start();
    let nodes: Vec<Server> = ["n1", "n2", "n3"].iter().map(|id| node(&redis, id)).collect();
    let mut writers: Vec<Client> = nodes.iter().flat_map(|n| [n.join("p-race", ""), n.join("p-race", "")]).collect();
    // 6 writers x 167 upserts = 1,002 conflicting writes of five notes.
    for round in 0..167 {
        for (w, client) in writers.iter_mut().enumerate() {
            client.upsert(&format!("note{}", (round + w) % 5), json!({"by": w, "round": round}));
        }
    }
    for client in &mut writers {
        let mut last = 0;
        let mut echoes = 0;
        while echoes < 167 {
            let m = client.next();
            if m["type"] == "upsert" && m["from"] == client.you.as_str() {
                echoes += 1;
                last = last.max(m["v"].as_u64().unwrap());
            }
        }
        loop {
            let m = client.next();
            if m["type"] == "saved" && m["v"].as_u64().unwrap() >= last {
                break;
            }
        }
    }
    let stored = notes_in_redis(&redis, "p-race");
    assert_eq!(stored.len(), 5);
    eventually("every node to show what Redis holds", || {
        let views: Vec<_> = nodes.iter().map(|n| notes_of(&n.join("p-race", "").snapshot)).collect();
        views.iter().all(|v| *v == stored).then_some(())
    });
}

#[test]
fn a_restarted_node_rejoins_the_flow() {
    let redis = Redis::start();
    let a_node = node(&redis, "a");
    let mut a = a_node.join("p-restart", "");
    let b_node = node(&redis, "b");
    let b = b_node.join("p-restart", "");
    a.upsert("before", json!({}));
    a.next_of("upsert");
    assert!(b_node.terminate().success());
    drop(b);
    a.upsert("while-away", json!({}));
    let v = a.next_of("upsert")["v"].as_u64().unwrap();
    loop {
        if a.next_of("saved")["v"].as_u64() >= Some(v) {
            break;
        }
    }
    let b_node = node(&redis, "b");
    let mut c = b_node.join("p-restart", "");
    let ids: Vec<String> = notes_of(&c.snapshot).into_keys().collect();
    assert_eq!(ids, ["before", "while-away"]);
    a.upsert("after", json!({}));
    assert_eq!(c.next_of("upsert")["id"], "after");
    c.upsert("from-b", json!({}));
    loop {
        if a.next_of("upsert")["id"] == "from-b" {
            break;
        }
    }
}

#[test]
fn a_clustered_node_is_ready_once_it_hears_itself() {
    let redis = Redis::start();
    let a_node = node(&redis, "a");
    eventually("the relay canary", || (a_node.get("/readyz").0 == 200).then_some(()));
}

#[test]
fn a_lost_subscription_is_rebuilt_and_the_relay_goes_on() {
    let redis = Redis::start();
    let (a_node, b_node) = (node(&redis, "a"), node(&redis, "b"));
    let mut a = a_node.join("p-resub", "");
    let mut b = b_node.join("p-resub", "");
    // Redis drops every subscriber connection, as in a failover.
    let killed: i64 = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query(&mut redis.conn()).unwrap();
    assert!(killed >= 2);
    // Published while the subscriptions are down: b's node reads the paper again
    // once it has subscribed anew, so the edit is not lost to b either way.
    a.upsert("gap", json!({"t": 0}));
    // Both nodes subscribe again (to the papers they hold) and their canaries return.
    eventually("both nodes ready again", || {
        (a_node.get("/readyz").0 == 200 && b_node.get("/readyz").0 == 200).then_some(())
    });
    let mut seen = std::collections::HashSet::new();
    // A node subscribes to its papers before its canary can come back: this crosses.
    a.upsert("n", json!({"t": 1}));
    while seen.len() < 2 {
        let m = b.next();
        if m["type"] == "upsert" {
            seen.insert(m["id"].as_str().unwrap().to_string());
        }
    }
}
