-- expect: fail instruction-limit: a sort comparator that loops
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local t = {}
for i = 1, 50 do t[i] = (i * 7919) % 101 end
table.sort(t, function(a, b) while a == a do end return a < b end)
