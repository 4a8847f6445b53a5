//! The Redis writer thread: drains the backlog in batches, writes each batch as
//! one pipeline, resends the same batch after a failure (writes are idempotent
//! by `v`), and tells the loops which edits are now in Redis.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use redis::{Connection, Script, Value};

use super::codec::encode_note;
use super::endpoint::Endpoint;
use super::{keys, Loops, Op, Queued, StoreEvent, Written};
use crate::metrics::{bump, WriterMetrics};

/// Ops taken from the backlog for one pipeline.
const MAX_BATCH: usize = 2048;
/// How often a Redis outage is reported while it lasts.
const OUTAGE_LOG_EVERY: Duration = Duration::from_secs(10);

/// Writes notes of one paper, each only if it advances the stored version (ties
/// to the greater node id), so that a resent batch or a late write from another
/// node never goes back in time. The version and node are read from the end of
/// the stored value (`codec::encode_note` puts them last; node ids are
/// `[A-Za-z0-9_-]`). ARGV: now_ms, then (id, value, v, node) quadruples.
const WRITE_NOTES: &str = r#"
local notes, meta = KEYS[1], KEYS[2]
-- A sealed paper's notes are what its stream entry says: late writes stay out.
if redis.call('HGET', meta, 'completed') == '1' then return 0 end
for i = 2, #ARGV, 4 do
  local current = redis.call('HGET', notes, ARGV[i])
  local v, node = tonumber(ARGV[i + 2]), ARGV[i + 3]
  local newer = true
  if current then
    local stored_v = tonumber(string.match(current, '"v":(%d+)}$')) or -1
    local stored_node = string.match(current, '"node":"([%w_%-]*)","v":%d+}$') or ''
    newer = stored_v < v or (stored_v == v and stored_node < node)
  end
  if newer then
    redis.call('HSET', notes, ARGV[i], ARGV[i + 1])
  end
end
redis.call('HSETNX', meta, 'created_ms', ARGV[1])
redis.call('HSETNX', meta, 'completed', '0')
redis.call('HSET', meta, 'updated_ms', ARGV[1])
return 0
"#;

/// Seals a paper once: marks it completed, adds its one stream entry, and starts
/// the retention of its keys. Run again (a resent batch), it adds nothing.
/// ARGV: paper, by, snapshot, now_ms, retention seconds.
const COMPLETE: &str = r#"
local notes, meta, stream = KEYS[1], KEYS[2], KEYS[3]
if redis.call('HGET', meta, 'completed') ~= '1' then
  redis.call('HSET', meta, 'completed', '1', 'completed_by', ARGV[2], 'updated_ms', ARGV[4])
  redis.call('HSETNX', meta, 'created_ms', ARGV[4])
  redis.call('XADD', stream, '*', 'paper', ARGV[1], 'snapshot', ARGV[3])
end
redis.call('EXPIRE', notes, ARGV[5])
redis.call('EXPIRE', meta, ARGV[5])
return 0
"#;

pub struct Writer {
    endpoint: Endpoint,
    conn: Option<Connection>,
    /// `--redis-wait-replicas`: a batch counts as written once this many replicas have it.
    wait_replicas: usize,
    ops: Receiver<Queued>,
    pending: Arc<AtomicUsize>,
    metrics: Arc<WriterMetrics>,
    loops: Arc<dyn Loops>,
    retention_secs: u64,
    /// Set when the server stops: past it, an unwritable backlog is given up.
    give_up_at: Arc<OnceLock<Instant>>,
    write_notes: Script,
    complete: Script,
    outage: Option<Outage>,
    /// TTL set on a presence hash at each change (its holders' relays refresh it).
    presence_ttl_ms: u64,
}

/// How long `WAIT` may wait for replicas before the batch is sent again.
const WAIT_TIMEOUT: Duration = Duration::from_secs(2);

struct Outage {
    since: Instant,
    last_logged: Instant,
}

impl Writer {
    pub fn new(
        endpoint: Endpoint,
        ops: Receiver<Queued>,
        pending: Arc<AtomicUsize>,
        metrics: Arc<WriterMetrics>,
        loops: Arc<dyn Loops>,
        retention_secs: u64,
        give_up_at: Arc<OnceLock<Instant>>,
    ) -> Self {
        Writer {
            endpoint,
            conn: None,
            wait_replicas: 0,
            ops,
            pending,
            metrics,
            loops,
            retention_secs,
            give_up_at,
            write_notes: Script::new(WRITE_NOTES),
            complete: Script::new(COMPLETE),
            outage: None,
            presence_ttl_ms: 60_000,
        }
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
        self
    }

