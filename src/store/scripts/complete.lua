-- complete: loaded by src/store/calls.rs (see the doc comment there).
local notes, meta, tombstones, erased, stream = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local paper, by, now, retention, channel, prefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if redis.call('EXISTS', erased) == 1 then return {'', '', '', 'erased'} end
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
  local snapshot = '{"paper":"' .. paper .. '","completed":true,"meta":' .. cover .. ',"notes":' .. list .. '}'
  if stream then
    redis.call('XADD', stream, '*', 'paper', paper, 'snapshot', snapshot)
  else
    redis.call('HSET', meta, 'handoff_pending', snapshot)
  end
  if channel ~= '' then
    redis.call('PUBLISH', channel, prefix .. '{"type":"completed","by":' .. cjson.encode(by) .. ',"notes":' .. list .. '}')
  end
else
  by = redis.call('HGET', meta, 'completed_by') or by
end
redis.call('EXPIRE', notes, retention)
redis.call('EXPIRE', meta, retention)
redis.call('EXPIRE', tombstones, retention)
return {list, by, redis.call('HGET', meta, 'handoff_pending') or ''}
