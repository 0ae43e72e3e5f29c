"""The script API of SPEC.md ("The functions", "The environment a script sees", "The end of a session").

Every test runs real scripts in the real broker and checks what the client sees on the socket and what the
broker writes to its log. Scripts report their findings back over the socket (`key=value` lines) or in
`deadend.log` lines.
"""

from __future__ import annotations

import datetime
import json
import re
import socket
import time

import pytest

from tests.conftest import read_all, read_until, script_text

# One line, so that line numbers in the scripts below it stay easy to predict (line 2 is the first).
PRELUDE = (
    "local function try(f, ...) local ok, e = pcall(f, ...) if ok then return 'ok' end "
    "return 'err:' .. tostring(e) end "
    "local function out(k, v) deadend.send(k .. '=' .. tostring(v) .. '\\n') end\n"
)

LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z (DEBUG|INFO|WARN|ERROR)\s+port=\S+ conn=\S+ peer=\S+ "
)


def script(body: str) -> str:
    return PRELUDE + body


def results(raw: bytes) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in raw.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition("=")
        found[key] = value
    return found


def run(b, port: int = 7, payload: bytes = b"", timeout: float = 5.0) -> bytes:
    """Connect, send `payload`, read until the broker closes the connection."""
    with b.connect(port) as s:
        if payload:
            s.sendall(payload)
        return read_all(s, timeout)


def conn_id(b, index: int = 0, timeout: float = 5.0) -> str:
    """The id of the index-th connection the broker logged (waiting for its connect line)."""
    deadline = time.monotonic() + timeout
    while True:
        ids = b.conn_ids()
        if len(ids) > index:
            return ids[index]
        assert time.monotonic() < deadline, "no connect line:\n" + "\n".join(b.lines[-20:])
        time.sleep(0.02)


def end_line(b, conn: str, timeout: float = 10.0) -> str:
    return b.wait_for(rf"conn={conn} .*session end reason=\S+.*", timeout).group(0)


def end_fields(b, conn: str) -> dict[str, str]:
    line = end_line(b, conn)
    return dict(re.findall(r"(\w+)=(\S+)", line.split("session end", 1)[1]))


def conn_lines(b, conn: str) -> list[str]:
    end_line(b, conn)  # every line of a session is written before its end line
    return [line for line in b.lines if f" conn={conn} " in line]


def script_lines(b, conn: str) -> list[str]:
    return [text for line in conn_lines(b, conn) if (text := script_text(line)) is not None]


def assert_arg_error(value: str, fname: str, argno: int = 1) -> None:
    assert value.startswith("err:"), f"expected an argument error from {fname}, got {value!r}"
    assert re.search(rf"bad argument #{argno} to '{fname}' \(.+\)", value), value


# --- send -------------------------------------------------------------------------------------------


def test_send_returns_true_and_empty_string_sends_nothing(make_broker):
    b = make_broker(
        {
            "7.lua": (
                "local a = deadend.send('ab')\n"
                "local e = deadend.send('')\n"
                "deadend.send(type(a) .. ':' .. tostring(a) .. ',' .. type(e) .. ':' .. tostring(e))\n"
            )
        }
    )
    assert run(b) == b"abboolean:true,boolean:true"
    fields = end_fields(b, conn_id(b))
    assert fields["reason"] == "done"
    assert fields["bytes_out"] == str(len(b"abboolean:true,boolean:true"))


def test_send_non_string_is_an_argument_error(make_broker):
    b = make_broker(
        {
            "7.lua": script(
                "out('number', try(deadend.send, 5))\n"
                "out('table', try(deadend.send, {}))\n"
                "out('nil', try(deadend.send, nil))\n"
                "out('none', try(deadend.send))\n"
                "out('bool', try(deadend.send, true))\n"
                "out('alive', 'yes')\n"
            )
        }
    )
    got = results(run(b))
    for key in ("number", "table", "nil", "none", "bool"):
        assert_arg_error(got[key], "send")
    assert got["alive"] == "yes"
    assert end_fields(b, conn_id(b))["reason"] == "done"


def test_send_size_cap_is_one_mib(make_broker):
    b = make_broker(
        {
            "7.lua": script(
                "out('over', try(deadend.send, string.rep('Q', 1048577)))\n"
                "local r = deadend.send(string.rep('y', 1048576))\n"
                "deadend.send('\\nexact=' .. tostring(r) .. '\\n')\n"
            )
        }
    )
    raw = run(b)
    first, _, rest = raw.partition(b"\n")
    assert_arg_error(first.decode().partition("=")[2], "send")
    assert rest.startswith(b"y" * 1048576)
    assert rest[1048576:] == b"\nexact=true\n"
    assert b"Q" not in raw


def test_send_returns_false_after_close(make_broker):
    b = make_broker(
        {
            "7.lua": (
                "deadend.send('before')\n"
                "deadend.close()\n"
                "local r = deadend.send('after')\n"
                "local e = deadend.send('')\n"
                "deadend.log('send-after-close=' .. tostring(r) .. ' empty=' .. tostring(e))\n"
            )
        }
    )
    assert run(b) == b"before"
    b.wait_for(r'script: "send-after-close=false empty=false"')


