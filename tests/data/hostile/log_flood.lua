-- expect: done ^ok$
for i = 1, 5000 do deadend.log(string.rep("x", 5000)) end deadend.send("ok")
