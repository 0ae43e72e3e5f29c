-- expect: script-error bad argument #1 to .send.
deadend.send(string.rep("x", (1 << 20) + 1))
