-- expect: warn script-error: uses recv's nil as a string (the client left)
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
deadend.send("220 ready\r\n")
while true do
  local line = deadend.recv(100)
  deadend.send("echo " .. line)
end
