-- expect: warn log-flood: a log line for every byte the client sends
deadend.set_limits(0, 65536) deadend.set_tarpit(0, 0)
deadend.send("220 ready\r\n")
while true do
  local d = deadend.recv(4096)
  if not d then break end
  for i = 1, #d do deadend.log("byte " .. d:byte(i)) end
end
