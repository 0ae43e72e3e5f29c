-- expect: fail static: dumps bytecode (string.dump)
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
deadend.send(string.dump(function() return 1 end))
