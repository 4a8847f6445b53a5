//! The Redis writer thread: drains the backlog in batches, writes each batch as
//! one pipeline (one per shard on a Redis Cluster), sends again after a wait
//! what a failure left unwritten (writes are idempotent by `v`), and tells the
//! loops which edits are now in Redis.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use redis::{RedisError, Value};

use super::batch::{select, Budget, PaperWrites, Plan};
pub(super) use super::calls::write_notes_script;
pub use super::calls::History;
use super::calls::{unexpected, Call, Context, Reported, Scripts};
use super::endpoint::{query_pipeline, Endpoint, RedisConn};
use super::parking::{Parking, Retry};
use super::shards::Shards;
use super::suspects::{Suspects, SLOW_WRITE};
use super::{is_transient, BacklogLevel, Loops, Op, Outcome, Queued, StoreEvent, Written};
use crate::metrics::{bump, WriterMetrics};

/// How long the check that Redis answers waits, after a lone op timed out.
const ANSWER_CHECK: Duration = Duration::from_secs(1);
/// The one shard of a single Redis (or Sentinel-named master), for parking.
const SINGLE: &str = "";
/// How often an idle writer checks that Redis answers (for `/readyz`).
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// How often a running probe of a master is looked at.
const PROBE_POLL: Duration = Duration::from_millis(20);
/// How often a Redis outage is reported while it lasts.
const OUTAGE_LOG_EVERY: Duration = Duration::from_secs(10);

pub struct Writer {
    endpoint: Endpoint,
    /// The connection to a single Redis (or Sentinel-named master).
    conn: Option<RedisConn>,
    /// A Redis Cluster: a connection to each master, per-shard pipelines,
    /// `SPUBLISH`, the hand-off in two steps.
    redis_cluster: bool,
    shards: Option<Shards>,
    /// The shards and papers whose writes failed, held back until their next try.
    parking: Parking,
    /// `--redis-wait-replicas`: a batch counts as written once this many replicas have it.
    wait_replicas: usize,
    ops: Receiver<Queued>,
    backlog: Arc<BacklogLevel>,
    metrics: Arc<WriterMetrics>,
    loops: Arc<dyn Loops>,
    retention_secs: u64,
    /// Set when the server stops: past it, an unwritable backlog is given up.
    give_up_at: Arc<OnceLock<Instant>>,
    scripts: Arc<Scripts>,
    outage: Option<Outage>,
    /// With `--cluster`: this node's id, which prefixes what it relays.
    node: Option<Arc<str>>,
    history: History,
    /// TTL set on a presence hash at each change (its holders' relays refresh it).
    presence_ttl_ms: u64,
    budget: Budget,
    /// Papers sent alone, one op at a time, as they may make Redis slow.
    suspects: Suspects,
}

/// How long `WAIT` may wait for replicas before the batch is sent again.
pub(super) const WAIT_TIMEOUT: Duration = Duration::from_secs(2);

struct Outage {
    since: Instant,
    last_logged: Instant,
}

impl Writer {
    pub fn new(
        endpoint: Endpoint,
        ops: Receiver<Queued>,
        backlog: Arc<BacklogLevel>,
        metrics: Arc<WriterMetrics>,
        loops: Arc<dyn Loops>,
        retention_secs: u64,
        give_up_at: Arc<OnceLock<Instant>>,
    ) -> Self {
        let redis_cluster = endpoint.is_cluster();
        let scripts = Arc::new(Scripts::new(redis_cluster));
        let shards =
            endpoint.seed().filter(|_| redis_cluster).map(|seed| Shards::new(seed, scripts.all(), metrics.clone()));
        Writer {
            endpoint,
            conn: None,
            redis_cluster,
            shards,
            parking: Parking::default(),
            wait_replicas: 0,
            ops,
            backlog,
            metrics,
            loops,
            retention_secs,
            give_up_at,
            scripts,
            outage: None,
            node: None,
            history: History { retention: 3_600_000 << 10, max_tombstones: 1000 },
            presence_ttl_ms: 60_000,
            budget: Budget::for_notes(16 * 1024),
            suspects: Suspects::default(),
        }
    }

    /// Sizes each call for notes of at most `max_note_bytes`.
    pub fn sizing_calls_for(mut self, max_note_bytes: usize) -> Self {
        self.budget = Budget::for_notes(max_note_bytes);
        self
    }

    /// With `--cluster`: what the writer applies, it publishes to the other nodes.
    pub fn relaying_as(mut self, node: &str) -> Self {
        self.node = Some(Arc::from(node));
        self
    }

