"""The scripts' standard library (sandbox/std.lua), run in this process's own Lua state with the real
bootstrap (no sandbox process): the reader against every way input can be split, quote against the log's
own escaping (property-based), the JSON encoder against Python's decoder, base64 and the pacer."""

from __future__ import annotations

import base64
import json
import unicodedata
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deadend import wire
from deadend.logs import sanitize
from sandbox import worker as child


class Script:
    """One script in a fresh Lua state; `recv` takes from `inputs`, every other call is recorded."""

    def __init__(self, source: str, inputs: Sequence[bytes] = (), instructions: int = 10_000_000) -> None:
        self._lua, start = child.new_runtime()  # the runtime must outlive the script
        result = child._as_tuple(start(source.encode(), b"s.lua", b"run", 1, 2, instructions, False))
        assert result[0] == b"ready", result
        self.step = result[1]
        self.inputs = list(inputs)
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.out = child.resume(self.step)

    def run(self) -> Script:
        while self.out[0] == b"call":
            op, args = self.out[1].decode(), self.out[2:]
            self.calls.append((op, args))
            reply: Any = None
            if op == "recv":
                reply = self.inputs.pop(0) if self.inputs else None
            elif op == "send":
                reply = True
            elif op == "sleep":
                reply = args[0]
            self.out = child.resume(self.step, reply)
        return self

    @property
    def end(self) -> str:
        return self.out[0].decode()

    @property
    def error(self) -> str:
        return self.out[1].decode() if len(self.out) > 1 else ""

    @property
    def printed(self) -> list[str]:
        return [args[0].decode("utf-8", "surrogateescape") for op, args in self.calls if op == "log"]

    @property
    def sent(self) -> list[bytes]:
        return [args[0] for op, args in self.calls if op == "send"]


def printed(source: str, *inputs: bytes) -> list[str]:
    script = Script(source, inputs).run()
    assert script.end == "return", script.error
    return script.printed


# --- the reader -----------------------------------------------------------------------------------------

READ_ALL_LINES = """
local r = std.reader()
while true do
  local line, why = r:line(MAX)
  print(tostring(line) .. "|" .. tostring(why))
  if why == "closed" then break end
end
"""


def lines_of(data: bytes, max_: int) -> Iterator[str]:
    """What the reader must hand out for `data`, whatever the reads: the reference, in Python."""
    rest = data
    while True:
        line, lf, rest = rest.partition(b"\n")
        if not lf:
            if len(line) > max_ + 1:  # held longer than any line: dropped, through its LF, which never came
                yield "nil|too-long"
            yield "nil|closed"
            return
        line = line.removesuffix(b"\r")
        yield "nil|too-long" if len(line) > max_ else f"{line.decode('latin-1')}|nil"


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    return [p for p in pieces if p]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from([b"a", b"bc", b"\r", b"\n", b"\r\n", b"xyz" * 5]), max_size=30).map(b"".join),
    st.lists(st.integers(0, 200), max_size=8),
    st.integers(0, 12),
)
def test_lines_are_the_same_however_the_input_is_split(data: bytes, cuts: list[int], max_: int) -> None:
    got = printed(READ_ALL_LINES.replace("MAX", str(max_)), *splits(data, cuts))
    assert got == [s.encode("latin-1").decode("utf-8", "surrogateescape") for s in lines_of(data, max_)]


def test_line_ends_and_limits() -> None:
    assert printed(READ_ALL_LINES.replace("MAX", "5"), b"one\r\ntwo\nthree", b"\r\nfive!\r\nsix", b"\n") == [
        "one|nil",
        "two|nil",
        "three|nil",
        "five!|nil",
        "six|nil",
        "nil|closed",
    ]


def test_a_long_line_is_dropped_through_its_end_however_long() -> None:
    # 10,000 bytes of one line arrive in reads of 1,000; the reader holds at most a line plus a read
    source = """
local r = std.reader()
print(r:line(8))
print(r:buffered() <= 9 + 1000)
print(r:line(8))
"""
    chunks = [b"x" * 1000] * 10 + [b"\nnext\n"]
    assert printed(source, *chunks) == ["nil\ttoo-long", "true", "next"]


