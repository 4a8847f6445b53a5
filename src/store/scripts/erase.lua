-- erase: loaded by src/store/writer.rs (see the doc comment there).
local erased = KEYS[6]
local retention_ms, channel, relay = ARGV[1], ARGV[2], ARGV[3]
redis.call('SET', erased, '1', 'PX', retention_ms)
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
if channel ~= '' and relay ~= '' then redis.call('PUBLISH', channel, relay) end
return 1