def test_send_returns_false_after_peer_disconnected(make_broker):
    b = make_broker(
        {
            "7.lua": (
                "deadend.send('hi')\n"
                "deadend.sleep(300)\n"
                "local trues = 0\n"
                "while deadend.send('x') do\n"
                "  trues = trues + 1\n"
                "  if trues >= 50 then break end\n"
                "  deadend.sleep(20)\n"
                "end\n"
                "deadend.log('trues=' .. trues)\n"
            )
        }
    )
    with b.connect(7) as s:
        assert read_until(s, b"hi") == b"hi"
    trues = int(b.wait_for(r'script: "trues=(\d+)"').group(1))
    assert trues <= 3, f"send kept returning true {trues} times after the peer left"
    assert end_fields(b, conn_id(b))["closed_by"] == "peer"


# --- recv -------------------------------------------------------------------------------------------


def test_recv_waits_and_returns_up_to_n_bytes(make_broker):
    b = make_broker(
        {
            "7.lua": (
                "deadend.send('ready')\n"
                "local a = deadend.recv(4)\n"
                "deadend.send('[' .. a .. ']')\n"
                "local c = deadend.recv(100)\n"
                "deadend.send('[' .. c .. ']')\n"
            )
        }
    )
    with b.connect(7) as s:
        assert read_until(s, b"ready") == b"ready"
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(100)  # recv() waits for data: nothing may come back yet
        s.sendall(b"abcdefgh")
        assert read_all(s) == b"[abcd][efgh]"


def test_recv_argument_errors_and_integer_rule(make_broker):
    b = make_broker(
        {
            "7.lua": script(
                "out('zero', try(deadend.recv, 0))\n"
                "out('big', try(deadend.recv, 65536))\n"
                "out('neg', try(deadend.recv, -1))\n"
                "out('frac', try(deadend.recv, 10.5))\n"
                "out('str', try(deadend.recv, '10'))\n"
                "out('nil', try(deadend.recv, nil))\n"
                "out('none', try(deadend.recv))\n"
                "out('table', try(deadend.recv, {}))\n"
                "out('go', 1)\n"
                "out('float', deadend.recv(10.0))\n"
                "out('max', deadend.recv(65535))\n"
                "out('one', deadend.recv(1))\n"
            )
        }
    )
    with b.connect(7) as s:
        got = results(read_until(s, b"go=1\n"))
        for key in ("zero", "big", "neg", "frac", "str", "nil", "none", "table"):
            assert_arg_error(got[key], "recv")
        s.sendall(b"0123456789abc")
        assert read_until(s, b"max=abc\n").endswith(b"float=0123456789\nmax=abc\n")
        s.sendall(b"YZ")
        assert read_all(s) == b"one=Y\n"


def test_recv_returns_nil_when_peer_disconnects(make_broker):
    b = make_broker({"7.lua": "local d = deadend.recv(10)\ndeadend.log('recv-eof=' .. tostring(d))\n"})
    s = b.connect(7)
    s.close()
    b.wait_for(r'script: "recv-eof=nil"$')
    assert end_fields(b, conn_id(b))["closed_by"] == "peer"


def test_recv_returns_nil_after_close(make_broker):
    b = make_broker(
        {
            "7.lua": (
                "deadend.send('x')\n"
                "deadend.close()\n"
                "local d = deadend.recv(10)\n"
                "deadend.log('recv-after-close=' .. tostring(d))\n"
            )
        }
    )
    with b.connect(7) as s:
        s.sendall(b"data waiting")
        assert read_all(s) == b"x"
    b.wait_for(r'script: "recv-after-close=nil"$')


# --- sleep ------------------------------------------------------------------------------------------


def test_sleep_pauses_the_script(make_broker):
    b = make_broker({"7.lua": "deadend.send('a')\ndeadend.sleep(400)\ndeadend.sleep(0)\ndeadend.send('b')\n"})
    with b.connect(7) as s:
        assert read_until(s, b"a") == b"a"
        t0 = time.monotonic()
        assert read_all(s) == b"b"
        elapsed = time.monotonic() - t0
    assert 0.35 <= elapsed < 3.0, elapsed
    assert end_fields(b, conn_id(b))["reason"] == "done"


def test_sleep_argument_errors(make_broker):
    b = make_broker(
        {
            "7.lua": script(
                "out('neg', try(deadend.sleep, -1))\n"
                "out('big', try(deadend.sleep, 3600001))\n"
                "out('frac', try(deadend.sleep, 1.5))\n"
                "out('str', try(deadend.sleep, '10'))\n"
                "out('nil', try(deadend.sleep, nil))\n"
                "out('none', try(deadend.sleep))\n"
                "out('zero', try(deadend.sleep, 0))\n"
                "out('float', try(deadend.sleep, 10.0))\n"
            )
        }
    )
    got = results(run(b))
    for key in ("neg", "big", "frac", "str", "nil", "none"):
        assert_arg_error(got[key], "sleep")
    assert got["zero"] == "ok"
    assert got["float"] == "ok"


