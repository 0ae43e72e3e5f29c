-- expect: fail memory-limit: closures without end, each holding a kilobyte
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local base = "c"
for _ = 1, 10 do base = base .. base end
local list = {}
local n = 0
while true do
  n = n + 1
  local payload = base .. n
  list[n] = function() return payload end
end
