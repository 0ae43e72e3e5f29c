-- expect: done table\.move refused
deadend.send(select(2, pcall(table.move, {}, 1, 1 << 40, 1, {})))
