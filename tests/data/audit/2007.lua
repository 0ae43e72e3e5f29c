-- expect: fail instruction-limit: a gsub callback that never returns
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
deadend.send("220 ready\r\n")
local s = ("x"):rep(100)
s:gsub(".", function() while true do end end)
