-- expect: fail static: reads the files of the host (io)
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local f = io.open("/etc/shadow")
deadend.send(f and f:read("a") or "none")
