//! Sharded pub/sub on a Redis Cluster, for the relay: `SSUBSCRIBE` on the master
//! of each channel's slot, one listening thread per master, their messages
//! merged into one channel that the relay waits on.
//!
//! A blocking client cannot wait on several connections at once, and polling
//! them in turn either delays every message (a sleep) or costs Redis a command
//! per look (a `PING`). A thread per master blocks on its own connection
//! instead, and hands each message over as it arrives. The connections speak
//! RESP3, where everything a subscribed connection receives is a push: a read
//! that times out (to look at the thread's commands) then never makes the
//! client skip a later message as the timed-out read's reply.
//!
//! A slot that moves (resharding, failover) ends the subscription with an
//! error: the relay subscribes anew on the new map and re-reads its papers.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use redis::{Connection, PushKind, RedisError, RedisResult, Value};

use super::endpoint::{connect_node, slot, Endpoint, IO_TIMEOUT};

/// How long a listening thread waits for a message before it looks at its
/// commands: the most a subscription waits for the thread's attention.
const LISTEN_SLICE: Duration = Duration::from_millis(5);

/// What the relay asks of a master's listening thread.
enum ShardCmd {
    /// Subscribe, and answer once Redis confirmed.
    Subscribe(String, Sender<RedisResult<()>>),
    Unsubscribe(String),
}

/// What a listening thread reports.
enum Heard {
    Message(String, Vec<u8>),
    /// The connection failed or a slot moved: this subscriber is done.
    Failed(RedisError),
}

/// The masters' listening threads, and what they heard.
pub struct ShardedPubSub {
    /// How to reach a node (TLS, password), in RESP3.
    seed: redis::ConnectionInfo,
    /// `(first slot, last slot, "host:port")` of each master.
    masters: Vec<(u16, u16, String)>,
    /// Each master listened to so far: its address and its thread's commands.
    /// Dropping the senders ends the threads.
    listeners: Vec<(String, Sender<ShardCmd>)>,
    /// Channel -> index in `listeners`.
    channels: HashMap<String, usize>,
    heard: Receiver<Heard>,
    /// Cloned into each thread; the threads stop once `heard` is dropped.
    hear: Sender<Heard>,
}

impl ShardedPubSub {
    /// Reads the slot map; connects to masters as channels need them.
    ///
    /// # Errors
    /// No seed node answers, or no slot is assigned yet.
    pub fn new(endpoint: &Endpoint) -> RedisResult<ShardedPubSub> {
        let masters = endpoint.masters()?;
        if masters.is_empty() {
            return Err(RedisError::from((redis::ErrorKind::Io, "the cluster has no slots assigned yet")));
        }
        let seed = endpoint.seed().expect("a cluster endpoint");
        let resp3 = seed.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP3);
        let (hear, heard) = crossbeam_channel::unbounded();
        Ok(ShardedPubSub {
            seed: seed.set_redis_settings(resp3),
            masters,
            listeners: Vec::new(),
            channels: HashMap::new(),
            heard,
            hear,
        })
    }

    /// Subscribes on the master of the channel's slot, and returns once Redis
    /// confirmed, so that a paper read afterwards misses nothing.
    ///
    /// # Errors
    /// The master cannot be reached, or did not confirm in time.
    pub fn subscribe(&mut self, channel: &str) -> RedisResult<()> {
        let slot = slot(channel);
        let addr = self
            .masters
            .iter()
            .find(|(from, to, _)| (*from..=*to).contains(&slot))
            .map(|(_, _, addr)| addr.clone())
            .ok_or_else(|| RedisError::from((redis::ErrorKind::Io, "a slot without a master")))?;
        let index = match self.listeners.iter().position(|(a, _)| *a == addr) {
            Some(index) => index,
            None => {
                let conn = connect_node(&self.seed, &addr)?;
                let (commands, inbox) = crossbeam_channel::unbounded();
                let hear = self.hear.clone();
                std::thread::Builder::new()
                    .name("rp-relay-shard".into())
                    .spawn(move || listen(conn, &inbox, &hear))
                    .map_err(|e| RedisError::from((redis::ErrorKind::Io, "relay thread", e.to_string())))?;
                self.listeners.push((addr, commands));
                self.listeners.len() - 1
            }
        };
        let (answer, answered) = crossbeam_channel::bounded(1);
        let gone = || RedisError::from((redis::ErrorKind::Io, "a relay listener stopped"));
        self.listeners[index].1.send(ShardCmd::Subscribe(channel.to_string(), answer)).map_err(|_| gone())?;
        // The thread answers within LISTEN_SLICE plus Redis's confirmation.
        answered.recv_timeout(IO_TIMEOUT + LISTEN_SLICE).map_err(|_| gone())??;
        self.channels.insert(channel.to_string(), index);
        Ok(())
    }

    /// Unsubscribes (without waiting for the confirmation).
    ///
    /// # Errors
    /// The master's thread has stopped.
    pub fn unsubscribe(&mut self, channel: &str) -> RedisResult<()> {
        let Some(index) = self.channels.remove(channel) else { return Ok(()) };
        self.listeners[index]
            .1
            .send(ShardCmd::Unsubscribe(channel.to_string()))
            .map_err(|_| RedisError::from((redis::ErrorKind::Io, "a relay listener stopped")))
    }

    /// The next message, else `None` after `wait`.
    ///
    /// # Errors
    /// A master's connection failed, or a slot moved.
    pub fn next_message(&mut self, wait: Duration) -> RedisResult<Option<(String, Vec<u8>)>> {
        match self.heard.recv_timeout(wait) {
            Ok(Heard::Message(channel, payload)) => Ok(Some((channel, payload))),
            Ok(Heard::Failed(e)) => Err(e),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => unreachable!("self.hear is a sender"),
        }
    }
}

