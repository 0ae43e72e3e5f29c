-- expect: fail linger: logs in a loop once the peer has left
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
deadend.send("220 ready\r\n")
while deadend.recv(100) do deadend.send("250 ok\r\n") end
local n = 0
while true do
  n = n + 1
  deadend.log("still here " .. n, "debug")
end
