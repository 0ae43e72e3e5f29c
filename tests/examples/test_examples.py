"""The example services in examples/, driven end to end by real client libraries over loopback."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import http.client
import re
import smtplib
import socket
import struct
import time
from datetime import UTC, datetime

import pytest
import slixmpp

from tests.conftest import EXAMPLES, HOST, Broker, read_all, read_until

STREAMS_NS = "urn:ietf:params:xml:ns:xmpp-streams"
NOT_WELL_FORMED = (
    f"<stream:error><not-well-formed xmlns='{STREAMS_NS}'/></stream:error></stream:stream>"
).encode()


def conn_id(broker: Broker, script_port: int, since: int) -> str:
    """The id of the first connection to `script_port` accepted after `since`."""
    rx = rf"port={broker.port(script_port)} conn=([0-9a-f]{{12}}) peer=\S+ connect from"
    return broker.wait_for(rx, since=since).group(1)


def at(conn: str) -> str:
    """Regex for the part of a script's log line between the level and the message."""
    return rf'port=\S+ conn={conn} peer=\S+ script: "'


# --- 25.lua: SMTP ---------------------------------------------------------------------------------


def test_smtp_full_transaction(make_broker):
    b = make_broker(EXAMPLES)
    b.wait_for(rf"ready: {len(list(EXAMPLES.glob('*.lua')))} script")  # every example compiled and listens
    mark = b.mark()
    smtp = smtplib.SMTP(timeout=10)
    try:
        code, banner = smtp.connect(HOST, b.port(25))
        assert code == 220 and b"ESMTP Postfix" in banner
        code, _ = smtp.ehlo("relay.example.net")
        assert code == 250
        for ext in ("pipelining", "size", "auth", "8bitmime", "enhancedstatuscodes"):
            assert smtp.has_extn(ext), ext
        assert smtp.has_extn("starttls")  # the broker does the handshake: tests/examples/test_tls_examples.py
        assert smtp.esmtp_features["size"] == "10240000"
        assert set(smtp.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}

        assert smtp.mail("spammer@example.net", ["BODY=8BITMIME"]) == (250, b"2.1.0 Ok")
        assert smtp.rcpt("victim@example.com") == (250, b"2.1.5 Ok")
        assert smtp.rcpt("second@example.com") == (250, b"2.1.5 Ok")
        body = (
            b"Subject: Cheap watches\r\nFrom: a@example.net\r\n\r\n"
            b"Hello\r\n.starts with a dot\r\n..two\r\nbye\r\n"
        )
        code, msg = smtp.data(body)
        assert code == 250 and re.fullmatch(rb"2\.0\.0 Ok: queued as [0-9A-F]{11}", msg), msg
        assert smtp.rset() == (250, b"2.0.0 Ok")
        assert smtp.noop() == (250, b"2.0.0 Ok")
        assert smtp.quit()[0] == 221
    finally:
        smtp.close()

    conn = conn_id(b, 25, mark)
    b.wait_for(rf'conn={conn} .*script: "EHLO" helo="relay\.example\.net"')
    b.wait_for(rf'conn={conn} .*script: "mail" email\.from="spammer@example\.net" params="BODY=8BITMIME"')
    b.wait_for(rf'conn={conn} .*script: "rcpt" email\.to="victim@example\.com"')
    m = b.wait_for(
        rf'conn={conn} .*script: "message [0-9A-F]{{11}} queued rcpts=2 size=(\d+) '
        rf'.*subject="Cheap watches"'
    )
    # smtplib dot-stuffs, the script unstuffs: the size is the message as the client meant it
    assert int(m.group(1)) == len(body)
    b.wait_for(rf'conn={conn} .*script: "disconnect \(quit\)')
    assert b.session_end(conn).groups() == ("done", "script")