/// A master's listening thread: serves the relay's commands between reads,
/// and hands over every message; stops when the relay drops its subscriber
/// (or on the first failure, which it reports).
fn listen(mut conn: Connection, commands: &Receiver<ShardCmd>, hear: &Sender<Heard>) {
    let mut held: HashSet<String> = HashSet::new();
    let mut timeout = IO_TIMEOUT;
    let failure: RedisError = loop {
        match commands.try_recv() {
            Ok(ShardCmd::Subscribe(channel, answer)) => {
                let confirmed =
                    set_timeout(&conn, &mut timeout, IO_TIMEOUT).and_then(|()| subscribe(&mut conn, &channel, hear));
                let ok = confirmed.is_ok();
                // A failure goes back with the answer: the relay then starts over.
                let _ = answer.send(confirmed);
                if !ok {
                    return;
                }
                held.insert(channel);
                continue;
            }
            Ok(ShardCmd::Unsubscribe(channel)) => {
                held.remove(&channel);
                // The confirmation is skipped when it arrives.
                match conn.send_packed_command(&redis::cmd("SUNSUBSCRIBE").arg(&channel).get_packed_command()) {
                    Ok(()) => continue,
                    Err(e) => break e,
                }
            }
            Err(TryRecvError::Disconnected) => return,
            Err(TryRecvError::Empty) => {}
        }
        if let Err(e) = set_timeout(&conn, &mut timeout, LISTEN_SLICE) {
            break e;
        }
        match conn.recv_response() {
            Ok(Value::Push { kind: PushKind::SMessage, data }) => {
                if let Some((channel, payload)) = message_of(data) {
                    if hear.send(Heard::Message(channel, payload)).is_err() {
                        return;
                    }
                }
            }
            // The server drops a subscription whose slot moved away.
            Ok(Value::Push { kind: PushKind::SUnsubscribe, data }) => {
                if let Some(channel) = text_of(data.first()).filter(|c| held.contains(c)) {
                    let detail = format!("{channel} moved to another shard");
                    break RedisError::from((redis::ErrorKind::Io, "slot moved", detail));
                }
            }
            Ok(Value::ServerError(e)) => break e.into(),
            Ok(_) => {}
            Err(e) if e.is_timeout() => {}
            Err(e) => break e,
        }
    };
    let _ = hear.send(Heard::Failed(failure));
}

/// Sends `SSUBSCRIBE` and waits for its confirmation, handing over messages
/// that arrive meanwhile. An error reply (say, MOVED) may be taken for a
/// timed-out read's and skipped: the wait then times out, and the relay starts
/// over.
fn subscribe(conn: &mut Connection, channel: &str, hear: &Sender<Heard>) -> RedisResult<()> {
    conn.send_packed_command(&redis::cmd("SSUBSCRIBE").arg(channel).get_packed_command())?;
    loop {
        match conn.recv_response()? {
            Value::Push { kind: PushKind::SSubscribe, data } if text_of(data.first()).as_deref() == Some(channel) => {
                return Ok(())
            }
            Value::Push { kind: PushKind::SMessage, data } => {
                if let Some((channel, payload)) = message_of(data) {
                    let _ = hear.send(Heard::Message(channel, payload));
                }
            }
            Value::ServerError(e) => return Err(e.into()),
            _ => {}
        }
    }
}

/// Sets a connection's read timeout when it is not `want` already (a system
/// call saved per read).
fn set_timeout(conn: &Connection, now: &mut Duration, want: Duration) -> RedisResult<()> {
    if *now != want {
        conn.set_read_timeout(Some(want))?;
        *now = want;
    }
    Ok(())
}

fn text_of(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

/// `(channel, payload)` of a message push (its data: channel, then payload).
fn message_of(data: Vec<Value>) -> Option<(String, Vec<u8>)> {
    let channel = text_of(data.first())?;
    match data.into_iter().nth(1)? {
        Value::BulkString(payload) => Some((channel, payload)),
        _ => None,
    }
}
