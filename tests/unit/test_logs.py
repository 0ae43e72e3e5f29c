"""deadend.logs: escaping by Unicode category, the cut after escaping, quoting, and the log queue's shares."""

from __future__ import annotations

import io
import json
import threading
import time
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deadend.logs import CUT_MARKER, SCRIPT_LINE, EventLog, Where, sanitize, unquote, utc_timestamp
from deadend.tlsinfo import NO_TLS
from deadend.wire import LOG_MAX


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (b"plain", "plain"),
        (b"a\nb\r\x1b[31m", "a\\x0ab\\x0d\\x1b[31m"),
        (b"back\\slash", "back\\\\slash"),
        (b"\xff\xfe", "\\xff\\xfe"),
        ("rtl\u202eevil".encode(), "rtl\\u202eevil"),
        ("line\u2028sep".encode(), "line\\u2028sep"),
        ("caf\u00e9".encode(), "caf\u00e9"),
        (b"\xc2\x85next", "\\x85next"),
        # the ones a list missed: Arabic letter mark, soft hyphen, a tag character, the Hangul filler
        ("a\u061cb\u00adc".encode(), "a\\u061cb\\xadc"),
        ("tag\U000e0041".encode(), "tag\\U000e0041"),
        ("x\u3164y".encode(), "x\\u3164y"),
        ("no\u00a0break\u3000space".encode(), "no\\xa0break\\u3000space"),  # spaces other than " "
        ("private\ue000".encode(), "private\\ue000"),
        ("vs\ufe0f".encode(), "vs\\ufe0f"),
        ("中文 ok".encode(), "中文 ok"),
    ],
)
def test_sanitize(raw: bytes, shown: str) -> None:
    assert sanitize(raw) == shown


UNSAFE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"}


@given(st.binary(max_size=6000) | st.text(max_size=3000).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_input_is_bounded_and_shows_nothing_unsafe(raw: bytes) -> None:
    shown = sanitize(raw)
    body = shown.removesuffix(CUT_MARKER)
    assert len(body.encode("utf-8")) <= LOG_MAX  # cut after escaping: the bound holds whatever the input
    for c in body:
        assert c == " " or unicodedata.category(c) not in UNSAFE, repr(c)
    if len(raw) <= LOG_MAX // 10:  # short enough never to be cut, even if every byte is escaped
        assert not shown.endswith(CUT_MARKER)


def test_a_cut_never_splits_an_escape() -> None:
    for pad in range(8):
        shown = sanitize(b"a" * pad + b"\x1b" * 5000)
        body = shown.removesuffix(CUT_MARKER)
        assert shown.endswith(CUT_MARKER) and len(body) <= LOG_MAX
        assert body.lstrip("a").replace("\\x1b", "") == ""  # whole \x1b escapes only


def test_quoted_text_reads_back() -> None:
    text = 'say "hi" \\"x\\" \x00'
    shown = sanitize(text, quote=True)
    assert '"' not in shown.replace('\\"', "")  # every quote inside is escaped
    assert unquote(shown) == sanitize(text)  # less the quotes' escapes, it is the plain escaped text


def test_script_lines_are_quoted_in_text_and_plain_in_json() -> None:
    out = io.StringIO()
    log = EventLog(out)
    where = Where(25, "c0ffee000001", "192.0.2.9", 1234)
    assert log.script_line("warn", where, b'x" peer=6.6.6.6 session end reason=done', False)
    log.close()
    line = out.getvalue().rstrip("\n")
    found = SCRIPT_LINE.match(line)
    assert found, line
    assert line.endswith('script: "x\\" peer=6.6.6.6 session end reason=done"')
    out = io.StringIO()
    log = EventLog(out, fmt="json")
    log.script_line("info", where, b'x"', True)
    log.close()
    record = json.loads(out.getvalue())
    assert record["event"] == "script.log" and record["msg"] == 'x"' + CUT_MARKER
    assert "message" not in record  # the text is there once


class Blocked(io.TextIOBase):
    """A stdout nobody reads: writes wait until released."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.text: list[str] = []

    def write(self, s: str) -> int:
        self.go.wait(10)
        self.text.append(s)
        return len(s)


def test_one_session_cannot_push_out_the_others() -> None:
    stream = Blocked()
    log = EventLog(stream)  # type: ignore[arg-type]
    flood, quiet = Where(1, "aaaaaaaaaaaa", "192.0.2.1", 1), Where(1, "bbbbbbbbbbbb", "192.0.2.2", 2)
    line = b"z" * LOG_MAX
    kept = sum(log.script_line("info", flood, line, False) for _ in range(1000))
    assert kept * LOG_MAX <= EventLog.SESSION_SHARE  # its share, and no more
    assert log.script_line("info", quiet, b"still here", False)  # another session's line gets in
    log.emit(
        "info",
        quiet,
        "session.end",
        "session end",
        reason="done",
        duration=0.1,
        bytes_in=0,
        bytes_out=0,
        closed_by="peer",
        limit=None,
        **NO_TLS,
    )
    stream.go.set()
    log.close()
    text = "".join(stream.text)
    assert 'script: "still here"' in text and "session end" in text


def test_script_fields_in_text_and_json() -> None:
    """Fields are escaped like the message: in the text line `name="value"` pairs after the quoted text
    (no forged `peer=` or line), in JSON an object of the same values."""
    fields = ((b"password", b'x" peer=6.6.6.6\n2099 forged'), (b"tries", 3), (b"ok", False))
    named = tuple((k.decode(), v) for k, v in fields)
    for fmt in ("text", "json"):
        out = io.StringIO()
        log = EventLog(out, fmt=fmt)
        assert log.script_line("warn", Where(25, "c1", "192.0.2.1", 4000), b"login", False, named)
        log.flush()
        line = out.getvalue()
        assert line.count("\n") == 1
        if fmt == "text":
            found = SCRIPT_LINE.match(line.rstrip("\n"))
            assert found and unquote(found.group(2)) == "login"
            assert found.group(3) == ' password="x\\" peer=6.6.6.6\\x0a2099 forged" tries=3 ok=false'
        else:
            record = json.loads(line)
            assert record["fields"] == {
                "password": 'x" peer=6.6.6.6\\x0a2099 forged',
                "tries": 3,
                "ok": False,
            }
            assert record["msg"] == "login"


def test_a_field_value_is_cut_at_1_kib_with_the_marker() -> None:
    out = io.StringIO()
    log = EventLog(out, fmt="json")
    log.script_line("info", Where(25, "c1", "192.0.2.1", 4000), b"m", False, (("v", b"\x01" * 2000),))
    log.flush()
    value = json.loads(out.getvalue())["fields"]["v"]
    assert value.endswith(CUT_MARKER) and len(value.removesuffix(CUT_MARKER).encode()) <= 1024


@given(st.lists(st.floats(min_value=0, max_value=4e9, allow_nan=False), min_size=1, max_size=20))
def test_timestamps_are_the_same_with_the_cached_second(times: list[float]) -> None:
    # utc_timestamp keeps the last second's text: in any order of calls it says what strftime would.
    for now in times:
        seconds, ms = divmod(round(now * 1000), 1000)
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"
        assert utc_timestamp(now) == expected
