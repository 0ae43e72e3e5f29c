-- expect: instruction-limit
local t = setmetatable({}, {__len = function() return 1 << 40 end}) pcall(table.remove, t, 1) deadend.send("survived")
