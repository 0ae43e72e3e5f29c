-- expect: memory-limit|script-error stack overflow|not enough memory
local function f(n) return f(n + 1) + 1 end f(1)
