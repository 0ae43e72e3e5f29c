-- 8080.lua: an HTTP "admin panel" bait on Apache Tomcat 9's port.
--
-- `/` (and `/login`) serve an "Admin Console" login page from a Tomcat-hosted webapp; POST `/login` (and
-- Tomcat's form login `/j_security_check`) parses the url-encoded form, logs the credentials and always
-- answers "Invalid username or password". `/manager/html`, `/manager/status`, `/manager/text/...` and
-- `/host-manager/html` answer 401 with `WWW-Authenticate: Basic realm="Tomcat Manager Application"` and
-- Tomcat's own 401 page, whatever credentials come, as the manager app does with wrong ones. Any Basic
-- `Authorization` header, on any request, is decoded and logged. Status lines, header order and error
-- pages follow Tomcat 9 (no reason phrase, no Server header). Requests are bounded in size and number;
-- bodies are read (Content-Length or chunked) up to a limit; keep-alive is honoured. A `Date` header is
-- sent only when the operator allowed the clock.

local TOMCAT = "Apache Tomcat/9.0.83"
local MAX_HEAD = 8192           -- request line plus headers (Tomcat: maxHttpHeaderSize 8 KB)
local MAX_HEADERS = 100
local MAX_REQUESTS = 20         -- per connection
local MAX_BODY = 65536          -- bodies are read up to this, then the connection is closed
local MAX_FIELDS = 50           -- form fields parsed
local TARPIT_BASE, TARPIT_JITTER = 150, 250

deadend.set_limits(400, MAX_REQUESTS * (MAX_HEAD + MAX_BODY))
deadend.set_tarpit(TARPIT_BASE, TARPIT_JITTER)

local peer = deadend.get_ip()
local has_clock = type(os) == "table" and type(os.date) == "function"


local function html_escape(s)
  return (s:gsub("[&<>\"']", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;",
    ["'"] = "&#39;" }))
end

-- Base64 (RFC 4648) decoding; nil when the input is not valid base64.
local b64decode = std.base64.decode

