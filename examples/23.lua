-- 23.lua: a Telnet honeypot that looks like BusyBox telnetd + login on an embedded Linux box.
--
-- It opens with the options BusyBox telnetd sends (IAC DO ECHO, DO NAWS, WILL ECHO, WILL SGA) and
-- strips every IAC sequence from the input (commands, option negotiation, subnegotiations; IAC IAC is
-- a literal 0xff) without answering it, as BusyBox does. Then BusyBox login's dialogue: "<host> login: "
-- (the user name echoed, since the server said WILL ECHO), "Password: " (not echoed), the pause, and
-- "Login incorrect". Every user/password pair is logged; after three failures the connection is closed,
-- like BusyBox login. Nobody ever gets a shell.

local HOSTNAME = "router"
local NEGOTIATE = true          -- send BusyBox telnetd's opening options
local MAX_ATTEMPTS = 3          -- BusyBox login gives up after three bad passwords
local MAX_EMPTY = 10            -- empty user names before giving up (BusyBox: EMPTY_USERNAME_COUNT)
local MAX_LINE = 256            -- longer input lines are cut (BusyBox login reads 64 bytes)
local MAX_INPUT = 4096          -- bytes without a line end before the script gives up on the client
local MAX_SUBNEG = 512          -- an IAC SB ... IAC SE longer than this is dropped
local FAIL_DELAY_MS = 1000      -- BusyBox waits 3 s (LOGIN_FAIL_DELAY); a honeypot can be quicker
local TARPIT_BASE, TARPIT_JITTER = 100, 200

deadend.set_limits(4000, 64 * 1024)  -- interactive clients send a byte per read
deadend.set_tarpit(TARPIT_BASE, TARPIT_JITTER)

local peer = deadend.get_ip()

local IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
local OPT_ECHO, OPT_SGA, OPT_NAWS = 1, 3, 31

-- Telnet input: bytes from the socket go through an IAC filter into the reader (below), which then holds
-- only what the user typed. The filter keeps its state across reads, so a sequence split between two
-- reads is fine.
local iac_state = "data"   -- data | iac | option | sb | sb-iac
local subneg, subneg_len = nil, 0
local options_seen = 0

local function filter(chunk)
  local out = {}
  for i = 1, #chunk do
    local b = chunk:byte(i)
    if iac_state == "data" then
      if b == IAC then iac_state = "iac" else out[#out + 1] = string.char(b) end
    elseif iac_state == "iac" then
      if b == IAC then
        out[#out + 1] = "\255"
        iac_state = "data"
      elseif b == WILL or b == WONT or b == DO or b == DONT then
        iac_state = "option"
      elseif b == SB then
        iac_state, subneg, subneg_len = "sb", nil, 0
      else
        iac_state = "data"  -- NOP, AYT, BRK, GA, ...: two bytes, ignored
      end
    elseif iac_state == "option" then
      options_seen = options_seen + 1
      iac_state = "data"
    elseif iac_state == "sb" or iac_state == "sb-iac" then
      if iac_state == "sb-iac" then
        iac_state = (b == SE) and "data" or "sb"
        if b == SE and subneg == OPT_NAWS and subneg_len == 5 then
          deadend.log("client window size received", "debug")
        end
      elseif b == IAC then
        iac_state = "sb-iac"
      else
        if not subneg then subneg = b end
        subneg_len = subneg_len + 1
        if subneg_len > MAX_SUBNEG then iac_state = "data" end  -- runaway subnegotiation: give up on it
      end
    end
  end
  return table.concat(out)
end

-- One line of user input; bytes are echoed as they are consumed when `echo` is set (the tty echo the
-- user would see). A line ends at CR (CR LF and CR NUL count once) or LF; BS and DEL erase; the line is
-- cut at MAX_LINE. Returns the line, or nil and why: the client left, or sent MAX_INPUT bytes without a
-- line end (a flood: read at the tarpit's pace it would hold the sandbox long after the client left).
local input = std.reader(function()
  local chunk = deadend.recv(1024)
  return chunk and filter(chunk)
end)
local pending_cr = false
local function read_line(echo)
  local line, out, taken = {}, {}, 0
  while true do
    if #out > 0 and input:buffered() == 0 then  -- about to wait for the user: show the echo so far
      deadend.send(table.concat(out))
      out = {}
    end
    local c = input:some(1)
    if not c then return nil, "left" end
    taken = taken + 1
    if taken > MAX_INPUT then return nil, "flood" end
    if pending_cr and (c == "\n" or c == "\0") then
      pending_cr = false
    else
      pending_cr = false
      if c == "\r" or c == "\n" then
        pending_cr = c == "\r"
        if echo then out[#out + 1] = "\r\n" end
        if #out > 0 then deadend.send(table.concat(out)) end
        return table.concat(line)
      elseif c == "\3" or (c == "\4" and #line == 0) then  -- ^C, or ^D on an empty line: login exits
        if #out > 0 then deadend.send(table.concat(out)) end
        return nil
      elseif c == "\b" or c == "\127" then
        if #line > 0 then
          line[#line] = nil
          if echo then out[#out + 1] = "\b \b" end
        end
      elseif c:byte() >= 32 or c == "\t" then
        if #line < MAX_LINE then
          line[#line + 1] = c
          if echo then out[#out + 1] = c end
        end
      end
    end
  end
end

-- Protocol states.
local STATE_LOGIN, STATE_PASSWORD, STATE_DONE = "login", "password", "done"
local state = STATE_LOGIN
local attempts, empty = 0, 0
local user = nil
local ending = nil

deadend.log("connect from " .. peer)
local opening = "\r\n"
if NEGOTIATE then
  opening = string.char(IAC, DO, OPT_ECHO, IAC, DO, OPT_NAWS, IAC, WILL, OPT_ECHO, IAC, WILL, OPT_SGA)
    .. opening
end
if not deadend.send(opening .. HOSTNAME .. " login: ") then
  state, ending = STATE_DONE, "client disconnected"
end

while state ~= STATE_DONE do
  if state == STATE_LOGIN then
    local line, why = read_line(true)
    if not line then
      ending = why == "flood" and "input without a line end" or "client disconnected at login prompt"
      break
    end
    user = line:match("^%s*(%S+)")  -- BusyBox login takes the first word
    if not user then
      empty = empty + 1
      if empty >= MAX_EMPTY then
        ending = "too many empty user names"
        break
      end
      deadend.send(HOSTNAME .. " login: ")
    else
      state = STATE_PASSWORD
      deadend.send("Password: ")
    end
  elseif state == STATE_PASSWORD then
    local password, why = read_line(false)
    if not password then
      deadend.log("client left at the password prompt", "warn", { user = user })
      ending = why == "flood" and "input without a line end" or "client disconnected at password prompt"
      break
    end
    attempts = attempts + 1
    deadend.log("login attempt " .. attempts, "warn", { user = user, password = password })
    deadend.send("\r\n")  -- the newline the unechoed Enter did not show
    deadend.sleep(FAIL_DELAY_MS)
    if not deadend.send("\r\nLogin incorrect\r\n") then
      ending = "client disconnected"
      break
    end
    if attempts >= MAX_ATTEMPTS then
      ending = "too many failed logins"
      break
    end
    state = STATE_LOGIN
    deadend.send(HOSTNAME .. " login: ")
  end
end

deadend.log(string.format("disconnect (%s) login_attempts=%d telnet_options=%d", ending or "?", attempts,
  options_seen))
deadend.close()
