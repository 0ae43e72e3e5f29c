-- deadend sandbox bootstrap: trusted code, run once per child with the full standard library, BEFORE
-- lockdown. It captures what it needs as upvalues, hardens the shared string table, wipes every dangerous
-- global from the real state, and returns `start`, which compiles one untrusted script into a private
-- environment and returns `step`, the resume function the Python driver turns into RPCs.
--
-- The rows of docs/sandbox-vectors.md's table are marked [vector: ...] where they are closed.
-- Nothing here hands a Python object to Lua, and nothing here calls a script function outside the
-- hooked script coroutine.

local RECV_MIN, RECV_MAX, SLEEP_MAX, TARPIT_MAX, SEND_MAX, LOG_MAX, REP_MAX, MOVE_MAX,
  FIELDS_MAX, FIELD_MAX, FIELD_KEY_MAX, ALPN_MAX, BASE_NAMES = ...

-- Captured before the globals are wiped.
local debug_sethook, debug_getregistry, debug_getmetatable = debug.sethook, debug.getregistry, debug.getmetatable
local co_create, co_resume, co_yield, co_status =
  coroutine.create, coroutine.resume, coroutine.yield, coroutine.status
local load, type, select, error, pcall, tostring, pairs, ipairs, next =
  load, type, select, error, pcall, tostring, pairs, ipairs, next
local rawget, rawequal, setmetatable, getmetatable = rawget, rawequal, setmetatable, getmetatable
local math_type, math_tointeger, math_randomseed, maxinteger =
  math.type, math.tointeger, math.randomseed, math.maxinteger
local string_sub, string_format, string_gsub, string_gmatch = string.sub, string.format, string.gsub, string.gmatch
local table_pack, table_unpack, table_concat = table.pack, table.unpack, table.concat
local string_unpack, str_find = string.unpack, string.find
local os_time, os_date, os_clock, os_difftime = os.time, os.date, os.clock, os.difftime
local c_rep, c_move, string_dump = string.rep, table.move, string.dump
local gc_count = collectgarbage  -- "count" only, for `deadend audit`'s measurements; never a script's

-- The C library initialises its time zone on first use, by opening files. Do it now: after lockdown an
-- open() kills the process. The zygote fixed TZ=UTC, so local time and UTC agree.
os_date("*t"); os_date("!*t"); os_date("%c"); os_time({year = 2000, month = 1, day = 1})

local function argerror(i, fname, msg, level)
  -- Blame the script line that called the API function, as luaL_argerror does: level 3 from a direct
  -- call in an API function, one more for each checking helper in between.
  error(string_format("bad argument #%d to '%s' (%s)", i, fname, msg), level or 3)
end

-- Errors raised by a wrapped C function must name the script's line, not the bootstrap's. Callers use
-- `return (rethrow(pcall(...)))`: the parentheses keep it from being a tail call, so level 3 is the script.
local function rethrow(ok, ...)
  if ok then return ... end
  local e = ...
  if type(e) == "string" and e ~= "not enough memory" and e ~= "instruction limit exceeded" then
    error((string_gsub(e, "^bootstrap:%d+: ", "")), 3)
  end
  error(e, 0)
end

-- ==== Metering: the instruction budget, and the work C functions do in its name =========================
-- One Lua state serves one session, so the meter is this state's. The count hook adds STEP every STEP
-- VM instructions; a library function that loops in C, where no instruction runs, first charges the
-- iterations it is about to make (`charge`). Past the budget the meter is sticky: the hook then fires on
-- every instruction and errors, so no pcall can catch its way past it. [vector: pcall swallowing the limit]
local STEP = 1000
local used, budget, exceeded = 0, 0, false
local metered  -- the script's coroutine, its only thread
local function over()
  if not exceeded then
    exceeded = true
    debug_sethook(metered, over, "", 1)
  end
  error("instruction limit exceeded", 0)
end
local function hook()
  used = used + STEP
  if exceeded or used > budget then over() end
end
local function charge(n)
  used = used + n
  if exceeded or used > budget then over() end
