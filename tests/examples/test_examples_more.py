"""The FTP, Telnet, POP3, IMAP, Redis, MySQL and HTTP-admin examples, driven by real clients over loopback.

Each test talks to the real broker serving examples/ with a stock client library (ftplib, poplib, imaplib,
redis-py, PyMySQL, http.client) or, where no client library fits (Telnet, MySQL wire details), a raw
socket; then checks what the script logged.
"""

from __future__ import annotations

import base64
import ftplib
import hashlib
import http.client
import imaplib
import poplib
import re
import socket
import struct
import time

import pymysql
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import EXAMPLES, HOST, Broker, read_all, read_until

NEW_PORTS = (21, 23, 110, 143, 3306, 6379, 8080)


def conn_id(broker: Broker, script_port: int, since: int) -> str:
    """The id of the first connection to `script_port` accepted after `since`."""
    rx = rf"port={broker.port(script_port)} conn=([0-9a-f]{{12}}) peer=\S+ connect from"
    return broker.wait_for(rx, since=since).group(1)


def at(conn: str) -> str:
    """Regex for the part of a script's log line between the level and the message."""
    return rf'port=\S+ conn={conn} peer=\S+ script: "'


def test_every_example_is_served(make_broker):
    b = make_broker(EXAMPLES)
    scripts = [p for p in EXAMPLES.glob("*.lua") if re.fullmatch(r"[1-9][0-9]{0,4}\.lua", p.name)]
    assert len(scripts) >= 11
    b.wait_for(rf"ready: {len(scripts)} script")  # every example compiled and got its port
    for port in NEW_PORTS:
        b.wait_for(rf"listening on {re.escape(HOST)}:{b.port(port)} script={port}\.lua")


# --- 21.lua: FTP ----------------------------------------------------------------------------------


def test_ftp_login_refused_and_logged(make_broker):
    b = make_broker(EXAMPLES)
    mark = b.mark()
    ftp = ftplib.FTP(timeout=10)
    try:
        assert ftp.connect(HOST, b.port(21)) == "220 (vsFTPd 3.0.3)"
        feat = ftp.sendcmd("FEAT")
        assert feat.startswith("211-Features:") and " SIZE" in feat and feat.endswith("211 End")
        assert " PASV" not in feat  # data connections are off, and vsftpd then does not offer PASV
        with pytest.raises(ftplib.error_perm, match=r"^530 Please login with USER and PASS\.$"):
            ftp.sendcmd("SYST")
        started = time.monotonic()
        with pytest.raises(ftplib.error_perm, match=r"^530 Login incorrect\.$"):
            ftp.login("root", "t00r pass")
        assert time.monotonic() - started >= 1.0  # vsftpd's delay_failed_login
        with pytest.raises(ftplib.error_perm, match=r"^503 Login with USER first\.$"):
            ftp.sendcmd("PASS again")
        assert ftp.quit() == "221 Goodbye."
    finally:
        ftp.close()
    conn = conn_id(b, 21, mark)
    b.wait_for(rf'WARN +{at(conn)}login attempt 1" password="t00r pass" user="root"')
    b.wait_for(rf"{at(conn)}disconnect \(quit\) .*login_attempts=1")
    assert b.session_end(conn).groups() == ("done", "script")


def test_ftp_anonymous_session_has_no_data_channel(make_broker):
    b = make_broker(EXAMPLES)
    mark = b.mark()
    ftp = ftplib.FTP(timeout=10)
    try:
        ftp.connect(HOST, b.port(21))
        assert ftp.login() == "230 Login successful."  # ftplib's anonymous login, "anonymous@" password
        assert ftp.sendcmd("SYST") == "215 UNIX Type: L8"
        assert ftp.pwd() == "/"
        ftp.cwd("pub")
        assert ftp.pwd() == "/pub"
        with pytest.raises(ftplib.error_perm, match=r"^550 Failed to change directory\.$"):
            ftp.cwd("/etc")
        assert ftp.voidcmd("TYPE I") == "200 Switching to Binary mode."
        with pytest.raises(ftplib.error_perm, match=r"^550 Permission denied\.$"):
            ftp.nlst()  # ftplib asks for PASV first
        with pytest.raises(ftplib.error_temp, match=r"^425 Use PORT or PASV first\.$"):
            ftp.sendcmd("LIST")
        with pytest.raises(ftplib.error_perm, match=r"^500 Unknown command\.$"):
            ftp.sendcmd("XYZZY")
        assert ftp.quit() == "221 Goodbye."
    finally:
        ftp.close()
    conn = conn_id(b, 21, mark)
    b.wait_for(rf'WARN +{at(conn)}anonymous login" password="anonymous@" user="anonymous"')
    b.wait_for(rf'{at(conn)}command" command="CWD /etc"')
    b.wait_for(rf'{at(conn)}command" command="XYZZY"')


