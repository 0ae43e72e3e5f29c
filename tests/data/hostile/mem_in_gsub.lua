-- expect: memory-limit|script-error not enough memory
local s = string.rep("a", 1000) while true do s = s:gsub("a", "aa") end
