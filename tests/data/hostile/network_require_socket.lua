-- expect: done ^false
deadend.send(tostring(pcall(function() return require("socket") end)))
