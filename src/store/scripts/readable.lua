-- readable: loaded by src/store/calls.rs (see the doc comment there).
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
