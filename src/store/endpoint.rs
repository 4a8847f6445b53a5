//! Connections to Redis, made by each store thread from its `Target`: to one
//! server, to the master a Sentinel names at every (re)connection (so that a
//! failover is followed by itself), or to a Redis Cluster (the cluster client,
//! or a plain connection to one of its nodes). Every connection has timeouts,
//! so that a hung Redis stalls no thread for longer than `IO_TIMEOUT`.

use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterConnection};
use redis::sentinel::SentinelClient;
use redis::{Cmd, Connection, ConnectionLike, ErrorKind, RedisError, RedisResult, Value};

use super::slots::SlotMap;

/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one Redis call may take before the connection counts as broken.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

pub enum Endpoint {
    Server(redis::Client),
    Sentinel(SentinelClient),
    /// The cluster client, and a client for each seed node (for `CLUSTER SHARDS`).
    Cluster {
        client: ClusterClient,
        nodes: Vec<redis::Client>,
    },
}

impl Endpoint {
    /// A connection to the master, with timeouts, so that a hung Redis cannot stall
    /// the calling thread for longer than `IO_TIMEOUT`.
    ///
    /// # Errors
    /// Redis (or every sentinel) cannot be reached.
    pub fn connect(&mut self) -> redis::RedisResult<RedisConn> {
        let client = match self {
            Endpoint::Server(client) => client.clone(),
            Endpoint::Sentinel(sentinel) => sentinel.get_client()?,
            Endpoint::Cluster { client, .. } => {
                let conn = client.get_connection()?;
                conn.set_read_timeout(Some(IO_TIMEOUT))?;
                conn.set_write_timeout(Some(IO_TIMEOUT))?;
                return Ok(RedisConn::Cluster(Box::new(conn)));
            }
        };
        Ok(RedisConn::Single(open(&client)?))
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Endpoint::Cluster { .. })
    }

    /// How to reach any node of a Cluster: the first seed node's settings (TLS,
    /// password), to be pointed at another address with [`connect_node`].
    pub fn seed(&self) -> Option<redis::ConnectionInfo> {
        match self {
            Endpoint::Cluster { nodes, .. } => nodes.first().map(|n| n.get_connection_info().clone()),
            _ => None,
        }
    }

    /// A plain connection to a Cluster node, with timeouts.
    ///
    /// # Errors
    /// The node cannot be reached.
    pub fn connect_node(&self, addr: &str) -> redis::RedisResult<Connection> {
        let seed = self.seed().ok_or_else(|| RedisError::from((ErrorKind::InvalidClientConfig, "not a cluster")))?;
        connect_node(&seed, addr)
    }

    /// The slot map of a Cluster, asked of the first seed node that answers.
    ///
    /// # Errors
    /// No seed node answers.
    pub fn slot_map(&self) -> redis::RedisResult<SlotMap> {
        let Endpoint::Cluster { nodes, .. } = self else { return Ok(SlotMap::default()) };
        let mut last = RedisError::from((ErrorKind::Io, "no cluster node"));
        for node in nodes {
            match open(node).and_then(|mut c| SlotMap::read(&mut c)) {
                Ok(map) => return Ok(map),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// A plain connection to the node at `addr` ("host:port"), set up as `seed` is.
///
/// # Errors
/// The node cannot be reached.
pub fn connect_node(seed: &redis::ConnectionInfo, addr: &str) -> redis::RedisResult<Connection> {
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "6379"));
    let port: u16 = port.parse().map_err(|_| RedisError::from((ErrorKind::Parse, "bad node port")))?;
    let node = match seed.addr() {
        redis::ConnectionAddr::TcpTls { insecure, tls_params, .. } => redis::ConnectionAddr::TcpTls {
            host: host.to_string(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => redis::ConnectionAddr::Tcp(host.to_string(), port),
    };
    open(&redis::Client::open(seed.clone().set_addr(node))?)
}

fn open(client: &redis::Client) -> redis::RedisResult<Connection> {
    let conn = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(conn)
}

/// Sends a pipeline and reads one reply per command (error replies as `Err`
/// items), giving up at the first reply that does not come. redis-rs's own
/// pipeline read waits for every reply in turn, each up to `IO_TIMEOUT`, so a
/// link that stopped answering (half open) would hold the caller for as many
/// timeouts as the pipeline has commands.
///
/// # Errors
/// The connection failed or timed out: it must not be used again.
pub fn query_pipeline(conn: &mut Connection, pipe: &redis::Pipeline) -> RedisResult<Vec<RedisResult<redis::Value>>> {
    conn.send_packed_command(&pipe.get_packed_pipeline())?;
    let mut replies = Vec::with_capacity(pipe.len());
    for _ in 0..pipe.len() {
        match conn.recv_response()? {
            redis::Value::ServerError(e) => replies.push(Err(e.into())),
            value => replies.push(Ok(value)),
        }
    }
    Ok(replies)
}

/// A connection to a single server (or Sentinel-named master), or to a Cluster.
pub enum RedisConn {
    Single(Connection),
    Cluster(Box<ClusterConnection>),
}

impl RedisConn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }

    /// Runs commands that may name keys of different slots: one pipeline on a
    /// single server, one command after another on a Cluster.
    ///
    /// # Errors
    /// The first command that failed.
    pub fn run_each(&mut self, cmds: &[Cmd]) -> RedisResult<()> {
        match self {
            RedisConn::Single(conn) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd.clone()).ignore();
                }
                pipe.query::<()>(conn)
            }
            RedisConn::Cluster(conn) => cmds.iter().try_for_each(|cmd| cmd.query::<()>(conn)),
        }
    }

    /// The plain connection, for pub/sub on a single server.
    pub fn single(&mut self) -> Option<&mut Connection> {
        match self {
            RedisConn::Single(conn) => Some(conn),
            RedisConn::Cluster(_) => None,
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands(&mut self, cmd: &[u8], offset: usize, count: usize) -> RedisResult<Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn req_command(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            RedisConn::Single(c) => c.req_command(cmd),
            RedisConn::Cluster(c) => c.req_command(cmd),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }

    fn check_connection(&mut self) -> bool {
        match self {
            RedisConn::Single(c) => c.check_connection(),
            RedisConn::Cluster(c) => c.check_connection(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            RedisConn::Single(c) => c.is_open(),
            RedisConn::Cluster(c) => c.is_open(),
        }
    }
}
