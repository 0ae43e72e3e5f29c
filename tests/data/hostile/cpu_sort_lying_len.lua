-- expect: instruction-limit|memory-limit
local t = setmetatable({}, {__len = function() return (1 << 31) - 2 end, __index = function(_, i) return -i end}) pcall(table.sort, t) deadend.send("survived")
