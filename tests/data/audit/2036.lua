-- expect: warn script-error: takes the length of recv's nil
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
deadend.send("220 ready\r\n")
local total = 0
while true do total = total + #deadend.recv(100) end
