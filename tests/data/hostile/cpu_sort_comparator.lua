-- expect: instruction-limit
local t = {3, 2, 1} table.sort(t, function() while true do end end)