def test_sleep_accepts_the_upper_bound(make_broker):
    b = make_broker({"7.lua": "deadend.send('go')\ndeadend.sleep(3600000)\ndeadend.log('woke')\n"})
    with b.connect(7) as s:
        assert read_until(s, b"go") == b"go"
        time.sleep(0.5)
        conn = conn_id(b)
        assert not [line for line in b.lines if f"conn={conn} " in line and "session end" in line]
        assert not [line for line in b.lines if "script-error" in line]
        b.stop()
    assert "reason=shutdown" in end_line(b, conn)


# --- get_ip -----------------------------------------------------------------------------------------


def test_get_ip_ipv4(make_broker):
    b = make_broker({"7.lua": "local ip = deadend.get_ip()\ndeadend.send(type(ip) .. ':' .. ip)\n"})
    assert run(b) == b"string:127.0.0.1"


def test_get_ip_works_after_peer_disconnected(make_broker):
    b = make_broker(
        {
            "7.lua": (
                "local d = deadend.recv(10)\n"
                "deadend.sleep(50)\n"
                "deadend.log('after-eof d=' .. tostring(d) .. ' ip=' .. deadend.get_ip())\n"
            )
        }
    )
    b.connect(7).close()
    b.wait_for(r'script: "after-eof d=nil ip=127\.0\.0\.1"$')
    assert end_fields(b, conn_id(b))["reason"] == "done"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_get_ip_ipv6_compressed(make_broker):
    if not _ipv6_loopback():
        pytest.skip("::1 is not available on this host")
    b = make_broker({"7.lua": "deadend.send(deadend.get_ip())\n"}, "--host", "::1")
    with socket.create_connection(("::1", b.port(7)), timeout=5) as s:
        assert read_all(s) == b"::1"
    b.wait_for(r"peer=::1 ")


# --- log --------------------------------------------------------------------------------------------


def test_log_levels_and_number_messages(make_broker):
    b = make_broker(
        {
            "7.lua": (
                "deadend.log('m-default')\n"
                "deadend.log('m-debug', 'debug')\n"
                "deadend.log('m-info', 'info')\n"
                "deadend.log('m-warn', 'warn')\n"
                "deadend.log('m-error', 'error')\n"
                "deadend.log(42)\n"
                "deadend.log(1.5, 'warn')\n"
                "deadend.log(10.0)\n"
                "deadend.send('ok')\n"
            )
        },
        "--log-level",
        "debug",
    )
    assert run(b) == b"ok"
    conn = conn_id(b)
    lines = conn_lines(b, conn)
    expected = [
        ("INFO", "m-default"),
        ("DEBUG", "m-debug"),
        ("INFO", "m-info"),
        ("WARN", "m-warn"),
        ("ERROR", "m-error"),
        ("INFO", "42"),
        ("WARN", "1.5"),
        ("INFO", "10.0"),
    ]
    port = b.port(7)
    for level, message in expected:
        rx = re.compile(
            rf"^\d{{4}}-\d\d-\d\dT\S+ {level}\s+port={port} conn={conn} peer=127\.0\.0\.1 "
            rf'script: "{re.escape(message)}"$'
        )
        assert [line for line in lines if rx.match(line)], f"no {level} line for {message!r}:\n" + "\n".join(
            lines
        )


def test_log_debug_hidden_at_default_level(make_broker):
    b = make_broker({"7.lua": "deadend.log('hidden-debug', 'debug')\ndeadend.log('shown-info')\n"})
    b.connect(7).close()
    conn = conn_id(b)
    assert script_lines(b, conn) == ["shown-info"]


def test_log_argument_errors(make_broker):
    b = make_broker(
        {
            "7.lua": script(
                "out('badlevel', try(deadend.log, 'm', 'fatal'))\n"
                "out('upper', try(deadend.log, 'm', 'INFO'))\n"
                "out('numlevel', try(deadend.log, 'm', 1))\n"
                "out('table', try(deadend.log, {}))\n"
                "out('bool', try(deadend.log, true))\n"
                "out('nil', try(deadend.log, nil))\n"
                "out('none', try(deadend.log))\n"
                "out('nillevel', try(deadend.log, 'fine', nil))\n"
            )
        }
    )
    got = results(run(b))
    for key in ("badlevel", "upper", "numlevel"):
        assert_arg_error(got[key], "log", 2)
    for key in ("table", "bool", "nil", "none"):
        assert_arg_error(got[key], "log", 1)
    assert got["nillevel"] == "ok"
    assert script_lines(b, conn_id(b)) == ["fine"]


