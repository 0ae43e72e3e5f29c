-- expect: fail instruction-limit: a busy loop at the first line
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
while true do end