def test_pieces_hand_out_a_long_line_in_parts() -> None:
    source = """
local r = std.reader()
while true do
  local text, whole = r:piece(4)
  print(tostring(text) .. "|" .. tostring(whole))
  if text == nil then break end
end
"""
    assert printed(source, b"abcdefghij\r\nxy\n", b"12") == [
        "abcd|false",
        "efgh|false",
        "ij|true",
        "xy|true",
        "nil|closed",
    ]


def test_upto_finds_a_delimiter_split_between_reads() -> None:
    source = """
local r = std.reader()
print(r:upto("\\r\\n\\r\\n", 100))
print(r:upto("--", 3))
print(r:upto("--", 3))
print(r:upto("--"))
"""
    got = printed(source, b"GET / HTTP/1.1\r\nHost: x\r", b"\n\r", b"\nabcdef-", b"-ok--tail")
    assert got == ["GET / HTTP/1.1\r\nHost: x", "nil\ttoo-long", "ok", "nil\tclosed"]


def test_exactly_some_and_buffered() -> None:
    source = """
local r = std.reader(10)
print(r:exactly(3), r:buffered())
print(r:exactly(0) == "")
print(r:some(2))
print(r:some())
print(r:exactly(5))
print(r:exactly(1))
"""
    script = Script(source, [b"abcdef", b"gh", b"ijklm", b"no"]).run()
    assert script.printed == ["abc\t3", "true", "de", "f", "ghijk", "l"]
    assert {args[0] for op, args in script.calls if op == "recv"} == {10}  # the read size it was given


def test_peek_reads_without_consuming() -> None:
    source = """
local r = std.reader()
print(r:peek(), r:peek(4), r:line())
print(r:peek(10))
print(r:some())
print(r:peek(), r:line())
"""
    # one read when nothing is held, never more: peek(4) shows the one byte the first read brought
    assert printed(source, b"*", b"3\r\nab", b"c") == ["*\t*\t*3", "ab", "ab", "c\tnil\tclosed"]


def test_drop_forgets_what_is_held() -> None:
    source = """
local r = std.reader()
print(r:line())
print(r:drop(), r:buffered(), r:drop() == "")
print(r:line())
"""
    assert printed(source, b"STARTTLS\r\nRSET\r\nNOOP", b"EHLO x\r\n") == [
        "STARTTLS",
        "RSET\r\nNOOP\t0\ttrue",
        "EHLO x",
    ]


def test_a_source_function_replaces_recv() -> None:
    # a Telnet-like filter: reads may yield nothing of the user's text, and the reader asks again
    source = """
local r = std.reader(function()
  local data = deadend.recv(100)
  return data and data:gsub("\\255..", "")
end)
print(r:line())
print(r:line())
"""
    assert printed(source, b"\xff\xfb\x01", b"ro\xff\xfd\x03ot\r\n") == ["root", "nil\tclosed"]


def test_the_reader_passes_nil_on_each_time() -> None:
    # each call after the end asks recv again (the broker's --linger-calls bounds a script that ignores it)
    script = Script("local r = std.reader() for i = 1, 3 do r:line() end").run()
    assert [op for op, _ in script.calls] == ["recv"] * 3


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("std.reader({})", "bad argument #1 to 'reader' (nil, a read size or a function expected, got"),
        ("std.reader(0)", "bad argument #1 to 'reader' (out of range: must be 1..65535)"),
        ("std.reader():line(-1)", "bad argument #1 to 'line' (out of range: must be >= 0)"),
        ("std.reader():line('5')", "bad argument #1 to 'line' (number expected, got string)"),
        ("std.reader():upto('')", "bad argument #1 to 'upto' (the delimiter is empty)"),
        ("std.reader():exactly(1.5)", "bad argument #1 to 'exactly' (number has no integer representation)"),
        ("std.reader(function() return 5 end):line()", "std.reader: the source returned a number"),
        ("std.quote({})", "bad argument #1 to 'quote' (string expected, got table)"),
        ("std.json.encode({[true] = 1})", "std.json.encode: an object key is a boolean (keys must be"),
        ("std.json.encode(print)", "std.json.encode: a function has no JSON form"),
        ("std.json.encode(0/0)", "is not a JSON number"),
        ("std.json.object('a')", "bad argument #1 to 'object' (a key without its value)"),
        ("std.json.object(1, 2)", "bad argument #1 to 'object' (key expected to be a string, got number)"),
        ("std.pacer(-1)", "bad argument #1 to 'pacer' (out of range: must be 0..60000)"),
        ("std.base64.decode(nil)", "bad argument #1 to 'decode' (string expected, got no value)"),
    ],
)
def test_errors_say_what_and_name_the_script_line(call: str, message: str) -> None:
    script = Script(f"\n{call}").run()
    assert script.end == "error"
    assert message in script.error, script.error
    if message.startswith("bad argument") or message.startswith("std.json.encode:"):
        assert script.error.startswith("s.lua:2: "), script.error


