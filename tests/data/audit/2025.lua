-- expect: fail memory-limit: every prefix of the client's input kept (memory grows with its square)
deadend.set_limits(0, 0) deadend.set_tarpit(0, 0)
deadend.send("220 ready\r\n")
local buffer, history = "", {}
while true do
  local d = deadend.recv(4096)
  if not d then break end
  buffer = buffer .. d
  history[#history + 1] = buffer
end
