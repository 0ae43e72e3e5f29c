-- 25.lua: an SMTP honeypot that looks like a stock Postfix on Debian.
--
-- It walks clients through a whole ESMTP dialogue (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, VRFY, QUIT)
-- and accepts the mail without keeping it, logging envelope and size. AUTH PLAIN and AUTH LOGIN are
-- offered with or without TLS; the credentials are decoded, logged and refused with 535. STARTTLS is
-- offered, and the broker does the TLS handshake (deadend.starttls); CHUNKING is not offered. Everything
-- is bounded: commands, errors, auth attempts, recipients, line length, message size, bytes read.

local HOSTNAME = "mail.example.com"
local BANNER = "220 " .. HOSTNAME .. " ESMTP Postfix (Debian/GNU)"
local MAX_MESSAGE = 10240000  -- advertised SIZE, Postfix's default message_size_limit
local MAX_LINE = 4096         -- a command line longer than this is refused (RFC 5321 says 512)
local MAX_COMMANDS = 200      -- commands per connection
local MAX_ERRORS = 10         -- Postfix's smtpd_hard_error_limit is 20; a honeypot can be stricter
local MAX_AUTH = 5            -- AUTH attempts per connection
local MAX_RCPT = 50           -- recipients per message
local TARPIT_BASE, TARPIT_JITTER = 100, 150  -- ms after every read
local SOFT_ERRORS = 5         -- like Postfix's smtpd_soft_error_limit: past it, each error slows reads
local TARPIT_STEP, TARPIT_MAX = 500, 4000

-- Abuse control: reads and bytes for the whole connection (a maximal message plus some slack).
deadend.set_limits(20000, MAX_MESSAGE + 1048576)
deadend.set_tarpit(TARPIT_BASE, TARPIT_JITTER)

local peer = deadend.get_ip()

local b64decode = std.base64.decode

-- Input may arrive split or joined; lines end in LF or CRLF, at most MAX_LINE bytes. read_line()
-- returns the line, or nil and "closed" / "too-long". With `partial` set, an over-long line is handed out
-- in MAX_LINE pieces instead (the DATA phase): the text and "line" or "piece".
local input = std.reader()
local function read_line(partial)
  if not partial then return input:line(MAX_LINE) end
  local text, whole = input:piece(MAX_LINE)
  if text == nil then return nil, whole end
  return text, whole and "line" or "piece"
end

local function reply(text)
  return deadend.send(text .. "\r\n")
end

-- Session state.
local STATE_GREETING, STATE_READY, STATE_MAIL, STATE_RCPT = "greeting", "ready", "mail", "rcpt"
local state = STATE_GREETING
local helo_name = nil
local mail_from, rcpts = nil, {}
local errors, auth_attempts, messages, commands = 0, 0, 0, 0
local ending = nil  -- why the loop stopped
local tls_active = false

local function queue_id()
  local id = { string.format("%X", math.random(1, 15)) }
  for i = 2, 11 do id[i] = string.format("%X", math.random(0, 15)) end
  return table.concat(id)
end

-- A 4xx/5xx answer: counted; past SOFT_ERRORS every error makes the next reads slower.
local function fail(text)
  errors = errors + 1
  if errors > SOFT_ERRORS then
    deadend.set_tarpit(math.min(TARPIT_BASE + (errors - SOFT_ERRORS) * TARPIT_STEP, TARPIT_MAX),
      TARPIT_JITTER)
  end
  if errors >= MAX_ERRORS then
    reply(text)
    reply("421 4.7.0 " .. HOSTNAME .. " Error: too many errors")
    deadend.log("too many errors, disconnecting", "warn")
    ending = "too many errors"
    return false
  end
  return reply(text)
end

local function reset_transaction()
  mail_from, rcpts = nil, {}
  if state ~= STATE_GREETING then state = STATE_READY end
end

