-- presence: loaded by src/store/calls.rs (see the doc comment there).
local members, erased = KEYS[1], KEYS[2]
local member, entry, ttl_ms = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', erased) == 1 then return 0 end
if entry == '' then
  redis.call('HDEL', members, member)
else
  redis.call('HSET', members, member, entry)
end
-- A node killed holding the paper never removes its entries.
redis.call('PEXPIRE', members, ttl_ms)
return 1
