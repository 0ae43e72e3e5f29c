-- defect: uses string\.dump \(line 2\)
deadend.set_limits(10, 4096) deadend.set_tarpit(100, 50) local b = string.dump(print)