def test_ftp_three_failures_disconnect(make_broker):
    b = make_broker(EXAMPLES)
    mark = b.mark()
    with b.connect(21, timeout=10) as s:
        assert read_until(s, b"\r\n") == b"220 (vsFTPd 3.0.3)\r\n"
        s.sendall(b"".join(b"USER u%d\r\nPASS p%d\r\n" % (i, i) for i in range(3)))
        data = read_all(s, timeout=10)
    assert data.count(b"530 Login incorrect.\r\n") == 3 and data.endswith(b"530 Login incorrect.\r\n")
    conn = conn_id(b, 21, mark)
    b.wait_for(rf'{at(conn)}login attempt 3" password="p2" user="u2"')
    b.wait_for(rf"{at(conn)}disconnect \(too many failed logins\)")


# --- 23.lua: Telnet -------------------------------------------------------------------------------

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240


def strip_iac(data: bytes) -> tuple[bytes, list[tuple[int, int]]]:
    """The text of a server's Telnet output and the (command, option) pairs it negotiated."""
    text, options, i = bytearray(), [], 0
    while i < len(data):
        if data[i] != IAC:
            text.append(data[i])
            i += 1
        elif data[i + 1] in (WILL, WONT, DO, DONT):
            options.append((data[i + 1], data[i + 2]))
            i += 3
        elif data[i + 1] == IAC:
            text.append(IAC)
            i += 2
        else:
            i += 2
    return bytes(text), options


def test_telnet_login_incorrect_with_iac_negotiation(make_broker):
    b = make_broker(EXAMPLES)
    mark = b.mark()
    with b.connect(23, timeout=10) as s:
        raw = read_until(s, b"login: ")
        text, options = strip_iac(raw)
        assert options == [(DO, 1), (DO, 31), (WILL, 1), (WILL, 3)]  # ECHO, NAWS / ECHO, SGA
        assert text == b"\r\nrouter login: "
        # A client's answers, a NAWS subnegotiation split across writes, and the user name in pieces.
        s.sendall(bytes([IAC, DONT, 1, IAC, WILL, 31, IAC, SB, 31, 0]))
        time.sleep(0.05)
        s.sendall(bytes([80, 0, 24, IAC, SE]) + b"ro")
        time.sleep(0.05)
        s.sendall(b"ot\r\n")
        echoed = read_until(s, b"Password: ")
        assert echoed == b"root\r\nPassword: "  # the name is echoed (WILL ECHO), nothing of the IACs
        s.sendall(b"xc3511\r\n")
        after = read_until(s, b"login: ", timeout=10)
        assert after == b"\r\n\r\nLogin incorrect\r\nrouter login: "  # the password is not echoed
        for user in (b"admin", b"support"):
            s.sendall(user + b"\r\n")
            assert read_until(s, b"Password: ") == user + b"\r\nPassword: "
            s.sendall(b"1234\r\n")
            if user == b"admin":
                assert read_until(s, b"login: ", timeout=10).endswith(b"Login incorrect\r\nrouter login: ")
        rest = read_all(s, timeout=10)
    assert rest == b"\r\n\r\nLogin incorrect\r\n"  # the third failure: no new prompt, the end
    conn = conn_id(b, 23, mark)
    b.wait_for(rf'WARN +{at(conn)}login attempt 1" password="xc3511" user="root"')
    b.wait_for(rf'WARN +{at(conn)}login attempt 3" password="1234" user="support"')
    b.wait_for(rf"{at(conn)}disconnect \(too many failed logins\) login_attempts=3 telnet_options=2")
    assert b.session_end(conn).groups() == ("done", "script")


# --- 110.lua: POP3 --------------------------------------------------------------------------------


