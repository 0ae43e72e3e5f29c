-- defect: uses os\.execute \(line 2\)
deadend.set_limits(10, 4096) deadend.set_tarpit(100, 50) if os then os.execute('id') end
