//! Redis over TLS (`rediss://`, and a TLS Sentinel through a failover, with a
//! private CA) and Redis Cluster (`redis+cluster://`): edits saved, relayed
//! between nodes by sharded pub/sub, completed with one stream entry per paper,
//! through a node restart, a paper's slot resharded while it is written, and a
//! master killed and replaced by its replica.

use rollingpaper::store::keys;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

use crate::common::cluster::{to_json, ClusterNode, RedisCluster};
use crate::common::{eventually, free_port, Client, Paused, Server, TempDir};

// ---- TLS ------------------------------------------------------------------------------

/// A CA and a certificate it signs for 127.0.0.1, made with the `openssl` CLI.
struct Certs {
    dir: TempDir,
}

impl Certs {
    fn new(name: &str) -> Certs {
        let dir = TempDir::new(name);
        let run = |args: &[&str]| {
            let out =
                Command::new("openssl").args(args).current_dir(&dir.0).output().expect("openssl must be installed");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=rp-test-ca",
        ]);
        std::fs::write(dir.0.join("ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "redis.key",
            "-out",
            "redis.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            "redis.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "redis.crt",
            "-days",
            "2",
            "-extfile",
            "ext",
        ]);
        Certs { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.0.join(file)
    }
}

/// A `redis-server` that speaks TLS only.
struct TlsRedis {
    port: u16,
    _dir: TempDir,
    child: Child,
}

impl TlsRedis {
    fn start(certs: &Certs) -> TlsRedis {
        TlsRedis::start_with(certs, &[])
    }