def test_an_endless_line_loop_is_still_metered() -> None:
    # library code is script code: a loop over a reader that never ends stops at the instruction budget
    script = Script("local r = std.reader() while true do r:buffered() end", instructions=200_000).run()
    assert script.end == "instructions"


# --- quote: the log's own escaping -----------------------------------------------------------------------


class Quoter:
    """One Lua state that quotes what it is sent: `max` in the first five bytes, then the value."""

    SOURCE = """
local r = std.reader()
while true do
  local data = deadend.recv(65535)
  if not data then break end
  deadend.send(std.quote(data:sub(6), tonumber(data:sub(1, 5))))
end
"""

    def __init__(self) -> None:
        self.script = Script(self.SOURCE)

    def quote(self, value: bytes, max_: int) -> str:
        out = self.script.out
        assert out[0] == b"call" and out[1] == b"recv", out
        out = child.resume(self.script.step, b"%05d" % max_ + value)
        assert out[0] == b"call" and out[1] == b"send", out
        self.script.out = child.resume(self.script.step, True)
        return bytes(out[2]).decode("utf-8")


QUOTER = Quoter()

TRICKY = [
    b"",
    b"plain",
    b'say "hi"\\now',
    b"\x00\x1f\x7f\x1b[2J",
    b"\xff\xfe\xc0\xaf\xed\xa0\x80\xf4\x90\x80\x80",  # invalid bytes, an overlong, a surrogate, past U+10FFFF
    b"\xe2\x82",  # a character cut short
    "café 中文 \u00a0\u200b\u202e\u2028\U000e0041\ufe0f\u3164\ue000\U0010fffd".encode(),
    b"\\x41",
]


@pytest.mark.parametrize("value", TRICKY)
@pytest.mark.parametrize("max_", [0, 1, 3, 5, 8, 256])
def test_quote_is_the_logs_escaping(value: bytes, max_: int) -> None:
    assert QUOTER.quote(value, max_) == f'"{sanitize(value, max_, quote=True)}"'


@settings(max_examples=400, deadline=None)
@given(
    st.binary(max_size=300)
    | st.text(max_size=120).map(lambda t: t.encode("utf-8", "surrogatepass"))
    | st.lists(st.sampled_from(["a", "\\", '"', "\x1b", "é", "\u200b", "\U000e0020", "\ud800", "中"])).map(
        lambda cs: "".join(cs).encode("utf-8", "surrogatepass")
    ),
    st.integers(0, 400),
)
def test_quote_matches_sanitize_on_any_input(value: bytes, max_: int) -> None:
    assert QUOTER.quote(value, max_) == f'"{sanitize(value, max_, quote=True)}"'


def test_quote_defaults_and_other_values() -> None:
    got = printed('print(std.quote(nil), std.quote(12), std.quote(true), std.quote(("x"):rep(300)))')
    [line] = got
    nil, number, boolean, long = line.split("\t")
    assert (nil, number, boolean) == ("-", '"12"', '"true"')
    assert long == f'"{sanitize(b"x" * 300, 256, quote=True)}"'  # 256 bytes by default


def test_the_unsafe_table_is_the_logs_rule_for_every_code_point() -> None:
    ranges = wire.unsafe_ranges()
    flags = bytearray(0x110000)
    for lo, hi in ranges:
        flags[lo : hi + 1] = b"\x01" * (hi - lo + 1)
    for code in range(0x80, 0x110000):
        if 0xD800 <= code <= 0xDFFF:
            continue  # never decoded from UTF-8: sanitize shows their bytes
        c = chr(code)
        by_category = unicodedata.category(c) in wire.UNSAFE_CATEGORIES or any(
            lo <= code <= hi for lo, hi in wire.IGNORABLE_RANGES
        )
        assert bool(flags[code]) == by_category, hex(code)


