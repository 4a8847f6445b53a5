//! The Redis writer thread: drains the backlog in batches, writes each batch as
//! one pipeline, resends the same batch after a failure (writes are idempotent
//! by `v`), and tells the loops which edits are now in Redis.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use redis::{Connection, Script, Value};

use super::codec::{encode_cover, encode_note};
use super::endpoint::Endpoint;
use super::{is_transient, keys, Loops, Op, Outcome, Queued, StoreEvent, Written};
use crate::metrics::{bump, WriterMetrics};

/// Ops taken from the backlog for one pipeline.
const MAX_BATCH: usize = 2048;
/// How often a Redis outage is reported while it lasts.
const OUTAGE_LOG_EVERY: Duration = Duration::from_secs(10);

/// Lua shared by the scripts: whether a stored value is one the loader reads
/// (`codec::read_note`: UTF-8, a JSON note, `v` in [1, 2^53), `data` an object),
/// and its version and node. A value the loader skips counts as absent, so that
/// a new write replaces it instead of being swallowed by it.
const READABLE: &str = r#"
local function valid_utf8(s)
  if not string.find(s, '[\128-\255]') then return true end
  local i, n = 1, #s
  while i <= n do
    local c = string.byte(s, i)
    if c < 0x80 then
      i = i + 1
    else
      local len, lo, hi = 0, 0x80, 0xBF
      if c >= 0xC2 and c <= 0xDF then len = 2
      elseif c >= 0xE0 and c <= 0xEF then
        len = 3
        if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end
      elseif c >= 0xF0 and c <= 0xF4 then
        len = 4
        if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end
      else return false end
      if i + len - 1 > n then return false end
      local second = string.byte(s, i + 1)
      if second < lo or second > hi then return false end
      for j = i + 2, i + len - 1 do
        local cc = string.byte(s, j)
        if cc < 0x80 or cc > 0xBF then return false end
      end
      i = i + len
    end
  end
  return true
end

-- Compact JSON, read without decoding values (numbers and strings stay as
-- written): where a string or any value starting at i ends.
local function string_end(s, i)
  while true do
    local j = string.find(s, '["\\]', i + 1)
    if not j then return nil end
    if string.byte(s, j) == 92 then i = j + 1 else return j end
  end
end

local function value_end(s, i)
  local c = string.byte(s, i)
  if c == 34 then return string_end(s, i) end
  if c == 123 or c == 91 then
    local depth = 0
    while true do
      local j = string.find(s, '[{}%[%]"]', i)
      if not j then return nil end
      local d = string.byte(s, j)
      if d == 34 then
        i = string_end(s, j)
        if not i then return nil end
        i = i + 1
      else
        if d == 123 or d == 91 then depth = depth + 1 else depth = depth - 1 end
        if depth == 0 then return j end
        i = j + 1
      end
    end
  end
  local j = string.find(s, '[,}%]]', i)
  return j and j - 1
end