    /// Started with more arguments (`--replicaof`, say).
    fn start_with(certs: &Certs, extra: &[&str]) -> TlsRedis {
        let port = free_port();
        let dir = TempDir::new("tls-redis");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", "0", "--tls-port", &port.to_string()])
            .args(["--tls-cert-file", certs.path("redis.crt").to_str().unwrap()])
            .args(["--tls-key-file", certs.path("redis.key").to_str().unwrap()])
            .args(["--tls-ca-cert-file", certs.path("ca.crt").to_str().unwrap()])
            .args(["--tls-auth-clients", "no", "--dir", dir.0.to_str().unwrap(), "--save", ""])
            .args(["--tls-replication", "yes"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let redis = TlsRedis { port, _dir: dir, child };
        eventually("the TLS redis-server to answer", || redis.conn(certs).ok().map(drop));
        redis
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    fn conn(&self, certs: &Certs) -> redis::RedisResult<redis::Connection> {
        let ca = std::fs::read(certs.path("ca.crt")).unwrap();
        let tls = redis::TlsCertificates { client_tls: None, root_cert: Some(ca) };
        redis::Client::build_with_tls(self.url(), tls)?.get_connection()
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `saved` at or past `v`.
fn saved(client: &mut Client, v: u64) {
    loop {
        let m = client.next();
        assert_ne!(m["type"], "error", "no error: {m}");
        if m["type"] == "saved" && m["v"].as_u64().unwrap() >= v {
            return;
        }
    }
}

/// Sends upserts `from..to` and returns the last version.
fn write(client: &mut Client, from: usize, to: usize) -> u64 {
    for i in from..to {
        client.upsert(&format!("n{i}"), json!({"i": i}));
    }
    let (mut last, mut seen) = (0, 0);
    while seen < to - from {
        let m = client.next();
        assert_ne!(m["type"], "error", "no error: {m}");
        if m["type"] == "upsert" {
            seen += 1;
            last = m["v"].as_u64().unwrap();
        }
    }
    last
}

#[test]
fn edits_are_saved_through_tls_with_a_private_ca() {
    let certs = Certs::new("certs");
    let redis = TlsRedis::start(&certs);
    let ca = certs.path("ca.crt");
    let server = Server::start(&["--redis", &redis.url(), "--redis-ca-file", ca.to_str().unwrap()]);
    let mut a = server.join("p-tls", "");
    let v = write(&mut a, 0, 5);
    saved(&mut a, v);
    let stored: Vec<(String, String)> =
        redis::cmd("HGETALL").arg(keys::notes("p-tls")).query(&mut redis.conn(&certs).unwrap()).unwrap();
    assert_eq!(stored.len(), 5);
}

#[test]
fn a_certificate_from_another_ca_is_refused_at_start_naming_the_host() {
    let certs = Certs::new("certs");
    let other = Certs::new("other-ca");
    let redis = TlsRedis::start(&certs);
    let sentinel = TlsSentinel::start(&certs, &redis);
    let wrong = other.path("ca.crt");
    let sentinel_url = format!("rediss+sentinel://127.0.0.1:{}/main", sentinel.port);
    for (url, host) in [(redis.url(), redis.port), (sentinel_url, sentinel.port)] {
        let out = Command::new(env!("CARGO_BIN_EXE_rollingpaper"))
            .args(["--listen", "127.0.0.1:0", "--redis", &url, "--redis-ca-file", wrong.to_str().unwrap()])
            .env_clear()
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url}: {stderr}");
        assert!(stderr.contains(&format!("127.0.0.1:{host}")), "names the host: {stderr}");
        assert!(stderr.contains("TLS") && stderr.contains("--redis-ca-file"), "says why: {stderr}");
    }
}

/// A `redis-sentinel` that speaks TLS only, to its clients and to the Redis it
/// watches.
struct TlsSentinel {
    port: u16,
    _dir: TempDir,
    child: Child,
}

impl TlsSentinel {
    fn start(certs: &Certs, master: &TlsRedis) -> TlsSentinel {
        let port = free_port();
        let dir = TempDir::new("tls-sentinel");
        let conf = dir.0.join("sentinel.conf");
        let file = |name| certs.path(name).display().to_string();
        std::fs::write(
            &conf,
            format!(
                "port 0\ntls-port {port}\nbind 127.0.0.1\ndir {}\ntls-cert-file {}\ntls-key-file {}\n\
                 tls-ca-cert-file {}\ntls-auth-clients no\ntls-replication yes\n\
                 sentinel monitor main 127.0.0.1 {} 1\nsentinel down-after-milliseconds main 1000\n\
                 sentinel failover-timeout main 5000\n",
                dir.0.display(),
                file("redis.crt"),
                file("redis.key"),
                file("ca.crt"),
                master.port
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let sentinel = TlsSentinel { port, _dir: dir, child };
        eventually("the TLS sentinel to name the master", || sentinel.master_port(certs));
        sentinel
    }

    /// The port of the master this sentinel names now.
    fn master_port(&self, certs: &Certs) -> Option<u16> {
        let ca = std::fs::read(certs.path("ca.crt")).unwrap();
        let tls = redis::TlsCertificates { client_tls: None, root_cert: Some(ca) };
        let url = format!("rediss://127.0.0.1:{}", self.port);
        let mut conn = redis::Client::build_with_tls(url, tls).ok()?.get_connection().ok()?;
        let addr: Vec<String> =
            redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg("main").query(&mut conn).ok()?;
        addr.get(1)?.parse().ok()
    }
}

impl Drop for TlsSentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sentinel_over_tls_is_followed_through_a_failover() {
    let certs = Certs::new("certs");
    let mut master = TlsRedis::start(&certs);
    let of_master = master.port.to_string();
    let replica = TlsRedis::start_with(&certs, &["--replicaof", "127.0.0.1", &of_master]);
    eventually("the replica to sync over TLS", || {
        let info: String = redis::cmd("INFO").arg("replication").query(&mut replica.conn(&certs).ok()?).ok()?;
        info.contains("master_link_status:up").then_some(())
    });
    let sentinel = TlsSentinel::start(&certs, &master);
    let url = format!("rediss+sentinel://127.0.0.1:{}/main", sentinel.port);
    let ca = certs.path("ca.crt");
    let server = Server::start(&["--redis", &url, "--redis-ca-file", ca.to_str().unwrap()]);
    let mut a = server.join("p-tls-sentinel", "");
    let v = write(&mut a, 0, 5);
    saved(&mut a, v);
    // The replica has the first five before the master dies.
    let acked: i64 = redis::cmd("WAIT").arg(1).arg(5000).query(&mut master.conn(&certs).unwrap()).unwrap();
    assert_eq!(acked, 1);

    let _ = master.child.kill();
    let _ = master.child.wait();
    eventually("the sentinel to promote the replica", || sentinel.master_port(&certs).filter(|&p| p == replica.port));
    // The server asks the sentinel again, over TLS, and writes to the new master.
    let v = write(&mut a, 5, 10);
    saved(&mut a, v);
    let stored: Vec<(String, String)> =
        redis::cmd("HGETALL").arg(keys::notes("p-tls-sentinel")).query(&mut replica.conn(&certs).unwrap()).unwrap();
    assert_eq!(stored.len(), 10, "every saved edit is on the promoted replica");
}

// ---- Redis Cluster ----------------------------------------------------------------------

fn node(cluster: &RedisCluster, id: &str) -> Server {
    Server::start(&["--redis", &cluster.url(), "--cluster", "--node-id", id, "--rate", "100000", "--burst", "100000"])
}

fn stream_papers(cluster: &RedisCluster) -> Vec<String> {
    let entries: Value = redis::cmd("XRANGE")
        .arg("rp:papers:completed")
        .arg("-")
        .arg("+")
        .query::<redis::Value>(&mut cluster.client())
        .map(to_json)
        .unwrap();
    entries.as_array().unwrap().iter().map(|e| e[1][1].as_str().unwrap().to_string()).collect()
}

#[test]
fn two_nodes_on_a_redis_cluster_relay_save_and_complete() {
    let cluster = RedisCluster::start(0);
    let (a_node, b_node) = (node(&cluster, "a"), node(&cluster, "b"));
    eventually("both nodes ready (their canary on the rp:nodes shard)", || {
        (a_node.get("/readyz").0 == 200 && b_node.get("/readyz").0 == 200).then_some(())
    });
    // Papers spread over the shards.
    let papers = ["p-one", "p-two", "p-three", "p-four"];
    let owners: std::collections::HashSet<usize> = papers.iter().map(|p| cluster.master_of(&keys::notes(p))).collect();
    assert!(owners.len() >= 2, "the papers sit on several shards");
    for paper in papers {
        let mut a = a_node.join(paper, "user=ann&role=owner");
        eventually("ann's presence in the cluster", || {
            cluster.hgetall(&keys::members(paper)).iter().any(|(id, _)| *id == a.you).then_some(())
        });
        let mut b = b_node.join(paper, "user=bob");
        let ids: Vec<&str> =
            b.snapshot["members"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert!(ids.contains(&a.you.as_str()), "presence spans the nodes: {ids:?}");
        assert_eq!(a.next_of("join")["member"]["id"], b.you.as_str());
        a.upsert("from-a", json!({"t": 1}));
        assert_eq!(b.next_of("upsert")["id"], "from-a");
        b.upsert("from-b", json!({"t": 2}));
        let v = b.next_of("upsert")["v"].as_u64().unwrap();
        while a.next_of("upsert")["id"] != "from-b" {}
        saved(&mut b, v);
        a.send(json!({"type": "complete"}));
        let done = b.next_of("completed");
        assert_eq!(done["notes"].as_array().unwrap().len(), 2);
    }
    eventually("one stream entry per completed paper", || {
        let mut seen = stream_papers(&cluster);
        seen.sort();
        let mut want: Vec<String> = papers.iter().map(|p| p.to_string()).collect();
        want.sort();
        (seen == want).then_some(())
    });
    for paper in papers {
        let meta = cluster.hgetall(&keys::meta(paper));
        assert!(!meta.iter().any(|(k, _)| k == "handoff_pending"), "the hand-off marker is cleared: {meta:?}");
    }

    // A node restarted: it reads what was written meanwhile and relays again.
    let mut a = a_node.join("p-restart", "");
    let b = b_node.join("p-restart", "");
    assert!(b_node.terminate().success());
    drop(b);
    let v = write(&mut a, 0, 3);
    saved(&mut a, v);
    let b_node = node(&cluster, "b");
    let mut c = b_node.join("p-restart", "");
    assert_eq!(c.snapshot["notes"].as_array().unwrap().len(), 3);
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
fn a_hand_off_left_pending_is_finished_at_start() {
    let cluster = RedisCluster::start(0);
    // As a writer that died between the seal and the stream entry leaves it.
    let snapshot = r#"{"paper":"p-left","completed":true,"notes":[]}"#;
    redis::cmd("HSET")
        .arg(keys::meta("p-left"))
        .arg("completed")
        .arg("1")
        .arg("handoff_pending")
        .arg(snapshot)
        .exec(&mut cluster.client())
        .unwrap();
    let _a = node(&cluster, "a");
    eventually("the pending entry appended", || (stream_papers(&cluster) == ["p-left"]).then_some(()));
    eventually("the marker cleared", || {
        cluster.hgetall(&keys::meta("p-left")).iter().all(|(k, _)| k != "handoff_pending").then_some(())
    });
}

#[test]
fn a_master_killed_and_replaced_by_its_replica_loses_no_saved_edit() {
    // Two replicas per master: after the failover, the new master still has one.
    let mut cluster = RedisCluster::start(2);
    // Replication is asynchronous: only what a replica has survives its master's
    // death, so `saved` waits for one (PROTOCOL.md 4).
    let replicated = |id: &str| {
        let url = cluster.url();
        let args = ["--redis", url.as_str(), "--cluster", "--node-id", id, "--redis-wait-replicas", "1"];
        Server::start(&[&args[..], &["--rate", "100000", "--burst", "100000"]].concat())
    };
    let (a_node, b_node) = (replicated("a"), replicated("b"));
    let mut a = a_node.join("p-failover", "");
    let mut b = b_node.join("p-failover", "");
    let v = write(&mut a, 0, 50);
    saved(&mut a, v);
    let victim = cluster.master_of(&keys::notes("p-failover"));
    cluster.nodes[victim].kill();
    cluster.wait_ok();
    eventually("a replica promoted in the victim's place", || {
        (cluster.master_of(&keys::notes("p-failover")) != victim).then_some(())
    });
    let v = write(&mut a, 50, 100);
    saved(&mut a, v);
    let stored = cluster.hgetall(&keys::notes("p-failover"));
    assert_eq!(stored.len(), 100, "every saved edit is on the promoted master");
    // The relay follows the new master too (what it missed meanwhile, it re-reads).
    a.upsert("probe", json!({}));
    loop {
        let m = b.next();
        if m["type"] == "upsert" && m["id"] == "probe" {
            break;
        }
    }
}

/// Waits for the `error` carrying `r`, skipping other messages; panics on `saved` at or past `v`.
fn refused(client: &mut Client, r: &str, v: u64) -> Value {
    loop {
        let m = client.next();
        assert!(!(m["type"] == "saved" && m["v"].as_u64() >= Some(v)), "saved instead of refused: {m}");
        if m["type"] == "error" && m["ref"] == r {
            return m;
        }
    }
}

#[test]
fn a_key_of_the_wrong_type_fails_only_its_paper_on_a_cluster() {
    // PROTOCOL.md 3.3 (1.1), as on one Redis (tests/integrity.rs): the cluster
    // client makes an error reply anywhere in a pipeline the pipeline's error, so
    // the refusal must still be traced to its paper rather than hold up the batch.
    let cluster = RedisCluster::start(0);
    let server = Server::start(&["--redis", &cluster.url(), "--rate", "100000", "--burst", "100000"]);
    eventually("the node ready", || (server.get("/readyz").0 == 200).then_some(()));
    let mut a = server.join("p-broken", "user=a");
    let mut b = server.join("p-fine", "user=b");
    redis::cmd("SET").arg(keys::notes("p-broken")).arg("oops").exec(&mut cluster.client()).unwrap();

    a.send(json!({"type": "upsert", "id": "n1", "data": {"t": 1}, "ref": "r1"}));
    let v1 = a.next_of("upsert")["v"].as_u64().unwrap();
    let refusal = refused(&mut a, "r1", v1);
    assert_eq!(refusal["code"], "write_failed", "{refusal}");

    // The other paper is not held up by it, and Redis counts as up.
    let started = std::time::Instant::now();
    let v = write(&mut b, 0, 1);
    saved(&mut b, v);
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "p-fine's edit took {:?}", started.elapsed());
    eventually("/readyz to be 200 and name p-broken with Redis's error", || {
        let (status, _, body) = server.get("/readyz");
        (status == 200 && body.contains("p-broken") && body.contains("WRONGTYPE")).then_some(())
    });

    // Repaired, the paper takes edits again.
    redis::cmd("DEL").arg(keys::notes("p-broken")).exec(&mut cluster.client()).unwrap();
    let until = crate::common::deadline();
    for attempt in 0.. {
        let r = format!("again{attempt}");
        a.send(json!({"type": "upsert", "id": "n2", "data": {"t": 2}, "ref": r}));
        let reply = a.next_of_any(&["upsert", "error"]);
        if reply["type"] == "upsert" {
            saved(&mut a, reply["v"].as_u64().unwrap());
            break;
        }
        assert_eq!(reply["code"], "unavailable", "{reply}");
        assert!(std::time::Instant::now() < until && attempt < 200, "p-broken never took an edit again");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(cluster.hgetall(&keys::notes("p-broken")).len(), 1);
    assert!(server.terminate().success());
}

/// `CLUSTER MYID` of a node.
fn node_id(conn: &mut redis::Connection) -> String {
    redis::cmd("CLUSTER").arg("MYID").query(conn).unwrap()
}

#[test]
fn a_papers_slot_resharded_while_it_is_written_loses_nothing_and_relays_on() {
    let cluster = RedisCluster::start(0);
    let (a_node, b_node) = (node(&cluster, "a"), node(&cluster, "b"));
    eventually("both nodes ready", || (a_node.get("/readyz").0 == 200 && b_node.get("/readyz").0 == 200).then_some(()));
    let paper = "p-resharded";
    let notes_key = keys::notes(paper);
    let mut a = a_node.join(paper, "");
    let mut b = b_node.join(paper, "");
    let v = write(&mut a, 0, 20);
    saved(&mut a, v);
    while b.next_of("upsert")["id"] != "n19" {}

    // The slot moves from its master to another, as `redis-cli --cluster
    // reshard` does it, step by step, with edits in the middle of the move
    // (the source answers ASK or TRYAGAIN for keys already gone).
    let from = cluster.master_of(&notes_key);
    let to = (from + 1) % cluster.nodes.len();
    let (mut source, mut target) = (cluster.nodes[from].conn().unwrap(), cluster.nodes[to].conn().unwrap());
    let slot: u16 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(&notes_key).query(&mut source).unwrap();
    let (source_id, target_id) = (node_id(&mut source), node_id(&mut target));
    let setslot = |conn: &mut redis::Connection, how: &str, id: &str| {
        redis::cmd("CLUSTER").arg("SETSLOT").arg(slot).arg(how).arg(id).query::<()>(conn).unwrap();
    };
    setslot(&mut target, "IMPORTING", &source_id);
    setslot(&mut source, "MIGRATING", &target_id);
    let keys: Vec<String> = redis::cmd("CLUSTER").arg("GETKEYSINSLOT").arg(slot).arg(100).query(&mut source).unwrap();
    assert!(keys.contains(&notes_key), "{keys:?}");
    // Half the keys go first; edits are made while the slot is split.
    let (first, rest) = keys.split_at(keys.len() / 2);
    let migrate = |conn: &mut redis::Connection, keys: &[String]| {
        if !keys.is_empty() {
            let port = cluster.nodes[to].port;
            redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(port)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(keys)
                .query::<()>(conn)
                .unwrap();
        }
    };
    migrate(&mut source, first);
    let during = write(&mut a, 20, 30);
    // The writer meets the split slot (TRYAGAIN: its script's keys are on both
    // masters) and keeps the edits to send again.
    eventually("the writer to meet the split slot", || {
        let (_, _, text) = a_node.get("/metrics");
        let errors = text.lines().find_map(|l| l.strip_prefix("rollingpaper_redis_errors_total "))?;
        (errors != "0").then_some(())
    });
    migrate(&mut source, rest);
    for i in 0..cluster.nodes.len() {
        setslot(&mut cluster.nodes[i].conn().unwrap(), "NODE", &target_id);
    }
    assert_eq!(cluster.master_of(&notes_key), to);

    // Every edit is saved, on the new master, once: each note at its version.
    saved(&mut a, during);
    let v = write(&mut a, 30, 40);
    saved(&mut a, v);
    let stored = cluster.hgetall(&notes_key);
    assert_eq!(stored.len(), 40, "every note is on the new master");
    let held: Value = serde_json::from_str(&a_node.get(&format!("/papers/{paper}")).2).unwrap();
    for note in held["notes"].as_array().unwrap() {
        let id = note["id"].as_str().unwrap();
        let (_, value) = stored.iter().find(|(k, _)| k == id).unwrap_or_else(|| panic!("{id} in Redis"));
        let value: Value = serde_json::from_str(value).unwrap();
        assert_eq!(value["v"], note["v"], "{id}: Redis holds the version the node holds");
    }
    // The relay followed the channel to its new shard: both ways.
    while b.next_of("upsert")["id"] != "n39" {}
    b.upsert("from-b", json!({}));
    while a.next_of("upsert")["id"] != "from-b" {}
}

#[test]
fn a_redis_cluster_over_tls_saves_and_relays() {
    let certs = Certs::new("certs");
    let file = |name| certs.path(name).display().to_string();
    // Each node speaks TLS on its TLS port (and over its cluster bus); its
    // plain port is for the test's own reads. A client on TLS is told the TLS
    // ports of the others.
    let tls_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let nodes = tls_ports
        .iter()
        .map(|port| {
            let port = port.to_string();
            let (cert, key, ca) = (file("redis.crt"), file("redis.key"), file("ca.crt"));
            ClusterNode::start(&[
                "--tls-port",
                &port,
                "--tls-cluster",
                "yes",
                "--tls-replication",
                "yes",
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
                "--tls-auth-clients",
                "no",
            ])
        })
        .collect();
    let cluster = RedisCluster::create(nodes, 0);
    let url = format!(
        "rediss+cluster://{}",
        tls_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(",")
    );
    let ca = file("ca.crt");
    let start = |id: &str| Server::start(&["--redis", &url, "--redis-ca-file", &ca, "--cluster", "--node-id", id]);
    let (a_node, b_node) = (start("a"), start("b"));
    eventually("both nodes ready over TLS", || {
        (a_node.get("/readyz").0 == 200 && b_node.get("/readyz").0 == 200).then_some(())
    });
    // Papers on several shards: each writer pipeline and relay listener is a TLS connection.
    let papers = ["p-tls-one", "p-tls-two", "p-tls-three", "p-tls-four"];
    let owners: std::collections::HashSet<usize> = papers.iter().map(|p| cluster.master_of(&keys::notes(p))).collect();
    assert!(owners.len() >= 2, "the papers sit on several shards");
    for paper in papers {
        let mut a = a_node.join(paper, "");
        let mut b = b_node.join(paper, "");
        let v = write(&mut a, 0, 3);
        saved(&mut a, v);
        while b.next_of("upsert")["id"] != "n2" {}
        b.upsert("from-b", json!({}));
        let v = b.next_of("upsert")["v"].as_u64().unwrap();
        while a.next_of("upsert")["id"] != "from-b" {}
        saved(&mut b, v);
        assert_eq!(cluster.hgetall(&keys::notes(paper)).len(), 4);
    }
    // A certificate from another CA is refused at start, naming a node.
    let other = Certs::new("other-ca");
    let out = Command::new(env!("CARGO_BIN_EXE_rollingpaper"))
        .args(["--listen", "127.0.0.1:0", "--redis", &url, "--redis-ca-file", other.path("ca.crt").to_str().unwrap()])
        .env_clear()
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(tls_ports.iter().any(|p| stderr.contains(&format!("127.0.0.1:{p}"))), "names a node: {stderr}");
    assert!(stderr.contains("TLS") && stderr.contains("--redis-ca-file"), "says why: {stderr}");
}

#[test]
fn a_master_that_hangs_and_is_replaced_is_left_by_the_relay() {
    let cluster = RedisCluster::start(1);
    let (a_node, b_node) = (node(&cluster, "a"), node(&cluster, "b"));
    eventually("both nodes ready", || (a_node.get("/readyz").0 == 200 && b_node.get("/readyz").0 == 200).then_some(()));
    // A paper away from the shard of `rp:nodes`, whose silence the canary would tell.
    let canary = cluster.master_of("rp:nodes");
    let paper = (0..64).map(|i| format!("p-hung-{i}")).find(|p| cluster.master_of(&keys::notes(p)) != canary).unwrap();
    let key = &keys::notes(&paper);
    let mut a = a_node.join(&paper, "");
    let mut b = b_node.join(&paper, "");
    a.upsert("before", json!({}));
    assert_eq!(b.next_of("upsert")["id"], "before");

    // The paper's master hangs (no reset, no EOF: its connections just go
    // silent) and the cluster promotes its replica.
    let victim = cluster.master_of(key);
    let witness = &cluster.nodes[cluster.nodes.iter().position(|n| n.port != cluster.nodes[victim].port).unwrap()];
    let _paused = Paused::process(cluster.nodes[victim].pid().unwrap());
    eventually("the replica promoted", || {
        let mut conn = witness.conn().ok()?;
        let slot: u16 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query(&mut conn).ok()?;
        let slots: Value = redis::cmd("CLUSTER").arg("SLOTS").query(&mut conn).map(to_json).ok()?;
        let port = slots
            .as_array()?
            .iter()
            .find(|r| r[0].as_i64() <= Some(slot.into()) && Some(slot.into()) <= r[1].as_i64())?[2][1]
            .as_i64()?;
        (port != i64::from(cluster.nodes[victim].port)).then_some(())
    });
    // Both relays leave the silent master for the new one: edits cross both ways.
    a.upsert("after", json!({}));
    while b.next_of("upsert")["id"] != "after" {}
    b.upsert("back", json!({}));
    while a.next_of("upsert")["id"] != "back" {}
}

#[test]
fn readiness_follows_every_shard_not_only_the_canarys() {
    let cluster = RedisCluster::start(0);
    let server = node(&cluster, "a");
    eventually("ready", || (server.get("/readyz").0 == 200).then_some(()));
    // A master away from the shard of `rp:nodes` (where the canary rides) hangs.
    let canary = cluster.master_of("rp:nodes");
    let victim = (0..cluster.nodes.len()).find(|&i| i != canary).unwrap();
    let paused = Paused::process(cluster.nodes[victim].pid().unwrap());
    eventually("/readyz to say 503", || {
        let (status, _, body) = server.get("/readyz");
        (status == 503).then_some(body)
    });
    drop(paused);
    eventually("/readyz to say 200 again", || (server.get("/readyz").0 == 200).then_some(()));
}

#[test]
fn a_master_down_or_hung_holds_up_only_its_own_papers() {
    // The papers of the other masters keep being saved while one master is
    // killed, then while one hangs (SIGSTOP: its connections go silent). Neither
    // has a replica to take over, and `cluster-require-full-coverage no` lets
    // the other masters go on serving their slots meanwhile.
    let mut cluster =
        RedisCluster::start_with(0, &["--cluster-require-full-coverage", "no", "--appendfsync", "always"]);
    let server = Server::start(&["--redis", &cluster.url(), "--rate", "100000", "--burst", "100000"]);
    eventually("the node ready", || (server.get("/readyz").0 == 200).then_some(()));
    let notes = |paper: &str| keys::notes(paper);
    let masters: Vec<usize> = (0..cluster.nodes.len()).collect();
    let papers: Vec<String> = masters
        .iter()
        .map(|&m| (0..512).map(|i| format!("p-iso-{i}")).find(|p| cluster.master_of(&notes(p)) == m).unwrap())
        .collect();
    let mut clients: Vec<Client> = papers.iter().map(|p| server.join(p, "user=u")).collect();
    for client in &mut clients {
        let v = write(client, 0, 1);
        saved(client, v);
    }

    let mut next = 1;
    for (victim, fault) in [(0, "killed"), (1, "hung")] {
        let paused = match fault {
            "killed" => {
                cluster.nodes[victim].kill();
                None
            }
            _ => Some(Paused::process(cluster.nodes[victim].pid().unwrap())),
        };
        // The victim's paper takes the edit (its members see it) but cannot save it.
        let waiting = write(&mut clients[victim], next, next + 1);
        next += 1;
        // The first edits may wait for the writer to find the master gone (a
        // hung one takes an I/O timeout); past that, the lost master holds
        // nothing up: it is probed off the writer's thread.
        for round in 0..6 {
            for other in (0..clients.len()).filter(|&i| i != victim) {
                let started = std::time::Instant::now();
                let v = write(&mut clients[other], next, next + 1);
                saved(&mut clients[other], v);
                let took = started.elapsed();
                assert!(round < 2 || took < std::time::Duration::from_secs(1), "{fault}: round {round} took {took:?}");
            }
            next += 1;
        }
        let early = clients[victim].drain();
        assert!(
            !early.iter().any(|m| m["type"] == "saved" && m["v"].as_u64() >= Some(waiting)),
            "saved while its master is {fault}: {early:?}"
        );
        eventually("/readyz to say 503 while a master is lost", || (server.get("/readyz").0 == 503).then_some(()));

        // Back, the master gets the edit that waited.
        match paused {
            Some(paused) => drop(paused),
            None => cluster.nodes[victim].restart(),
        }
        saved(&mut clients[victim], waiting);
        let stored = cluster.hgetall(&notes(&papers[victim]));
        assert!(stored.iter().any(|(id, _)| *id == format!("n{}", next - 7)), "{fault}: {stored:?}");
        eventually("/readyz to say 200 again", || (server.get("/readyz").0 == 200).then_some(()));
    }
    assert!(server.terminate().success());
}

#[test]
fn a_failover_with_replicas_does_not_hold_up_the_other_masters_papers() {
    // Three masters with a replica each; saves wait for a replica. One master is
    // killed and its replica promoted: the papers of the two other masters keep
    // being saved within a second each, through the whole failover.
    // `cluster-require-full-coverage no`: with the default, Redis itself refuses
    // every slot (CLUSTERDOWN) until the failover is over.
    let mut cluster = RedisCluster::start_with(1, &["--cluster-require-full-coverage", "no"]);
    let replicated = |id: &str| {
        let url = cluster.url();
        let args = ["--redis", url.as_str(), "--cluster", "--node-id", id, "--redis-wait-replicas", "1"];
        Server::start(&[&args[..], &["--rate", "100000", "--burst", "100000"]].concat())
    };
    let (a_node, b_node) = (replicated("a"), replicated("b"));
    for node in [&a_node, &b_node] {
        eventually("the node ready", || (node.get("/readyz").0 == 200).then_some(()));
    }
    let notes = |paper: &str| keys::notes(paper);
    let masters: Vec<usize> =
        cluster.masters().iter().map(|m| cluster.nodes.iter().position(|n| n.port == m.port).unwrap()).collect();
    let victim = masters[0];
    // Two papers per master, one member on each node for each.
    let mut papers = Vec::new();
    for &m in &masters {
        papers.extend((0..2048).map(|i| format!("p-fo-{i}")).filter(|p| cluster.master_of(&notes(p)) == m).take(2));
    }
    let mut writers: Vec<(bool, Client)> = Vec::new();
    for p in &papers {
        let healthy = cluster.master_of(&notes(p)) != victim;
        writers.push((healthy, a_node.join(p, "user=a")));
        writers.push((healthy, b_node.join(p, "user=b")));
    }
    for (_, w) in &mut writers {
        let v = write_own(w, 0);
        saved(w, v);
    }
    cluster.nodes[victim].kill();
    // The victim's papers wait; every other paper's edit is saved within a second.
    let mut took = Vec::new();
    let mut next = 1;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(8);
    while std::time::Instant::now() < until {
        for (_, w) in writers.iter_mut().filter(|(healthy, _)| *healthy) {
            let started = std::time::Instant::now();
            let v = write_own(w, next);
            saved(w, v);
            took.push(started.elapsed());
        }
        next += 1;
    }
    took.sort();
    let p99 = took[took.len() * 99 / 100];
    let worst = *took.last().unwrap();
    eprintln!(
        "{} saves on the healthy masters: p50 {:?}, p99 {:?}, max {:?}",
        took.len(),
        took[took.len() / 2],
        p99,
        took.last().unwrap()
    );
    assert!(p99 < std::time::Duration::from_secs(1), "p99 {p99:?} over {} saves", took.len());
    assert!(worst < std::time::Duration::from_secs(1), "a save on a healthy master took {worst:?}");
    // The victim's replica took over, with no replica of its own: its papers
    // are saved once the old master is back, as its replica.
    cluster.wait_ok();
    cluster.nodes[victim].restart();
    for (healthy, w) in writers.iter_mut().filter(|(healthy, _)| !*healthy) {
        let _ = healthy;
        let v = write_own(w, next);
        saved(w, v);
    }
}

/// Sends one upsert of a note of this member's own and returns its version.
fn write_own(client: &mut Client, i: usize) -> u64 {
    let id = format!("{}-n{}", client.you, i % 100);
    client.upsert(&id, json!({"i": i}));
    loop {
        let m = client.next();
        assert_ne!(m["type"], "error", "no error: {m}");
        if m["type"] == "upsert" && m["id"] == id.as_str() {
            return m["v"].as_u64().unwrap();
        }
    }
}
