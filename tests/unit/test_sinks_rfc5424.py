"""RFC 5424 messages and RFC 6587 octet-counting frames (deadend/sinks/rfc5424.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deadend.sinks.event import OutEvent
from deadend.sinks.rfc5424 import frame, header_field, message, parse_frames

EVENT = OutEvent(
    "01939a4e-1f2a-7cc1-8d3e-5b9f0a6c7d21",
    "2026-11-25T16:35:55.259Z",
    "warn",
    "script.log",
    "edge-7",
    b'{"v":1,"msg":"hi"}',
)


def test_the_exact_message() -> None:
    assert message(EVENT, 3, b"4242") == (
        b'<28>1 2026-11-25T16:35:55.259Z edge-7 deadend 4242 script.log - {"v":1,"msg":"hi"}'
    )
    assert message(EVENT, 16, b"1").startswith(b"<132>1 ")  # local0 (16) * 8 + warning (4)


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        ("a b", "hostname", b"a_b"),
        ("", "msgid", b"-"),
        ("x" * 40, "msgid", b"x" * 32),
        ("h\u00e9", "hostname", b"h_"),
        ("tab\there", "procid", b"tab_here"),
    ],
)
def test_header_fields_cannot_split_the_header(value: str, kind: str, expected: bytes) -> None:
    assert header_field(value, kind) == expected


def test_frame() -> None:
    assert frame(b"<14>1 - - - - - - x") == b"19 <14>1 - - - - - - x"


@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8), st.integers(0, 4000))
def test_frames_parse_back_however_the_bytes_are_cut(messages: list[bytes], cut: int) -> None:
    stream = b"".join(frame(m) for m in messages)
    cut = min(cut, len(stream))
    first, rest = parse_frames(stream[:cut])
    second, tail = parse_frames(rest + stream[cut:])
    assert first + second == messages and tail == b""


@pytest.mark.parametrize("bad", [b"x 1", b"01 a", b"-1 a", b"1234567890 a", b"12345678901"])
def test_malformed_octet_counts(bad: bytes) -> None:
    with pytest.raises(ValueError):
        parse_frames(bad)
