-- 3306.lua: a MySQL honeypot that looks like a MySQL 8.0.36 server refusing every login.
--
-- It sends the protocol-10 initial handshake (server version, connection id, a 20-byte scramble made as
-- MySQL makes it, capability flags, utf8mb4 charset, autocommit status, mysql_native_password), reads
-- the client's HandshakeResponse41 (or the old 3.20 form), logs the user name, the auth response in hex
-- (enough to test password guesses offline against the logged scramble), the database and plugin asked
-- for, and the connection attributes (client name, version, OS, program), then answers
-- ERROR 1045 (28000) "Access denied for user 'x'@'ip' (using password: YES)" and closes, as a server with
-- a wrong password does. SSL and compression are not offered (the script cannot do either). Anything
-- that is not a handshake response gets "Bad handshake" (1043, 08S01).

local SERVER_VERSION = "8.0.36"
local AUTH_PLUGIN = "mysql_native_password"
local MAX_PACKET = 65536         -- a handshake response is far smaller
local MAX_ATTRS = 64             -- connection attributes logged
local TARPIT_BASE, TARPIT_JITTER = 100, 200

deadend.set_limits(64, MAX_PACKET + 1024)
deadend.set_tarpit(TARPIT_BASE, TARPIT_JITTER)

local peer = deadend.get_ip()

-- Capability flags (include/mysql_com.h).
local CLIENT_CONNECT_WITH_DB = 0x00000008
local CLIENT_COMPRESS = 0x00000020
local CLIENT_PROTOCOL_41 = 0x00000200
local CLIENT_SSL = 0x00000800
local CLIENT_SECURE_CONNECTION = 0x00008000
local CLIENT_PLUGIN_AUTH = 0x00080000
local CLIENT_CONNECT_ATTRS = 0x00100000
local CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 0x00200000
local CLIENT_ZSTD = 0x04000000
-- What a MySQL 8.0 server offers (0xffffffff less the unused high bits), without SSL and compression.
local SERVER_CAPABILITIES = 0xdfffffff & ~(CLIENT_SSL | CLIENT_COMPRESS | CLIENT_ZSTD)
local CHARSET_UTF8MB4_0900_AI_CI = 255
local SERVER_STATUS_AUTOCOMMIT = 0x0002

local function hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

-- MySQL's generate_user_salt: random bytes folded to 1..127, never NUL or '$'.
local function scramble(n)
  local t = {}
  for i = 1, n do
    local b = math.random(1, 127)
    if b == 36 then b = 37 end
    t[i] = string.char(b)
  end
  return table.concat(t)
end

