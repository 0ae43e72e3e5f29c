-- expect: fail cpu-deadline: a catastrophic pattern over what the client sends
deadend.set_limits(100, 65536) deadend.set_tarpit(0, 0)
deadend.send("220 ready\r\n")
local buf = ""
while #buf < 30 do
  local d = deadend.recv(100)
  if not d then buf = buf .. ("x"):rep(30) break end
  buf = buf .. d
end
for word in buf:gmatch(("[^\n]-"):rep(25) .. "\n\n") do deadend.send(word) end
