-- expect: done ^ok$
print("\27[2J\27]0;owned\7\r\nFAKE") deadend.log("\0\n\r\27", "warn") deadend.send("ok")
