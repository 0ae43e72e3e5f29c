-- expect: instruction-limit
while true do end
