-- expect: fail instruction-limit: an xpcall message handler that never returns
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
deadend.send("220 ready\r\n")
xpcall(function() error("boom") end, function() while true do end end)