    /// The tombstone horizon's limits (PROTOCOL.md 4, 1.1).
    pub fn keeping_tombstones(mut self, history: History) -> Self {
        self.history = history;
        self
    }

    /// Presence hashes expire after `ttl` unless a live node refreshes them.
    pub fn with_presence_ttl(mut self, ttl: Duration) -> Self {
        self.presence_ttl_ms = ttl.as_millis() as u64;
        self
    }

    /// With `--redis-wait-replicas N` (N >= 1), a batch counts as written only once
    /// `WAIT` says N replicas have it.
    pub fn waiting_for_replicas(mut self, replicas: usize) -> Self {
        self.wait_replicas = replicas;
        self.shards = self.shards.map(|shards| shards.waiting_for_replicas(replicas));
        self
    }

    /// Runs until every loop has stopped and the backlog is written (or given up);
    /// returns the number of ops that could not be written.
    ///
    /// Ops are taken from the backlog into `held` in the order they were accepted,
    /// and sent in batches of those whose shard and paper are not held back. What
    /// a batch wrote is acknowledged at once; what it could not write goes back to
    /// the front of `held` and is sent again after its wait (writes are
    /// idempotent by version). A paper's ops stay in their order: they share a
    /// shard, so they are held back or sent together.
    pub fn run(mut self) -> usize {
        let mut held: Vec<Queued> = Vec::new();
        let mut open = true;
        // Whether held ops may have become ready: looking costs a pass over them.
        let mut look = true;
        let mut look_at: Option<Instant> = None;
        self.check_redis();
        loop {
            if open {
                while let Ok(op) = self.ops.try_recv() {
                    self.take(op, &mut held);
                    look = true;
                }
            }
            if let Some(shards) = &mut self.shards {
                look |= shards.tend(&self.endpoint, &mut self.parking);
            }
            let now = Instant::now();
            look |= look_at.is_some_and(|at| now >= at);
            let batch = if look { self.ready(&mut held, now) } else { Vec::new() };
            look = false;
            if batch.is_empty() {
                if !open && held.is_empty() {
                    self.report_refused();
                    return 0;
                }
                if !held.is_empty() && self.give_up_at.get().is_some_and(|at| now >= *at) {
                    return self.give_up(held.len());
                }
                // Until the next wait ends, a probe may have answered, or the idle check.
                look_at = self.parking.next_due(now);
                let mut wait = look_at.map_or(IDLE_CHECK, |due| due.saturating_duration_since(now));
                if self.shards.as_ref().is_some_and(Shards::probing) {
                    wait = wait.min(PROBE_POLL);
                }
                let wait = wait.clamp(Duration::from_millis(1), IDLE_CHECK);
                if !open {
                    std::thread::sleep(wait);
                    continue;
                }
                match self.ops.recv_timeout(wait) {
                    Ok(op) => {
                        self.take(op, &mut held);
                        look = true;
                    }
                    Err(RecvTimeoutError::Timeout) if held.is_empty() => self.check_redis(),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => open = false,
                }
                continue;
            }
            look = true;
            let outcomes = self.write_once(&batch);
            let again = self.acknowledge(batch, outcomes);
            let unwritten = !again.is_empty();
            held.splice(0..0, again);
            self.fail_blamed(&mut held);
            self.forget_papers_not_in(&held);
            let oldest = held.iter().map(|q| q.at).min().map_or(Duration::ZERO, |at| at.elapsed());
            self.metrics.oldest_age_ms.store(oldest.as_millis() as u64, Ordering::Relaxed);
            if unwritten && self.give_up_at.get().is_some_and(|at| Instant::now() >= *at) {
                return self.give_up(held.len());
            }
        }
    }

    /// An op taken from the backlog.
    fn take(&self, op: Queued, held: &mut Vec<Queued>) {
        self.metrics.backlog_wait.observe(op.at.elapsed());
        held.push(op);
    }