def test_log_fields_argument_errors_are_raised_in_the_script(make_broker):
    b = make_broker(
        {
            "7.lua": script(
                "out('str', try(deadend.log, 'm', 'info', 'user=root'))\n"
                "out('upper', try(deadend.log, 'm', 'info', {User = 'x'}))\n"
                "out('digit', try(deadend.log, 'm', 'info', {['1a'] = 'x'}))\n"
                "out('dash', try(deadend.log, 'm', 'info', {['a-b'] = 'x'}))\n"
                "out('long', try(deadend.log, 'm', 'info', {[string.rep('k', 33)] = 'x'}))\n"
                "out('numkey', try(deadend.log, 'm', 'info', {'x'}))\n"
                "out('float', try(deadend.log, 'm', 'info', {n = 1.5}))\n"
                "out('table', try(deadend.log, 'm', 'info', {t = {}}))\n"
                "out('func', try(deadend.log, 'm', 'info', {f = print}))\n"
                "local many = {} for i = 1, 17 do many['k' .. i] = i end\n"
                "out('many', try(deadend.log, 'm', 'info', many))\n"
                "local lying = setmetatable({}, {__pairs = function() error('ran') end,\n"
                "  __index = function() return 1 end})\n"
                "out('meta', try(deadend.log, 'meta', 'info', lying))\n"
                "out('intfloat', try(deadend.log, 'intfloat', 'info', {n = 2.0}))\n"
                "out('nilfields', try(deadend.log, 'nilfields', 'info', nil))\n"
            )
        }
    )
    got = results(run(b))
    for key in ("str", "upper", "digit", "dash", "long", "numkey", "float", "table", "func", "many"):
        assert_arg_error(got[key], "log", 3)
    assert "field 'n': number has no integer representation" in got["float"]
    assert "field 't': string, integer or boolean expected, got table" in got["table"]
    assert "more than 16 fields" in got["many"]
    assert got["meta"] == got["intfloat"] == got["nilfields"] == "ok"  # raw: no metamethod runs
    lines = [line for line in conn_lines(b, conn_id(b)) if "script:" in line]
    assert [line.split("script: ", 1)[1] for line in lines] == ['"meta"', '"intfloat" n=2', '"nilfields"']


def test_log_fields_largest_legal_in_json(make_broker):
    """16 fields of 32-character names and values past 1 KiB, with a message past 4 KiB: every field
    arrives, strings cut at 1 KiB with the marker, integers at the edges of 64 bits, booleans."""
    b = make_broker(
        {
            "7.lua": (
                "local f = {}\n"
                "for i = 1, 13 do\n"
                "  f[string.format('k%02d', i) .. string.rep('_', 29)] = string.rep('v', 2000)\n"
                "end\n"
                "f.big, f.small, f.yes = math.maxinteger, math.mininteger, true\n"
                "deadend.log(string.rep('m', 5000), 'warn', f)\n"
            )
        },
        "--log-format",
        "json",
    )
    run(b)
    record = b.wait_for(r'^\{.*"event":"script\.log".*$').group(0)
    fields = json.loads(record)["fields"]
    assert len(fields) == 16
    assert fields["big"] == (1 << 63) - 1 and fields["small"] == -(1 << 63) and fields["yes"] is True
    long_values = [v for k, v in fields.items() if k.startswith("k")]
    assert len(long_values) == 13 and all(v == "v" * 1024 + "\u2026[cut]" for v in long_values)


def test_log_escapes_control_characters(make_broker):
    b = make_broker({"7.lua": "deadend.log('a\\nb\\27[31mc\\\\d')\ndeadend.log('next')\n"})
    b.connect(7).close()
    conn = conn_id(b)
    lines = conn_lines(b, conn)
    assert script_lines(b, conn) == ["a\\x0ab\\x1b[31mc\\\\d", "next"]
    assert all(LOG_LINE.match(line) for line in b.lines), "a log line was split or forged:\n" + "\n".join(
        lines
    )
    assert not any("\x1b" in line for line in b.lines)


def test_log_message_cut_at_4_kib_with_marker(make_broker):
    b = make_broker(
        {
            "7.lua": (
                "deadend.log(string.rep('z', 5000))\n"
                "deadend.log(string.rep('k', 4096))\n"
                "deadend.log(string.rep('w', 4097))\n"
            )
        }
    )
    b.connect(7).close()
    z, k, w = script_lines(b, conn_id(b))
    cut = re.fullmatch(r"(z+)([^z]+)", z)
    assert cut, f"a 5000-byte message must be cut and end with a marker: {z[-40:]!r}"
    assert 4000 <= len(cut.group(1)) <= 4096, len(cut.group(1))
    assert k == "k" * 4096, "a message of exactly 4 KiB must not be cut"
    cut = re.fullmatch(r"(w+)([^w]+)", w)
    assert cut and len(cut.group(1)) <= 4096, f"a 4097-byte message must be cut and marked: {w[-40:]!r}"


def test_log_rate_limit_drops_and_counts(make_broker):
    b = make_broker(
        {
            "7.lua": (
                "for i = 1, 50 do deadend.log('burst ' .. i) end\ndeadend.sleep(1200)\ndeadend.log('after')\n"
            )
        },
        "--log-rate",
        "1",
        "--log-burst",
        "5",
    )
    client = b.connect(7)  # kept open: a sleep ends at once once the peer has left
    conn = conn_id(b)
    lines = conn_lines(b, conn)
    client.close()
    shown = [line for line in lines if ' script: "burst ' in line]
    assert 5 <= len(shown) <= 7, lines
    reports = [line for line in lines if "drop" in line.lower() and " script: " not in line]
    assert len(reports) == 1, lines
    dropped = 50 - len(shown)
    assert str(dropped) in re.findall(r"\d+", reports[0].split(f"conn={conn} ", 1)[1]), reports[0]
    assert lines.index(reports[0]) > lines.index(shown[-1])
    assert any(line.endswith(' script: "after"') for line in lines)


