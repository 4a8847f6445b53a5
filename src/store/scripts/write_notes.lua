-- write_notes: loaded by src/store/calls.rs (see the doc comment there).
local notes, meta, tombstones = KEYS[1], KEYS[2], KEYS[3]
local now, channel, retention, max_tombstones = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local window = 61440000 -- the resume window: 60 s of versions
-- Removed fields whose versions a note keeps, and the bytes of their keys (as
-- stored, quotes included): MAX_REMOVED and MAX_REMOVED_KEY_BYTES of src/paper/fields.rs.
local MAX_REMOVED = 64
local MAX_REMOVED_KEY_BYTES = 4096

local function version(raw) -- [v,"node"]
  local v, n = string.match(raw or '', '^%[(%d+),"([%w_%-]*)"%]$')
  return tonumber(v), n
end

local function newer(v1, n1, v2, n2)
  return v1 > v2 or (v1 == v2 and n1 > n2)
end

local function digits(v)
  return string.format('%.0f', v)
end

-- A live note, parsed once per call and changed in place by the call's ops:
-- author (raw JSON), data (raw key -> raw value), the version of its last
-- upsert (bv, bn), the fields changed after it (raw key -> {v, node}), the
-- floor of removed fields (fv, fn, or nil), its version (v, n), and how many
-- changed fields are removed ones and their key bytes (removed, bytes).
-- `low` says a removed field may be at or below the floor.
local function count_removed(note)
  note.removed, note.bytes, note.low = 0, 0, false
  for k, c in pairs(note.changed) do
    if not note.data[k] then
      note.removed = note.removed + 1
      note.bytes = note.bytes + #k
      if note.fv and not newer(c[1], c[2], note.fv, note.fn) then note.low = true end
    end
  end
end

local function data_of(raw)
  local list = members(raw or '{}')
  if not list then return nil end
  local data = {}
  for _, m in ipairs(list) do data[m[1]] = m[2] end
  return data
end

-- A stored live value that `readable` accepted, with its version (v, n); nil
-- when its fields or versions cannot be read.
local function parse(value, v, n)
  local t = top(value)
  local data = data_of(t['"data"'])
  if not data then return nil end
  local note = {author = t['"author"'] or '""', data = data, changed = {}, v = v, n = n}
  if t['"fv"'] then
    local fv = top(t['"fv"'])
    note.bv, note.bn = version(fv['"base"'])
    local changed = members(fv['"changed"'] or '{}')
    if not note.bv or not changed then return nil end
    for _, c in ipairs(changed) do
      local cv, cn = version(c[2])
      if not cv then return nil end
      note.changed[c[1]] = {cv, cn}
    end
    if fv['"floor"'] then
      local floor_v, floor_n = version(fv['"floor"'])
      if not floor_v then return nil end
      -- A floor says something only of what is above the last upsert.
      if newer(floor_v, floor_n, note.bv, note.bn) then note.fv, note.fn = floor_v, floor_n end
    end
  else
    note.bv, note.bn = v, n
  end
  count_removed(note)
  return note
end

