-- expect: fail memory-limit: doubling a string with .. until memory runs out
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local s = "x"
while true do s = s .. s end
