-- defect: file name: name is not <port>\.lua
deadend.set_limits(10, 4096) deadend.set_tarpit(100, 50) deadend.send('hi')
