-- expect: cpu-deadline
for _ in string.gmatch(string.rep("a", 3000), ".-.-.-.-b") do end
