-- expect: done ^ok$
local mt = {} local t = setmetatable({}, mt) mt.__gc = function() while true do end end t = nil
for i = 1, 1e5 do local _ = {} end deadend.send("ok")
