-- expect: fail instruction-limit|cpu-deadline: deep recursion inside pcall, tried again and again (the budget, or the deadline while C unwinds a huge stack)
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local function depth(n) return 1 + depth(n + 1) end
deadend.send("220 ready\r\n")
while true do pcall(depth, 1) end
