-- expect: instruction-limit
deadend.close() deadend.log("closed") while true do end