def test_print_is_an_info_log_joined_by_tabs(make_broker):
    b = make_broker({"7.lua": "print('a', 1, nil, true, 2.0)\nprint('solo')\n"})
    b.connect(7).close()
    conn = conn_id(b)
    lines = conn_lines(b, conn)
    assert script_lines(b, conn) == ["a\\x091\\x09nil\\x09true\\x092.0", "solo"]
    assert [line for line in lines if re.search(r'\bINFO\s+port=\S+ .* script: "solo"$', line)]
    # print never writes to stdout directly: every stdout line is a log line
    assert all(LOG_LINE.match(line) for line in b.lines), b.lines


# --- set_tarpit -------------------------------------------------------------------------------------


def _round_trips(s: socket.socket, count: int) -> list[float]:
    times = []
    for i in range(count):
        msg = bytes([ord("a") + i])
        t0 = time.monotonic()
        s.sendall(msg)
        assert read_until(s, msg, timeout=5) == msg
        times.append(time.monotonic() - t0)
    return times


ECHO = "local function echo() local d = deadend.recv(100) if d then deadend.send(d) end end\n"


def test_set_tarpit_delays_each_recv_and_turns_off(make_broker):
    b = make_broker(
        {
            "7.lua": ECHO + "echo()\n"
            "deadend.set_tarpit(300, 0)\n"
            "echo() echo()\n"
            "deadend.set_tarpit(200)\n"
            "echo()\n"
            "deadend.set_tarpit(0, 0)\n"
            "echo()\n"
        }
    )
    with b.connect(7) as s:
        plain, t1, t2, t3, off = _round_trips(s, 5)
    assert plain < 0.2, plain
    assert 0.28 <= t1 < 1.5 and 0.28 <= t2 < 1.5, (t1, t2)
    assert 0.18 <= t3 < 1.0, t3  # calling again replaces the setting; jitter defaults to 0
    assert off < 0.2, off


def test_set_tarpit_jitter(make_broker):
    b = make_broker({"7.lua": ECHO + "deadend.set_tarpit(50, 300)\nfor i = 1, 6 do echo() end\n"})
    with b.connect(7) as s:
        times = _round_trips(s, 6)
    assert all(0.045 <= t < 1.2 for t in times), times
    assert max(times) - min(times) > 0.02, f"no jitter: {times}"


def test_set_tarpit_argument_errors(make_broker):
    b = make_broker(
        {
            "7.lua": script(
                "out('big', try(deadend.set_tarpit, 60001))\n"
                "out('neg', try(deadend.set_tarpit, -1))\n"
                "out('frac', try(deadend.set_tarpit, 1.5))\n"
                "out('str', try(deadend.set_tarpit, '10'))\n"
                "out('none', try(deadend.set_tarpit))\n"
                "out('jbig', try(deadend.set_tarpit, 0, 60001))\n"
                "out('jneg', try(deadend.set_tarpit, 0, -1))\n"
                "out('jfrac', try(deadend.set_tarpit, 0, 0.5))\n"
                "out('max', try(deadend.set_tarpit, 60000, 60000))\n"
                "out('float', try(deadend.set_tarpit, 10.0, 2.0))\n"
                "out('off', try(deadend.set_tarpit, 0, 0))\n"
            )
        }
    )
    got = results(run(b))
    for key in ("big", "neg", "frac", "str", "none"):
        assert_arg_error(got[key], "set_tarpit", 1)
    for key in ("jbig", "jneg", "jfrac"):
        assert_arg_error(got[key], "set_tarpit", 2)
    assert (got["max"], got["float"], got["off"]) == ("ok", "ok", "ok")


# --- set_limits -------------------------------------------------------------------------------------


def test_set_limits_recv_calls(make_broker):
    b = make_broker(
        {
            "7.lua": (
                "deadend.set_limits(2)\n"
                "for i = 1, 3 do\n"
                "  local d = deadend.recv(100)\n"
                "  deadend.log('r' .. i .. '=' .. tostring(d))\n"
                "  if d then deadend.send('ok' .. i) end\n"
                "end\n"
                "deadend.log('send-after-limit=' .. tostring(deadend.send('x')))\n"
            )
        }
    )
    with b.connect(7) as s:
        s.sendall(b"a")
        assert read_until(s, b"ok1") == b"ok1"
        s.sendall(b"b")
        assert read_until(s, b"ok2") == b"ok2"
        s.sendall(b"c")
        assert read_all(s) == b"", "the socket must be closed after the limit"
    conn = conn_id(b)
    assert script_lines(b, conn) == ["r1=a", "r2=b", "r3=nil", "send-after-limit=false"]
    fields = end_fields(b, conn)
    assert fields["closed_by"] == "limit"
    assert fields["bytes_in"] == "2"


