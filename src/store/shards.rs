//! The writer's side of a Redis Cluster: a connection of its own to each master,
//! routed by the slot map it reads itself, so that a batch goes as one pipeline
//! per shard and a master that is down or hangs holds up only the papers it
//! serves. A master whose connection failed is probed from a thread of its own
//! and used again only once it answers. Also the completion hand-off in two
//! steps (the stream lives in another slot than the paper): appended after the
//! seal, at least once, and finished by the next writer if one died between.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Cmd, Connection, Pipeline, RedisError, RedisResult, Script, Value};

use super::calls::unexpected;
use super::endpoint::{connect_node, query_pipeline, Endpoint, IO_TIMEOUT};
use super::keys;
use super::parking::{Parking, Retry};
use super::slots::{slot, SlotMap};
use super::writer::WAIT_TIMEOUT;
use crate::metrics::{bump, WriterMetrics};

/// How long a master may take to give its slot map while the map is read again
/// (one that hangs is then left for the next).
const MAP_TIMEOUT: Duration = Duration::from_millis(500);
/// How often the slot map may be read again while it is stale.
const REFRESH_EVERY: Duration = Duration::from_millis(100);
/// How often pending hand-offs are looked for again after a look failed.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

pub(super) struct Shards {
    /// How to reach a node (TLS, password): the first seed node's settings.
    seed: redis::ConnectionInfo,
    /// Which master serves which slots.
    map: SlotMap,
    /// The map must be read again (a `MOVED`, a master lost).
    stale: bool,
    last_refresh: Option<Instant>,
    conns: HashMap<String, Connection>,
    /// Probes of masters whose connection failed: a connection set up, or why not.
    probes: HashMap<String, Receiver<RedisResult<Connection>>>,
    /// Loaded on every connection, so that `EVALSHA` finds them.
    scripts: Vec<Script>,
    /// Masters still to look over for hand-offs a stopped writer left pending:
    /// those of the first map read, and the ones that took over from them.
    to_sweep: HashSet<String>,
    swept: HashSet<String>,
    last_sweep: Option<Instant>,
    metrics: Arc<WriterMetrics>,
    /// `--redis-wait-replicas`: a master is written to only while it has this
    /// many replicas online (checked on each new connection).
    wait_replicas: usize,
}

impl Shards {
    pub fn new(seed: redis::ConnectionInfo, scripts: Vec<Script>, metrics: Arc<WriterMetrics>) -> Shards {
        Shards {
            seed,
            map: SlotMap::default(),
            stale: true,
            last_refresh: None,
            conns: HashMap::new(),
            probes: HashMap::new(),
            scripts,
            to_sweep: HashSet::new(),
            swept: HashSet::new(),
            last_sweep: None,
            metrics,
            wait_replicas: 0,
        }
    }

    /// Writes count once `replicas` replicas have them (`WAIT`): a master with
    /// fewer replicas online (one just promoted in a failover) is not written to
    /// until a probe, off the writer's thread, finds them; its `WAIT` would
    /// hold every shard's pipeline of the batch for its whole timeout.
    pub fn waiting_for_replicas(mut self, replicas: usize) -> Shards {
        self.wait_replicas = replicas;
        self
    }

