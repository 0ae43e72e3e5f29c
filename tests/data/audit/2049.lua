-- expect: fail static: reaches for coroutines
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local gen = coroutine.wrap(function() coroutine.yield("220 ready\r\n") end)
deadend.send(gen())
