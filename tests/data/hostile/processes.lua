-- expect: done ^nil nil nil$
deadend.send(tostring(os) .. " " .. tostring(rawget(_G, "os")) .. " " .. tostring(coroutine))