    /// The shard (its master's address) serving a paper's slot by the last map
    /// read; a slot the map does not cover is a shard of its own, with no master.
    pub fn shard_of(&self, paper: &str) -> Cow<'_, str> {
        shard_of_key(&self.map, &keys::meta(paper))
    }

    /// Whether a probe is running (its outcome is looked for at the next `tend`).
    pub fn probing(&self) -> bool {
        !self.probes.is_empty()
    }

    /// What the writer does before each batch: takes the probes' outcomes, starts
    /// the probes that are due, reads the slot map again if it is stale, and
    /// looks for pending hand-offs. Returns whether a probe ended or the map
    /// changed (so that held ops may be ready now).
    pub fn tend(&mut self, endpoint: &Endpoint, parking: &mut Parking) -> bool {
        let now = Instant::now();
        let mut answered = Vec::new();
        self.probes.retain(|shard, outcome| match outcome.try_recv() {
            Err(TryRecvError::Empty) => true,
            Ok(Ok(conn)) => {
                answered.push((shard.clone(), Some(conn)));
                false
            }
            Ok(Err(e)) => {
                log::debug!("the master {shard} does not answer yet: {e}");
                answered.push((shard.clone(), None));
                false
            }
            Err(TryRecvError::Disconnected) => {
                answered.push((shard.clone(), None));
                false
            }
        });
        let mut changed = !answered.is_empty();
        for (shard, conn) in answered {
            match conn {
                Some(conn) => {
                    log::info!("the master {shard} answers again");
                    bump(&self.metrics.reconnects, 1);
                    self.conns.insert(shard.clone(), conn);
                    parking.shard_answered(&shard);
                }
                None => {
                    self.stale = true;
                    parking.shard_failed(&shard, Retry::AfterProbe, now);
                }
            }
        }
        let due: Vec<String> =
            parking.to_probe(now).filter(|s| !self.probes.contains_key(*s)).map(str::to_string).collect();
        for shard in due {
            self.probe(shard);
        }
        let stale = self.stale;
        if let Err(e) = self.refresh(endpoint, parking) {
            log::debug!("cannot read the Cluster's slot map: {e}");
        }
        changed |= stale && !self.stale;
        self.sweep(parking);
        changed
    }

    /// Sets up a connection to a master that failed, on a thread of its own, so
    /// that one that hangs holds up no write.
    fn probe(&mut self, shard: String) {
        let (tx, rx) = mpsc::channel();
        let (seed, scripts, addr, replicas) =
            (self.seed.clone(), self.scripts.clone(), shard.clone(), self.wait_replicas);
        let started = std::thread::Builder::new().name("rp-probe".into()).spawn(move || {
            let _ = tx.send(connect_node(&seed, &addr).and_then(|conn| set_up(conn, &scripts, &addr, replicas)));
        });
        match started {
            Ok(_) => drop(self.probes.insert(shard, rx)),
            Err(e) => log::warn!("cannot start a probe of {shard}: {e}"),
        }
    }

    /// Reads the slot map again if it is stale (at most every `REFRESH_EVERY`):
    /// from a master that answers at once, else from the seed nodes. Shards no
    /// longer in it are forgotten.
    ///
    /// # Errors
    /// No node gave a map; the old one is kept.
    fn refresh(&mut self, endpoint: &Endpoint, parking: &mut Parking) -> RedisResult<()> {
        if !self.stale || self.last_refresh.is_some_and(|at| at.elapsed() < REFRESH_EVERY) {
            return Ok(());
        }
        self.last_refresh = Some(Instant::now());
        let mut map = None;
        let mut silent = Vec::new();
        for (addr, conn) in &mut self.conns {
            conn.set_read_timeout(Some(MAP_TIMEOUT))?;
            let found = SlotMap::read(conn);
            conn.set_read_timeout(Some(IO_TIMEOUT))?;
            match found {
                Ok(found) => {
                    map = Some(found);
                    break;
                }
                // Its connection is in an unknown state now: a new one is opened when needed.
                Err(_) => silent.push(addr.clone()),
            }
        }
        for addr in silent {
            self.conns.remove(&addr);
        }
        let map = match map {
            Some(map) => map,
            None => endpoint.slot_map()?,
        };
        let serves = |addr: &str| map.serves(addr);
        self.conns.retain(|addr, _| serves(addr));
        self.probes.retain(|addr, _| serves(addr));
        parking.keep_shards(serves);
        if self.map.is_empty() {
            self.to_sweep = map.masters().into_iter().map(str::to_string).collect();
        } else if self.to_sweep.iter().any(|addr| !serves(addr)) {
            // A master was replaced before it was looked over: its replacement holds its keys.
            self.to_sweep =
                map.masters().into_iter().filter(|a| !self.swept.contains(*a)).map(str::to_string).collect();
        }
        self.map = map;
        self.stale = false;
        Ok(())
    }

    /// Sends `pipe` as one pipeline per shard, each ending with `WAIT` when
    /// replicas must have it; a command redirected by `ASK` (its slot is being
    /// moved) is sent to the node named. Replies come back in the order of `pipe`
    /// (`papers`: the paper of each command): a shard that fails gives every
    /// command of it that error, and waits.
    pub fn send(
        &mut self,
        pipe: &Pipeline,
        papers: &[&str],
        wait_replicas: usize,
        parking: &mut Parking,
    ) -> Vec<RedisResult<Value>> {
        let cmds: Vec<&Cmd> = pipe.cmd_iter().collect();
        let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
        let mut group_of_paper: HashMap<&str, usize> = HashMap::new();
        for (i, paper) in papers.iter().enumerate() {
            let at = *group_of_paper.entry(paper).or_insert_with(|| {
                let shard = self.shard_of(paper);
                groups.iter().position(|(s, _)| *s == shard).unwrap_or_else(|| {
                    groups.push((shard.into_owned(), Vec::new()));
                    groups.len() - 1
                })
            });
            groups[at].1.push(i);
        }
        let mut replies: Vec<RedisResult<Value>> = vec![Err(unexpected(None)); cmds.len()];
        for (shard, indices) in &groups {
            let group: Vec<&Cmd> = indices.iter().map(|&i| cmds[i]).collect();
            let got = self.send_to(shard, &group, Route::Owner, wait_replicas, parking);
            for (&i, reply) in indices.iter().zip(got) {
                replies[i] = reply;
            }
        }
        self.follow_asks(&cmds, &mut replies, wait_replicas, parking);
        replies
    }

    /// One shard's commands (each after `ASKING` for `Route::Asking`), with `WAIT`
    /// when replicas must have them: one reply per command.
    fn send_to(
        &mut self,
        shard: &str,
        cmds: &[&Cmd],
        route: Route,
        wait_replicas: usize,
        parking: &mut Parking,
    ) -> Vec<RedisResult<Value>> {
        let every = |e: RedisError| cmds.iter().map(|_| Err(e.clone())).collect();
        let (replies, acked) = match self.on_shard(shard, parking, |conn| pipeline(conn, cmds, route, wait_replicas)) {
            Ok(got) => got,
            Err(e) => return every(e),
        };
        if acked < wait_replicas {
            // It answers, but its replicas are missing: it waits for a probe that
            // finds them, so that its next WAIT does not hold up the other shards.
            parking.shard_failed(shard, Retry::AfterProbe, Instant::now());
            let detail = format!("WAIT: {acked} of {wait_replicas} replicas have the writes to {shard}");
            return every(RedisError::from((redis::ErrorKind::Io, "replication", detail)));
        }
        for reply in &replies {
            match reply.as_ref().err().and_then(RedisError::code) {
                // The script cache was flushed: the scripts are loaded again with a new connection.
                Some("NOSCRIPT") => drop(self.conns.remove(shard)),
                // The slot is served by another master now, or the cluster is changing.
                Some("MOVED" | "CLUSTERDOWN") => self.stale = true,
                _ => {}
            }
        }
        replies
    }

    /// Sends the commands Redis redirected with `ASK` to the node it named,
    /// each after `ASKING`, and puts their replies in place of the redirection
    /// (left as it is if that node fails: the paper is sent again).
    fn follow_asks(
        &mut self,
        cmds: &[&Cmd],
        replies: &mut [RedisResult<Value>],
        wait_replicas: usize,
        parking: &mut Parking,
    ) {
        let mut targets: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, reply) in replies.iter().enumerate() {
            let Err(e) = reply else { continue };
            let Some((node, _)) = e.redirect_node().filter(|_| e.code() == Some("ASK")) else { continue };
            match targets.iter_mut().find(|(t, _)| t == node) {
                Some((_, indices)) => indices.push(i),
                None => targets.push((node.to_string(), vec![i])),
            }
        }
        for (target, indices) in targets {
            let group: Vec<&Cmd> = indices.iter().map(|&i| cmds[i]).collect();
            let got = self.send_to(&target, &group, Route::Asking, wait_replicas, parking);
            for (i, reply) in indices.into_iter().zip(got) {
                if reply.is_ok() || reply.as_ref().is_err_and(|e| e.code().is_some()) {
                    replies[i] = reply;
                }
            }
        }
    }

    /// The second step of a seal: the stream entry on the stream's shard, then
    /// the marker cleared on the paper's (an entry may so be appended twice,
    /// never lost).
    ///
    /// # Errors
    /// Either shard failed or refused; the seal is sent again and appends then.
    pub fn hand_off(&mut self, paper: &str, snapshot: &[u8], parking: &mut Parking) -> RedisResult<()> {
        let stream = shard_of_key(&self.map, keys::COMPLETED_STREAM).into_owned();
        self.on_shard(&stream, parking, |conn| append_to_stream(conn, paper, snapshot))?;
        let shard = self.shard_of(paper).into_owned();
        self.on_shard(&shard, parking, |conn| clear_handoff(conn, paper))
    }

    /// Whether every master answers `PING` (for `/readyz` while the writer is
    /// idle); a master that failed is left to its probe.
    pub fn ping_all(&mut self, parking: &mut Parking) -> RedisResult<()> {
        if self.map.is_empty() {
            return Err(RedisError::from((redis::ErrorKind::Io, "cluster", "no slot map read yet".to_string())));
        }
        let masters: Vec<String> = self.map.masters().into_iter().map(str::to_string).collect();
        let mut result = Ok(());
        for addr in masters {
            if parking.shard_is_failing(&addr) {
                continue;
            }
            if let Err(e) = self.on_shard(&addr, parking, |conn| redis::cmd("PING").query::<String>(conn)) {
                result = result.and(Err(e));
            }
        }
        result
    }

    /// Finishes the hand-offs a writer left pending (it died between the seal and
    /// the stream entry), found by a `SCAN` of the masters for paper metas; a
    /// master that fails is looked over again later.
    fn sweep(&mut self, parking: &mut Parking) {
        if self.to_sweep.is_empty() || self.last_sweep.is_some_and(|at| at.elapsed() < SWEEP_EVERY) {
            return;
        }
        self.last_sweep = Some(Instant::now());
        let masters: Vec<String> = self.to_sweep.iter().cloned().collect();
        for addr in masters {
            if !parking.shard_ready(&addr, Instant::now()) {
                continue;
            }
            let pending = match self.on_shard(&addr, parking, pending_handoffs) {
                Ok(pending) => pending,
                Err(e) => {
                    log::warn!("cannot look for pending hand-offs on {addr}: {e}; trying again later");
                    continue;
                }
            };
            let mut finished = 0;
            for (paper, snapshot) in &pending {
                match self.hand_off(paper, snapshot, parking) {
                    Ok(()) => finished += 1,
                    Err(e) => {
                        log::warn!("cannot finish the hand-off of paper {paper}: {e}; trying again later");
                        break;
                    }
                }
            }
            if finished > 0 {
                log::info!(
                    "appended {finished} completed papers to {} that a stopped writer left pending",
                    keys::COMPLETED_STREAM
                );
            }
            if finished == pending.len() {
                self.to_sweep.remove(&addr);
                self.swept.insert(addr);
            }
        }
    }

    /// Runs `f` on the shard's connection, opened if there is none; a shard
    /// that waits (or waits for its probe) is not tried. A failure of the
    /// connection (not an error reply) closes it, and the shard waits for a
    /// probe that finds it answering.
    fn on_shard<T>(
        &mut self,
        shard: &str,
        parking: &mut Parking,
        f: impl FnOnce(&mut Connection) -> RedisResult<T>,
    ) -> RedisResult<T> {
        if !parking.shard_ready(shard, Instant::now()) {
            let detail = format!("{shard} failed and waits for its next try");
            return Err(RedisError::from((redis::ErrorKind::Io, "cluster node", detail)));
        }
        let result = self.connection(shard).and_then(f);
        match &result {
            Ok(_) => parking.shard_answered(shard),
            Err(e) if e.code().is_none() => {
                self.conns.remove(shard);
                self.stale = true;
                // A slot with no master has nothing to probe: it waits for a new map.
                let retry = if shard.starts_with("slot ") { Retry::AfterWait } else { Retry::AfterProbe };
                parking.shard_failed(shard, retry, Instant::now());
            }
            Err(_) => {}
        }
        result
    }

    fn connection(&mut self, shard: &str) -> RedisResult<&mut Connection> {
        if !self.conns.contains_key(shard) {
            if shard.starts_with("slot ") {
                let detail = format!("no master serves {shard} in the slot map");
                return Err(RedisError::from((redis::ErrorKind::Io, "cluster", detail)));
            }
            let conn = connect_node(&self.seed, shard).map_err(|e| at_node(shard, &e))?;
            let conn = set_up(conn, &self.scripts, shard, self.wait_replicas)?;
            bump(&self.metrics.reconnects, 1);
            self.conns.insert(shard.to_string(), conn);
        }
        Ok(self.conns.get_mut(shard).expect("just opened"))
    }
}

