//! Faults at random moments, checked the way Jepsen checks acknowledged writes:
//! two clustered nodes on one Redis (append-only, fsync always), clients editing
//! six papers through them, and a fault thread killing nodes, killing and pausing
//! Redis, dropping Redis connections, breaking one paper's key, planting
//! corrupt values, setting a hostile client loose on a paper of its own for a
//! few seconds (PROTOCOL.md 1.2: within every limit, no client may make Redis
//! busy for the others), and, through a fault proxy between each node and
//! Redis, cutting one node from Redis while the other works (a paper sealed
//! meanwhile), slowing its link, or leaving it half open. On a Redis Cluster
//! (three masters, a replica each, nodes waiting for one replica) a fault hits
//! one shard, and masters are failed over (`CLUSTER FAILOVER`, and `kill -9`
//! of a master whose replica takes over before it comes back as a replica).
//! Some runs give the nodes a tiny `--max-tombstones` or `--tombstone-retention`.
//! Beside the clients, an API writer calls the backend API (PROTOCOL.md 7) of
//! a node at random: `PUT`, `PATCH` and `DELETE` of notes of the same papers,
//! each on a connection of its own, a write answered 503, 504 or nothing sent
//! again until an answer settles it; and an eraser erases three more papers,
//! each edited by two clients of its own, one after the other (a partition
//! brings the next one forward: a node's backlog is replayed after it).
//!
//! What must hold:
//! - each edit its sender saw `saved` is read back from Redis at once, by a
//!   connection of the checker's own, and again at the end, and judged by the
//!   versions Redis keeps (`judge`): only a later version may stand in for it,
//!   and an upsert superseded only by patches keeps its other fields; some
//!   notes are created once and never touched again;
//! - sealed papers equal their stream entry, and so does every `completed` a
//!   client received and what every node serves for them;
//! - every node and every connected client shows what Redis holds;
//! - every API write answered `200 {"v":V}` is judged as a saved edit of
//!   version V, at once and at the end;
//! - no bystander is refused `unavailable` (an API write: 503)
//!   (`check_bystanders`);
//! - after an erase's `204`, Redis holds no key of the paper but its marker
//!   (read every 50 ms, after every later fault and at the end), its
//!   open sessions are closed with 4410, its joins are answered 410, and
//!   nothing sent to it after the `204` is saved (`check_erases`);
//! - Redis answers, every paper takes a fresh edit, and no node exits by itself.
//!
//! `RP_CHAOS_SEED` replays a run's random choices (timing still varies);
//! `RP_CHAOS_SECONDS` sets how long faults go on (45 by default, so that
//! `cargo test` stays short; `scripts/chaos.sh` runs it for longer);
//! `RP_CHAOS_FAULTS` (say `0,2,5`) limits the faults to some kinds of `FAULTS`;
//! `RP_CHAOS_REDIS=cluster` runs it on a Redis Cluster instead of one Redis
//! (`single`, the default). With the `fault-lose-writes` feature,
//! `RP_FAULT_LOSE_ONE_IN=N` makes the nodes lose one note write in N on
//! purpose, and `the_checker_catches_lost_writes` proves the checker sees it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::ConnectionLike;
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

use crate::common::cluster::RedisCluster;
use crate::common::proxy::{Direction, Mode, Proxy};
use crate::common::{free_port, Redis};

const PAPERS: usize = 6;
const CLIENTS: usize = 8;
/// The hostile client's papers, after the others (`chaos-hostile0`).
const HOSTILE_PAPERS: usize = 1;
/// The papers every final check reads (the papers to erase come after them).
const ALL_PAPERS: usize = PAPERS + HOSTILE_PAPERS;
/// Papers erased through the backend API during the run (`chaos-erase0`...),
/// one after the other, so that the other checks keep their papers.
const ERASE_PAPERS: usize = 3;
/// Every paper, the ones to erase included.
const EVERY_PAPER: usize = ALL_PAPERS + ERASE_PAPERS;
/// The hostile client's index among clients (its edits' `client`).
const HOSTILE: usize = CLIENTS;
/// The first client of the papers to erase: two a paper, one on each node at first.
const ERASE_CLIENT: usize = HOSTILE + HOSTILE_PAPERS;
const ERASE_CLIENTS: usize = 2 * ERASE_PAPERS;
/// The `client` of the API writer's writes.
const API_CLIENT: usize = ERASE_CLIENT + ERASE_CLIENTS;
/// The nodes' `--api-key` (at least 32 bytes).
const API_KEY: &str = "chaos-checker-api-key-0123456789abcdef";
/// The nodes' `--api-timeout`: short, so that Redis faults draw `504`s.
const API_TIMEOUT_SECONDS: u64 = 2;
/// How long the API writer waits for an answer (the API timeout and some).
const API_WAIT: Duration = Duration::from_secs(API_TIMEOUT_SECONDS + 5);
/// How long the API writer retries one write answered 503, 504 or nothing,
/// and one erase.
const API_RETRY_FOR: Duration = Duration::from_secs(30);
/// The nodes' `--erase-retention`: longer than any run.
const ERASE_RETENTION_SECONDS: u64 = 24 * 3600;
/// After an erase's `204`: how long a session of the paper may stay open (its
/// 4410 on its way), counted from the erase or from the end of a fault that
/// could hold its node back.
const ERASE_CLOSE: Duration = Duration::from_secs(10);
/// After an erase's `204`: how long the node that did not erase may take to
/// hear of it through the relay (and answer a join 410).
const RELAY_LAG: Duration = Duration::from_secs(1);
/// Note ids per paper: few, so that concurrent writes to one note happen.
const POOL: u64 = 5;
/// How many papers are sealed during a run (about one in three).
const SEALED: usize = 2;
const NODE_IDS: [&str; 2] = ["a", "b"];
/// Versions are integers in [1, 2^53).
const V_LIMIT: u64 = 1 << 53;
/// After the last fault: how long clients may take to see their edits resolved.
const QUIESCE: Duration = Duration::from_secs(30);
/// After the last fault: how long a paper may take to accept and save a fresh edit.
const FRESH_EDIT: Duration = Duration::from_secs(10);
/// How long a client keeps trying to reconnect before it gives up.
const RECONNECT: Duration = Duration::from_secs(45);

/// A note as compared: `id -> {author, data, v}`.
type Notes = BTreeMap<String, Value>;

fn paper_name(p: usize) -> String {
    if p < PAPERS {
        format!("chaos{p}")
    } else if p < ALL_PAPERS {
        format!("chaos-hostile{}", p - PAPERS)
    } else {
        format!("chaos-erase{}", p - ALL_PAPERS)
    }
}

/// Whether a paper is one of those erased during the run.
fn is_erasable(p: usize) -> bool {
    (ALL_PAPERS..EVERY_PAPER).contains(&p)
}

// ---- randomness ------------------------------------------------------------------

/// splitmix64: small, fast, and good enough to pick faults and edits.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Rng {
        let mut rng = Rng(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
        rng.next();
        rng
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn between_ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

// ---- notes and versions ---------------------------------------------------------------

/// A version as sent by the server: an integer in [1, 2^53), else `None`.
fn version_of(v: &Value) -> Option<u64> {
    v.as_u64().filter(|v| (1..V_LIMIT).contains(v))
}

fn note_value(note: &Value) -> Value {
    json!({"author": note["author"], "data": note["data"], "v": note["v"]})
}

fn notes_of(list: &Value) -> Option<Notes> {
    let list = list.as_array()?;
    list.iter().map(|n| Some((n["id"].as_str()?.to_string(), note_value(n)))).collect()
}

/// A stored note value, if it is one: `(v, Some(note))`, or `(v, None)` for a tombstone.
fn stored_note(raw: &[u8]) -> Option<(u64, Option<Value>)> {
    let value: Value = serde_json::from_slice(raw).ok()?;
    let v = version_of(&value["v"])?;
    if value.get("deleted").is_some() {
        return Some((v, None));
    }
    (value["author"].is_string() && value["data"].is_object()).then(|| (v, Some(note_value(&value))))
}

/// What two views differ in, briefly.
fn diff(left: &Notes, right: &Notes) -> String {
    let mut out = Vec::new();
    for (id, l) in left {
        match right.get(id) {
            None => out.push(format!("{id}: only left {l}")),
            Some(r) if r != l => out.push(format!("{id}: {l} vs {r}")),
            _ => {}
        }
    }
    for (id, r) in right {
        if !left.contains_key(id) {
            out.push(format!("{id}: only right {r}"));
        }
    }
    out.join("; ")
}

// ---- Redis, read and poked from outside ------------------------------------------------

fn redis_conn(port: u16) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(conn)
}

fn notes_key(paper: &str) -> String {
    format!("rp:paper:{{{paper}}}:notes")
}

fn meta_key(paper: &str) -> String {
    format!("rp:paper:{{{paper}}}:meta")
}

/// Another key of a paper (PROTOCOL.md 4): `tombstones`, `members`, `revoked`, `erased`.
fn paper_key(paper: &str, what: &str) -> String {
    format!("rp:paper:{{{paper}}}:{what}")
}

const STREAM: &str = "rp:papers:completed";
/// The channel of the nodes' heartbeats (their relay canary).
const NODES_CHANNEL: &str = "rp:nodes";

/// The Redis under the nodes: one server (the default), or with
/// `RP_CHAOS_REDIS=cluster` a Redis Cluster of three masters without replicas.
/// Either way every server is append-only with `appendfsync always`, so that
/// one killed with SIGKILL and started again from its file has every write it
/// acknowledged: `saved` follows Redis's reply, so it must hold through that
/// fault. Under Redis's default (fsync once a second) a killed server loses up
/// to its last second of writes, saved or not; what keeps `saved` through the
/// loss of a master there is a replica and `--redis-wait-replicas`, which
/// tests/redis_cluster.rs covers with a failover.
enum Store {
    Single(Redis),
    /// `holds[i]`: what the master `nodes[i]` owns, for the fault timeline.
    Cluster {
        cluster: RedisCluster,
        holds: Vec<String>,
        /// Each server's shard: the port of the master that held its slots at the
        /// start (a failover swaps master and replica within a shard, never slots).
        shard_of: Vec<u16>,
        /// Each paper's shard.
        paper_shard: Vec<u16>,
    },
}

/// Whether `INFO replication` says a master has its replica online.
fn has_replica_online(info: &str) -> bool {
    info.contains("role:master") && info.lines().any(|l| l.starts_with("slave0:") && l.contains("state=online"))
}

impl Store {
    fn start(kind: &str) -> Store {
        let extra = ["--appendfsync", "always"];
        match kind {
            "single" => Store::Single(Redis::start_with(&extra)),
            "cluster" => {
                // One replica per master, and the healthy shards serve while one
                // is down: a failover of one shard is a fault of that shard only.
                let extra = [&extra[..], &["--cluster-require-full-coverage", "no"]].concat();
                let cluster = RedisCluster::start_with(1, &extra);
                let shard_of: Vec<u16> = cluster
                    .nodes
                    .iter()
                    .map(|node| {
                        let info = node.info("replication");
                        let master = info.lines().find_map(|l| l.strip_prefix("master_port:"));
                        master.and_then(|p| p.trim().parse().ok()).unwrap_or(node.port)
                    })
                    .collect();
                let paper_shard: Vec<u16> = (0..EVERY_PAPER)
                    .map(|p| cluster.nodes[cluster.master_of(&notes_key(&paper_name(p)))].port)
                    .collect();
                let mut holds = vec![Vec::new(); cluster.nodes.len()];
                for p in 0..EVERY_PAPER {
                    holds[cluster.master_of(&notes_key(&paper_name(p)))].push(paper_name(p));
                }
                holds[cluster.master_of(STREAM)].push("the completion stream".into());
                holds[cluster.master_of(NODES_CHANNEL)].push("the canary channel".into());
                let holds = holds
                    .into_iter()
                    .zip(&cluster.nodes)
                    .zip(&shard_of)
                    .map(|((held, node), shard)| match *shard == node.port {
                        true => format!("127.0.0.1:{} (master at the start: {})", node.port, held.join(", ")),
                        false => format!("127.0.0.1:{} (replica of {shard} at the start)", node.port),
                    })
                    .collect();
                Store::Cluster { cluster, holds, shard_of, paper_shard }
            }
            other => panic!("RP_CHAOS_REDIS must be single or cluster, not {other:?}"),
        }
    }

    fn url(&self) -> String {
        match self {
            Store::Single(redis) => redis.url(),
            Store::Cluster { cluster, .. } => cluster.url(),
        }
    }

    /// Where the checker reads saved edits back from, outside the nodes.
    fn target(&self) -> Target {
        match self {
            Store::Single(redis) => Target::Single(redis.port),
            Store::Cluster { cluster, .. } => Target::Cluster(cluster.nodes.iter().map(|n| n.port).collect()),
        }
    }

    fn is_cluster(&self) -> bool {
        matches!(self, Store::Cluster { .. })
    }

    /// A connection for keys, routed by slot on a Cluster (a paper's keys share
    /// the slot of its `{P}` tag).
    fn conn(&self) -> redis::RedisResult<Box<dyn ConnectionLike>> {
        Ok(match self {
            Store::Single(redis) => Box::new(redis_conn(redis.port)?),
            Store::Cluster { cluster, .. } => Box::new(cluster.try_client()?),
        })
    }

    /// A server for a fault to hit: the one, or a master at random.
    fn pick(&self, rng: &mut Rng) -> usize {
        match self {
            // Nothing drawn: a seed replays the same faults as before Clusters were an option.
            Store::Single(_) => 0,
            Store::Cluster { cluster, .. } => rng.below(cluster.nodes.len() as u64) as usize,
        }
    }

    fn port(&self, server: usize) -> u16 {
        match self {
            Store::Single(redis) => redis.port,
            Store::Cluster { cluster, .. } => cluster.nodes[server].port,
        }
    }

    /// Which master a fault hit, for the timeline (nothing for a single Redis).
    fn which(&self, server: usize) -> String {
        match self {
            Store::Single(_) => String::new(),
            Store::Cluster { holds, .. } => format!(" on {}", holds[server]),
        }
    }

    /// SIGKILL of a server, and its restart from its append-only file after
    /// `down`; a Cluster master also rejoins from its nodes.conf, and the fault
    /// lasts until every node says `cluster_state:ok` again.
    fn kill_and_restart(&mut self, server: usize, down: Duration) -> String {
        match self {
            Store::Single(redis) => {
                redis.stop();
                thread::sleep(down);
                redis.restart();
                String::new()
            }
            Store::Cluster { cluster, .. } => {
                cluster.nodes[server].kill();
                thread::sleep(down);
                let restarted = Instant::now();
                cluster.nodes[server].restart();
                cluster.wait_ok();
                format!(", down {down:?}, the cluster ok {:?} after its restart", restarted.elapsed())
            }
        }
    }

    /// Waits for the Cluster to say ok again after the last fault (a paused master
    /// may have been marked failed for a while); nothing for a single Redis.
    fn settle(&self) {
        if let Store::Cluster { cluster, .. } = self {
            cluster.wait_ok();
        }
    }

    /// What a fault of `server` may hold up: everything on one Redis, one shard
    /// of a Cluster.
    fn scope(&self, server: usize) -> Scope {
        match self {
            Store::Single(_) => Scope::Everything,
            Store::Cluster { shard_of, .. } => Scope::Shard(shard_of[server]),
        }
    }

    /// A paper's shard (0 on one Redis).
    fn shard_of_paper(&self, paper: usize) -> u16 {
        match self {
            Store::Single(_) => 0,
            Store::Cluster { paper_shard, .. } => paper_shard[paper],
        }
    }

