-- expect: done ^nil$
local before = string.evil string.evil = true deadend.send(tostring(before))
