-- expect: fail instruction-limit: a __concat metamethod that loops
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local name = setmetatable({}, { __concat = function(a, b) while true do end end })
deadend.send("hello " .. name)
