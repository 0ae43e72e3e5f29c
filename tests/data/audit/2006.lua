-- expect: fail instruction-limit: an error handler that loops on every error the client causes
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local function handler(e)
  local n = 0
  repeat n = n + 1 until n < 0
  return e
end
while true do
  local d = deadend.recv(100)
  if not d then return end
  xpcall(function() return tonumber(d) + 1 end, handler)
end