def test_pop3_capa_and_login_refused(make_broker):
    b = make_broker(EXAMPLES)
    mark = b.mark()
    pop = poplib.POP3(HOST, b.port(110), timeout=10)
    try:
        assert pop.getwelcome() == b"+OK Dovecot ready."
        capa = pop.capa()
        assert capa["SASL"] == ["PLAIN", "LOGIN"]
        assert {"USER", "TOP", "UIDL", "PIPELINING", "RESP-CODES"} <= set(capa)
        assert "STLS" not in capa
        assert pop.user("admin") == b"+OK"
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Authentication failed\."):
            pop.pass_("hunter2 x")
        with pytest.raises(poplib.error_proto, match=r"-ERR Unknown command\."):
            pop.stat()
        assert pop.quit() == b"+OK Logging out"
    finally:
        pop.close()
    conn = conn_id(b, 110, mark)
    b.wait_for(rf'WARN +{at(conn)}auth USER attempt 1" password="hunter2 x" user="admin"')
    b.wait_for(rf"{at(conn)}disconnect \(quit\)")


def test_pop3_sasl_login_and_bad_commands(make_broker):
    b = make_broker(EXAMPLES)
    mark = b.mark()
    with b.connect(110, timeout=10) as s:
        read_until(s, b"\r\n")
        s.sendall(b"AUTH LOGIN\r\n")
        assert read_until(s, b"\r\n") == b"+ VXNlcm5hbWU6\r\n"
        s.sendall(base64.b64encode(b"office@example.com") + b"\r\n")
        assert read_until(s, b"\r\n") == b"+ UGFzc3dvcmQ6\r\n"
        s.sendall(base64.b64encode(b"Welcome1") + b"\r\n")
        assert read_until(s, b"\r\n", timeout=10) == b"-ERR [AUTH] Authentication failed.\r\n"
        s.sendall(b"RETR 1\r\nLIST\r\nGET / HTTP/1.0\r\n")
        rest = read_all(s)
    assert rest == b"-ERR Unknown command.\r\n-ERR Unknown command.\r\n-ERR Too many bad commands.\r\n"
    conn = conn_id(b, 110, mark)
    b.wait_for(rf'WARN +{at(conn)}auth LOGIN attempt 1" password="Welcome1" user="office@example\.com"')
    b.wait_for(rf"{at(conn)}disconnect \(too many bad commands\)")


# --- 143.lua: IMAP --------------------------------------------------------------------------------


def test_imap_capability_login_refused_logout(make_broker):
    b = make_broker(EXAMPLES)
    mark = b.mark()
    imap = imaplib.IMAP4(HOST, b.port(143), timeout=10)
    try:
        assert imap.welcome.startswith(b"* OK [CAPABILITY IMAP4rev1 ") and imap.welcome.endswith(
            b"Dovecot ready."
        )
        assert {"IMAP4REV1", "AUTH=PLAIN", "AUTH=LOGIN", "LITERAL+", "ID"} <= set(imap.capabilities)
        assert "STARTTLS" not in imap.capabilities
        with pytest.raises(imaplib.IMAP4.error, match=r"\[AUTHENTICATIONFAILED\] Authentication failed\."):
            imap.login("admin", 'pa ss"word')  # imaplib quotes the password
        assert imap.noop() == ("OK", [b"NOOP completed."])
        typ, _ = imap.xatom("ID", '("name" "nuclei")')
        assert typ == "OK" and imap.untagged_responses.get("ID") == [b'("name" "Dovecot")']
        with pytest.raises(imaplib.IMAP4.error, match=r"Error in IMAP command received by server\."):
            imap.xatom("XYZZY")
        assert imap.logout() == ("BYE", [b"Logging out"])
    finally:
        if imap.state != "LOGOUT":
            imap.shutdown()
    conn = conn_id(b, 143, mark)
    # a field's value is escaped as the log escapes text: the quote inside it shows as \"
    b.wait_for(rf'WARN +{at(conn)}auth LOGIN attempt 1" password="pa ss\\"word" user="admin"')
    b.wait_for(rf'{at(conn)}client id" client_id="name nuclei"')
    b.wait_for(rf"{at(conn)}disconnect \(logout\)")


