-- expect: done ^nil nil nil nil$
deadend.send(tostring(io) .. " " .. tostring(rawget(_G, "io")) .. " " .. tostring(_G.io) .. " " .. tostring(_ENV.io))
