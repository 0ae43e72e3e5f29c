-- expect: fail instruction-limit: ten million steps of work for every byte the client sends
deadend.set_limits(100, 65536) deadend.set_tarpit(0, 0)
deadend.send("220 ready\r\n")
while true do
  local d = deadend.recv(1024)
  if not d then break end
  local sum = 0
  for i = 1, #d * 10000000 do sum = sum + i end
  deadend.send(sum .. "\r\n")
end
