-- expect: done ^false .*nil value
deadend.send(tostring(pcall(require, "io")) .. " " .. select(2, pcall(function() return require("io") end)))
