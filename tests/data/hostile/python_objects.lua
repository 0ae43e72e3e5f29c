-- expect: done ^nil nil nil$
deadend.send(tostring(python) .. " " .. tostring(rawget(_G, "python")) .. " " .. tostring(_G.python))
