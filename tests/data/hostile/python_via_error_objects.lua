-- expect: done ^string
local ok, e = pcall(deadend.recv, {}) deadend.send(type(e) .. " " .. tostring(e))