# --- json ------------------------------------------------------------------------------------------------


def test_json_keeps_the_order_it_is_given() -> None:
    source = """
print(std.json.encode(std.json.object(
  "name", "es01", "cluster_name", "elasticsearch",
  "version", std.json.object("number", "7.17.9", "build_snapshot", false),
  "tagline", "You Know, for Search", "missing", nil, "nothing", std.json.null)))
print(std.json.encode({ zeta = 1, alpha = { 1, 2.5, "three" }, mid = {} }))
print(std.json.encode(std.json.array()), std.json.encode(std.json.array(1, nil, 3)))
print(std.json.encode("tab\\t\\"quote\\" \\1 \\127 \\255 é"))
print(std.json.encode(0.1), std.json.encode(-0.0), std.json.encode(1e300), std.json.encode(2^53))
"""
    lines = printed(source)
    assert lines[0] == (
        '{"name":"es01","cluster_name":"elasticsearch","version":{"number":"7.17.9","build_snapshot":false},'
        '"tagline":"You Know, for Search","missing":null,"nothing":null}'
    )
    assert lines[1] == '{"alpha":[1,2.5,"three"],"mid":{},"zeta":1}'
    assert lines[2] == "[]\t[1,null,3]"
    assert json.loads(lines[3]) == 'tab\t"quote" \x01 \x7f \ufffd é'
    assert [json.loads(v) for v in lines[4].split("\t")] == [0.1, -0.0, 1e300, 2.0**53]


def test_json_refuses_a_cycle() -> None:
    script = Script("local t = {} t.self = t std.json.encode(t)").run()
    assert script.end == "error" and "nested deeper than 64 (a cycle?)" in script.error


@settings(max_examples=100, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**62), 2**62) | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, min_size=1, max_size=4)
            | st.dictionaries(st.text(max_size=6), inner, min_size=1, max_size=4)
        ),
        max_leaves=12,
    )
)
def test_json_round_trips_through_pythons_decoder(value: Any) -> None:
    def lua(v: Any) -> str:
        if v is None:
            return "std.json.null"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return '"' + "".join(f"\\{b}" for b in v.encode()) + '"'
        if isinstance(v, list):
            return "std.json.array(" + ", ".join(lua(x) for x in v) + ")"
        return "std.json.object(" + ", ".join(f"{lua(k)}, {lua(x)}" for k, x in v.items()) + ")"

    [line] = printed(f"print(std.json.encode({lua(value)}))")
    assert json.loads(line) == value
    if isinstance(value, dict):
        assert list(json.loads(line)) == list(value)  # the order given


# --- base64 and the pacer --------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64))
def test_base64_matches_pythons(data: bytes) -> None:
    encoded = base64.b64encode(data)
    source = 'local e = std.base64.encode(deadend.recv(100) or "")\n'
    source += "print(e)\nprint(std.base64.decode(e) == RAW)"
    escaped = "".join(f"\\{b}" for b in data)
    got = printed(source.replace("RAW", f'"{escaped}"'), data or b"")
    assert got == [encoded.decode(), "true"]


@pytest.mark.parametrize("bad", ["abc", "ab=c", "a===", "!!!!", "ab==cd=="])
def test_base64_decode_says_nil_to_what_is_not_base64(bad: str) -> None:
    assert printed(f'print(std.base64.decode("{bad}"))') == ["nil"]


def test_pacer_waits_once_and_answers_in_one_write() -> None:
    source = """
local r, out = std.reader(), std.pacer(200, 0)
while true do
  local line = r:line()
  if not line then break end
  out:add("+" .. line .. "\\r\\n")
  if r:buffered() == 0 then print(out:pending()) out:flush() end
end
print(out:flush())
"""
    script = Script(source, [b"PING\r\nPING\r\nPING\r\n", b"ECHO\r\n"]).run()
    ops = [(op, args[0]) for op, args in script.calls if op in ("send", "sleep")]
    # three pipelined commands: three delays in one sleep, three answers in one send; then the fourth
    assert ops == [("sleep", 600), ("send", b"+PING\r\n" * 3), ("sleep", 200), ("send", b"+ECHO\r\n")]
    assert script.printed == ["3", "1", "true"]
