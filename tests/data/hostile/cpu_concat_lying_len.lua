-- expect: instruction-limit
local t = setmetatable({}, {__len = function() return 1 << 40 end, __index = function() return "x" end}) pcall(table.concat, t) deadend.send("survived")
