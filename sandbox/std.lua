-- std: the scripts' standard library (SPEC.md, "The standard library"), as `std` in every script's
-- environment. The helpers every example used to copy: a buffered reader, quoting as the log quotes, an
-- ordered JSON encoder, base64, and a pacer that answers pipelined commands in one write.
--
-- Pure Lua. The bootstrap loads this chunk once per Lua state into an environment that holds only what a
-- script gets itself (the same library copies, the hardened base functions) plus plain data: it has no
-- power a script lacks. Its functions run when the script calls them, on the script's thread, so every
-- instruction is counted by the script's budget and every byte by its memory cap. `build(deadend)` makes
-- one session's `std` from that session's API functions, captured once: a script that replaces
-- `deadend.recv` afterwards changes nothing here.

local byte, char, sub, find, format, gsub, unpack_ =
  string.byte, string.char, string.sub, string.find, string.format, string.gsub, string.unpack
local concat, sort = table.concat, table.sort
local math_type, tointeger, random, huge = math.type, math.tointeger, math.random, math.huge

-- What a library call may be given, in the API's words; errors name the script's line: level 3 is the
-- caller of the library function that calls this, one more for each checking helper in between.
local function argerror(i, fname, msg, level)
  error(format("bad argument #%d to '%s' (%s)", i, fname, msg), level or 3)
end

local function integer(fname, i, v, lo, hi, default)
  if v == nil and default ~= nil then return default end
  if type(v) ~= "number" then argerror(i, fname, "number expected, got " .. (v == nil and "no value" or type(v)), 4) end
  local n = tointeger(v)
  if n == nil then argerror(i, fname, "number has no integer representation", 4) end
  if n < lo or (hi ~= nil and n > hi) then
    argerror(i, fname, hi ~= nil and format("out of range: must be %d..%d", lo, hi)
      or format("out of range: must be >= %d", lo), 4)
  end
  return n
end

local function text(fname, i, v)
  if type(v) == "number" then return tostring(v) end
  if type(v) ~= "string" then argerror(i, fname, "string expected, got " .. (v == nil and "no value" or type(v)), 4) end
  return v
end

-- ==== UTF-8, as Python's strict decoder reads it ==========================================================
-- The code point of the well-formed sequence at i and its length, or nil: no overlong forms, no
-- surrogates, nothing past U+10FFFF. A byte that starts no well-formed sequence stands for itself.
local function decode(s, i)
  local a = byte(s, i)
  if a < 0xC2 or a > 0xF4 then return nil end
  local b = byte(s, i + 1)
  if b == nil then return nil end
  if a < 0xE0 then
    if b < 0x80 or b > 0xBF then return nil end
    return (a & 0x1F) << 6 | (b & 0x3F), 2
  end
  local lo, hi = 0x80, 0xBF
  if a == 0xE0 then lo = 0xA0 elseif a == 0xED then hi = 0x9F
  elseif a == 0xF0 then lo = 0x90 elseif a == 0xF4 then hi = 0x8F end
  if b < lo or b > hi then return nil end
  local c = byte(s, i + 2)
  if c == nil or c < 0x80 or c > 0xBF then return nil end
  if a < 0xF0 then return (a & 0x0F) << 12 | (b & 0x3F) << 6 | (c & 0x3F), 3 end
  local d = byte(s, i + 3)
  if d == nil or d < 0x80 or d > 0xBF then return nil end
  return (a & 0x07) << 18 | (b & 0x3F) << 12 | (c & 0x3F) << 6 | (d & 0x3F), 4
end

