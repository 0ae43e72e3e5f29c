-- expect: instruction-limit
local mt = {__eq = function() while true do end end} local a, b = setmetatable({}, mt), setmetatable({}, mt) local _ = a == b