def test_imap_authenticate_plain_and_literals(make_broker):
    b = make_broker(EXAMPLES)
    mark = b.mark()
    imap = imaplib.IMAP4(HOST, b.port(143), timeout=10)
    try:
        with pytest.raises(imaplib.IMAP4.error, match=r"AUTHENTICATIONFAILED"):
            imap.authenticate("PLAIN", lambda _challenge: b"\0webmaster\0Spring2024")
    finally:
        imap.shutdown()
    with b.connect(143, timeout=10) as s:
        read_until(s, b"Dovecot ready.\r\n")
        s.sendall(b"t1 LOGIN {4}\r\n")
        assert read_until(s, b"\r\n") == b"+ OK\r\n"
        s.sendall(b"test {9+}\r\npass\r\nwd!\r\n")  # a LITERAL+ password with a line end inside
        assert (
            read_until(s, b"\r\n", timeout=10) == b"t1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
        )
        s.sendall(b"LOGIN root toor\r\n\r\nt3 FETCH 1 BODY[]\r\n")
        rest = read_all(s)
    assert rest == (
        b"LOGIN BAD First parameter in line is IMAP's command tag, not the command name. Add that before "
        b"the command, like: a login user pass\r\n"
        b"* BAD Error in IMAP command received by server.\r\n"
        b"* BYE Too many invalid IMAP commands.\r\n"
    )
    b.wait_for(r'auth AUTHENTICATE PLAIN attempt 1" password="Spring2024" user="webmaster"', since=mark)
    b.wait_for(r'auth LOGIN attempt 1" password="pass\\x0d\\x0awd!" user="test"', since=mark)
    b.wait_for(r"disconnect \(too many invalid commands\)", since=mark)


# --- 6379.lua: Redis ------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3])
def test_redis_client_commands(make_broker, protocol):
    b = make_broker(EXAMPLES)
    mark = b.mark()
    r = redis.Redis(
        host=HOST, port=b.port(6379), protocol=protocol, socket_timeout=10, socket_connect_timeout=10
    )
    try:
        assert r.ping() is True
        info = r.info()
        assert info["redis_version"] == "6.0.16" and info["redis_mode"] == "standalone"
        assert info["role"] == "master" and info["tcp_port"] == 6379
        assert r.info("server")["os"].startswith("Linux ")
        assert r.set("k1", "v 1") is True
        assert r.get("k1") == b"v 1" and r.get("nope") is None
        assert r.dbsize() == 1 and r.keys("k*") == [b"k1"]
        assert r.info("keyspace") == {"db0": {"keys": 1, "expires": 0, "avg_ttl": 0}}
        assert r.config_get("dir") == {"dir": "/var/lib/redis"}
        assert r.config_set("dir", "/root/.ssh") is True
        assert r.config_get("d*") == {
            "dbfilename": "dump.rdb",
            "databases": "16",
            "daemonize": "yes",
            "dir": "/root/.ssh",
        }
        assert r.execute_command("SLAVEOF", "203.0.113.7", "6380") in (b"OK", True, "OK")
        assert r.info("replication")["role"] == "slave"
        with pytest.raises(redis.ResponseError, match=r"^Error loading the extension"):
            r.execute_command("MODULE", "LOAD", "/tmp/exp.so")
        with pytest.raises(redis.ResponseError, match=r"^unknown command `XYZZY`"):
            r.execute_command("XYZZY", "a")
        assert r.execute_command("COMMAND") in ([], {})  # redis-py turns COMMAND's reply into a dict
    finally:
        r.close()
    conn = conn_id(b, 6379, mark)
    if protocol == 3:
        b.wait_for(rf'INFO +{at(conn)}command" command="HELLO 3')
    b.wait_for(rf'INFO +{at(conn)}command" command="PING"')
    b.wait_for(rf'WARN +{at(conn)}command" command="CONFIG SET dir /root/\.ssh"')
    b.wait_for(rf'WARN +{at(conn)}command" command="SLAVEOF 203\.0\.113\.7 6380"')
    b.wait_for(rf'WARN +{at(conn)}command" command="MODULE LOAD /tmp/exp\.so"')
    b.wait_for(rf'{at(conn)}command" command="SET k1 \\"v 1\\""')


def test_redis_auth_is_logged(make_broker):
    b = make_broker(EXAMPLES)
    mark = b.mark()

    def client(**kwargs):
        return redis.Redis(
            host=HOST,
            port=b.port(6379),
            socket_timeout=10,
            socket_connect_timeout=10,
            retry=Retry(NoBackoff(), 0),  # one attempt: by default redis-py retries a failed AUTH
            **kwargs,
        )

    # RESP2 "AUTH <password>" on a Redis without requirepass is an error; a user that does not exist is
    # WRONGPASS (here through "HELLO 3 AUTH admin ..."); the default user is "nopass": any password will do.
    for kwargs, error in [
        ({"password": "foobared", "protocol": 2}, r"without any password configured"),
        ({"username": "admin", "password": "s3cr3t", "protocol": 3}, r"invalid username-password pair"),
    ]:
        r = client(**kwargs)
        try:
            with pytest.raises(redis.AuthenticationError, match=error):
                r.ping()
        finally:
            r.close()
    r = client(password="letmein", protocol=3)  # "HELLO 3 AUTH default letmein"
    try:
        assert r.ping() is True
    finally:
        r.close()
    b.wait_for(r'WARN .*script: "auth attempt 1" password="foobared"$', since=mark)
    b.wait_for(r'WARN .*script: "auth attempt 1" password="s3cr3t" user="admin"', since=mark)
    b.wait_for(r'WARN .*script: "auth attempt 1" password="letmein" user="default"', since=mark)


