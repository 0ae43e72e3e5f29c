-- expect: fail instruction-limit: a __tostring metamethod that loops, reached through print
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local peer = setmetatable({}, { __tostring = function() while true do end end })
print("connect from", peer)