-- A packet: 3-byte little-endian payload length, sequence id, payload.
local function packet(seq, payload)
  return string.pack("<I3B", #payload, seq) .. payload
end

-- Input: one whole packet at a time (nil and why when there is none).
local input = std.reader()
local function read_packet()  -- the payload and its sequence id, or nil and "closed" / "too-big"
  local header = input:exactly(4)
  if not header then return nil, "closed" end
  local len, seq = string.unpack("<I3B", header)
  if len > MAX_PACKET then return nil, "too-big" end
  local payload = input:exactly(len)
  if not payload then return nil, "closed" end
  return payload, seq
end

-- Readers over a payload, each returning the value and the next position, or nil when it is cut short.
local function cstring(p, pos)
  local z = p:find("\0", pos, true)
  if not z then return nil end
  return p:sub(pos, z - 1), z + 1
end

local function lenenc_int(p, pos)
  local first = p:byte(pos)
  if not first then return nil end
  if first < 0xfb then return first, pos + 1 end
  local width = ({ [0xfc] = 2, [0xfd] = 3, [0xfe] = 8 })[first]
  if not width or pos + width > #p then return nil end
  local ok, v = pcall(string.unpack, "<I" .. width, p, pos + 1)
  if not ok or v < 0 then return nil end
  return v, pos + 1 + width
end

local function lenenc_string(p, pos)
  local n, next_pos = lenenc_int(p, pos)
  if not n or next_pos + n - 1 > #p then return nil end
  return p:sub(next_pos, next_pos + n - 1), next_pos + n
end

-- HandshakeResponse41 -> a table of what the client sent, or nil when it is malformed.
local function parse_response41(p)
  if #p < 32 then return nil end
  local caps, max_packet, charset = string.unpack("<I4I4B", p)
  local r = { caps = caps, max_packet = max_packet, charset = charset, attrs = {} }
  if caps & CLIENT_SSL ~= 0 and #p == 32 then
    r.ssl_request = true
    return r
  end
  local pos
  r.user, pos = cstring(p, 33)
  if not r.user then return nil end
  if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA ~= 0 then
    r.auth, pos = lenenc_string(p, pos)
  elseif caps & CLIENT_SECURE_CONNECTION ~= 0 then
    local n = p:byte(pos)
    if n and pos + n <= #p then r.auth, pos = p:sub(pos + 1, pos + n), pos + 1 + n end
  else
    r.auth, pos = cstring(p, pos)
  end
  if not r.auth then return nil end
  if caps & CLIENT_CONNECT_WITH_DB ~= 0 and pos <= #p then
    r.database, pos = cstring(p, pos)
    if not r.database then return nil end
  end
  if caps & CLIENT_PLUGIN_AUTH ~= 0 and pos <= #p then
    r.plugin, pos = cstring(p, pos)
    if not r.plugin then return nil end
  end
  if caps & CLIENT_CONNECT_ATTRS ~= 0 and pos <= #p then
    local total, apos = lenenc_int(p, pos)
    if total then
      local stop = math.min(apos + total, #p + 1)
      while apos < stop and #r.attrs < MAX_ATTRS do
        local k, v
        k, apos = lenenc_string(p, apos)
        if not k then break end
        v, apos = lenenc_string(p, apos)
        if not v then break end
        r.attrs[#r.attrs + 1] = k .. "=" .. v
      end
    end
  end
  return r
end

-- The pre-4.1 HandshakeResponse320: 2-byte capabilities, 3-byte max packet, user, auth.
local function parse_response320(p)
  if #p < 6 then return nil end
  local caps = string.unpack("<I2", p)
  local user, pos = cstring(p, 6)
  if not user then return nil end
  local auth = p:sub(pos):match("^[^\0]*") or ""
  return { caps = caps, user = user, auth = auth, attrs = {}, old = true }
end

local function err_packet(seq, code, state, message, old)
  if old then return packet(seq, string.pack("<BI2", 0xff, code) .. message) end
  return packet(seq, string.pack("<BI2", 0xff, code) .. "#" .. state .. message)
end

-- Protocol states: handshake sent -> response read -> refused.
local connection_id = math.random(8, 4000)
local salt = scramble(20)
local state = "handshake"
local ending = nil

local handshake = string.pack("<B", 10) .. SERVER_VERSION .. "\0"
  .. string.pack("<I4", connection_id) .. salt:sub(1, 8) .. "\0"
  .. string.pack("<I2BI2I2B", SERVER_CAPABILITIES & 0xffff, CHARSET_UTF8MB4_0900_AI_CI,
    SERVER_STATUS_AUTOCOMMIT, SERVER_CAPABILITIES >> 16, #salt + 1)
  .. string.rep("\0", 10) .. salt:sub(9) .. "\0" .. AUTH_PLUGIN .. "\0"

deadend.log(string.format("connect from %s connection_id=%d", peer, connection_id))
if not deadend.send(packet(0, handshake)) then
  ending = "client disconnected"
else
  state = "await-response"
  local payload, seq = read_packet()
  if not payload then
    local why = seq
    if why == "too-big" then
      deadend.log("handshake response over " .. MAX_PACKET .. " bytes", "warn")
      deadend.send(err_packet(1, 1043, "08S01", "Bad handshake"))
      ending = "bad handshake"
    else
      deadend.log("client left without a handshake response")
      ending = "client disconnected"
    end
  else
    local caps = #payload >= 2 and string.unpack("<I2", payload) or 0
    local r
    if caps & CLIENT_PROTOCOL_41 ~= 0 then
      r = parse_response41(payload)
    else
      r = parse_response320(payload)
    end
    local reply_seq = (seq + 1) & 0xff
    if not r or seq ~= 1 then
      deadend.log("bad handshake seq=" .. seq, "warn", { data = payload:sub(1, 64) })
      deadend.send(err_packet(reply_seq, 1043, "08S01", "Bad handshake"))
      ending = "bad handshake"
    elseif r.ssl_request then
      deadend.log("client asked for SSL (not offered)", "warn")
      ending = "ssl request"
    else
      state = "refused"
      deadend.log(string.format("auth attempt scramble=%s caps=0x%08x charset=%d", hex(salt), r.caps,
        r.charset or 0), "warn", { user = r.user, auth_response = hex(r.auth), database = r.database,
        plugin = r.plugin })
      if #r.attrs > 0 then
        deadend.log("client attributes", "info", { attributes = table.concat(r.attrs, " ") })
      end
      local message = string.format("Access denied for user '%s'@'%s' (using password: %s)", r.user, peer,
        #r.auth > 0 and "YES" or "NO")
      deadend.send(err_packet(reply_seq, 1045, "28000", message, r.old))
      ending = "access denied"
    end
  end
end

deadend.log(string.format("disconnect (%s) state=%s", ending or "?", state))
deadend.close()
