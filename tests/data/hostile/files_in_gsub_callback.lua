-- expect: done ^\.\.\.$
local r = string.gsub("abc", ".", function() return tostring(io or os or load or dofile or require or "") .. "." end) deadend.send(r)
