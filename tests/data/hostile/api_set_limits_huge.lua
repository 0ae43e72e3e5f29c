-- expect: done ^ok$
deadend.set_limits(math.maxinteger, math.maxinteger) deadend.set_tarpit(60000, 60000) deadend.set_tarpit(0, 0) deadend.send("ok")
