-- expect: fail static: runs a command (os.execute)
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
if os then os.execute("id > /tmp/x") end
deadend.send("220 ready\r\n")