-- application/x-www-form-urlencoded: "+" is a space, %XX a byte.
local function urldecode(s)
  return (s:gsub("%+", " "):gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

local function parse_form(body)
  local fields, n = {}, 0
  for pair in body:gmatch("[^&]+") do
    n = n + 1
    if n > MAX_FIELDS then break end
    local k, v = pair:match("^([^=]*)=?(.*)$")
    k = urldecode(k)
    if fields[k] == nil then fields[k] = urldecode(v) end
  end
  return fields
end

-- Pages. ------------------------------------------------------------------------------------------

local function login_page(message)
  local notice = message and ('\n      <p class="error">' .. message .. "</p>") or ""
  return [[<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>Admin Console - Login</title>
  <style>
    body { font-family: Arial, Helvetica, sans-serif; background: #eef1f4; margin: 0; }
    .box { width: 320px; margin: 120px auto; background: #fff; padding: 24px 28px; border: 1px solid #ccd;
           border-radius: 4px; }
    h1 { font-size: 18px; color: #2c3e50; margin: 0 0 16px; }
    label { display: block; margin: 10px 0 4px; font-size: 13px; }
    input[type=text], input[type=password] { width: 100%; padding: 6px; box-sizing: border-box; }
    button { margin-top: 16px; width: 100%; padding: 8px; background: #2c6fbb; color: #fff; border: 0; }
    .error { color: #b00020; font-size: 13px; }
    .foot { margin-top: 14px; font-size: 11px; color: #889; text-align: center; }
  </style>
</head>
<body>
  <div class="box">
    <h1>Admin Console</h1>]] .. notice .. [[

    <form method="post" action="/login">
      <label for="username">Username</label>
      <input type="text" id="username" name="username" autocomplete="username">
      <label for="password">Password</label>
      <input type="password" id="password" name="password" autocomplete="current-password">
      <button type="submit">Sign in</button>
    </form>
    <div class="foot">Management Console v3.2.1</div>
  </div>
</body>
</html>
]]
end

local ERROR_STYLE = "<style type=\"text/css\">body {font-family:Tahoma,Arial,sans-serif;} h1, h2, h3, b "
  .. "{color:white;background-color:#525D76;} h1 {font-size:22px;} h2 {font-size:16px;} h3 "
  .. "{font-size:14px;} p {font-size:12px;} a {color:black;} .line {height:1px;background-color:#525D76;"
  .. "border:none;}</style>"

-- Tomcat's status report page ("–" is an en dash, as Tomcat writes it).
local function error_page(status, title, message, description)
  return "<!doctype html><html lang=\"en\"><head><title>HTTP Status " .. status .. " \u{2013} " .. title
    .. "</title>" .. ERROR_STYLE .. "</head><body><h1>HTTP Status " .. status .. " \u{2013} " .. title
    .. "</h1><hr class=\"line\" /><p><b>Type</b> Status Report</p>"
    .. (message and ("<p><b>Message</b> " .. message .. "</p>") or "")
    .. "<p><b>Description</b> " .. description .. "</p><hr class=\"line\" /><h3>" .. TOMCAT
    .. "</h3></body></html>"
end

-- The manager application's 401 page (webapps/manager/WEB-INF/jsp/401.jsp), abridged.
local function manager_401(app)
  return [[<!DOCTYPE html>
<html>
 <head>
  <title>401 Unauthorized</title>
  <style type="text/css">
    <!--
    BODY {font-family:Tahoma,Arial,sans-serif;color:black;background-color:white;font-size:12px;}
    H1 {font-family:Tahoma,Arial,sans-serif;color:white;background-color:#525D76;font-size:22px;}
    PRE, TT {font-size:12px;}
    -->
  </style>
 </head>
 <body>
   <h1>401 Unauthorized</h1>
   <p>
    You are not authorized to view this page. If you have not changed
    any configuration files, please examine the file
    <tt>conf/tomcat-users.xml</tt> in your installation. That
    file must contain the credentials to let you use this webapp.
   </p>
   <p>
    For example, to add the <tt>]] .. app .. [[</tt> role to a user named
    <tt>tomcat</tt> with a password of <tt>s3cret</tt>, add the following to the
    config file listed above.
   </p>
<pre>
&lt;role rolename="]] .. app .. [["/&gt;
&lt;user username="tomcat" password="s3cret" roles="]] .. app .. [["/&gt;
</pre>
 </body>

</html>
]]
end

-- Input. ------------------------------------------------------------------------------------------

-- A bounded line reader (CRLF or bare LF) over the head of one request: the line, or nil and "closed" /
-- "too-long" (the head so far went past MAX_HEAD).
local input = std.reader()
local head_used = 0
local function read_line()
  if head_used >= MAX_HEAD then return nil, "too-long" end
  local line, why = input:line(MAX_HEAD - head_used)
  if line then head_used = head_used + #line + 2 end
  return line, why
end

local function read_exactly(n) return input:exactly(n) end

-- A chunked body, at most MAX_BODY bytes; nil and why ("closed", "too-big", "bad").
local function read_chunked()
  local parts, total = {}, 0
  while true do
    head_used = 0
    local line, why = read_line()
    if not line then return nil, why == "closed" and "closed" or "bad" end
    local size = line:match("^(%x+)[ \t]*;?")
    if not size or #size > 8 then return nil, "bad" end
    size = tonumber(size, 16)
    if size == 0 then break end
    total = total + size
    if total > MAX_BODY then return nil, "too-big" end
    local data = read_exactly(size + 2)
    if not data then return nil, "closed" end
    parts[#parts + 1] = data:sub(1, size)
  end
  for _ = 1, MAX_HEADERS do  -- trailers, up to the empty line
    local line = read_line()
    if not line then return nil, "closed" end
    if line == "" then return table.concat(parts) end
  end
  return nil, "bad"
end

-- Output. -----------------------------------------------------------------------------------------

local function session_id()
  local t = {}
  for i = 1, 32 do t[i] = string.format("%X", math.random(0, 15)) end
  return table.concat(t)
end

local function respond(status, body, opts)
  opts = opts or {}
  local h = { "HTTP/1.1 " .. status .. " " }  -- Tomcat 8.5+ sends no reason phrase
  for _, extra in ipairs(opts.headers or {}) do h[#h + 1] = extra end
  if opts.content_type ~= false then
    h[#h + 1] = "Content-Type: " .. (opts.content_type or "text/html;charset=UTF-8")
  end
  if opts.language then h[#h + 1] = "Content-Language: en" end
  h[#h + 1] = "Content-Length: " .. #body
  if has_clock then h[#h + 1] = "Date: " .. os.date("!%a, %d %b %Y %H:%M:%S GMT") end
  if opts.keep_alive then
    h[#h + 1] = "Keep-Alive: timeout=20"
    h[#h + 1] = "Connection: keep-alive"
  else
    h[#h + 1] = "Connection: close"
  end
  local out = table.concat(h, "\r\n") .. "\r\n\r\n"
  if not opts.head_only then out = out .. body end
  return deadend.send(out)
end

local function not_found(path, keep_alive, head_only)
  return respond(404, error_page(404, "Not Found", "The requested resource [" .. html_escape(path)
    .. "] is not available", "The origin server did not find a current representation for the target "
    .. "resource or is not willing to disclose that one exists."),
    { content_type = "text/html;charset=utf-8", language = true, keep_alive = keep_alive,
      head_only = head_only })
end

local function bad_request()
  return respond(400, error_page(400, "Bad Request", nil, "The server cannot or will not process the "
    .. "request due to something that is perceived to be a client error (e.g., malformed request syntax, "
    .. "invalid request message framing, or deceptive request routing)."),
    { content_type = "text/html;charset=utf-8", language = true })
end

-- One request. ------------------------------------------------------------------------------------

local STATE_REQUEST_LINE, STATE_HEADERS, STATE_BODY, STATE_RESPOND = "request-line", "headers", "body",
  "respond"
local requests, logins = 0, 0
local cookie = nil  -- JSESSIONID handed out on this connection

-- The manager applications and their roles (for the realm and the 401 page).
local function manager_app(path)
  if path:match("^/manager/") then return "Tomcat Manager Application", "manager-gui" end
  if path:match("^/host%-manager/") then return "Tomcat Host Manager Application", "admin-gui" end
  return nil
end

local function serve(nth)
  local state = STATE_REQUEST_LINE
  head_used = 0
  local line, why
  for _ = 1, 8 do  -- RFC 9112 2.2: empty lines before the request line are ignored
    line, why = read_line()
    if line ~= "" then break end
  end
  if not line then
    if why == "closed" then
      if nth == 1 then deadend.log("client closed without a request") end
      return false
    end
    deadend.log("request head too large", "warn")
    bad_request()
    return false
  end

  requests = requests + 1
  local method, target, minor = line:match("^([A-Z]+) (%S+) HTTP/1%.([01])$")
  if not method then
    deadend.log("bad request line", "warn", { line = line })
    bad_request()
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
      deadend.log("request head too large", "warn", { line = line })
      bad_request()
      return false
    end
    if hline == "" then
      state = STATE_BODY
    else
      local name, value = hline:match("^([!#$%%&'*+%-.^_`|~%w]+):[ \t]*(.-)[ \t]*$")
      count = count + 1
      if not name or count > MAX_HEADERS then
        deadend.log("bad header line", "warn", { header = hline })
        bad_request()
        return false
      end
      name = name:lower()
      headers[name] = headers[name] and (headers[name] .. ", " .. value) or value
    end
  end

  local path = (target:match("^https?://[^/]*(/.*)$") or target):match("^[^?#]*")
  deadend.log("request", "info", { ["http.method"] = method, ["http.path"] = target,
    ["http.version"] = "HTTP/1." .. minor, ["http.host"] = headers["host"],
    ["http.user_agent"] = headers["user-agent"] })
  if minor == "1" and not headers["host"] then
    deadend.log("HTTP/1.1 request without Host", "warn")
    bad_request()
    return false
  end

  local conn = (headers["connection"] or ""):lower()
  local keep_alive
  if minor == "1" then keep_alive = not conn:find("close", 1, true)
  else keep_alive = conn:find("keep-alive", 1, true) ~= nil end
  if nth >= MAX_REQUESTS then keep_alive = false end

  -- Credentials in an Authorization header, whatever the path.
  local auth = headers["authorization"]
  if auth then
    local scheme, blob = auth:match("^(%S+)%s+(%S+)$")
    local decoded = scheme and scheme:lower() == "basic" and b64decode(blob)
    local user, password = (decoded or ""):match("^([^:]*):(.*)$")
    if user then
      logins = logins + 1
      deadend.log("auth Basic attempt " .. logins, "warn",
        { ["http.path"] = path, user = user, password = password })
    else
      deadend.log("authorization header", "warn", { authorization = auth })
    end
  end

  -- The body: read (bounded) so the next request starts in the right place, kept for forms. A client
  -- that waits for "100 Continue" (curl does, for larger bodies) gets it first, as from Tomcat.
  local body = ""
  local te, cl = headers["transfer-encoding"], headers["content-length"]
  if (te or (cl and cl ~= "0")) and (headers["expect"] or ""):lower() == "100-continue" and minor == "1" then
    deadend.send("HTTP/1.1 100 \r\n\r\n")
  end
  if te then
    if cl or te:lower() ~= "chunked" then
      deadend.log("unsupported Transfer-Encoding", "warn", { ["http.transfer_encoding"] = te })
      bad_request()
      return false
    end
    local bwhy
    body, bwhy = read_chunked()
    if not body then
      if bwhy ~= "closed" then
        deadend.log("bad chunked body (" .. bwhy .. ")", "warn")
        bad_request()
      end
      return false
    end
  elseif cl then
    local n = cl:match("^%d+$") and #cl <= 9 and tonumber(cl)
    if not n then
      bad_request()
      return false
    end
    if n > MAX_BODY then
      deadend.log(string.format("body of %d bytes refused", n), "warn")
      respond(413, error_page(413, "Payload Too Large", nil, "The server is refusing to process a request "
        .. "because the request payload is larger than the server is willing or able to process."),
        { content_type = "text/html;charset=utf-8", language = true })
      return false
    end
    body = read_exactly(n)
    if not body then return false end
  end

  state = STATE_RESPOND
  local head_only = method == "HEAD"
  local is_login = path == "/login" or path == "/j_security_check"
  if #body > 0 and not (is_login and method == "POST") then
    deadend.log(string.format("request body %d bytes", #body), "info", { body = body:sub(1, 200) })
  end
  local realm, role = manager_app(path)
  if realm then
    return respond(401, manager_401(role), {
      headers = { "Cache-Control: private", "Expires: Thu, 01 Jan 1970 00:00:00 GMT",
                  'WWW-Authenticate: Basic realm="' .. realm .. '"' },
      content_type = "text/html;charset=ISO-8859-1", keep_alive = keep_alive, head_only = head_only,
    }) and keep_alive
  end
  if path == "/manager" or path == "/host-manager" or path == "/manager/" or path == "/host-manager/" then
    local to = path:gsub("/$", "") .. "/html"
    return respond(302, "", { headers = { "Location: " .. to }, content_type = false, keep_alive = keep_alive,
      head_only = head_only }) and keep_alive
  end

  if path == "/" or path == "/index.jsp" or is_login then
    if method == "POST" and is_login then
      local fields = parse_form(body)
      local user = fields.username or fields.j_username or fields.user or fields.login
      local password = fields.password or fields.j_password or fields.pass or fields.passwd
      logins = logins + 1
      deadend.log("auth form attempt " .. logins, "warn",
        { ["http.path"] = path, user = user, password = password })
      return respond(200, login_page("Invalid username or password."), { keep_alive = keep_alive })
        and keep_alive
    end
    if method == "GET" or method == "HEAD" then
      local extra = {}
      if not cookie and not (headers["cookie"] or ""):find("JSESSIONID=", 1, true) then
        cookie = session_id()
        extra[1] = "Set-Cookie: JSESSIONID=" .. cookie .. "; Path=/; HttpOnly"
      end
      return respond(200, login_page(), { headers = extra, keep_alive = keep_alive, head_only = head_only })
        and keep_alive
    end
    if method == "OPTIONS" then
      return respond(200, "", { headers = { "Allow: GET, HEAD, POST, OPTIONS" }, keep_alive = keep_alive })
        and keep_alive
    end
    deadend.log("method not allowed", "warn", { ["http.method"] = method })
    return respond(405, error_page(405, "Method Not Allowed", "HTTP method " .. method .. " is not supported "
      .. "by this URL", "The method received in the request-line is known by the origin server but not "
      .. "supported by the target resource."),
      { headers = { "Allow: GET, HEAD, POST, OPTIONS" }, content_type = "text/html;charset=utf-8",
        language = true, keep_alive = keep_alive }) and keep_alive
  end
  if method == "PUT" or method == "DELETE" then
    deadend.log(string.format("%s of %d bytes", method, #body), "warn",
      { ["http.method"] = method, ["http.path"] = path })
  end
  return not_found(path, keep_alive, head_only) and keep_alive
end

deadend.log("connect from " .. peer)
for nth = 1, MAX_REQUESTS do
  if not serve(nth) then break end
end
deadend.log(string.format("disconnect after %d request(s), %d login attempt(s)", requests, logins))
deadend.close()
