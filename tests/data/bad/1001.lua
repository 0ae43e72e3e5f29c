-- defect: does not compile: 1001\.lua:2:
deadend.set_limits(10, 4096) deadend.set_tarpit(100, 50) local x = = 1