    /// Moves out of `held` the first ops whose shard and paper are not held
    /// back, within the budgets: a batch of at most `MAX_BATCH` ops and
    /// `BATCH_BYTES`, each paper's call within `CALL_OPS` and `CALL_BYTES`. A
    /// paper stops at the first op it cannot take, so its ops stay in order. A
    /// suspect paper goes alone, one op at a time, when its op is the first ready.
    fn ready(&self, held: &mut Vec<Queued>, now: Instant) -> Vec<Queued> {
        let mut ready_paper: HashMap<Arc<str>, bool> = HashMap::new();
        let ready =
            |paper: &Arc<str>| *ready_paper.entry(paper.clone()).or_insert_with(|| self.paper_ready(paper, now));
        let take = select(held, &self.budget, ready, |paper| self.suspects.contains(paper));
        if take.iter().all(|t| *t) {
            return std::mem::take(held);
        }
        let (mut batch, mut rest) = (Vec::new(), Vec::with_capacity(held.len()));
        for (queued, take) in std::mem::take(held).into_iter().zip(take) {
            if take {
                batch.push(queued);
            } else {
                rest.push(queued);
            }
        }
        *held = rest;
        batch
    }

    /// Fails every held op of a paper found to make Redis slow: its paper fails
    /// alone (`write_failed`, then `unavailable` until it can be written again).
    fn fail_blamed(&mut self, held: &mut Vec<Queued>) {
        let blamed = self.suspects.take_blamed();
        if blamed.is_empty() {
            return;
        }
        let (failed, rest): (Vec<Queued>, Vec<Queued>) =
            std::mem::take(held).into_iter().partition(|q| blamed.contains(q.op.paper()));
        *held = rest;
        if !failed.is_empty() {
            let reason = Reported::Failed(SLOW_WRITE.into());
            let outcomes = vec![Some(reason); failed.len()];
            self.acknowledge(failed, outcomes);
        }
    }

    /// Whether a paper's ops may be sent now: neither it nor its shard waits.
    fn paper_ready(&self, paper: &str, now: Instant) -> bool {
        let shard_ready = match &self.shards {
            Some(shards) => self.parking.shard_ready(&shards.shard_of(paper), now),
            None => self.parking.shard_ready(SINGLE, now),
        };
        shard_ready && self.parking.paper_ready(paper, now)
    }

    /// Forgets the waits of papers of which nothing is held any more.
    fn forget_papers_not_in(&mut self, held: &[Queued]) {
        if self.parking.is_empty() {
            return;
        }
        let papers: HashSet<&str> = held.iter().map(|q| &**q.op.paper()).collect();
        self.parking.keep_papers(|paper| papers.contains(paper));
    }

    /// Sends a batch once. A paper whose writes Redis refuses for good fails
    /// alone, at once; what failed for a reason retrying can cure is left without
    /// an outcome, and its paper (or its shard, if the shard failed) waits.
    fn write_once(&mut self, batch: &[Queued]) -> Vec<Option<Reported>> {
        let mut outcomes: Vec<Option<Reported>> = vec![None; batch.len()];
        let result = self.try_write(batch, &mut outcomes);
        if let Err(e) = &result {
            if e.is_timeout() {
                // Any call of the pipeline may be what kept Redis busy.
                for queued in batch {
                    self.suspects.saw_slow(queued.op.paper().clone());
                }
            }
        }
        let (endpoint, sharded) = (&mut self.endpoint, self.shards.is_some());
        if self
            .suspects
            .weigh(batch, outcomes.first().is_some_and(Option::is_some), || redis_answers(endpoint, sharded))
        {
            outcomes[0] = Some(Reported::Failed(SLOW_WRITE.into()));
        }
        // Waits count from the failure's end: a timeout may have taken longer than one.
        let tried = Instant::now();
        match result {
            Ok(()) => {
                if self.shards.is_none() {
                    self.parking.shard_answered(SINGLE);
                }
            }
            Err(e) => {
                self.redis_is_down(&e);
                self.parking.shard_failed(SINGLE, Retry::AfterWait, tried);
            }
        }
        let mut parked: HashSet<&str> = HashSet::new();
        for (queued, outcome) in batch.iter().zip(&outcomes) {
            let paper = queued.op.paper();
            if outcome.is_none() && self.paper_ready(paper, tried) && parked.insert(paper) {
                self.parking.paper_failed(paper, tried);
            }
        }
        if outcomes.iter().all(Option::is_some) && !self.parking.any_shard_failing() {
            self.redis_is_up();
            bump(&self.metrics.batches, 1);
        } else {
            bump(&self.metrics.errors, 1);
            if self.parking.any_shard_failing() {
                self.metrics.redis_up.store(false, Ordering::Relaxed);
            }
        }
        outcomes
    }

    /// The server stops and its time to flush is up: what is held is lost.
    fn give_up(&self, held: usize) -> usize {
        let lost = held + self.ops.len();
        log::error!("stopping with Redis unreachable: {lost} ops were not written");
        lost
    }

