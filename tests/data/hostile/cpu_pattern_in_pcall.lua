-- expect: cpu-deadline
pcall(string.match, string.rep("a", 3000), ".-.-.-.-b$")
