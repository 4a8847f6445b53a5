-- revoke: loaded by src/store/calls.rs (see the doc comment there).
local revoked, erased = KEYS[1], KEYS[2]
local user, ends, now, channel, relay = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
if redis.call('EXISTS', erased) == 1 then return 7 end
redis.call('HSET', revoked, user, ARGV[2])
-- Expired revocations go; the key lives as long as the last of the others.
local last = 0
local all = redis.call('HGETALL', revoked)
for i = 1, #all, 2 do
  local t = tonumber(all[i + 1])
  if not t or t <= now then
    redis.call('HDEL', revoked, all[i])
  elseif t > last then
    last = t
  end
end
if last > 0 then redis.call('EXPIREAT', revoked, last) end
if channel ~= '' and relay ~= '' then redis.call('PUBLISH', channel, relay) end
return 1
