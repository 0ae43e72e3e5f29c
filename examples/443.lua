-- 443.lua: the nginx 1.24.0 of 80.lua, over TLS (HTTPS).
--
-- The broker performs the TLS handshake (`deadend.starttls`), with the operator's certificate or one it
-- generated for --tls-name, and fingerprints the client (JA4, JA3, SNI, ALPN: on every event of the
-- session). From then on the script reads and writes plaintext, and serves exactly what 80.lua serves:
-- the stock "Welcome to nginx!" page on `/` and `/index.html`, nginx's error pages and status codes,
-- keep-alive, every request logged. tests/examples checks that this file is 80.lua plus the TLS block.
local SERVER = "nginx/1.24.0"
local MAX_HEAD = 8192          -- request line plus headers (nginx: large_client_header_buffers 4 8k)
local MAX_HEADERS = 100
local MAX_REQUESTS = 20        -- per connection (nginx: keepalive_requests)
local MAX_BODY = 1048576       -- nginx: client_max_body_size 1m; bodies are read and discarded
local TARPIT_BASE, TARPIT_JITTER = 150, 300

deadend.set_limits(200, MAX_REQUESTS * MAX_HEAD + MAX_BODY * 2)
deadend.set_tarpit(TARPIT_BASE, TARPIT_JITTER)

local peer = deadend.get_ip()
local has_clock = type(os) == "table" and type(os.date) == "function"

-- ==== TLS: what makes this 443.lua; everything else is 80.lua as it is ===================================
-- nginx's stock HTTPS server: TLS before anything else, ALPN http/1.1 (no http2 in this persona). When
-- the client sends no ClientHello (plain HTTP, a port scan) the broker has already logged why: close.
if not deadend.starttls("http/1.1") then
  deadend.close()
  return
end
local tls = deadend.tls_info()
deadend.log("tls " .. tls.version .. " " .. tls.cipher, "info", { sni = tls.sni })
-- ==== end of TLS =========================================================================================

