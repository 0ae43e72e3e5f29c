"""The transcript parser: every form, every error, and that hostile text only ever raises TranscriptError."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deadend.logs import first_hidden, sanitize
from deadend.transcript import (
    DEFAULT_PEER_IP,
    DEFAULT_TIMEOUT_MS,
    MAX_FILE_BYTES,
    MAX_MS,
    MAX_SEND_BYTES,
    Step,
    TranscriptError,
    load,
    parse,
    unescape,
)


def steps(text: str) -> list[tuple[str, bytes, int]]:
    return [(s.kind, s.data, s.repeat) for s in parse(text).steps]


def error(text: str) -> str:
    with pytest.raises(TranscriptError) as e:
        parse(text, "t.transcript")
    return str(e.value)


# --- every form ------------------------------------------------------------------------------------


def test_defaults() -> None:
    t = parse("")
    assert (t.peer_ip, t.timeout_ms, t.allow_clock, t.steps, t.logs) == ("192.0.2.10", 5000.0, False, [], [])
    assert (DEFAULT_PEER_IP, DEFAULT_TIMEOUT_MS) == ("192.0.2.10", 5000.0)


def test_options() -> None:
    t = parse("# c\n\n% allow-clock\n% peer-ip 2001:DB8::0:1\n% timeout 250.5\n> x\n")
    assert (t.allow_clock, t.peer_ip, t.timeout_ms) == (True, "2001:db8::1", 250.5)
    assert parse("% peer-ip ::ffff:198.51.100.7\n").peer_ip == "198.51.100.7"  # as get_ip() shows it
    assert parse("% seed 0 9223372036854775807\n").seed == (0, 2**63 - 1)  # the legal extremes
    assert parse("").seed is None  # a fresh seed each run


def test_client_forms() -> None:
    text = "> EHLO x\n>| \\x16\\x03\\s\n>* 3 NOOP\n>|* 4 ab\\n\n>| \n! shutdown\n! close\n"
    assert steps(text) == [
        ("send", b"EHLO x\r\n", 1),
        ("send", b"\x16\x03 ", 1),
        ("send", b"NOOP\r\n", 3),
        ("send", b"ab\n", 4),
        ("send", b"", 1),
        ("shutdown", b"", 1),
        ("close", b"", 1),
    ]


def test_server_forms() -> None:
    t = parse("< 220 hi\n<~ 2\\d\\d .*\n<| login:\\s\n<~| [a-z]+: \n<* 250 .*\n= eof\n~ log ^warn got\n")
    assert [s.kind for s in t.steps] == [
        "expect_line",
        "expect_match",
        "expect_bytes",
        "expect_prefix",
        "skip_until",
        "eof",
    ]
    assert t.steps[0].data == b"220 hi" and t.steps[2].data == b"login: "
    assert [s.pattern.pattern for s in t.steps if s.pattern] == [b"2\\d\\d .*", b"[a-z]+: ", b"250 .*"]
    pattern = t.steps[3].pattern
    assert pattern is not None and pattern.match(b"login: rest")
    assert t.logs[0].pattern.pattern == "^warn got" and t.logs[0].line == 7
    assert t.steps[1].source == "<~ 2\\d\\d .*" and t.steps[1].line == 2


def test_timing_applies_to_the_next_expectation_only() -> None:
    t = parse("> x\n@ within 100\n@ after 20.5\n< a\n< b\n@ within 0\n= eof\n")
    assert [(s.within_ms, s.after_ms) for s in t.steps] == [
        (None, None),
        (100, 20.5),
        (None, None),
        (0, None),
    ]


def test_escapes() -> None:
    assert unescape("a\\\\b\\t\\r\\n\\s\\x00\\xFF é") == b"a\\b\t\r\n \x00\xff \xc3\xa9"
    assert unescape("") == b""


def test_a_bom_and_crlf_line_ends_are_fine() -> None:
    assert steps("\ufeff> a\r\n< b\r\n") == [("send", b"a\r\n", 1), ("expect_line", b"b", 1)]


def test_tabs_and_plain_unicode_are_fine() -> None:
    assert steps("> a\tb ü 中\n") == [("send", "a\tb ü 中\r\n".encode(), 1)]


# --- every error, with its line and column ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("\n\n\n\n\n\n>| hello \\q\n", "t.transcript:7: column 10: unknown escape '\\q' (the escapes are"),
        ("< a\\", "t.transcript:1: column 4: a lone '\\' at the end of the text"),
        ("<| \\x4g", "t.transcript:1: column 4: '\\x' needs two hex digits, not '4g'"),
        ("> \\u00e9", "t.transcript:1: column 3: unknown escape '\\u'"),
        (">* 2 a\\z", "t.transcript:1: column 7: unknown escape '\\z'"),
        ("> \\é", "column 3: unknown escape '\\U+00E9'"),
    ],
)
def test_escape_errors_name_the_escape_and_its_column(text: str, message: str) -> None:
    assert message in error(text)


@pytest.mark.parametrize(
    ("char", "column"), [("\x1b", 5), ("\x07", 5), ("\r", 5), ("\x00", 5), ("\u202e", 5), ("\u200b", 5)]
)
@pytest.mark.parametrize("prefix", ["< a ", "# a ", "~ lo"])
def test_raw_invisible_characters_are_refused_anywhere(char: str, column: int, prefix: str) -> None:
    message = error(f"> ok\n{prefix}{char}x\n")
    assert message.startswith(f"t.transcript:2: column {column}: a raw U+{ord(char):04X} character")
    assert first_hidden(message) is None


def test_line_separators_do_not_split_lines_they_are_refused() -> None:
    for sep in ("\u2028", "\u2029", "\x1c", "\x0b", "\x0c", "\x85"):
        assert "t.transcript:1: column 4: a raw" in error(f"> a{sep}= eof\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("< x\n% allow-clock\n", "2: options must come before the first exchange"),
        ("% colour blue\n", "1: column 3: unknown option 'colour'"),
        ("% allow-clock yes\n", "1: column 15: '% allow-clock' takes no value"),
        ("% peer-ip 300.1.1.1\n", "1: column 11: '% peer-ip' needs an IP address without a scope id"),
        ("% peer-ip fe80::1%eth0\n", "'% peer-ip' needs an IP address without a scope id"),
        ("% peer-ip fe80::1%\x1b]0;x\x07\n", "a raw U+001B character"),
        ("% peer-ip\n", "'% peer-ip' needs an IP address"),
        ("% timeout nan\n", "'% timeout' needs a number of milliseconds such as 250 or 1.5, not 'nan'"),
        ("% timeout inf\n", "not 'inf'"),
        ("% timeout 1e400\n", "not '1e400'"),
        ("% timeout -5\n", "not '-5'"),
        ("% timeout 0\n", "'% timeout' must be more than 0 ms"),
        ("% timeout 99999999999999\n", "not '99999999999999'"),
        (f"% timeout {MAX_MS + 1:.0f}\n", f"is more than {MAX_MS:.0f} ms (30 days)"),
        ("% timeout ٣\n", "not '٣'"),  # a digit, but not an ASCII one
        ("% seed 1\n", "1: column 8: '% seed' needs two whole numbers in 0..9223372036854775807, not '1'"),
        ("% seed 1 -2\n", "'% seed' needs two whole numbers"),
        ("% seed 1 9223372036854775808\n", "'% seed' needs two whole numbers"),
        ("% seed 01 2\n", "'% seed' needs two whole numbers"),
        ("% seed 1  2\n", "'% seed' needs two whole numbers"),
        ("% seed 1 2 3\n", "'% seed' needs two whole numbers"),
        ("@ sometime 5\n< x\n", "1: column 3: expected '@ within MS' or '@ after MS'"),
        ("@ within NaN\n< x\n", "1: column 10: '@ within' needs a number of milliseconds"),
        ("@ after -1\n< x\n", "'@ after' needs a number of milliseconds"),
        ("@ within 1e9\n< x\n", "not '1e9'"),
        (f"@ after {MAX_MS * 2:.0f}\n< x\n", "is more than"),
        ("@ within 100\n@ after 200\n< x\n", "2: '@ after 200' is later than '@ within 100'"),
        ("@ after 200\n@ within 100\n< x\n", "2: '@ after 200' is later than '@ within 100'"),
        ("@ within 5\n> x\n", "2: '@' timing applies to an expectation, not to a client action"),
        ("< x\n@ within 5\n\n# end\n", "2: '@' timing with no expectation after it"),
        ("~ logs x\n", "1: column 3: expected '~ log REGEX'"),
        ("~ log (\n", "1: column 7: bad regex: missing ), unterminated subpattern"),
        ("<~ a(b\n", "1: column 5: bad regex: missing ), unterminated subpattern"),
        ("<* " + "(" * 2000 + ")" * 2000 + "\n", "bad regex"),
        ("<~| a{4294967296}\n", "bad regex: the repetition number is too large"),
        (">* 0 x\n", "1: column 4: '>* N TEXT' needs a count N of 1 or more, not '0'"),
        (">|* -1 x\n", "'>|* N TEXT' needs a count N of 1 or more, not '-1'"),
        (">* 1e3 x\n", "not '1e3'"),
        (">*\n", "needs a count N of 1 or more, not ''"),
        (
            ">|* 1000000000 xy\n",
            f"the client would send 2000000000 bytes in all; a transcript may send {MAX_SEND_BYTES}",
        ),
        (">|* 40000000 a\n>|* 40000000 b\n", "2: the client would send 80000000 bytes in all"),
        ("?? what\n", "1: column 1: cannot read '?? what': not a directive"),
        ("  > indented\n", "cannot read"),
        ("! reset\n", "cannot read '! reset'"),
        ("% tls yes\n", "1: column 7: '% tls' takes no value"),
        ("% sni www.example.com.\n", "'% sni' needs a DNS name such as www.example.com"),
        ("% sni 192.0.2.1:443\n", "'% sni' needs a DNS name"),
        ("% sni a_b.example\n", "'% sni' needs a DNS name"),
        ("% sni " + "a" * 64 + ".example\n", "'% sni' needs a DNS name"),
        ("% alpn\n", "'% alpn' needs protocol names separated by commas"),
        ("% alpn h2,,http/1.1\n", "not 'h2,,http/1.1'"),
        ("% alpn " + "x" * 256 + "\n", "'% alpn' needs protocol names"),
        ("% alpn h2 http/1.1\n", "'% alpn' needs protocol names"),
        ("< x\n% tls\n", "2: options must come before the first exchange"),
        ("@ within 5\n! starttls\n", "2: '@' timing applies to an expectation, not to a client action"),
        ("= end\n", "cannot read"),
    ],
)
def test_errors(text: str, message: str) -> None:
    assert message in error(text)


def test_tls_options_and_starttls() -> None:
    t = parse("% tls\n% sni mail.example.com\n% alpn h2,http/1.1\n< 220 hi\n! starttls\n")
    assert (t.tls, t.sni, t.alpn) == (True, "mail.example.com", ("h2", "http/1.1"))
    assert [s.kind for s in t.steps] == ["expect_line", "starttls"]
    assert parse("").tls is False and parse("").sni is None and parse("").alpn == ()
    assert parse("% sni " + ".".join(["a" * 63] * 3) + "\n").sni  # 191 characters: a name can be long


def test_error_text_escapes_the_path() -> None:
    with pytest.raises(TranscriptError) as e:
        parse("?? x\n", "evil\x1b[2J.transcript")
    assert str(e.value).startswith("evil\\x1b[2J.transcript:1: ")
    assert (e.value.line, e.value.column, e.value.path) == (1, 1, "evil\x1b[2J.transcript")


def test_the_send_cap_is_a_legal_extreme() -> None:
    t = parse(f">|* {MAX_SEND_BYTES} a\n")
    assert (t.steps[0].data, t.steps[0].repeat) == (b"a", MAX_SEND_BYTES)
    assert parse(f"@ within {MAX_MS:.0f}\n< a\n").steps[0].within_ms == MAX_MS


# --- load ------------------------------------------------------------------------------------------


def test_load_reports_bytes_that_are_not_utf8_with_their_place(tmp_path: Path) -> None:
    path = tmp_path / "t.transcript"
    path.write_bytes(b"> ok\n< ab\xff\n")
    with pytest.raises(TranscriptError, match=r"t\.transcript:2: column 5: byte 0xff is not UTF-8$"):
        load(path)


def test_load_refuses_what_is_not_a_small_regular_file(tmp_path: Path) -> None:
    big = tmp_path / "big.transcript"
    with open(big, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(TranscriptError, match=f"larger than {MAX_FILE_BYTES} bytes"):
        load(big)
    fifo = tmp_path / "fifo.transcript"
    os.mkfifo(fifo)
    with pytest.raises(TranscriptError, match=r"fifo\.transcript: not a regular file"):
        load(fifo)  # and does not wait for a writer
    with pytest.raises(OSError):
        load(tmp_path / "missing.transcript")


# --- hostile input: only TranscriptError -----------------------------------------------------------

HEADS = ["%", ">", ">|", ">*", ">|*", "<", "<~", "<|", "<~|", "<*", "@", "!", "=", "~", "#", ""]
WORDS = ["allow-clock", "peer-ip", "timeout", "within", "after", "log", "close", "shutdown", "eof", "1", "0"]


@st.composite
def transcript_lines(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        head = draw(st.sampled_from(HEADS))
        word = draw(st.sampled_from(WORDS) | st.text(max_size=6))
        tail = draw(st.text(max_size=20) | st.sampled_from(["\\", "\\x", "\\q", "(", "[", "1e400", "nan"]))
        lines.append(f"{head} {word} {tail}")
    return draw(st.sampled_from(["\n", "\r\n"])).join(lines)


@settings(max_examples=500, deadline=None)
@given(st.one_of(transcript_lines(), st.text(max_size=200)))
def test_the_parser_only_ever_raises_transcript_error(text: str) -> None:
    try:
        t = parse(text, "fuzz")
    except TranscriptError as e:
        assert first_hidden(str(e)) is None, str(e)  # the message is safe to print as it is
        return
    for step in t.steps:
        assert isinstance(step, Step) and first_hidden(step.source, allowed="\t") is None
        assert step.kind != "send" or len(step.data) * step.repeat <= MAX_SEND_BYTES


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_load_of_any_bytes_only_raises_transcript_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "t.transcript"
    path.write_bytes(data)
    with contextlib.suppress(TranscriptError):
        load(path)


@pytest.mark.parametrize(
    "c",
    [
        "\x1b",
        "\x00",
        "\x7f",
        "\x85",
        "\xa0",
        "\u200b",
        "\u2028",
        "\u202e",
        "\u2066",
        "\ufeff",
        "\u3000",
        "\U000e0041",
        "\ufe0f",
        "\u0378",
    ],
)
def test_raw_characters_a_terminal_would_not_show_are_refused(c: str) -> None:
    # One rule for what a terminal would not show (deadend.logs): the parser refuses what sanitize escapes.
    assert sanitize(c) != c
    with pytest.raises(TranscriptError, match=rf"raw U\+{ord(c):04X}") as caught:
        parse(f"> a{c}b\n", "t.transcript")
    assert caught.value.column == 4


def test_ordinary_text_and_tabs_are_taken() -> None:
    t = parse("> caf\u00e9 \u4e2d\u6587\tx \\\\ \u0410\n", "t.transcript")
    assert t.steps[0].data == "caf\u00e9 \u4e2d\u6587\tx \\ \u0410\r\n".encode()
