-- expect: fail linger: waits for an empty string that never comes (recv gives nil)
deadend.set_limits(0, 0) deadend.set_tarpit(0, 0)
deadend.send("220 ready\r\n")
while true do
  local d = deadend.recv(10)
  if d == "" then break end
end
