-- 5222.lua: an XMPP client-to-server honeypot (RFC 6120) in the manner of a fresh ejabberd.
--
-- It answers the client's stream header with its own, as ejabberd writes it (from = the requested domain,
-- a random stream id, xml:lang only when the client gave one), and stream features offering STARTTLS
-- (not required; the broker does the handshake) and SASL SCRAM-SHA-1 and PLAIN. Every authentication is
-- logged and refused: PLAIN credentials in clear, SCRAM-SHA-1 with the user name and everything needed to
-- test password guesses offline. Input that is not XML, or not an XMPP stream, gets the matching stream
-- error after a stream header of ours, which is what fingerprinting tools (nmap -sV) recognise.
-- A small incremental tokenizer reads the stream: only the first-level elements a client may send
-- before authenticating are understood; comments, processing instructions and DTDs are refused
-- (restricted-xml) as RFC 6120 requires.

local DEFAULT_DOMAIN = "localhost"  -- ejabberd's out-of-the-box host
local STREAM_NS = "http://etherx.jabber.org/streams"
local SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
local TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
local STREAMS_NS = "urn:ietf:params:xml:ns:xmpp-streams"
local MAX_BUFFER = 16384      -- an element may not be larger than this
local MAX_ELEMENTS = 50       -- first-level elements per connection
local MAX_AUTH = 5            -- RFC 6120 6.4.5: a reasonable number of retries, then a stream error
local MAX_DEPTH = 16
local SCRAM_ITERATIONS = 4096

deadend.set_limits(200, 65536)
deadend.set_tarpit(150, 250)

local peer = deadend.get_ip()

-- Log values quoted as the log quotes them (std.quote), so fields stay unambiguous.
local q = std.quote

-- Base64 (RFC 4648).
local b64decode, b64encode = std.base64.decode, std.base64.encode

local function random_bytes(n)
  local t = {}
  for i = 1, n do t[i] = string.char(math.random(0, 255)) end
  return table.concat(t)
end

-- ---------------------------------------------------------------------------------------------------
-- Incremental tokenizer over `inbuf`. next_token() returns a token table, or nil and one of
-- "need" (incomplete: read more), "bad" (not well-formed), "restricted" (comment, PI, DTD).
-- Tokens: {kind="decl"}, {kind="open", name, attrs} for the stream header, {kind="close", name},
-- {kind="element", name, attrs, text, children} for a complete first-level element.

local inbuf = ""
local NAME = "[%a_][%w_%.%-:]*"

-- Index of the '>' closing the tag that starts at i, skipping quoted values; nil when incomplete.
local function tag_end(s, i)
  local j = i + 1
  while true do
    local k = s:find("[<>'\"]", j)
    if not k then return nil end
    local c = s:sub(k, k)
    if c == ">" then return k end
    if c == "<" then return false end
    local close = s:find(c, k + 1, true)
    if not close then return nil end
    j = close + 1
  end
end

-- "<name a='v' b=\"w\"/>" -> name, attrs, selfclosing; nil when malformed.
local function parse_start(tag)
  local name, rest = tag:match("^<(" .. NAME .. ")(.-)>$")
  if not name then return nil end
  local selfclose = rest:sub(-1) == "/"
  if selfclose then rest = rest:sub(1, -2) end
  local attrs, bad = {}, false
  local leftover = rest:gsub("%s+(" .. NAME .. ")%s*=%s*(['\"])(.-)%2", function(k, _, v)
    if attrs[k] or v:find("<", 1, true) then bad = true end
    attrs[k] = v
    return ""
  end)
  if bad or not leftover:match("^%s*$") then return nil end
  return name, attrs, selfclose
end

local function end_tag_name(s, i)
  local e = s:find(">", i, true)
  if not e then return nil, nil end
  return s:sub(i, e):match("^</(" .. NAME .. ")%s*>$") or false, e
end

