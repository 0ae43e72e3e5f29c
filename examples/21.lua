-- 21.lua: an FTP honeypot that looks like vsFTPd 3.0.3 on Linux with anonymous access turned on.
--
-- Every USER/PASS pair is logged. Real accounts never get in: "530 Login incorrect." after vsftpd's
-- one-second delay, and the connection is dropped after three failures (max_login_fails). "anonymous"
-- and "ftp" get in with any password (logged: scanners put their e-mail or tool name there) and find an
-- empty, read-only tree. The script cannot open data connections, so it is configured like a vsftpd
-- with pasv_enable=NO and port_enable=NO: PASV/EPSV/PORT/EPRT answer "550 Permission denied." and
-- LIST/NLST/RETR "425 Use PORT or PASV first."; writes answer 550. Texts and codes are vsftpd's. Before
-- login everything but USER, PASS, FEAT, OPTS and QUIT is "530 Please login with USER and PASS.";
-- after it, unknown verbs are "500 Unknown command.". Every command is logged.

local BANNER = "220 (vsFTPd 3.0.3)"
local MAX_LINE = 4096           -- vsftpd's VSFTP_MAX_COMMAND_LINE
local MAX_COMMANDS = 100        -- per connection
local MAX_LOGIN_FAILS = 3       -- vsftpd's max_login_fails
local FAIL_DELAY_MS = 1000      -- vsftpd's delay_failed_login (1 s)
local ALLOW_ANONYMOUS = true
local TARPIT_BASE, TARPIT_JITTER = 100, 200

deadend.set_limits(2000, 256 * 1024)
deadend.set_tarpit(TARPIT_BASE, TARPIT_JITTER)

local peer = deadend.get_ip()

-- Bounded line reader (CRLF or bare LF): the line, or nil and "closed" / "too-long".
local input = std.reader()
local function read_line() return input:line(MAX_LINE) end

local function reply(text)
  return deadend.send(text .. "\r\n")
end

local FEAT = table.concat({
  "211-Features:",
  " MDTM",         -- no EPRT/EPSV/PASV: data connections are disabled, and vsftpd then omits them
  " REST STREAM",
  " SIZE",
  " TVFS",
  " UTF8",
  "211 End",
}, "\r\n") .. "\r\n"

local HELP = table.concat({
  "214-The following commands are recognized.",
  " ABOR ACCT ALLO APPE CDUP CWD  DELE EPRT EPSV FEAT HELP LIST MDTM MKD",
  " MODE NLST NOOP OPTS PASS PASV PORT PWD  QUIT REIN REST RETR RMD  RNFR",
  " RNTO SITE SIZE SMNT STAT STOR STOU STRU SYST TYPE USER XCUP XCWD XMKD",
  " XPWD XRMD",
  "214 Help OK.",
}, "\r\n") .. "\r\n"

-- The anonymous tree: an empty /pub, as a stock vsftpd package ships it.
local DIRS = { ["/"] = true, ["/pub"] = true }

