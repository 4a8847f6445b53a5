-- write_notes: loaded by src/store/writer.rs (see the doc comment there).
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
    -- A patch changes the fields it advances of a live note; the note must be
    -- there (5: deleted, as a delete from another node that won the race leaves
    -- it; 6: absent, or a value the loader cannot read).
    if current and string.sub(current, 1, 15) == '{"deleted":true' then
      code = 5
    elseif not current or not readable(current) then
      code = 6
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
-- A call with no note only drops tombstones: it is no write of the paper.
if #ARGV > 4 then
  redis.call('HSET', meta, 'max_v', string.format('%.0f', max_v), 'resume_floor', string.format('%.0f', floor))
  redis.call('HSETNX', meta, 'created_ms', ARGV[1])
  redis.call('HSETNX', meta, 'completed', '0')
  redis.call('HSET', meta, 'updated_ms', ARGV[1])
end
return out
