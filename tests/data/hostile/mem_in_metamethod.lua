-- expect: memory-limit
local t = setmetatable({}, {__index = function(t, k) local s = "y" while true do s = s .. s end end}) local _ = t.x