    fn report_refused(&self) {
        let refused = self.metrics.failed_ops.load(Ordering::Relaxed);
        if refused > 0 {
            log::warn!(
                "{refused} ops were refused by Redis for good while running (their senders got \
                 write_failed; the log names each paper); every other op is written"
            );
        }
    }

    /// While idle, keeps `redis_up` (and so `/readyz`) true to the facts: on a
    /// Cluster, every master must answer.
    fn check_redis(&mut self) {
        let result = match &mut self.shards {
            Some(shards) => {
                shards.tend(&self.endpoint, &mut self.parking);
                shards.ping_all(&mut self.parking)
            }
            None => match self.connection() {
                Ok(conn) => redis::cmd("PING").query::<String>(conn).map(drop),
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) if !self.parking.any_shard_failing() => self.redis_is_up(),
            Ok(()) => self.metrics.redis_up.store(false, Ordering::Relaxed),
            Err(e) => self.redis_is_down(&e),
        }
    }

    fn redis_is_up(&mut self) {
        self.metrics.redis_up.store(true, Ordering::Relaxed);
        if let Some(outage) = self.outage.take() {
            log::info!(
                "Redis is back after {:.1}s; backlog: {} ops",
                outage.since.elapsed().as_secs_f64(),
                self.backlog.ops()
            );
        }
    }

    fn redis_is_down(&mut self, e: &redis::RedisError) {
        self.conn = None;
        self.metrics.redis_up.store(false, Ordering::Relaxed);
        self.report_outage(e);
    }