    /// After a Cluster fault: every live node says ok and every master has its
    /// replica online again (within a minute), so that the next fault never
    /// meets a shard still failing over or resyncing. Says how long it took,
    /// or that it did not happen.
    fn steady(&self) -> String {
        let Store::Cluster { cluster, .. } = self else { return String::new() };
        let started = Instant::now();
        let until = started + Duration::from_secs(60);
        loop {
            let live = cluster.nodes.iter().filter(|n| n.is_running());
            let ok = live.clone().all(|n| n.cluster_info().contains("cluster_state:ok"));
            let masters: Vec<String> =
                live.map(|n| n.info("replication")).filter(|i| i.contains("role:master")).collect();
            if ok && masters.len() == 3 && masters.iter().all(|i| has_replica_online(i)) {
                return format!(", steady {:?} later", started.elapsed());
            }
            if Instant::now() >= until {
                return ", NOT steady a minute later".into();
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// A Cluster failover of one shard: `CLUSTER FAILOVER` on its replica, or
    /// (`kill`) SIGKILL of its master, its replica promoted by the others, and
    /// the old master started again from its files, to rejoin as a replica.
    fn fail_over(&mut self, rng: &mut Rng, kill: bool) -> (String, Scope) {
        let Store::Cluster { cluster, shard_of, .. } = self else {
            return (": not a Cluster".into(), Scope::Everything);
        };
        let shard = shard_of[rng.below(shard_of.len() as u64) as usize];
        let role = |i: usize, cluster: &RedisCluster| cluster.nodes[i].info("replication");
        let in_shard: Vec<usize> = (0..cluster.nodes.len()).filter(|&i| shard_of[i] == shard).collect();
        let master = in_shard.iter().copied().find(|&i| role(i, cluster).contains("role:master"));
        let replica = in_shard.iter().copied().find(|&i| role(i, cluster).contains("role:slave"));
        let (Some(master), Some(replica)) = (master, replica) else {
            return (format!(": shard {shard} has no master and replica to swap"), Scope::Shard(shard));
        };
        let (old, new) = (cluster.nodes[master].port, cluster.nodes[replica].port);
        let started = Instant::now();
        if kill {
            cluster.nodes[master].kill();
        } else {
            let asked = cluster.nodes[replica]
                .conn()
                .and_then(|mut c| redis::cmd("CLUSTER").arg("FAILOVER").query::<String>(&mut c));
            if let Err(e) = asked {
                return (format!(" of shard {shard}: refused ({e})"), Scope::Shard(shard));
            }
        }
        let until = started + Duration::from_secs(30);
        let promoted = loop {
            if role(replica, cluster).contains("role:master") {
                break Some(started.elapsed());
            }
            if Instant::now() >= until {
                break None;
            }
            thread::sleep(Duration::from_millis(50));
        };
        if kill {
            cluster.nodes[master].restart();
        }
        let how = if kill { "killed" } else { "handed over" };
        (format!(" of shard {shard}: master {old} {how}, {new} promoted after {promoted:?}"), Scope::Shard(shard))
    }
}

/// Every field of a paper's notes hash, raw.
fn stored_raw(store: &Store, paper: &str) -> Vec<(String, Vec<u8>)> {
    let mut conn = store.conn().expect("Redis for the final checks");
    let fields: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL").arg(notes_key(paper)).query(&mut *conn).unwrap();
    fields.into_iter().map(|(id, value)| (String::from_utf8_lossy(&id).into_owned(), value)).collect()
}

/// The live notes Redis holds for a paper (tombstones and unreadable values left out).
fn live_in_redis(store: &Store, paper: &str) -> Notes {
    stored_raw(store, paper)
        .into_iter()
        .filter_map(|(id, raw)| Some((id, stored_note(&raw)?.1?)))
        .filter(|(_, note)| note.is_object())
        .collect()
}

/// Stream entries for each paper, each its parsed `snapshot` (or `Null`).
fn stream_entries(store: &Store) -> HashMap<String, Vec<Value>> {
    let mut conn = store.conn().expect("Redis for the final checks");
    let entries: Vec<(String, Vec<(String, String)>)> =
        redis::cmd("XRANGE").arg(STREAM).arg("-").arg("+").query(&mut *conn).unwrap();
    let mut by_paper: HashMap<String, Vec<Value>> = HashMap::new();
    for (_, fields) in entries {
        let fields: HashMap<String, String> = fields.into_iter().collect();
        let snapshot = fields.get("snapshot").and_then(|s| serde_json::from_str(s).ok()).unwrap_or(Value::Null);
        by_paper.entry(fields.get("paper").cloned().unwrap_or_default()).or_default().push(snapshot);
    }
    by_paper
}

/// Whether a paper is sealed in Redis, and whether its stream entry is still
/// to append (a Cluster's hand-off in two steps, PROTOCOL.md 6).
fn seal_in_redis(store: &Store, paper: &str) -> (bool, bool) {
    let mut conn = store.conn().expect("Redis for the final checks");
    let (completed, pending): (Option<String>, Option<String>) =
        redis::cmd("HMGET").arg(meta_key(paper)).arg("completed").arg("handoff_pending").query(&mut *conn).unwrap();
    (completed.as_deref() == Some("1"), pending.is_some())
}

/// Every Redis server answers `PING` with `PONG` within `within` (each try
/// bounded by the connection's timeouts); else what the last try got.
fn redis_answers(store: &Store, within: Duration) -> Result<(), String> {
    let servers = match store {
        Store::Single(_) => 1,
        Store::Cluster { cluster, .. } => cluster.nodes.len(),
    };
    let until = Instant::now() + within;
    for server in 0..servers {
        let port = store.port(server);
        loop {
            let last = match redis_conn(port).and_then(|mut c| redis::cmd("PING").query::<String>(&mut c)) {
                Ok(pong) if pong == "PONG" => break,
                Ok(other) => format!("127.0.0.1:{port} answered {other:?}"),
                Err(e) => format!("127.0.0.1:{port}: {e}"),
            };
            if Instant::now() >= until {
                return Err(last);
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

fn redis_pid(port: u16) -> redis::RedisResult<u32> {
    let info: String = redis::cmd("INFO").arg("server").query(&mut redis_conn(port)?)?;
    Ok(info.lines().find_map(|l| l.strip_prefix("process_id:")).and_then(|p| p.trim().parse().ok()).unwrap_or(0))
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status();
}

// ---- the nodes -----------------------------------------------------------------------

/// One `rollingpaper --cluster` process on a fixed port, so that a node killed
/// with SIGKILL comes back where its clients look for it.
struct Node {
    id: &'static str,
    port: u16,
    redis_url: String,
    /// More arguments (tombstone limits, replicas to wait for) and environment
    /// (the fault injection of a test build).
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// Its last log lines, for the report when a check fails.
    log: Arc<Mutex<VecDeque<String>>>,
    /// Note writes it lost on purpose (a `fault-lose-writes` build), by its log,
    /// and which: paper, note and version.
    lost_on_purpose: Arc<AtomicU64>,
    lost_writes: Arc<Mutex<Vec<(String, String, u64)>>>,
    /// Its first `ERROR` lines (a paper's writes failed, ...), for the report.
    errors: Arc<Mutex<Vec<String>>>,
}

impl Node {
    fn start(id: &'static str, redis_url: &str, args: &[String], env: &[(String, String)]) -> Node {
        let mut node = Node {
            id,
            port: free_port(),
            redis_url: redis_url.to_string(),
            args: args.to_vec(),
            env: env.to_vec(),
            child: None,
            log: Default::default(),
            lost_on_purpose: Default::default(),
            lost_writes: Default::default(),
            errors: Default::default(),
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        // The port was just released by the killed process: a few tries.
        for _ in 0..10 {
            if self.try_spawn() {
                return;
            }
            thread::sleep(Duration::from_millis(200));
        }
        panic!("node {} could not listen on port {} again", self.id, self.port);
    }

    fn try_spawn(&mut self) -> bool {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rollingpaper"))
            .args(["--listen", &format!("127.0.0.1:{}", self.port), "--store", "redis", "--redis", &self.redis_url])
            .args(["--cluster", "--node-id", self.id, "--threads", "2", "--rate", "100000", "--burst", "100000"])
            .args(["--log-level", "info"])
            .args(&self.args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, listening) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        let lost = self.lost_on_purpose.clone();
        let lost_writes = self.lost_writes.clone();
        let errors = self.errors.clone();
        let id = self.id;
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("RP_TEST_LOG").is_some() {
                    eprintln!("[node {id}] {line}");
                }
                if line.contains("listening on http://") {
                    let _ = tx.send(());
                }
                if let Some((_, what)) = line.split_once("fault injection: lost ") {
                    lost.fetch_add(1, Ordering::Relaxed);
                    // `{paper}/{id} v {v} ({n} ops)`
                    let parsed = what.split_once('/').and_then(|(paper, rest)| {
                        let (id, rest) = rest.split_once(" v ")?;
                        let v = rest.split_whitespace().next()?.parse().ok()?;
                        Some((paper.to_string(), id.to_string(), v))
                    });
                    lost_writes.lock().unwrap().extend(parsed);
                }
                if line.contains(" ERROR ") {
                    let mut errors = errors.lock().unwrap();
                    if errors.len() < 40 {
                        errors.push(line.clone());
                    }
                }
                let mut log = log.lock().unwrap();
                if log.len() == 200 {
                    log.pop_front();
                }
                log.push_back(line);
            }
        });
        if listening.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        self.child = Some(child);
        true
    }

    /// SIGKILL: whatever was not written yet is lost.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and the exit status within a minute (`None`: it did not exit).
    fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        signal(child.id(), "TERM");
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    fn log_tail(&self, lines: usize) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.iter().skip(log.len().saturating_sub(lines)).cloned().collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plain `GET` (the connection closes after the answer): status and body.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_request(port, "GET", path, "", None, Duration::from_secs(5)).ok()
}

/// One HTTP/1.1 request on a connection of its own, closed after the answer
/// (the server keeps no connection alive): status and body, or why there was
/// none. Connecting takes 2 s at most, and the answer `wait`.
fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &str,
    body: Option<&str>,
    wait: Duration,
) -> Result<(u16, String), String> {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| format!("connect: {e}"))?;
    stream.set_write_timeout(Some(wait)).map_err(|e| e.to_string())?;
    let length = body.map_or(String::new(), |b| format!("Content-Length: {}\r\n", b.len()));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{headers}{length}\r\n{}",
        body.unwrap_or_default()
    );
    stream.write_all(request.as_bytes()).map_err(|e| format!("send: {e}"))?;
    let until = Instant::now() + wait;
    let mut response = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no whole answer within {wait:?}"));
        }
        stream.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| format!("no answer head: {response:?}"))?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    let status = status.ok_or_else(|| format!("no status: {head:?}"))?;
    let length = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|n| n.trim().parse::<usize>()))
        .and_then(Result::ok);
    let body = match length {
        Some(n) if n <= body.len() => body[..n].to_string(),
        _ => body.to_string(),
    };
    Ok((status, body))
}

/// A call of the backend API (PROTOCOL.md 7) with the key, a JSON body if
/// given: status and body, or why there was none (within `API_WAIT`).
fn api_call(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, String), String> {
    let json = if body.is_some() { "Content-Type: application/json\r\n" } else { "" };
    let headers = format!("Authorization: Bearer {API_KEY}\r\n{json}");
    let body = body.map(Value::to_string);
    // A DELETE carries no body, but says so.
    let body = body.as_deref().or((method != "GET").then_some(""));
    http_request(port, method, path, &headers, body, API_WAIT)
}

/// The paper as a node serves it on `GET /papers/{paper}`: whether it is
/// sealed, and its notes.
fn node_view(port: u16, paper: &str) -> Option<(bool, Notes)> {
    let (status, body) = http_get(port, &format!("/papers/{paper}"))?;
    if status != 200 {
        return None;
    }
    let body = serde_json::from_str::<Value>(&body).ok()?;
    Some((body["completed"] == true, notes_of(&body["notes"])?))
}

// ---- what clients record -----------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Upsert,
    Delete,
    /// 1.1: a field patch (`x` only), applied field by field.
    Patch,
    Complete,
}

/// One message a client sent that asks for a change, and what became of it.
#[derive(Debug)]
struct Edit {
    client: usize,
    r: String,
    paper: usize,
    id: String,
    kind: Kind,
    data: Value,
    /// The node the sender was connected to, and the connection's serial.
    node: usize,
    conn: u64,
    /// From the broadcast the sender received.
    v: Option<u64>,
    /// The `saved` that covered it.
    saved: Option<u64>,
    /// The code of the `error` carrying its ref.
    error: Option<String>,
    /// Its connection ended before it was resolved.
    lost: bool,
    /// When it was sent, and when it was refused (if it was).
    sent: Instant,
    refused_at: Option<Instant>,
}

/// A session of a client, from its snapshot to its end (for the erase checks).
struct Span {
    paper: usize,
    node: usize,
    conn: u64,
    /// When it ended, the close code the server sent (if it sent one), and why.
    ended: Option<(Instant, Option<u16>, String)>,
}

/// What a join got.
#[derive(Debug, PartialEq, Eq)]
enum JoinAnswer {
    Snapshot,
    /// `410 Gone`: the paper is erased (PROTOCOL.md 7).
    Gone,
    Refused(String),
}

/// One attempt to join a paper: when it was made and answered, and the answer.
struct Join {
    paper: usize,
    node: usize,
    at: Instant,
    answered: Instant,
    answer: JoinAnswer,
}

/// How `Session::open` says that a join was answered `410 Gone`.
const GONE: &str = "HTTP 410";

#[derive(Default)]
struct ClientLog {
    edits: Vec<Edit>,
    /// Every session it had, and every join it tried.
    spans: Vec<Span>,
    joins: Vec<Join>,
    /// Every frame received, in order, with a line per (re)connection.
    received: Vec<String>,
    /// Every `completed` received: its paper and its notes (`None`: it had none).
    completed: Vec<(usize, Option<Notes>)>,
    errors_without_ref: BTreeMap<String, u64>,
    connections: u64,
    violations: Vec<String>,
    /// Reads each edit back from Redis as soon as it is saved.
    reader: Option<Reader>,
    /// Saved edits read back at once, and those Redis could not be read for
    /// within `ACK_READ` (left to the final check).
    checked_at_ack: u64,
    unchecked_at_ack: u64,
    /// Saved edits not read back because their paper was erased since.
    erased_at_ack: u64,
}

impl ClientLog {
    fn reading(target: &Target) -> ClientLog {
        ClientLog { reader: Some(Reader { target: target.clone(), conn: None }), ..ClientLog::default() }
    }

    /// Holds each newly saved edit against what Redis holds right now.
    fn check_saved(&mut self, saved: &[usize]) {
        let Some(reader) = self.reader.as_mut() else { return };
        for &i in saved {
            let edit = &self.edits[i];
            let Some(v) = edit.v else { continue };
            let paper = paper_name(edit.paper);
            match reader.note(&paper, &edit.id) {
                // Erased since (its marker is read after the note): nothing of it stays.
                Ok((_, _, true)) => self.erased_at_ack += 1,
                Ok((raw, horizon, false)) => {
                    self.checked_at_ack += 1;
                    if let Err(e) =
                        judge(edit.kind, &edit.id, &edit.data, v, NODE_IDS[edit.node], raw.as_deref(), horizon)
                    {
                        self.violations.push(format!("{} at its saved: {e}", describe(edit)));
                    }
                }
                Err(_) => self.unchecked_at_ack += 1,
            }
        }
    }
}

/// How long the reader tries to read an edit back after its `saved` (Redis may
/// be paused, killed or failing over); past it the edit is left to the final check.
const ACK_READ: Duration = Duration::from_secs(10);

/// Where the checker reads Redis from, outside the nodes: one server, or a
/// Cluster's nodes (a cluster connection, routed by slot to each shard's master).
#[derive(Clone)]
enum Target {
    Single(u16),
    Cluster(Vec<u16>),
}

/// A connection of the checker's own, made again after any error.
struct Reader {
    target: Target,
    conn: Option<Box<dyn ConnectionLike + Send>>,
}

/// A connection of the checker's own to Redis.
fn connect(target: &Target) -> redis::RedisResult<Box<dyn ConnectionLike + Send>> {
    Ok(match target {
        Target::Single(port) => Box::new(redis_conn(*port)?),
        Target::Cluster(ports) => {
            let urls: Vec<String> = ports.iter().map(|p| format!("redis://127.0.0.1:{p}")).collect();
            Box::new(
                redis::cluster::ClusterClient::builder(urls)
                    .connection_timeout(Duration::from_secs(1))
                    .response_timeout(Duration::from_secs(2))
                    .build()?
                    .get_connection()?,
            )
        }
    })
}

impl Reader {
    fn connect(&self) -> redis::RedisResult<Box<dyn ConnectionLike + Send>> {
        connect(&self.target)
    }