-- Folds the versions of removed fields into the floor (PROTOCOL.md 2, 1.2), as
-- fields::fold does: by (version, node), the oldest go until at most
-- MAX_REMOVED remain with at most MAX_REMOVED_KEY_BYTES of keys, the floor
-- rising to the greatest that went; those at or below the floor go too. So
-- removals of one version go together, whatever their keys.
local function fold(note)
  if note.removed <= MAX_REMOVED and note.bytes <= MAX_REMOVED_KEY_BYTES and not note.low then return end
  -- Removed fields by version: only the versions need sorting.
  local by_version, groups = {}, {}
  for k, c in pairs(note.changed) do
    if not note.data[k] then
      local by_node = by_version[c[1]]
      if not by_node then
        by_node = {}
        by_version[c[1]] = by_node
      end
      local group = by_node[c[2]]
      if not group then
        group = {v = c[1], n = c[2]}
        by_node[c[2]] = group
        groups[#groups + 1] = group
      end
      group[#group + 1] = k
    end
  end
  table.sort(groups, function(a, b) return newer(b.v, b.n, a.v, a.n) end)
  local count, bytes, fv, fn = note.removed, note.bytes, note.fv, note.fn
  for _, group in ipairs(groups) do
    if not fv or newer(group.v, group.n, fv, fn) then
      if count <= MAX_REMOVED and bytes <= MAX_REMOVED_KEY_BYTES then break end
      fv, fn = group.v, group.n
    end
    for _, k in ipairs(group) do
      note.changed[k] = nil
      count = count - 1
      bytes = bytes - #k
    end
  end
  note.removed, note.bytes, note.fv, note.fn, note.low = count, bytes, fv, fn, false
end

-- A patch (raw object; null removes a field) at (v, node) on a parsed note, as
-- fields::merge_patch: each field it names, if the patch is newer than that
-- field (a field the note does not have is at the floor when that is above
-- the last upsert). Returns whether it advanced any field.
local function apply_patch(note, patch, v, node)
  local fields = members(patch)
  if not fields then return false end
  local advanced = false
  for _, f in ipairs(fields) do
    local k, value = f[1], f[2]
    local c, had = note.changed[k], note.data[k] ~= nil
    local fv, fn = note.bv, note.bn
    if c then fv, fn = c[1], c[2] elseif not had and note.fv then fv, fn = note.fv, note.fn end
    if newer(v, node, fv, fn) then
      advanced = true
      if c and not had then
        note.removed = note.removed - 1
        note.bytes = note.bytes - #k
      end
      note.changed[k] = {v, node}
      if value == 'null' then
        note.data[k] = nil
        note.removed = note.removed + 1
        note.bytes = note.bytes + #k
        if note.fv and not newer(v, node, note.fv, note.fn) then note.low = true end
      else
        note.data[k] = value
      end
    end
  end
  if not advanced then return false end
  if newer(v, node, note.v, note.n) then note.v, note.n = v, node end
  fold(note)
  return true
end

-- An upsert (a whole value) at (v, node) newer than a note's last upsert but not
-- than all its fields, as fields::merge_upsert: the fields patched after it
-- keep their values (or their removal), and the floor stays while it is above
-- it. The merged note, or nil when the value cannot be read.
local function merge_upsert(note, value, v, node)
  local u = top(value)
  local data = data_of(u['"data"'])
  if not data then return nil end
  local merged = {author = u['"author"'] or '""', data = data, changed = {}, bv = v, bn = node, v = v, n = node}
  for k, c in pairs(note.changed) do
    if newer(c[1], c[2], v, node) then
      merged.changed[k] = c
      data[k] = note.data[k]
      if newer(c[1], c[2], merged.v, merged.n) then merged.v, merged.n = c[1], c[2] end
    end
  end
  if note.fv and newer(note.fv, note.fn, v, node) then
    merged.fv, merged.fn = note.fv, note.fn
    if newer(note.fv, note.fn, merged.v, merged.n) then merged.v, merged.n = note.fv, note.fn end
  end
  count_removed(merged)
  fold(merged)
  return merged
end

-- Raw JSON keys in the order serde_json's maps write them (by the key's bytes,
-- read between the quotes; keys with escapes may differ, which no reader minds).
local function sorted_keys(t)
  local inner = {}
  for k in pairs(t) do inner[#inner + 1] = string.sub(k, 2, -2) end
  table.sort(inner)
  return inner
end

-- A parsed note as codec::encode_note writes it.
local function encode(note)
  local parts, cs = {}, {}
  for j, k in ipairs(sorted_keys(note.data)) do parts[j] = '"' .. k .. '":' .. note.data['"' .. k .. '"'] end
  for j, k in ipairs(sorted_keys(note.changed)) do
    local c = note.changed['"' .. k .. '"']
    cs[j] = '"' .. k .. '":[' .. digits(c[1]) .. ',"' .. c[2] .. '"]'
  end
  local out = '{"author":' .. note.author .. ',"data":{' .. table.concat(parts, ',') .. '}'
  if #cs > 0 or note.fv then
    out = out .. ',"fv":{"base":[' .. digits(note.bv) .. ',"' .. note.bn .. '"],"changed":{' .. table.concat(cs, ',') .. '}'
    if note.fv then out = out .. ',"floor":[' .. digits(note.fv) .. ',"' .. note.fn .. '"]' end
    out = out .. '}'
  end
  if note.n ~= '' then out = out .. ',"node":"' .. note.n .. '"' end
  return out .. ',"v":' .. digits(note.v) .. '}'
end

local function is_tombstone(value)
  return string.sub(value, 1, 15) == '{"deleted":true'
end

-- Each note the call touches: read once, parsed when an op needs it, written
-- once at the end. `raw` is the stored or written value until a merge makes
-- `note` the truth; `ok` caches `readable` (with v, n).
local states, touched = {}, {}
local function state(id)
  local s = states[id]
  if not s then
    s = {raw = redis.call('HGET', notes, id) or nil}
    states[id], touched[#touched + 1] = s, id
  end
  return s
end

local function check(s)
  if s.note then return s.note.v, s.note.n end
  if s.ok == nil then
    s.v, s.n = readable(s.raw)
    s.ok = s.v ~= nil
  end
  if s.ok then return s.v, s.n end
end

local function parsed(s)
  if not s.note and s.parse_failed == nil then
    s.note = parse(s.raw, s.v, s.n)
    s.parse_failed = s.note == nil
  end
  return s.note
end

local out = {}
-- An erased paper is written no more (PROTOCOL.md 7): not by a late write, nor
-- by a backlog replayed after an outage, nor by a tombstone prune.
if redis.call('EXISTS', KEYS[4]) == 1 then
  for i = 5, #ARGV, 7 do out[#out + 1] = 7 end
  return out
end
-- A sealed paper's notes are what its stream entry says: late writes stay out.
if redis.call('HGET', meta, 'completed') == '1' then
  for i = 5, #ARGV, 7 do out[#out + 1] = 3 end
  return out
end
local horizon = tonumber(redis.call('HGET', meta, 'horizon') or '0') or 0
local max_v = tonumber(redis.call('HGET', meta, 'max_v') or '0') or 0
local floor = tonumber(redis.call('HGET', meta, 'resume_floor') or '0') or 0
for i = 5, #ARGV, 7 do
  local kind, id, value, v, node, relay = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]), ARGV[i + 4], ARGV[i + 5]
  local held = tonumber(ARGV[i + 6]) or 0
  local code = 1
  local s = state(id)
  local merged = nil
  local present = s.raw or s.note
  if kind == 'p' then
    -- A patch changes the fields it advances of a live note; the note must be
    -- there (5: deleted, as a delete from another node that won the race leaves
    -- it, or absent while the version its node held is at or below the horizon,
    -- which may have dropped that delete; 6: absent, or a value the loader
    -- cannot read).
    if not s.note and s.raw and is_tombstone(s.raw) then
      code = 5
    elseif not present and held > 0 and held <= horizon then
      code = 5
    elseif not present or not check(s) then
      code = 6
    else
      -- A value whose fields cannot be walked is one this script cannot patch:
      -- as good as unreadable, never a silent `saved`.
      local note = parsed(s)
      if not note then
        code = 6
      elseif apply_patch(note, value, v, node) then
        merged = note
      else
        code = 2
      end
    end
  elseif present then
    -- The end of the value says which is newer; only a stored value that looks
    -- newer is read whole, to check that it counts.
    local tail_v, tail_node
    if s.note then
      tail_v, tail_node = s.note.v, s.note.n
    else
      tail_v = tonumber(string.match(s.raw, '"v":(%d+)}$'))
      tail_node = string.match(s.raw, '"node":"([%w_%-]*)","v":%d+}$') or ''
    end
    if tail_v and (tail_v > v or (tail_v == v and tail_node >= node)) then
      local stored_v, stored_node = check(s)
      if stored_v and (stored_v > v or (stored_v == v and stored_node >= node)) then
        code = 2
        -- Fields patched after their last upsert: a newer upsert or delete is
        -- weighed against that upsert, field by field.
        local note = not (s.raw and is_tombstone(s.raw)) and parsed(s)
        if note and (next(note.changed) or note.fv) and newer(v, node, note.bv, note.bn) then
          if is_tombstone(value) then
            code = 1
          else
            merged = merge_upsert(note, value, v, node)
            if merged then code = 1 end
          end
        end
      end
    end
  elseif v <= horizon then
    -- Below the horizon, a note that is not there may have been dropped: a
    -- write could bring it back. A delete of it changes nothing: the note is
    -- gone either way (2).
    if is_tombstone(value) then code = 2 else code = 4 end
  end
  if code == 1 then
    if merged then
      s.note, s.raw = merged, nil
    else
      s.raw, s.note, s.ok, s.v, s.n, s.parse_failed = value, nil, true, v, node, nil
    end
    s.dirty = true
    if v + window < max_v and max_v > floor then floor = max_v end
    if v > max_v then max_v = v end
    if channel ~= '' and relay ~= '' then redis.call('PUBLISH', channel, relay) end
  end
  out[#out + 1] = code
end
-- Each changed note is encoded and written once, its tombstone entry with it.
for _, id in ipairs(touched) do
  local s = states[id]
  if s.dirty then
    local value = s.note and encode(s.note) or s.raw
    redis.call('HSET', notes, id, value)
    if not s.note and is_tombstone(value) then
      redis.call('ZADD', tombstones, digits(s.v), id)
    else
      redis.call('ZREM', tombstones, id)
    end
  end
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
