-- expect: fail instruction-limit: a busy loop once the client sends anything
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
deadend.send("220 ready\r\n")
local line = deadend.recv(100)
if line then
  local n = 0
  while true do n = n + #line end
end
