-- defect: calls a :dump method \(line 2\)
deadend.set_limits(10, 4096) deadend.set_tarpit(100, 50) local b = ('x'):dump()