/// Names a new connection and loads the scripts on it; with `replicas` > 0,
/// checks that the master has that many replicas online. A refusal here is the
/// connection's failure, not a paper's: the shard waits and is tried again.
fn set_up(mut conn: Connection, scripts: &[Script], node: &str, replicas: usize) -> RedisResult<Connection> {
    let result = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("rp-writer")
        .exec(&mut conn)
        .and_then(|()| scripts.iter().try_for_each(|script| script.load(&mut conn).map(drop)));
    result.map_err(|e| at_node(node, &e))?;
    if replicas > 0 {
        let info: String = redis::cmd("INFO").arg("replication").query(&mut conn).map_err(|e| at_node(node, &e))?;
        let online = replicas_online(&info);
        if online < replicas {
            let detail = format!("{node} has {online} of {replicas} replicas online");
            return Err(RedisError::from((redis::ErrorKind::Io, "replication", detail)));
        }
    }
    Ok(conn)
}

/// The replicas `INFO replication` lists as online (`slaveN:...,state=online,...`).
fn replicas_online(info: &str) -> usize {
    info.lines().filter(|l| l.starts_with("slave") && l.contains(",state=online,")).count()
}

/// The shard serving a key by `map`, or `slot N` for a slot it does not cover.
fn shard_of_key<'a>(map: &'a SlotMap, key: &str) -> Cow<'a, str> {
    match map.master_of(key) {
        Some(addr) => Cow::Borrowed(addr),
        None => Cow::Owned(format!("slot {}", slot(key))),
    }
}

