-- expect: instruction-limit
local t = setmetatable({}, {__tostring = function() while true do end end}) tostring(t)
