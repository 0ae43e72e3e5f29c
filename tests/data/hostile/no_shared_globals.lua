-- expect: done ^1$
counter = (counter or 0) + 1 _G.shared = (_G.shared or 0) + 1 deadend.send(tostring(math.max(counter, _G.shared)))
