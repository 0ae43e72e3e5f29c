-- expect: done ^nil nil nil$
deadend.send(tostring(("").dump) .. " " .. tostring(("").load) .. " " .. tostring(string.load))
