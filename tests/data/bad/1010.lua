-- defect: uses deadend\.sned \(line 2\): not part of the API
deadend.set_limits(10, 4096) deadend.set_tarpit(100, 50) deadend.sned('hi')