def test_set_limits_recv_bytes(make_broker):
    b = make_broker(
        {
            "7.lua": (
                "deadend.set_limits(0, 10)\n"
                "for i = 1, 4 do\n"
                "  local d = deadend.recv(100)\n"
                "  deadend.log('r' .. i .. '=' .. tostring(d))\n"
                "  if not d then break end\n"
                "  deadend.send('ok' .. i)\n"
                "end\n"
            )
        }
    )
    with b.connect(7) as s:
        s.sendall(b"12345")
        assert read_until(s, b"ok1") == b"ok1"
        s.sendall(b"67890")  # total 10: exactly the limit, still allowed
        assert read_until(s, b"ok2") == b"ok2"
        s.sendall(b"X")  # would take the total past 10
        assert read_all(s) == b""
    conn = conn_id(b)
    assert script_lines(b, conn) == ["r1=12345", "r2=67890", "r3=nil"]
    fields = end_fields(b, conn)
    assert fields["closed_by"] == "limit"
    assert fields["bytes_in"] == "10"


def test_set_limits_counts_from_connection_start(make_broker):
    b = make_broker(
        {
            "7.lua": (
                "local a = deadend.recv(100)\n"
                "deadend.send('got')\n"
                "deadend.set_limits(1)\n"
                "local c = deadend.recv(100)\n"
                "deadend.log('second=' .. tostring(c))\n"
            ),
            "8.lua": (
                "local a = deadend.recv(100)\n"
                "deadend.send('got')\n"
                "deadend.set_limits(0, 8)\n"
                "local c = deadend.recv(100)\n"
                "deadend.log('second=' .. tostring(c))\n"
            ),
        }
    )
    for port in (7, 8):
        with b.connect(port) as s:
            s.sendall(b"hello")
            assert read_until(s, b"got") == b"got"
            s.sendall(b"world")
            assert read_all(s) == b""
    for index in (0, 1):
        conn = conn_id(b, index)
        assert script_lines(b, conn) == ["second=nil"]
        assert end_fields(b, conn)["closed_by"] == "limit"


def test_set_limits_zero_disables_and_replaces(make_broker):
    b = make_broker(
        {
            "7.lua": ECHO + "deadend.set_limits(1, 1)\n"
            "deadend.set_limits(0, 0)\n"
            "for i = 1, 3 do echo() end\n"
            "deadend.set_limits(5)\n"  # replaces: 3 recvs so far, so 2 more return data
            "echo() echo()\n"
            "deadend.log('third=' .. tostring(deadend.recv(10)))\n"
        }
    )
    with b.connect(7) as s:
        _round_trips(s, 5)
        s.sendall(b"z")
        assert read_all(s) == b""
    conn = conn_id(b)
    assert script_lines(b, conn) == ["third=nil"]
    assert end_fields(b, conn)["closed_by"] == "limit"


def test_set_limits_argument_errors(make_broker):
    b = make_broker(
        {
            "7.lua": script(
                "out('neg', try(deadend.set_limits, -1))\n"
                "out('frac', try(deadend.set_limits, 1.5))\n"
                "out('str', try(deadend.set_limits, '1'))\n"
                "out('none', try(deadend.set_limits))\n"
                "out('bneg', try(deadend.set_limits, 0, -1))\n"
                "out('bfrac', try(deadend.set_limits, 0, 2.5))\n"
                "out('float', try(deadend.set_limits, 1.0, 2.0))\n"
                "out('huge', try(deadend.set_limits, math.maxinteger, 2^53))\n"
                "out('off', try(deadend.set_limits, 0, 0))\n"
            )
        }
    )
    got = results(run(b))
    for key in ("neg", "frac", "str", "none"):
        assert_arg_error(got[key], "set_limits", 1)
    for key in ("bneg", "bfrac"):
        assert_arg_error(got[key], "set_limits", 2)
    assert (got["float"], got["huge"], got["off"]) == ("ok", "ok", "ok")


# --- close ------------------------------------------------------------------------------------------


def test_close_is_idempotent_and_other_calls_keep_working(make_broker):
    b = make_broker(
        {
            "7.lua": (
                "deadend.send('bye')\n"
                "deadend.close()\n"
                "deadend.close()\n"
                "local s = deadend.send('x')\n"
                "local r = deadend.recv(10)\n"
                "deadend.sleep(20)\n"
                "deadend.close()\n"
                "deadend.log('after-close send=' .. tostring(s) .. ' recv=' .. tostring(r) .. "
                "' ip=' .. deadend.get_ip())\n"
            )
        }
    )
    with b.connect(7) as s:
        assert read_all(s) == b"bye"
    conn = conn_id(b)
    assert script_lines(b, conn) == ["after-close send=false recv=nil ip=127.0.0.1"]
    fields = end_fields(b, conn)
    assert (fields["reason"], fields["closed_by"], fields["bytes_out"]) == ("done", "script", "3")


