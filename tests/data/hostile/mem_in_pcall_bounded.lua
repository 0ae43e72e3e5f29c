-- expect: done not enough memory
local ok, e = pcall(function() local t = {} for i = 1, 1e9 do t[i] = "x" .. i end end) t = nil deadend.send(tostring(e))
