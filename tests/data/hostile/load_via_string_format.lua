-- expect: done ^nil$
deadend.send(tostring(string.format("%s", "x") and load))