end
-- `deadend audit` (a Start with measure set) also wants the instructions of the whole session and the
-- peak Lua heap: the heap is sampled each time the hook fires and at every API call.
local total, peak = 0, 0
local function measuring_hook()
  local kib = gc_count("count")
  if kib > peak then peak = kib end
  hook()
end
local function usage()
  local kib = gc_count("count")
  if kib > peak then peak = kib end
  return math_tointeger(peak * 1024 // 1), total + used
end
-- The iterations of a C loop from `from` to `to`: past the whole budget (or past what an integer
-- holds), the limit is reached at once.
local function charge_range(from, to)
  if from > to then return end
  local n = to - from
  if n < 0 or n >= budget then over() end
  charge(n + 1)
end

-- [vector: hook-proof C loops] string.rep with an empty result loops n times inside C, unhooked.
local function rep(s, n, sep)
  local ni = math_tointeger(n)
  if ni and ni > 0 and (type(s) == "string" or type(s) == "number")
      and (sep == nil or type(sep) == "string" or type(sep) == "number") then
    local width = #tostring(s) + (sep ~= nil and #tostring(sep) or 0)
    if ni > REP_MAX or (width > 0 and ni > REP_MAX // width) then
      error(string_format("string.rep refused: %d repetitions exceed the sandbox cap of %d bytes",
        ni, REP_MAX), 2)
    end
    charge(ni)
  end
  return (rethrow(pcall(c_rep, s, n, sep)))
end

-- [vector: hook-proof C loops] table.move loops e-f+1 times inside C.
local function move(a1, f, e, t, a2)
  local fi, ei = math_tointeger(f), math_tointeger(e)
  if fi and ei and ei >= fi and ((fi <= 0 and ei >= maxinteger + fi) or ei - fi >= MOVE_MAX) then
    error(string_format("table.move refused: more than %d elements", MOVE_MAX), 2)
  end
  if fi and ei then charge_range(fi, ei) end
  return (rethrow(pcall(c_move, a1, f, e, t, a2)))
end

-- [vector: metamethod-driven C loops] table.insert, table.remove, table.unpack, table.concat and
-- table.sort loop in C over a length that `#t` gives, and a __len metamethod may answer anything (2^40):
-- insert(t, 1, v) would then move 2^40 nils in C, past every instruction count. So: insert and remove
-- run here, in Lua, every step counted; unpack, concat and sort take their bounds in Lua (one `#t`, so a
-- metamethod cannot answer the C loop otherwise) and charge their iterations before the C loop; sort,
-- with a metatable that could answer its C reads and writes, sorts a plain copy. Each keeps its Lua 5.4
-- behaviour and messages.
local c_unpack, c_concat, c_sort, c_byte = table.unpack, table.concat, table.sort, string.byte
local utf8_codepoint = utf8.codepoint

-- As rethrow, for a wrapper that returns the C function's results by a tail call (unpack, byte: their
-- results can be many): there the script is level 2.
local function rethrow_tail(ok, ...)
  if ok then return ... end
  local e = ...
  if type(e) == "string" and e ~= "not enough memory" and e ~= "instruction limit exceeded" then
    error((string_gsub(e, "^bootstrap:%d+: ", "")), 2)
  end
  error(e, 0)
end

local function checkinteger(fname, i, v)
  local n = math_tointeger(v)
  if n ~= nil then return n end
  if type(v) == "number" then argerror(i, fname, "number has no integer representation", 4) end
  argerror(i, fname, "number expected, got " .. type(v), 4)
end

local function checktable(fname, t)
  if type(t) == "table" then return end
  local mt = debug_getmetatable(t)
  if not (mt and rawget(mt, "__index") and rawget(mt, "__newindex") and rawget(mt, "__len")) then
    error(string_format("bad argument #1 to '%s' (table expected, got %s)", fname, type(t)), 3)
  end
end

local function length(fname, t)
  local n = math_tointeger(#t)
  if n == nil then error("object length is not an integer", 3) end
  return n
end

local function insert(t, ...)
  checktable("insert", t)
  local e = length("insert", t) + 1  -- the first empty slot
  local n = select("#", ...)
  if n == 1 then
    t[e] = (...)
    return
  elseif n ~= 2 then
    error("wrong number of arguments to 'insert'", 2)
  end
  local pos, v = ...
  local p = checkinteger("insert", 2, pos)
  if p < 1 or p > e then error("bad argument #2 to 'insert' (position out of bounds)", 2) end
  for i = e, p + 1, -1 do t[i] = t[i - 1] end
  t[p] = v
end

local function remove(t, ...)
  checktable("remove", t)
  local size = length("remove", t)
  local pos = size
  if (...) ~= nil then pos = checkinteger("remove", 2, (...)) end
  if pos ~= size and (pos < 1 or pos > size + 1) then
    error("bad argument #2 to 'remove' (position out of bounds)", 2)
  end
  local v = t[pos]
  while pos < size do
    t[pos] = t[pos + 1]
    pos = pos + 1
  end
  t[pos] = nil
  return v
end

-- unpack's results must fit the Lua stack (LUAI_MAXSTACK, a million slots): past that the C function
-- refuses at once ("too many results to unpack"), so only a range it will loop over is charged.
local STACK_MAX = 1000000
local function unpack(t, i, j)
  local from = i == nil and 1 or checkinteger("unpack", 2, i)
  local to = j == nil and length("unpack", t) or checkinteger("unpack", 3, j)
  local n = to - from  -- wraps below zero when the range spans more than an integer holds
  if from <= to and n >= 0 and n < STACK_MAX then charge(n + 1) end
  return rethrow_tail(pcall(c_unpack, t, from, to))
end

local function concat(t, sep, i, j)
  checktable("concat", t)
  local from = i == nil and 1 or checkinteger("concat", 3, i)
  local to = j == nil and length("concat", t) or checkinteger("concat", 4, j)
  charge_range(from, to)
  return (rethrow(pcall(c_concat, t, sep, from, to)))
end

-- string.byte and utf8.codepoint return one value per byte or character of a range: charged, the range
-- clipped to the string as the C function clips it.
local function clipped(fname, s, i, j)
  local text = type(s) == "number" and tostring(s) or s
  if type(text) ~= "string" then argerror(1, fname, "string expected, got " .. type(s), 4) end
  local from = i == nil and 1 or checkinteger(fname, 2, i)
  local to = j == nil and from or checkinteger(fname, 3, j)
  local len = #text
  if from < 0 then from = from < -len and 1 or len + from + 1 elseif from == 0 then from = 1 end
  if to < 0 then to = len + to + 1 elseif to > len then to = len end
  charge_range(from, to)
end

local function byte(s, i, j)
  clipped("byte", s, i, j)
  return rethrow_tail(pcall(c_byte, s, i, j))
end

local function codepoint(s, i, j, lax)
  clipped("codepoint", s, i, j)
  return rethrow_tail(pcall(utf8_codepoint, s, i, j, lax))
end

local function sort(t, comp)
  checktable("sort", t)
  local n = length("sort", t)
  if n > 1 then
    if n >= 0x7fffffff then argerror(1, "sort", "array too big") end
    local steps = 1
    while (1 << steps) < n do steps = steps + 1 end
    charge(n * steps)  -- comparisons, about n log2 n
  end
  if comp ~= nil and type(comp) ~= "function" then
    error("bad argument #2 to 'sort' (function expected, got " .. type(comp) .. ")", 2)
  end
  if debug_getmetatable(t) == nil then return (rethrow(pcall(c_sort, t, comp))) end
  local copy = {}
  for k = 1, n do copy[k] = t[k] end  -- through the metamethods, counted
  rethrow(pcall(c_sort, copy, comp))
  for k = 1, n do t[k] = copy[k] end
end

-- ==== Address hiding =====================================================================================
-- This section belongs to the sandbox isolation work (SECURITY.md); keep other edits outside it.
-- Every sandbox is forked from one zygote, so an address one script prints is the layout of every other
-- sandbox. Scripts see none: a reference value (table, function, userdata, thread) is shown by a number
-- of its own session, `table: 0x0001`, in the order values are first shown, and `__tostring` and
-- `__name` work as in Lua. This covers tostring, print, string.format's %s and %p (as a method too: the
-- real string table is hardened) and math.randomseed(). Lua's error messages carry no address, and an
-- error object that is not a string is described by its type (`describe` below). All of it runs as
-- script code, under the instruction hook; the numbers are kept in the session's own, capped heap.
local string_find, math_random, c_format = string.find, math.random, string.format
local REFERENCE = { table = true, ["function"] = true, userdata = true, thread = true }
local numbers, last_number = setmetatable({}, { __mode = "k" }), 0

local function number_of(v)
  local n = numbers[v]
  if n == nil then
    last_number = last_number + 1
    n = last_number
    numbers[v] = n
  end
  return n
end

-- luaL_tolstring without the address: __tostring; else __name or the type, and the value's number.
local function show(v)
  if not REFERENCE[type(v)] then return tostring(v) end
  local mt = debug_getmetatable(v)
  if mt ~= nil then
    local meta = rawget(mt, "__tostring")
    if meta ~= nil then
      local s = meta(v)
      if type(s) == "number" then return tostring(s) end
      if type(s) ~= "string" then error("'__tostring' must return a string", 3) end
      return s
    end
    local name = rawget(mt, "__name")
    if type(name) == "string" then return string_format("%s: 0x%04x", name, number_of(v)) end
  end
  return string_format("%s: 0x%04x", type(v), number_of(v))
end

local function hidden_tostring(...)
  if select("#", ...) == 0 then error("bad argument #1 to 'tostring' (value expected)", 2) end
  return (show((...)))
end

-- What %p prints: Lua gives the address of any collectable value (strings too), "(null)" for the rest.
local function pointer_text(v)
  local t = type(v)
  if REFERENCE[t] or t == "string" then return string_format("0x%04x", number_of(v)) end
  return "(null)"
end

-- A C function's error under pcall has no position and, wrapped, no name: give it both, as Lua would.
local function reraise(name, ok, ...)
  if ok then return ... end
  local e = ...
  if type(e) == "string" and e ~= "not enough memory" then
    error((string_gsub(e, "^bad argument (#%d+) to '%?'", "bad argument %1 to '" .. name .. "'")), 3)
  end
  error(e, 0)
end

-- Walks the items as the C function does: "%%" is literal, every other "%" takes one argument, its
-- flags, width and precision are the run of "-+ #0123456789." before the conversion letter.
local function format(fmt, ...)
  local n = select("#", ...)
  local rewrite = n > 8 or (type(fmt) == "string" and string_find(fmt, "%%[-+ #0-9.]*p") ~= nil)
  for i = 1, rewrite and 0 or n do  -- the usual few arguments: no table built for them
    if REFERENCE[type((select(i, ...)))] then
      rewrite = true
      break
    end
  end
  if not rewrite then return (reraise("format", pcall(c_format, fmt, ...))) end
  local args = table_pack(...)
  local parts, from, at, item = {}, 1, 1, 0
  while true do
    local percent = string_find(fmt, "%", at, true)
    if percent == nil then break end
    if string_sub(fmt, percent + 1, percent + 1) == "%" then
      at = percent + 2
    else
      local _, spec_end = string_find(fmt, "^[-+ #0-9.]*", percent + 1)
      local conversion = string_sub(fmt, spec_end + 1, spec_end + 1)
      item = item + 1
      if item <= args.n and conversion == "p" then
        local spec = string_sub(fmt, percent + 1, spec_end)  -- %p takes "-" flags and a width only
        if not (string_find(spec, "^%-*$") or string_find(spec, "^%-*[1-9]%d?$")) then
          error(string_format("invalid conversion specification: '%%%sp'", spec), 2)
        end
        parts[#parts + 1] = string_sub(fmt, from, spec_end) .. "s"
        from = spec_end + 2
        args[item] = pointer_text(args[item])
      elseif item <= args.n and conversion == "s" and REFERENCE[type(args[item])] then
        args[item] = show(args[item])
      end
      at = spec_end + 2
    end
  end
  parts[#parts + 1] = string_sub(fmt, from)
  return (reraise("format", pcall(c_format, table_concat(parts), table_unpack(args, 1, args.n))))
end

-- Lua would seed from the time and this state's address and return both. Seed from the session's own
-- generator instead (the broker seeded it), which shows nothing.
local function randomseed(...)
  if select("#", ...) == 0 then
    local hi, lo = math_random(0), math_random(0)
    math_randomseed(hi, lo)
    return hi, lo
  end
  local hi, lo = reraise("randomseed", pcall(math_randomseed, ...))
  return hi, lo
end

string.format = format  -- the real table: ("%p"):format(t) resolves through the string metatable
math.randomseed = randomseed
_G.tostring = hidden_tostring  -- each script's environment copies its base functions from _G
local tostring = hidden_tostring  -- and everything below that shows a value (print) uses it too
-- ==== end of address hiding ==============================================================================

-- Harden the REAL string table: `("").dump` and `("x"):rep(n)` resolve through the shared string
-- metatable, never through the script's copy. [vector: string.dump]
string.dump = nil
string.rep = rep
string.byte = byte
-- [vector: getmetatable("")] Lua refuses get/setmetatable on a metatable with a __metatable field.
getmetatable("").__metatable = false

-- Wipe the real state: globals and the loaded-modules registry. lupa puts `python` in both.
-- [vector: python object reachable]
local wiped = { "io", "os", "package", "debug", "coroutine", "python", "require", "dofile", "loadfile",
                "load", "loadstring", "collectgarbage", "print", "warn" }
local loaded = debug_getregistry()._LOADED
for _, name in ipairs(wiped) do
  _G[name] = nil
  if loaded then loaded[name] = nil end
end

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end
local string_lib, table_lib, math_lib, utf8_lib = copy(string), copy(table), copy(math), copy(utf8)
table_lib.move, table_lib.insert, table_lib.remove = move, insert, remove
table_lib.unpack, table_lib.concat, table_lib.sort = unpack, concat, sort
utf8_lib.codepoint = codepoint

-- [vector: __gc finalizers] a finalizer runs with hooks off; Lua marks an object for finalization only
-- if __gc is present when setmetatable runs, so refusing it here is enough.
local function safe_setmetatable(t, mt)
  if type(t) ~= "table" then
    error("bad argument #1 to 'setmetatable' (table expected, got " .. type(t) .. ")", 2)
  end
  if mt ~= nil and type(mt) ~= "table" then
    error("bad argument #2 to 'setmetatable' (nil or table expected)", 2)
  end
  if mt ~= nil and rawget(mt, "__gc") ~= nil then
    error("setmetatable refused: __gc metamethods are not allowed in the sandbox", 2)
  end
  local current = debug_getmetatable(t)
  if current ~= nil and rawget(current, "__metatable") ~= nil then
    error("cannot change a protected metatable", 2)
  end
  return setmetatable(t, mt)
end

-- [std] The scripts' standard library (sandbox/std.lua), loaded at its first use: a script that never
-- touches `std` pays nothing for it (dense mode holds thousands of sessions). Its compiled chunk is the
-- driver's own answer to the internal "std" call, never the broker's and never the script's; it is loaded
-- into an environment of pristine, metered library functions and plain data, so it has no power a script
-- lacks, and it runs on the script's thread, under its hook. Like an API call, its first use yields, so it
-- cannot be inside a callback of a C function (a gsub or sort callback).
-- Built here, in the main chunk (whose code is freed once it has run): only the table stays.
local STD_ENV = {
  string = string, table = { concat = concat, sort = sort },
  math = { type = math_type, tointeger = math_tointeger, random = math_random, huge = math.huge },
  type = type, select = select, error = error, pcall = pcall, tostring = tostring, tonumber = tonumber,
  next = next, rawget = rawget, rawlen = rawlen, rawequal = rawequal, setmetatable = safe_setmetatable,
  RECV_MAX = RECV_MAX, SEND_MAX = SEND_MAX, SLEEP_MAX = SLEEP_MAX, TARPIT_MAX = TARPIT_MAX,
}
local rawset = rawset
local function library(api, fetch)
  local std, loaded = {}, false
  local function load_library()
    if loaded then return end
    loaded = true
    local chunk
    chunk, STD_ENV.UNSAFE = fetch()
    for name, value in next, load(chunk, "=std", "b", STD_ENV)()(api) do rawset(std, name, value) end
  end
  return setmetatable(std, {
    __metatable = false,
    __index = function(_, name) load_library() return rawget(std, name) end,
    __pairs = function() load_library() return next, std, nil end,
  })
end

local function value_type(v, present)
  if not present then return "no value" end
  return type(v)
end

-- Integers follow math.tointeger on numbers only: 10 and 10.0 pass, 10.5 and "10" do not (SPEC.md).
local function checkint(fname, i, v, present, lo, hi)
  local mt = math_type(v)
  if mt == "float" then
    local iv = math_tointeger(v)
    if iv == nil then argerror(i, fname, "number has no integer representation", 4) end
    v = iv
  elseif mt ~= "integer" then
    argerror(i, fname, "number expected, got " .. value_type(v, present), 4)
  end
  if v < lo or (hi ~= nil and v > hi) then
    if hi ~= nil then
      argerror(i, fname, string_format("out of range: must be %d..%d", lo, hi), 4)
    else
      argerror(i, fname, string_format("out of range: must be >= %d", lo), 4)
    end
  end
  return v
end

local function start(source, chunkname, mode, seed_hi, seed_lo, instructions, with_clock, measure)
  local env = {}
  local TOKEN = {}
  local co
  budget = instructions

  local function call(op, a, b, c)
    if exceeded then error("instruction limit exceeded", 0) end
    return co_yield(TOKEN, op, a, b, c)
  end

  local function log_text(fname, i, v, present)
    if type(v) == "number" then v = tostring(v) end
    if type(v) ~= "string" then argerror(i, fname, "string expected, got " .. value_type(v, present), 4) end
    return string_sub(v, 1, LOG_MAX + 1)  -- the broker cuts and marks; never ship megabytes
  end

  local deadend = {}

  function deadend.send(...)
    local data = ...
    if type(data) ~= "string" then
      argerror(1, "send", "string expected, got " .. value_type(data, select("#", ...) > 0))
    end
    if #data > SEND_MAX then
      argerror(1, "send", string_format("string of %d bytes is longer than %d", #data, SEND_MAX))
    end
    return call("send", data) == true
  end

  function deadend.recv(...)
    local n = checkint("recv", 1, (...), select("#", ...) > 0, RECV_MIN, RECV_MAX)
    local data = call("recv", n)
    if type(data) == "string" then return data end
    return nil
  end

  function deadend.sleep(...)
    local ms = checkint("sleep", 1, (...), select("#", ...) > 0, 0, SLEEP_MAX)
    return call("sleep", ms)  -- the milliseconds slept: fewer when the peer left meanwhile
  end

  function deadend.get_ip()
    return call("get_ip")
  end

  -- deadend.log's fields: checked here, so a mistake is an error at the script's line; sent as a plain
  -- array {k1, v1, ...} in key order (the broker checks them again, as every argument). `next` is raw:
  -- no __pairs runs, and at most FIELDS_MAX + 1 entries are looked at, however big the table.
  local NO_FIELDS = {}
  local function log_fields(fields)
    if fields == nil then return NO_FIELDS end
    if type(fields) ~= "table" then argerror(3, "log", "table expected, got " .. type(fields), 4) end
    local keys, values, n = {}, {}, 0
    local k, v = next(fields)
    while k ~= nil do
      n = n + 1
      if n > FIELDS_MAX then argerror(3, "log", string_format("more than %d fields", FIELDS_MAX), 4) end
      if type(k) ~= "string" or #k > FIELD_KEY_MAX or not string_find(k, "^[a-z][a-z0-9_.]*$") then
        argerror(3, "log", string_format("field names are 1 to %d characters of a-z, 0-9, '_' and '.', "
          .. "starting with a letter; got %s", FIELD_KEY_MAX, type(k) == "string" and "'"
          .. string_sub(k, 1, 40) .. "'" or "a " .. type(k)), 4)
      end
      local t = type(v)
      if t == "string" then
        v = string_sub(v, 1, FIELD_MAX + 1)  -- the broker cuts and marks, as for messages
      elseif t == "number" then
        local i = math_tointeger(v)
        if i == nil then argerror(3, "log", "field '" .. k .. "': number has no integer representation", 4) end
        v = i
      elseif t ~= "boolean" then
        argerror(3, "log", "field '" .. k .. "': string, integer or boolean expected, got " .. t, 4)
      end
      keys[n], values[k] = k, v
      k, v = next(fields, k)
    end
    c_sort(keys)
    local pairs_ = {}
    for i = 1, n do pairs_[2 * i - 1], pairs_[2 * i] = keys[i], values[keys[i]] end
    return pairs_
  end

  local LEVELS = { debug = true, info = true, warn = true, error = true }
  function deadend.log(...)
    local message, level, fields = ...
    message = log_text("log", 1, message, select("#", ...) > 0)
    if level == nil then
      level = "info"
    elseif type(level) ~= "string" or not LEVELS[level] then
      argerror(2, "log", "level must be 'debug', 'info', 'warn' or 'error'")
    end
    call("log", message, level, log_fields(fields))
  end

  function deadend.set_tarpit(...)
    local n, base, jitter = select("#", ...), ...
    base = checkint("set_tarpit", 1, base, n > 0, 0, TARPIT_MAX)
    if jitter == nil then jitter = 0 else jitter = checkint("set_tarpit", 2, jitter, true, 0, TARPIT_MAX) end
    call("set_tarpit", base, jitter)
  end

  function deadend.set_limits(...)
    local n, calls, bytes = select("#", ...), ...
    calls = checkint("set_limits", 1, calls, n > 0, 0)
    if bytes == nil then bytes = 0 else bytes = checkint("set_limits", 2, bytes, true, 0) end
    call("set_limits", calls, bytes)
  end

  function deadend.close()
    call("close")
  end

  -- The broker does the TLS handshake on the client connection; from then on send and recv carry
  -- plaintext. Once it succeeded, another call is an error here, and never reaches the broker, which
  -- would take it for a compromised sandbox. `alpn`: the protocols the server may select, in order of
  -- preference, comma-separated (deadend.wire.check_alpn); nil or "": none.
  local tls = false
  function deadend.starttls(...)
    local n, alpn = select("#", ...), ...
    if alpn == nil then
      alpn = ""
    elseif type(alpn) ~= "string" then
      argerror(1, "starttls", "string expected, got " .. value_type(alpn, n > 0))
    elseif #alpn > ALPN_MAX or (alpn ~= "" and (not str_find(alpn, "^[!-~]+$")
        or str_find(alpn, "^,") or str_find(alpn, ",$") or str_find(alpn, ",,", 1, true))) then
      argerror(1, "starttls", string_format(
        "ALPN protocols must be printable ASCII names separated by commas, %d bytes at most", ALPN_MAX))
    end
    if tls then error("bad call to 'starttls' (the connection already speaks TLS)", 2) end
    if call("starttls", alpn) == true then
      tls = true
      return true
    end
    return nil
  end

  -- The table of deadend.wire.pack_tls_info, unpacked; nil before TLS.
  function deadend.tls_info()
    local blob = call("tls_info")
    if type(blob) ~= "string" then return nil end
    local version, cipher, ja4, ja3, selected, has_sni, sni, count, pos =
      string_unpack(">s1s1s1s1s1Bs2B", blob)
    local alpn = {}
    for i = 1, count do alpn[i], pos = string_unpack(">s1", blob, pos) end
    return {
      version = version, cipher = cipher, ja4 = ja4, ja3 = ja3, alpn = alpn,
      sni = has_sni == 1 and sni or nil, alpn_selected = selected ~= "" and selected or nil,
    }
  end

  -- print() is kept as a convenience: deadend.log at level info, arguments joined by tabs.
  local function print(...)
    local n, parts = select("#", ...), {}
    for i = 1, n do parts[i] = tostring((select(i, ...))) end
    call("log", string_sub(table_concat(parts, "\t"), 1, LOG_MAX + 1), "info", NO_FIELDS)
  end

  -- [vector: xpcall message handler] the real handler would run inside the hook with hooks off. Run it
  -- after unwinding instead, under the hook, and never once the budget is gone.
  local function xpcall(f, msgh, ...)
    if type(msgh) ~= "function" then
      error("bad argument #2 to 'xpcall' (function expected, got " .. type(msgh) .. ")", 2)
    end
    local r = table_pack(pcall(f, ...))
    if r[1] then return table_unpack(r, 1, r.n) end
    if exceeded then error(r[2], 0) end
    -- As real xpcall: the handler's first result, or this message if the handler itself fails.
    local ok, handled = pcall(msgh, r[2])
    if exceeded then error("instruction limit exceeded", 0) end
    if not ok then return false, "error in error handling" end
    return false, handled
  end

  for name in string_gmatch(BASE_NAMES, "[^,]+") do  -- deadend.wire.BASE_FUNCTIONS, less the wrapped ones
    env[name] = _G[name]
  end
  env.setmetatable = safe_setmetatable
  env.xpcall = xpcall
  env.print = print
  env.string, env.table, env.math, env.utf8 = string_lib, table_lib, math_lib, utf8_lib
  env.deadend = deadend
  env.std = library(deadend, function() return co_yield(TOKEN, "std") end)
  env._G = env
  if with_clock then
    -- read-only clock subset only (SPEC.md): nothing else of os, ever
    env.os = { time = os_time, date = os_date, clock = os_clock, difftime = os_difftime }
  end

  -- [vector: load of binary chunks] text mode only, into the private env.
  local fn, err = load(source, "=" .. chunkname, "t", env)
  if not fn then return "compile", string_sub(tostring(err), 1, LOG_MAX + 1) end
  if mode == "compile" then return "ok" end
  -- `deadend check`: the trusted side analyses the bytecode (globals, API calls); never run it here.
  if mode == "check" then return "dump", string_dump(fn) end

  local function describe(e)
    -- [vector: error objects / __tostring] never run script metamethods here, on the unhooked thread
    local t = type(e)
    if t == "string" then return string_sub(e, 1, LOG_MAX + 1) end
    if t == "number" then return tostring(e) end
    return "(error object is a " .. t .. " value)"
  end

  -- The driver's only entry point: resume the script with the broker's reply; report what it did next.
  local function step(...)
    if not exceeded then
      total = total + used
      used = 0
    end
    if measure then usage() end  -- a heap sample at every API call
    local ok, a, op, x, y, z = co_resume(co, ...)
    if not ok then
      if exceeded then return "instructions", "instruction limit exceeded" end
      if rawequal(a, "not enough memory") then return "memory", "not enough memory" end
      return "error", describe(a)
    end
    if co_status(co) == "dead" then return "return" end
    if not rawequal(a, TOKEN) then return "error", "script yielded outside the API" end
    return "call", op, x, y, z
  end

  local function go(go_hi, go_lo)
    -- [Lua PRNG shared across forks] every session gets its own seed from the broker.
    math_randomseed(go_hi, go_lo)
    co = co_create(fn)
    metered = co
    -- [vector: coroutines] the script gets no coroutine library, so this is the only thread it runs on.
    debug_sethook(co, measure and measuring_hook or hook, "", STEP)
    return "ready", step, usage
  end

  -- A warm child prepared for one script compiles now and runs when a connection comes (GO).
  if mode == "prepare" then return "prepared", go end
  return go(seed_hi, seed_lo)
end

return start