def test_smtp_unknown_command_and_bad_sequence(make_broker):
    b = make_broker(EXAMPLES)
    mark = b.mark()
    smtp = smtplib.SMTP(timeout=10)
    try:
        smtp.connect(HOST, b.port(25))
        code, msg = smtp.docmd("MAIL", "FROM:<a@example.net>")
        assert code == 503 and b"send HELO/EHLO first" in msg
        smtp.ehlo("x.example.net")
        code, msg = smtp.docmd("XYZZY", "plugh")
        assert code in (500, 502) and b"command not recognized" in msg
        code, msg = smtp.docmd("RCPT", "TO:<b@example.com>")
        assert code == 503 and b"need MAIL" in msg
        assert smtp.mail("a@example.net")[0] == 250
        code, msg = smtp.docmd("DATA")
        assert code == 503 and b"need RCPT" in msg
        code, msg = smtp.docmd("MAIL", "FROM:<again@example.net>")
        assert code == 503 and b"nested MAIL" in msg
        assert smtp.quit()[0] == 221
    finally:
        smtp.close()
    conn = conn_id(b, 25, mark)
    b.wait_for(rf'conn={conn} .*script: "unknown command" command="XYZZY plugh"')
    b.wait_for(rf'conn={conn} .*script: "disconnect \(quit\) .*errors=5')


@pytest.mark.parametrize(
    ("mech", "initial", "challenges"),
    [
        ("LOGIN", False, [b"Username:", b"Password:"]),
        ("LOGIN", True, [None, b"Password:"]),
        ("PLAIN", False, [b""]),
        ("PLAIN", True, [None]),
    ],
)
def test_smtp_auth_is_logged_and_refused(make_broker, mech, initial, challenges):
    b = make_broker(EXAMPLES)
    mark = b.mark()
    user, password = f"admin-{mech.lower()}-{int(initial)}", "Summer 2024!"
    seen = []
    smtp = smtplib.SMTP(timeout=10)
    try:
        smtp.connect(HOST, b.port(25))
        smtp.ehlo("bot.example.net")
        smtp.esmtp_features["auth"] = mech  # only this mechanism, so login() does not fall back
        real = getattr(smtp, f"auth_{mech.lower()}")

        def spy(challenge=None):
            seen.append(challenge)
            return real(challenge)

        setattr(smtp, f"auth_{mech.lower()}", spy)
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            smtp.login(user, password, initial_response_ok=initial)
        assert failed.value.smtp_code == 535
        error = failed.value.smtp_error
        assert isinstance(error, bytes) and error.startswith(b"5.7.8 ")
        assert seen == challenges  # the 334 prompts, decoded: "Username:", "Password:", or empty
        assert smtp.quit()[0] == 221
    finally:
        smtp.close()
    conn = conn_id(b, 25, mark)
    b.wait_for(rf'WARN +{at(conn)}auth {mech} attempt 1" password="{re.escape(password)}" user="{user}"')


# --- 5222.lua: XMPP -------------------------------------------------------------------------------


async def xmpp_login(port: int, jid: str, password: str) -> tuple[list[str], bool]:
    """Log in with slixmpp over a plain stream; the SASL failure conditions seen and whether it ended."""
    client = slixmpp.ClientXMPP(jid, password)
    client.enable_direct_tls = False
    client.enable_starttls = False
    client.enable_plaintext = True
    sasl = client.plugin["feature_mechanisms"]
    sasl.unencrypted_plain = True
    sasl.unencrypted_scram = True
    loop = asyncio.get_running_loop()
    failures: list[str] = []
    gave_up, disconnected = loop.create_future(), loop.create_future()

    def settle(fut: asyncio.Future[object], value: object) -> None:
        if not fut.done():
            fut.set_result(value)

    client.add_event_handler("failed_auth", lambda stanza: failures.append(stanza["condition"]))
    client.add_event_handler("failed_all_auth", lambda _: settle(gave_up, True))
    client.add_event_handler("session_start", lambda _: settle(gave_up, False))
    client.add_event_handler("disconnected", lambda _: settle(disconnected, True))
    client.connect(HOST, port)
    try:
        assert await asyncio.wait_for(gave_up, 10), "authentication succeeded on a honeypot"
        ended = await asyncio.wait_for(disconnected, 5)  # slixmpp closes the stream itself
    finally:
        client.abort()
    return failures, ended


