-- expect: done ^nil nil nil$
deadend.send(tostring(dofile) .. " " .. tostring(loadfile) .. " " .. tostring(package))
