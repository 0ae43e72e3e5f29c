-- defect: never calls deadend\.set_tarpit
deadend.set_limits(10, 4096) deadend.send('hi')
