-- expect: fail memory-limit: table.concat of ever larger tables
deadend.set_limits(100, 4096) deadend.set_tarpit(100, 50)
local parts, out = { ("y"):rep(65536) }, {}
while true do
  parts[#parts + 1] = table.concat(parts)
  out[#out + 1] = parts[#parts]
end
