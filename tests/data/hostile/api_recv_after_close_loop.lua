-- expect: linger
deadend.close() while true do deadend.recv(1) end
