-- expect: fail instruction-limit: table.concat over a table whose __len claims a trillion items
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local t = setmetatable({}, { __len = function() return 1 << 40 end, __index = function() return "x" end })
deadend.send(table.concat(t))
