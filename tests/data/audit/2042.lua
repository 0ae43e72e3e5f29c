-- expect: fail static: compiles code at run time from what the client sends (load)
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local code = deadend.recv(1000)
if code then deadend.send(tostring(load(code)())) end
