-- expect: instruction-limit
local s = ("x"):rep(100000) local n = 0 for i = 1, 1e9 do n = n + select("#", s:byte(1, -1)) + select("#", utf8.codepoint(s, 1, -1)) end deadend.send(n)