local function next_token()
  local s = inbuf
  local i = s:find("%S")
  if not i then
    inbuf = ""
    return nil, "need"
  end
  if s:sub(i, i) ~= "<" then return nil, "bad" end
  if #s < i + 1 then return nil, "need" end
  local two = s:sub(i, i + 1)
  if two == "<?" then
    local e = s:find("?>", i + 2, true)
    if not e then return nil, "need" end
    local decl = s:sub(i, e + 1)
    inbuf = s:sub(e + 2)
    if decl:match("^<%?xml%s") then return { kind = "decl" } end
    return nil, "restricted"
  elseif two == "<!" then
    return nil, "restricted"
  elseif two == "</" then
    local name, e = end_tag_name(s, i)
    if name == nil then return nil, "need" end
    if not name then return nil, "bad" end
    inbuf = s:sub(e + 1)
    return { kind = "close", name = name }
  end
  local e = tag_end(s, i)
  if e == nil then return nil, "need" end
  if not e then return nil, "bad" end
  local name, attrs, selfclose = parse_start(s:sub(i, e))
  if not name then return nil, "bad" end
  if name == "stream:stream" then
    if selfclose then return nil, "bad" end
    inbuf = s:sub(e + 1)
    return { kind = "open", name = name, attrs = attrs }
  end
  if selfclose then
    inbuf = s:sub(e + 1)
    return { kind = "element", name = name, attrs = attrs, text = "", children = {} }
  end
  -- A complete element: walk nested tags to the matching end tag.
  local stack, children, j = { name }, {}, e + 1
  while true do
    local lt = s:find("<", j, true)
    if not lt then return nil, "need" end
    local pair = s:sub(lt, lt + 1)
    if pair == "</" then
      local cname, ce = end_tag_name(s, lt)
      if cname == nil then return nil, "need" end
      if not cname or cname ~= stack[#stack] then return nil, "bad" end
      stack[#stack] = nil
      if #stack == 0 then
        inbuf = s:sub(ce + 1)
        return { kind = "element", name = name, attrs = attrs, text = s:sub(e + 1, lt - 1),
                 children = children }
      end
      j = ce + 1
    elseif pair == "<?" or pair == "<!" then
      return nil, "restricted"
    else
      local te = tag_end(s, lt)
      if te == nil then return nil, "need" end
      if not te then return nil, "bad" end
      local cname, _, csc = parse_start(s:sub(lt, te))
      if not cname then return nil, "bad" end
      if #stack == 1 then children[#children + 1] = cname end
      if not csc then
        stack[#stack + 1] = cname
        if #stack > MAX_DEPTH then return nil, "bad" end
      end
      j = te + 1
    end
  end
end

-- ---------------------------------------------------------------------------------------------------
-- Protocol.

local STATE_HEADER, STATE_FEATURES = "awaiting-header", "features-sent"
local STATE_PLAIN, STATE_SCRAM = "sasl-plain-challenge", "sasl-scram-challenge"
local state = STATE_HEADER
local domain = DEFAULT_DOMAIN
local header_sent = false
local auth_attempts, elements = 0, 0
local scram = nil  -- {user, client_first_bare, server_first}
local ending = nil
local tls_active = false
local lang = nil  -- the client's xml:lang, echoed

local function stream_header()
  local id = { tostring(math.random(1, 9)) }
  for i = 2, 19 do id[i] = tostring(math.random(0, 9)) end
  header_sent = true
  return "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='" .. STREAM_NS
    .. "' id='" .. table.concat(id) .. "' from='" .. domain .. "' version='1.0'"
    .. (lang and (" xml:lang='" .. lang .. "'") or "") .. ">"
end

local MECHANISMS = "<mechanisms xmlns='" .. SASL_NS .. "'>"
  .. "<mechanism>SCRAM-SHA-1</mechanism><mechanism>PLAIN</mechanism></mechanisms>"
local function features()
  local starttls = tls_active and "" or ("<starttls xmlns='" .. TLS_NS .. "'/>")
  return "<stream:features>" .. starttls .. MECHANISMS .. "</stream:features>"
end

-- A stream error ends the stream; before the header was sent we must still open ours (RFC 6120 4.9.1.1).
local function stream_error(condition, detail)
  deadend.log("stream error " .. condition .. (detail and (": " .. detail) or ""), "warn")
  local out = header_sent and "" or stream_header()
  deadend.send(out .. "<stream:error><" .. condition .. " xmlns='" .. STREAMS_NS
    .. "'/></stream:error></stream:stream>")
  ending = ending or ("stream error " .. condition)
  return false
end

local function sasl_failure(condition)
  return deadend.send("<failure xmlns='" .. SASL_NS .. "'><" .. condition .. "/></failure>")
end

local function auth_refused()
  state, scram = STATE_FEATURES, nil
  if auth_attempts >= MAX_AUTH then
    sasl_failure("not-authorized")
    return stream_error("not-authorized", "too many authentication attempts")
  end
  return sasl_failure("not-authorized")
end

-- SASL PLAIN message: authzid NUL authcid NUL password.
local function plain_credentials(blob)
  local authzid, authcid, password = blob:match("^([^\0]*)\0([^\0]*)\0([^\0]*)$")
  if not authzid then
    deadend.log("auth PLAIN malformed message", "warn", { data = blob })
    state = STATE_FEATURES
    return sasl_failure("malformed-request")
  end
  deadend.log("auth PLAIN attempt " .. auth_attempts, "warn",
    { authzid = authzid, user = authcid, password = password })
  return auth_refused()
end

-- The text of <auth/>/<response/>: "" means no data, "=" an empty one (RFC 6120 6.4.2).
local function sasl_data(text)
  text = text:gsub("%s", "")
  if text == "=" then return "" end
  if text == "" then return nil end
  return b64decode(text) or false
end

local function saslname(s)
  return (s:gsub("=2C", ","):gsub("=3D", "="))
end

local function scram_first(blob)
  -- gs2-header "n,," / "y,," / "p=cb,," then client-first-message-bare "n=user,r=nonce[,ext]"
  local cbind, authzid, bare = blob:match("^([nyp][^,]*),([^,]*),(.*)$")
  local user, cnonce = (bare or ""):match("^n=([^,]*),r=([^,]+)")
  if not user then
    deadend.log("auth SCRAM-SHA-1 malformed first message", "warn", { data = blob })
    state = STATE_FEATURES
    return sasl_failure("malformed-request")
  end
  if cbind:sub(1, 1) == "p" then
    deadend.log("auth SCRAM-SHA-1 asks for channel binding", "warn", { cbind = cbind })
    return auth_refused()
  end
  local server_first = string.format("r=%s%s,s=%s,i=%d", cnonce, b64encode(random_bytes(18)),
    b64encode(random_bytes(16)), SCRAM_ITERATIONS)
  scram = { user = saslname(user), authzid = authzid, client_first_bare = bare,
            server_first = server_first }
  state = STATE_SCRAM
  deadend.log("auth SCRAM-SHA-1 attempt " .. auth_attempts, "info", { user = scram.user })
  return deadend.send("<challenge xmlns='" .. SASL_NS .. "'>" .. b64encode(server_first) .. "</challenge>")
end

local function scram_final(blob)
  local without_proof, proof = blob:match("^(.*),p=([^,]+)$")
  if not without_proof then
    deadend.log("auth SCRAM-SHA-1 malformed final message", "warn", { data = blob })
    return auth_refused()
  end
  -- Enough to test password guesses offline: SaltedPassword from the salt and count in server_first,
  -- then ClientProof over AuthMessage (RFC 5802 section 3).
  deadend.log("auth SCRAM-SHA-1 proof", "warn", { user = scram.user, proof = proof,
    auth_message = scram.client_first_bare .. "," .. scram.server_first .. "," .. without_proof })
  return auth_refused()
end

local function on_auth(el)
  if el.attrs.xmlns ~= SASL_NS then return stream_error("invalid-namespace", "auth outside SASL") end
  auth_attempts = auth_attempts + 1
  local mech = el.attrs.mechanism or ""
  if mech ~= "PLAIN" and mech ~= "SCRAM-SHA-1" then
    deadend.log("auth unsupported mechanism", "warn", { mechanism = mech })
    return sasl_failure("invalid-mechanism")
  end
  local data = sasl_data(el.text)
  if data == false then
    deadend.log("auth " .. mech .. " bad base64", "warn")
    return sasl_failure("incorrect-encoding")
  end
  if mech == "PLAIN" then
    if data == nil then  -- no initial response: ask for it with an empty challenge
      state = STATE_PLAIN
      return deadend.send("<challenge xmlns='" .. SASL_NS .. "'/>")
    end
    return plain_credentials(data)
  elseif mech == "SCRAM-SHA-1" then
    if data == nil then
      state = STATE_FEATURES
      return sasl_failure("malformed-request")
    end
    return scram_first(data)
  end
end

local function on_response(el)
  if el.attrs.xmlns ~= SASL_NS then return stream_error("invalid-namespace", "response outside SASL") end
  local data = sasl_data(el.text)
  if data == false then
    state, scram = STATE_FEATURES, nil
    return sasl_failure("incorrect-encoding")
  end
  data = data or ""
  if state == STATE_PLAIN then return plain_credentials(data) end
  return scram_final(data)
end

-- STARTTLS (RFC 6120 5.4): <proceed/>, the broker's TLS handshake, then the client opens a new stream.
-- Anything it pipelined behind <starttls/> was plaintext: dropped.
local function on_starttls()
  if tls_active then
    deadend.log("client asked for STARTTLS again", "warn")
    deadend.send("<failure xmlns='" .. TLS_NS .. "'/></stream:stream>")
    ending = "starttls refused"
    return false
  end
  if not deadend.send("<proceed xmlns='" .. TLS_NS .. "'/>") then return false end
  inbuf = ""
  if not deadend.starttls() then
    ending = "TLS handshake failed"
    return false
  end
  tls_active = true
  local tls = deadend.tls_info()
  deadend.log("tls " .. tls.version .. " " .. tls.cipher, "info", { sni = tls.sni })
  state, header_sent = STATE_HEADER, false
  return true
end

-- One token; returns false when the stream is over.
local function handle(tok)
  if state == STATE_HEADER then
    if tok.kind == "decl" then return true end
    if tok.kind ~= "open" then return stream_error("not-well-formed", "no stream header") end
    local a = tok.attrs
    deadend.log("stream open", "info", { to = a.to, from = a.from, version = a.version })
    if a.to then
      local to = a.to:lower()
      if #to > 253 or not to:match("^[%w][%w%.%-]*$") then
        return stream_error("host-unknown", "to=" .. q(a.to))
      end
      domain = to
    end
    if a["xmlns:stream"] ~= STREAM_NS then return stream_error("invalid-namespace", "stream namespace") end
    if a.xmlns ~= "jabber:client" then return stream_error("invalid-namespace", "xmlns=" .. q(a.xmlns)) end
    local xml_lang = a["xml:lang"]
    if xml_lang and xml_lang:match("^[%a%d%-]+$") and #xml_lang <= 35 then lang = xml_lang end
    if a.version and not a.version:match("^1%.%d+$") then
      return stream_error("unsupported-version", "version=" .. q(a.version))
    end
    state = STATE_FEATURES
    return deadend.send(stream_header() .. features())
  end

  if tok.kind == "close" then
    if tok.name ~= "stream:stream" then return stream_error("not-well-formed", "stray end tag") end
    deadend.log("client closed the stream")
    deadend.send("</stream:stream>")
    ending = "client closed the stream"
    return false
  end
  if tok.kind ~= "element" then return stream_error("not-well-formed", "unexpected " .. tok.kind) end

  elements = elements + 1
  if elements > MAX_ELEMENTS then return stream_error("policy-violation", "too many elements") end

  local name = tok.name
  if state == STATE_FEATURES then
    if name == "auth" then return on_auth(tok) end
    if name == "starttls" and tok.attrs.xmlns == TLS_NS then return on_starttls() end
    deadend.log("stanza before authentication", "warn", { stanza = name })
    return stream_error("not-authorized", "<" .. name .. "> before authentication")
  end
  -- In a SASL exchange (STATE_PLAIN or STATE_SCRAM).
  if name == "response" then return on_response(tok) end
  if name == "abort" then
    deadend.log("auth aborted by client")
    state, scram = STATE_FEATURES, nil
    return sasl_failure("aborted")
  end
  return stream_error("not-authorized", "<" .. name .. "> during SASL")
end

deadend.log("connect from " .. peer)
while true do
  local tok, err = next_token()
  if tok then
    if not handle(tok) then break end
  elseif err == "need" then
    if #inbuf > MAX_BUFFER then
      stream_error("policy-violation", "element over " .. MAX_BUFFER .. " bytes")
      break
    end
    local chunk = deadend.recv(4096)
    if not chunk then
      ending = ending or "client disconnected"
      break
    end
    inbuf = inbuf .. chunk
  elseif err == "restricted" then
    stream_error("restricted-xml", "comment, processing instruction or DTD")
    break
  else
    stream_error("not-well-formed", "input " .. q(inbuf:sub(1, 64)))
    break
  end
end

deadend.log(string.format("disconnect (%s) domain=%s state=%s auth_attempts=%d", ending or "?", domain,
  state, auth_attempts))
deadend.close()
