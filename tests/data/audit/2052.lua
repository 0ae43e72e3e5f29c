-- expect: fail memory-limit: a memory bomb caught by pcall, then tried again while keeping more
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
deadend.send("220 ready\r\n")
local chunk = "k"
for _ = 1, 20 do chunk = chunk .. chunk end
local kept = {}
while true do
  pcall(function()
    local s = "x"
    while true do s = s .. s end
  end)
  kept[#kept + 1] = chunk .. #kept
end
