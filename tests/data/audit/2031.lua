-- expect: fail linger: sleeps forever in a loop that never looks at the peer
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
deadend.send("220 ready\r\n")
while true do deadend.sleep(1000) end
