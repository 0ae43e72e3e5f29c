-- 143.lua: an IMAP honeypot that looks like Dovecot's imap-login with plaintext authentication allowed.
--
-- The greeting carries the pre-login capabilities (no STARTTLS: the script cannot do TLS). Commands are
-- parsed as IMAP does: a tag, a command, then atoms, "quoted strings" (with \" and \\), literals {n}
-- (answered with "+ OK") and LITERAL+ {n+}, and parenthesised lists for ID. CAPABILITY, NOOP, ID,
-- LOGOUT and STARTTLS get Dovecot's answers; LOGIN and AUTHENTICATE PLAIN/LOGIN (SASL-IR too) are logged
-- and refused with "NO [AUTHENTICATIONFAILED] Authentication failed." after a short delay. Anything else
-- is "BAD Error in IMAP command received by server."; the third one ends the session with "* BYE", as in
-- Dovecot. Lines, literals, tokens, commands and login attempts are all bounded.

local CAPABILITIES = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN AUTH=LOGIN"
local MAX_LINE = 8192           -- one line of a command
local MAX_LITERAL = 8192        -- one literal
local MAX_COMMAND = 16384       -- a whole command, literals included
local MAX_TOKENS = 64
local MAX_COMMANDS = 100
local MAX_BAD = 3               -- Dovecot's CLIENT_MAX_BAD_COMMANDS
local MAX_AUTH = 5              -- failed logins before the connection is dropped
local FAIL_DELAY_MS = 1000      -- Dovecot's auth_failure_delay is 2 s
local TARPIT_BASE, TARPIT_JITTER = 100, 200

deadend.set_limits(1000, 256 * 1024)
deadend.set_tarpit(TARPIT_BASE, TARPIT_JITTER)

local peer = deadend.get_ip()

-- Base64 (RFC 4648) decoding; nil when the input is not valid base64.
local b64decode = std.base64.decode

-- Input: a bounded line reader (CRLF or bare LF) and an exact-count reader for literals.
local input = std.reader()
local function read_line() return input:line(MAX_LINE) end
local function read_exactly(n) return input:exactly(n) end

local function send(text)
  return deadend.send(text .. "\r\n")
end

-- Tokens: {kind = "atom" | "string" | "(" | ")", value = text}. Appends the tokens of one line fragment;
-- false when it cannot be parsed (an unterminated quoted string, too many tokens).
local function tokenize(s, tokens)
  local i, n = 1, #s
  while i <= n do
    local c = s:sub(i, i)
    if c == " " then
      i = i + 1
    elseif c == '"' then
      local parts = {}
      i = i + 1
      while true do
        local j = s:find('["\\]', i)
        if not j then return false end
        parts[#parts + 1] = s:sub(i, j - 1)
        if s:sub(j, j) == '"' then
          i = j + 1
          break
        end
        parts[#parts + 1] = s:sub(j + 1, j + 1)  -- a backslash quotes the next character
        i = j + 2
      end
      tokens[#tokens + 1] = { kind = "string", value = table.concat(parts) }
    elseif c == "(" or c == ")" then
      tokens[#tokens + 1] = { kind = c }
      i = i + 1
    else
      local j = s:find('[ ()"]', i) or (n + 1)
      tokens[#tokens + 1] = { kind = "atom", value = s:sub(i, j - 1) }
      i = j
    end
    if #tokens > MAX_TOKENS then return false end
  end
  return true
end

-- Read one command with its literals. Returns the tokens, or nil and why: "closed", "too-long",
-- "syntax" (the tokens so far are returned too, for the tag), "literal-too-big".
local function read_command()
  local tokens, size = {}, 0
  while true do
    local line, why = read_line()
    if not line then return nil, why end
    size = size + #line
    local head, count, plus = line:match("^(.-){(%d+)(%+?)}$")
    if not head then
      if not tokenize(line, tokens) then return nil, "syntax", tokens end
      return tokens
    end
    if not tokenize(head, tokens) then return nil, "syntax", tokens end
    local n = tonumber(count)
    size = size + n
    if n > MAX_LITERAL or size > MAX_COMMAND or #tokens >= MAX_TOKENS then
      return nil, plus == "+" and "literal-too-big" or "syntax", tokens
    end
    if plus == "" and not send("+ OK") then return nil, "closed" end
    local literal = read_exactly(n)
    if not literal then return nil, "closed" end
    tokens[#tokens + 1] = { kind = "string", value = literal }
  end
end

local function is_string(t)
  return t and (t.kind == "atom" or t.kind == "string")
end

-- Session state.
local STATE_NOT_AUTHENTICATED, STATE_LOGOUT = "not-authenticated", "logout"
local state = STATE_NOT_AUTHENTICATED
local attempts, bad, commands = 0, 0, 0
local last_user = nil
local ending = nil

local function tagged(tag, text)
  return send(tag .. " " .. text)
end

-- Log and refuse one set of credentials; false when the client must now be dropped.
local function refuse(tag, mech, user, password)
  attempts = attempts + 1
  last_user = user
  deadend.log(string.format("auth %s attempt %d", mech, attempts), "warn",
    { user = user, password = password })
  deadend.sleep(FAIL_DELAY_MS)
  tagged(tag, "NO [AUTHENTICATIONFAILED] Authentication failed.")
  if attempts >= MAX_AUTH then
    deadend.log("too many failed logins, disconnecting", "warn")
    ending = "too many failed logins"
    return false
  end
  return true
end

-- One SASL continuation: "+ <challenge>", then a base64 line; nil and why when there is no answer.
local function sasl_step(challenge)
  if not send("+ " .. challenge) then return nil, "closed" end
  local line, why = read_line()
  if not line then return nil, why end
  if line == "*" then return nil, "aborted" end
  local decoded = b64decode(line)
  if not decoded then return nil, "undecodable" end
  return decoded
end

local function authenticate(tag, args)
  local mech = (args[1] and args[1].kind == "atom") and args[1].value:upper() or nil
  local initial = args[2] and args[2].kind == "atom" and args[2].value or nil
  if not mech or #args > 2 then return nil end
  local user, password, why
  if mech == "PLAIN" then
    local blob
    if initial then
      blob = initial == "=" and "" or b64decode(initial)
      if not blob then why = "undecodable" end
    else
      blob, why = sasl_step("")
    end
    if blob then
      local authzid, authcid, pw = blob:match("^([^\0]*)\0([^\0]*)\0([^\0]*)$")
      if not authzid then
        deadend.log("auth PLAIN malformed message", "warn", { data = blob })
        return tagged(tag, "NO [AUTHENTICATIONFAILED] Authentication failed.")
      end
      if authzid ~= "" then deadend.log("auth PLAIN authzid", "info", { authzid = authzid }) end
      user, password = authcid, pw
    end
  elseif mech == "LOGIN" then
    if initial then
      user = b64decode(initial)
      if not user then why = "undecodable" end
    else
      user, why = sasl_step("VXNlcm5hbWU6")  -- "Username:"
    end
    if user then password, why = sasl_step("UGFzc3dvcmQ6") end  -- "Password:"
  else
    deadend.log("auth unsupported mechanism", "warn", { mechanism = mech })
    return tagged(tag, "NO Unsupported authentication mechanism.")
  end
  if why == "closed" or why == "too-long" then
    deadend.log("auth " .. mech .. " client left mid-exchange", "warn", { user = user })
    return false
  elseif why == "aborted" then
    deadend.log("auth " .. mech .. " aborted by client", "info", { user = user })
    return tagged(tag, "BAD Authentication aborted by client.")
  elseif why == "undecodable" then
    deadend.log("auth " .. mech .. " bad base64", "warn")
    return tagged(tag, "BAD Invalid base64 data in continued response")
  end
  return refuse(tag, "AUTHENTICATE " .. mech, user, password)
end

-- ID ("key" "value" ...) or ID NIL: the client's self-description is worth logging.
local function id(tag, args)
  if #args == 1 and args[1].kind == "atom" and args[1].value:upper() == "NIL" then
    deadend.log("client id NIL")
  elseif #args >= 2 and args[1].kind == "(" and args[#args].kind == ")" then
    local fields = {}
    for i = 2, #args - 1 do
      if not is_string(args[i]) then return nil end
      fields[#fields + 1] = args[i].value
    end
    deadend.log("client id", "info", { client_id = table.concat(fields, " ") })
  else
    return nil
  end
  send('* ID ("name" "Dovecot")')
  return tagged(tag, "OK ID completed.")
end

-- One command. Returns true to go on, false to end the session, nil for "bad command".
local function execute(tag, command, args)
  if command == "CAPABILITY" then
    send("* CAPABILITY " .. CAPABILITIES)
    return tagged(tag, "OK Pre-login capabilities listed, post-login capabilities have more.")
  elseif command == "NOOP" then
    return tagged(tag, "OK NOOP completed.")
  elseif command == "LOGOUT" then
    send("* BYE Logging out")
    tagged(tag, "OK Logout completed.")
    state, ending = STATE_LOGOUT, "logout"
    return false
  elseif command == "ID" then
    return id(tag, args)
  elseif command == "STARTTLS" then
    return tagged(tag, "BAD TLS support isn't enabled.")
  elseif command == "LOGIN" then
    if #args ~= 2 or not is_string(args[1]) or not is_string(args[2]) then return nil end
    return refuse(tag, "LOGIN", args[1].value, args[2].value)
  elseif command == "AUTHENTICATE" then
    return authenticate(tag, args)
  end
  return nil
end

-- A bad command: BAD, and BYE on the third.
local function bad_command(tag, text)
  bad = bad + 1
  if bad >= MAX_BAD then
    send("* BYE Too many invalid IMAP commands.")
    ending = "too many invalid commands"
    return false
  end
  return tagged(tag, "BAD " .. (text or "Error in IMAP command received by server."))
end

deadend.log("connect from " .. peer)
if send("* OK [CAPABILITY " .. CAPABILITIES .. "] Dovecot ready.") then
  while state == STATE_NOT_AUTHENTICATED do
    local tokens, why, partial = read_command()
    commands = commands + 1
    if commands > MAX_COMMANDS then
      send("* BYE Too many commands.")
      deadend.log("too many commands, disconnecting", "warn")
      ending = "too many commands"
      break
    end
    if not tokens and (why == "closed" or why == "too-long" or why == "literal-too-big") then
      if why ~= "closed" then
        deadend.log("command too large (" .. why .. ")", "warn")
        send("* BYE Command too large.")
      end
      ending = why == "closed" and "client disconnected" or why
      break
    end
    local toks = tokens or partial
    local tag = (toks[1] and toks[1].kind == "atom" and toks[1].value:match("^[^%c%%%*{+\\]+$")) or "*"
    local command = toks[2] and toks[2].kind == "atom" and toks[2].value:upper() or ""
    local args = {}
    for i = 3, #toks do args[#args + 1] = toks[i] end
    local ok
    if tokens and tag ~= "*" then
      deadend.log("command", "info", { tag = tag, command = command })
      ok = execute(tag, command, args)
    end
    if ok == nil then
      deadend.log("bad command", "warn", { tag = tag, command = command })
      if tag:upper() == "LOGIN" then
        ok = bad_command(tag, "First parameter in line is IMAP's command tag, not the command name. Add "
          .. "that before the command, like: a login user pass")
      else
        ok = bad_command(tag)
      end
    end
    if not ok then
      ending = ending or "client disconnected"
      break
    end
  end
else
  ending = "client disconnected"
end

deadend.log(string.format("disconnect (%s) commands=%d auth_attempts=%d", ending or "?", commands, attempts),
  "info", { user = last_user })
deadend.close()
