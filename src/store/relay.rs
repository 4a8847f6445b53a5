//! The relay thread (`--cluster`, PROTOCOL.md 6): a subscriber connection to
//! Redis (on a Redis Cluster, one per master that owns a paper held here, with
//! sharded pub/sub), subscribed to the channels of exactly the papers this node
//! holds, plus `rp:nodes`. Changes published by other nodes go to the loop that owns their
//! paper; nodes that stop announcing themselves are reported gone; this node's own
//! announcement coming back is the canary that proves the subscription works.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use redis::{Connection, Value};

use super::endpoint::{connect_node, Endpoint, RedisConn, IO_TIMEOUT};
use super::slots::SlotMap;
use super::{keys, LoadPurpose, LoadRequest, Loops, StoreEvent};
use crate::metrics::{bump, WriterMetrics};

/// How long a wait for a message lasts before commands from the loops are looked at.
const POLL: Duration = Duration::from_millis(20);
/// How often a node says it is alive; `NODE_TTL` later without it, it counts as gone.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
pub const NODE_TTL: Duration = Duration::from_secs(8);

pub enum RelayCmd {
    /// Subscribe to the paper's channel, then have it read.
    Subscribe(LoadRequest),
    Unsubscribe(Arc<str>),
    /// Have the paper read for one request, without subscribing.
    Read(LoadRequest),
}

/// Nodes remembered as declared gone, to notice one coming back; past it the
/// oldest memory is dropped (a node back after that long is not mended).
const MAX_GONE_REMEMBERED: usize = 1024;
/// How long the papers held are tried to be read again after the subscription
/// came back.
const MERGE_PATIENCE: Duration = Duration::from_secs(30);

pub struct Relay {
    endpoint: Endpoint,
    node: String,
    commands: Receiver<RelayCmd>,
    loads: Sender<LoadRequest>,
    loops: Arc<dyn Loops>,
    /// Papers subscribed to (again after a reconnection).
    papers: HashSet<Arc<str>>,
    /// Other nodes, when last heard.
    nodes: HashMap<String, Instant>,
    /// When this node last heard itself.
    heard_self: Option<Instant>,
    /// `/readyz` reads it: the canary came back in time.
    healthy: Arc<AtomicBool>,
    /// A plain connection for the heartbeat: announced from this thread, not the
    /// writer's, so that a writer retrying a batch does not make the node look dead.
    announcer: Option<RedisConn>,
    next_heartbeat: Instant,
    /// Subscriptions made so far; after the first, a reconnection re-reads the papers.
    sessions: u64,
    /// Nodes this one declared gone (their members left): hearing one again means
    /// it may have dropped this node's members too.
    declared_gone: HashSet<String>,
    /// How long a presence hash lives unless a node holding the paper refreshes it.
    presence_ttl: Duration,
    /// Where messages received from other nodes are counted.
    metrics: Arc<WriterMetrics>,
}

impl Relay {
    pub fn new(
        endpoint: Endpoint,
        node: &str,
        commands: Receiver<RelayCmd>,
        loads: Sender<LoadRequest>,
        loops: Arc<dyn Loops>,
        healthy: Arc<AtomicBool>,
    ) -> Self {
        Relay {
            endpoint,
            node: node.to_string(),
            commands,
            loads,
            loops,
            papers: HashSet::new(),
            nodes: HashMap::new(),
            heard_self: None,
            healthy,
            announcer: None,
            next_heartbeat: Instant::now(),
            sessions: 0,
            declared_gone: HashSet::new(),
            presence_ttl: Duration::from_secs(60),
            metrics: Arc::default(),
        }
    }