-- The stock index.html of nginx 1.24.0 (615 bytes; its ETag and Last-Modified are those of the release).
local INDEX = [[
<!DOCTYPE html>
<html>
<head>
<title>Welcome to nginx!</title>
<style>
html { color-scheme: light dark; }
body { width: 35em; margin: 0 auto;
font-family: Tahoma, Verdana, Arial, sans-serif; }
</style>
</head>
<body>
<h1>Welcome to nginx!</h1>
<p>If you see this page, the nginx web server is successfully installed and
working. Further configuration is required.</p>

<p>For online documentation and support please refer to
<a href="http://nginx.org/">nginx.org</a>.<br/>
Commercial support is available at
<a href="http://nginx.com/">nginx.com</a>.</p>

<p><em>Thank you for using nginx.</em></p>
</body>
</html>
]]
local INDEX_LAST_MODIFIED = "Tue, 11 Apr 2023 01:45:34 GMT"
local INDEX_ETAG = string.format('"%x-%x"', 1681177534, #INDEX)

local REASONS = {
  [200] = "OK", [400] = "Bad Request", [404] = "Not Found", [405] = "Not Allowed",
  [413] = "Request Entity Too Large", [414] = "Request-URI Too Large", [501] = "Not Implemented",
  [505] = "HTTP Version Not Supported",
}

local function error_page(status, title)
  title = title or (status .. " " .. REASONS[status])
  return "<html>\r\n<head><title>" .. title .. "</title></head>\r\n<body>\r\n<center><h1>" .. title
    .. "</h1></center>\r\n<hr><center>" .. SERVER .. "</center>\r\n</body>\r\n</html>\r\n"
end

-- A bounded line reader (CRLF or bare LF) over the input. Returns the line, or nil and "closed" /
-- "too-long" (the line, or the head so far, went past MAX_HEAD) / "garbage".
local input = std.reader()
local head_used = 0
local function read_line()
  if head_used == 0 then
    -- nginx answers as soon as the method cannot be a method: a TLS ClientHello, binary junk...
    local first = input:peek()
    if not first then return nil, "closed" end
    if not first:match("[A-Z_%-\r\n]") then return nil, "garbage" end
  end
  if head_used >= MAX_HEAD then return nil, "too-long" end
  local line, why = input:line(MAX_HEAD - head_used)
  if line then head_used = head_used + #line + 2 end
  return line, why
end

-- Read and discard n body bytes, a read at a time; false when the client left.
local function discard(n)
  while n > 0 do
    local piece = input:some(math.min(n, 16384))
    if not piece then return false end
    n = n - #piece
  end
  return true
end

local function respond(status, opts)
  opts = opts or {}
  local body = opts.body or error_page(status, opts.title)
  local h = { "HTTP/1.1 " .. status .. " " .. REASONS[status], "Server: " .. SERVER }
  if has_clock then h[#h + 1] = "Date: " .. os.date("!%a, %d %b %Y %H:%M:%S GMT") end
  h[#h + 1] = "Content-Type: text/html"
  h[#h + 1] = "Content-Length: " .. #body
  if opts.last_modified then h[#h + 1] = "Last-Modified: " .. opts.last_modified end
  h[#h + 1] = "Connection: " .. (opts.keep_alive and "keep-alive" or "close")
  if opts.etag then h[#h + 1] = "ETag: " .. opts.etag end
  if status == 200 then h[#h + 1] = "Accept-Ranges: bytes" end
  local head = table.concat(h, "\r\n") .. "\r\n\r\n"
  if opts.head_only then body = "" end
  return deadend.send(head .. body)
end

-- Protocol states of one request.
local STATE_REQUEST_LINE, STATE_HEADERS, STATE_BODY, STATE_RESPOND = "request-line", "headers", "body",
  "respond"

local requests = 0

-- Serve one request; returns true to keep the connection open, false to close it.
local function serve(nth)
  local state = STATE_REQUEST_LINE
  head_used = 0
  local line, why
  -- RFC 9112 2.2: ignore at least one empty line before the request line.
  for _ = 1, 8 do
    line, why = read_line()
    if line ~= "" then break end
  end
  if not line then
    if why == "closed" then
      if nth == 1 then deadend.log("client closed without a request") end
      return false
    end
    local held = why == "garbage" and input:peek(64) or nil  -- an over-long line is dropped
    deadend.log("bad request (" .. why .. ")", "warn", { data = held })
    if why == "too-long" then respond(414) else respond(400) end
    return false
  end

  requests = requests + 1
  local method, target, version = line:match("^(%S+) (%S+) (HTTP/%d+%.%d+)$")
  if not method then
    method, target = line:match("^(GET) (/%S*)$")
    if method then  -- HTTP/0.9: the body alone, then close
      deadend.log("request (HTTP/0.9)", "info", { ["http.method"] = method, ["http.path"] = target })
      deadend.send(target == "/" and INDEX or error_page(404))
      return false
    end
    deadend.log("bad request line", "warn", { line = line })
    respond(400)
    return false
  end
  if not method:match("^[A-Z_%-]+$") then
    deadend.log("bad method", "warn", { line = line })
    respond(400)
    return false
  end
  local major, minor = version:match("^HTTP/(%d+)%.(%d+)$")
  major, minor = tonumber(major), tonumber(minor)
  if major >= 2 then
    deadend.log("unsupported version", "warn", { line = line })
    respond(505)
    return false
  elseif major ~= 1 or minor > 1 then
    deadend.log("bad version", "warn", { line = line })
    respond(400)
    return false
  end

  state = STATE_HEADERS
  local headers, count = {}, 0
  while state == STATE_HEADERS do
    local hline, hwhy = read_line()
    if not hline then
      if hwhy == "closed" then
        deadend.log("client left during headers", "warn", { line = line })
        return false
      end
      deadend.log("request header too large", "warn", { line = line })
      respond(400, { title = "400 Request Header Or Cookie Too Large" })
      return false
    end
    if hline == "" then
      state = STATE_BODY
    else
      local name, value = hline:match("^([!#$%%&'*+%-.^_`|~%w]+):[ \t]*(.-)[ \t]*$")
      count = count + 1
      if not name or count > MAX_HEADERS then
        deadend.log("bad header line", "warn", { header = hline })
        respond(400)
        return false
      end
      name = name:lower()
      if headers[name] and name == "host" then
        deadend.log("duplicate Host header", "warn")
        respond(400)
        return false
      end
      headers[name] = headers[name] and (headers[name] .. ", " .. value) or value
    end
  end

  local host, ua = headers["host"], headers["user-agent"]
  deadend.log("request", "info", { ["http.method"] = method, ["http.path"] = target,
    ["http.version"] = version, ["http.host"] = host, ["http.user_agent"] = ua })
  if minor == 1 and not host then
    deadend.log("HTTP/1.1 request without Host", "warn")
    respond(400)
    return false
  end

  -- Connection handling: HTTP/1.1 defaults to keep-alive, HTTP/1.0 needs to ask for it.
  local conn = (headers["connection"] or ""):lower()
  local keep_alive
  if minor == 1 then keep_alive = not conn:find("close", 1, true)
  else keep_alive = conn:find("keep-alive", 1, true) ~= nil end
  if nth >= MAX_REQUESTS then keep_alive = false end

  -- The body: read and thrown away, so the next request on the connection starts in the right place.
  local te, cl = headers["transfer-encoding"], headers["content-length"]
  if te then
    if cl then respond(400) return false end
    if te:lower() ~= "chunked" then
      deadend.log("unsupported Transfer-Encoding", "warn", { ["http.transfer_encoding"] = te })
      respond(501)
      return false
    end
    keep_alive = false  -- chunked bodies are not parsed: answer, then close
  elseif cl then
    local n = cl:match("^%d+$") and tonumber(cl)
    if not n then
      respond(400)
      return false
    end
    if n > MAX_BODY then
      deadend.log(string.format("body of %d bytes refused", n), "warn")
      respond(413)
      return false
    end
    if n > 0 then
      deadend.log(string.format("request body %d bytes", n))
      if not discard(n) then return false end
    end
  end

  state = STATE_RESPOND
  local path = target:match("^https?://[^/]*(/.*)$") or target
  path = path:match("^[^?#]*")
  local exists = path == "/" or path == "/index.html"
  if method == "GET" or method == "HEAD" then
    if exists then
      return respond(200, { body = INDEX, last_modified = INDEX_LAST_MODIFIED, etag = INDEX_ETAG,
                            keep_alive = keep_alive, head_only = method == "HEAD" }) and keep_alive
    end
    return respond(404, { keep_alive = keep_alive, head_only = method == "HEAD" }) and keep_alive
  end
  if method == "POST" and not exists then
    return respond(404, { keep_alive = keep_alive }) and keep_alive
  end
  deadend.log("method not allowed", "info", { ["http.method"] = method })
  return respond(405, { keep_alive = keep_alive }) and keep_alive
end

deadend.log("connect from " .. peer)
for nth = 1, MAX_REQUESTS do
  if not serve(nth) then break end
end
deadend.log(string.format("disconnect after %d request(s)", requests))
deadend.close()
