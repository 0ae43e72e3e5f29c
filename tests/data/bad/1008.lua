-- defect: never calls deadend\.set_limits
deadend.set_tarpit(100, 50) deadend.send('hi')
