-- expect: fail linger: ignores nil from recv and keeps calling it with send
deadend.set_limits(0, 0) deadend.set_tarpit(0, 0)
deadend.send("220 ready\r\n")
while true do
  local d = deadend.recv(100)
  deadend.send(d or "")
end
