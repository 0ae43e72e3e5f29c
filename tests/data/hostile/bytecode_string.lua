-- expect: done ^nil$
local chunk = "\27LuaT\0\25\147\r\n\26\n" deadend.send(tostring(load))