-- "FROM:<addr> PARAMS" / "TO:<addr> PARAMS" -> addr, params (nil when malformed).
local function parse_path(arg, keyword)
  if arg:sub(1, #keyword):upper() ~= keyword then return nil end
  local rest = arg:sub(#keyword + 1):match("^%s*(.*)$")
  local addr, params = rest:match("^<([^<>]*)>%s*(.*)$")
  if not addr then addr, params = rest:match("^([^%s<>]+)%s*(.*)$") end
  if not addr then return nil end
  return addr, params
end

-- Read one base64 line of an AUTH exchange; nil when the client cancels ("*") or goes away.
local function auth_response(prompt)
  if not reply("334 " .. prompt) then return nil, "closed" end
  local line, why = read_line(false)
  if not line then return nil, why end
  if line == "*" then return nil, "aborted" end
  local decoded = b64decode(line)
  if not decoded then return nil, "undecodable" end
  return decoded
end

-- AUTH PLAIN / AUTH LOGIN: decode, log, always refuse.
local function do_auth(arg)
  if state == STATE_GREETING then return fail("503 5.5.1 Error: send HELO/EHLO first") end
  if state ~= STATE_READY then return fail("503 5.5.1 Error: MAIL transaction in progress") end
  local mech, initial = arg:match("^(%S+)%s*(%S*)$")
  if not mech then return fail("501 5.5.4 Syntax: AUTH mechanism") end
  mech = mech:upper()
  auth_attempts = auth_attempts + 1
  if auth_attempts > MAX_AUTH then
    reply("421 4.7.0 " .. HOSTNAME .. " Error: too many errors")
    deadend.log("too many AUTH attempts, disconnecting", "warn")
    ending = "too many auth attempts"
    return false
  end

  local user, password, why
  if mech == "PLAIN" then
    local blob
    if initial ~= "" then
      blob = initial == "=" and "" or b64decode(initial)
      if not blob then why = "undecodable" end
    else
      blob, why = auth_response("")
    end
    if blob then
      local authzid, authcid, pw = blob:match("^([^\0]*)\0([^\0]*)\0([^\0]*)$")
      if not authzid then
        deadend.log("auth PLAIN malformed blob", "warn", { data = blob })
        return fail("535 5.7.8 Error: authentication failed: authentication failure")
      end
      if authzid ~= "" then deadend.log("auth PLAIN authzid", "info", { authzid = authzid }) end
      user, password = authcid, pw
    end
  elseif mech == "LOGIN" then
    if initial ~= "" then
      user = b64decode(initial)
      if not user then why = "undecodable" end
    else
      user, why = auth_response("VXNlcm5hbWU6")  -- "Username:"
    end
    if user then password, why = auth_response("UGFzc3dvcmQ6") end  -- "Password:"
  else
    deadend.log("auth unsupported mechanism", "warn", { mechanism = mech })
    return fail("535 5.7.8 Error: authentication failed: Invalid authentication mechanism")
  end

  if why == "closed" or why == "too-long" then
    deadend.log("auth " .. mech .. " client left mid-exchange", "warn", { user = user })
    return false
  elseif why == "aborted" then
    deadend.log("auth " .. mech .. " aborted by client", "info", { user = user })
    return fail("501 5.7.0 Authentication aborted")
  elseif why == "undecodable" then
    deadend.log("auth " .. mech .. " bad base64", "warn")
    return fail("501 5.5.2 Cannot decode response")
  end
  deadend.log(string.format("auth %s attempt %d", mech, auth_attempts), "warn",
    { user = user, password = password })
  return fail("535 5.7.8 Error: authentication failed: authentication failure")
end

-- STARTTLS (RFC 3207): "220 Ready", then the broker's TLS handshake. What the client sent behind the
-- command is plaintext pipelined past it (the CVE-2011-0411 injection): dropped, as Postfix does. Then the
-- session starts over: the client must say EHLO again.
local function do_starttls(arg)
  if arg ~= "" then return fail("501 5.5.4 Syntax: STARTTLS") end
  if tls_active then return fail("554 5.5.1 Error: TLS already active") end
  if state == STATE_MAIL or state == STATE_RCPT then
    return fail("503 5.5.1 Error: MAIL transaction in progress")
  end
  if not reply("220 2.0.0 Ready to start TLS") then return false end
  local pipelined = input:drop()
  if pipelined ~= "" then
    deadend.log("plaintext pipelined after STARTTLS dropped", "warn", { data = pipelined })
  end
  if not deadend.starttls() then
    ending = "TLS handshake failed"
    return false
  end
  tls_active = true
  local tls = deadend.tls_info()
  deadend.log("tls " .. tls.version .. " " .. tls.cipher, "info", { sni = tls.sni })
  helo_name, state = nil, STATE_GREETING
  return true
end

-- DATA: read until the lone dot, unstuff, count; only the Subject is kept, for the log.
local function do_data()
  if not reply("354 End data with <CR><LF>.<CR><LF>") then return false end
  local size, lines, subject, in_headers, at_start = 0, 0, nil, true, true
  while true do
    local line, kind = read_line(true)
    if not line then
      deadend.log(string.format("client left during DATA after %d bytes", size), "warn")
      return false
    end
    if at_start and line == "." and kind == "line" then break end
    if at_start and line:sub(1, 1) == "." then line = line:sub(2) end  -- dot-unstuffing
    if in_headers and at_start then
      if line == "" then
        in_headers = false
      elseif not subject then
        subject = line:match("^[Ss][Uu][Bb][Jj][Ee][Cc][Tt]:%s*(.*)$")
      end
    end
    size = size + #line + (kind == "line" and 2 or 0)
    lines = lines + 1
    at_start = kind == "line"
  end
  messages = messages + 1
  local from, count = mail_from, #rcpts
  reset_transaction()
  if size > MAX_MESSAGE then
    deadend.log(string.format("message refused: %d bytes over the limit", size), "warn")
    return fail("552 5.3.4 Message size exceeds fixed limit")
  end
  local id = queue_id()
  deadend.log(string.format("message %s queued rcpts=%d size=%d lines=%d", id, count, size, lines), "info",
    { ["email.from"] = from, subject = subject })
  return reply("250 2.0.0 Ok: queued as " .. id)
end

local EHLO_LINES = {
  "250-" .. HOSTNAME,
  "250-PIPELINING",
  "250-SIZE " .. MAX_MESSAGE,
  "250-AUTH PLAIN LOGIN",
  "250-ENHANCEDSTATUSCODES",
  "250-8BITMIME",
  "250-DSN",
  "250 SMTPUTF8",
}

-- One command; returns false when the session must end.
local function handle(line)
  local verb, arg = line:match("^%s*(%S+)%s*(.-)%s*$")
  if not verb then return fail("500 5.5.2 Error: bad syntax") end
  verb = verb:upper()

  if verb == "EHLO" or verb == "HELO" then
    if arg == "" then return fail("501 Syntax: " .. verb .. " hostname") end
    helo_name = arg
    reset_transaction()
    state = STATE_READY
    deadend.log(verb, "info", { helo = arg })
    if verb == "HELO" then return reply("250 " .. HOSTNAME) end
    local lines = { table.unpack(EHLO_LINES) }
    if not tls_active then table.insert(lines, 4, "250-STARTTLS") end  -- where Postfix lists it
    return deadend.send(table.concat(lines, "\r\n") .. "\r\n")
  elseif verb == "MAIL" then
    if state == STATE_GREETING then return fail("503 5.5.1 Error: send HELO/EHLO first") end
    if state ~= STATE_READY then return fail("503 5.5.1 Error: nested MAIL command") end
    local addr, params = parse_path(arg, "FROM:")
    if not addr then return fail("501 5.5.4 Syntax: MAIL FROM:<address>") end
    local declared = tonumber(params:upper():match("SIZE=(%d+)") or "")
    if declared and declared > MAX_MESSAGE then
      return fail("552 5.3.4 Message size exceeds fixed limit")
    end
    mail_from, state = addr, STATE_MAIL
    deadend.log("mail", "info", { ["email.from"] = addr, params = params ~= "" and params or nil })
    return reply("250 2.1.0 Ok")
  elseif verb == "RCPT" then
    if state ~= STATE_MAIL and state ~= STATE_RCPT then
      return fail("503 5.5.1 Error: need MAIL command")
    end
    local addr = parse_path(arg, "TO:")
    if not addr or addr == "" then return fail("501 5.5.4 Syntax: RCPT TO:<address>") end
    if #rcpts >= MAX_RCPT then return fail("452 4.5.3 Error: too many recipients") end
    rcpts[#rcpts + 1] = addr
    state = STATE_RCPT
    deadend.log("rcpt", "info", { ["email.to"] = addr })
    return reply("250 2.1.5 Ok")
  elseif verb == "DATA" then
    if state == STATE_GREETING then return fail("503 5.5.1 Error: send HELO/EHLO first") end
    if state == STATE_READY then return fail("503 5.5.1 Error: need MAIL command") end
    if state ~= STATE_RCPT then return fail("503 5.5.1 Error: need RCPT command") end
    if arg ~= "" then return fail("501 5.5.4 Syntax: DATA") end
    return do_data()
  elseif verb == "RSET" then
    reset_transaction()
    return reply("250 2.0.0 Ok")
  elseif verb == "NOOP" then
    return reply("250 2.0.0 Ok")
  elseif verb == "VRFY" then
    return fail("502 5.5.1 VRFY command is disabled")
  elseif verb == "AUTH" then
    return do_auth(arg)
  elseif verb == "STARTTLS" then
    return do_starttls(arg)
  elseif verb == "QUIT" then
    reply("221 2.0.0 Bye")
    ending = "quit"
    return false
  elseif verb == "GET" or verb == "POST" or verb == "CONNECT" or not verb:match("^%a") then
    -- Postfix's smtpd_forbidden_commands (CONNECT GET POST, and anything not starting with a letter):
    -- someone is talking HTTP, a proxy probe or binary to port 25.
    deadend.log("non-SMTP command", "warn", { command = line })
    reply("221 2.7.0 Error: I can break rules, too. Goodbye.")
    ending = "non-SMTP command"
    return false
  end
  deadend.log("unknown command", "warn", { command = line })
  return fail("502 5.5.2 Error: command not recognized")
end

deadend.log("connect from " .. peer)
if reply(BANNER) then
  while true do
    local line, why = read_line(false)
    if not line then
      if why == "too-long" then
        deadend.log("command line over " .. MAX_LINE .. " bytes", "warn")
        reply("500 5.5.2 Error: line too long")
        ending = "line too long"
      else
        ending = "client disconnected"
      end
      break
    end
    commands = commands + 1
    if commands > MAX_COMMANDS then
      reply("421 4.7.0 " .. HOSTNAME .. " Error: too many commands")
      deadend.log("too many commands, disconnecting", "warn")
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

deadend.log(string.format("disconnect (%s) commands=%d messages=%d auth_attempts=%d errors=%d", ending or "?",
  commands, messages, auth_attempts, errors), "info", { helo = helo_name })
deadend.close()
