-- expect: fail memory-limit: a megabyte copied in a loop, every copy kept
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local chunk = "z"
for _ = 1, 20 do chunk = chunk .. chunk end
local kept = {}
for i = 1, 1000 do kept[i] = chunk .. i end
