-- erase: loaded by src/store/calls.rs (see the doc comment there).
local erased = KEYS[6]
local retention_ms, channel, relay = ARGV[1], ARGV[2], ARGV[3]
redis.call('SET', erased, '1', 'PX', retention_ms)
-- UNLINK: a paper's notes (up to max_notes and max_tombstones values) are
-- freed in the background, so the call itself stays short.
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
if channel ~= '' and relay ~= '' then redis.call('PUBLISH', channel, relay) end
return 1