    /// A note's stored value (raw), its paper's horizon, and whether the paper
    /// is erased, read in that order (the horizon only rises: read after, it
    /// covers a tombstone dropped before; an erase sets its marker as it deletes
    /// the notes: read after, it covers a note erased before).
    fn note(&mut self, paper: &str, id: &str) -> Result<(Option<Vec<u8>>, u64, bool), String> {
        let until = Instant::now() + ACK_READ;
        let mut last = String::new();
        for _ in 0..200 {
            let read = |conn: &mut dyn ConnectionLike| -> redis::RedisResult<(Option<Vec<u8>>, u64, bool)> {
                let raw: Option<Vec<u8>> = redis::cmd("HGET").arg(notes_key(paper)).arg(id).query(conn)?;
                let horizon: Option<String> = redis::cmd("HGET").arg(meta_key(paper)).arg("horizon").query(conn)?;
                let erased: bool = redis::cmd("EXISTS").arg(paper_key(paper, "erased")).query(conn)?;
                Ok((raw, horizon.and_then(|h| h.parse().ok()).unwrap_or(0), erased))
            };
            let result = match self.conn.as_mut() {
                Some(conn) => read(&mut **conn),
                None => self.connect().and_then(|mut conn| {
                    let r = read(&mut *conn);
                    self.conn = Some(conn);
                    r
                }),
            };
            match result {
                Ok(found) => return Ok(found),
                Err(e) => {
                    last = e.to_string();
                    self.conn = None;
                }
            }
            if Instant::now() >= until {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        Err(last)
    }
}

/// An edit, for a violation's message.
fn describe(edit: &Edit) -> String {
    if edit.client == API_CLIENT {
        return format!(
            "API write {} ({:?} {}/{} v {:?}, answered {}, node {})",
            edit.r,
            edit.kind,
            paper_name(edit.paper),
            edit.id,
            edit.v,
            edit.error.as_deref().unwrap_or(if edit.saved.is_some() { "200" } else { "nothing" }),
            NODE_IDS[edit.node],
        );
    }
    format!(
        "edit {} of client {} ({:?} {}/{} v {:?}, saved {:?}, node {}, connection {:x})",
        edit.r,
        edit.client,
        edit.kind,
        paper_name(edit.paper),
        edit.id,
        edit.v,
        edit.saved,
        NODE_IDS[edit.node],
        edit.conn
    )
}

/// One open session and the view of the paper its client has built from it.
struct Session {
    ws: WebSocket<TcpStream>,
    paper: usize,
    node: usize,
    you: String,
    conn: u64,
    view: Notes,
    /// Edits sent on this connection and not resolved yet (indices into `edits`).
    pending: Vec<usize>,
    /// The code of the close frame the server sent, once it did.
    closed_with: Option<u16>,
}

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
}

impl Session {
    /// Connects and reads the snapshot (a paper that cannot be read answers 1013
    /// within its load timeout).
    fn open(node: usize, port: u16, paper: usize, user: &str, conn: u64) -> Result<Session, String> {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        stream.set_write_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let url = format!("ws://127.0.0.1:{port}/ws/{}?user={user}", paper_name(paper));
        let (mut ws, _) = tungstenite::client(url, stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(tungstenite::Error::Http(answer)) => {
                format!("HTTP {}", answer.status().as_u16())
            }
            e => e.to_string(),
        })?;
        ws.get_ref().set_read_timeout(Some(Duration::from_millis(100))).map_err(|e| e.to_string())?;
        let until = Instant::now() + Duration::from_secs(20);
        let snapshot = loop {
            if Instant::now() >= until {
                return Err("no snapshot within 20 s".into());
            }
            match ws.read() {
                Ok(Message::Text(text)) => break serde_json::from_str::<Value>(&text).map_err(|e| e.to_string())?,
                Ok(Message::Close(frame)) => return Err(format!("closed before the snapshot: {frame:?}")),
                Ok(_) => {}
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e.to_string()),
            }
        };
        if snapshot["type"] != "snapshot" {
            return Err(format!("first message not a snapshot: {snapshot}"));
        }
        let view = notes_of(&snapshot["notes"]).ok_or_else(|| format!("snapshot without notes: {snapshot}"))?;
        ws.get_ref().set_read_timeout(Some(Duration::from_millis(10))).map_err(|e| e.to_string())?;
        let you = snapshot["you"].as_str().unwrap_or_default().to_string();
        Ok(Session { ws, paper, node, you, conn, view, pending: Vec::new(), closed_with: None })
    }

    fn send(&mut self, msg: &Value) -> Result<(), String> {
        match self.ws.send(Message::text(msg.to_string())) {
            Ok(()) => Ok(()),
            // Queued in tungstenite's buffer; flushed by a later write.
            Err(e) if would_block(&e) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Reads every frame there is now and applies it; `Err` when the connection ended.
    fn pump(&mut self, log: &mut ClientLog) -> Result<(), String> {
        for _ in 0..10_000 {
            match self.ws.read() {
                Ok(Message::Text(text)) => {
                    log.received.push(text.to_string());
                    match serde_json::from_str::<Value>(&text) {
                        Ok(msg) => self.apply(&msg, log),
                        Err(e) => log.violations.push(format!("a frame that is not JSON ({e}): {text}")),
                    }
                }
                Ok(Message::Close(frame)) => {
                    self.closed_with = Some(frame.as_ref().map_or(1005, |f| u16::from(f.code)));
                    return Err(format!("closed: {frame:?}"));
                }
                Ok(_) => {}
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }

    fn apply(&mut self, msg: &Value, log: &mut ClientLog) {
        let mine = |log: &ClientLog| -> Option<usize> {
            let r = msg["ref"].as_str()?;
            log.edits.iter().rposition(|e| e.r == r)
        };
        match msg["type"].as_str().unwrap_or_default() {
            "patch" => {
                let Some(v) = version_of(&msg["v"]) else {
                    log.violations.push(format!("a broadcast with a version out of range: {msg}"));
                    return;
                };
                let id = msg["id"].as_str().unwrap_or_default().to_string();
                if let Some(note) = self.view.get_mut(&id) {
                    for (field, value) in msg["data"].as_object().into_iter().flatten() {
                        match (value.is_null(), note["data"].as_object_mut()) {
                            (true, Some(data)) => {
                                data.remove(field);
                            }
                            (false, Some(data)) => {
                                data.insert(field.clone(), value.clone());
                            }
                            _ => {}
                        }
                    }
                    let max = note["v"].as_u64().unwrap_or(0).max(v);
                    note["v"] = json!(max);
                }
                if msg["from"] == self.you.as_str() {
                    if let Some(i) = mine(log) {
                        log.edits[i].v = Some(v);
                    }
                }
            }
            kind @ ("upsert" | "delete") => {
                let Some(v) = version_of(&msg["v"]) else {
                    log.violations.push(format!("a broadcast with a version out of range: {msg}"));
                    return;
                };
                let id = msg["id"].as_str().unwrap_or_default().to_string();
                if kind == "upsert" {
                    self.view.insert(id, note_value(msg));
                } else {
                    self.view.remove(&id);
                }
                if msg["from"] == self.you.as_str() {
                    if let Some(i) = mine(log) {
                        log.edits[i].v = Some(v);
                    }
                }
            }
            "saved" => {
                let Some(saved) = msg["v"].as_u64() else {
                    log.violations.push(format!("saved without an integer v: {msg}"));
                    return;
                };
                let edits = &mut log.edits;
                let mut newly = Vec::new();
                self.pending.retain(|&i| {
                    let edit = &mut edits[i];
                    match edit.v {
                        Some(v) if v <= saved && edit.error.is_none() => {
                            edit.saved = Some(saved);
                            newly.push(i);
                            false
                        }
                        _ => true,
                    }
                });
                log.check_saved(&newly);
            }
            "error" => {
                let code = msg["code"].as_str().unwrap_or("?").to_string();
                match mine(log) {
                    Some(i) => {
                        let edit = &mut log.edits[i];
                        if let Some(saved) = edit.saved {
                            log.violations.push(format!(
                                "edit {} was confirmed by saved {saved} and then refused: {msg}",
                                edit.r
                            ));
                        }
                        edit.error = Some(code);
                        edit.refused_at = Some(Instant::now());
                        self.pending.retain(|&p| p != i);
                    }
                    None => *log.errors_without_ref.entry(code).or_default() += 1,
                }
            }
            "snapshot" => match notes_of(&msg["notes"]) {
                Some(notes) if msg.get("since").is_some() => {
                    for (id, note) in notes {
                        self.view.insert(id, note);
                    }
                    for note in msg["notes"].as_array().into_iter().flatten() {
                        if note.get("deleted").is_some() {
                            self.view.remove(note["id"].as_str().unwrap_or_default());
                        }
                    }
                }
                Some(notes) => self.view = notes,
                None => log.violations.push(format!("a snapshot without notes: {msg}")),
            },
            "completed" => {
                let notes = notes_of(&msg["notes"]);
                if let Some(notes) = &notes {
                    self.view = notes.clone();
                }
                log.completed.push((self.paper, notes));
            }
            _ => {}
        }
    }

    /// Everything queued for this session now (a ping barrier), applied.
    fn settle(&mut self, log: &mut ClientLog) -> Result<(), String> {
        self.send(&json!({"type": "ping"}))?;
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            let before = log.received.len();
            self.pump(log)?;
            if log.received[before..].iter().any(|t| t.contains(r#""type":"pong""#)) {
                return Ok(());
            }
        }
        Err("no pong within 5 s".into())
    }

    /// The connection ended (`why`): what was not resolved stays unresolved.
    fn lost(self, log: &mut ClientLog, why: &str) {
        if let Some(span) = log.spans.iter_mut().rev().find(|s| s.conn == self.conn) {
            span.ended = Some((Instant::now(), self.closed_with, why.to_string()));
        }
        for i in self.pending {
            log.edits[i].lost = true;
        }
    }
}

// ---- clients -------------------------------------------------------------------------

struct Shared {
    ports: [u16; 2],
    /// Faults are over: send nothing new, wait for what was sent.
    stop: AtomicBool,
    /// Where saved edits are read back from.
    target: Target,
    /// When each sealed paper is sealed.
    seals: Arc<Mutex<HashMap<usize, Instant>>>,
}

struct ClientPlan {
    index: usize,
    paper: usize,
    home: usize,
    seed: u64,
    /// Whether this client seals its paper (when `Shared::seals` says).
    sealer: bool,
    /// The hostile client: it edits only in the bursts the fault thread sets.
    hostile: Option<Arc<HostileSwitch>>,
}

/// What a client thread hands back: its log, and its session if still open.
struct ClientEnd {
    plan: ClientPlan,
    log: ClientLog,
    session: Option<Session>,
}

fn run_client(plan: ClientPlan, shared: Arc<Shared>) -> ClientEnd {
    let mut rng = Rng::new(plan.seed, 100 + plan.index as u64);
    let mut log = ClientLog::reading(&shared.target);
    let mut session: Option<Session> = None;
    let mut serial = 0u64;
    let mut next_action = Instant::now();
    let mut seal_tries = 0;
    let mut quiesce_until: Option<Instant> = None;
    let user = if plan.hostile.is_some() { "hostile".to_string() } else { format!("u{}", plan.index) };
    let mut hostile = HostileState::default();
    // Once its paper is erased, the client asks to join it now and then (each
    // node in turn), and is to be answered 410.
    let mut gone_rounds = 0;
    let mut next_join = Instant::now();
    loop {
        let stopping = shared.stop.load(Ordering::Relaxed);
        if stopping && quiesce_until.is_none() {
            quiesce_until = Some(Instant::now() + QUIESCE);
        }
        let Some(s) = session.as_mut() else {
            if stopping {
                break;
            }
            let wait = next_join.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                thread::sleep(wait.min(Duration::from_millis(100)));
                continue;
            }
            let started = Instant::now();
            let mut attempt = 0;
            let mut gone = false;
            while session.is_none() && !gone && started.elapsed() < RECONNECT && !shared.stop.load(Ordering::Relaxed) {
                let node = (plan.home + attempt + gone_rounds) % 2;
                serial += 1;
                let conn = (plan.index as u64) << 32 | serial;
                let at = Instant::now();
                let answer = match Session::open(node, shared.ports[node], plan.paper, &user, conn) {
                    Ok(s) => {
                        log.received.push(format!("# connection {conn} to node {}", NODE_IDS[node]));
                        log.spans.push(Span { paper: plan.paper, node, conn, ended: None });
                        session = Some(s);
                        JoinAnswer::Snapshot
                    }
                    Err(e) => {
                        log.received.push(format!("# node {} refused: {e}", NODE_IDS[node]));
                        attempt += 1;
                        gone = e == GONE;
                        if gone {
                            JoinAnswer::Gone
                        } else {
                            thread::sleep(Duration::from_millis(100));
                            JoinAnswer::Refused(e)
                        }
                    }
                };
                log.joins.push(Join { paper: plan.paper, node, at, answered: Instant::now(), answer });
            }
            if gone {
                gone_rounds += 1;
                next_join = Instant::now() + rng.between_ms(300, 1500);
                continue;
            }
            log.connections += 1;
            if session.is_none() && !shared.stop.load(Ordering::Relaxed) {
                log.violations.push(format!("client {} could not join any node for {RECONNECT:?}", plan.index));
                break;
            }
            continue;
        };
        if let Some(until) = quiesce_until {
            if s.pending.is_empty() {
                break;
            }
            if Instant::now() >= until {
                for &i in &s.pending {
                    let e = &log.edits[i];
                    log.violations.push(format!(
                        "edit {} (v {:?}, sent {:?} ago) neither saved nor refused {QUIESCE:?} after the last fault, \
                         its connection open",
                        e.r,
                        e.v,
                        e.sent.elapsed()
                    ));
                }
                break;
            }
        } else if Instant::now() >= next_action {
            let acted = match &plan.hostile {
                Some(switch) => {
                    let (acted, next) = act_hostile(s, &plan, switch, &mut hostile, &mut log);
                    next_action = next;
                    acted
                }
                None => {
                    // The clients of the papers to erase edit more slowly.
                    let (lo, hi) = if is_erasable(plan.paper) { (40, 200) } else { (10, 60) };
                    next_action = Instant::now() + rng.between_ms(lo, hi);
                    act(s, &plan, &shared.seals, &mut rng, &mut log, &mut seal_tries)
                }
            };
            if let Err(e) = acted {
                log.received.push(format!("# send failed: {e}"));
                // A close frame the server sent before may still be there to read.
                let _ = s.pump(&mut log);
                session.take().unwrap().lost(&mut log, &format!("send failed: {e}"));
                continue;
            }
        }
        if let Err(e) = s.pump(&mut log) {
            log.received.push(format!("# connection ended: {e}"));
            session.take().unwrap().lost(&mut log, &e);
        }
    }
    ClientEnd { plan, log, session }
}

/// One random edit (or the planned seal).
fn act(
    s: &mut Session,
    plan: &ClientPlan,
    seals: &Mutex<HashMap<usize, Instant>>,
    rng: &mut Rng,
    log: &mut ClientLog,
    seal_tries: &mut u32,
) -> Result<(), String> {
    let n = log.edits.len();
    let r = format!("c{}-{n}", plan.index);
    // The planned seal, tried again (up to 3 times) only while it is neither done nor refused for good.
    let sealed = log.completed.iter().any(|(p, _)| *p == plan.paper)
        || log.edits.iter().any(|e| e.kind == Kind::Complete && e.error.as_deref() == Some("paper_completed"));
    let waiting = log.edits.iter().any(|e| e.kind == Kind::Complete && e.error.is_none() && e.conn == s.conn);
    let seal_at = if plan.sealer { seals.lock().unwrap().get(&plan.paper).copied() } else { None };
    let sealing = seal_at.is_some_and(|at| Instant::now() >= at) && *seal_tries < 3 && !sealed && !waiting;
    let (kind, id, data) = if sealing {
        *seal_tries += 1;
        (Kind::Complete, String::new(), Value::Null)
    } else if rng.chance(2) {
        // A note created once and never touched again: nothing can pass for it.
        (Kind::Upsert, format!("once-c{}-{n}", plan.index), json!({"by": plan.index, "once": n}))
    } else if rng.chance(25) {
        (Kind::Patch, format!("n{}", rng.below(POOL)), json!({"x": rng.below(1000), "by_patch": plan.index}))
    } else if rng.chance(60) {
        let id = format!("n{}", rng.below(POOL));
        (Kind::Upsert, id, json!({"by": plan.index, "n": n, "x": rng.below(1000)}))
    } else {
        (Kind::Delete, format!("n{}", rng.below(POOL)), Value::Null)
    };
    let msg = match kind {
        Kind::Upsert => json!({"type": "upsert", "id": id, "data": data, "ref": r}),
        Kind::Delete => json!({"type": "delete", "id": id, "ref": r}),
        Kind::Patch => json!({"type": "patch", "id": id, "data": data, "ref": r}),
        Kind::Complete => json!({"type": "complete", "ref": r}),
    };
    log.edits.push(Edit {
        client: plan.index,
        r,
        paper: plan.paper,
        id,
        kind,
        data,
        node: s.node,
        conn: s.conn,
        v: None,
        saved: None,
        error: None,
        lost: false,
        sent: Instant::now(),
        refused_at: None,
    });
    if kind != Kind::Complete {
        s.pending.push(n);
    }
    s.send(&msg)
}

// ---- the hostile client -----------------------------------------------------------------

/// What the hostile client does in a burst; each message within PROTOCOL.md's
/// limits (notes of `max_note_bytes`, the default allowance), each costing the
/// server or Redis far more than its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Burst {
    /// A new note, then patches each naming 225 new 64-character fields set to null.
    Churn,
    /// Notes of 16 KiB replaced whole, and patched in every one of ~200 fields.
    Wide,
    /// Deletes of ids never created, and create-then-delete of fresh ids.
    Deletes,
}

const BURSTS: [Burst; 3] = [Burst::Churn, Burst::Wide, Burst::Deletes];
/// The default per-session allowance (50 a second, bursts of 200), which the
/// hostile client keeps under, at 95%, although these nodes lift the limit.
const ALLOWED_RATE: f64 = 50.0 * 0.95;
const ALLOWED_BURST: f64 = 200.0 * 0.95;
const CHURN_FIELDS: usize = 225;
const WIDE_FIELDS: usize = 200;
const WIDE_NOTES: u64 = 4;
const MAX_NOTE_BYTES: usize = 16 * 1024;

/// Set by the fault thread: the burst under way, until when, and its serial.
#[derive(Default)]
struct HostileSwitch {
    burst: Mutex<Option<(Burst, Instant, u64)>>,
}

/// The hostile client's own state across bursts.
#[derive(Default)]
struct HostileState {
    /// The serial of the burst it is in (a new one starts afresh).
    serial: u64,
    tokens: f64,
    last: Option<Instant>,
    /// Messages of this burst so far.
    n: u64,
    /// Fields named by churn patches so far (each is new).
    fields: u64,
}

impl HostileState {
    /// The next change of a burst: kind, note id, data.
    fn next(&mut self, burst: Burst) -> (Kind, String, Value) {
        let n = self.n;
        self.n += 1;
        match burst {
            Burst::Churn => {
                let id = format!("churn{}", self.serial);
                if n == 0 {
                    return (Kind::Upsert, id, json!({"text": "hi"}));
                }
                let mut data = serde_json::Map::new();
                for _ in 0..CHURN_FIELDS {
                    data.insert(format!("f{:063}", self.fields), Value::Null);
                    self.fields += 1;
                }
                (Kind::Patch, id, Value::Object(data))
            }
            Burst::Wide => {
                let id = format!("wide{}", (n / 2) % WIDE_NOTES);
                let mut data = serde_json::Map::new();
                for i in 0..WIDE_FIELDS {
                    data.insert(format!("w{i:063}"), json!(format!("{:08}", (self.serial * 1000 + n) % 100_000_000)));
                }
                if n % 2 == 1 {
                    return (Kind::Patch, id, Value::Object(data));
                }
                // Padded to exactly max_note_bytes of compact JSON: the padding
                // field adds its name, quotes and comma (9 bytes) to its value.
                let used = serde_json::to_vec(&data).unwrap().len() + 9;
                data.insert("pad".into(), json!("x".repeat(MAX_NOTE_BYTES.saturating_sub(used))));
                (Kind::Upsert, id, Value::Object(data))
            }
            Burst::Deletes => {
                let c = self.serial * 100_000 + n / 3;
                match n % 3 {
                    0 => (Kind::Delete, format!("gone{c}"), Value::Null),
                    1 => (Kind::Upsert, format!("t{c}"), json!({"t": c})),
                    _ => (Kind::Delete, format!("t{c}"), Value::Null),
                }
            }
        }
    }
}

fn is_hostile(edit: &Edit) -> bool {
    (HOSTILE..HOSTILE + HOSTILE_PAPERS).contains(&edit.client)
}

/// One message of the burst under way, if the allowance has room; says when to
/// come back.
fn act_hostile(
    s: &mut Session,
    plan: &ClientPlan,
    switch: &HostileSwitch,
    h: &mut HostileState,
    log: &mut ClientLog,
) -> (Result<(), String>, Instant) {
    let now = Instant::now();
    let idle = now + Duration::from_millis(100);
    let Some((burst, until, serial)) = *switch.burst.lock().unwrap() else { return (Ok(()), idle) };
    if now >= until {
        return (Ok(()), idle);
    }
    if serial != h.serial {
        *h = HostileState { serial, tokens: ALLOWED_BURST, last: Some(now), n: 0, fields: h.fields };
    }
    let last = h.last.replace(now).unwrap_or(now);
    h.tokens = (h.tokens + now.duration_since(last).as_secs_f64() * ALLOWED_RATE).min(ALLOWED_BURST);
    if h.tokens < 1.0 {
        return (Ok(()), now + Duration::from_secs_f64((1.0 - h.tokens) / ALLOWED_RATE));
    }
    h.tokens -= 1.0;
    let (kind, id, data) = h.next(burst);
    let n = log.edits.len();
    let r = format!("h{}-{n}", plan.index);
    let msg = match kind {
        Kind::Upsert => json!({"type": "upsert", "id": id, "data": data, "ref": r}),
        Kind::Patch => json!({"type": "patch", "id": id, "data": data, "ref": r}),
        _ => json!({"type": "delete", "id": id, "ref": r}),
    };
    log.edits.push(Edit {
        client: plan.index,
        r,
        paper: plan.paper,
        id,
        kind,
        data,
        node: s.node,
        conn: s.conn,
        v: None,
        saved: None,
        error: None,
        lost: false,
        sent: Instant::now(),
        refused_at: None,
    });
    s.pending.push(n);
    (s.send(&msg), now)
}

// ---- the backend API -----------------------------------------------------------------

/// Writes the API writer makes at most (each also bounded in time).
const API_WRITES: u64 = 100_000;
/// Tries of one write or erase at most (and `API_RETRY_FOR`).
const API_TRIES: usize = 50;

/// The erases to come: each paper and when (a partition brings one forward).
type ErasePlan = Vec<(usize, Instant)>;

/// One erase of a paper through the backend API (PROTOCOL.md 7).
struct Erase {
    paper: usize,
    /// When it was first asked, and each answer (a status, or why there was
    /// none) with the node that gave it.
    asked: Instant,
    answers: Vec<String>,
    /// When a `204` said it was done (or a `410` to a retry: an earlier try,
    /// answered 504 or not at all, did it), and the node that said so.
    done: Option<(Instant, usize)>,
}

/// What the API writer hands back.
struct ApiEnd {
    /// Its writes, as edits of `API_CLIENT`: a `200` sets `v` and `saved`, a
    /// refusal `error` (its code), no answer `lost`.
    log: ClientLog,
    /// Answers by status (`no answer` when there was none), erases apart.
    statuses: BTreeMap<String, u64>,
    /// Writes sent again (after 503, 504 or no answer), and what the retries of
    /// a write answered 504 or not at all finally got.
    retries: u64,
    after_uncertain: BTreeMap<String, u64>,
}

/// The answers a write may get besides `200` (PROTOCOL.md 7): status and code.
fn expected_refusal(kind: Kind, status: u16, code: &str) -> bool {
    match (status, code) {
        // A note that does not exist (or is deleted) cannot be patched or deleted.
        (404, "not_found") => kind != Kind::Upsert,
        (409, "paper_completed" | "paper_full") | (410, "gone") | (500, "write_failed") => true,
        (503, "unavailable") | (504, "timeout") => true,
        _ => false,
    }
}

/// The backend API's writer: PUT, PATCH and DELETE of notes on the papers the
/// clients edit (and, one write in five, on the papers to erase), each sent to
/// a node at random on a connection of its own; a write answered 503, 504 or
/// nothing is sent again (to a node at random) until an answer says what
/// became of it. A `200 {"v":V}` is a promise like `saved`: read back from
/// Redis at once (`check_saved`), and again at the end (`check_acknowledged`).
fn run_api(seed: u64, shared: Arc<Shared>) -> ApiEnd {
    let mut rng = Rng::new(seed, 3);
    let mut end = ApiEnd {
        log: ClientLog::reading(&shared.target),
        statuses: BTreeMap::new(),
        retries: 0,
        after_uncertain: BTreeMap::new(),
    };
    for n in 0..API_WRITES {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        thread::sleep(rng.between_ms(5, 40));
        api_write(n, &shared, &mut rng, &mut end);
    }
    end
}

/// Turns of the eraser at most (each `ERASER_TURN`, or an erase).
const ERASER_TURNS: u64 = 1_000_000;
const ERASER_TURN: Duration = Duration::from_millis(20);

/// The eraser: each planned erase when due (a partition brings one forward),
/// on a thread of its own so that no API write holds it back. Returns the
/// violations it saw in the answers.
fn run_eraser(
    seed: u64,
    plan: Arc<Mutex<ErasePlan>>,
    shared: Arc<Shared>,
    erases: Arc<Mutex<Vec<Erase>>>,
) -> Vec<String> {
    let mut rng = Rng::new(seed, 5);
    let mut violations = Vec::new();
    for _ in 0..ERASER_TURNS {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let due = {
            let mut plan = plan.lock().unwrap();
            let now = Instant::now();
            plan.iter().position(|(_, at)| now >= *at).map(|i| plan.remove(i).0)
        };
        match due {
            Some(paper) => erase(paper, &shared, &mut rng, &erases, &mut violations),
            None => thread::sleep(ERASER_TURN),
        }
    }
    violations
}

/// One random write through the API, sent again while the answer leaves it open.
fn api_write(n: u64, shared: &Shared, rng: &mut Rng, end: &mut ApiEnd) {
    let paper = if rng.chance(20) {
        ALL_PAPERS + rng.below(ERASE_PAPERS as u64) as usize
    } else {
        rng.below(PAPERS as u64) as usize
    };
    let (kind, id, data) = if rng.chance(3) {
        // A note created once and never touched again: nothing can pass for it.
        (Kind::Upsert, format!("once-api-{n}"), json!({"by": "api", "once": n}))
    } else if rng.chance(25) {
        (Kind::Patch, format!("n{}", rng.below(POOL)), json!({"x": rng.below(1000), "by_patch": "api"}))
    } else if rng.chance(60) {
        (Kind::Upsert, format!("n{}", rng.below(POOL)), json!({"by": "api", "n": n, "x": rng.below(1000)}))
    } else {
        (Kind::Delete, format!("n{}", rng.below(POOL)), Value::Null)
    };
    let (method, body) = match kind {
        Kind::Upsert => ("PUT", Some(json!({"data": data, "author": "api"}))),
        Kind::Patch => ("PATCH", Some(json!({"data": data}))),
        _ => ("DELETE", None),
    };
    let path = format!("/api/papers/{}/notes/{id}", paper_name(paper));
    let first = Instant::now();
    // A 504 or no answer: the change may be written, or may not.
    let mut uncertain = false;
    for attempt in 0..API_TRIES {
        let node = rng.below(2) as usize;
        let i = end.log.edits.len();
        let r = if attempt == 0 { format!("api-{n}") } else { format!("api-{n}-retry{attempt}") };
        end.log.edits.push(Edit {
            client: API_CLIENT,
            r,
            paper,
            id: id.clone(),
            kind,
            data: data.clone(),
            node,
            conn: 0,
            v: None,
            saved: None,
            error: None,
            lost: false,
            sent: Instant::now(),
            refused_at: None,
        });
        let answer = api_call(shared.ports[node], method, &path, body.as_ref());
        let status = answer.as_ref().map_or_else(|_| "no answer".to_string(), |(status, _)| status.to_string());
        *end.statuses.entry(status.clone()).or_default() += 1;
        let again = match answer {
            Ok((200, text)) => {
                match serde_json::from_str::<Value>(&text).ok().and_then(|b| version_of(&b["v"])) {
                    Some(v) => {
                        (end.log.edits[i].v, end.log.edits[i].saved) = (Some(v), Some(v));
                        end.log.check_saved(&[i]);
                    }
                    None => {
                        let what = describe(&end.log.edits[i]);
                        end.log.violations.push(format!("{what} was answered 200 without a version: {text}"));
                    }
                }
                false
            }
            Ok((status, text)) => {
                let code =
                    serde_json::from_str::<Value>(&text).ok().and_then(|b| Some(b["code"].as_str()?.to_string()));
                let code = code.unwrap_or_else(|| format!("HTTP {status}"));
                let edit = &mut end.log.edits[i];
                (edit.error, edit.refused_at) = (Some(code.clone()), Some(Instant::now()));
                if !expected_refusal(kind, status, &code) {
                    let what = describe(edit);
                    end.log.violations.push(format!("{what} was answered {status}: {text}"));
                }
                matches!(status, 503 | 504)
            }
            Err(e) => {
                end.log.edits[i].lost = true;
                end.log.received.push(format!("# api-{n} to node {}: {e}", NODE_IDS[node]));
                true
            }
        };
        let out_of_time = first.elapsed() >= API_RETRY_FOR;
        if uncertain && (!again || out_of_time) {
            let ended = if again { format!("still {status} after {:?}", first.elapsed()) } else { status.clone() };
            *end.after_uncertain.entry(ended).or_default() += 1;
        }
        uncertain |= status == "504" || status == "no answer";
        if !again || out_of_time {
            break;
        }
        end.retries += 1;
        thread::sleep(rng.between_ms(200, 1000));
    }
}

/// Erases a paper through a node at random: tried again on 503, 504 or no
/// answer (each try through a node at random) for `API_RETRY_FOR`.
fn erase(paper: usize, shared: &Shared, rng: &mut Rng, erases: &Mutex<Vec<Erase>>, violations: &mut Vec<String>) {
    let asked = Instant::now();
    let index = {
        let mut erases = erases.lock().unwrap();
        erases.push(Erase { paper, asked, answers: Vec::new(), done: None });
        erases.len() - 1
    };
    let path = format!("/api/papers/{}", paper_name(paper));
    for attempt in 0..API_TRIES {
        let node = rng.below(2) as usize;
        let answer = api_call(shared.ports[node], "DELETE", &path, None);
        let status = answer.as_ref().map_or_else(|e| format!("no answer ({e})"), |(status, _)| status.to_string());
        let mut erases = erases.lock().unwrap();
        let erase = &mut erases[index];
        erase.answers.push(format!("{status} from node {}", NODE_IDS[node]));
        let again = match &answer {
            Ok((204, _)) => {
                erase.done = Some((Instant::now(), node));
                false
            }
            Ok((410, _)) if attempt > 0 => {
                erase.done = Some((Instant::now(), node));
                false
            }
            Ok((503 | 504, _)) | Err(_) => true,
            Ok((status, text)) => {
                let answers = &erase.answers;
                let what = format!("the erase of {} was answered {status}: {text}", paper_name(paper));
                violations.push(format!("{what} (its answers: {answers:?})"));
                false
            }
        };
        drop(erases);
        if !again || asked.elapsed() >= API_RETRY_FOR {
            break;
        }
        thread::sleep(rng.between_ms(200, 1000));
    }
}

/// What Redis holds of an erased paper that it must not (PROTOCOL.md 7: its
/// keys deleted, its marker set with a TTL of `--erase-retention`): each key
/// still there (with what it holds), a missing marker or one without a TTL;
/// each as what it is about (a key, or the marker) and a description.
fn erase_leftovers(conn: &mut dyn ConnectionLike, paper: &str) -> redis::RedisResult<Vec<(String, String)>> {
    let mut found = Vec::new();
    let keys = [notes_key(paper), meta_key(paper), paper_key(paper, "tombstones"), paper_key(paper, "members")];
    for key in keys.into_iter().chain([paper_key(paper, "revoked")]) {
        let kind: String = redis::cmd("TYPE").arg(&key).query(conn)?;
        let held: redis::Value = match kind.as_str() {
            "none" => continue,
            "hash" => redis::cmd("HGETALL").arg(&key).query(conn)?,
            "zset" => redis::cmd("ZRANGE").arg(&key).arg(0).arg(-1).arg("WITHSCORES").query(conn)?,
            _ => redis::Value::Nil,
        };
        let held: String = format!("{held:?}").chars().take(300).collect();
        found.push((key.clone(), format!("{key} is there ({kind}: {held})")));
    }
    let ttl: i64 = redis::cmd("PTTL").arg(paper_key(paper, "erased")).query(conn)?;
    let marker = match ttl {
        -2 => "its erased marker is missing",
        -1 => "its erased marker has no TTL",
        _ => return Ok(found),
    };
    found.push(("marker".into(), marker.into()));
    Ok(found)
}

/// How often the erase watcher reads the keys of the papers erased so far.
const WATCH_EVERY: Duration = Duration::from_millis(50);

/// What the erase watcher saw.
#[derive(Default)]
struct EraseWatch {
    /// Papers read, and reads Redis did not answer.
    reads: u64,
    unreadable: u64,
    violations: Vec<String>,
}

/// Reads the keys of the papers erased so far every `WATCH_EVERY` until `stop`
/// (for `limit` at most), so that a key written again after an erase is seen
/// even if it is deleted again soon after (say, a presence entry replayed by a
/// node whose link to Redis came back, before the node heard of the erase):
/// once per paper and key, with when it was first seen and how often.
fn watch_erased(target: &Target, erases: &Mutex<Vec<Erase>>, stop: &AtomicBool, limit: Duration) -> EraseWatch {
    let until = Instant::now() + limit;
    let mut watch = EraseWatch::default();
    // (paper, what) -> (times seen, the first sighting)
    let mut seen: BTreeMap<(usize, String), (u64, String)> = BTreeMap::new();
    let mut conn: Option<Box<dyn ConnectionLike + Send>> = None;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        thread::sleep(WATCH_EVERY);
        let erased: Vec<(usize, Instant)> =
            erases.lock().unwrap().iter().filter_map(|e| Some((e.paper, e.done?.0))).collect();
        for (p, done) in erased {
            if conn.is_none() {
                conn = connect(target).ok();
            }
            let Some(c) = conn.as_mut() else {
                watch.unreadable += 1;
                continue;
            };
            match erase_leftovers(&mut **c, &paper_name(p)) {
                Ok(found) => {
                    watch.reads += 1;
                    for (what, detail) in found {
                        let first = || (0, format!("{detail}, first seen {:?} after the erase's 204", done.elapsed()));
                        seen.entry((p, what)).or_insert_with(first).0 += 1;
                    }
                }
                Err(_) => {
                    watch.unreadable += 1;
                    conn = None;
                }
            }
        }
    }
    watch.violations = seen
        .into_iter()
        .map(|((p, _), (n, first))| format!("erased {}: {first} (in {n} reads, {WATCH_EVERY:?} apart)", paper_name(p)))
        .collect();
    watch
}

