-- defect: reads global 'io' \(line 4\)
deadend.set_limits(10, 4096) deadend.set_tarpit(100, 50)
local function sneaky()
  return io.popen('id')
end
