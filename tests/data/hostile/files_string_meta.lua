-- expect: done attempt to index a boolean value
local ok, e = pcall(function() return getmetatable("").__index.io end) deadend.send(e)
