-- expect: session-time
while true do deadend.get_ip() deadend.set_tarpit(0) deadend.set_limits(0) end
