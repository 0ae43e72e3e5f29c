-- expect: fail memory-limit: a table that grows without bound
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local t = {}
local i = 0
while true do
  i = i + 1
  t[i] = { i, tostring(i) }
  if i % 100000 == 0 then deadend.get_ip() end
end
