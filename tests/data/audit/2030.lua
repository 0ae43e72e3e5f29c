-- expect: warn log-flood: a flood of log lines once the client has left
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
deadend.send("220 ready\r\n")
while deadend.recv(100) do deadend.send("500 what\r\n") end
for i = 1, 800 do deadend.log("client gone, cleaning up " .. i) end
