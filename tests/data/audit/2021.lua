-- expect: fail memory-limit: doubling a string with gsub until memory runs out
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local s = "ab"
while true do s = s:gsub("^(.*)$", "%1%1") end
