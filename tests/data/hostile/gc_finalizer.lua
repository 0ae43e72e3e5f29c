-- expect: done __gc
deadend.send(select(2, pcall(setmetatable, {}, {__gc = function() while true do end end})))
