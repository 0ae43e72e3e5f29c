-- expect: fail static: drives the garbage collector (collectgarbage)
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
collectgarbage("stop")
deadend.send("220 ready\r\n")
