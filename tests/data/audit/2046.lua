-- expect: warn static: calls deadend.sned, which does not exist (and fails when it runs)
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
deadend.sned("220 ready\r\n")