-- The members of a compact JSON object, in order, as {raw key, raw value}.
local function members(s)
  local out = {}
  if s == '{}' then return out end
  local i = 2
  while true do
    local k = string_end(s, i)
    if not k then return nil end
    local v = value_end(s, k + 2)
    if not v then return nil end
    out[#out + 1] = {string.sub(s, i, k), string.sub(s, k + 2, v)}
    local c = string.sub(s, v + 1, v + 1)
    if c == '}' then return out end
    if c ~= ',' then return nil end
    i = v + 2
  end
end

local function top(s)
  local t = {}
  for _, m in ipairs(members(s) or {}) do t[m[1]] = m[2] end
  return t
end

local function version(raw) -- [v,"node"]
  local v, n = string.match(raw or '', '^%[(%d+),"([%w_%-]*)"%]$')
  return tonumber(v), n
end

local function newer(v1, n1, v2, n2)
  return v1 > v2 or (v1 == v2 and n1 > n2)
end

-- The version of a live value's last upsert, and the fields changed after it.
local function versions_of(t)
  local changed = {}
  if t['"fv"'] then
    local fv = top(t['"fv"'])
    local bv, bn = version(fv['"base"'])
    for _, c in ipairs(members(fv['"changed"'] or '{}') or {}) do
      local cv, cn = version(c[2])
      changed[c[1]] = {cv, cn}
    end
    return bv, bn, changed
  end
  return tonumber(t['"v"']), string.match(t['"node"'] or '""', '^"(.*)"$'), changed
end

local function base_of(value)
  local t = top(value)
  if not t['"fv"'] then return nil end
  local bv, bn = versions_of(t)
  return bv, bn
end

-- A live value from its author, data members and versions (as codec::encode_note).
local function encode(author, data, bv, bn, changed)
  local parts, keys = {}, {}
  for j = 1, #data do parts[j] = data[j][1] .. ':' .. data[j][2] end
  local v, n = bv, bn
  for k, c in pairs(changed) do
    keys[#keys + 1] = k
    if newer(c[1], c[2], v, n) then v, n = c[1], c[2] end
  end
  table.sort(keys)
  local out = '{"author":' .. author .. ',"data":{' .. table.concat(parts, ',') .. '}'
  if #keys > 0 then
    local cs = {}
    for j, k in ipairs(keys) do
      cs[j] = k .. ':[' .. string.format('%.0f', changed[k][1]) .. ',"' .. changed[k][2] .. '"]'
    end
    out = out .. ',"fv":{"base":[' .. string.format('%.0f', bv) .. ',"' .. bn .. '"],"changed":{' .. table.concat(cs, ',') .. '}}'
  end
  if n ~= '' then out = out .. ',"node":"' .. n .. '"' end
  return out .. ',"v":' .. string.format('%.0f', v) .. '}'
end

local function set(data, key, value)
  for j = 1, #data do
    if data[j][1] == key then
      if value == 'null' then table.remove(data, j) else data[j][2] = value end
      return
    end
  end
  if value ~= 'null' then data[#data + 1] = {key, value} end
end

-- A patch (raw object; null removes a field) at (v, node) on a live value:
-- the new value, or nil when it advances no field.
local function merge_patch(current, patch, v, node)
  local t = top(current)
  local data = members(t['"data"'] or '{}')
  local fields = members(patch)
  if not data or not fields then return nil end
  local bv, bn, changed = versions_of(t)
  local advanced = false
  for _, f in ipairs(fields) do
    local c = changed[f[1]]
    local fv, fn = bv, bn
    if c then fv, fn = c[1], c[2] end
    if newer(v, node, fv, fn) then
      advanced = true
      changed[f[1]] = {v, node}
      set(data, f[1], f[2])
    end
  end
  if not advanced then return nil end
  return encode(t['"author"'], data, bv, bn, changed)
end

-- An upsert newer than a value's last upsert but not than all its fields: the
-- fields patched after it keep their values (or their removal).
local function merge_upsert(current, value, v, node)
  local t, u = top(current), top(value)
  local old = members(t['"data"'] or '{}')
  local data = members(u['"data"'] or '{}')
  if not old or not data then return nil end
  local _, _, changed = versions_of(t)
  local kept = {}
  for k, c in pairs(changed) do
    if newer(c[1], c[2], v, node) then
      kept[k] = c
      local found = nil
      for j = 1, #old do if old[j][1] == k then found = old[j][2] end end
      set(data, k, found or 'null')
    end
  end
  return encode(u['"author"'], data, v, node, kept)
end

local function readable(value)
  local v = tonumber(string.match(value, '"v":(%d+)}$'))
  if not v or v < 1 or v > 9007199254740991 then return nil end
  local ok, note = pcall(cjson.decode, value)
  if not ok or type(note) ~= 'table' or note.v ~= v then return nil end
  if note.deleted ~= nil and type(note.deleted) ~= 'boolean' then return nil end
  if note.author ~= nil and type(note.author) ~= 'string' then return nil end
  if note.deleted ~= true then
    local data = note.data
    if type(data) ~= 'table' then return nil end
    if next(data) == nil then
      if not string.find(value, '"data":{}', 1, true) then return nil end
    elseif data[1] ~= nil then
      return nil
    end
  end
  if not valid_utf8(value) then return nil end
  return v, string.match(value, '"node":"([%w_%-]*)","v":%d+}$') or ''
end
"#;

/// Writes notes of one paper, each only if it advances the stored version (ties
/// to the greater node id), so that a resent batch or a late write from another
/// node never goes back in time; what it applies it publishes to the other
/// nodes (so that they never show an edit Redis refused). Keeps the tombstone
/// horizon (PROTOCOL.md 4, 1.1: a sorted set of tombstones by version, pruned
/// past retention or the cap, `horizon` raised) and the resume floor (a change
/// applied more than the resume window below the greatest version raises it).
/// Patches are merged field by field (PROTOCOL.md 2, 1.1), without decoding
/// any value. KEYS: notes, meta, tombstones. ARGV: now_ms, the channel (empty
/// without `--cluster`), retention (versions), max tombstones, then (kind, id,
/// value, v, node, relay) sextuples, kind `w` (a whole note or tombstone) or `p`
/// (a patch: value is the object of fields, `null` removing one). Returns one
/// code per write: 1 applied, 2 superseded (Redis holds a later version, or
/// this one), 3 refused because the paper is sealed, 4 refused because it is at
/// or below the horizon and the note is not there, 5 a patch of a note that is
/// not there.
const WRITE_NOTES: &str = r#"
local notes, meta, tombstones = KEYS[1], KEYS[2], KEYS[3]
local now, channel, retention, max_tombstones = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local window = 61440000 -- the resume window: 60 s of versions
local out = {}
-- A sealed paper's notes are what its stream entry says: late writes stay out.
if redis.call('HGET', meta, 'completed') == '1' then
  for i = 5, #ARGV, 6 do out[#out + 1] = 3 end
  return out
end
local horizon = tonumber(redis.call('HGET', meta, 'horizon') or '0') or 0
local max_v = tonumber(redis.call('HGET', meta, 'max_v') or '0') or 0
local floor = tonumber(redis.call('HGET', meta, 'resume_floor') or '0') or 0
for i = 5, #ARGV, 6 do
  local kind, id, value, v, node, relay = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]), ARGV[i + 4], ARGV[i + 5]
  local code = 1
  local current = redis.call('HGET', notes, id)
  if kind == 'p' then
    -- A patch changes the fields it advances of a live note; the note must be there.
    local live = current and string.sub(current, 1, 15) ~= '{"deleted":true' and readable(current)
    if not live then
      code = 5
    else
      local merged = merge_patch(current, value, v, node)
      if merged then value = merged else code = 2 end
    end
  elseif current then
    -- The end of the value says which is newer; only a stored value that looks
    -- newer is read whole, to check that it counts.
    local tail_v = tonumber(string.match(current, '"v":(%d+)}$'))
    local tail_node = string.match(current, '"node":"([%w_%-]*)","v":%d+}$') or ''
    if tail_v and (tail_v > v or (tail_v == v and tail_node >= node)) then
      local stored_v, stored_node = readable(current)
      if stored_v and (stored_v > v or (stored_v == v and stored_node >= node)) then
        code = 2
        -- Fields patched after their last upsert: a newer upsert or delete is
        -- weighed against that upsert, field by field.
        local base_v, base_n = base_of(current)
        if base_v and (v > base_v or (v == base_v and node > base_n)) then
          if string.sub(value, 1, 15) == '{"deleted":true' then
            code = 1
          else
            local merged = merge_upsert(current, value, v, node)
            if merged then value = merged; code = 1 end
          end
        end
      end
    end
  elseif v <= horizon then
    -- Below the horizon, a note that is not there may have been dropped: a
    -- write could bring it back.
    code = 4
  end
  if code == 1 then
    redis.call('HSET', notes, id, value)
    if string.sub(value, 1, 15) == '{"deleted":true' then
      redis.call('ZADD', tombstones, v, id)
    else
      redis.call('ZREM', tombstones, id)
    end
    if v + window < max_v and max_v > floor then floor = max_v end
    if v > max_v then max_v = v end
    if channel ~= '' and relay ~= '' then redis.call('PUBLISH', channel, relay) end
  end
  out[#out + 1] = code
end
-- The horizon: tombstones past retention or past the cap go, oldest first.
local dropped = redis.call('ZRANGEBYSCORE', tombstones, '-inf', '(' .. string.format('%.0f', now * 1024 - retention), 'WITHSCORES')
local excess = redis.call('ZCARD', tombstones) - #dropped / 2 - max_tombstones
if excess > 0 then
  dropped = redis.call('ZRANGE', tombstones, 0, #dropped / 2 + excess - 1, 'WITHSCORES')
end
for j = 1, #dropped, 2 do
  redis.call('HDEL', notes, dropped[j])
  redis.call('ZREM', tombstones, dropped[j])
  local score = tonumber(dropped[j + 1])
  if score > horizon then horizon = score end
end
if #dropped > 0 then redis.call('HSET', meta, 'horizon', string.format('%.0f', horizon)) end
redis.call('HSET', meta, 'max_v', string.format('%.0f', max_v), 'resume_floor', string.format('%.0f', floor))
redis.call('HSETNX', meta, 'created_ms', ARGV[1])
redis.call('HSETNX', meta, 'completed', '0')
redis.call('HSET', meta, 'updated_ms', ARGV[1])
return out
"#;

/// Sets a paper's cover (1.1, `meta`) if it advances the stored one's version
/// (ties to the greater node id), and publishes it to the other nodes when it
/// does. KEYS: meta. ARGV: value, v, node, channel (or empty), relay. Returns
/// 1 applied, 2 superseded, 3 refused because the paper is sealed.
const WRITE_COVER: &str = r#"
local meta = KEYS[1]
local value, v, node, channel, relay = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
if redis.call('HGET', meta, 'completed') == '1' then return 3 end
local current = redis.call('HGET', meta, 'cover')
if current then
  local cv = tonumber(string.match(current, '"v":(%d+)}$'))
  local cn = string.match(current, '"node":"([%w_%-]*)","v":%d+}$') or ''
  if cv and (cv > v or (cv == v and cn >= node)) then
    local ok, c = pcall(cjson.decode, current)
    if ok and type(c) == 'table' and type(c.data) == 'table' and c.v == cv then return 2 end
  end
end
redis.call('HSET', meta, 'cover', value)
if channel ~= '' and relay ~= '' then redis.call('PUBLISH', channel, relay) end
return 1
"#;

/// Seals a paper once, as Redis holds it: the snapshot is built here from the
/// notes hash, so that the stream entry and the hash never disagree. Marks it
/// completed, adds its one stream entry, publishes `completed` with the notes
/// to the other nodes (when a channel is given), and starts the retention of its
/// keys. Run again (a resent batch, or a paper sealed by another node), it adds
/// nothing. ARGV: paper, by, now_ms, retention seconds, channel (or empty), relay
/// prefix. Returns the notes JSON array and who completed the paper.
const COMPLETE: &str = r#"
local notes, meta, stream, tombstones = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local paper, by, now, retention, channel, prefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local live = {}
local all = redis.call('HGETALL', notes)
for i = 1, #all, 2 do
  local id, value = all[i], all[i + 1]
  if #id <= 64 and string.match(id, '^[%w_%-]+$') and readable(value) then
    local t = top(value)
    local author, data, v = t['"author"'], t['"data"'], t['"v"']
    if author then
      live[#live + 1] = {tonumber(v), '{"id":"' .. id .. '","author":' .. author .. ',"data":' .. data .. ',"v":' .. v .. '}'}
    end
  end
end
table.sort(live, function(a, b) return a[1] < b[1] end)
local parts = {}
for i = 1, #live do parts[i] = live[i][2] end
local list = '[' .. table.concat(parts, ',') .. ']'
local cover = '{"data":{},"v":0}'
local stored_cover = redis.call('HGET', meta, 'cover')
if stored_cover then
  local data, v = string.match(stored_cover, '^{"data":(.*),"node":"[%w_%-]*","v":(%d+)}$')
  if not data then data, v = string.match(stored_cover, '^{"data":(.*),"v":(%d+)}$') end
  if data then cover = '{"data":' .. data .. ',"v":' .. v .. '}' end
end
if redis.call('HGET', meta, 'completed') ~= '1' then
  redis.call('HSET', meta, 'completed', '1', 'completed_by', by, 'updated_ms', now)
  redis.call('HSETNX', meta, 'created_ms', now)
  redis.call('XADD', stream, '*', 'paper', paper, 'snapshot', '{"paper":"' .. paper .. '","completed":true,"meta":' .. cover .. ',"notes":' .. list .. '}')
  if channel ~= '' then
    redis.call('PUBLISH', channel, prefix .. '{"type":"completed","by":' .. cjson.encode(by) .. ',"notes":' .. list .. '}')
  end
else
  by = redis.call('HGET', meta, 'completed_by') or by
end
redis.call('EXPIRE', notes, retention)
redis.call('EXPIRE', meta, retention)
redis.call('EXPIRE', tombstones, retention)
return {list, by}
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
    write_cover: Script,
    complete: Script,
    outage: Option<Outage>,
    /// With `--cluster`: this node's id, which prefixes what it relays.
    node: Option<String>,
    history: History,
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
            write_notes: Script::new(&format!("{READABLE}{WRITE_NOTES}")),
            write_cover: Script::new(WRITE_COVER),
            complete: Script::new(&format!("{READABLE}{COMPLETE}")),
            outage: None,
            node: None,
            history: History { retention: 3_600_000 << 10, max_tombstones: 1000 },
            presence_ttl_ms: 60_000,
        }
    }

    /// With `--cluster`: what the writer applies, it publishes to the other nodes.
    pub fn relaying_as(mut self, node: &str) -> Self {
        self.node = Some(node.to_string());
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
                Err(RecvTimeoutError::Disconnected) => {
                    let refused = self.metrics.failed_ops.load(Ordering::Relaxed);
                    if refused > 0 {
                        log::warn!(
                            "{refused} ops were refused by Redis for good while running (their senders got \
                             write_failed; the log names each paper); every other op is written"
                        );
                    }
                    return 0;
                }
            }
            while batch.len() < MAX_BATCH {
                match self.ops.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let Some(outcomes) = self.write_until_done(&batch) else {
                let lost = batch.len() + self.ops.len();
                log::error!("stopping with Redis unreachable: {lost} ops were not written");
                return lost;
            };
            self.acknowledge(&mut batch, outcomes);
        }
    }

    /// While idle, keeps `redis_up` (and so `/readyz`) true to the facts.
    fn check_redis(&mut self) {
        let result = match self.connection() {
            Ok(conn) => redis::cmd("PING").query::<String>(conn).map(drop),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => self.redis_is_up(),
            Err(e) => self.redis_is_down(&e),
        }
    }

    fn redis_is_up(&mut self) {
        self.metrics.redis_up.store(true, Ordering::Relaxed);
        if let Some(outage) = self.outage.take() {
            log::info!(
                "Redis is back after {:.1}s; backlog: {} ops",
                outage.since.elapsed().as_secs_f64(),
                self.pending.load(Ordering::Acquire)
            );
        }
    }

    fn redis_is_down(&mut self, e: &redis::RedisError) {
        self.conn = None;
        self.metrics.redis_up.store(false, Ordering::Relaxed);
        self.report_outage(e);
    }

    /// The connection, opened (with the scripts loaded) if there is none.
    fn connection(&mut self) -> redis::RedisResult<&mut Connection> {
        if self.conn.is_none() {
            let mut conn = self.endpoint.connect()?;
            redis::cmd("CLIENT").arg("SETNAME").arg("rp-writer").exec(&mut conn)?;
            self.write_notes.load(&mut conn)?;
            self.write_cover.load(&mut conn)?;
            self.complete.load(&mut conn)?;
            bump(&self.metrics.reconnects, 1);
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    /// Sends the batch until every op has an outcome: a paper whose writes Redis
    /// refuses for good fails alone, at once; what failed for a reason retrying
    /// can cure is sent again (writes are idempotent by version). `None` when the
    /// server is stopping and its time to flush is up.
    fn write_until_done(&mut self, batch: &[Queued]) -> Option<Vec<Reported>> {
        let mut outcomes: Vec<Option<Reported>> = vec![None; batch.len()];
        let mut backoff = Duration::from_millis(50);
        loop {
            let oldest = batch.first().map_or(Duration::ZERO, |q| q.at.elapsed());
            self.metrics.oldest_age_ms.store(oldest.as_millis() as u64, Ordering::Relaxed);
            match self.try_write(batch, &mut outcomes) {
                Ok(()) if outcomes.iter().all(Option::is_some) => {
                    self.redis_is_up();
                    bump(&self.metrics.batches, 1);
                    return Some(outcomes.into_iter().map(|o| o.expect("checked")).collect());
                }
                // Some papers must be sent again; Redis itself answers.
                Ok(()) => bump(&self.metrics.errors, 1),
                Err(e) => {
                    bump(&self.metrics.errors, 1);
                    self.redis_is_down(&e);
                }
            }
            if self.give_up_at.get().is_some_and(|at| Instant::now() >= *at) {
                return None;
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

    /// One pipeline for the ops of `batch` still without an outcome: per paper,
    /// one script call with its notes (the last write of each note only: the
    /// earlier ones are older versions of it), then its completion if there is
    /// one; then presence and relayed messages, in the order they were accepted,
    /// so that a node reading the paper on receipt finds the writes there.
    ///
    /// # Errors
    /// The connection failed, or the replicas did not take the batch: nothing
    /// of it counts as written.
    fn try_write(&mut self, batch: &[Queued], outcomes: &mut [Option<Reported>]) -> redis::RedisResult<()> {
        struct PaperWrites<'a> {
            paper: &'a str,
            /// Note id -> index in `notes`.
            index: HashMap<&'a str, usize>,
            notes: Vec<NoteWrite<'a>>,
            /// The last cover of the batch (value, v, node, relay) and every op of it.
            cover: Option<(String, u64, &'a str, &'a str, Vec<usize>)>,
            complete: Option<(usize, &'a str)>,
        }
        impl PaperWrites<'_> {
            /// Every op of the paper in this batch.
            fn ops(&self) -> Vec<usize> {
                let notes = self.notes.iter().flat_map(|n| n.ops.iter().copied());
                let cover = self.cover.iter().flat_map(|c| c.4.iter().copied());
                notes.chain(cover).chain(self.complete.map(|(i, _)| i)).collect()
            }
        }
        let mut papers: Vec<PaperWrites> = Vec::new();
        let mut by_paper: HashMap<&str, usize> = HashMap::new();
        let mut relays = Vec::new();
        for (i, Queued { op, .. }) in batch.iter().enumerate() {
            if outcomes[i].is_some() {
                continue;
            }
            let at = *by_paper.entry(op.paper()).or_insert_with(|| {
                papers.push(PaperWrites {
                    paper: op.paper(),
                    index: HashMap::new(),
                    notes: Vec::new(),
                    cover: None,
                    complete: None,
                });
                papers.len() - 1
            });
            let writes = &mut papers[at];
            match op {
                Op::Note { id, note, relay, .. } => {
                    let value =
                        encode_note(&note.author, note.data.as_deref(), note.fields.as_deref(), &note.node, note.v);
                    let relay = relay.as_deref().unwrap_or_default();
                    // A whole write replaces an earlier whole write of the note in
                    // the batch (an older version of it); patches are each sent.
                    match writes.index.get(&**id).filter(|&&slot| writes.notes[slot].kind == WHOLE) {
                        Some(&slot) => {
                            let entry = &mut writes.notes[slot];
                            (entry.value, entry.v, entry.node, entry.relay) = (value, note.v, &note.node, relay);
                            entry.ops.push(i);
                        }
                        None => {
                            writes.index.insert(id, writes.notes.len());
                            let entry =
                                NoteWrite { kind: WHOLE, id, value, v: note.v, node: &note.node, relay, ops: vec![i] };
                            writes.notes.push(entry);
                        }
                    }
                }
                Op::Patch { id, patch, v, node, relay, .. } => {
                    writes.index.insert(id, writes.notes.len());
                    let relay = relay.as_deref().unwrap_or_default();
                    let value = patch.to_string();
                    writes.notes.push(NoteWrite { kind: PATCH, id, value, v: *v, node, relay, ops: vec![i] });
                }
                Op::Cover { cover, relay, .. } => {
                    let value = encode_cover(cover.data.as_deref().unwrap_or("{}"), &cover.node, cover.v);
                    let relay = relay.as_deref().unwrap_or_default();
                    let mut ops = writes.cover.take().map_or_else(Vec::new, |c| c.4);
                    ops.push(i);
                    writes.cover = Some((value, cover.v, &cover.node, relay, ops));
                }
                Op::Complete { by, .. } => writes.complete = Some((i, by)),
                Op::Relay { .. } => relays.push(i),
            }
        }

        let now = now_ms();
        let mut pipe = redis::pipe();
        let mut commands = 0;
        pipe.ignore_errors();
        for writes in &papers {
            if !writes.notes.is_empty() {
                commands += 1;
                let channel = if self.node.is_some() { keys::channel(writes.paper) } else { String::new() };
                let cmd = pipe.cmd("EVALSHA").arg(self.write_notes.get_hash()).arg(3);
                cmd.arg(keys::notes(writes.paper)).arg(keys::meta(writes.paper)).arg(keys::tombstones(writes.paper));
                cmd.arg(now).arg(channel).arg(self.history.retention).arg(self.history.max_tombstones);
                for note in &writes.notes {
                    cmd.arg(note.kind).arg(note.id).arg(&note.value).arg(note.v).arg(note.node).arg(note.relay);
                }
            }
            if let Some((value, v, node, relay, _)) = &writes.cover {
                commands += 1;
                let channel = if self.node.is_some() { keys::channel(writes.paper) } else { String::new() };
                pipe.cmd("EVALSHA").arg(self.write_cover.get_hash()).arg(1).arg(keys::meta(writes.paper));
                pipe.arg(value).arg(*v).arg(*node).arg(channel).arg(*relay);
            }
            if let Some((_, by)) = writes.complete {
                commands += 1;
                let (channel, prefix) = match &self.node {
                    Some(node) => (keys::channel(writes.paper), format!("{node}\n")),
                    None => (String::new(), String::new()),
                };
                pipe.cmd("EVALSHA")
                    .arg(self.complete.get_hash())
                    .arg(4)
                    .arg(keys::notes(writes.paper))
                    .arg(keys::meta(writes.paper))
                    .arg(keys::COMPLETED_STREAM)
                    .arg(keys::tombstones(writes.paper))
                    .arg(writes.paper)
                    .arg(by)
                    .arg(now)
                    .arg(self.retention_secs)
                    .arg(channel)
                    .arg(prefix);
            }
        }
        for &i in &relays {
            let op = &batch[i].op;
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

        let conn = self.connection()?;
        let mut replies: std::vec::IntoIter<redis::RedisResult<Value>> =
            pipe.query::<Vec<redis::RedisResult<Value>>>(conn)?.into_iter();
        bump(&self.metrics.commands, commands);
        if self.wait_replicas > 0 {
            // The pipeline ends with WAIT: the batch is written once enough replicas have it.
            let acked = match replies.as_slice().last() {
                Some(Ok(Value::Int(n))) => *n,
                _ => 0,
            };
            if acked < self.wait_replicas as i64 {
                let detail = format!("WAIT: {acked} of {} replicas have the batch", self.wait_replicas);
                return Err(redis::RedisError::from((redis::ErrorKind::Io, "replication", detail)));
            }
        }
        let mut transient = None;
        for writes in &papers {
            let mut failure = None;
            if !writes.notes.is_empty() {
                match replies.next() {
                    Some(Ok(Value::Array(codes))) if codes.len() == writes.notes.len() => {
                        for (NoteWrite { ops, .. }, code) in writes.notes.iter().zip(codes) {
                            let reported = match code {
                                Value::Int(3) => Reported::Op(Outcome::Sealed),
                                Value::Int(4) => Reported::Failed("at or below the tombstone horizon".into()),
                                Value::Int(5) => Reported::Failed("a patch of a note Redis does not hold".into()),
                                _ => Reported::Op(Outcome::Saved),
                            };
                            for &i in ops {
                                outcomes[i] = Some(reported.clone());
                            }
                        }
                    }
                    Some(Err(e)) => failure = Some(e),
                    other => failure = Some(unexpected(other)),
                }
            }
            if let Some((.., ops)) = &writes.cover {
                match replies.next() {
                    Some(Ok(Value::Int(code))) => {
                        let outcome = if code == 3 { Outcome::Sealed } else { Outcome::Saved };
                        for &i in ops {
                            outcomes[i] = Some(Reported::Op(outcome));
                        }
                    }
                    Some(Err(e)) => failure = failure.or(Some(e)),
                    other => failure = failure.or(Some(unexpected(other))),
                }
            }
            if let Some((i, _)) = writes.complete {
                match replies.next() {
                    Some(Ok(Value::Array(reply))) => match (reply.first(), reply.get(1)) {
                        (Some(Value::BulkString(notes)), Some(Value::BulkString(by))) => {
                            let notes = String::from_utf8_lossy(notes).into_owned();
                            let by = String::from_utf8_lossy(by).into_owned();
                            outcomes[i] = Some(Reported::Sealed { notes, by });
                        }
                        _ => failure = failure.or(Some(unexpected(Some(Ok(Value::Array(reply)))))),
                    },
                    Some(Err(e)) => failure = failure.or(Some(e)),
                    other => failure = failure.or(Some(unexpected(other))),
                }
            }
            let Some(e) = failure else { continue };
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
        for &i in &relays {
            let op = &batch[i].op;
            let mut failure = None;
            if let Op::Relay { presence: Some(_), .. } = op {
                if let Some(Err(e)) = replies.next() {
                    failure = Some(e);
                }
            }
            if let Some(Err(e)) = replies.next() {
                failure = failure.or(Some(e));
            }
            match failure {
                // Sent again with the next try (presence is idempotent).
                Some(e) if is_transient(&e) => {
                    transient.get_or_insert(e);
                }
                Some(e) => {
                    log::warn!("cannot relay a message on paper {}: {e}", op.paper());
                    outcomes[i] = Some(Reported::Op(Outcome::Saved));
                }
                None => outcomes[i] = Some(Reported::Op(Outcome::Saved)),
            }
        }
        if let Some(e) = transient {
            self.report_outage(&e);
        }
        Ok(())
    }

    /// Tells each loop what became of its ops, and frees their backlog room.
    fn acknowledge(&self, batch: &mut Vec<Queued>, outcomes: Vec<Reported>) {
        let mut per_loop: Vec<Vec<Written>> = vec![Vec::new(); self.loops.count()];
        let mut failed_papers: Vec<(Arc<str>, usize, String)> = Vec::new();
        let count = batch.len();
        for (Queued { op, at }, reported) in batch.drain(..).zip(outcomes) {
            self.metrics.write_latency(at.elapsed());
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
        self.pending.fetch_sub(count, Ordering::AcqRel);
        bump(&self.metrics.ops_written, count as u64);
        self.metrics.oldest_age_ms.store(0, Ordering::Relaxed);
        for (paper, index, error) in failed_papers {
            self.loops.report(index, StoreEvent::Failed { paper, error });
        }
        for (index, written) in per_loop.into_iter().enumerate() {
            if !written.is_empty() {
                self.loops.report(index, StoreEvent::Written(written));
            }
        }
    }
}

/// The last write of one note in a batch (the earlier ones are older versions
/// of it), and every op of that note.
struct NoteWrite<'a> {
    /// `WHOLE` (an upsert or a delete) or `PATCH`.
    kind: &'static str,
    id: &'a str,
    value: String,
    v: u64,
    node: &'a str,
    /// The message relayed to the other nodes if Redis applies it ("" without).
    relay: &'a str,
    ops: Vec<usize>,
}

/// The kinds of note writes the write script takes.
const WHOLE: &str = "w";
const PATCH: &str = "p";

/// How many tombstones a paper keeps, and for how long (in versions).
#[derive(Debug, Clone, Copy)]
pub struct History {
    pub retention: u64,
    pub max_tombstones: usize,
}

/// What the writer learnt of one op.
#[derive(Debug, Clone)]
enum Reported {
    Op(Outcome),
    /// A completion: the paper as sealed.
    Sealed {
        notes: String,
        by: String,
    },
    /// Refused for good, with Redis's error.
    Failed(String),
}

fn unexpected(reply: Option<redis::RedisResult<Value>>) -> redis::RedisError {
    let detail = format!("unexpected reply {reply:?}");
    redis::RedisError::from((redis::ErrorKind::Io, "unexpected reply", detail))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