/// Whether Redis holds a paper's erased marker.
fn erased_in_redis(store: &Store, paper: &str) -> bool {
    let mut conn = store.conn().expect("Redis for the final checks");
    redis::cmd("EXISTS").arg(paper_key(paper, "erased")).query(&mut *conn).unwrap()
}

// ---- faults --------------------------------------------------------------------------

const FAULTS: [&str; 14] = [
    "kill -9 a node",
    "kill -9 Redis, restart from its AOF",
    "CLIENT KILL TYPE normal",
    "CLIENT KILL TYPE pubsub",
    "CLIENT KILL a named server connection",
    "Redis paused (SIGSTOP)",
    "one paper's notes key of the wrong type",
    "a corrupt stored value",
    "a hostile client's burst on its own paper",
    "one node cut from Redis (a partition; a paper sealed meanwhile)",
    "a slow link between one node and Redis",
    "a half-open link between one node and Redis (one direction black-holed, then reset)",
    "CLUSTER FAILOVER on a replica",
    "kill -9 a master: its replica promoted, the old master back as a replica",
];

/// The faults that need a proxy between each node and one Redis (a Cluster
/// client learns the masters' own addresses from the Cluster, past any proxy).
const PROXY_FAULTS: [usize; 3] = [9, 10, 11];
/// The faults that need a Cluster with replicas.
const FAILOVER_FAULTS: [usize; 2] = [12, 13];

