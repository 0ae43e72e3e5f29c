-- expect: fail linger: a tarpit that sends and sleeps but ignores send's result
deadend.set_limits(100, 4096) deadend.set_tarpit(0, 0)
while true do
  deadend.send("x\r\n")
  deadend.sleep(500)
end
