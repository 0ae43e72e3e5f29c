-- expect: instruction-limit
local t = setmetatable({}, {__len = function() return 1 << 40 end}) pcall(table.insert, t, 1, "x") deadend.send("survived")
