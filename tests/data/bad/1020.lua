-- clean: the clock is used only behind a type(os) guard
deadend.set_limits(10, 4096) deadend.set_tarpit(100, 50)
local has_clock = type(os) == "table" and type(os.date) == "function"
local function now() return has_clock and os.date("!%H:%M:%S") or "00:00:00" end
deadend.send(now() .. "\r\n")
