-- expect: cpu-deadline
string.find(string.rep("a", 3000), ".-.-.-.-b$")
