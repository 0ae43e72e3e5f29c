-- 6379.lua: a Redis honeypot that looks like an exposed, password-less Redis 6.0.16 (Ubuntu 22.04's).
--
-- It speaks RESP: arrays of bulk strings, and inline commands (with Redis' quoting rules), pipelined or
-- not. Enough of Redis answers for scanners and attack scripts to carry on: PING, ECHO, INFO (a plausible
-- server, clients, memory, persistence, stats, replication, cpu, modules, cluster and keyspace report),
-- CONFIG GET/SET (a per-connection table), SELECT, SET/GET/DEL/EXISTS/KEYS/DBSIZE/TYPE/TTL/FLUSHALL
-- (a small, bounded in-memory store), CLIENT, COMMAND (an empty array), HELLO 2/3, QUIT. HELLO 3 switches
-- the connection to RESP3 (maps, nulls and verbatim strings where Redis 6.0 sends them), which current
-- clients such as redis-py 6+ ask for by default. Every command is
-- logged; the ones used to take over a Redis (CONFIG SET dir/dbfilename, SLAVEOF/REPLICAOF, MODULE LOAD,
-- EVAL, SAVE, FLUSHALL, SHUTDOWN...) at level warn, with their arguments. AUTH passwords are logged and
-- answered as Redis 6.0 without requirepass does. HTTP sent to the port ("POST", "Host:") ends the
-- connection as Redis does. Protocol errors get Redis' message and close the connection.

local VERSION = "6.0.16"
local MAX_INLINE = 65536        -- Redis' PROTO_INLINE_MAX_SIZE
local MAX_ARGS = 1024           -- elements of one command (Redis allows 1M; a honeypot needs fewer)
local MAX_BULK = 512 * 1024     -- one argument (Redis: proto-max-bulk-len, 512 MB)
local MAX_COMMANDS = 500
local MAX_KEYS = 1000
local MAX_STORE = 1024 * 1024   -- bytes of keys and values in the store
local TARPIT_BASE, TARPIT_JITTER = 50, 100

deadend.set_limits(5000, 8 * 1024 * 1024)
deadend.set_tarpit(TARPIT_BASE, TARPIT_JITTER)

local peer = deadend.get_ip()
local has_clock = type(os) == "table" and type(os.time) == "function"

-- ---------------------------------------------------------------------------------------------------
-- Replies, in RESP2 until the client asks for RESP3 with HELLO 3.

local proto = 2
local function simple(s) return "+" .. s .. "\r\n" end
local function err(s) return "-" .. s .. "\r\n" end
local function int(n) return ":" .. string.format("%d", n) .. "\r\n" end
local function bulk(s)
  if s == nil then return proto == 3 and "_\r\n" or "$-1\r\n" end
  return "$" .. #s .. "\r\n" .. s .. "\r\n"
end
local function array(items)
  local out = { "*" .. #items .. "\r\n" }
  for i, v in ipairs(items) do out[i + 1] = bulk(v) end
  return table.concat(out)
end
-- A map from a flat list of already encoded keys and values: a flat array in RESP2.
local function map(encoded)
  return (proto == 3 and "%" .. (#encoded // 2) or "*" .. #encoded) .. "\r\n" .. table.concat(encoded)
end
-- Text Redis 6 sends with addReplyVerbatim (INFO, CLIENT LIST): a bulk string in RESP2.
local function verbatim(s)
  if proto == 3 then return "=" .. (#s + 4) .. "\r\ntxt:" .. s .. "\r\n" end
  return bulk(s)
end
local OK = simple("OK")

-- ---------------------------------------------------------------------------------------------------
-- Input, bounded by the constants above.
local input = std.reader(16384)
local function read_line(max) return input:line(max) end
local function read_exactly(n) return input:exactly(n) end

-- Redis' sdssplitargs: words separated by blanks; "..." with \n \r \t \b \a \\ \" \xHH escapes; '...'
-- with \' only. A closing quote must be followed by a blank. nil on unbalanced quotes.
local ESCAPES = { n = "\n", r = "\r", t = "\t", b = "\b", a = "\a" }
local function split_args(line)
  local args, i, n = {}, 1, #line
  while true do
    i = line:find("[^ \t\r\n\v\f]", i)
    if not i then return args end
    if #args >= MAX_ARGS then return nil end
    local c = line:sub(i, i)
    local word = {}
    if c == '"' or c == "'" then
      i = i + 1
      while true do
        if i > n then return nil end
        local ch = line:sub(i, i)
        if c == '"' and ch == "\\" and line:sub(i + 1, i + 1) == "x"
            and line:sub(i + 2, i + 3):match("^%x%x$") then
          word[#word + 1] = string.char(tonumber(line:sub(i + 2, i + 3), 16))
          i = i + 4
        elseif ch == "\\" and i < n and (c == '"' or line:sub(i + 1, i + 1) == "'") then
          local nxt = line:sub(i + 1, i + 1)
          word[#word + 1] = c == '"' and ESCAPES[nxt] or nxt
          i = i + 2
        elseif ch == c then
          i = i + 1
          if i <= n and not line:sub(i, i):match("[ \t\r\n\v\f]") then return nil end
          break
        else
          local j = line:find(c == '"' and '["\\]' or "['\\]", i) or (n + 1)
          word[#word + 1] = line:sub(i, j - 1)
          i = j
        end
      end
    else
      local j = line:find("[ \t\r\n\v\f]", i) or (n + 1)
      word[1] = line:sub(i, j - 1)
      i = j
    end
    args[#args + 1] = table.concat(word)
  end
end

-- One command: its arguments, {} for an empty one (ignored), or nil and "closed" or a protocol error.
local function read_command()
  local first = input:peek(1)  -- RESP or inline: the first byte says
  if not first then return nil, "closed" end
  if first ~= "*" then
    local line, why = read_line(MAX_INLINE)
    if not line then
      return nil, why == "too-long" and "Protocol error: too big inline request" or why
    end
    local args = split_args(line)
    if not args then return nil, "Protocol error: unbalanced quotes in request" end
    return args
  end
  local header, why = read_line(MAX_INLINE)
  if not header then
    return nil, why == "too-long" and "Protocol error: too big mbulk count string" or why
  end
  local count = header:match("^%*(%-?%d+)$")
  count = count and tonumber(count)
  if not count or count > MAX_ARGS then return nil, "Protocol error: invalid multibulk length" end
  local args = {}
  for i = 1, count do  -- count <= 0: an empty command
    local line, lwhy = read_line(MAX_INLINE)
    if not line then
      return nil, lwhy == "too-long" and "Protocol error: too big bulk count string" or lwhy
    end
    if line:sub(1, 1) ~= "$" then
      return nil, "Protocol error: expected '$', got '" .. line:sub(1, 1) .. "'"
    end
    local len = line:match("^%$(%d+)$")
    len = len and tonumber(len)
    if not len or len > MAX_BULK then return nil, "Protocol error: invalid bulk length" end
    local data = read_exactly(len + 2)
    if not data then return nil, "closed" end
    args[i] = data:sub(1, len)
  end
  return args
end

-- ---------------------------------------------------------------------------------------------------
-- Server state, per connection.

local config = {
  { "dbfilename", "dump.rdb" }, { "requirepass", "" }, { "masterauth", "" }, { "unixsocket", "" },
  { "logfile", "/var/log/redis/redis-server.log" }, { "pidfile", "/var/run/redis/redis-server.pid" },
  { "maxmemory", "0" }, { "maxmemory-samples", "5" }, { "timeout", "0" }, { "databases", "16" },
  { "port", "6379" }, { "tcp-backlog", "511" }, { "tcp-keepalive", "300" }, { "protected-mode", "no" },
  { "daemonize", "yes" }, { "supervised", "no" }, { "appendonly", "no" },
  { "appendfilename", "appendonly.aof" }, { "appendfsync", "everysec" }, { "save", "900 1 300 10 60 10000" },
  { "loglevel", "notice" }, { "maxclients", "10000" }, { "slave-read-only", "yes" },
  { "replica-read-only", "yes" }, { "slaveof", "" }, { "replicaof", "" }, { "rdbcompression", "yes" },
  { "stop-writes-on-bgsave-error", "yes" }, { "io-threads", "1" }, { "bind", "0.0.0.0" },
  { "dir", "/var/lib/redis" },
}
local config_index = {}
for i, kv in ipairs(config) do config_index[kv[1]] = i end

local store, store_keys, store_bytes = {}, 0, 0
local master = nil           -- {host, port} after SLAVEOF/REPLICAOF
local client_name = nil
local db = 0
local commands, auth_attempts = 0, 0
local ending = nil
local client_id = math.random(3, 400)

-- Redis glob (for KEYS and CONFIG GET): * ? [abc] and \ escapes, turned into a Lua pattern.
local function glob(pattern)
  if #pattern > 256 then return nil end
  local out, i = { "^" }, 1
  while i <= #pattern do
    local c = pattern:sub(i, i)
    if c == "*" then out[#out + 1] = ".*"
    elseif c == "?" then out[#out + 1] = "."
    elseif c == "[" then
      local close = pattern:find("]", i + 1, true)
      if not close then return nil end
      local set = pattern:sub(i + 1, close - 1):gsub("[%%%]]", "%%%0")
      if set:sub(1, 1) == "^" then set = "^" .. set:sub(2) end
      out[#out + 1] = "[" .. set .. "]"
      i = close
    elseif c == "\\" and i < #pattern then
      i = i + 1
      out[#out + 1] = "%" .. pattern:sub(i, i)
    elseif c:match("%w") then out[#out + 1] = c
    else out[#out + 1] = "%" .. c end
    i = i + 1
  end
  out[#out + 1] = "$"
  return table.concat(out)
end

local function matches(pat, s)
  local ok, found = pcall(string.find, s, pat)
  return ok and found ~= nil
end

local function uptime()
  if has_clock then return os.time() % (86400 * 47) + 7200 end
  return 1983240
end

local function info_sections()
  local up = uptime()
  local now = has_clock and os.time() or 1700000000
  local mem = 873568 + store_bytes + store_keys * 64
  local keys = store_keys
  local sections = {
    { "server", {
      "redis_version:" .. VERSION, "redis_git_sha1:00000000", "redis_git_dirty:0",
      "redis_build_id:a3fdef44459b3ad6", "redis_mode:standalone", "os:Linux 5.15.0-91-generic x86_64",
      "arch_bits:64", "multiplexing_api:epoll", "atomicvar_api:atomic-builtin", "gcc_version:11.2.0",
      "process_id:862", "run_id:6e8f3c0b9f5a2d7e41b8c3a90d1e5f27a4c6b813", "tcp_port:6379",
      "uptime_in_seconds:" .. up, "uptime_in_days:" .. (up // 86400), "hz:10", "configured_hz:10",
      "lru_clock:" .. (now & 0xffffff), "executable:/usr/bin/redis-server",
      "config_file:/etc/redis/redis.conf", "io_threads_active:0",
    } },
    { "clients", {
      "connected_clients:1", "client_recent_max_input_buffer:16", "client_recent_max_output_buffer:0",
      "blocked_clients:0", "tracking_clients:0", "clients_in_timeout_table:0",
    } },
    { "memory", {
      "used_memory:" .. mem, string.format("used_memory_human:%.2fK", mem / 1024),
      "used_memory_rss:6348800", "used_memory_rss_human:6.05M", "used_memory_peak:1054744",
      "used_memory_peak_human:1.01M", "total_system_memory:4109217792", "total_system_memory_human:3.83G",
      "maxmemory:0", "maxmemory_human:0B", "maxmemory_policy:noeviction", "mem_fragmentation_ratio:7.21",
      "mem_allocator:jemalloc-5.2.1", "active_defrag_running:0", "lazyfree_pending_objects:0",
    } },
    { "persistence", {
      "loading:0", "rdb_changes_since_last_save:0", "rdb_bgsave_in_progress:0",
      "rdb_last_save_time:" .. (now - up), "rdb_last_bgsave_status:ok", "rdb_last_bgsave_time_sec:-1",
      "aof_enabled:0", "aof_rewrite_in_progress:0", "aof_last_write_status:ok", "module_fork_in_progress:0",
    } },
    { "stats", {
      "total_connections_received:" .. (client_id + 1), "total_commands_processed:" .. (client_id * 7),
      "instantaneous_ops_per_sec:0", "rejected_connections:0", "expired_keys:0", "evicted_keys:0",
      "keyspace_hits:0", "keyspace_misses:0", "pubsub_channels:0", "pubsub_patterns:0",
      "latest_fork_usec:0", "total_reads_processed:" .. (client_id * 8),
      "total_writes_processed:" .. (client_id * 7),
    } },
    { "replication", master and {
      "role:slave", "master_host:" .. master[1], "master_port:" .. master[2], "master_link_status:down",
      "master_last_io_seconds_ago:-1", "master_sync_in_progress:0", "slave_repl_offset:1",
      "slave_priority:100", "slave_read_only:1", "connected_slaves:0",
    } or {
      "role:master", "connected_slaves:0", "master_replid:0d3b3f5c9a8e7f6d5c4b3a29180f7e6d5c4b3a29",
      "master_replid2:0000000000000000000000000000000000000000", "master_repl_offset:0",
      "second_repl_offset:-1", "repl_backlog_active:0", "repl_backlog_size:1048576",
    } },
    { "cpu", {
      string.format("used_cpu_sys:%.6f", up / 2400), string.format("used_cpu_user:%.6f", up / 3100),
      "used_cpu_sys_children:0.000000", "used_cpu_user_children:0.000000",
    } },
    { "modules", {} },
    { "cluster", { "cluster_enabled:0" } },
    { "keyspace", keys > 0 and { string.format("db0:keys=%d,expires=0,avg_ttl=0", keys) } or {} },
  }
  return sections
end

local function info(args)
  local wanted = {}
  local all = #args <= 1
  for i = 2, #args do
    local s = args[i]:lower()
    if s == "all" or s == "everything" or s == "default" then all = true else wanted[s] = true end
  end
  local out = {}
  for _, section in ipairs(info_sections()) do
    local name, lines = section[1], section[2]
    if all or wanted[name] then
      if #out > 0 then out[#out + 1] = "" end
      out[#out + 1] = "# " .. name:sub(1, 1):upper() .. name:sub(2)
      for _, l in ipairs(lines) do out[#out + 1] = l end
    end
  end
  if #out == 0 then return verbatim("") end
  return verbatim(table.concat(out, "\r\n") .. "\r\n")
end

local function wrong_args(name)
  return err("ERR wrong number of arguments for '" .. name:lower() .. "' command")
end

local function unknown_subcommand(sub, cmd)
  return err(string.format("ERR Unknown subcommand or wrong number of arguments for '%s'. Try %s HELP.",
    sub, cmd))
end

local function do_config(args)
  local sub = (args[2] or ""):upper()
  if sub == "GET" and #args == 3 then
    local pat = glob(args[3]:lower())
    local out = {}
    for _, kv in ipairs(config) do
      if pat and matches(pat, kv[1]) then
        out[#out + 1] = bulk(kv[1])
        out[#out + 1] = bulk(kv[2])
      end
    end
    return map(out)
  elseif sub == "SET" and #args == 4 then
    local name, value = args[3]:lower(), args[4]
    local i = config_index[name]
    if not i then return err("ERR Unsupported CONFIG parameter: " .. args[3]) end
    config[i][2] = value
    return OK
  elseif (sub == "RESETSTAT" or sub == "REWRITE") and #args == 2 then
    return OK
  end
  return unknown_subcommand(args[2] or "", "CONFIG")
end

local function store_set(key, value)
  local old = store[key]
  local delta = #value - (old and #old or -#key)
  if not old and store_keys >= MAX_KEYS or store_bytes + delta > MAX_STORE then
    return err("OOM command not allowed when used memory > 'maxmemory'.")
  end
  if not old then store_keys = store_keys + 1 end
  store[key], store_bytes = value, store_bytes + delta
  return OK
end

local function store_del(key)
  local old = store[key]
  if not old then return 0 end
  store[key], store_keys, store_bytes = nil, store_keys - 1, store_bytes - #old - #key
  return 1
end

local function auth_reply(user, password)
  auth_attempts = auth_attempts + 1
  deadend.log("auth attempt " .. auth_attempts, "warn", { user = user, password = password })
  if user == nil then
    return err("ERR AUTH <password> called without any password configured for the default user. "
      .. "Are you sure your configuration is correct?")
  elseif user == "default" then
    return OK  -- the default user is "on nopass": any password will do
  end
  return err("WRONGPASS invalid username-password pair")
end

-- Commands that take over or damage a Redis: logged at warn.
local DANGEROUS = {
  SLAVEOF = true, REPLICAOF = true, MODULE = true, EVAL = true, EVALSHA = true, SCRIPT = true, SAVE = true,
  BGSAVE = true, BGREWRITEAOF = true, FLUSHALL = true, FLUSHDB = true, SHUTDOWN = true, DEBUG = true,
  MIGRATE = true, SYNC = true, PSYNC = true, ["SYSTEM.EXEC"] = true, ["SYSTEM.REV"] = true,
}

-- A value written with SET that looks like a payload for a file Redis will be made to save: a cron line,
-- an SSH key, a download-and-run.
local PAYLOAD_MARKS = {
  "%* %* %* %*", "ssh%-rsa ", "ssh%-ed25519 ", "ecdsa%-sha2", "curl ", "wget ", "/bin/sh", "bash %-",
  "<%?php",
}
local function payload(value)
  if not value then return false end
  value = value:sub(1, 4096)
  for _, mark in ipairs(PAYLOAD_MARKS) do
    if value:find(mark) then return true end
  end
  return false
end

-- Execute one command; returns the reply, or nil to close the connection without one.
local function execute(args)
  local name = args[1]:upper()
  local n = #args
  if name == "PING" then
    if n == 1 then return simple("PONG") end
    if n == 2 then return bulk(args[2]) end
    return wrong_args(name)
  elseif name == "ECHO" then
    return n == 2 and bulk(args[2]) or wrong_args(name)
  elseif name == "QUIT" then
    deadend.send(OK)
    ending = "quit"
    return nil
  elseif name == "AUTH" then
    if n == 2 then return auth_reply(nil, args[2]) end
    if n == 3 then return auth_reply(args[2], args[3]) end
    return err("ERR syntax error")
  elseif name == "HELLO" then
    if n < 2 then return wrong_args(name) end
    local version = args[2]
    if version ~= "2" and version ~= "3" then
      return err("NOPROTO sorry this protocol version is not supported")
    end
    local i = 3
    while i <= n do
      local opt = args[i]:upper()
      if opt == "AUTH" and i + 2 <= n then
        local r = auth_reply(args[i + 1], args[i + 2])
        if r ~= OK then return r end
        i = i + 3
      elseif opt == "SETNAME" and i + 1 <= n then
        client_name = args[i + 1]
        i = i + 2
      else
        return err("ERR Syntax error in HELLO option '" .. args[i] .. "'")
      end
    end
    proto = tonumber(version)
    return map({ bulk("server"), bulk("redis"), bulk("version"), bulk(VERSION), bulk("proto"), int(proto),
      bulk("id"), int(client_id), bulk("mode"), bulk("standalone"), bulk("role"),
      bulk(master and "replica" or "master"), bulk("modules"), "*0\r\n" })
  elseif name == "INFO" then
    return info(args)
  elseif name == "CONFIG" then
    return do_config(args)
  elseif name == "COMMAND" then
    return "*0\r\n"
  elseif name == "CLIENT" then
    local sub = (args[2] or ""):upper()
    if sub == "SETNAME" and n == 3 then
      client_name = args[3]
      return OK
    elseif sub == "GETNAME" and n == 2 then
      return bulk(client_name)
    elseif sub == "ID" and n == 2 then
      return int(client_id)
    elseif sub == "LIST" or sub == "INFO" then
      return verbatim(string.format("id=%d addr=%s:%d fd=8 name=%s age=0 idle=0 flags=N db=%d sub=0 psub=0 "
        .. "multi=-1 qbuf=26 qbuf-free=32742 obl=0 oll=0 omem=0 events=r cmd=client user=default\n",
        client_id, peer, 40000 + client_id, client_name or "", db))
    end
    return unknown_subcommand(args[2] or "", "CLIENT")
  elseif name == "SELECT" then
    if n ~= 2 then return wrong_args(name) end
    local i = args[2]:match("^%d+$") and tonumber(args[2])
    if not i then return err("ERR value is not an integer or out of range") end
    if i > 15 then return err("ERR DB index is out of range") end
    db = i
    return OK
  elseif name == "SET" then
    if n < 3 then return wrong_args(name) end
    return store_set(args[2], args[3])
  elseif name == "GET" then
    if n ~= 2 then return wrong_args(name) end
    return bulk(store[args[2]])
  elseif name == "DEL" or name == "UNLINK" or name == "EXISTS" then
    if n < 2 then return wrong_args(name) end
    local count = 0
    for i = 2, n do
      if name == "EXISTS" then count = count + (store[args[i]] and 1 or 0)
      else count = count + store_del(args[i]) end
    end
    return int(count)
  elseif name == "TYPE" then
    if n ~= 2 then return wrong_args(name) end
    return simple(store[args[2]] and "string" or "none")
  elseif name == "TTL" or name == "PTTL" then
    if n ~= 2 then return wrong_args(name) end
    return int(store[args[2]] and -1 or -2)
  elseif name == "KEYS" then
    if n ~= 2 then return wrong_args(name) end
    local pat, out = glob(args[2]), {}
    for k in pairs(store) do
      if pat and matches(pat, k) then out[#out + 1] = k end
    end
    table.sort(out)
    return array(out)
  elseif name == "DBSIZE" then
    return int(store_keys)
  elseif name == "FLUSHALL" or name == "FLUSHDB" then
    store, store_keys, store_bytes = {}, 0, 0
    return OK
  elseif name == "SAVE" then
    return OK
  elseif name == "BGSAVE" then
    return simple("Background saving started")
  elseif name == "LASTSAVE" then
    return int((has_clock and os.time() or 1700000000) - uptime())
  elseif name == "SLAVEOF" or name == "REPLICAOF" then
    if n ~= 3 then return wrong_args(name) end
    if args[2]:upper() == "NO" and args[3]:upper() == "ONE" then
      master = nil
      return OK
    end
    if not args[3]:match("^%d+$") then return err("ERR value is not an integer or out of range") end
    master = { args[2], args[3] }
    return OK
  elseif name == "MODULE" then
    local sub = (args[2] or ""):upper()
    if sub == "LIST" and n == 2 then return "*0\r\n" end
    if sub == "LOAD" and n >= 3 then
      return err("ERR Error loading the extension. Please check the server logs.")
    end
    if sub == "UNLOAD" and n == 3 then
      return err("ERR Error unloading module: no such module with that name")
    end
    return unknown_subcommand(args[2] or "", "MODULE")
  elseif name == "EVAL" or name == "EVALSHA" then
    if n < 3 then return wrong_args(name) end
    if name == "EVALSHA" then return err("NOSCRIPT No matching script. Please use EVAL.") end
    return bulk(nil)
  elseif name == "SHUTDOWN" then
    ending = "shutdown requested"
    return nil
  end
  local shown = {}
  for i = 2, math.min(n, 4) do shown[#shown + 1] = "`" .. args[i]:sub(1, 128) .. "`, " end
  return err(string.format("ERR unknown command `%s`, with args beginning with: %s", args[1]:sub(1, 128),
    table.concat(shown)))
end

-- The command as a log field's value, in redis-cli's notation: an argument with blanks, quotes,
-- backslashes or unprintable bytes is double-quoted with \n, \r, \t, \", \\ and \xHH escapes (Redis'
-- sdscatrepr).
local REPR = { ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t", ['"'] = '\\"', ["\\"] = "\\\\" }
local function repr(a)
  if a ~= "" and not a:find("[^%w%p]") and not a:find('["\\]') then return a end
  return '"' .. a:gsub(".", function(c)
    if REPR[c] then return REPR[c] end
    if c == " " or c:find("[%w%p]") then return c end
    return string.format("\\x%02x", c:byte())
  end) .. '"'
end

local function describe(args)
  local parts = {}
  for i = 1, math.min(#args, 16) do
    local a = args[i]
    parts[i] = repr(#a > 200 and a:sub(1, 200) or a) .. (#a > 200 and "..." or "")
  end
  if #args > 16 then parts[#parts + 1] = string.format("(+%d more)", #args - 16) end
  return table.concat(parts, " ")
end

deadend.log("connect from " .. peer)
while true do
  local args, why = read_command()
  if not args then
    if why == "closed" then
      ending = ending or "client disconnected"
    else
      deadend.log("protocol error: " .. why, "warn")
      deadend.send(err("ERR " .. why))
      ending = "protocol error"
    end
    break
  end
  commands = commands + 1  -- empty commands count too: they cost a parse
  if commands > MAX_COMMANDS then
    deadend.send(err("ERR max number of clients reached"))
    ending = "too many commands"
    break
  end
  if #args > 0 then
    local name = args[1]:upper()
    if name == "POST" or name == "HOST:" then
      deadend.log("Possible SECURITY ATTACK detected: HTTP sent to Redis", "warn",
        { command = describe(args) })
      ending = "http request"
      break
    end
    local level = "info"
    if DANGEROUS[name] or (name == "CONFIG" and (args[2] or ""):upper() == "SET")
        or (name == "SET" and payload(args[3])) then
      level = "warn"
    end
    if name ~= "AUTH" then deadend.log("command", level, { command = describe(args) }) end
    local r = execute(args)
    if not r then break end
    if not deadend.send(r) then
      ending = "client disconnected"
      break
    end
  end
end

deadend.log(string.format("disconnect (%s) commands=%d auth_attempts=%d keys=%d", ending or "?", commands,
  auth_attempts, store_keys))
deadend.close()
