-- expect: done not enough memory
local ok, e = pcall(function() local t = {} for i = 1, 1e9 do t[i] = ("x"):rep(100) .. i end end) t = nil deadend.send(tostring(e))