-- Resolve a CWD argument against the current directory; nil when it has too many parts.
local function resolve(cwd, arg)
  local path = arg:sub(1, 1) == "/" and arg or (cwd .. "/" .. arg)
  local parts, n = {}, 0
  for part in path:gmatch("[^/]+") do
    n = n + 1
    if n > 64 then return nil end
    if part == ".." then
      parts[#parts] = nil
    elseif part ~= "." then
      parts[#parts + 1] = part
    end
  end
  return "/" .. table.concat(parts, "/")
end

-- Verbs vsftpd knows but refuses here: data channels are off, anonymous writes are off.
local DENIED = {
  PASV = true, EPSV = true, LPSV = true, PORT = true, EPRT = true, LPRT = true,
  STOR = true, STOU = true, APPE = true, MKD = true, XMKD = true, RMD = true, XRMD = true,
  DELE = true, RNFR = true, RNTO = true, SMNT = true, REIN = true, ACCT = true,
}
local NEEDS_DATA = { LIST = true, NLST = true, RETR = true, MLSD = true }
local WRITES = { STOR = true, STOU = true, APPE = true, MKD = true, XMKD = true, RMD = true, XRMD = true,
                 DELE = true, RNFR = true, RNTO = true, SITE = true }

-- Session state.
local STATE_NEED_USER, STATE_NEED_PASS, STATE_LOGGED_IN = "need-user", "need-pass", "logged-in"
local state = STATE_NEED_USER
local user = nil
local cwd, binary = "/", false
local attempts, fails, commands = 0, 0, 0
local ending = nil

local function do_pass(arg)
  if state ~= STATE_NEED_PASS then return reply("503 Login with USER first.") end
  attempts = attempts + 1
  local upper = user:upper()
  if ALLOW_ANONYMOUS and (upper == "ANONYMOUS" or upper == "FTP") then
    deadend.log("anonymous login", "warn", { user = user, password = arg })
    state = STATE_LOGGED_IN
    return reply("230 Login successful.")
  end
  deadend.log("login attempt " .. attempts, "warn", { user = user, password = arg })
  deadend.sleep(FAIL_DELAY_MS)
  fails = fails + 1
  user, state = nil, STATE_NEED_USER
  reply("530 Login incorrect.")
  if fails >= MAX_LOGIN_FAILS then
    ending = "too many failed logins"
    return false
  end
  return true
end

local function status()
  return table.concat({
    "211-FTP server status:",
    "     Connected to " .. peer,
    "     Logged in as ftp",
    "     TYPE: " .. (binary and "BINARY" or "ASCII"),
    "     No session bandwidth limit",
    "     Session timeout in seconds is 300",
    "     Control connection is plain text",
    "     Data connections will be plain text",
    "     At session startup, client count was 1",
    "     vsFTPd 3.0.3 - secure, fast, stable",
    "211 End of status",
  }, "\r\n") .. "\r\n"
end

-- Commands after login (anonymous only).
local function logged_in(verb, arg)
  if verb == "PWD" or verb == "XPWD" then
    return reply('257 "' .. cwd .. '" is the current directory')
  elseif verb == "CWD" or verb == "XCWD" or verb == "CDUP" or verb == "XCUP" then
    local target = (verb == "CDUP" or verb == "XCUP") and ".." or arg
    local path = target ~= "" and resolve(cwd, target)
    if path and DIRS[path] then
      cwd = path
      return reply("250 Directory successfully changed.")
    end
    return reply("550 Failed to change directory.")
  elseif verb == "SYST" then
    return reply("215 UNIX Type: L8")
  elseif verb == "TYPE" then
    local t = arg:upper()
    if t == "I" or t == "L 8" then
      binary = true
      return reply("200 Switching to Binary mode.")
    elseif t == "A" or t == "A N" then
      binary = false
      return reply("200 Switching to ASCII mode.")
    end
    return reply("500 Unrecognised TYPE command.")
  elseif verb == "NOOP" then
    return reply("200 NOOP ok.")
  elseif verb == "STAT" and arg == "" then
    return deadend.send(status())
  elseif verb == "HELP" then
    return deadend.send(HELP)
  elseif verb == "MODE" then
    if arg:upper() == "S" then return reply("200 Mode set to S.") end
    return reply("504 Bad MODE command.")
  elseif verb == "STRU" then
    if arg:upper() == "F" then return reply("200 Structure set to F.") end
    return reply("504 Bad STRU command.")
  elseif verb == "REST" then
    local pos = arg:match("^%d+$") and arg or "0"
    return reply("350 Restart position accepted (" .. pos .. ").")
  elseif verb == "ALLO" then
    return reply("202 ALLO command ignored.")
  elseif verb == "ABOR" then
    return reply("225 No transfer to ABOR.")
  elseif verb == "SIZE" then
    return reply("550 Could not get file size.")
  elseif verb == "MDTM" then
    return reply("550 Could not get file modification time.")
  elseif verb == "STAT" then  -- a listing over the control connection: the tree is empty
    return reply("213-Status follows:") and reply("213 End of status")
  elseif NEEDS_DATA[verb] then
    return reply("425 Use PORT or PASV first.")
  elseif DENIED[verb] then
    return reply("550 Permission denied.")
  elseif verb == "SITE" then
    return reply("500 Unknown SITE command.")
  elseif verb == "USER" then
    return reply("530 Can't change to another user.")
  elseif verb == "PASS" then
    return reply("230 Already logged in.")
  end
  return reply("500 Unknown command.")
end

-- One command line; returns false when the session must end.
local function handle(line)
  local verb, arg = line:match("^(%S*)%s?(.-)$")
  verb = verb:upper()
  if verb == "" and arg == "" then return true end  -- vsftpd ignores empty lines (NAT device bugs)

  if verb == "USER" then
    if state == STATE_LOGGED_IN then return reply("530 Can't change to another user.") end
    user, state = arg, STATE_NEED_PASS
    deadend.log("user", "info", { user = arg })
    return reply("331 Please specify the password.")
  elseif verb == "PASS" then
    if state == STATE_LOGGED_IN then return reply("230 Already logged in.") end
    return do_pass(arg)
  elseif verb == "QUIT" then
    reply("221 Goodbye.")
    ending = "quit"
    return false
  elseif verb == "FEAT" then
    return deadend.send(FEAT)
  elseif verb == "OPTS" then
    if arg:upper() == "UTF8 ON" then return reply("200 Always in UTF8 mode.") end
    return reply("501 Option not understood.")
  end

  if state ~= STATE_LOGGED_IN then
    deadend.log("command before login", "info", { command = line })
    return reply("530 Please login with USER and PASS.")
  end
  deadend.log("command", WRITES[verb] and "warn" or "info", { command = line })
  return logged_in(verb, arg)
end

deadend.log("connect from " .. peer)
if reply(BANNER) then
  while true do
    local line, why = read_line()
    if not line then
      if why == "too-long" then
        deadend.log("command line over " .. MAX_LINE .. " bytes", "warn")
        ending = "line too long"
      else
        ending = "client disconnected"
      end
      break
    end
    commands = commands + 1
    if commands > MAX_COMMANDS then
      reply("421 Too many commands.")
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

deadend.log(string.format("disconnect (%s) state=%s commands=%d login_attempts=%d", ending or "?", state,
  commands, attempts), "info", { user = user })
deadend.close()
