-- 22.lua: an SSH tarpit in the manner of endlessh.
--
-- RFC 4253 4.2 lets a server send other lines before its "SSH-" version line, and clients wait for
-- it. This script never sends one: it trickles a random line every DELAY_MS (plus jitter), forever, so
-- a scanner or brute-forcer sits waiting for a banner that never comes. The first line goes out at once,
-- so the client sees data immediately. The script never reads: when the peer leaves, the broker ends the
-- sleep in progress, and the script says how long it held the peer. It gives up on
-- its own after MAX_HOLD_MS, before the broker's default one-hour session ceiling.

local DELAY_MS = 10000       -- between two lines (endlessh's default)
local JITTER_MS = 1000       -- plus 0..JITTER_MS, so the rhythm is not perfectly regular
local MAX_LINE = 32          -- random line length 3..MAX_LINE, CRLF not counted
local MAX_HOLD_MS = 55 * 60 * 1000

-- The script never calls recv; should it ever, it may read only a little (an SSH client banner).
deadend.set_limits(4, 1024)
-- No tarpit delay on reads: the pace is set by the sleeps below.
deadend.set_tarpit(0, 0)

local peer = deadend.get_ip()

-- A line of printable ASCII that cannot be mistaken for a version line.
local function random_line()
  local n = math.random(3, MAX_LINE)
  local t = {}
  for i = 1, n do t[i] = string.char(math.random(32, 126)) end
  local line = table.concat(t)
  if line:sub(1, 4) == "SSH-" then line = "s" .. line:sub(2) end
  return line .. "\r\n"
end

local function seconds(ms)
  return string.format("%.1fs", ms / 1000)
end

deadend.log("connect from " .. peer .. ": tarpit started")
local held_ms, lines, bytes = 0, 0, 0
local outcome = "released after the time limit"
while held_ms < MAX_HOLD_MS do
  local line = random_line()
  if not deadend.send(line) then
    outcome = "peer gone"
    break
  end
  lines, bytes = lines + 1, bytes + #line
  -- sleep returns the milliseconds slept: fewer when the peer left meanwhile. A send to a peer that has
  -- just left may still succeed (TCP takes it; the peer's reset comes later), so the short sleep is the
  -- sign to stop, not the next send: waiting for that would keep the sandbox another whole delay.
  local delay = DELAY_MS + math.random(0, JITTER_MS)
  local slept = deadend.sleep(delay)
  held_ms = held_ms + slept
  if slept < delay then
    outcome = "peer gone"
    break
  end
end

-- held_ms counts the sleeps, so it needs no clock.
deadend.log(string.format("tarpit end: %s, held %s, %d lines, %d bytes", outcome, seconds(held_ms), lines,
  bytes), "info", { held_ms = held_ms })
deadend.close()
