-- expect: fail cpu-deadline: a catastrophic pattern inside pcall
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local ok = pcall(string.match, ("ab"):rep(20), ((".-"):rep(30)) .. "c$")
deadend.send(tostring(ok))