/// A failure to reach or set up a node, naming it, as an error of the
/// connection (never of a paper).
fn at_node(node: &str, e: &RedisError) -> RedisError {
    RedisError::from((redis::ErrorKind::Io, "cluster node", format!("{node}: {e}")))
}

/// How commands reach a node: the master of their slot, or the node an `ASK`
/// redirection named (a slot being moved), each command after `ASKING`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Owner,
    Asking,
}

/// One pipeline of commands for one node (each after `ASKING` for `Route::Asking`),
/// ending with `WAIT` when replicas must have it: one reply per command, and
/// how many replicas have them.
fn pipeline(
    conn: &mut Connection,
    cmds: &[&Cmd],
    route: Route,
    wait_replicas: usize,
) -> RedisResult<(Vec<RedisResult<Value>>, usize)> {
    let mut sub = redis::pipe();
    sub.ignore_errors();
    for cmd in cmds {
        if route == Route::Asking {
            sub.cmd("ASKING");
        }
        sub.add_command((*cmd).clone());
    }
    if wait_replicas > 0 {
        sub.cmd("WAIT").arg(wait_replicas).arg(WAIT_TIMEOUT.as_millis() as u64);
    }
    let mut got = query_pipeline(conn, &sub)?;
    let acked = if wait_replicas > 0 {
        match got.pop() {
            Some(Ok(Value::Int(n))) => usize::try_from(n).unwrap_or(0),
            _ => 0,
        }
    } else {
        0
    };
    let replies: Vec<RedisResult<Value>> =
        if route == Route::Asking { got.into_iter().skip(1).step_by(2).collect() } else { got };
    if replies.len() != cmds.len() {
        return Err(unexpected(None));
    }
    Ok((replies, acked))
}

