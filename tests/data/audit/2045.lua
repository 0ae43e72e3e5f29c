-- expect: fail static: loads a module (require)
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local socket = require("socket")
deadend.send(tostring(socket))