-- ==== quote: a value as the log shows it ==================================================================
-- deadend.logs.sanitize(value, max, quote=True) between double quotes (a test compares the two on many
-- strings): control characters, `"`, `\` and every character the log escapes (UNSAFE: the broker's
-- Unicode table, packed by deadend.wire) become escapes; bytes that are not UTF-8 become \xNN; past `max`
-- input bytes, or `max` bytes of escaped text, the text is cut at a whole escape and marked.
local RANGES = #UNSAFE // 6
local CUT = "\u{2026}[cut]"

local function unsafe(code)
  local lo, hi = 1, RANGES
  while lo <= hi do
    local mid = (lo + hi) // 2
    local first, last = unpack_("<I3I3", UNSAFE, mid * 6 - 5)
    if code < first then hi = mid - 1 elseif code > last then lo = mid + 1 else return true end
  end
  return false
end

local ASCII_ESCAPES = { ["\\"] = "\\\\", ['"'] = '\\"' }
for b = 0, 31 do ASCII_ESCAPES[char(b)] = format("\\x%02x", b) end
ASCII_ESCAPES["\127"] = "\\x7f"

local function escape(s)
  local out, n, i = {}, 0, 1
  while true do
    local j = find(s, "[\128-\255]", i)
    n = n + 1
    out[n] = gsub(sub(s, i, (j or 0) - 1), '[%c"\\]', ASCII_ESCAPES)
    if j == nil then return concat(out, "", 1, n) end
    local code, width = decode(s, j)
    n = n + 1
    if code == nil then
      out[n], i = format("\\x%02x", byte(s, j)), j + 1
    elseif unsafe(code) then
      out[n] = code < 0x100 and format("\\x%02x", code) or code < 0x10000 and format("\\u%04x", code)
        or format("\\U%08x", code)
      i = j + width
    else
      out[n], i = sub(s, j, j + width - 1), j + width
    end
  end
end

-- The longest prefix of escaped text within `max` bytes that splits neither an escape nor a character.
local ESCAPE_WIDTH = { ["\\"] = 2, ['"'] = 2, x = 4, u = 6, U = 10 }
local function cut(s, max)
  local i = 1
  while true do
    local width
    local b = byte(s, i)
    if b == 92 then width = ESCAPE_WIDTH[sub(s, i + 1, i + 1)]
    else width = b < 0x80 and 1 or b < 0xE0 and 2 or b < 0xF0 and 3 or 4 end
    if i + width - 1 > max then return sub(s, 1, i - 1) end
    i = i + width
  end
end

local function quote(value, max)
  if value == nil then return "-" end
  if type(value) == "boolean" then value = tostring(value) end
  local s = text("quote", 1, value)
  max = integer("quote", 2, max, 0, nil, 256)
  local marked = #s > max
  local shown = escape(sub(s, 1, max))
  if #shown > max then shown, marked = cut(shown, max), true end
  return '"' .. shown .. (marked and CUT or "") .. '"'
end

-- ==== json: an encoder that keeps the order it is given ===================================================
-- Plain tables: a sequence (keys 1..n) is an array, anything else an object with its string keys sorted
-- (so the text is the same every run). std.json.object(k1, v1, ...) keeps its keys in the order given,
-- std.json.array(...) is an array even when empty, std.json.null stands for null.
local ordered = setmetatable({}, { __mode = "k" })  -- object or array -> its items, as given
local null = setmetatable({}, {
  __metatable = "std.json.null",
  __tostring = function() return "null" end,
  __newindex = function() error("std.json.null cannot be changed", 2) end,
})
local MAX_DEPTH = 64

local JSON_ESCAPES = { ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f", ["\n"] = "\\n",
  ["\r"] = "\\r", ["\t"] = "\\t" }
for b = 0, 31 do JSON_ESCAPES[char(b)] = JSON_ESCAPES[char(b)] or format("\\u%04x", b) end
JSON_ESCAPES["\127"] = "\\u007f"

-- A JSON string: UTF-8 kept, what is not UTF-8 replaced by U+FFFD (JSON text must be UTF-8).
local function json_string(s)
  local out, n, i = {}, 0, 1
  while true do
    local j = find(s, "[\128-\255]", i)
    n = n + 1
    out[n] = gsub(sub(s, i, (j or 0) - 1), '[%c"\\]', JSON_ESCAPES)
    if j == nil then return '"' .. concat(out, "", 1, n) .. '"' end
    local code, width = decode(s, j)
    n = n + 1
    if code == nil then out[n], i = "\\ufffd", j + 1 else out[n], i = sub(s, j, j + width - 1), j + width end
  end
end

local function json_number(v)
  if math_type(v) == "integer" then return format("%d", v) end
  if v ~= v or v == huge or v == -huge then error("std.json.encode: " .. tostring(v) .. " is not a JSON number", 0) end
  local shown = format("%.14g", v)
  if tonumber(shown) ~= v then shown = format("%.17g", v) end
  return shown
end

local encode_value
local function encode_table(t, depth, out)
  if depth > MAX_DEPTH then error(format("std.json.encode: nested deeper than %d (a cycle?)", MAX_DEPTH), 0) end
  local items = ordered[t]
  if items ~= nil and items.object then
    out[#out + 1] = "{"
    for i = 1, items.n, 2 do
      if i > 1 then out[#out + 1] = "," end
      out[#out + 1] = json_string(items[i])
      out[#out + 1] = ":"
      encode_value(items[i + 1], depth + 1, out)
    end
    out[#out + 1] = "}"
    return
  end
  if items ~= nil then
    out[#out + 1] = "["
    for i = 1, items.n do
      if i > 1 then out[#out + 1] = "," end
      encode_value(items[i], depth + 1, out)
    end
    out[#out + 1] = "]"
    return
  end
  -- A plain table, read raw (no metamethod of the script runs here): a sequence, or an object.
  local count, keys = 0, {}
  for k in next, t do
    count = count + 1
    keys[count] = k
  end
  local length = rawlen(t)
  if count > 0 and count == length and rawget(t, length) ~= nil then
    local sequence = true
    for i = 1, count do
      if math_type(keys[i]) ~= "integer" then sequence = false break end
    end
    if sequence then
      out[#out + 1] = "["
      for i = 1, length do
        if i > 1 then out[#out + 1] = "," end
        encode_value(rawget(t, i), depth + 1, out)
      end
      out[#out + 1] = "]"
      return
    end
  end
  for i = 1, count do
    if type(keys[i]) ~= "string" then
      error("std.json.encode: an object key is a " .. type(keys[i]) .. " (keys must be strings)", 0)
    end
  end
  sort(keys)
  out[#out + 1] = "{"
  for i = 1, count do
    if i > 1 then out[#out + 1] = "," end
    out[#out + 1] = json_string(keys[i])
    out[#out + 1] = ":"
    encode_value(rawget(t, keys[i]), depth + 1, out)
  end
  out[#out + 1] = "}"
end

function encode_value(v, depth, out)
  local kind = type(v)
  if v == nil or rawequal(v, null) then out[#out + 1] = "null"
  elseif kind == "boolean" then out[#out + 1] = v and "true" or "false"
  elseif kind == "number" then out[#out + 1] = json_number(v)
  elseif kind == "string" then out[#out + 1] = json_string(v)
  elseif kind == "table" then encode_table(v, depth, out)
  else error("std.json.encode: a " .. kind .. " has no JSON form", 0) end
end

local json = { null = null }

function json.encode(v)
  local out = {}
  local ok, e = pcall(encode_value, v, 1, out)
  if not ok then
    -- only this library's own messages are rewritten; a memory or instruction limit passes as it came
    if type(e) == "string" and sub(e, 1, 17) == "std.json.encode: " then error(e, 2) end
    error(e, 0)
  end
  return concat(out)
end

function json.object(...)
  local n = select("#", ...)
  if n % 2 ~= 0 then error("bad argument #" .. n .. " to 'object' (a key without its value)", 2) end
  local items = { object = true, n = n, ... }
  for i = 1, n, 2 do
    if type(items[i]) ~= "string" then argerror(i, "object", "key expected to be a string, got " .. type(items[i])) end
  end
  local handle = {}
  ordered[handle] = items
  return handle
end

function json.array(...)
  local handle = {}
  ordered[handle] = { n = select("#", ...), ... }
  return handle
end

-- ==== base64 (RFC 4648) ===================================================================================
local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local B64_VALUE = { [43] = 62, [47] = 63 }  -- by byte; built without string.byte, which the meter charges
for i = 0, 25 do B64_VALUE[65 + i], B64_VALUE[97 + i] = i, 26 + i end
for i = 0, 9 do B64_VALUE[48 + i] = 52 + i end

local base64 = {}

-- The bytes, or nil when `s` is not base64 (white space is ignored; padding is required).
function base64.decode(s)
  s = gsub(text("decode", 1, s), "%s", "")
  if #s % 4 ~= 0 then return nil end
  local out = {}
  for i = 1, #s, 4 do
    local a, b, c, d = byte(s, i, i + 3)
    local va, vb, vc, vd = B64_VALUE[a], B64_VALUE[b], B64_VALUE[c], B64_VALUE[d]
    local last = i + 3 == #s
    if not va or not vb then return nil end
    if c == 61 and d == 61 and last then  -- "xx=="
      out[#out + 1] = char(((va << 18 | vb << 12) >> 16) & 0xff)
    elseif vc and d == 61 and last then  -- "xxx="
      local v = va << 18 | vb << 12 | vc << 6
      out[#out + 1] = char((v >> 16) & 0xff, (v >> 8) & 0xff)
    elseif vc and vd then
      local v = va << 18 | vb << 12 | vc << 6 | vd
      out[#out + 1] = char((v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff)
    else
      return nil
    end
  end
  return concat(out)
end

function base64.encode(s)
  s = text("encode", 1, s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = byte(s, i, i + 2)
    local v = a << 16 | (b or 0) << 8 | (c or 0)
    local d1, d2, d3, d4 = v >> 18 & 63, v >> 12 & 63, v >> 6 & 63, v & 63
    out[#out + 1] = sub(B64, d1 + 1, d1 + 1) .. sub(B64, d2 + 1, d2 + 1)
      .. (b and sub(B64, d3 + 1, d3 + 1) or "=") .. (c and sub(B64, d4 + 1, d4 + 1) or "=")
  end
  return concat(out)
end

-- ==== one session's std ====================================================================================

return function(api)
  local recv, send, sleep = api.recv, api.send, api.sleep
  local std = { quote = quote, json = json, base64 = base64 }

  -- A buffered reader over deadend.recv (or any function returning the next bytes, or nil at the end).
  -- It holds what it read and has not handed out: at most a line's `max`, or `exactly`'s `n`, plus one read.
  function std.reader(source)
    local read
    if source == nil then
      read = function() return recv(4096) end
    elseif type(source) == "number" then
      local size = integer("reader", 1, source, 1, RECV_MAX)
      read = function() return recv(size) end
    elseif type(source) == "function" then
      read = source
    else
      argerror(1, "reader", "nil, a read size or a function expected, got " .. type(source))
    end
    local buf, pos = "", 1  -- what is unread: buf from pos on
    local scanned = 1  -- where the search for a delimiter goes on from (no byte is searched twice)
    local skipping = nil  -- the delimiter that ends an over-long line being dropped

    -- One more read into the buffer (a source may give "": it is asked again); false at the end of input.
    local function fill()
      local chunk
      repeat
        chunk = read()
        if chunk == nil then return false end
        if type(chunk) ~= "string" then error("std.reader: the source returned a " .. type(chunk), 0) end
      until chunk ~= ""
      if pos > 1 then
        buf, scanned, pos = sub(buf, pos) .. chunk, scanned - pos + 1, 1
      else
        buf = buf .. chunk
      end
      return true
    end

    local function drop_through(at)
      pos, scanned = at, at
    end

    -- Forget what is held but its last `n` bytes (what could begin a delimiter that straddles reads).
    local function keep_tail(n)
      local held = #buf - pos + 1
      if n > held then n = held end
      buf, pos = sub(buf, #buf - n + 1), 1
      scanned = 1
    end

    -- Drop the rest of an over-long line, through its delimiter; false at the end of input.
    local function skip()
      while skipping do
        local from = scanned - #skipping + 1
        local _, e = find(buf, skipping, from > pos and from or pos, true)
        if e then
          drop_through(e + 1)
          skipping = nil
          return true
        end
        keep_tail(#skipping - 1)
        scanned = #buf + 1
        if not fill() then return false end
      end
      return true
    end

    -- The bytes before the next `delim` (consumed with it). `limit`: the longest such run accepted.
    -- `pieces`: a longer run is handed out `limit` bytes at a time (second result false) instead.
    local function delimited(delim, limit, pieces)
      if skipping and not skip() then return nil, "closed" end
      while true do
        local from = scanned - #delim + 1
        local s, e = find(buf, delim, from > pos and from or pos, true)
        if s then
          local run = sub(buf, pos, s - 1)
          if #run > limit and not pieces then
            drop_through(e + 1)
            return nil, "too-long"
          end
          if #run > limit then
            drop_through(pos + limit)
            return sub(run, 1, limit), false
          end
          drop_through(e + 1)
          return run, true
        end
        scanned = #buf + 1
        local held = #buf - pos + 1
        if held > limit then
          if pieces then
            local piece = sub(buf, pos, pos + limit - 1)
            drop_through(pos + limit)
            scanned = pos
            return piece, false
          end
          skipping = delim
          keep_tail(#delim - 1)
          return nil, "too-long"
        end
        if not fill() then return nil, "closed" end
      end
    end

    local r = {}

    -- The next line, without its LF or CRLF, of at most `max` bytes (default 4096). nil and "closed" at
    -- the end of input; nil and "too-long" for a longer line, which is dropped (through its LF, however
    -- much of it is still to come).
    function r.line(_, max)
      max = integer("line", 1, max, 0, nil, 4096)
      local run, how = delimited("\n", max + 1, false)
      if run == nil then return nil, how end
      if byte(run, -1) == 13 then run = sub(run, 1, -2) end
      if #run > max then return nil, "too-long" end
      return run
    end

    -- As line, but a longer line is handed out in pieces of `max` bytes: the text and true for a whole
    -- line (or its last piece), the text and false for a piece with more of its line to come.
    function r.piece(_, max)
      max = integer("piece", 1, max, 1, nil, 4096)
      local run, whole = delimited("\n", max, true)
      if run == nil then return nil, whole end
      if whole and byte(run, -1) == 13 then run = sub(run, 1, -2) end
      return run, whole
    end

    -- The bytes before the next `delim` (a non-empty string), which is consumed too; at most `max`
    -- bytes (default 4096). nil and "closed" / "too-long" as for line.
    function r.upto(_, delim, max)
      delim = text("upto", 1, delim)
      if delim == "" then argerror(1, "upto", "the delimiter is empty") end
      local run, how = delimited(delim, integer("upto", 2, max, 0, nil, 4096), false)
      if run == nil then return nil, how end
      return run
    end

    -- Exactly `n` bytes (the script bounds n: they are held until all have arrived); nil and "closed"
    -- when the input ends first.
    function r.exactly(_, n)
      n = integer("exactly", 1, n, 0)
      if skipping and not skip() then return nil, "closed" end
      while #buf - pos + 1 < n do
        if not fill() then return nil, "closed" end
      end
      local out = sub(buf, pos, pos + n - 1)
      drop_through(pos + n)
      return out
    end

    -- Up to `n` of the bytes held, without consuming them (to tell protocols apart by their first
    -- bytes); one read first if nothing is held. It never waits for more than one read.
    function r.peek(_, n)
      n = integer("peek", 1, n, 1, nil, 1)
      if skipping and not skip() then return nil, "closed" end
      if #buf < pos and not fill() then return nil, "closed" end
      return sub(buf, pos, pos + n - 1)
    end

    -- What is held already (at most `max` bytes, default 65535), or else what one read brings; nil and
    -- "closed" at the end of input.
    function r.some(_, max)
      max = integer("some", 1, max, 1, nil, 65535)
      if skipping and not skip() then return nil, "closed" end
      if #buf < pos and not fill() then return nil, "closed" end
      local out = sub(buf, pos, pos + max - 1)
      drop_through(pos + #out)
      return out
    end

    -- How many bytes are held: more than 0 when the client sent more than was asked for (pipelining).
    function r.buffered()
      return #buf - pos + 1
    end

    -- Forget what is held, and say what it was ("" if nothing): bytes pipelined behind a STARTTLS, which
    -- must not be taken as said under TLS.
    function r.drop()
      local held = sub(buf, pos)
      buf, pos, scanned, skipping = "", 1, 1, nil
      return held
    end

    return r
  end

  -- Answers paced as the tarpit would pace commands, sent in one write: `add` queues an answer and
  -- adds base_ms + random(0..jitter_ms) to the wait; `flush` waits once for all of it, then sends what was
  -- queued (at most 1 MiB a send) and returns what send returned. Ten pipelined commands then get ten
  -- delays and one write, as a real server's answers to them would leave in one segment.
  function std.pacer(base_ms, jitter_ms)
    local base = integer("pacer", 1, base_ms, 0, TARPIT_MAX)
    local jitter = integer("pacer", 2, jitter_ms, 0, TARPIT_MAX, 0)
    local parts, n, wait = {}, 0, 0
    local p = {}

    function p.add(_, answer)
      n = n + 1
      parts[n] = text("add", 1, answer)
      wait = wait + base + (jitter > 0 and random(0, jitter) or 0)
    end

    function p.flush()
      if n == 0 then return true end
      local data = concat(parts, "", 1, n)
      local ms = wait < SLEEP_MAX and wait or SLEEP_MAX
      parts, n, wait = {}, 0, 0
      if ms > 0 then sleep(ms) end
      local ok = true
      for i = 1, #data, SEND_MAX do
        ok = send(sub(data, i, i + SEND_MAX - 1))
        if not ok then break end
      end
      return ok
    end

    -- How many answers wait for the next flush.
    function p.pending()
      return n
    end

    return p
  end

  return std
end