/// What a fault may hold up, for the bystander check: an edit is a bystander of
/// a fault when its paper, the node it was sent through, and its paper's shard
/// are all outside the fault's scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// One Redis killed, paused or its connections dropped: every paper.
    Everything,
    /// A node killed, or its link to Redis cut, slowed or half open: the edits
    /// sent through it.
    Node(usize),
    /// One paper's key broken, a corrupt value planted in it, or the hostile
    /// client's burst on its own paper: that paper.
    Paper(usize),
    /// A Cluster master or replica killed, paused, its connections dropped, or
    /// failed over: the papers of its shard (by the master's port at the start).
    Shard(u16),
}

/// One fault, from its start to its end.
struct Window {
    from: Instant,
    to: Instant,
    scope: Scope,
}

/// How long after a fault's end an edit may still be refused `unavailable`
/// because of it: a paper that failed a write stays unavailable until a probe
/// proves it writable, a shard until a probe finds its master (and replica).
const GRACE: Duration = Duration::from_secs(10);

struct FaultLog {
    counts: [u64; FAULTS.len()],
    timeline: Vec<String>,
    /// Papers whose key was replaced by a string for a while.
    broken_papers: Vec<usize>,
    /// Nodes that exited on their own (each was started again, as a supervisor would).
    crashes: Vec<String>,
    /// Each fault's window and scope.
    windows: Vec<Window>,
    /// Set by `inject`: the scope of the fault it just made, and its end when it
    /// goes on after `inject` returns (the hostile burst).
    scope: Scope,
    ends_at: Option<Instant>,
    /// After each fault, the papers erased so far are read from Redis
    /// (`erase_leftovers`): how many times, how many times Redis could not be
    /// read, and what was found.
    erase_checks: u64,
    erase_unchecked: u64,
    erase_violations: Vec<String>,
}

struct World {
    store: Store,
    nodes: [Node; 2],
    hostile: Arc<HostileSwitch>,
    /// Each node's fault proxy to Redis (one Redis only).
    proxies: Vec<Proxy>,
    /// When each sealed paper is sealed: a partition brings one forward.
    seals: Arc<Mutex<HashMap<usize, Instant>>>,
    /// The erases made through the API so far, and those to come.
    erases: Arc<Mutex<Vec<Erase>>>,
    erase_plan: Arc<Mutex<ErasePlan>>,
}

/// Runs faults until `until`, one at a time; leaves everything running and
/// every injected key restored.
fn run_faults(world: &mut World, seed: u64, kinds: Vec<usize>, until: Instant, started: Instant) -> FaultLog {
    let mut rng = Rng::new(seed, 1);
    let mut log = FaultLog {
        counts: [0; FAULTS.len()],
        timeline: Vec::new(),
        broken_papers: Vec::new(),
        crashes: Vec::new(),
        windows: Vec::new(),
        scope: Scope::Everything,
        ends_at: None,
        erase_checks: 0,
        erase_unchecked: 0,
        erase_violations: Vec::new(),
    };
    let mut round: Vec<usize> = Vec::new();
    let mut corrupt = 0;
    while Instant::now() < until {
        thread::sleep(rng.between_ms(300, 2500));
        if Instant::now() >= until {
            break;
        }
        if round.is_empty() {
            // Every kind once per round, in random order: each happens several times.
            round = kinds.clone();
            for i in (1..round.len()).rev() {
                round.swap(i, rng.below(i as u64 + 1) as usize);
            }
        }
        restart_crashed(world, &mut log, started);
        let kind = round.pop().unwrap();
        let at = started.elapsed().as_millis();
        let from = Instant::now();
        (log.scope, log.ends_at) = (Scope::Everything, None);
        let mut what = inject(world, kind, &mut rng, &mut log, &mut corrupt);
        if world.store.is_cluster() && kind != 8 {
            what.push_str(&world.store.steady());
        }
        let to = log.ends_at.unwrap_or_else(Instant::now);
        log.windows.push(Window { from, to, scope: log.scope });
        log.counts[kind] += 1;
        log.timeline.push(format!("{at} ms: {}{what} [{:?}]", FAULTS[kind], log.scope));
        check_erased(world, &mut log, &format!("after the fault at {at} ms ({})", FAULTS[kind]));
    }
    world.store.settle();
    restart_crashed(world, &mut log, started);
    log
}

/// After a fault: Redis holds nothing of each paper erased so far but its
/// marker (a paper whose Redis cannot be read now is left to the next check).
fn check_erased(world: &World, log: &mut FaultLog, after: &str) {
    let erased: Vec<usize> =
        world.erases.lock().unwrap().iter().filter(|e| e.done.is_some()).map(|e| e.paper).collect();
    for p in erased {
        match world.store.conn().and_then(|mut conn| erase_leftovers(&mut *conn, &paper_name(p))) {
            Ok(found) => {
                log.erase_checks += 1;
                let found = found.into_iter().map(|(_, f)| format!("erased {}: {f}, {after}", paper_name(p)));
                log.erase_violations.extend(found);
            }
            Err(_) => log.erase_unchecked += 1,
        }
    }
}

/// A node that exited by itself is a finding; it is started again so that the
/// run goes on testing the rest.
fn restart_crashed(world: &mut World, log: &mut FaultLog, started: Instant) {
    for node in &mut world.nodes {
        let exited = node.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        if let Some(status) = exited {
            let at = started.elapsed().as_millis();
            let tail = node.log_tail(40);
            let why = tail
                .iter()
                .rposition(|l| l.contains("panicked at"))
                .map_or(String::new(), |i| format!(": {}", tail[i..(i + 2).min(tail.len())].join(" ").trim()));
            log.crashes.push(format!("node {} exited by itself ({status}) before {at} ms{why}", node.id));
            let k = NODE_IDS.iter().position(|id| *id == node.id).unwrap_or(0);
            log.windows.push(Window { from: started, to: Instant::now(), scope: Scope::Node(k) });
            log.timeline.push(format!("{at} ms: node {} found exited ({status}), started again", node.id));
            node.child = None;
            node.spawn();
        }
    }
}