def test_close_flushes_everything_sent_before(make_broker):
    size = 200_000
    b = make_broker(
        {
            "7.lua": (
                "deadend.send(string.rep('0123456789', 10000))\n"
                "deadend.send(string.rep('abcdefghij', 10000))\n"
                "deadend.close()\n"
                "deadend.sleep(300)\n"
            )
        }
    )
    with b.connect(7) as s:
        time.sleep(0.3)  # let the broker's side fill the socket buffers before we read
        data = read_all(s)
    assert len(data) == size
    assert data == b"0123456789" * 10000 + b"abcdefghij" * 10000
    fields = end_fields(b, conn_id(b))
    assert fields["closed_by"] == "script"
    assert fields["bytes_out"] == str(size)


# --- the end of a session ---------------------------------------------------------------------------


def test_session_end_done_counts_bytes(make_broker):
    b = make_broker({"7.lua": "local d = deadend.recv(100)\ndeadend.send('hello' .. d)\n"})
    assert run(b, payload=b"abc") == b"helloabc"
    fields = end_fields(b, conn_id(b))
    assert fields["reason"] == "done"
    assert (fields["bytes_in"], fields["bytes_out"]) == ("3", "8")
    assert re.fullmatch(r"\d+(\.\d+)?s", fields["duration"])


def test_uncaught_error_ends_with_script_error(make_broker):
    b = make_broker({"7.lua": "error('boom')\n"})
    assert run(b) == b""
    conn = conn_id(b)
    b.wait_for(rf"^\S+ ERROR\s+port={b.port(7)} conn={conn} peer=127\.0\.0\.1 script-error: 7\.lua:1: boom$")
    assert end_fields(b, conn)["reason"] == "script-error"


@pytest.mark.parametrize(
    "call",
    ["send({})", "recv(0)", "sleep(-1)", "log({})", "log('m', 'loud')", "set_tarpit(-1)", "set_limits(-1)"],
)
def test_uncaught_argument_error_is_logged_with_the_script_line(make_broker, call):
    """An argument error is an ordinary Lua error: it names the script's line, like luaL_argerror does."""
    fname = call.split("(")[0]
    b = make_broker({"7.lua": f"deadend.send('x')\n\ndeadend.{call}\ndeadend.send('unreached')\n"})
    assert run(b) == b"x"
    conn = conn_id(b)
    line = b.wait_for(rf"ERROR\s+port=\S+ conn={conn} .*script-error: .*").group(0)
    assert re.search(rf"script-error: 7\.lua:3: bad argument #\d to '{fname}' \(.+\)$", line), line
    assert end_fields(b, conn)["reason"] == "script-error"


def test_pcall_caught_errors_do_not_end_the_script(make_broker):
    b = make_broker(
        {
            "7.lua": (
                "local ok, e = pcall(error, 'caught')\n"
                "local ok2, e2 = pcall(deadend.recv, 0)\n"
                "local ok3, e3 = pcall(function() local t = nil; return t.x end)\n"
                "deadend.send(tostring(ok) .. ' ' .. e .. '|' .. tostring(ok2) .. '|' .. tostring(ok3))\n"
            )
        }
    )
    assert run(b) == b"false caught|false|false"
    conn = conn_id(b)
    assert end_fields(b, conn)["reason"] == "done"
    assert not [line for line in conn_lines(b, conn) if " ERROR " in line]


# --- the environment a script sees ------------------------------------------------------------------

BASE_FUNCTIONS = [
    "assert",
    "error",
    "getmetatable",
    "ipairs",
    "next",
    "pairs",
    "pcall",
    "rawequal",
    "rawget",
    "rawlen",
    "rawset",
    "select",
    "setmetatable",
    "tonumber",
    "tostring",
    "type",
    "xpcall",
    "print",
]
LIBRARIES = ["string", "table", "math", "utf8", "deadend", "std"]
UNAVAILABLE = [
    "io",
    "os",
    "package",
    "debug",
    "coroutine",
    "require",
    "dofile",
    "loadfile",
    "load",
    "collectgarbage",
]
API = ["send", "recv", "sleep", "get_ip", "log", "set_tarpit", "set_limits", "close", "starttls", "tls_info"]


def _lua_list(names: list[str]) -> str:
    return "{" + ", ".join(f"'{n}'" for n in names) + "}"


def test_environment_base_functions_and_libraries(make_broker):
    b = make_broker(
        {
            "7.lua": script(
                f"for _, n in ipairs({_lua_list(BASE_FUNCTIONS)}) do out(n, type(_G[n])) end\n"
                f"for _, n in ipairs({_lua_list(LIBRARIES)}) do out(n, type(_G[n])) end\n"
                f"for _, n in ipairs({_lua_list(API)}) do out('deadend.' .. n, type(deadend[n])) end\n"
                "out('_VERSION', _VERSION)\n"
                "out('_G', type(_G) == 'table' and _G._G == _G and _G.deadend == deadend)\n"
                "out('string.format', type(string.format))\n"
                "out('table.concat', type(table.concat))\n"
                "out('math.floor', type(math.floor))\n"
                "out('utf8.char', utf8.char(72, 228))\n"
                "out('method', ('abc'):upper())\n"
            )
        }
    )
    got = results(run(b))
    for name in BASE_FUNCTIONS:
        assert got.get(name) == "function", name
    for name in LIBRARIES:
        assert got.get(name) == "table", name
    for name in API:
        assert got.get(f"deadend.{name}") == "function", name
    assert got["_VERSION"] == "Lua 5.4"
    assert got["_G"] == "true"
    assert got["string.format"] == got["table.concat"] == got["math.floor"] == "function"
    assert got["utf8.char"] == "Hä"
    assert got["method"] == "ABC"


