//! A Redis Cluster of real `redis-server` processes on free loopback ports, each
//! with its own directory, for the Cluster tests and the chaos checker: started,
//! killed with SIGKILL, and started again from its append-only file and its
//! cluster config file, so that it rejoins as the same node.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use super::{eventually, free_port, TempDir};

/// One `redis-server --cluster-enabled yes` on a free port with its own directory.
pub struct ClusterNode {
    pub port: u16,
    /// Kept across restarts: the other nodes know it by its bus port.
    bus_port: u16,
    dir: TempDir,
    extra: Vec<String>,
    child: Option<Child>,
}

impl ClusterNode {
    /// Starts a node with more `redis-server` arguments (`--appendfsync always`).
    pub fn start(extra: &[&str]) -> ClusterNode {
        let mut node = ClusterNode {
            port: free_port(),
            // The bus port defaults to port + 10000, which may be taken or past 65535.
            bus_port: free_port(),
            dir: TempDir::new("cluster-node"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--dir", self.dir.0.to_str().unwrap()])
            // nodes.conf stays in the directory: a node started again rejoins as itself.
            .args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
            .args(["--cluster-port", &self.bus_port.to_string()])
            .args(["--cluster-node-timeout", "1000", "--appendonly", "yes", "--save", "", "--protected-mode", "no"])
            // An idle replica hears from its master every 10 s only; with a short
            // node timeout it would count its data as too old to fail over.
            .args(["--cluster-replica-validity-factor", "0"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        self.child = Some(child);
        // While it loads its append-only file, it answers LOADING.
        eventually("a cluster node to answer PING", || {
            let mut conn = self.conn().ok()?;
            redis::cmd("PING").query::<String>(&mut conn).ok()
        });
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process runs (it was not killed, or was started again).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// A plain connection to this node, with timeouts (a paused node must not hang the caller).
    pub fn conn(&self) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port))?;
        let conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(conn)
    }

    /// `INFO section` (`replication`, `server`), empty if the node does not answer.
    pub fn info(&self, section: &str) -> String {
        self.conn().and_then(|mut c| redis::cmd("INFO").arg(section).query(&mut c)).unwrap_or_default()
    }

    /// `CLUSTER INFO`, empty if the node does not answer.
    pub fn cluster_info(&self) -> String {
        self.conn().and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query(&mut c)).unwrap_or_default()
    }

    /// SIGKILL: what it had not written to its append-only file is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports with the same directory: it reloads its
    /// append-only file and rejoins the cluster from its nodes.conf.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A three-master Redis Cluster on loopback, with replicas if asked.
pub struct RedisCluster {
    pub nodes: Vec<ClusterNode>,
}

impl RedisCluster {
    /// Three masters with `replicas` replicas each.
    pub fn start(replicas: usize) -> RedisCluster {
        RedisCluster::start_with(replicas, &[])
    }

    /// Three masters with `replicas` replicas each, every node started with `extra`.
    pub fn start_with(replicas: usize, extra: &[&str]) -> RedisCluster {
        let nodes: Vec<ClusterNode> = (0..3 * (1 + replicas)).map(|_| ClusterNode::start(extra)).collect();
        RedisCluster::create(nodes, replicas)
    }

    /// Joins nodes started apart (three masters, `replicas` replicas each) into a
    /// cluster, over their plain ports.
    pub fn create(nodes: Vec<ClusterNode>, replicas: usize) -> RedisCluster {
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli must be installed (redis-tools)");
        assert!(out.status.success(), "cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let cluster = RedisCluster { nodes };
        cluster.wait_ok();
        if replicas > 0 {
            let in_sync = format!("connected_slaves:{replicas}");
            eventually("every master to have its replicas in sync", || {
                cluster.masters().iter().all(|m| m.info("replication").contains(&in_sync)).then_some(())
            });
        }
        cluster
    }

    /// Waits (bounded) until every running node says `cluster_state:ok`.
    pub fn wait_ok(&self) {
        eventually("CLUSTER INFO to say ok on every live node", || {
            self.nodes
                .iter()
                .filter(|n| n.is_running())
                .all(|n| n.cluster_info().contains("cluster_state:ok"))
                .then_some(())
        });
    }

    /// The `--redis` value for the server: every node as a seed.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    pub fn masters(&self) -> Vec<&ClusterNode> {
        self.nodes.iter().filter(|n| n.is_running() && n.info("replication").contains("role:master")).collect()
    }

    /// A connection that follows the slot map, as a client of the cluster.
    pub fn try_client(&self) -> redis::RedisResult<redis::cluster::ClusterConnection> {
        let urls: Vec<String> =
            self.nodes.iter().filter(|n| n.is_running()).map(|n| format!("redis://127.0.0.1:{}", n.port)).collect();
        redis::cluster::ClusterClient::builder(urls)
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(5))
            .build()?
            .get_connection()
    }

    pub fn client(&self) -> redis::cluster::ClusterConnection {
        self.try_client().unwrap()
    }

    pub fn hgetall(&self, key: &str) -> Vec<(String, String)> {
        redis::cmd("HGETALL").arg(key).query(&mut self.client()).unwrap()
    }

    /// The index in `nodes` of the master that owns a key's slot.
    pub fn master_of(&self, key: &str) -> usize {
        let mut conn = self.nodes.iter().find(|n| n.is_running()).unwrap().conn().unwrap();
        let slot: i64 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query(&mut conn).unwrap();
        let slots: Value = redis::cmd("CLUSTER").arg("SLOTS").query(&mut conn).map(to_json).unwrap();
        let port = slots
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r[0].as_i64().unwrap() <= slot && slot <= r[1].as_i64().unwrap())
            .map(|r| r[2][1].as_i64().unwrap() as u16)
            .unwrap();
        self.nodes.iter().position(|n| n.port == port).unwrap()
    }
}

/// A Redis reply as JSON, to pick it apart by index.
pub fn to_json(value: redis::Value) -> Value {
    match value {
        redis::Value::Array(items) => Value::Array(items.into_iter().map(to_json).collect()),
        redis::Value::Int(n) => json!(n),
        redis::Value::BulkString(b) => json!(String::from_utf8_lossy(&b)),
        other => json!(format!("{other:?}")),
    }
}
