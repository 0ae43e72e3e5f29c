-- expect: linger
deadend.close() while true do deadend.sleep(100000) end
