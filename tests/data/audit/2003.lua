-- expect: fail instruction-limit: a busy loop inside pcall, retried when it fails
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
deadend.send("220 ready\r\n")
while true do
  pcall(function() while true do end end)
end
