-- expect: warn static: prints a date with os.date, which is nil without --allow-clock
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
deadend.send("220 ready " .. os.date("!%Y-%m-%d") .. "\r\n")