/// One fault of `kind`; a Redis fault hits one server (on a Cluster, one master;
/// a paper's key, on its master). Says what it did, for the timeline.
fn inject(world: &mut World, kind: usize, rng: &mut Rng, log: &mut FaultLog, corrupt: &mut u64) -> String {
    match kind {
        0 => {
            let k = rng.below(2) as usize;
            log.scope = Scope::Node(k);
            world.nodes[k].kill();
            thread::sleep(rng.between_ms(200, 2000));
            world.nodes[k].spawn();
            format!(" ({})", NODE_IDS[k])
        }
        1 => {
            let server = world.store.pick(rng);
            log.scope = world.store.scope(server);
            let down = rng.between_ms(100, 1500);
            let restarted = world.store.kill_and_restart(server, down);
            format!("{}{restarted}", world.store.which(server))
        }
        2 | 3 => {
            let server = world.store.pick(rng);
            log.scope = world.store.scope(server);
            let (port, on) = (world.store.port(server), world.store.which(server));
            let kind = if kind == 2 { "normal" } else { "pubsub" };
            let mut cmd = redis::cmd("CLIENT");
            cmd.arg("KILL").arg("TYPE").arg(kind);
            if kind == "normal" {
                cmd.arg("SKIPME").arg("yes");
            }
            match redis_conn(port).and_then(|mut c| cmd.query::<i64>(&mut c)) {
                Ok(n) => format!("{on}: {n} killed"),
                Err(e) => format!("{on}: failed ({e})"),
            }
        }
        4 => {
            let name = ["rp-writer", "rp-loader", "rp-relay"][rng.below(3) as usize];
            // On a Cluster, the loader's connections (the cluster client's) carry no name.
            let server = world.store.pick(rng);
            log.scope = world.store.scope(server);
            let on = world.store.which(server);
            match kill_named(world.store.port(server), name) {
                Ok(0) => format!(": none named {name}{on} (the server does not name them)"),
                Ok(n) => format!(": {n} named {name}{on}"),
                Err(e) => format!(": failed ({e})"),
            }
        }
        5 => {
            let server = world.store.pick(rng);
            log.scope = world.store.scope(server);
            let on = world.store.which(server);
            match redis_pid(world.store.port(server)) {
                Ok(pid) if pid > 0 => {
                    let pause = rng.between_ms(500, 1500);
                    signal(pid, "STOP");
                    thread::sleep(pause);
                    signal(pid, "CONT");
                    format!("{on} for {pause:?}")
                }
                other => format!("{on}: no pid ({other:?})"),
            }
        }
        6 => {
            let p = rng.below(PAPERS as u64) as usize;
            log.scope = Scope::Paper(p);
            let key = notes_key(&paper_name(p));
            // The paper's tag keeps the key aside on its master (a script's keys share a slot).
            let aside = format!("{key}:aside");
            let broken = redis::Script::new(
                "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('RENAME', KEYS[1], KEYS[2]) end \
                 redis.call('SET', KEYS[1], 'oops') return 1",
            );
            let restored = redis::Script::new(
                "redis.call('DEL', KEYS[1]) \
                 if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('RENAME', KEYS[2], KEYS[1]) end return 1",
            );
            if let Err(e) = world.store.conn().and_then(|mut c| broken.key(&key).key(&aside).invoke::<i64>(&mut *c)) {
                return format!(": failed ({e})");
            }
            log.broken_papers.push(p);
            let held = rng.between_ms(500, 3000);
            thread::sleep(held);
            // Restored in one step, so that nothing is written between DEL and RENAME;
            // tried for a while (a Cluster may be failed for seconds after a pause).
            let until = Instant::now() + Duration::from_secs(30);
            let mut last = None;
            for _ in 0..300 {
                match world.store.conn().and_then(|mut c| restored.key(&key).key(&aside).invoke::<i64>(&mut *c)) {
                    Ok(_) => return format!(" ({}) for {held:?}", paper_name(p)),
                    Err(e) => last = Some(e),
                }
                if Instant::now() >= until {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
            panic!("could not restore {key}: {last:?}");
        }
        8 => {
            // Not waited for: other faults may come while the hostile client goes on.
            let burst = BURSTS[rng.below(BURSTS.len() as u64) as usize];
            let lasts = rng.between_ms(2000, 6000);
            log.scope = Scope::Paper(PAPERS);
            log.ends_at = Some(Instant::now() + lasts);
            let mut switch = world.hostile.burst.lock().unwrap();
            let serial = switch.map_or(1, |(_, _, serial)| serial + 1);
            *switch = Some((burst, Instant::now() + lasts, serial));
            format!(" ({burst:?} for {lasts:?})")
        }
        9..=11 => {
            let k = rng.below(2) as usize;
            log.scope = Scope::Node(k);
            let Some(proxy) = world.proxies.get(k) else { return ": no proxy (a Cluster)".into() };
            let held = rng.between_ms(1000, 4000);
            let what = match kind {
                9 => {
                    proxy.set(Mode::Cut);
                    let (sealed, erased) = (seal_now(&world.seals), erase_now(&world.erase_plan));
                    format!(" (node {}) for {held:?}{sealed}{erased}", NODE_IDS[k])
                }
                10 => {
                    let delay = rng.between_ms(20, 200);
                    proxy.set(Mode::Delay(delay));
                    format!(" (node {}, {delay:?} a read) for {held:?}", NODE_IDS[k])
                }
                _ => {
                    let direction = if rng.chance(50) { Direction::Up } else { Direction::Down };
                    proxy.set_direction(direction, Mode::BlackHole);
                    let (sealed, erased) = (seal_now(&world.seals), erase_now(&world.erase_plan));
                    format!(" (node {}, {direction:?}) for {held:?}{sealed}{erased}", NODE_IDS[k])
                }
            };
            thread::sleep(held);
            // A half-open link ends as TCP ends it: the connection resets. Passing
            // bytes again on it would be a link that loses bytes mid-stream.
            if kind == 11 {
                proxy.set(Mode::Cut);
            }
            proxy.set(Mode::Pass);
            what
        }
        12 | 13 => {
            let (what, scope) = world.store.fail_over(rng, kind == 13);
            log.scope = scope;
            what
        }
        _ => {
            let p = rng.below(PAPERS as u64) as usize;
            log.scope = Scope::Paper(p);
            *corrupt += 1;
            let id = format!("x-corrupt-{corrupt}");
            let value: Vec<u8> = match *corrupt % 3 {
                0 => b"{\"author\":\"x\",\"data\":{\"t\":\"\xff\"},\"v\":5}".to_vec(),
                1 => br#"{"author":"x","data":{},"v":18446744073709551615}"#.to_vec(),
                _ => b"not json at all".to_vec(),
            };
            let result = world.store.conn().and_then(|mut c| {
                redis::cmd("HSET").arg(notes_key(&paper_name(p))).arg(&id).arg(value).query::<i64>(&mut *c)
            });
            match result {
                Ok(_) => format!(" ({} {id})", paper_name(p)),
                Err(e) => format!(": failed ({e})"),
            }
        }
    }
}

/// Brings the seal of one planned paper forward to now (a seal during a
/// partition), if one is still to come.
fn seal_now(seals: &Mutex<HashMap<usize, Instant>>) -> String {
    let now = Instant::now();
    let mut seals = seals.lock().unwrap();
    let mut planned: Vec<(&usize, &mut Instant)> = seals.iter_mut().filter(|(_, at)| **at > now).collect();
    planned.sort_by_key(|(p, _)| **p);
    match planned.into_iter().next() {
        Some((p, at)) => {
            *at = now;
            format!(", {} sealed meanwhile", paper_name(*p))
        }
        None => String::new(),
    }
}

/// Brings the next planned erase forward to now (an erase while a node is cut
/// from Redis: its backlog is replayed after the erase), if one is still to come.
fn erase_now(plan: &Mutex<ErasePlan>) -> String {
    let now = Instant::now();
    let mut plan = plan.lock().unwrap();
    match plan.iter_mut().filter(|(_, at)| *at > now).min_by_key(|(_, at)| *at) {
        Some((p, at)) => {
            *at = now;
            format!(", {} erased meanwhile", paper_name(*p))
        }
        None => String::new(),
    }
}

/// Kills Redis's connections of one name (the server names its own).
fn kill_named(port: u16, name: &str) -> redis::RedisResult<usize> {
    let mut conn = redis_conn(port)?;
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut conn)?;
    let ids: Vec<&str> = list
        .lines()
        .filter(|l| l.split(' ').any(|f| f == format!("name={name}")))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .collect();
    for id in &ids {
        let _: redis::Value = redis::cmd("CLIENT").arg("KILL").arg("ID").arg(*id).query(&mut conn)?;
    }
    Ok(ids.len())
}

// ---- the run -------------------------------------------------------------------------

fn seed_from_env() -> u64 {
    match std::env::var("RP_CHAOS_SEED") {
        Ok(s) => s.trim().parse().expect("RP_CHAOS_SEED must be an unsigned integer"),
        Err(_) => SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64,
    }
}

fn seconds_from_env() -> u64 {
    std::env::var("RP_CHAOS_SECONDS").map_or(45, |s| s.trim().parse().expect("RP_CHAOS_SECONDS must be seconds"))
}

/// `RP_CHAOS_FAULTS`: the fault kinds to use, as numbers into `FAULTS` (all by
/// default), less those that do not apply to this Redis.
fn kinds_from_env() -> Vec<usize> {
    let kinds: Vec<usize> = match std::env::var("RP_CHAOS_FAULTS") {
        Ok(list) => list
            .split(',')
            .map(|k| {
                k.trim()
                    .parse()
                    .ok()
                    .filter(|k| *k < FAULTS.len())
                    .unwrap_or_else(|| panic!("RP_CHAOS_FAULTS: numbers below {}", FAULTS.len()))
            })
            .collect(),
        Err(_) => (0..FAULTS.len()).collect(),
    };
    // The proxy faults need one Redis; failovers need a Cluster with replicas.
    let cluster = redis_from_env() == "cluster";
    let kinds: Vec<usize> = kinds
        .into_iter()
        .filter(|k| if cluster { !PROXY_FAULTS.contains(k) } else { !FAILOVER_FAULTS.contains(k) })
        .collect();
    assert!(!kinds.is_empty(), "RP_CHAOS_FAULTS names no fault that applies to this Redis");
    kinds
}

/// `RP_CHAOS_REDIS`: `single` (the default) or `cluster`.
fn redis_from_env() -> String {
    std::env::var("RP_CHAOS_REDIS").map_or("single".into(), |s| s.trim().to_string())
}

/// `RP_FAULT_LOSE_ONE_IN`: handed to the nodes, which lose one note write in
/// that many on purpose when built with the `fault-lose-writes` feature.
fn lose_one_in_from_env() -> Option<u64> {
    std::env::var("RP_FAULT_LOSE_ONE_IN").ok().map(|n| n.trim().parse().expect("RP_FAULT_LOSE_ONE_IN must be a number"))
}

/// What a run found.
struct Verdict {
    violations: Vec<String>,
    /// Of them, those found by reading an edit back right after its `saved`,
    /// and of those, API writes read back right after their `200`.
    at_ack: usize,
    api_at_ack: usize,
    /// API writes answered 200 whose write the nodes lost on purpose (by their
    /// log): the write's ref, whether its note is a once-only one (which no
    /// later write can stand for) of a paper never erased, and whether a
    /// violation names it.
    #[cfg_attr(not(feature = "fault-lose-writes"), allow(dead_code))]
    lost_api: Vec<(String, bool, bool)>,
    seed: u64,
    kind: String,
    replay: String,
}

#[test]
fn acknowledged_edits_survive_faults() {
    let verdict = run_chaos(seconds_from_env(), lose_one_in_from_env());
    let Verdict { violations, at_ack, api_at_ack, seed, kind, replay, .. } = verdict;
    if !violations.is_empty() {
        let first: Vec<&String> = violations.iter().take(20).collect();
        panic!(
            "chaos (seed {seed}, Redis {kind}; replay with {replay}): {} violations ({at_ack} at an edit's saved, \
             {api_at_ack} of them API writes at their 200), the first:\n  {}",
            violations.len(),
            first.iter().map(|v| v.as_str()).collect::<Vec<_>>().join("\n  ")
        );
    }
}

/// The checker's own test: nodes that lose one note write in 100 (and report
/// it applied) must be caught, and caught at the edits' `saved`, not only by
/// the final comparison. Needs the `fault-lose-writes` feature.
#[cfg(feature = "fault-lose-writes")]
#[test]
fn the_checker_catches_lost_writes() {
    let seconds = std::env::var("RP_CHAOS_SECONDS").map_or(20, |s| s.trim().parse().expect("RP_CHAOS_SECONDS"));
    let verdict = run_chaos(seconds, Some(lose_one_in_from_env().unwrap_or(100)));
    eprintln!(
        "chaos: the checker saw {} violations of a server that loses writes, {} at an edit's saved \
         ({} of them API writes at their 200)",
        verdict.violations.len(),
        verdict.at_ack,
        verdict.api_at_ack
    );
    assert!(verdict.at_ack > 0, "no lost write caught at its saved (seed {}, {})", verdict.seed, verdict.replay);
    // The API writes through the same writer: its lost writes are caught at their 200.
    let api: Vec<&String> = verdict.violations.iter().filter(|v| v.starts_with("API write")).take(5).collect();
    eprintln!(
        "chaos: the first violations of API writes:\n  {}",
        api.iter().map(|v| v.as_str()).collect::<Vec<_>>().join("\n  ")
    );
    // A lost once-only note cannot be stood for by a later write: each is caught.
    for (r, once, caught) in &verdict.lost_api {
        assert!(*caught || !once, "the lost API write {r} of a once-only note was not caught ({})", verdict.replay);
    }
}

/// One run: nodes, clients and faults for `seconds`, then every check; prints
/// the report and returns the violations.
fn run_chaos(seconds: u64, lose_one_in: Option<u64>) -> Verdict {
    let seed = seed_from_env();
    let kind = redis_from_env();
    let lose = lose_one_in.map_or(String::new(), |n| format!(" RP_FAULT_LOSE_ONE_IN={n}"));
    let replay = format!("RP_CHAOS_SEED={seed} RP_CHAOS_REDIS={kind} RP_CHAOS_SECONDS={seconds}{lose}");
    eprintln!("chaos: seed {seed}, {seconds} s of faults, Redis {kind} (replay with {replay})");
    let env: Vec<(String, String)> =
        lose_one_in.map(|n| ("RP_FAULT_LOSE_ONE_IN".to_string(), n.to_string())).into_iter().collect();
    if lose_one_in.is_some() && !cfg!(feature = "fault-lose-writes") {
        eprintln!("chaos: RP_FAULT_LOSE_ONE_IN has no effect: built without the fault-lose-writes feature");
    }
    let started = Instant::now();
    let store = Store::start(&kind);
    if let Store::Cluster { holds, .. } = &store {
        eprintln!("chaos: the Cluster's servers: {}", holds.join("; "));
    }
    let kinds = kinds_from_env();
    let url = store.url();
    // Tiny tombstone limits for some runs, so that the horizon races the edits.
    let mut rng = Rng::new(seed, 2);
    let mut args: Vec<String> = match rng.below(3) {
        0 => vec!["--max-tombstones".into(), (1 + rng.below(3)).to_string()],
        1 => vec!["--tombstone-retention".into(), (1 + rng.below(3)).to_string()],
        _ => Vec::new(),
    };
    if store.is_cluster() {
        // A batch counts as written once the shard's replica has it: what keeps
        // `saved` through a master killed and replaced by its replica.
        args.extend(["--redis-wait-replicas".to_string(), "1".to_string()]);
    }
    eprintln!("chaos: nodes started with {args:?}");
    // The backend API (PROTOCOL.md 7), its erases kept longer than any run.
    args.extend(["--api-key", API_KEY].map(String::from));
    args.extend(["--api-timeout".into(), API_TIMEOUT_SECONDS.to_string()]);
    args.extend(["--erase-retention".into(), ERASE_RETENTION_SECONDS.to_string()]);
    // On one Redis each node reaches it through a fault proxy of its own.
    let proxies: Vec<Proxy> = match &store {
        Store::Single(redis) => (0..2).map(|_| Proxy::start(redis.port)).collect(),
        Store::Cluster { .. } => Vec::new(),
    };
    let urls: Vec<String> = match proxies.is_empty() {
        true => vec![url.clone(), url.clone()],
        false => proxies.iter().map(Proxy::redis_url).collect(),
    };
    let nodes = [Node::start(NODE_IDS[0], &urls[0], &args, &env), Node::start(NODE_IDS[1], &urls[1], &args, &env)];
    let ports = [nodes[0].port, nodes[1].port];
    for port in ports {
        let until = Instant::now() + Duration::from_secs(20);
        while http_get(port, "/readyz").map(|(s, _)| s) != Some(200) {
            assert!(Instant::now() < until, "a node on port {port} never became ready");
            thread::sleep(Duration::from_millis(50));
        }
    }
    let hostile = Arc::new(HostileSwitch::default());
    let seals: Arc<Mutex<HashMap<usize, Instant>>> = Arc::default();
    let erases: Arc<Mutex<Vec<Erase>>> = Arc::default();
    let erase_plan: Arc<Mutex<ErasePlan>> = Arc::default();
    let mut world = World {
        store,
        nodes,
        hostile: hostile.clone(),
        proxies,
        seals: seals.clone(),
        erases: erases.clone(),
        erase_plan: erase_plan.clone(),
    };

    // Which papers are sealed, and when.
    let mut rng = Rng::new(seed, 0);
    let faults_end = Instant::now() + Duration::from_secs(seconds);
    let mut sealers: HashMap<usize, Instant> = HashMap::new();
    while sealers.len() < SEALED {
        let at = Duration::from_millis(seconds * 1000 * (30 + rng.below(60)) / 100);
        sealers.entry(rng.below(PAPERS as u64) as usize).or_insert(Instant::now() + at);
    }
    // The papers to erase, one after the other, over the middle of the run.
    let mut rng = Rng::new(seed, 4);
    *erase_plan.lock().unwrap() = (0..ERASE_PAPERS)
        .map(|i| {
            let percent = 15 + 60 * i as u64 / ERASE_PAPERS as u64 + rng.below(10);
            (ALL_PAPERS + i, Instant::now() + Duration::from_millis(seconds * 10 * percent))
        })
        .collect();
    let target = world.store.target();
    *seals.lock().unwrap() = sealers.clone();
    let shared = Arc::new(Shared { ports, stop: AtomicBool::new(false), target: target.clone(), seals });
    let clients: Vec<_> = (0..CLIENTS)
        .map(|index| {
            let paper = index % PAPERS;
            // The first client of a paper seals it; a paper's clients sit on both nodes.
            let sealer = index < PAPERS && sealers.contains_key(&paper);
            let plan = ClientPlan { index, paper, home: (index / PAPERS + index) % 2, seed, sealer, hostile: None };
            let shared = shared.clone();
            thread::spawn(move || run_client(plan, shared))
        })
        .chain((0..HOSTILE_PAPERS).map(|h| {
            let plan = ClientPlan {
                index: HOSTILE + h,
                paper: PAPERS + h,
                home: h % 2,
                seed,
                sealer: false,
                hostile: Some(hostile.clone()),
            };
            let shared = shared.clone();
            thread::spawn(move || run_client(plan, shared))
        }))
        .chain((0..ERASE_CLIENTS).map(|i| {
            let paper = ALL_PAPERS + i / 2;
            let plan = ClientPlan { index: ERASE_CLIENT + i, paper, home: i % 2, seed, sealer: false, hostile: None };
            let shared = shared.clone();
            thread::spawn(move || run_client(plan, shared))
        }))
        .collect();
    let api = {
        let shared = shared.clone();
        thread::spawn(move || run_api(seed, shared))
    };
    let eraser = {
        let (shared, erases) = (shared.clone(), erases.clone());
        thread::spawn(move || run_eraser(seed, erase_plan, shared, erases))
    };
    // Watches the erased papers' keys until the final checks.
    let watch_stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (target, erases, watch_stop) = (target.clone(), erases.clone(), watch_stop.clone());
        let limit = Duration::from_secs(seconds) + QUIESCE + Duration::from_secs(120);
        thread::spawn(move || watch_erased(&target, &erases, &watch_stop, limit))
    };

    let faults = run_faults(&mut world, seed, kinds, faults_end, started);
    let calm = Instant::now();
    shared.stop.store(true, Ordering::Relaxed);
    let mut violations: Vec<String> = Vec::new();

    // After the last fault, each paper takes a fresh edit (or says it is sealed).
    let probing: Vec<_> = (0..ALL_PAPERS)
        .map(|p| {
            let target = target.clone();
            thread::spawn(move || fresh_edit(p, p % 2, ports[p % 2], calm, &target))
        })
        .collect();
    let mut probes: Vec<(Session, ClientLog)> = Vec::new();
    for (p, probe) in probing.into_iter().enumerate() {
        match probe.join().expect("a probe thread panicked") {
            Ok(probe) => probes.push(probe),
            Err(e) => violations.push(format!("{}: {e}", paper_name(p))),
        }
    }
    if let Some(first) = faults.crashes.first() {
        violations.push(format!("nodes exited by themselves {} times; the first: {first}", faults.crashes.len()));
    }

    let mut ends: Vec<ClientEnd> = clients.into_iter().map(|c| c.join().expect("a client thread panicked")).collect();
    let api = api.join().expect("the API writer panicked");
    violations.extend(eraser.join().expect("the eraser panicked"));
    let stopped = Instant::now();
    watch_stop.store(true, Ordering::Relaxed);
    let watch = watcher.join().expect("the erase watcher panicked");
    violations.extend(watch.violations.iter().cloned());

    // Redis answers every client again soon after the last fault: no client's
    // traffic may keep it busy for the others (PROTOCOL.md 4, 1.2). If it does
    // not, the checks that read it wait until the nodes have stopped.
    let mut redis_ok = match redis_answers(&world.store, Duration::from_secs(30)) {
        Ok(()) => true,
        Err(e) => {
            violations.push(format!("Redis did not answer PING within 30 s of the last fault: {e}"));
            false
        }
    };

    // Every node serves what Redis holds (all within one bound).
    let until = Instant::now() + Duration::from_secs(20);
    if redis_ok {
        loop {
            let mut differ = Vec::new();
            for p in 0..EVERY_PAPER {
                let paper = paper_name(p);
                // An erased paper answers 410 (PROTOCOL.md 7), on every node.
                if is_erasable(p) && erased_in_redis(&world.store, &paper) {
                    for (k, port) in ports.iter().enumerate() {
                        match http_get(*port, &format!("/papers/{paper}")) {
                            Some((410, _)) => {}
                            other => differ.push(format!("node {} answers {other:?} for erased {paper}", NODE_IDS[k])),
                        }
                    }
                    continue;
                }
                let stored = live_in_redis(&world.store, &paper);
                // A sealed paper's hash is its stream entry (check_sealed): a node
                // serving the hash and the seal serves the paper exactly as sealed.
                let sealed = seal_in_redis(&world.store, &paper).0;
                for (k, port) in ports.iter().enumerate() {
                    match node_view(*port, &paper) {
                        Some((completed, view)) if view == stored && completed == sealed => {}
                        Some((completed, view)) => differ.push(format!(
                            "node {} serves {paper} unlike Redis (completed {completed}, in Redis {sealed}): {}",
                            NODE_IDS[k],
                            diff(&view, &stored)
                        )),
                        None => differ.push(format!("node {} serves {paper} unlike Redis: no answer", NODE_IDS[k])),
                    }
                }
            }
            if differ.is_empty() || Instant::now() >= until {
                violations.extend(differ);
                break;
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    // Every connected client's view is what Redis holds.
    let mut open_sessions = 0;
    let until = Instant::now() + Duration::from_secs(10);
    let mut views = |session: &mut Session, log: &mut ClientLog, who: String| {
        if !redis_ok {
            return;
        }
        let paper = paper_name(session.paper);
        // A session of an erased paper is judged by check_erases.
        if is_erasable(session.paper) && erased_in_redis(&world.store, &paper) {
            return;
        }
        loop {
            if let Err(e) = session.settle(log) {
                log.received.push(format!("# lost at the end: {e}"));
                return;
            }
            let stored = live_in_redis(&world.store, &paper);
            if session.view == stored {
                return;
            }
            if Instant::now() >= until {
                violations.push(format!("{who} on {paper} shows {}", diff(&session.view, &stored)));
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
    };
    for end in &mut ends {
        if let Some(session) = end.session.as_mut() {
            open_sessions += 1;
            views(session, &mut end.log, format!("client {}", end.plan.index));
        }
    }
    for (p, (session, log)) in probes.iter_mut().enumerate() {
        views(session, log, format!("the probe of {}", paper_name(p)));
    }
    let probe_logs: Vec<ClientLog> = probes.into_iter().map(|(_, log)| log).collect();
    for end in &mut ends {
        end.session = None;
    }

    // A clean stop of both nodes.
    for node in &mut world.nodes {
        match node.terminate() {
            Some(status) if status.code() == Some(0) => {}
            other => violations.push(format!("node {} after SIGTERM: {other:?}", node.id)),
        }
    }
    if !redis_ok {
        match redis_answers(&world.store, Duration::from_secs(60)) {
            Ok(()) => redis_ok = true,
            Err(e) => violations.push(format!(
                "Redis still not answering 60 s after both nodes stopped ({e}): acknowledged edits and seals not checked"
            )),
        }
    }

    let logs: Vec<&ClientLog> = ends.iter().map(|e| &e.log).chain(probe_logs.iter()).chain([&api.log]).collect();
    for log in &logs {
        violations.extend(log.violations.iter().cloned());
    }
    violations.extend(faults.erase_violations.iter().cloned());
    let edits: Vec<&Edit> = logs.iter().flat_map(|l| l.edits.iter()).collect();
    let erases = std::mem::take(&mut *erases.lock().unwrap());
    // An erase is a fault of its paper while it is under way.
    let mut windows = faults.windows;
    windows.extend(erases.iter().map(|e| Window {
        from: e.asked,
        to: e.done.map_or(stopped, |(done, _)| done),
        scope: Scope::Paper(e.paper),
    }));
    let mut repeated = 0;
    let mut erased = EraseTally::default();
    let (bystanders, unavailable) = check_bystanders(&world.store, &edits, &windows, started);
    violations.extend(bystanders);
    if redis_ok {
        violations.extend(check_acknowledged(&world.store, &edits));
        let (sealed_violations, again) = check_sealed(&world.store, &logs);
        violations.extend(sealed_violations);
        repeated = again;
        let (erase_violations, tally) = check_erases(&world.store, &erases, &logs, &windows, stopped);
        violations.extend(erase_violations);
        erased = tally;
    }

    // The report.
    let count = |f: &dyn Fn(&Edit) -> bool| edits.iter().filter(|e| e.client != API_CLIENT && f(e)).count();
    let mut refused: BTreeMap<&str, usize> = BTreeMap::new();
    for e in edits.iter().filter(|e| e.client != API_CLIENT) {
        if let Some(code) = &e.error {
            *refused.entry(code.as_str()).or_default() += 1;
        }
    }
    eprintln!("chaos: seed {seed}, Redis {kind}, ran {:?}", started.elapsed());
    eprintln!(
        "chaos: edits sent {} (upserts {}, deletes {}, patches {}, completes {}); saved {}; refused {refused:?}; \
         unresolved at a lost connection {}",
        count(&|_| true),
        count(&|e| e.kind == Kind::Upsert),
        count(&|e| e.kind == Kind::Delete),
        count(&|e| e.kind == Kind::Patch),
        count(&|e| e.kind == Kind::Complete),
        count(&|e| e.saved.is_some()),
        count(&|e| e.lost),
    );
    eprintln!(
        "chaos: connections {}; clients connected at the end {open_sessions}; errors without a ref {:?}",
        logs.iter().map(|l| l.connections).sum::<u64>(),
        logs.iter().flat_map(|l| l.errors_without_ref.iter()).collect::<Vec<_>>(),
    );
    let hostile: Vec<&&Edit> = edits.iter().filter(|e| is_hostile(e)).collect();
    eprintln!(
        "chaos: the hostile client's edits {} (patches {}), saved {}, refused {}; its papers {:?}",
        hostile.len(),
        hostile.iter().filter(|e| e.kind == Kind::Patch).count(),
        hostile.iter().filter(|e| e.saved.is_some()).count(),
        hostile.iter().filter(|e| e.error.is_some()).count(),
        (PAPERS..ALL_PAPERS).map(paper_name).collect::<Vec<_>>(),
    );
    for (fault, n) in FAULTS.iter().zip(faults.counts) {
        eprintln!("chaos: fault {fault}: {n}");
    }
    let bursts: Vec<&String> = faults.timeline.iter().filter(|l| l.contains(FAULTS[8])).collect();
    eprintln!("chaos: hostile bursts: {bursts:?}");
    eprintln!("chaos: papers broken for a while: {:?}", faults.broken_papers);
    eprintln!("chaos: sealed by plan: {:?}", sealers.keys().map(|p| paper_name(*p)).collect::<Vec<_>>());
    if world.store.is_cluster() {
        eprintln!("chaos: stream entries appended again (at least once on a Cluster): {repeated}");
    }
    let at_ack = violations.iter().filter(|v| v.contains(" at its saved: ")).count();
    eprintln!(
        "chaos: saved edits read back at once {} (Redis unreadable for {ACK_READ:?}: {}); once-only notes {}",
        logs.iter().map(|l| l.checked_at_ack).sum::<u64>(),
        logs.iter().map(|l| l.unchecked_at_ack).sum::<u64>(),
        count(&|e| e.id.starts_with("once-") && e.saved.is_some()),
    );
    eprintln!(
        "chaos: refused unavailable {}, of them with no fault on their paper, node or shard (bystanders) {}",
        unavailable.0, unavailable.1
    );
    let writes = &api.log.edits;
    let by_api = |f: &dyn Fn(&Edit) -> bool| writes.iter().filter(|e| f(e)).count();
    eprintln!(
        "chaos: API writes {} (PUT {}, PATCH {}, DELETE {}; tries after a 503, 504 or no answer {}); answered 200 {} \
         (read back at once {}, their paper erased before that {}; once-only notes {}); answers {:?}; the writes \
         answered 504 or nothing, tried again until answered: {:?}",
        by_api(&|_| true),
        by_api(&|e| e.kind == Kind::Upsert),
        by_api(&|e| e.kind == Kind::Patch),
        by_api(&|e| e.kind == Kind::Delete),
        api.retries,
        by_api(&|e| e.saved.is_some()),
        api.log.checked_at_ack,
        api.log.erased_at_ack,
        by_api(&|e| e.id.starts_with("once-") && e.saved.is_some()),
        api.statuses,
        api.after_uncertain,
    );
    let asked_at = |e: &Erase| e.asked.duration_since(started).as_millis();
    let erase_lines: Vec<String> = erases
        .iter()
        .map(|e| format!("{} asked at {} ms: {}", paper_name(e.paper), asked_at(e), e.answers.join(", ")))
        .collect();
    eprintln!(
        "chaos: erases {} of {ERASE_PAPERS} done ({}); sessions closed with 4410 {}, ended by a fault {}; joins after \
         an erase answered 410 {}, excused {:?}; edits and API writes sent after an erase \
         {} (the API's answers {:?}); erased papers read back after the faults {} times (Redis unreadable {}), and every {WATCH_EVERY:?} {} times \
         (unreadable {})",
        erases.iter().filter(|e| e.done.is_some()).count(),
        erase_lines.join("; "),
        erased.closed_4410,
        erased.ended_by_a_fault,
        erased.joins_gone,
        erased.joins_excused,
        erased.sent_after,
        erased.api_after,
        faults.erase_checks,
        faults.erase_unchecked,
        watch.reads,
        watch.unreadable,
    );
    if !erased.snapshots.is_empty() {
        eprintln!(
            "chaos: joins of an erased paper given a snapshot during a fault:\n  {}",
            erased.snapshots.join("\n  ")
        );
    }
    let api_at_ack = violations.iter().filter(|v| v.starts_with("API write") && v.contains(" at its saved: ")).count();
    let mut lost_api = Vec::new();
    if lose_one_in.is_some() {
        let lost: u64 = world.nodes.iter().map(|n| n.lost_on_purpose.load(Ordering::Relaxed)).sum();
        eprintln!("chaos: note writes the nodes lost on purpose and reported applied: {lost}");
        // Which of them were API writes answered 200 (by paper, note and version), and whether each was caught.
        let lost: Vec<(String, String, u64)> =
            world.nodes.iter().flat_map(|n| n.lost_writes.lock().unwrap().clone()).collect();
        let lost_by_api: Vec<&Edit> = writes
            .iter()
            .filter(|e| e.saved.is_some())
            .filter(|e| lost.iter().any(|(p, id, v)| *p == paper_name(e.paper) && *id == e.id && Some(*v) == e.v))
            .collect();
        let named = |e: &Edit| violations.iter().any(|v| v.starts_with(&format!("API write {} (", e.r)));
        let caught = lost_by_api.iter().filter(|e| named(e)).count();
        eprintln!(
            "chaos: of them API writes answered 200: {} ({caught} caught; API violations at their 200: {api_at_ack})",
            lost_by_api.len()
        );
        // (On a paper erased since, nothing is left to read back.)
        let once = |e: &Edit| e.id.starts_with("once-") && !is_erasable(e.paper);
        lost_api = lost_by_api.iter().map(|e| (e.r.clone(), once(e), named(e))).collect();
    }
    eprintln!("chaos: violations {} ({at_ack} found at an edit's saved)", violations.len());
    eprintln!("chaos: fault timeline:\n  {}", faults.timeline.join("\n  "));
    for node in &world.nodes {
        let errors = node.errors.lock().unwrap();
        if !errors.is_empty() {
            eprintln!("chaos: node {} logged errors (the first 40):\n  {}", node.id, errors.join("\n  "));
        }
    }
    if !violations.is_empty() {
        for node in &world.nodes {
            eprintln!("chaos: node {} log tail:\n  {}", node.id, node.log_tail(20).join("\n  "));
        }
    }
    Verdict { violations, at_ack, api_at_ack, lost_api, seed, kind, replay }
}

/// A fresh session on a paper upserts a note and sees it saved (or is told the
/// paper is sealed) within `FRESH_EDIT` of `calm`; `unavailable` and lost
/// connections are retried within that time.
fn fresh_edit(
    paper: usize,
    node: usize,
    port: u16,
    calm: Instant,
    target: &Target,
) -> Result<(Session, ClientLog), String> {
    let until = calm + FRESH_EDIT;
    let mut log = ClientLog::reading(target);
    let mut last = String::from("never joined");
    let mut serial = 0;
    while Instant::now() < until {
        serial += 1;
        match Session::open(node, port, paper, "probe", u64::MAX - serial) {
            Ok(mut session) => match probe(&mut session, &mut log, until) {
                Ok(()) => return Ok((session, log)),
                Err(e) => {
                    session.lost(&mut log, &e);
                    last = e;
                }
            },
            Err(e) => last = e,
        }
        thread::sleep(Duration::from_millis(100));
    }
    Err(format!("no fresh edit saved within {FRESH_EDIT:?} of the last fault on node {}: {last}", NODE_IDS[node]))
}

/// Upserts the probe note until it is saved or refused as sealed.
fn probe(session: &mut Session, log: &mut ClientLog, until: Instant) -> Result<(), String> {
    let mut last = String::from("no time left");
    while Instant::now() < until {
        let n = log.edits.len();
        let r = format!("probe-{}-{n}", session.paper);
        log.edits.push(Edit {
            client: usize::MAX,
            r: r.clone(),
            paper: session.paper,
            id: "probe".into(),
            kind: Kind::Upsert,
            data: json!({"attempt": n}),
            node: session.node,
            conn: session.conn,
            v: None,
            saved: None,
            error: None,
            lost: false,
            sent: Instant::now(),
            refused_at: None,
        });
        session.pending.push(n);
        session.send(&json!({"type": "upsert", "id": "probe", "data": {"attempt": n}, "ref": r}))?;
        loop {
            session.pump(log)?;
            let edit = &log.edits[n];
            match edit.error.as_deref() {
                Some("paper_completed") => return Ok(()),
                Some("unavailable") => break,
                Some(code) => return Err(format!("the fresh edit was refused with {code}")),
                None if edit.saved.is_some() => return Ok(()),
                None => {}
            }
            if Instant::now() >= until {
                return Err(format!("the fresh edit was neither saved nor refused: {edit:?}"));
            }
        }
        last = "refused with unavailable".into();
        thread::sleep(Duration::from_millis(100));
    }
    Err(last)
}

/// Every edit its sender saw `saved` (and not refused), and every API write
/// answered 200, judged again against what Redis holds once the nodes have
/// stopped (`judge`); those of an erased paper are gone with it (`check_erases`).
fn check_acknowledged(store: &Store, edits: &[&Edit]) -> Vec<String> {
    let mut violations = Vec::new();
    let mut stored: HashMap<usize, HashMap<String, Vec<u8>>> = HashMap::new();
    let mut horizons: HashMap<usize, u64> = HashMap::new();
    for p in 0..EVERY_PAPER {
        if is_erasable(p) && erased_in_redis(store, &paper_name(p)) {
            continue;
        }
        stored.insert(p, stored_raw(store, &paper_name(p)).into_iter().collect());
        horizons.insert(p, horizon_in_redis(store, &paper_name(p)));
    }
    for edit in edits {
        let (Some(v), Some(_), None) = (edit.v, edit.saved, &edit.error) else { continue };
        let Some(held) = stored.get(&edit.paper) else { continue };
        let raw = held.get(&edit.id).map(Vec::as_slice);
        if let Err(e) = judge(edit.kind, &edit.id, &edit.data, v, NODE_IDS[edit.node], raw, horizons[&edit.paper]) {
            violations.push(format!("{} at the end: {e}", describe(edit)));
        }
    }
    violations
}

/// Bystanders are never refused `unavailable` (PROTOCOL.md 3.3: the backlog is
/// full or the paper cannot be written; one paper's refused writes never hold up
/// another's, and a Cluster shard's failover never the other shards'). An edit
/// refused `unavailable` is a bystander when no fault that could hold it up
/// overlapped the time from its sending to its refusal, each fault counted from
/// its start to `GRACE` after its end: not one Redis's (`Scope::Everything`),
/// nor one of its paper, of the node it was sent through, or of its paper's
/// shard. Returns the violations, with how many edits were refused
/// `unavailable` and how many of them were bystanders.
fn check_bystanders(
    store: &Store,
    edits: &[&Edit],
    windows: &[Window],
    started: Instant,
) -> (Vec<String>, (usize, usize)) {
    let mut violations = Vec::new();
    let mut refused = 0;
    let mut excuses: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for edit in edits {
        // `write_failed`, and an API write's `timeout` (504: Redis was slow, not
        // a refusal), are only reported (what excused them), never judged here;
        // an API write's 503 is `unavailable`.
        let (Some(code @ ("unavailable" | "timeout" | "write_failed")), Some(at)) =
            (edit.error.as_deref(), edit.refused_at)
        else {
            continue;
        };
        let judged = code == "unavailable";
        refused += usize::from(judged);
        let excused = faults_over(store, windows, edit.node, edit.paper, edit.sent, at);
        // What excused it, for the report: one Redis's fault excuses every paper,
        // so that on one Redis few refusals are left to judge.
        let by = match excused.iter().find(|s| **s != Scope::Everything) {
            Some(Scope::Node(_)) => "its node",
            Some(Scope::Paper(_)) => "its paper",
            Some(_) => "its shard",
            None if excused.is_empty() => "nothing",
            None => "only a fault of one Redis",
        };
        *excuses.entry((code, by)).or_default() += 1;
        if !judged {
            eprintln!(
                "chaos: {code}: {} {} ms into the run, during {excused:?}",
                describe(edit),
                at.duration_since(started).as_millis()
            );
        }
        if judged && excused.is_empty() {
            violations.push(format!(
                "{} was refused {code} {} ms into the run, {:?} after it was sent, with no fault on its paper, \
                 its node or its shard (a bystander)",
                describe(edit),
                at.duration_since(started).as_millis(),
                at.duration_since(edit.sent)
            ));
        }
    }
    let bystanders = violations.len();
    eprintln!("chaos: refused (code, during a fault of): {excuses:?}");
    (violations, (refused, bystanders))
}

/// The scopes of the faults that could hold up, between `from` and `to`, what
/// goes through `node` for `paper`: one Redis's (`Scope::Everything`), or one
/// of that paper, node, or the paper's shard, each counted from its start to
/// `GRACE` after its end.
fn faults_over(store: &Store, windows: &[Window], node: usize, paper: usize, from: Instant, to: Instant) -> Vec<Scope> {
    windows_over(store, windows, node, paper, from, to).map(|w| w.scope).collect()
}

/// The faults of `faults_over` themselves.
fn windows_over<'a>(
    store: &'a Store,
    windows: &'a [Window],
    node: usize,
    paper: usize,
    from: Instant,
    to: Instant,
) -> impl Iterator<Item = &'a Window> + 'a {
    let holds = move |scope: Scope| match scope {
        Scope::Everything => true,
        Scope::Node(k) => k == node,
        Scope::Paper(p) => p == paper,
        Scope::Shard(shard) => shard == store.shard_of_paper(paper),
    };
    windows.iter().filter(move |w| w.from <= to && from <= w.to + GRACE && holds(w.scope))
}

/// What the erases came to, for the report.
#[derive(Default, Debug)]
struct EraseTally {
    /// Sessions of an erased paper closed with 4410, and ended by a fault.
    closed_4410: usize,
    ended_by_a_fault: usize,
    /// Joins made after an erase's 204: answered 410, and the others (excused
    /// by a fault or by the relay's lag), by what they got and why excused.
    joins_gone: usize,
    joins_excused: BTreeMap<String, usize>,
    /// Each excused join that got a snapshot: what and when, and the faults.
    snapshots: Vec<String>,
    /// Edits and API writes sent after an erase's 204, none of them to be saved.
    sent_after: usize,
    /// What the API writes sent after an erase's 204 got.
    api_after: BTreeMap<String, usize>,
}

/// What an erase promises (PROTOCOL.md 7), for each paper erased during the
/// run, once the nodes have stopped:
/// - Redis holds no key of the paper but its marker, which has a TTL
///   (`erase_leftovers`; also read after each fault, `check_erased`);
/// - no edit or API write sent after the erase's `204` is saved (one saved
///   before the erase landed is fine; one sent before and saved after may have
///   landed before: Redis's keys say whether anything landed after);
/// - every session of the paper open when the erase was asked is closed with
///   4410 within `ERASE_CLOSE` of the `204` (or of the end of a fault that
///   could hold its node back), unless a fault of its node or Redis ended it;
/// - every join of the paper made after the `204` is answered 410, with no
///   upgrade, unless a fault could hold its node back or the node that did not
///   erase it may not have heard of it yet (`RELAY_LAG`);
/// - nothing (a join, an API write) is answered 410 before an erase of its
///   paper was asked.
fn check_erases(
    store: &Store,
    erases: &[Erase],
    logs: &[&ClientLog],
    windows: &[Window],
    stopped: Instant,
) -> (Vec<String>, EraseTally) {
    let mut violations = Vec::new();
    let mut tally = EraseTally::default();
    let asked = |paper: usize, at: Instant| erases.iter().any(|e| e.paper == paper && e.asked <= at);
    for log in logs {
        for join in log.joins.iter().filter(|j| j.answer == JoinAnswer::Gone && !asked(j.paper, j.answered)) {
            violations.push(format!(
                "a join of {} on node {} was answered 410 before any erase of it was asked",
                paper_name(join.paper),
                NODE_IDS[join.node]
            ));
        }
        for edit in &log.edits {
            if let (Some("gone"), Some(at)) = (edit.error.as_deref(), edit.refused_at) {
                if !asked(edit.paper, at) {
                    violations
                        .push(format!("{} was refused gone before any erase of its paper was asked", describe(edit)));
                }
            }
        }
    }
    for erase in erases {
        let (p, paper) = (erase.paper, paper_name(erase.paper));
        let Some((done, by)) = erase.done else {
            violations.push(format!("the erase of {paper} was not done within {API_RETRY_FOR:?}: {:?}", erase.answers));
            continue;
        };
        match store.conn().and_then(|mut conn| erase_leftovers(&mut *conn, &paper)) {
            Ok(found) => violations.extend(found.into_iter().map(|(_, f)| format!("erased {paper}: {f}, at the end"))),
            Err(e) => violations.push(format!("erased {paper}: Redis could not be read at the end ({e})")),
        }
        for edit in logs.iter().flat_map(|l| l.edits.iter()).filter(|e| e.paper == p && e.sent > done) {
            tally.sent_after += 1;
            if edit.client == API_CLIENT {
                let answer =
                    edit.error.clone().unwrap_or_else(|| (if edit.saved.is_some() { "200" } else { "nothing" }).into());
                *tally.api_after.entry(answer).or_default() += 1;
            }
            if edit.saved.is_some() {
                violations.push(format!(
                    "{} was saved though sent {:?} after the erase of its paper was answered 204",
                    describe(edit),
                    edit.sent.duration_since(done)
                ));
            }
        }
        for span in logs.iter().flat_map(|l| l.spans.iter()).filter(|s| s.paper == p) {
            if span.ended.as_ref().is_some_and(|(at, _, _)| *at < erase.asked) {
                continue;
            }
            let (at, code, why) = match &span.ended {
                Some((at, code, why)) => (*at, *code, why.as_str()),
                None => (stopped, None, "nothing: still open when the clients stopped"),
            };
            let held_back: Vec<&Window> = windows_over(store, windows, span.node, p, erase.asked, at).collect();
            let deadline = held_back.iter().map(|w| w.to + GRACE).fold(done, Instant::max) + ERASE_CLOSE;
            let session = format!("the session {:x} of {paper} on node {}", span.conn, NODE_IDS[span.node]);
            let after = at.saturating_duration_since(done);
            if code == Some(4410) {
                tally.closed_4410 += 1;
                if at > deadline {
                    violations.push(format!("{session} was closed with 4410 only {after:?} after the erase's 204"));
                }
            } else if span.ended.is_some() && !held_back.is_empty() {
                tally.ended_by_a_fault += 1;
            } else {
                violations.push(format!(
                    "{session} ended with {why} (close code {code:?}), not 4410, {after:?} after the erase's 204, \
                     with no fault on its node, paper or Redis"
                ));
            }
        }
        for join in logs.iter().flat_map(|l| l.joins.iter()).filter(|j| j.paper == p && j.at >= done) {
            if join.answer == JoinAnswer::Gone {
                tally.joins_gone += 1;
                continue;
            }
            let faults = faults_over(store, windows, join.node, p, join.at, join.answered);
            let lag = join.node != by && join.at < done + RELAY_LAG;
            if !faults.is_empty() || lag {
                let got = match &join.answer {
                    JoinAnswer::Refused(e) => e.split(':').next().unwrap_or_default().to_string(),
                    other => format!("{other:?}"),
                };
                let why = if faults.is_empty() { "the relay's lag" } else { "a fault" };
                *tally.joins_excused.entry(format!("{got} ({why})")).or_default() += 1;
                if join.answer == JoinAnswer::Snapshot {
                    tally.snapshots.push(format!(
                        "{paper} on node {}, {:?} after the 204 from node {} (faults {faults:?})",
                        NODE_IDS[join.node],
                        join.at.duration_since(done),
                        NODE_IDS[by]
                    ));
                }
                continue;
            }
            violations.push(format!(
                "a join of {paper} on node {}, {:?} after the erase's 204 (from node {}), got {:?}, not 410",
                NODE_IDS[join.node],
                join.at.duration_since(done),
                NODE_IDS[by],
                join.answer
            ));
        }
    }
    (violations, tally)
}

/// A paper's tombstone horizon in Redis (0 when it has none).
fn horizon_in_redis(store: &Store, paper: &str) -> u64 {
    let mut conn = store.conn().expect("Redis for the final checks");
    let horizon: Option<String> = redis::cmd("HGET").arg(meta_key(paper)).arg("horizon").query(&mut *conn).unwrap();
    horizon.and_then(|h| h.parse().ok()).unwrap_or(0)
}

/// Notes that some client may delete: the shared pool and the hostile client's
/// short-lived ones. A note created once and never touched again, a churned or
/// wide note, or the probe's note, must never be missing from Redis.
fn may_be_deleted(id: &str) -> bool {
    !(id.starts_with("once-") || id.starts_with("churn") || id.starts_with("wide") || id == "probe")
}

/// A version as the write script orders them: `(v, node)`, ties to the greater node id.
type Version = (u64, String);

/// `[v,"node"]` as stored in a note's field versions.
fn stored_version(pair: &Value) -> Option<Version> {
    Some((version_of(&pair[0])?, pair[1].as_str()?.to_string()))
}

/// Whether what Redis holds for a note (`raw`, or nothing; `horizon` read after
/// it) is allowed for an edit its sender saw `saved` at `(v, node)`: saved means
/// Redis applied the edit or holds a later version of the note, or of each field
/// (PROTOCOL.md 3.1). Judged with the versions Redis keeps itself (the note's
/// `v`, the version of its last upsert, each field's version), so that a later
/// edit of one field never passes for a later version of another:
/// - upsert: a later upsert or delete; else this upsert is the note's last
///   (same version), and each of its fields holds its value unless that field
///   changed later, and no other field is there unless added later;
/// - patch: each field it names is at a later version, or at this one with the
///   patch's value (null: absent); or the note is deleted (a delete is weighed
///   against the upsert before the patch, so its version may be lower);
/// - delete: its tombstone or a later one, or a note upserted again later;
/// - any: absent only while the horizon is at or above `v` and the note is one
///   that some client deletes (its tombstone was dropped).
fn judge(
    kind: Kind,
    id: &str,
    data: &Value,
    v: u64,
    node: &str,
    raw: Option<&[u8]>,
    horizon: u64,
) -> Result<(), String> {
    let ours: Version = (v, node.to_string());
    let Some(raw) = raw else {
        if may_be_deleted(id) && horizon >= v {
            return Ok(());
        }
        return Err(format!("lost: Redis does not hold the note (horizon {horizon})"));
    };
    let text = String::from_utf8_lossy(raw);
    let stored: Value = serde_json::from_slice(raw).map_err(|_| format!("Redis holds an unreadable value {text}"))?;
    let Some(stored_v) = version_of(&stored["v"]) else {
        return Err(format!("Redis holds a value without a version {text}"));
    };
    let stored_at: Version = (stored_v, stored["node"].as_str().unwrap_or_default().to_string());
    if stored.get("deleted").is_some() {
        let fine = match kind {
            Kind::Patch | Kind::Complete => true,
            Kind::Upsert => stored_at > ours,
            Kind::Delete => stored_at >= ours,
        };
        return if fine { Ok(()) } else { Err(format!("lost: Redis holds an older tombstone {text}")) };
    }
    let (Some(held), true) = (stored["data"].as_object(), stored["author"].is_string()) else {
        return Err(format!("Redis holds a value that is no note {text}"));
    };
    let fv = &stored["fv"];
    let base = if fv.is_object() {
        stored_version(&fv["base"]).ok_or_else(|| format!("Redis holds unreadable field versions {text}"))?
    } else {
        stored_at.clone()
    };
    let floor = stored_version(&fv["floor"]).filter(|floor| *floor > base);
    // A field's version: its own if it changed after the last upsert; a field
    // absent and not listed was removed at or below the floor, or never set.
    let field_version = |field: &str| -> Version {
        if let Some(changed) = stored_version(&fv["changed"][field]) {
            return changed;
        }
        match (&floor, held.contains_key(field)) {
            (Some(floor), false) => floor.clone(),
            _ => base.clone(),
        }
    };
    match kind {
        Kind::Delete if base > ours => Ok(()),
        Kind::Delete => Err(format!("lost: Redis holds a live note whose last upsert is {base:?}: {text}")),
        Kind::Upsert if base > ours => Ok(()),
        Kind::Upsert if base < ours => Err(format!(
            "lost: the note's last upsert in Redis is the older {base:?}, later versions only of some fields: {text}"
        )),
        Kind::Upsert => {
            for (field, value) in data.as_object().into_iter().flatten() {
                if field_version(field) <= ours && held.get(field) != Some(value) {
                    return Err(format!("lost: its field {field} is not as it left it, nor changed later: {text}"));
                }
            }
            for field in held.keys() {
                if data.get(field).is_none() && field_version(field) <= ours {
                    return Err(format!("lost: Redis holds the field {field} it did not have: {text}"));
                }
            }
            Ok(())
        }
        Kind::Patch => {
            for (field, value) in data.as_object().into_iter().flatten() {
                let at = field_version(field);
                if at < ours {
                    return Err(format!("lost: Redis holds its field {field} at the older {at:?}: {text}"));
                }
                let kept = if value.is_null() { held.get(field).is_none() } else { held.get(field) == Some(value) };
                if at == ours && !kept {
                    return Err(format!("lost: its field {field} is at its version with another value: {text}"));
                }
            }
            Ok(())
        }
        Kind::Complete => Ok(()),
    }
}

/// Every sealed paper has one stream entry whose notes are the hash's live notes
/// (on a Cluster at least one, PROTOCOL.md 6, and no hand-off left pending once
/// the nodes stopped), and every `completed` a client received carried those
/// notes. Also returns how many entries repeat an earlier one.
fn check_sealed(store: &Store, logs: &[&ClientLog]) -> (Vec<String>, usize) {
    let mut violations = Vec::new();
    let mut repeated = 0;
    let entries = stream_entries(store);
    for p in 0..PAPERS {
        let paper = paper_name(p);
        let (sealed, pending) = seal_in_redis(store, &paper);
        if pending {
            violations.push(format!("{paper}: its stream entry is still pending after both nodes stopped"));
        }
        let found = entries.get(&paper).map_or(&[][..], Vec::as_slice);
        let received: Vec<&Option<Notes>> =
            logs.iter().flat_map(|l| l.completed.iter()).filter(|(q, _)| *q == p).map(|(_, n)| n).collect();
        if !sealed {
            if !found.is_empty() || !received.is_empty() {
                violations.push(format!(
                    "{paper} is not sealed in Redis, yet has {} stream entries and {} completed messages",
                    found.len(),
                    received.len()
                ));
            }
            continue;
        }
        repeated += found.len().saturating_sub(1);
        if found.is_empty() || (found.len() > 1 && !store.is_cluster()) {
            violations.push(format!("{paper} is sealed with {} stream entries", found.len()));
        }
        let live = live_in_redis(store, &paper);
        for entry in found {
            match notes_of(&entry["notes"]) {
                Some(notes) if notes == live => {}
                Some(notes) => {
                    violations.push(format!("{paper}: the stream entry differs from the hash: {}", diff(&notes, &live)))
                }
                None => violations.push(format!("{paper}: a stream entry without notes: {entry}")),
            }
        }
        for notes in received {
            match notes {
                Some(notes) if *notes == live => {}
                Some(notes) => {
                    violations.push(format!("{paper}: completed differs from the hash: {}", diff(notes, &live)))
                }
                None => violations.push(format!("{paper}: completed without notes")),
            }
        }
    }
    (violations, repeated)
}

/// The judgement of a saved edit, on made-up stored values: what a lost write
/// leaves must fail it, what later edits leave must pass.
#[test]
fn saved_edits_are_judged_by_the_versions_redis_keeps() {
    let upsert = json!({"text": "hi", "x": 1});
    let judge_upsert = |raw: &str, horizon| judge(Kind::Upsert, "n1", &upsert, 10, "a", Some(raw.as_bytes()), horizon);
    assert!(judge_upsert(r#"{"author":"u","data":{"text":"hi","x":1},"node":"a","v":10}"#, 0).is_ok());
    assert!(judge_upsert(r#"{"author":"u","data":{"other":1},"node":"a","v":12}"#, 0).is_ok(), "a later upsert");
    assert!(judge_upsert(r#"{"author":"u","data":{"other":1},"node":"b","v":10}"#, 0).is_ok(), "a tie to b");
    assert!(judge_upsert(r#"{"deleted":true,"node":"a","v":11}"#, 0).is_ok(), "a later delete");
    assert!(judge_upsert(r#"{"author":"u","data":{"text":"old"},"node":"a","v":9}"#, 0).is_err(), "older");
    assert!(judge_upsert(r#"{"author":"u","data":{"text":"other","x":1},"node":"a","v":10}"#, 0).is_err());
    assert!(judge_upsert(r#"{"deleted":true,"node":"a","v":9}"#, 0).is_err(), "an older tombstone");
    // Superseded only by a patch of x: the upsert before it is what Redis holds.
    let patched_only = r#"{"author":"u","data":{"text":"old","x":5},"fv":{"base":[8,"a"],"changed":{"x":[12,"b"]}},"node":"b","v":12}"#;
    assert!(judge_upsert(patched_only, 0).is_err(), "the upsert's other fields were lost");
    let kept = r#"{"author":"u","data":{"text":"hi","x":5},"fv":{"base":[10,"a"],"changed":{"x":[12,"b"]}},"node":"b","v":12}"#;
    assert!(judge_upsert(kept, 0).is_ok(), "x changed later, text kept");
    let extra = r#"{"author":"u","data":{"text":"hi","x":1,"y":2},"node":"a","v":10}"#;
    assert!(judge_upsert(extra, 0).is_err(), "a field the upsert did not have");
    // Absent: only past the horizon, and only for a note some client deletes.
    assert!(judge(Kind::Upsert, "n1", &upsert, 10, "a", None, 10).is_ok());
    assert!(judge(Kind::Upsert, "n1", &upsert, 10, "a", None, 9).is_err());
    assert!(judge(Kind::Upsert, "once-c1-7", &upsert, 10, "a", None, 50).is_err());

    let patch = json!({"x": 7, "gone": null});
    let judge_patch = |raw: &str| judge(Kind::Patch, "n1", &patch, 20, "a", Some(raw.as_bytes()), 0);
    assert!(judge_patch(r#"{"author":"u","data":{"x":7},"fv":{"base":[5,"a"],"changed":{"gone":[20,"a"],"x":[20,"a"]}},"node":"a","v":20}"#).is_ok());
    assert!(
        judge_patch(
            r#"{"author":"u","data":{"x":3},"fv":{"base":[5,"a"],"changed":{"x":[19,"a"]}},"node":"a","v":19}"#
        )
        .is_err(),
        "x older"
    );
    assert!(
        judge_patch(r#"{"author":"u","data":{"x":3},"fv":{"base":[21,"a"],"changed":{}},"node":"a","v":21}"#).is_ok(),
        "a later upsert"
    );
    assert!(judge_patch(r#"{"author":"u","data":{"x":7,"gone":1},"fv":{"base":[5,"a"],"changed":{"gone":[20,"a"],"x":[20,"a"]}},"node":"a","v":20}"#).is_err(), "a removed field back");
    // A removed field folded into the floor: absent, at or above the patch.
    assert!(judge_patch(r#"{"author":"u","data":{"x":7},"fv":{"base":[5,"a"],"changed":{"x":[20,"a"]},"floor":[20,"a"]},"node":"a","v":20}"#).is_ok());
    assert!(judge_patch(r#"{"deleted":true,"node":"b","v":15}"#).is_ok(), "a delete weighed against the upsert");

    let judge_delete =
        |raw: Option<&str>, horizon| judge(Kind::Delete, "n1", &Value::Null, 30, "b", raw.map(str::as_bytes), horizon);
    assert!(judge_delete(Some(r#"{"deleted":true,"node":"b","v":30}"#), 0).is_ok());
    assert!(judge_delete(Some(r#"{"author":"u","data":{},"node":"a","v":31}"#), 0).is_ok(), "upserted again");
    assert!(judge_delete(
        Some(r#"{"author":"u","data":{},"fv":{"base":[29,"a"],"changed":{"x":[31,"a"]}},"node":"a","v":31}"#),
        0
    )
    .is_err());
    assert!(judge_delete(None, 30).is_ok());
    assert!(judge_delete(None, 29).is_err());
}
