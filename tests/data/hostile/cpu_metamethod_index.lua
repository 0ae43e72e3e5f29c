-- expect: instruction-limit
local t = setmetatable({}, {__index = function() while true do end end}) local _ = t.x
