-- expect: done ^nil nil$
deadend.send(tostring(debug) .. " " .. tostring(collectgarbage))
