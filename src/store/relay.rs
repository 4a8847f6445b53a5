//! The relay thread (`--cluster`, PROTOCOL.md 6): one subscriber connection to
//! Redis, subscribed to the channels of exactly the papers this node holds, plus
//! `rp:nodes`. Changes published by other nodes go to the loop that owns their
//! paper; nodes that stop announcing themselves are reported gone; this node's own
//! announcement coming back is the canary that proves the subscription works.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use redis::Connection;

use super::endpoint::{Endpoint, IO_TIMEOUT};
use super::{keys, LoadPurpose, LoadRequest, Loops, StoreEvent};

/// How long a wait for a message lasts before commands from the loops are looked at.
const POLL: Duration = Duration::from_millis(20);
/// How often a node says it is alive; `NODE_TTL` later without it, it counts as gone.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
pub const NODE_TTL: Duration = Duration::from_secs(8);

pub enum RelayCmd {
    /// Subscribe to the paper's channel, then have it read.
    Subscribe(LoadRequest),
    Unsubscribe(Arc<str>),
}

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
    announcer: Option<Connection>,
    next_heartbeat: Instant,
    /// Subscriptions made so far; after the first, a reconnection re-reads the papers.
    sessions: u64,
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
        }
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
        let result = redis::pipe()
            .cmd("SET")
            .arg(keys::node_alive(&self.node))
            .arg(1)
            .arg("PX")
            .arg(NODE_TTL.as_millis() as u64)
            .ignore()
            .cmd("PUBLISH")
            .arg(keys::NODES_CHANNEL)
            .arg(&self.node)
            .ignore()
            .query::<()>(conn);
        if result.is_err() {
            self.announcer = None;
        }
    }

    /// Runs until every loop has stopped.
    pub fn run(mut self) {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.endpoint.connect() {
                Ok(mut conn) => {
                    match self.serve(&mut conn) {
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
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => return true,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    fn serve(&mut self, conn: &mut Connection) -> redis::RedisResult<()> {
        let mut pubsub = conn.as_pubsub();
        // Replies to (un)subscribing may take a while; only the wait for messages is short.
        pubsub.set_read_timeout(Some(IO_TIMEOUT))?;
        pubsub.subscribe(keys::NODES_CHANNEL)?;
        for paper in &self.papers {
            pubsub.subscribe(keys::channel(paper))?;
        }
        self.sessions += 1;
        if self.sessions > 1 {
            // Whatever was published while the subscription was down is in Redis:
            // every paper held is read again and merged (PROTOCOL.md 2: by version).
            for paper in &self.papers {
                let owner = self.loops.owner_of(paper);
                let deadline = Instant::now() + IO_TIMEOUT;
                let request =
                    LoadRequest { paper: paper.clone(), purpose: LoadPurpose::Merge, loop_index: owner, deadline };
                let _ = self.loads.send(request);
            }
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
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            self.heartbeat();
            pubsub.set_read_timeout(Some(POLL))?;
            let message = pubsub.get_message();
            pubsub.set_read_timeout(Some(IO_TIMEOUT))?;
            match message {
                Ok(msg) => self.dispatch(msg.get_channel_name(), msg.get_payload_bytes()),
                Err(e) if e.is_timeout() => {}
                Err(e) => return Err(e),
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
                self.nodes.insert(payload.to_string(), Instant::now());
            }
            return;
        }
        let Some(paper) = keys::paper_of_channel(channel) else { return };
        let Some((node, message)) = payload.split_once('\n') else { return };
        if node == self.node {
            return; // our own publication: its members have it already
        }
        self.nodes.insert(node.to_string(), Instant::now());
        let event =
            StoreEvent::Relayed { paper: Arc::from(paper), node: Arc::from(node), message: message.to_string() };
        self.loops.report(self.loops.owner_of(paper), event);
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
            let node: Arc<str> = Arc::from(node);
            for index in 0..self.loops.count() {
                self.loops.report(index, StoreEvent::NodeGone(node.clone()));
            }
        }
        let last = self.heard_self.unwrap_or(connected);
        if now.duration_since(last) > HEARTBEAT_EVERY * 3 {
            self.healthy.store(false, Ordering::Relaxed);
            return Err(redis::RedisError::from((redis::ErrorKind::Io, "the relay canary did not come back")));
        }
        Ok(())
    }
}
