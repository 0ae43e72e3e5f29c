-- expect: done string\.rep refused
deadend.send(select(2, pcall(string.rep, "", 1 << 62)))