def test_redis_protocol_errors_and_http(make_broker):
    b = make_broker(EXAMPLES)
    with b.connect(6379) as s:
        s.sendall(b'PING\r\nECHO "a b\\x41"\r\n*1\r\n$4\r\nPING\r\n*1\r\n+bad\r\n')
        assert (
            read_all(s) == b"+PONG\r\n$4\r\na bA\r\n+PONG\r\n-ERR Protocol error: expected '$', got '+'\r\n"
        )
    mark = b.mark()
    with b.connect(6379) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1:6379\r\n\r\n")
        assert read_all(s) == b""  # Redis drops HTTP without a word
    conn = conn_id(b, 6379, mark)
    b.wait_for(rf"WARN +{at(conn)}Possible SECURITY ATTACK detected")


# --- 3306.lua: MySQL ------------------------------------------------------------------------------


def native_password(password: bytes, scramble: bytes) -> bytes:
    """mysql_native_password: SHA1(pw) XOR SHA1(scramble + SHA1(SHA1(pw)))."""
    h1 = hashlib.sha1(password).digest()
    h2 = hashlib.sha1(scramble + hashlib.sha1(h1).digest()).digest()
    return bytes(a ^ b for a, b in zip(h1, h2, strict=True))


def test_mysql_pymysql_access_denied(make_broker):
    b = make_broker(EXAMPLES)
    mark = b.mark()
    with pytest.raises(pymysql.err.OperationalError) as failed:
        pymysql.connect(
            host=HOST,
            port=b.port(3306),
            user="root",
            password="r00t!",
            database="wordpress",
            connect_timeout=10,
            read_timeout=10,
            program_name="probe",
        )
    code, message = failed.value.args
    assert code == 1045
    assert message == "Access denied for user 'root'@'127.0.0.1' (using password: YES)"
    conn = conn_id(b, 3306, mark)
    m = b.wait_for(
        rf'WARN +{at(conn)}auth attempt scramble=([0-9a-f]{{40}}) .*" auth_response="([0-9a-f]{{40}})" '
        rf'database="wordpress" plugin="mysql_native_password" user="root"'
    )
    # The logged response is the real mysql_native_password proof over the logged scramble.
    assert bytes.fromhex(m.group(2)) == native_password(b"r00t!", bytes.fromhex(m.group(1)))
    b.wait_for(rf'{at(conn)}client attributes" attributes=".*\b_client_name=pymysql\b')
    b.wait_for(rf'{at(conn)}client attributes" attributes=".*\bprogram_name=probe\b')
    b.wait_for(rf"{at(conn)}disconnect \(access denied\) state=refused")

    with pytest.raises(pymysql.err.OperationalError, match=r"using password: NO"):
        pymysql.connect(
            host=HOST, port=b.port(3306), user="guest", password="", connect_timeout=10, read_timeout=10
        )


def read_packet(s: socket.socket) -> tuple[int, bytes]:
    head = b""
    while len(head) < 4:
        chunk = s.recv(4 - len(head))
        assert chunk, "connection closed before a packet header"
        head += chunk
    length, seq = int.from_bytes(head[:3], "little"), head[3]
    payload = b""
    while len(payload) < length:
        chunk = s.recv(length - len(payload))
        assert chunk, "connection closed inside a packet"
        payload += chunk
    return seq, payload