def test_environment_unavailable_names(make_broker):
    b = make_broker(
        {
            "7.lua": script(
                "local env = _ENV\n"
                f"for _, n in ipairs({_lua_list(UNAVAILABLE)}) do\n"
                "  out(n, type(env[n]) .. ',' .. type(_G[n]) .. ',' .. type(rawget(_G, n)))\n"
                "end\n"
                "out('string.dump', type(string.dump))\n"
                "out('(\"\").dump', type(('').dump))\n"
                "out('_G.string.dump', type(_G.string.dump))\n"
                "out('os-global', type(os))\n"
            )
        }
    )
    got = results(run(b))
    for name in UNAVAILABLE:
        assert got.get(name) == "nil,nil,nil", f"{name}: {got.get(name)}"
    assert got["string.dump"] == "nil"
    assert got['("").dump'] == "nil"
    assert got["_G.string.dump"] == "nil"
    assert got["os-global"] == "nil"


def test_environment_globals_are_exactly_the_listed_ones(make_broker):
    b = make_broker(
        {
            "7.lua": (
                "local names = {}\n"
                "for k in pairs(_G) do names[#names + 1] = tostring(k) end\n"
                "table.sort(names)\n"
                "deadend.send(table.concat(names, ' '))\n"
            )
        }
    )
    names = set(run(b).decode().split())
    expected = set(BASE_FUNCTIONS) | set(LIBRARIES) | {"_VERSION", "_G"}
    assert names == expected, f"extra: {names - expected}, missing: {expected - names}"


def test_clock_option_gives_read_only_os(make_broker):
    body = script(
        "local keys = {}\n"
        "for k in pairs(os) do keys[#keys + 1] = k end\n"
        "table.sort(keys)\n"
        "out('keys', table.concat(keys, ','))\n"
        "out('year', os.date('!%Y'))\n"
        "out('time', math.type(os.time()) .. ':' .. os.time())\n"
        "out('clock', type(os.clock()))\n"
        "out('difftime', os.difftime(10, 4))\n"
        "out('badformat', try(os.date, '%Q'))\n"
        "out('alive', 'yes')\n"
    )
    b = make_broker({"7.lua": body}, "--allow-clock")
    got = results(run(b))
    assert got["keys"] == "clock,date,difftime,time"
    assert got["year"] == str(datetime.datetime.now(datetime.UTC).year)
    kind, _, value = got["time"].partition(":")
    assert kind == "integer" and abs(int(value) - time.time()) < 10
    assert got["clock"] == "number"
    assert float(got["difftime"]) == 6.0
    assert got["badformat"].startswith("err:"), got["badformat"]
    assert got["alive"] == "yes"
    assert end_fields(b, conn_id(b))["reason"] == "done"


def test_string_metatable_is_not_handed_out(make_broker):
    b = make_broker(
        {"7.lua": script("out('type', type(getmetatable('')))\nout('value', tostring(getmetatable('')))\n")}
    )
    got = results(run(b))
    assert got["type"] != "table"
    assert got["value"] == "false"


def test_setmetatable_refuses_gc(make_broker):
    b = make_broker(
        {
            "7.lua": script(
                "out('gc', try(setmetatable, {}, {__gc = function() end}))\n"
                "local t = setmetatable({}, {__index = function() return 'meta' end})\n"
                "out('plain', t.anything)\n"
            )
        }
    )
    got = results(run(b))
    assert got["gc"].startswith("err:") and "__gc" in got["gc"], got["gc"]
    assert got["plain"] == "meta"


def test_string_rep_and_table_move_refuse_huge_sizes(make_broker):
    b = make_broker(
        {
            "7.lua": script(
                "out('rep', try(string.rep, 'x', 1 << 40))\n"
                "out('method', try(function() return ('x'):rep(1 << 40) end))\n"
                "out('emptyrep', try(string.rep, '', 1 << 50))\n"
                "out('move', try(table.move, {}, 1, 1 << 40, 2))\n"
                "out('small', #string.rep('ab', 3) .. ',' .. #table.move({1, 2, 3}, 1, 3, 1, {}))\n"
            )
        }
    )
    got = results(run(b))
    for key, what in (("rep", "rep"), ("method", "rep"), ("emptyrep", "rep"), ("move", "move")):
        assert got[key].startswith("err:") and what in got[key], f"{key}: {got[key]}"
    assert got["small"] == "6,3"


def test_math_random_is_seeded_per_connection(make_broker):
    b = make_broker({"7.lua": "deadend.send(math.random(0, 0x7fffffffffff) .. ',' .. math.random())\n"})
    first, second = run(b), run(b)
    assert first and second
    assert first != second
