-- clean: io, os.execute and require only in comments and strings; os.date guarded
deadend.set_limits(10, 4096) deadend.set_tarpit(100, 50)
-- io.open('/etc/passwd') require('x') string.dump(f)
local text = "io.open os.execute require load collectgarbage"
local date = os and os.date('!%Y') or 'unknown'
deadend.send(text .. date)
