-- expect: warn memory: a 16 MiB string built by doubling and kept for the session
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local padding = "0123456789abcdef"
for _ = 1, 20 do padding = padding .. padding end
deadend.send("220 ready " .. #padding .. "\r\n")
local line = deadend.recv(100)
deadend.send(line and "bye\r\n" or "")