    /// Counts the messages received from other nodes in these metrics.
    pub fn counting_in(mut self, metrics: Arc<WriterMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Presence hashes of the papers held are refreshed to live this long.
    pub fn with_presence_ttl(mut self, ttl: Duration) -> Self {
        self.presence_ttl = ttl;
        self
    }

    /// Says this node is alive: on `rp:nodes` (the others' liveness check and this
    /// node's canary) and in `rp:node:{id}` (for nodes loading a paper later).
    fn heartbeat(&mut self) {
        if Instant::now() < self.next_heartbeat {
            return;
        }
        self.next_heartbeat = Instant::now() + HEARTBEAT_EVERY;
        if self.announcer.is_none() {
            self.announcer = self.endpoint.connect().ok();
        }
        let Some(conn) = &mut self.announcer else { return };
        let mut cmds = Vec::with_capacity(self.papers.len() + 2);
        // The presence hashes of the papers held live while this node does; a
        // paper nobody holds any more has its hash expire (`--presence-ttl`).
        for paper in &self.papers {
            let mut cmd = redis::cmd("PEXPIRE");
            cmd.arg(keys::members(paper)).arg(self.presence_ttl.as_millis() as u64);
            cmds.push(cmd);
        }
        let mut alive = redis::cmd("SET");
        alive.arg(keys::node_alive(&self.node)).arg(1).arg("PX").arg(NODE_TTL.as_millis() as u64);
        cmds.push(alive);
        // On a Cluster, sharded: `rp:nodes` lives on one shard, where every node hears it.
        let mut announce = redis::cmd(if conn.is_cluster() { "SPUBLISH" } else { "PUBLISH" });
        announce.arg(keys::NODES_CHANNEL).arg(&self.node);
        cmds.push(announce);
        let result = conn.run_each(&cmds);
        if result.is_err() {
            self.announcer = None;
        }
    }

    /// Runs until every loop has stopped.
    pub fn run(mut self) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let subscriber = if self.endpoint.is_cluster() {
                ShardedSubscriber::new(&self.endpoint).map(|shards| Subscriber::Sharded(Box::new(shards)))
            } else {
                self.endpoint.connect().map(|conn| match conn {
                    RedisConn::Single(conn) => Subscriber::Plain(conn),
                    RedisConn::Cluster(_) => unreachable!("not a cluster endpoint"),
                })
            };
            match subscriber {
                Ok(mut subscriber) => {
                    match self.serve(&mut subscriber) {
                        Ok(()) => return,
                        Err(e) => log::warn!("relay subscription lost ({e}); subscribing again"),
                    }
                    backoff = Duration::from_millis(50);
                }
                Err(e) => log::warn!("relay cannot reach Redis: {e}"),
            }
            self.healthy.store(false, Ordering::Relaxed);
            self.heartbeat();
            // While Redis is away, loads still have to fail in time: hand them on.
            if !self.forward_commands_for(backoff) {
                return;
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Without a subscription, waits `pause` taking commands (loads are passed to
    /// the loader, which fails them by their deadline); false once the loops are gone.
    fn forward_commands_for(&mut self, pause: Duration) -> bool {
        let until = Instant::now() + pause;
        loop {
            match self.commands.recv_deadline(until) {
                Ok(RelayCmd::Subscribe(load)) => {
                    self.papers.insert(load.paper.clone());
                    let _ = self.loads.send(load);
                }
                Ok(RelayCmd::Unsubscribe(paper)) => {
                    self.papers.remove(&paper);
                }
                Ok(RelayCmd::Read(load)) => {
                    let _ = self.loads.send(load);
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => return true,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    fn serve(&mut self, subscriber: &mut Subscriber) -> redis::RedisResult<()> {
        let mut pubsub = subscriber.start()?;
        pubsub.subscribe(keys::NODES_CHANNEL)?;
        for paper in &self.papers {
            pubsub.subscribe(keys::channel(paper))?;
        }
        self.sessions += 1;
        if self.sessions > 1 {
            // Whatever was published while the subscription was down is in Redis:
            // every paper held is read again and merged (PROTOCOL.md 2: by version).
            // Tried until MERGE_PATIENCE: the loader's connection may have gone
            // with the subscription's (a half-open link costs a read its I/O
            // timeout), and a paper not read again would miss those changes for
            // good. A longer outage ends this subscription too, and the next one
            // reads everything again.
            for paper in &self.papers {
                let owner = self.loops.owner_of(paper);
                let deadline = Instant::now() + MERGE_PATIENCE;
                let request =
                    LoadRequest { paper: paper.clone(), purpose: LoadPurpose::Merge, loop_index: owner, deadline };
                let _ = self.loads.send(request);
            }
            // Others may have declared this node gone meanwhile, and dropped its members.
            self.report_all(&StoreEvent::Reannounce);
        }
        let connected = Instant::now();
        self.heard_self = None;
        loop {
            loop {
                match self.commands.try_recv() {
                    Ok(RelayCmd::Subscribe(load)) => {
                        // Subscribed (confirmed) before the read: nothing falls between. On
                        // failure the read still goes ahead (its joiners would otherwise wait
                        // in vain), and the reconnection re-reads the paper.
                        self.papers.insert(load.paper.clone());
                        let subscribed = pubsub.subscribe(keys::channel(&load.paper));
                        let _ = self.loads.send(load);
                        subscribed?;
                    }
                    Ok(RelayCmd::Unsubscribe(paper)) => {
                        self.papers.remove(&paper);
                        pubsub.unsubscribe(keys::channel(&paper))?;
                    }
                    Ok(RelayCmd::Read(load)) => {
                        let _ = self.loads.send(load);
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            self.heartbeat();
            if let Some((channel, payload)) = pubsub.next_message(POLL)? {
                self.dispatch(&channel, &payload);
            }
            self.check_nodes(connected)?;
        }
    }

    fn dispatch(&mut self, channel: &str, payload: &[u8]) {
        let Ok(payload) = std::str::from_utf8(payload) else { return };
        if channel == keys::NODES_CHANNEL {
            if payload == self.node {
                self.heard_self = Some(Instant::now());
                self.healthy.store(true, Ordering::Relaxed);
            } else {
                self.heard(payload);
            }
            return;
        }
        let Some(paper) = keys::paper_of_channel(channel) else { return };
        let Some((node, message)) = payload.split_once('\n') else { return };
        if node == self.node {
            return; // our own publication: its members have it already
        }
        self.heard(node);
        bump(&self.metrics.relayed_in, 1);
        let event =
            StoreEvent::Relayed { paper: Arc::from(paper), node: Arc::from(node), message: message.to_string() };
        self.loops.report(self.loops.owner_of(paper), event);
    }

    /// Notes that a node is alive. One declared gone and heard again has likely
    /// declared this one gone too (a partition, a pause): this node's members are
    /// announced again so that it sees them.
    fn heard(&mut self, node: &str) {
        if self.nodes.insert(node.to_string(), Instant::now()).is_none() && self.declared_gone.remove(node) {
            log::info!("node {node} is back: announcing this node's members again");
            self.report_all(&StoreEvent::Reannounce);
        }
    }

    fn report_all(&self, event: &StoreEvent) {
        for index in 0..self.loops.count() {
            let event = match event {
                StoreEvent::NodeGone(node) => StoreEvent::NodeGone(node.clone()),
                _ => StoreEvent::Reannounce,
            };
            self.loops.report(index, event);
        }
    }

    /// Removes a gone node's entries from the presence hashes of the papers held
    /// here: nobody else would, and the hashes live as long as a node holds them.
    fn forget_presence_of(&mut self, node: &str) {
        let Some(conn) = &mut self.announcer else { return };
        let papers: Vec<&Arc<str>> = self.papers.iter().collect();
        let hashes: redis::RedisResult<Vec<Vec<(String, String)>>> = if conn.is_cluster() {
            // Papers live on different shards: one read each.
            papers.iter().map(|paper| redis::cmd("HGETALL").arg(keys::members(paper)).query(conn)).collect()
        } else {
            let mut read = redis::pipe();
            for paper in &papers {
                read.cmd("HGETALL").arg(keys::members(paper));
            }
            read.query(conn)
        };
        let Ok(hashes) = hashes else {
            self.announcer = None;
            return;
        };
        let mut remove = Vec::new();
        for (paper, entries) in papers.iter().zip(hashes) {
            for (member, entry) in entries {
                let of_node = serde_json::from_str::<serde_json::Value>(&entry)
                    .is_ok_and(|e| e.get("node").and_then(|n| n.as_str()) == Some(node));
                if of_node {
                    let mut cmd = redis::cmd("HDEL");
                    cmd.arg(keys::members(paper)).arg(member);
                    remove.push(cmd);
                }
            }
        }
        if conn.run_each(&remove).is_err() {
            self.announcer = None;
        }
    }

    /// Reports nodes not heard for `NODE_TTL` as gone, and fails the canary (which
    /// rebuilds the subscription) when this node has not heard itself.
    fn check_nodes(&mut self, connected: Instant) -> redis::RedisResult<()> {
        let now = Instant::now();
        let gone: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, seen)| now.duration_since(**seen) > NODE_TTL)
            .map(|(n, _)| n.clone())
            .collect();
        for node in gone {
            self.nodes.remove(&node);
            log::info!("node {node} is gone: its members leave");
            self.forget_presence_of(&node);
            if self.declared_gone.len() >= MAX_GONE_REMEMBERED {
                self.declared_gone.clear();
            }
            self.declared_gone.insert(node.clone());
            self.report_all(&StoreEvent::NodeGone(Arc::from(node)));
        }
        let last = self.heard_self.unwrap_or(connected);
        if now.duration_since(last) > HEARTBEAT_EVERY * 3 {
            self.healthy.store(false, Ordering::Relaxed);
            return Err(redis::RedisError::from((redis::ErrorKind::Io, "the relay canary did not come back")));
        }
        Ok(())
    }
}

/// What the relay listens with: one connection in pub/sub mode on a single
/// server, or on a Redis Cluster one per master that owns a paper held here
/// (sharded pub/sub: a channel is heard only on the master of its slot).
enum Subscriber {
    Plain(Connection),
    Sharded(Box<ShardedSubscriber>),
}

/// A subscription being served: the plain one borrows its connection.
enum Listening<'a> {
    Plain(redis::PubSub<'a>),
    Sharded(&'a mut ShardedSubscriber),
}

impl Subscriber {
    fn start(&mut self) -> redis::RedisResult<Listening<'_>> {
        Ok(match self {
            Subscriber::Plain(conn) => {
                let pubsub = conn.as_pubsub();
                // Replies to (un)subscribing may take a while; only the wait for messages is short.
                pubsub.set_read_timeout(Some(IO_TIMEOUT))?;
                Listening::Plain(pubsub)
            }
            Subscriber::Sharded(shards) => Listening::Sharded(shards),
        })
    }
}

impl Listening<'_> {
    fn subscribe(&mut self, channel: impl AsRef<str>) -> redis::RedisResult<()> {
        match self {
            Listening::Plain(pubsub) => pubsub.subscribe(channel.as_ref()),
            Listening::Sharded(shards) => shards.subscribe(channel.as_ref()),
        }
    }

    fn unsubscribe(&mut self, channel: impl AsRef<str>) -> redis::RedisResult<()> {
        match self {
            Listening::Plain(pubsub) => pubsub.unsubscribe(channel.as_ref()),
            Listening::Sharded(shards) => shards.unsubscribe(channel.as_ref()),
        }
    }

    /// The next message within about `wait`, as (channel, payload).
    fn next_message(&mut self, wait: Duration) -> redis::RedisResult<Option<(String, Vec<u8>)>> {
        match self {
            Listening::Plain(pubsub) => {
                pubsub.set_read_timeout(Some(wait))?;
                let message = pubsub.get_message();
                pubsub.set_read_timeout(Some(IO_TIMEOUT))?;
                match message {
                    Ok(msg) => Ok(Some((msg.get_channel_name().to_string(), msg.get_payload_bytes().to_vec()))),
                    Err(e) if e.is_timeout() => Ok(None),
                    Err(e) => Err(e),
                }
            }
            Listening::Sharded(shards) => shards.next_message(wait),
        }
    }
}

/// Sharded pub/sub on a Redis Cluster: `SSUBSCRIBE` on the master of each
/// channel's slot. A slot that moves (resharding, failover) ends the
/// subscription: the relay subscribes anew on the new map and re-reads its papers.
struct ShardedSubscriber {
    /// How to reach a node (TLS, password).
    seed: redis::ConnectionInfo,
    /// Which master serves which slots.
    masters: SlotMap,
    /// Each master's subscriber, and whether a `PING` awaits its `pong`.
    conns: Vec<(String, Connection, bool)>,
    /// Channel -> index in `conns`.
    channels: HashMap<String, usize>,
    /// Messages read while waiting for a subscription's confirmation.
    early: VecDeque<(String, Vec<u8>)>,
    next: usize,
}

impl ShardedSubscriber {
    fn new(endpoint: &Endpoint) -> redis::RedisResult<ShardedSubscriber> {
        let masters = endpoint.slot_map()?;
        if masters.is_empty() {
            return Err(redis::RedisError::from((redis::ErrorKind::Io, "the cluster has no slots assigned yet")));
        }
        let seed = endpoint.seed().expect("a cluster endpoint");
        Ok(ShardedSubscriber {
            seed,
            masters,
            conns: Vec::new(),
            channels: HashMap::new(),
            early: VecDeque::new(),
            next: 0,
        })
    }

    fn subscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        let addr = self
            .masters
            .master_of(channel)
            .map(str::to_string)
            .ok_or_else(|| redis::RedisError::from((redis::ErrorKind::Io, "a slot without a master")))?;
        let index = match self.conns.iter().position(|(a, ..)| *a == addr) {
            Some(index) => index,
            None => {
                let mut conn = connect_node(&self.seed, &addr)?;
                redis::cmd("CLIENT").arg("SETNAME").arg("rp-relay").exec(&mut conn)?;
                self.conns.push((addr, conn, false));
                self.conns.len() - 1
            }
        };
        let (_, conn, pinged) = &mut self.conns[index];
        conn.send_packed_command(&redis::cmd("SSUBSCRIBE").arg(channel).get_packed_command())?;
        // Confirmed before the paper is read, so that nothing falls between.
        loop {
            match conn.recv_response()? {
                Value::Array(parts) => match kind_of(&parts).as_deref() {
                    Some("ssubscribe") if channel_of(&parts).as_deref() == Some(channel) => break,
                    Some("smessage") => self.early.extend(message_of(parts)),
                    Some("pong") => *pinged = false,
                    // Another channel of this shard moved away meanwhile.
                    Some("sunsubscribe") => {
                        if let Some(e) = moved_away(&parts, &self.channels) {
                            return Err(e);
                        }
                    }
                    _ => {}
                },
                Value::ServerError(e) => return Err(e.into()),
                _ => {}
            }
        }
        self.channels.insert(channel.to_string(), index);
        Ok(())
    }

    fn unsubscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        let Some(index) = self.channels.remove(channel) else { return Ok(()) };
        // The confirmation is skipped when it arrives.
        self.conns[index].1.send_packed_command(&redis::cmd("SUNSUBSCRIBE").arg(channel).get_packed_command())
    }

    /// The next message, else `None` after `wait`. A read never times out here
    /// (the client would then skip the next reply): each shard is sent a `PING`
    /// and read up to its `pong`, so that what came before it is all there is.
    fn next_message(&mut self, wait: Duration) -> redis::RedisResult<Option<(String, Vec<u8>)>> {
        if let Some(message) = self.early.pop_front() {
            return Ok(Some(message));
        }
        for _ in 0..self.conns.len() {
            self.next = (self.next + 1) % self.conns.len();
            let (_, conn, pinged) = &mut self.conns[self.next];
            if !*pinged {
                conn.send_packed_command(&redis::cmd("PING").get_packed_command())?;
                *pinged = true;
            }
            loop {
                match conn.recv_response()? {
                    Value::Array(parts) => match kind_of(&parts).as_deref() {
                        Some("smessage") => return Ok(message_of(parts)),
                        Some("pong") => {
                            *pinged = false;
                            break;
                        }
                        // The server drops a subscription whose slot moved away.
                        Some("sunsubscribe") => {
                            if let Some(e) = moved_away(&parts, &self.channels) {
                                return Err(e);
                            }
                        }
                        _ => {}
                    },
                    Value::ServerError(e) => return Err(e.into()),
                    _ => {}
                }
            }
        }
        std::thread::sleep(wait);
        Ok(None)
    }
}

/// A `sunsubscribe` the client did not ask for: the server dropped a channel
/// still held because its slot moved away.
fn moved_away(parts: &[Value], held: &HashMap<String, usize>) -> Option<redis::RedisError> {
    let channel = channel_of(parts).filter(|c| held.contains_key(c))?;
    let detail = format!("{channel} moved to another shard");
    Some(redis::RedisError::from((redis::ErrorKind::Io, "slot moved", detail)))
}

fn text_of(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

fn kind_of(parts: &[Value]) -> Option<String> {
    text_of(parts.first())
}

fn channel_of(parts: &[Value]) -> Option<String> {
    text_of(parts.get(1))
}

fn message_of(parts: Vec<Value>) -> Option<(String, Vec<u8>)> {
    let channel = channel_of(&parts)?;
    match parts.into_iter().nth(2)? {
        Value::BulkString(payload) => Some((channel, payload)),
        _ => None,
    }
}