    /// The connection to a single Redis, opened (with the scripts loaded) if there is none.
    fn connection(&mut self) -> redis::RedisResult<&mut RedisConn> {
        if self.conn.is_none() {
            let mut conn = self.endpoint.connect()?;
            redis::cmd("CLIENT").arg("SETNAME").arg("rp-writer").exec(&mut conn)?;
            self.scripts.load(&mut conn)?;
            bump(&self.metrics.reconnects, 1);
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    fn report_outage(&mut self, e: &redis::RedisError) {
        let now = Instant::now();
        let backlog = self.backlog.ops();
        match &mut self.outage {
            None => {
                log::warn!("cannot write to Redis ({e}); ops wait in the backlog: {backlog}");
                self.outage = Some(Outage { since: now, last_logged: now });
            }
            Some(outage) if now.duration_since(outage.last_logged) >= OUTAGE_LOG_EVERY => {
                log::warn!(
                    "Redis unreachable for {:.0}s ({e}); backlog: {backlog} ops",
                    now.duration_since(outage.since).as_secs_f64()
                );
                outage.last_logged = now;
            }
            Some(_) => {}
        }
    }

    /// One pipeline for the ops of `batch` still without an outcome (`Call::of`
    /// says in which order), its replies read into their ops' outcomes. A
    /// paper's calls stand or fall together: a failure retrying can cure leaves
    /// all its ops without an outcome (they go again), any other fails them.
    ///
    /// # Errors
    /// The connection failed, or the replicas did not take the batch: nothing
    /// of it counts as written.
    fn try_write(&mut self, batch: &[Queued], outcomes: &mut [Option<Reported>]) -> redis::RedisResult<()> {
        let plan = Plan::of(batch, |i| outcomes[i].is_some());
        #[cfg(feature = "fault-lose-writes")]
        let plan = Plan { papers: lose_on_purpose::some_notes(plan.papers, outcomes), relays: plan.relays };
        let calls = Call::of(&plan, batch);
        // The context holds its own handles: the connection below needs all of `self`.
        let (scripts, node) = (self.scripts.clone(), self.node.clone());
        let ctx = Context {
            scripts: &scripts,
            redis_cluster: self.redis_cluster,
            node: node.as_deref(),
            now_ms: now_ms(),
            history: self.history,
            retention_secs: self.retention_secs,
            presence_ttl_ms: self.presence_ttl_ms,
        };
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for call in &calls {
            call.encode(&mut pipe, batch, &ctx);
        }
        let waits = self.wait_replicas > 0 && !self.redis_cluster;
        if waits {
            pipe.cmd("WAIT").arg(self.wait_replicas).arg(WAIT_TIMEOUT.as_millis() as u64);
        }

        let sent = Instant::now();
        let replies: Vec<redis::RedisResult<Value>> = match &mut self.shards {
            // Routed by the slot map `tend` keeps: an old map only costs a MOVED, and
            // no map at all makes every paper's shard wait ("slot N") until one is read.
            Some(shards) => {
                let papers: Vec<&str> = calls.iter().map(|call| call.paper(batch)).collect();
                shards.send(&pipe, &papers, self.wait_replicas, &mut self.parking)
            }
            None => match self.connection()? {
                RedisConn::Single(conn) => query_pipeline(conn, &pipe)?,
                conn => pipe.query::<Vec<redis::RedisResult<Value>>>(conn)?,
            },
        };
        self.metrics.redis_round_trip.observe(sent.elapsed());
        bump(&self.metrics.commands, pipe.len() as u64);
        if waits {
            // The pipeline ends with WAIT: the batch is written once enough replicas have it.
            let acked = match replies.last() {
                Some(Ok(Value::Int(n))) => *n,
                _ => 0,
            };
            if acked < self.wait_replicas as i64 {
                let detail = format!("WAIT: {acked} of {} replicas have the batch", self.wait_replicas);
                return Err(redis::RedisError::from((redis::ErrorKind::Io, "replication", detail)));
            }
        }

        // Messages Redis published for the other nodes: applied notes with a relay
        // message, seals and erases (with `--cluster`), relayed ops.
        let mut relayed = 0;
        // On a Cluster: sealed papers whose stream entry is still to append.
        let mut handoffs: Vec<(usize, Vec<u8>)> = Vec::new();
        // The first failure of each paper's calls, and of each relayed op's.
        let mut failed_papers: Vec<(&PaperWrites, RedisError)> = Vec::new();
        let mut failed_relays: HashMap<usize, RedisError> = HashMap::new();
        let mut replies = replies.into_iter();
        for call in &calls {
            let reply = replies.next().unwrap_or_else(|| Err(unexpected(None)));
            match call.read(reply, outcomes, &ctx) {
                Ok(read) => {
                    relayed += read.relayed;
                    handoffs.extend(read.handoff);
                }
                Err(e) => match (call.writes(), call.relayed_op()) {
                    (Some(writes), _) => {
                        if !failed_papers.iter().any(|(w, _)| std::ptr::eq(*w, writes)) {
                            failed_papers.push((writes, e));
                        }
                    }
                    (None, Some(i)) => {
                        failed_relays.entry(i).or_insert(e);
                    }
                    (None, None) => {}
                },
            }
        }
        let mut transient = None;
        for (writes, e) in failed_papers {
            if e.is_timeout() || e.code() == Some("BUSY") {
                self.suspects.saw_slow(Arc::from(writes.paper));
            }
            if is_transient(&e) {
                if e.code() == Some("NOSCRIPT") {
                    // The script cache was flushed: load the scripts again.
                    self.conn = None;
                }
                // Nothing of this paper counts yet; it goes again with the next try.
                for slot in writes.ops() {
                    outcomes[slot] = None;
                }
                transient.get_or_insert(e);
                continue;
            }
            log::error!("Redis refuses the writes of paper {}: {e}", writes.paper);
            for slot in writes.ops() {
                outcomes[slot] = Some(Reported::Failed(e.to_string()));
            }
        }
        for &i in &plan.relays {
            let op = &batch[i].op;
            match failed_relays.remove(&i) {
                // Sent again with the next try (presence is idempotent).
                Some(e) if is_transient(&e) => {
                    transient.get_or_insert(e);
                }
                Some(e) => {
                    log::warn!("cannot relay a message on paper {}: {e}", op.paper());
                    outcomes[i] = Some(Reported::Op(Outcome::Saved));
                }
                None => {
                    relayed += u64::from(op.relay().is_some());
                    outcomes[i] = Some(Reported::Op(Outcome::Saved));
                }
            }
        }
        if let Some(shards) = self.shards.as_mut() {
            for (i, snapshot) in handoffs {
                if let Err(e) = shards.hand_off(batch[i].op.paper(), &snapshot, &mut self.parking) {
                    // The seal stands; the completion is sent again and appends the entry then.
                    outcomes[i] = None;
                    transient.get_or_insert(e);
                }
            }
        }
        bump(&self.metrics.relayed_out, relayed);
        if let Some(e) = transient {
            if e.code() == Some("READONLY") {
                // The master became a replica (a failover): ask the sentinels again.
                self.conn = None;
            }
            self.report_outage(&e);
        }
        Ok(())
    }

    /// Tells each loop what became of the ops that have an outcome, and frees
    /// their backlog room; returns the others, in their order.
    fn acknowledge(&self, batch: Vec<Queued>, outcomes: Vec<Option<Reported>>) -> Vec<Queued> {
        let mut per_loop: Vec<Vec<Written>> = vec![Vec::new(); self.loops.count()];
        let mut failed_papers: Vec<(Arc<str>, usize, String)> = Vec::new();
        let mut again = Vec::new();
        let (mut count, mut bytes) = (0, 0);
        for (queued, reported) in batch.into_iter().zip(outcomes) {
            let Some(reported) = reported else {
                again.push(queued);
                continue;
            };
            let Queued { op, at, bytes: op_bytes } = queued;
            count += 1;
            bytes += op_bytes;
            self.metrics.write_behind.observe(at.elapsed());
            let outcome = match reported {
                Reported::Op(outcome) => outcome,
                Reported::Sealed { notes, by } => {
                    if let Op::Complete { paper, origin, .. } = &op {
                        let event = StoreEvent::Sealed { paper: paper.clone(), by, notes, origin: Some(*origin) };
                        self.loops.report(origin.loop_index, event);
                    }
                    continue;
                }
                Reported::Failed(error) => {
                    bump(&self.metrics.failed_ops, 1);
                    if let Some(w) = op.report(Outcome::Failed) {
                        if !failed_papers.iter().any(|(p, ..)| *p == w.paper) {
                            failed_papers.push((w.paper.clone(), w.origin.loop_index, error));
                        }
                    }
                    Outcome::Failed
                }
            };
            if let Some(written) = op.report(outcome) {
                per_loop[written.origin.loop_index].push(written);
            }
        }
        self.backlog.release(count, bytes);
        bump(&self.metrics.ops_written, count as u64);
        for (paper, index, error) in failed_papers {
            self.loops.report(index, StoreEvent::Failed { paper, error });
        }
        for (index, written) in per_loop.into_iter().enumerate() {
            if !written.is_empty() {
                self.loops.report(index, StoreEvent::Written(written));
            }
        }
        again
    }
}

/// Whether Redis answers a new connection at once (`BUSY` counts: it is up,
/// running a script). On a Redis Cluster, a shard whose connection failed is
/// sent ops again only once a probe found it answering, so it does.
fn redis_answers(endpoint: &mut Endpoint, sharded: bool) -> bool {
    if sharded {
        return true;
    }
    let busy = |e: &redis::RedisError| e.code() == Some("BUSY");
    match endpoint.connect() {
        Ok(RedisConn::Single(mut conn)) => {
            let _ = conn.set_read_timeout(Some(ANSWER_CHECK));
            match redis::cmd("PING").query::<String>(&mut conn) {
                Ok(_) => true,
                Err(e) => busy(&e),
            }
        }
        Ok(RedisConn::Cluster(_)) => true,
        Err(e) => busy(&e),
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Test builds only (`--features fault-lose-writes`, never in the shipped
/// binary): with `RP_FAULT_LOSE_ONE_IN=N`, one note write in N is left out of
/// its script call and reported applied all the same, so that the chaos checker
/// can prove it sees a `saved` edit that Redis never got.
#[cfg(feature = "fault-lose-writes")]
mod lose_on_purpose {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    use super::{Outcome, Reported};
    use crate::store::batch::PaperWrites;

    fn one_in() -> u64 {
        static ONE_IN: OnceLock<u64> = OnceLock::new();
        *ONE_IN.get_or_init(|| {
            let n = std::env::var("RP_FAULT_LOSE_ONE_IN").ok().and_then(|n| n.trim().parse().ok()).unwrap_or(0);
            if n > 0 {
                log::warn!("fault injection: one note write in {n} is lost and reported applied");
            }
            n
        })
    }

    pub(super) fn some_notes<'a>(
        mut papers: Vec<PaperWrites<'a>>,
        outcomes: &mut [Option<Reported>],
    ) -> Vec<PaperWrites<'a>> {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let n = one_in();
        if n == 0 {
            return papers;
        }
        for writes in &mut papers {
            writes.notes.retain(|note| {
                if COUNT.fetch_add(1, Ordering::Relaxed) % n != n - 1 {
                    return true;
                }
                log::warn!("fault injection: lost {}/{} v {} ({} ops)", writes.paper, note.id, note.v, note.ops.len());
                for &i in &note.ops {
                    outcomes[i] = Some(Reported::Op(Outcome::Saved));
                }
                false
            });
        }
        papers
    }
}
