-- expect: fail instruction-limit: an __index metamethod that loops
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local config = setmetatable({}, { __index = function(t, k) while true do end end })
deadend.send("220 " .. tostring(config.banner) .. "\r\n")