def test_mysql_handshake_packet_and_bad_handshake(make_broker):
    b = make_broker(EXAMPLES)
    handshakes = []
    for _ in range(2):
        with b.connect(3306) as s:
            s.settimeout(5)
            seq, p = read_packet(s)
            assert seq == 0 and p[0] == 10
            version, _, rest = p[1:].partition(b"\0")
            assert version == b"8.0.36"
            conn_id_, salt1, filler = struct.unpack_from("<I8sB", rest)
            caps_lo, charset, status, caps_hi, salt_len = struct.unpack_from("<HBHHB", rest, 13)
            caps = caps_hi << 16 | caps_lo
            reserved, salt2 = rest[21:31], rest[31:44]
            plugin = rest[44:]
            assert filler == 0 and reserved == bytes(10) and salt_len == 21
            for flag in (0x200, 0x8000, 0x80000):  # PROTOCOL_41, SECURE_CONNECTION, PLUGIN_AUTH
                assert caps & flag
            assert not caps & 0x800 and not caps & 0x20  # no SSL, no compression: the script can do neither
            assert charset == 255 and status == 2
            assert salt2[-1] == 0 and plugin == b"mysql_native_password\0"
            salt = salt1 + salt2[:-1]
            assert len(salt) == 20 and 0 not in salt and b"$" not in salt and max(salt) < 128
            handshakes.append((conn_id_, salt))
            # Not a handshake response: HTTP to the MySQL port.
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = read_all(s)
        # ERR 1043 (08S01) "Bad handshake", sequence 1, as the answer to the client's packet
        assert data == b"\x16\x00\x00\x01\xff\x13\x04#08S01Bad handshake"
    assert handshakes[0][1] != handshakes[1][1]  # a fresh scramble per connection


# --- 8080.lua: HTTP admin panel -------------------------------------------------------------------


def test_http_admin_login_and_manager(make_broker):
    b = make_broker(EXAMPLES)
    mark = b.mark()
    c = http.client.HTTPConnection(HOST, b.port(8080), timeout=10)
    try:
        c.request("GET", "/", headers={"User-Agent": "probe/1.0"})
        r = c.getresponse()
        page = r.read().decode()
        assert r.status == 200 and r.reason == ""  # Tomcat 8.5+ sends no reason phrase
        assert r.getheader("Server") is None
        assert re.fullmatch(r"JSESSIONID=[0-9A-F]{32}; Path=/; HttpOnly", r.getheader("Set-Cookie") or "")
        assert '<form method="post" action="/login">' in page
        assert 'name="username"' in page and 'name="password"' in page

        form = "username=admin&password=P%40ss+w0rd%21"
        c.request("POST", "/login", body=form, headers={"Content-Type": "application/x-www-form-urlencoded"})
        r = c.getresponse()
        assert r.status == 200 and b"Invalid username or password." in r.read()

        basic = base64.b64encode(b"tomcat:s3cret").decode()
        c.request("GET", "/manager/html", headers={"Authorization": f"Basic {basic}"})
        r = c.getresponse()
        body = r.read()
        assert r.status == 401
        assert r.getheader("WWW-Authenticate") == 'Basic realm="Tomcat Manager Application"'
        assert b"conf/tomcat-users.xml" in body

        c.request("GET", "/manager")
        r = c.getresponse()
        r.read()
        assert r.status == 302 and r.getheader("Location") == "/manager/html"

        c.request("GET", "/cgi-bin/luci")
        r = c.getresponse()
        assert r.status == 404 and "HTTP Status 404 \u2013 Not Found" in r.read().decode()
    finally:
        c.close()
    conn = conn_id(b, 8080, mark)
    b.wait_for(
        rf'{at(conn)}request" http\.host="{re.escape(HOST)}:\d+" http\.method="GET" http\.path="/" '
        rf'http\.user_agent="probe/1\.0" http\.version="HTTP/1\.1"'
    )
    b.wait_for(
        rf'WARN +{at(conn)}auth form attempt 1" http\.path="/login" password="P@ss w0rd!" user="admin"'
    )
    b.wait_for(
        rf'WARN +{at(conn)}auth Basic attempt 2" http\.path="/manager/html" password="s3cret" user="tomcat"'
    )
    b.wait_for(rf"{at(conn)}disconnect after 5 request\(s\), 2 login attempt\(s\)")


def test_http_admin_chunked_form_after_100_continue(make_broker):
    b = make_broker(EXAMPLES)
    mark = b.mark()
    with b.connect(8080) as s:
        s.sendall(
            b"POST /j_security_check HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        assert read_until(s, b"\r\n\r\n") == b"HTTP/1.1 100 \r\n\r\n"
        s.sendall(b"b\r\nj_username=\r\n1a;ext=1\r\nroot&j_password=hunter%202\r\n0\r\n\r\n")
        head, _, body = read_all(s).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 \r\n") and b"Connection: close" in head
    assert b"Invalid username or password." in body
    conn = conn_id(b, 8080, mark)
    b.wait_for(
        rf'WARN +{at(conn)}auth form attempt 1" http\.path="/j_security_check" '
        rf'password="hunter 2" user="root"'
    )
