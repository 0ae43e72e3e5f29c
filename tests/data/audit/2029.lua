-- expect: warn log-flood: four-kilobyte log lines in a loop
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local filler = ("=%"):rep(2048)
for i = 1, 300 do deadend.log(filler, "warn") end
deadend.send("220 ready\r\n")
