-- expect: fail instruction-limit: a long computation inside pcall, its failure ignored, per command
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
deadend.send("220 ready\r\n")
while true do
  local line = deadend.recv(100)
  if not line then break end
  local ok = pcall(function()
    local x = 0
    for i = 1, 1e12 do x = x + i end
  end)
  deadend.send(ok and "ok\r\n" or "error\r\n")
end