def test_xmpp_slixmpp_auth_refused_and_logged(make_broker):
    b = make_broker(EXAMPLES)
    mark = b.mark()
    failures, ended = asyncio.run(
        asyncio.wait_for(xmpp_login(b.port(5222), "mallory@chat.example.org", "hunter2 pw"), 20)
    )
    # slixmpp tries SCRAM-SHA-1 first, then falls back to PLAIN: both are refused
    assert failures == ["not-authorized", "not-authorized"]
    assert ended
    conn = conn_id(b, 5222, mark)
    b.wait_for(rf'conn={conn} .*script: "stream open" to="chat\.example\.org"')
    b.wait_for(
        rf'conn={conn} .*script: "auth SCRAM-SHA-1 proof" auth_message="n=mallory,r=.*" proof=".*" '
        rf'user="mallory"'
    )
    b.wait_for(rf'WARN +{at(conn)}auth PLAIN attempt 2" authzid="" password="hunter2 pw" user="mallory"')
    b.wait_for(rf'conn={conn} .*script: "client closed the stream')
    assert b.session_end(conn).group(1) == "done"


def test_xmpp_raw_stream_plain_auth_and_close(make_broker):
    b = make_broker(EXAMPLES)
    mark = b.mark()
    with b.connect(5222) as s:
        # the header split mid-attribute: the script must buffer
        s.sendall(
            b"<?xml version='1.0'?><stream:stream to='jabber.example.net' xmlns='jabber:client' xmlns:str"
        )
        time.sleep(0.1)
        s.sendall(b"eam='http://etherx.jabber.org/streams' version='1.0'>")
        head = read_until(s, b"</stream:features>")
        assert re.match(rb"<\?xml version='1\.0'\?><stream:stream ", head), head
        assert b"from='jabber.example.net'" in head
        assert re.search(rb" id='\d{19}'", head)
        assert b"<mechanism>PLAIN</mechanism>" in head
        assert b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>" in head  # offered, not required
        blob = base64.b64encode(b"\0eve\0letmein").decode()
        s.sendall(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{blob}</auth>".encode())
        reply = read_until(s, b"</failure>")
        assert reply == b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>"
        s.sendall(b"</stream:stream>")
        assert read_all(s) == b"</stream:stream>"
    conn = conn_id(b, 5222, mark)
    b.wait_for(rf'conn={conn} .*script: "auth PLAIN attempt 1" authzid="" password="letmein" user="eve"')
    assert b.session_end(conn).groups() == ("done", "script")


def test_xmpp_garbage_gets_not_well_formed(make_broker):
    b = make_broker(EXAMPLES)
    mark = b.mark()
    with b.connect(5222) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = read_all(s)
    # no stream was open yet: the server still opens its own before the error (RFC 6120 4.9.1.1)
    assert data.startswith(b"<?xml version='1.0'?><stream:stream ")
    assert data.endswith(NOT_WELL_FORMED)
    conn = conn_id(b, 5222, mark)
    b.wait_for(rf"WARN +{at(conn)}stream error not-well-formed")
    assert b.session_end(conn).group(1) == "done"


# --- 22.lua: SSH tarpit ---------------------------------------------------------------------------


def test_ssh_tarpit_trickles_lines_without_banner(make_broker):
    b = make_broker(EXAMPLES)
    mark = b.mark()
    s = b.connect(22)
    started = time.monotonic()
    data = read_until(s, b"\r\n", timeout=2)
    assert time.monotonic() - started < 1.5, "the first line must come at once"
    line, sep, rest = data.partition(b"\r\n")
    assert sep and rest == b""
    assert not line.startswith(b"SSH-")
    assert 3 <= len(line) <= 32 and all(32 <= c < 127 for c in line), line
    conn = conn_id(b, 22, mark)
    time.sleep(1.0)
    # The peer leaves in the middle of the script's 10 s pause: the broker sees it at once, ends the sleep,
    # and the script sees the short sleep.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    m = b.wait_for(rf"conn={conn} .*session end reason=(\S+) duration=([\d.]+)s .*closed_by=(\S+)", timeout=5)
    assert (m.group(1), m.group(3)) == ("done", "peer")
    assert 1.0 <= float(m.group(2)) < 3.0  # freed within moments of the departure, not after the pause
    held = b.wait_for(rf'conn={conn} .*script: "tarpit end: peer gone, held (\d+\.\d)s, 1 lines').group(1)
    assert 0.9 <= float(held) < 3.0  # what the sleep returned: the time it really held the peer


# --- 80.lua: HTTP ---------------------------------------------------------------------------------

UA = "Mozilla/5.0 (compatible; ExampleScanner/2.1)"


def test_http_pages_on_one_keepalive_connection(make_broker):
    b = make_broker(EXAMPLES)
    mark = b.mark()
    c = http.client.HTTPConnection(HOST, b.port(80), timeout=10)
    try:
        c.request("GET", "/", headers={"User-Agent": UA})
        r = c.getresponse()
        body = r.read()
        assert r.status == 200 and r.getheader("Server") == "nginx/1.24.0"
        assert b"<title>Welcome to nginx!</title>" in body
        assert int(r.getheader("Content-Length") or -1) == len(body) == 615
        assert r.getheader("Connection") == "keep-alive"
        assert r.getheader("Date") is None  # no clock, no Date (RFC 9110 6.6.1)

        c.request("GET", "/nope?x=1", headers={"User-Agent": UA})
        r = c.getresponse()
        body = r.read()
        assert r.status == 404 and b"<title>404 Not Found</title>" in body
        assert r.getheader("Server") == "nginx/1.24.0"

        c.request("HEAD", "/", headers={"User-Agent": UA})
        r = c.getresponse()
        assert r.status == 200 and r.read() == b""
        assert r.getheader("Content-Length") == "615"

        c.request("PROPFIND", "/", headers={"User-Agent": UA})
        r = c.getresponse()
        assert r.status == 405 and b"405 Not Allowed" in r.read()
    finally:
        c.close()
    conn = conn_id(b, 80, mark)
    host = re.escape(f"{HOST}:{b.port(80)}")
    b.wait_for(
        rf'conn={conn} .*script: "request" http\.host="{host}" http\.method="GET" http\.path="/" '
        rf'http\.user_agent="{re.escape(UA)}" http\.version="HTTP/1\.1"'
    )
    b.wait_for(rf'conn={conn} .*script: "request" .*http\.path="/nope\?x=1"')
    b.wait_for(rf'conn={conn} .*script: "request" .*http\.method="HEAD" http\.path="/"')
    b.wait_for(rf'conn={conn} .*script: "disconnect after 4 request')
    assert b.session_end(conn).group(1) == "done"


def test_http_garbage_gets_400(make_broker):
    b = make_broker(EXAMPLES)
    # a line that is no request line, and a TLS ClientHello (answered before any line end arrives)
    for garbage in (b"HELLO?? what is this\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"):
        mark = b.mark()
        with b.connect(80) as s:
            s.sendall(garbage)
            data = read_all(s)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 Bad Request\r\nServer: nginx/1.24.0\r\n"), garbage
        assert b"\r\nConnection: close" in head
        assert b"<title>400 Bad Request</title>" in body
        conn = conn_id(b, 80, mark)
        b.wait_for(rf"WARN +{at(conn)}bad request")
        assert b.session_end(conn).group(1) == "done"


def test_http_date_header_with_clock(make_broker):
    b = make_broker(EXAMPLES, "--allow-clock")
    c = http.client.HTTPConnection(HOST, b.port(80), timeout=10)
    try:
        c.request("GET", "/", headers={"Connection": "close"})
        r = c.getresponse()
        assert r.status == 200 and b"Welcome to nginx!" in r.read()
        assert r.getheader("Connection") == "close"
        date = r.getheader("Date")
    finally:
        c.close()
    assert date is not None and date.endswith(" GMT")
    sent = email.utils.parsedate_to_datetime(date)
    assert abs((datetime.now(UTC) - sent).total_seconds()) < 60