fn append_to_stream(conn: &mut Connection, paper: &str, snapshot: &[u8]) -> RedisResult<()> {
    redis::cmd("XADD")
        .arg(keys::COMPLETED_STREAM)
        .arg("*")
        .arg("paper")
        .arg(paper)
        .arg("snapshot")
        .arg(snapshot)
        .query::<Value>(conn)
        .map(drop)
}

fn clear_handoff(conn: &mut Connection, paper: &str) -> RedisResult<()> {
    redis::cmd("HDEL").arg(keys::meta(paper)).arg("handoff_pending").query::<Value>(conn).map(drop)
}

/// The `(paper, snapshot)` of every seal on this master whose stream entry is
/// still to append.
fn pending_handoffs(node: &mut Connection) -> RedisResult<Vec<(String, Vec<u8>)>> {
    let mut pending = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, found): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg("rp:paper:{*}:meta").arg("COUNT").arg(1000).query(node)?;
        let mut markers = redis::pipe();
        for key in &found {
            markers.cmd("HGET").arg(key).arg("handoff_pending");
        }
        let snapshots: Vec<Option<Vec<u8>>> = if found.is_empty() { Vec::new() } else { markers.query(node)? };
        for (key, snapshot) in found.iter().zip(snapshots) {
            let Some(paper) = key.strip_prefix("rp:paper:{").and_then(|k| k.strip_suffix("}:meta")) else {
                continue;
            };
            if let Some(snapshot) = snapshot.filter(|s| !s.is_empty()) {
                pending.push((paper.to_string(), snapshot));
            }
        }
        if next == 0 {
            return Ok(pending);
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::replicas_online;

    #[test]
    fn replicas_online_counts_only_online_ones() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
                    slave0:ip=127.0.0.1,port=7001,state=online,offset=42,lag=0\r\n\
                    slave1:ip=127.0.0.1,port=7002,state=wait_bgsave,offset=0,lag=0\r\nmaster_repl_offset:42\r\n";
        assert_eq!(replicas_online(info), 1);
        assert_eq!(replicas_online("role:master\r\nconnected_slaves:0\r\n"), 0);
    }
}
