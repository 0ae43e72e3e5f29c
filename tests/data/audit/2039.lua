-- expect: warn spin: calls set_tarpit in a loop, thousands of times a second
deadend.set_limits(100, 4096)
deadend.send("220 ready\r\n")
for i = 1, 1e9 do deadend.set_tarpit(i % 100, 0) end
