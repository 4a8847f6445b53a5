-- write_cover: loaded by src/store/calls.rs (see the doc comment there).
local meta = KEYS[1]
local value, v, node, channel, relay, now = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if redis.call('EXISTS', KEYS[2]) == 1 then return 7 end
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
-- A cover is a write of the paper, as a note is (PROTOCOL.md 4).
redis.call('HSETNX', meta, 'created_ms', now)
redis.call('HSETNX', meta, 'completed', '0')
redis.call('HSET', meta, 'updated_ms', now)
if channel ~= '' and relay ~= '' then redis.call('PUBLISH', channel, relay) end
return 1