    /// Runs until every loop has stopped and the backlog is written (or given up);
    /// returns the number of ops that could not be written.
    pub fn run(mut self) -> usize {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        self.check_redis();
        loop {
            match self.ops.recv_timeout(Duration::from_secs(1)) {
                Ok(op) => batch.push(op),
                Err(RecvTimeoutError::Timeout) => {
                    self.check_redis();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return 0,
            }
            while batch.len() < MAX_BATCH {
                match self.ops.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            if !self.write_until_done(&batch) {
                let lost = batch.len() + self.ops.len();
                log::error!("stopping with Redis unreachable: {lost} edits were not written");
                return lost;
            }
            self.acknowledge(&mut batch);
        }
    }

    /// While idle, keeps `redis_up` (and so `/readyz`) true to the facts.
    fn check_redis(&mut self) {
        let result = match self.connection() {
            Ok(conn) => redis::cmd("PING").query::<String>(conn).map(drop),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                self.metrics.redis_up.store(true, Ordering::Relaxed);
                if let Some(outage) = self.outage.take() {
                    log::info!("Redis is back after {:.1}s", outage.since.elapsed().as_secs_f64());
                }
            }
            Err(e) => {
                self.conn = None;
                self.metrics.redis_up.store(false, Ordering::Relaxed);
                self.report_outage(&e);
            }
        }
    }

    /// The connection, opened (with the scripts loaded) if there is none.
    fn connection(&mut self) -> redis::RedisResult<&mut Connection> {
        if self.conn.is_none() {
            let mut conn = self.endpoint.connect()?;
            self.write_notes.load(&mut conn)?;
            self.complete.load(&mut conn)?;
            bump(&self.metrics.reconnects, 1);
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    /// Sends the batch until Redis takes it; false when the server is stopping and
    /// its time to flush is up.
    fn write_until_done(&mut self, batch: &[Queued]) -> bool {
        let (pipeline, commands) = self.pipeline(batch);
        let mut backoff = Duration::from_millis(50);
        loop {
            let oldest = batch.first().map_or(Duration::ZERO, |q| q.at.elapsed());
            self.metrics.oldest_age_ms.store(oldest.as_millis() as u64, Ordering::Relaxed);
            match self.try_write(&pipeline) {
                Ok(()) => {
                    self.metrics.redis_up.store(true, Ordering::Relaxed);
                    bump(&self.metrics.batches, 1);
                    bump(&self.metrics.commands, commands);
                    if let Some(outage) = self.outage.take() {
                        log::info!(
                            "Redis is back after {:.1}s; backlog: {} edits",
                            outage.since.elapsed().as_secs_f64(),
                            self.pending.load(Ordering::Acquire)
                        );
                    }
                    return true;
                }
                Err(e) => {
                    self.conn = None;
                    self.metrics.redis_up.store(false, Ordering::Relaxed);
                    bump(&self.metrics.errors, 1);
                    self.report_outage(&e);
                }
            }
            if self.give_up_at.get().is_some_and(|at| Instant::now() >= *at) {
                return false;
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    fn report_outage(&mut self, e: &redis::RedisError) {
        let now = Instant::now();
        let backlog = self.pending.load(Ordering::Acquire);
        match &mut self.outage {
            None => {
                log::warn!("cannot write to Redis ({e}); edits wait in the backlog: {backlog}");
                self.outage = Some(Outage { since: now, last_logged: now });
            }
            Some(outage) if now.duration_since(outage.last_logged) >= OUTAGE_LOG_EVERY => {
                log::warn!(
                    "Redis unreachable for {:.0}s ({e}); backlog: {backlog} edits",
                    now.duration_since(outage.since).as_secs_f64()
                );
                outage.last_logged = now;
            }
            Some(_) => {}
        }
    }

    fn try_write(&mut self, pipeline: &redis::Pipeline) -> redis::RedisResult<()> {
        let conn = self.connection()?;
        let mut replies: Vec<redis::RedisResult<Value>> = pipeline.query(conn)?;
        if self.wait_replicas > 0 {
            // The pipeline ends with WAIT: the batch is written once enough replicas have it.
            let acked = match replies.pop() {
                Some(Ok(Value::Int(n))) => n,
                _ => 0,
            };
            if acked < self.wait_replicas as i64 {
                let detail = format!("WAIT: {acked} of {} replicas have the batch", self.wait_replicas);
                return Err(redis::RedisError::from((redis::ErrorKind::Io, "replication", detail)));
            }
        }
        // Any reply that is an error fails the whole batch, which is sent again
        // (every write in it is idempotent by version): a script cache flushed, a
        // replica made read-only by a failover, OOM, MISCONF... Nothing counts as
        // written, or is confirmed `saved`, before Redis took all of it; an error
        // that lasts fills the backlog, and new edits are refused with `unavailable`.
        match replies.into_iter().find_map(Result::err) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// One pipeline for the batch: per paper, one script call with its notes (the
    /// last write of each note only: the earlier ones are older versions of it),
    /// then its completion if there is one.
    fn pipeline(&self, batch: &[Queued]) -> (redis::Pipeline, u64) {
        struct PaperWrites<'a> {
            notes: HashMap<&'a str, (String, u64, &'a str)>,
            complete: Option<(&'a str, &'a str)>,
        }
        let mut papers: Vec<(&str, PaperWrites)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for Queued { op, .. } in batch {
            let at = *index.entry(op.paper()).or_insert_with(|| {
                papers.push((op.paper(), PaperWrites { notes: HashMap::new(), complete: None }));
                papers.len() - 1
            });
            let writes = &mut papers[at].1;
            match op {
                Op::Note { id, note, .. } => {
                    let value = encode_note(&note.author, note.data.as_deref(), &note.node, note.v);
                    writes.notes.insert(id, (value, note.v, &*note.node));
                }
                Op::Complete { by, snapshot, .. } => writes.complete = Some((by, snapshot)),
                Op::Relay { .. } => {}
            }
        }

        let now = now_ms();
        let mut pipe = redis::pipe();
        let mut commands = 0;
        pipe.ignore_errors();
        for (paper, writes) in &papers {
            if !writes.notes.is_empty() {
                commands += 1;
                let cmd = pipe.cmd("EVALSHA").arg(self.write_notes.get_hash()).arg(2);
                cmd.arg(keys::notes(paper)).arg(keys::meta(paper)).arg(now);
                for (id, (value, v, node)) in &writes.notes {
                    cmd.arg(*id).arg(value).arg(*v).arg(*node);
                }
            }
            if let Some((by, snapshot)) = writes.complete {
                commands += 1;
                pipe.cmd("EVALSHA")
                    .arg(self.complete.get_hash())
                    .arg(3)
                    .arg(keys::notes(paper))
                    .arg(keys::meta(paper))
                    .arg(keys::COMPLETED_STREAM)
                    .arg(*paper)
                    .arg(by)
                    .arg(snapshot)
                    .arg(now)
                    .arg(self.retention_secs);
            }
        }
        // Relayed messages go out in the order they were accepted, after the writes
        // of this batch, so a node reading the paper on receipt finds them there.
        for Queued { op, .. } in batch {
            if let Op::Relay { paper, presence: Some(presence), .. } = op {
                commands += 1;
                match &presence.entry {
                    Some(entry) => pipe.cmd("HSET").arg(keys::members(paper)).arg(&*presence.member).arg(entry),
                    None => pipe.cmd("HDEL").arg(keys::members(paper)).arg(&*presence.member),
                };
                // A node killed holding the paper never removes its entries.
                commands += 1;
                pipe.cmd("PEXPIRE").arg(keys::members(paper)).arg(self.presence_ttl_ms);
            }
            if let Some(relay) = op.relay() {
                commands += 1;
                pipe.cmd("PUBLISH").arg(keys::channel(op.paper())).arg(relay);
            }
        }
        if self.wait_replicas > 0 {
            commands += 1;
            pipe.cmd("WAIT").arg(self.wait_replicas).arg(WAIT_TIMEOUT.as_millis() as u64);
        }
        (pipe, commands)
    }

    /// Tells each loop which of its edits are written, and frees their backlog room.
    fn acknowledge(&self, batch: &mut Vec<Queued>) {
        let mut per_loop: Vec<Vec<Written>> = vec![Vec::new(); self.loops.count()];
        let count = batch.len();
        for Queued { op, at } in batch.drain(..) {
            self.metrics.write_latency(at.elapsed());
            let Some((origin, v)) = op.written() else { continue };
            let paper = match op {
                Op::Note { paper, .. } | Op::Complete { paper, .. } | Op::Relay { paper, .. } => paper,
            };
            per_loop[origin.loop_index].push(Written { paper, origin, v });
        }
        self.pending.fetch_sub(count, Ordering::AcqRel);
        bump(&self.metrics.ops_written, count as u64);
        self.metrics.oldest_age_ms.store(0, Ordering::Relaxed);
        for (index, written) in per_loop.into_iter().enumerate() {
            if !written.is_empty() {
                self.loops.report(index, StoreEvent::Written(written));
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
