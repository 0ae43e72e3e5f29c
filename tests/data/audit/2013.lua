-- expect: fail instruction-limit: exponential recursion (a naive Fibonacci for a "challenge")
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
deadend.send("challenge " .. fib(40) .. "\r\n")
