-- defect: reads global 'io' \(line 2\): files are not reachable
deadend.set_limits(10, 4096) deadend.set_tarpit(100, 50) local f = io.open('/etc/passwd')
