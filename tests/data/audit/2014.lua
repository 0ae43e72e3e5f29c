-- expect: fail memory-limit: deep recursion: its stack fills the heap
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local function depth(n) return 1 + depth(n + 1) end
deadend.send("220 ready\r\n")
deadend.send(depth(1) .. "\r\n")
