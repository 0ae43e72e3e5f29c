-- expect: warn log-flood: five thousand log lines at every connection
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
for i = 1, 5000 do deadend.log("debug step " .. i) end
deadend.send("220 ready\r\n")
deadend.recv(100)
