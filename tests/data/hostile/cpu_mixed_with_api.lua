-- expect: instruction-limit
deadend.send("x") deadend.get_ip() deadend.log("about to spin") while true do deadend.get_ip() local s = 0 for i = 1, 1e9 do s = s + i end end
