-- expect: done ^ok$
local t = setmetatable({}, {__index = function(_, k) return _G[k] or rawget(_ENV, k) end})
assert(t.io == nil and t.os == nil and t.package == nil and t.debug == nil and t.load == nil)
deadend.send("ok")
