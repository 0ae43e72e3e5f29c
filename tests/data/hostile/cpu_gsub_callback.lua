-- expect: instruction-limit
string.gsub(string.rep("a", 100), "a", function() while true do end end)
