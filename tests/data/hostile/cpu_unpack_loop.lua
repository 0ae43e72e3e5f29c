-- expect: instruction-limit
local t = {} for i = 1, 100000 do t[i] = i end local n = 0 for i = 1, 1e9 do n = n + select("#", table.unpack(t)) end deadend.send(n)
