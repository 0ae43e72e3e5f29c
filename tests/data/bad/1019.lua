-- defect: uses os\.date, os\.time \(lines 3, 4\) without testing for os: it is nil unless the broker runs with --allow-clock
deadend.set_limits(10, 4096) deadend.set_tarpit(100, 50)
deadend.send(os.date("!%a, %d %b %Y") .. "\r\n")
deadend.log("at " .. os.time())
