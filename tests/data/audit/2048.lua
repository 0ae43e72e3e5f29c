-- expect: fail static: reaches for the debug library
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
debug.sethook(function() end, "", 1)
deadend.send("220 ready\r\n")
