-- 110.lua: a POP3 honeypot that looks like Dovecot's pop3-login with plaintext authentication allowed.
--
-- Before login Dovecot knows CAPA, USER, PASS, AUTH, APOP, STLS and QUIT, and so does this script.
-- USER/PASS and SASL PLAIN/LOGIN (with or without an initial response) are decoded, logged and refused
-- with "-ERR [AUTH] Authentication failed." after a short delay, as Dovecot's auth_failure_delay does.
-- STLS is not offered (the script cannot do TLS). Unknown commands get "-ERR Unknown command."; after
-- three of them the client is dropped, as Dovecot's login process does. Everything is bounded.

local GREETING = "+OK Dovecot ready."
local MAX_LINE = 4096           -- a line longer than this ends the session
local MAX_COMMANDS = 100
local MAX_BAD = 3               -- Dovecot's CLIENT_MAX_BAD_COMMANDS
local MAX_AUTH = 5              -- failed logins before the connection is dropped
local FAIL_DELAY_MS = 1000      -- Dovecot's auth_failure_delay is 2 s
local TARPIT_BASE, TARPIT_JITTER = 100, 200

deadend.set_limits(1000, 128 * 1024)
deadend.set_tarpit(TARPIT_BASE, TARPIT_JITTER)

local peer = deadend.get_ip()

-- Base64 (RFC 4648) decoding; nil when the input is not valid base64.
local b64decode = std.base64.decode

-- Bounded line reader (CRLF or bare LF): the line, or nil and "closed" / "too-long".
local input = std.reader()
local function read_line() return input:line(MAX_LINE) end

local function reply(text)
  return deadend.send(text .. "\r\n")
end

local CAPA = table.concat({
  "+OK", "CAPA", "TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE", "USER", "SASL PLAIN LOGIN", ".",
}, "\r\n") .. "\r\n"

-- Session state.
local STATE_AUTHORIZATION, STATE_USER = "authorization", "user-given"
local state = STATE_AUTHORIZATION
local user = nil
local attempts, bad, commands = 0, 0, 0
local ending = nil

-- Log and refuse one set of credentials; false when the client must now be dropped.
local function refuse(mech, username, password)
  attempts = attempts + 1
  deadend.log(string.format("auth %s attempt %d", mech, attempts), "warn",
    { user = username, password = password })
  deadend.sleep(FAIL_DELAY_MS)
  user, state = nil, STATE_AUTHORIZATION
  reply("-ERR [AUTH] Authentication failed.")
  if attempts >= MAX_AUTH then
    deadend.log("too many failed logins, disconnecting", "warn")
    ending = "too many failed logins"
    return false
  end
  return true
end

-- One SASL continuation: "+ <challenge>", then a base64 line. nil and why when there is no answer.
local function sasl_step(challenge)
  if not reply("+ " .. challenge) then return nil, "closed" end
  local line, why = read_line()
  if not line then return nil, why end
  if line == "*" then return nil, "aborted" end
  local decoded = b64decode(line)
  if not decoded then return nil, "undecodable" end
  return decoded
end

local function do_auth(arg)
  local mech, initial = arg:match("^(%S+)%s*(%S*)$")
  if not mech then  -- bare AUTH: Dovecot lists the mechanisms
    return deadend.send("+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n")
  end
  mech = mech:upper()
  local username, password, why
  if mech == "PLAIN" then
    local blob
    if initial ~= "" then
      blob = initial == "=" and "" or b64decode(initial)
      if not blob then why = "undecodable" end
    else
      blob, why = sasl_step("")
    end
    if blob then
      local authzid, authcid, pw = blob:match("^([^\0]*)\0([^\0]*)\0([^\0]*)$")
      if not authzid then
        deadend.log("auth PLAIN malformed message", "warn", { data = blob })
        return reply("-ERR [AUTH] Authentication failed.")
      end
      if authzid ~= "" then deadend.log("auth PLAIN authzid", "info", { authzid = authzid }) end
      username, password = authcid, pw
    end
  elseif mech == "LOGIN" then
    if initial ~= "" then
      username = b64decode(initial)
      if not username then why = "undecodable" end
    else
      username, why = sasl_step("VXNlcm5hbWU6")  -- "Username:"
    end
    if username then password, why = sasl_step("UGFzc3dvcmQ6") end  -- "Password:"
  else
    deadend.log("auth unsupported mechanism", "warn", { mechanism = mech })
    return reply("-ERR Unsupported authentication mechanism.")
  end
  if why == "closed" or why == "too-long" then
    deadend.log("auth " .. mech .. " client left mid-exchange", "warn", { user = username })
    return false
  elseif why == "aborted" then
    deadend.log("auth " .. mech .. " aborted by client", "info", { user = username })
    return reply("-ERR Authentication aborted by client.")
  elseif why == "undecodable" then
    deadend.log("auth " .. mech .. " bad base64", "warn")
    return reply("-ERR Invalid base64 data in continued response")
  end
  return refuse(mech, username, password)
end

-- One command; returns false when the session must end.
local function handle(line)
  local verb, arg = line:match("^(%S*)%s?(.-)$")
  verb = verb:upper()
  if verb == "CAPA" then
    return deadend.send(CAPA)
  elseif verb == "USER" then
    if arg == "" then return reply("-ERR No username given.") end
    user, state = arg, STATE_USER
    deadend.log("user", "info", { user = arg })
    return reply("+OK")
  elseif verb == "PASS" then
    if state ~= STATE_USER then return reply("-ERR No username given.") end
    return refuse("USER", user, arg)
  elseif verb == "AUTH" then
    return do_auth(arg)
  elseif verb == "APOP" then
    deadend.log("apop", "warn", { apop = arg })
    return reply("-ERR APOP not enabled.")
  elseif verb == "STLS" then
    return reply("-ERR TLS support isn't enabled.")
  elseif verb == "QUIT" then
    reply("+OK Logging out")
    ending = "quit"
    return false
  end
  bad = bad + 1
  deadend.log("unknown command", "warn", { command = line })
  if bad >= MAX_BAD then
    reply("-ERR Too many bad commands.")
    ending = "too many bad commands"
    return false
  end
  return reply("-ERR Unknown command.")
end

deadend.log("connect from " .. peer)
if reply(GREETING) then
  while true do
    local line, why = read_line()
    if not line then
      if why == "too-long" then
        deadend.log("command line over " .. MAX_LINE .. " bytes", "warn")
        reply("-ERR Input line too long.")
        ending = "line too long"
      else
        ending = "client disconnected"
      end
      break
    end
    commands = commands + 1
    if commands > MAX_COMMANDS then
      reply("-ERR Too many commands.")
      ending = "too many commands"
      break
    end
    if not handle(line) then
      ending = ending or "client disconnected"
      break
    end
  end
else
  ending = "client disconnected"
end

deadend.log(string.format("disconnect (%s) commands=%d auth_attempts=%d", ending or "?", commands, attempts),
  "info", { user = user })
deadend.close()
