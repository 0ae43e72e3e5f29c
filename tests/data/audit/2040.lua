-- expect: warn instructions: three million steps between each of fifteen API calls
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
for round = 1, 15 do
  local x = 0
  for i = 1, 1000000 do x = x + i % 7 end
  deadend.get_ip()
end
deadend.send("220 ready\r\n")
