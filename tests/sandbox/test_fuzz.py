"""Property-based fuzzing of the broker's side of the wire protocol, with compromised children.

The real Server, Session, Monitor and WorkerChannel run in this process (as in `test_rogue.py`); each
child is `fuzz_child.py`, which carries out a plan hypothesis drew: a long run of valid requests (so one
child sends hundreds of frames) in legal but unusual encodings, some split across writes, followed by one
hostile ending: wrong types, wrong arity, out-of-range values, unknown ops, calls naming other
connections, frames that are not requests, frames beyond the reader's limits, random bytes, truncated
frames, two requests at once, a request ahead of its reply, replies never read, floods, silence, exits
and deaths by signal.

A small model of SPEC.md, written independently of `deadend.wire` and `broker.monitor`, predicts for each
plan how the session must end and the exact bytes its client must receive. Up to four sessions run at
once on four ports, each sending its own marker, so a frame acting on another connection would show up as
a foreign marker or a byte count that does not add up. Per example: exactly one `session end` line per
connection with the predicted reason, the explanation line where one is due, every log line well formed,
no unhandled exception in the broker's loop, the broker thread alive, every child reaped. At the end: no
descriptor, session or channel left behind and the process's memory within bounds.

The default suite runs every ending once (`test_each_ending_once`) and a fuzzing slice (at least 5,000
frames, about half a minute on an idle 2-core machine); `-m slow` runs the full campaign (at least 100,000
frames). Hypothesis runs in rounds with fixed seeds and no database, so a run is reproducible; a failure
prints its `@reproduce_failure` blob. DEADEND_FUZZ_VERBOSE=1 prints every example.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import io
import os
import re
import signal
import socket
import struct
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import broker as broker_pkg
import deadend
from broker.channel import WorkerChannel
from broker.monitor import Monitor
from broker.pool import Lease
from broker.sandboxes import Sandboxes
from broker.server import Server
from broker.session import Session
from deadend.config import Ceilings, Config
from deadend.logs import EventLog
from tests.conftest import FAKES, HOST, alive, descendants, free_offset, rogue_spawner

FUZZ_CHILD = FAKES / "fuzz_child.py"

# --- the contract, as SPEC.md states it (deliberately not imported from deadend.wire) -------------------

SEND_MAX = 1 << 20
RECV_MAX = 65535
SLEEP_MAX = 3_600_000
TARPIT_MAX = 60_000
LIMIT_MAX = (1 << 63) - 1
LOG_MAX = 4096  # the child may send one byte more, so that the broker can tell a cut message
LOG_LEVELS = ("debug", "info", "warn", "error")
OPS = ("send", "recv", "sleep", "get_ip", "log", "set_tarpit", "set_limits", "close", "done")
DONE_REASON = {
    "return": "done",
    "error": "script-error",
    "compile": "compile-error",
    "instructions": "instruction-limit",
    "memory": "memory-limit",
    "crash": "sandbox-crash",
}
# The reader's bounds on one frame from a child (what a frame may hold before it is unreadable).
# Requests carry values, and arrays of values one deep at most (log's fields: 16 names and values): an
# array inside an array inside a frame is refused as soon as it is read.
STR_MAX, ARRAY_MAX = 64, 32
FIELDS_MAX, FIELD_MAX = 16, 1024

CPU_SLICE = 0.3
LINGER_CALLS = 50
CEILINGS = Ceilings(cpu_slice=CPU_SLICE, linger_calls=LINGER_CALLS, linger=10.0, session_time=60.0)
LANES = 4  # sessions run at once, one port each
PIPE_BUF = 4096  # a write up to this size reaches the pipe in one piece
HELLO = b"hello"  # what every client sends first (a valid recv gets some of it)
MAX_INT64, MIN_INT64 = (1 << 64) - 1, -(1 << 63)
field_names = st.from_regex(rb"\A[a-z][a-z0-9_.]{0,31}\Z")
field_values = st.one_of(st.booleans(), st.integers(MIN_INT64, MAX_INT64), st.binary(max_size=FIELD_MAX + 1))

VERBOSE = os.environ.get("DEADEND_FUZZ_VERBOSE") == "1"


# --- msgpack in every legal width ----------------------------------------------------------------------


def enc(obj: Any, width: int = 0) -> bytes:
    """`obj` in msgpack, each int, bin, str and array header `width` steps wider than the shortest form.

    Every form is legal msgpack and decodes to the same value: a reader must not care which was used."""
    if width == 0 or obj is None or isinstance(obj, (bool, float, msgpack.ExtType)):
        return msgpack.packb(obj, use_bin_type=True)
    if type(obj) is int:
        if obj >= 0:
            forms = [(b"", 0x7F, ""), (b"\xcc", 0xFF, ">B"), (b"\xcd", 0xFFFF, ">H")]
            forms += [(b"\xce", 0xFFFFFFFF, ">I"), (b"\xcf", MAX_INT64, ">Q")]
        else:
            forms = [(b"", -32, ""), (b"\xd0", -(1 << 7), ">b"), (b"\xd1", -(1 << 15), ">h")]
            forms += [(b"\xd2", -(1 << 31), ">i"), (b"\xd3", MIN_INT64, ">q")]
        fits = [f for f in forms if (obj <= f[1] if obj >= 0 else obj >= f[1])]
        tag, _, fmt = fits[min(width, len(fits) - 1)]
        return msgpack.packb(obj) if not tag else tag + struct.pack(fmt, obj)
    if isinstance(obj, (bytes, str)):
        data = obj if isinstance(obj, bytes) else obj.encode()
        if isinstance(obj, bytes):
            forms = [(b"\xc4", 0xFF, ">B"), (b"\xc5", 0xFFFF, ">H"), (b"\xc6", 0xFFFFFFFF, ">I")]
        else:
            forms = [
                (b"", 31, ""),
                (b"\xd9", 0xFF, ">B"),
                (b"\xda", 0xFFFF, ">H"),
                (b"\xdb", 0xFFFFFFFF, ">I"),
            ]
        fits = [f for f in forms if len(data) <= f[1]]
        tag, _, fmt = fits[min(width, len(fits) - 1)]
        head = bytes([0xA0 | len(data)]) if not tag else tag + struct.pack(fmt, len(data))
        return head + data
    if isinstance(obj, list):
        forms = [(b"", 15, ""), (b"\xdc", 0xFFFF, ">H"), (b"\xdd", 0xFFFFFFFF, ">I")]
        fits = [f for f in forms if len(obj) <= f[1]]
        tag, _, fmt = fits[min(width, len(fits) - 1)]
        head = bytes([0x90 | len(obj)]) if not tag else tag + struct.pack(fmt, len(obj))
        return head + b"".join(enc(item, width) for item in obj)
    return msgpack.packb(obj, use_bin_type=True)


# --- strategies ----------------------------------------------------------------------------------------

letters = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ", max_size=40).map(str.encode)
widths = st.integers(0, 3)

# Values a hostile child may put anywhere, all within the reader's bounds (so only the meaning is wrong).
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(MIN_INT64, MAX_INT64),
    st.sampled_from([0, 1, -1, 65535, 65536, 60000, 60001, 3_600_000, 3_600_001, LIMIT_MAX, LIMIT_MAX + 1]),
    st.floats(),
    st.text(max_size=STR_MAX // 4),
    st.sampled_from([*OPS, *LOG_LEVELS, *DONE_REASON, "127.0.0.1", "conn", "port", "10"]),
    st.binary(max_size=48),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.just(b"")),
    st.just({}),
)


def not_type(t: type) -> st.SearchStrategy[Any]:
    return values.filter(lambda v: type(v) is not t)


def bad_int(lo: int, hi: int) -> st.SearchStrategy[Any]:
    outside = [st.integers(hi + 1, MAX_INT64)]
    if lo > MIN_INT64:
        outside.append(st.integers(MIN_INT64, lo - 1))
    return st.one_of(not_type(int), *outside)


def as_list(items: tuple[Any, ...]) -> list[Any]:
    return list(items)


def wrong_arity(*counts: int) -> st.SearchStrategy[list[Any]]:
    return st.sampled_from(counts).flatmap(lambda n: st.lists(values, min_size=n, max_size=n))


not_level = values.filter(lambda v: not (isinstance(v, str) and v in LOG_LEVELS))
not_kind = values.filter(lambda v: not (isinstance(v, str) and v in DONE_REASON))
long_text = st.integers(LOG_MAX + 2, LOG_MAX + 64).map(lambda n: b"m" * n)


def pair(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    return st.one_of(st.tuples(bad, good), st.tuples(good, bad), st.tuples(bad, bad)).map(list)


# Arguments that break each request's contract (type, arity or range), never by accident a valid call.
BAD_ARGS: dict[str, st.SearchStrategy[list[Any]]] = {
    "send": st.one_of(wrong_arity(0, 2, 3), st.tuples(not_type(bytes)).map(list)),
    "recv": st.one_of(wrong_arity(0, 2, 3), st.tuples(bad_int(1, RECV_MAX)).map(list)),
    "sleep": st.one_of(wrong_arity(0, 2, 3), st.tuples(bad_int(0, SLEEP_MAX)).map(list)),
    "get_ip": wrong_arity(1, 2, 3),
    "close": wrong_arity(1, 2, 3),
    "log": st.one_of(
        wrong_arity(0, 1, 2, 4),
        st.tuples(not_type(bytes), values, st.just([])).map(list),
        st.tuples(st.binary(max_size=32), not_level, st.just([])).map(list),
        st.tuples(long_text, st.sampled_from(LOG_LEVELS), st.just([])).map(list),
        # fields that break a rule: not an array, an odd count, a bad name, a bad value
        st.tuples(st.just(b"m"), st.just("info"), values.filter(lambda v: not isinstance(v, list))).map(list),
        st.tuples(st.just(b"m"), st.just("info"), st.lists(field_names, min_size=1, max_size=1)).map(list),
        st.tuples(
            st.just(b"m"),
            st.just("info"),
            st.tuples(
                values.filter(
                    lambda v: not (isinstance(v, bytes) and re.fullmatch(rb"[a-z][a-z0-9_.]{0,31}", v))
                ),
                field_values,
            ).map(list),
        ).map(list),
        st.tuples(
            st.just(b"m"),
            st.just("info"),
            st.tuples(field_names, st.one_of(st.none(), st.floats(), st.text(max_size=8))).map(as_list),
        ).map(as_list),
    ),
    "set_tarpit": st.one_of(wrong_arity(0, 1, 3), pair(st.integers(0, TARPIT_MAX), bad_int(0, TARPIT_MAX))),
    "set_limits": st.one_of(wrong_arity(0, 1, 3), pair(st.integers(0, LIMIT_MAX), bad_int(0, LIMIT_MAX))),
    "done": st.one_of(
        wrong_arity(0, 1, 3),
        st.tuples(not_kind, st.binary(max_size=16)).map(list),
        st.tuples(st.sampled_from(list(DONE_REASON)), not_type(bytes)).map(list),
        st.tuples(st.sampled_from(list(DONE_REASON)), long_text).map(list),
    ),
}

# Requests that try to reach another connection: the protocol has no way to name one, so each is either an
# unknown request or one argument too many.
OTHER_CONNECTIONS = [
    ["send", b"<other>", 1001],
    ["send", b"<other>", "conn"],
    ["recv", 10, 1002],
    ["get_ip", "0123456789ab"],
    ["close", 1003],
    ["send_to", 1001, b"<other>"],
    ["recv_from", "0123456789ab", 10],
    ["attach", 1002],
]
unknown_ops = st.one_of(
    st.text(max_size=STR_MAX // 4).filter(lambda s: s not in OPS),
    st.sampled_from(
        ["ready", "start", "SEND", "send ", "send\x00", "Get_IP", "exec", "fork", "kill", "open"]
    ),
    st.sampled_from([op.encode() for op in OPS]),  # the right name, as bin instead of str
    not_type(str),
)


@st.composite
def valid_moves(draw: st.DrawFn) -> tuple[Any, ...]:
    """One well-formed request (before the model fills in markers and state)."""
    kind = draw(
        st.sampled_from(
            ["get_ip", "send", "send", "send0", "tarpit", "limits", "log", "sleep", "recv", "get_ip", "close"]
        )
    )
    if kind == "send":
        return ("send", draw(letters))
    if kind == "tarpit":
        return ("tarpit", draw(st.integers(0, TARPIT_MAX)), draw(st.integers(0, TARPIT_MAX)))
    if kind == "limits":
        limit = st.one_of(st.integers(0, 8), st.integers(0, LIMIT_MAX), st.just(LIMIT_MAX))
        return ("limits", draw(limit), draw(limit))
    if kind == "log":
        fields = draw(st.dictionaries(field_names, field_values, max_size=3))
        pairs = [x for kv in fields.items() for x in kv]
        return ("log", draw(st.binary(max_size=64)), draw(st.sampled_from(LOG_LEVELS)), pairs)
    if kind == "sleep":
        return ("sleep", draw(st.integers(0, 3)))
    if kind == "recv":
        return ("recv", draw(st.integers(1, RECV_MAX)))
    return (kind,)


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[int, tuple[int, ...], int]:
    """How a valid frame is written: width of its encoding, cut points (split writes), pause between."""
    width = draw(widths)
    if draw(st.integers(0, 9)) == 0:
        return (
            width,
            tuple(draw(st.lists(st.integers(1, 1 << 16), min_size=1, max_size=6))),
            draw(st.integers(0, 2000)),
        )
    return width, (), 0


# Rare valid requests at the edges of the ranges (costly ones, kept out of the repeated pattern).
boundary_moves = st.sampled_from(
    [
        ("sendmax",),
        ("log", b"L" * LOG_MAX, "debug", []),
        ("log", b"L" * (LOG_MAX + 1), "error", []),
        (
            "log",
            b"x\n2099-01-01T00:00:00.000Z ERROR port=1 conn=x peer=y forged\r\xc2\x85\xe2\x80\xa8",
            "warn",
            [b"user", b'root" peer=6.6.6.6\n2099-01-01T00:00:00.000Z forged'],
        ),
        # the largest legal log request
        (
            "log",
            b"L" * (LOG_MAX + 1),
            "info",
            [x for i in range(FIELDS_MAX) for x in (b"k%02d" % i + b"_" * 29, b"v" * (FIELD_MAX + 1))],
        ),
        ("recv", 1),
        ("recv", RECV_MAX),
        ("tarpit", TARPIT_MAX, TARPIT_MAX),
        ("limits", LIMIT_MAX, LIMIT_MAX),
        ("limits", 0, 0),
        ("sleep", 0),
    ]
)

SIGNALS = {
    signal.SIGSEGV: ("sandbox-crash", "SIGSEGV"),
    signal.SIGABRT: ("sandbox-crash", "SIGABRT"),
    signal.SIGTERM: ("sandbox-crash", "SIGTERM"),
    signal.SIGKILL: ("sandbox-crash", "SIGKILL"),
    signal.SIGUSR1: ("sandbox-crash", "SIGUSR1"),
    signal.SIGBUS: ("sandbox-crash", "SIGBUS"),
    signal.SIGSYS: ("seccomp", "killed by SIGSYS"),
    signal.SIGXCPU: ("cpu-limit", "killed by SIGXCPU"),
}
ARRAY_HEADERS = {*range(0x90, 0xA0), 0xDC, 0xDD}

halt = st.one_of(
    st.tuples(st.just("exit"), st.integers(0, 255)),
    st.tuples(st.just("signal"), st.sampled_from(sorted(SIGNALS))),
    st.tuples(st.just("close-out")),
    st.tuples(st.just("silent")),
)
cheap_halt = st.one_of(
    st.tuples(st.just("exit"), st.integers(0, 255)),
    st.tuples(st.just("signal"), st.sampled_from(sorted(SIGNALS))),
    st.tuples(st.just("close-out")),
)


@st.composite
def hostile_endings(draw: st.DrawFn) -> tuple[Any, ...]:
    """The last thing a child does. Costly endings (silence, floods, 1 MiB frames) are drawn rarely."""
    kind = draw(
        st.sampled_from(
            ["badargs"] * 6
            + ["unknown"] * 2
            + ["other", "notarray", "overlimit", "overlimit", "nested", "random", "random"]
            + ["truncated", "truncated", "two", "two", "ahead", "done", "done", "halt", "halt"]
            + ["flood", "huge", "silent"]
        )
    )
    if kind == "badargs":
        op = draw(st.sampled_from(OPS))
        return ("badargs", op, draw(BAD_ARGS[op]), draw(widths))
    if kind == "unknown":
        return ("unknown", draw(unknown_ops), draw(st.lists(values, max_size=3)), draw(widths))
    if kind == "other":
        return ("other", draw(st.sampled_from(OTHER_CONNECTIONS)), draw(widths))
    if kind == "notarray":
        frame: object = draw(st.one_of(values.filter(lambda v: not isinstance(v, list)), st.just([])))
        return ("notarray", frame, draw(widths))
    if kind == "overlimit":
        return ("overlimit", draw(overlimit_frames()))
    if kind == "nested":
        return ("nested", draw(nested_frames()))
    if kind == "random":
        data = draw(st.binary(min_size=1, max_size=64).filter(lambda b: b[0] not in ARRAY_HEADERS))
        return ("random", data)
    if kind == "truncated":
        return ("truncated", draw(valid_moves()), draw(widths), draw(st.integers(1, 1 << 16)), draw(halt))
    if kind == "two":
        second = draw(st.one_of(valid_moves(), st.just(("done", "return", b""))))
        return ("two", draw(valid_moves()), second, draw(widths))
    if kind == "ahead":
        return ("ahead", draw(st.integers(100, 300)), draw(valid_moves()), draw(widths))
    if kind == "done":
        return ("done", draw(st.sampled_from(list(DONE_REASON))), draw(st.binary(max_size=80)), draw(widths))
    if kind == "halt":
        return ("halt", draw(cheap_halt))
    if kind == "flood":
        unit = draw(st.sampled_from([b"\x00", b"\xc0", enc(["get_ip"]), enc(["send", b""]), b"\x90"]))
        return ("flood", unit, draw(st.integers(2, 64)))
    return (kind,)


@st.composite
def nested_frames(draw: st.DrawFn) -> bytes:
    """Frames with arrays nested two deep or more (one deep is log's fields), small or 1 MiB."""
    choice = draw(st.integers(0, 9))
    if choice == 0:  # the nested-array bomb: 300 kB that would inflate into a million lists
        return b"\x94" * 300_000 + b"\x90" * 4
    if choice <= 3:  # [[[...[nil]...]]]: nothing but nesting
        return b"\x91" * draw(st.integers(2, 2000)) + b"\xc0"
    inner = draw(st.lists(values, max_size=ARRAY_MAX))
    for _ in range(draw(st.integers(1, 3))):  # an array of values is readable; one inside it is not
        inner = [inner]
    op = draw(st.sampled_from(OPS))
    place = draw(st.integers(0, 2))
    frame = [inner] if place == 0 else [op, inner] if place == 1 else [op, b"x", inner]
    return enc(frame, draw(widths))


@st.composite
def overlimit_frames(draw: st.DrawFn) -> bytes:
    """Frames beyond what the reader accepts from a child: too long, too wide, too deep, maps, exts."""
    choice = draw(st.integers(0, 5))
    if choice == 0:  # an array with more than ARRAY_MAX elements, at the top or inside
        n = draw(st.integers(ARRAY_MAX + 1, 40))
        inner = [draw(st.sampled_from(OPS))] + [0] * (n - 1)
        return enc(inner if draw(st.booleans()) else ["send", inner], draw(widths))
    if choice == 1:  # a str longer than STR_MAX bytes, as the op or as an argument
        text = "s" * draw(st.integers(STR_MAX + 1, 300))
        return enc([text] if draw(st.booleans()) else ["log", b"x", text], draw(widths))
    if choice == 2:  # a non-empty map anywhere
        m = draw(st.dictionaries(st.text(max_size=8), values, min_size=1, max_size=3))
        return msgpack.packb(draw(st.sampled_from([m, ["send", m], ["start", m]])), use_bin_type=True)
    if choice == 3:  # an ext type with a body (pickles, timestamps...)
        code, body = draw(st.integers(-128, 127)), draw(st.binary(min_size=1, max_size=16))
        ext = b"\xc7" + struct.pack(">Bb", len(body), code) + body  # ext8; -1 is a timestamp
        return draw(st.sampled_from([ext, b"\x92\xa4send" + ext]))
    if choice == 4:  # nesting beyond msgpack's own stack (1024)
        return b"\x91" * draw(st.integers(1025, 1200)) + b"\xc0"
    # headers claiming more elements than the bounds allow (a fixarray holds at most 15: within ARRAY_MAX)
    over = b"\xdc" + struct.pack(">H", ARRAY_MAX + 1)
    return draw(st.sampled_from([b"\xdd\xff\xff\xff\xff", over, b"\xdc\xff\xff", b"\xdf\x00\x00\x00\x01"]))


@st.composite
def sessions(draw: st.DrawFn) -> tuple[Any, ...]:
    """One child's plan: a repeated pattern of valid requests, perhaps a boundary one, then the ending."""
    pattern = draw(st.lists(st.tuples(valid_moves(), deliveries()), min_size=1, max_size=10))
    repeat = draw(st.integers(1, 80))
    extra = draw(st.lists(st.tuples(boundary_moves, deliveries()), max_size=2))
    return pattern, repeat, extra, draw(hostile_endings())


# --- the model -----------------------------------------------------------------------------------------


@dataclass
class Plan:
    """A child's plan and what must follow from it."""

    marker: bytes
    steps: list[list[Any]] = field(default_factory=list)
    frames: int = 0  # frames the child writes if it is not killed first
    sure: int = 0  # frames the child writes before its ending: each of them was answered
    reasons: frozenset[str] = frozenset()
    detail: str | None = None  # regex for the explanation line "<reason>: <detail>", if one is due
    out: bytes = b""  # exactly what the client receives
    bytes_in: int | None = 0  # None: not predictable (the client streams `blob`)
    blob: bytes = b""  # what the client sends after HELLO (it may be cut off by a reset)
    closed_by: str = "-"
    ended: bool = False  # the session ends inside the valid part (linger): nothing after it runs
    # model state
    open: bool = True
    after_close: int = 0
    calls_limit: int = 0
    bytes_limit: int = 0
    recv_calls: int = 0
    unread: int = len(HELLO)
    tarpit: tuple[int, int] = (0, 0)


def request_of(move: tuple[Any, ...], marker: bytes) -> list[Any]:
    kind = move[0]
    if kind == "send":
        return ["send", marker + move[1]]
    if kind == "sendmax":
        return ["send", marker + b"z" * (SEND_MAX - len(marker))]
    if kind == "send0":
        return ["send", b""]
    if kind == "tarpit":
        return ["set_tarpit", move[1], move[2]]
    if kind == "limits":
        return ["set_limits", move[1], move[2]]
    if kind == "done":
        return ["done", move[1], move[2]]
    return [kind, *move[1:]]


def apply(plan: Plan, move: tuple[Any, ...], delivery: tuple[int, tuple[int, ...], int]) -> None:
    """Add one valid request to the plan and follow its effect on the connection (SPEC.md)."""
    if plan.ended:
        return
    kind = move[0]
    if kind == "recv" and plan.open:
        if plan.calls_limit and plan.recv_calls >= plan.calls_limit:
            plan.open, plan.closed_by = False, "limit"  # returns nil and closes the socket
        elif not plan.unread:
            move = ("get_ip",)  # it would wait for bytes the client never sends
        else:
            if sum(plan.tarpit) > 40:  # keep the tarpit delay after this recv short
                _add_call(plan, ["set_tarpit", 0, 0], (0, (), 0))
                plan.tarpit = (0, 0)
            n = min(move[1], plan.unread)
            plan.unread -= n
            if plan.bytes_limit and plan.bytes_in + n > plan.bytes_limit:
                plan.open, plan.closed_by = False, "limit"
            else:
                plan.bytes_in += n
                plan.recv_calls += 1
    elif kind in ("send", "sendmax", "send0", "recv") and not plan.open:
        plan.after_close += 1
        if plan.after_close > LINGER_CALLS:
            plan.ended = True
            plan.reasons = frozenset({"linger"})
            plan.detail = re.escape("kept calling send/recv after ")  # the connection closed
    elif kind in ("send", "sendmax"):
        plan.out += request_of(move, plan.marker)[1]
    elif kind == "tarpit":
        plan.tarpit = (move[1], move[2])
    elif kind == "limits":
        plan.calls_limit, plan.bytes_limit = move[1], move[2]
    elif kind == "close" and plan.open:
        plan.open, plan.closed_by = False, "script"
    _add_call(plan, request_of(move, plan.marker), delivery)


def _add_call(plan: Plan, request: list[Any], delivery: tuple[int, tuple[int, ...], int]) -> None:
    width, cuts, pause = delivery
    frame = enc(request, width)
    points = sorted({c % len(frame) for c in cuts} - {0})
    if points:
        pieces = [frame[a:b] for a, b in zip([0, *points], [*points, len(frame)], strict=True)]
        plan.steps.append(["chunks", pieces, pause])
    else:
        plan.steps.append(["call", frame])
    plan.frames += 1


def _end(plan: Plan, reasons: str | set[str], detail: str | None, *steps: list[Any]) -> None:
    plan.reasons = frozenset({reasons} if isinstance(reasons, str) else reasons)
    plan.detail = detail
    plan.steps.extend(steps)
    plan.frames += sum(step[2] for step in steps if step[0] in ("write", "noread"))


def _halt(plan: Plan, how: tuple[Any, ...]) -> None:
    if how[0] == "exit":
        _end(plan, "sandbox-crash", f"exit status {how[1]}", ["exit", how[1]])
    elif how[0] == "signal":
        reason, detail = SIGNALS[how[1]]
        _end(plan, reason, re.escape(detail), ["signal", int(how[1])])
    elif how[0] == "close-out":
        _end(plan, "sandbox-crash", "SIGKILL", ["close-out"])
    else:
        _end(plan, "cpu-deadline", re.escape(f"no API call within {CPU_SLICE:.1f}s"), ["silent", 60])


PV = "protocol-violation"


def build(draw: tuple[Any, ...], marker: bytes) -> Plan:
    pattern, repeat, extra, ending = draw
    plan = Plan(marker)
    for _ in range(repeat):
        for move, delivery in pattern:
            apply(plan, move, delivery)
    for move, delivery in extra:
        apply(plan, move, delivery)
    plan.sure = plan.frames
    if plan.ended:
        plan.sure -= 1  # the broker may kill the child before it counts the frame that ended it
        return plan
    kind = ending[0]
    if kind == "badargs":
        _, op, args, width = ending
        _end(plan, PV, re.escape(f"bad arguments to {op!r}"), ["write", enc([op, *args], width), 1])
    elif kind == "unknown":
        _, op, args, width = ending
        _end(plan, PV, "unknown request ", ["write", enc([op, *args], width), 1])
    elif kind == "other":
        _, request, width = ending
        detail = "bad arguments to " if request[0] in OPS else "unknown request "
        _end(plan, PV, detail, ["write", enc(request, width), 1])
    elif kind == "notarray":
        _, frame, width = ending
        _end(plan, PV, r"frame is not a request array \(", ["write", enc(frame, width), 1])
    elif kind in ("overlimit", "nested"):
        _end(plan, PV, "unreadable frame: ", ["write", ending[1], 1])
    elif kind == "random":
        # Not an array: a violation once complete; if it stops half-way, the exit ends the session.
        _end(plan, {PV, "sandbox-crash"}, None, ["write", ending[1], 1], ["exit", 0])
    elif kind == "truncated":
        _, move, width, cut, how = ending
        frame = enc(request_of(move, plan.marker), width)
        plan.steps.append(["write", frame[: 1 + cut % (len(frame) - 1)], 0])
        _halt(plan, how)
    elif kind == "two":
        _, first, second, width = ending
        both = enc(request_of(first, plan.marker), width) + enc(request_of(second, plan.marker), width)
        assert len(both) <= PIPE_BUF, "two requests must reach the broker in one read"
        _end(plan, PV, "a second request before the first was answered", ["write", both, 2])
    elif kind == "ahead":  # a request while the broker still carries out the previous one (a sleep)
        _, ms, move, width = ending
        steps = [["write", enc(["sleep", ms], width), 1], ["silent", 0.005]]
        steps.append(["write", enc(request_of(move, plan.marker), width), 1])
        _end(plan, PV, "a second request before the first was answered", *steps)
    elif kind == "done":
        _, what, message, width = ending
        reason = DONE_REASON[what]
        explained = None if reason == "done" or not message else ""
        _end(plan, reason, explained, ["write", enc(["done", what, message], width), 1])
    elif kind == "halt":
        _halt(plan, ending[1])
    elif kind == "flood":
        _, unit, chunks = ending
        per = (1 << 16) // len(unit)
        chunk = unit * per
        steps = [["write", chunk, 0, per] for _ in range(chunks)]
        _end(
            plan, PV, "(a second request before the first was answered|frame is not a request array)", *steps
        )
    elif kind == "noread":  # recv after recv, never reading a reply, while the client streams data
        _, count, pause = ending
        plan.blob, plan.bytes_in = b"B" * (4 << 20), None
        detail = "(worker stopped reading its replies|a second request before the first was answered)"
        _end(plan, PV, detail, ["noread", enc(["recv", RECV_MAX]), count, pause])
    elif kind == "huge":
        _end(plan, PV, "unreadable frame: ", ["write", enc(["send", b"h" * (SEND_MAX + 1)]), 1])
    else:
        _halt(plan, ("silent",))
    return plan


# --- the harness: broker in a thread, children that misbehave -----------------------------------------


LINE = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARN|ERROR) +port=(\S+) conn=(\S+) peer=(\S+) (.*)"
)


class Sink(io.TextIOBase):
    """The broker's log, indexed by connection. Script log lines are only counted (memory stays flat)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.seq = 0  # lines seen
        self.conn_of_port: dict[int, tuple[int, str, str]] = {}  # client port: (seq, conn, script)
        self.finished: set[str] = set()  # connections whose session-end line was checked
        self.lines: dict[str, list[str]] = {}
        self.ends: dict[str, list[str]] = {}
        self.broker: list[str] = []
        self.malformed: list[str] = []
        self.broker_warnings: list[str] = []  # broker-wide WARN/ERROR lines: none is expected here
        self.script_lines = 0

    def write(self, s: str) -> int:
        with self.cond:
            *lines, rest = s.split("\n")
            if rest:
                self.malformed.append(f"unterminated: {rest[:300]}")
            for line in lines:
                self._line(line)
            self.cond.notify_all()
        return len(s)

    def _line(self, line: str) -> None:
        self.seq += 1
        found = LINE.fullmatch(line)
        # one event, one line: no line break of any kind inside it (str.splitlines knows them all)
        if len(line.splitlines()) != 1 or not found:
            self.malformed.append(line[:300])
        elif found.group(3) == "-":
            self.broker = [*self.broker[-50:], line]
            if found.group(1) in ("WARN", "ERROR"):  # e.g. the log lost lines, an accept failed
                self.broker_warnings.append(line)
        else:
            conn, message = found.group(3), found.group(5)
            if message.startswith('script: "'):
                self.script_lines += 1
            elif message.startswith("session end "):
                self.ends.setdefault(conn, []).append(message)
                if conn in self.finished:
                    self.malformed.append(f"a second session-end line: {line}")
            else:
                self.lines.setdefault(conn, []).append(message)
                port = re.match(r"connect from \S+ port (\d+) script=(\S+)", message)
                if port:
                    self.conn_of_port[int(port.group(1))] = (self.seq, conn, port.group(2))

    def wait(self, predicate: Any, timeout: float, what: str) -> Any:
        """Wait for `predicate` (re-checked on every log line, and every few ms for state outside it)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not (found := predicate()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out waiting for {what}; broker lines:\n" + "\n".join(self.broker)
                    )
                self.cond.wait(min(left, 0.005))
            return found


@dataclass
class Broker:
    server: Server
    sink: Sink
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    ports: list[int]
    plans: list[Path]
    loop_errors: list[str]
    executor: concurrent.futures.ThreadPoolExecutor


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    script_ports = [1001 + i for i in range(LANES)]
    plans = [tmp_path / f"lane{i}.plan" for i in range(LANES)]
    for port, plan in zip(script_ports, plans, strict=True):
        (scripts / f"{port}.lua").write_text(str(plan))
    offset = free_offset(script_ports)
    config = Config(
        scripts=scripts,
        host=(HOST,),
        port_offset=offset,
        warm=0,
        ceilings=CEILINGS,
        allow_root=True,
        max_per_ip=1000,
        queue_size=16,
    )
    sink = Sink()
    log = EventLog(sink)  # type: ignore[arg-type]
    server = Server(config, log, spawner=rogue_spawner(FUZZ_CHILD), handle_signals=False)
    loop = asyncio.new_event_loop()
    loop_errors: list[str] = []
    loop.set_exception_handler(
        lambda _loop, ctx: loop_errors.append(f"{ctx.get('message')}: {ctx.get('exception')!r}")
    )
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    thread.start()
    sink.wait(lambda: any("ready: " in line for line in sink.broker), 30, "the broker to start")
    with concurrent.futures.ThreadPoolExecutor(LANES) as executor:
        yield Broker(
            server, sink, loop, thread, [p + offset for p in script_ports], plans, loop_errors, executor
        )
    loop.call_soon_threadsafe(server.request_stop)
    thread.join(15)
    assert not thread.is_alive()
    loop.close()
    log.close()
    assert not loop_errors, loop_errors
    assert not [p for p in descendants(os.getpid()) if alive(p)], "workers outlived the broker"


def workers_alive(b: Broker) -> int:
    """Workers forked and not yet reported gone (a plain int: safe to read from the test's thread)."""
    assert isinstance(b.server.sandboxes, Sandboxes)
    return b.server.sandboxes.supply.alive


def _client(port: int, blob: bytes) -> tuple[int, bytes, str | None]:
    """Connect, send HELLO (and stream `blob` alongside), read until the broker closes."""
    with socket.create_connection((HOST, port), timeout=30) as s:
        local = s.getsockname()[1]
        data, error = bytearray(), None

        def stream() -> None:
            with contextlib.suppress(OSError):  # the broker resets a connection it stopped reading
                s.sendall(blob)

        streamer = threading.Thread(target=stream, daemon=True)
        try:
            s.sendall(HELLO)
            if blob:
                streamer.start()
            while chunk := s.recv(1 << 16):
                data += chunk
        except OSError as e:
            error = repr(e)
        if blob:
            streamer.join(30)
        return local, bytes(data), error


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        found = re.search(r"VmRSS:\s+(\d+)", f.read())
    assert found
    return int(found.group(1))


@dataclass
class Stats:
    examples: int = 0
    sessions: int = 0
    frames: int = 0
    flood_frames: int = 0
    bytes: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    endings: Counter[str] = field(default_factory=Counter)


def run_example(b: Broker, drawn: list[tuple[Any, ...]], stats: Stats) -> None:
    """Run up to LANES plans at once, one per port, and check every session against its plan."""
    sink = b.sink
    # the previous example is over (also when it failed half-way): no session, no child, a fresh mark
    sink.wait(lambda: not b.server.sessions and not workers_alive(b), 30, "the previous sessions to end")
    with sink.cond:
        mark = sink.seq
    plans = []
    for lane, one in enumerate(drawn):
        plan = build(one, b"<m%d.%d>" % (stats.examples, lane))
        plans.append(plan)
        b.plans[lane].write_bytes(msgpack.packb(plan.steps, use_bin_type=True))
        Path(f"{b.plans[lane]}.n").unlink(missing_ok=True)
    stats.examples += 1
    clients = [b.executor.submit(_client, b.ports[lane], plan.blob) for lane, plan in enumerate(plans)]
    results = [c.result(timeout=60) for c in clients]
    for lane, (plan, (local, data, error)) in enumerate(zip(plans, results, strict=True)):

        def connected(local: int = local, lane: int = lane) -> str | None:
            seq, conn, script = sink.conn_of_port.get(local, (0, "", ""))
            return conn if seq > mark and script == f"{1001 + lane}.lua" else None

        conn = sink.wait(connected, 10, f"connect line of port {local}")
        sink.wait(lambda conn=conn: sink.ends.get(conn), 30, f"session end of {conn}")
        assert b.thread.is_alive(), "the broker thread died"
        with sink.cond:
            ends = sink.ends.pop(conn)
            lines = sink.lines.pop(conn, [])
            del sink.conn_of_port[local]
            sink.finished.add(conn)
        what = f"lane {lane}, ending {drawn[lane][3]!r:.300}, lines {lines[-5:]}"
        assert len(ends) == 1, f"{len(ends)} session-end lines: {ends}; {what}"
        end = re.fullmatch(
            r"session end reason=(\S+) duration=\S+ bytes_in=(\d+) bytes_out=(\d+) closed_by=(\S+)", ends[0]
        )
        assert end, ends[0]
        reason = end.group(1)
        assert reason in plan.reasons, f"reason {reason}, expected {set(plan.reasons)}; {what}"
        if plan.detail is not None:
            explained = [line for line in lines if re.match(re.escape(reason) + ": " + plan.detail, line)]
            assert len(explained) == 1, f"no one line explaining {reason}: {plan.detail!r}; {what}"
        # this connection got exactly its own child's valid sends, and nothing of any other connection
        assert error is None or plan.blob, f"client error {error}; {what}"
        foreign = set(re.findall(rb"<m\d+\.\d+>", data)) - {plan.marker}
        assert not foreign, f"bytes of other connections reached this one: {foreign}; {what}"
        assert data == plan.out, f"client got {len(data)} bytes, expected {len(plan.out)}; {what}"
        assert int(end.group(3)) == len(plan.out), f"bytes_out {end.group(3)} != {len(plan.out)}; {what}"
        if plan.bytes_in is not None:
            assert int(end.group(2)) == plan.bytes_in, f"bytes_in {end.group(2)} != {plan.bytes_in}; {what}"
        assert end.group(4) == plan.closed_by, f"closed_by {end.group(4)} != {plan.closed_by}; {what}"
        stats.reasons[reason] += 1
        stats.endings["linger" if plan.ended else drawn[lane][3][0]] += 1
    sink.wait(lambda: not workers_alive(b), 10, "every child to be reaped")
    assert not b.server.sessions
    assert not sink.malformed, sink.malformed
    assert not sink.broker_warnings, sink.broker_warnings
    assert not b.loop_errors, b.loop_errors
    for lane, plan in enumerate(plans):
        count = Path(f"{b.plans[lane]}.n").read_bytes()
        frames, flood, nbytes = struct.unpack("<QQQ", count) if count else (0, 0, 0)
        assert plan.sure <= frames <= plan.frames, f"the child wrote {frames} frames, planned {plan.frames}"
        stats.sessions += 1
        stats.frames += frames
        stats.flood_frames += flood
        stats.bytes += nbytes


BROKER_CODE = [str(Path(str(m.__file__)).parent) for m in (broker_pkg, deadend, asyncio)]


def _broker_held() -> int:
    """Bytes allocated since tracing started, still held, by the broker's code (or asyncio on its behalf)."""
    snapshot = tracemalloc.take_snapshot()
    held = snapshot.filter_traces([tracemalloc.Filter(True, f"{d}/*") for d in BROKER_CODE])
    return sum(stat.size for stat in held.statistics("filename"))


def campaign(b: Broker, rounds: int, examples: int, min_frames: int, trace: bool) -> Stats:
    """`rounds` hypothesis runs of `examples` each, seeded 0, 1, ... (reproducible without a database).

    Separate runs keep hypothesis's own bookkeeping (it remembers every example of a run) from growing
    with the campaign, so that the memory measured is the broker's. With `trace`, tracemalloc also
    measures what the broker's own code still holds at the end (precise, but it slows and inflates RSS).
    """
    stats = Stats()
    gc.collect()
    rss_before, fds_before = _rss_kib(), len(os.listdir("/proc/self/fd"))
    started = time.monotonic()
    if trace:
        tracemalloc.start()
    rss_rounds = []

    def fuzz(drawn: list[tuple[Any, ...]]) -> None:
        t0, frames = time.monotonic(), stats.frames
        run_example(b, drawn, stats)
        if VERBOSE:
            endings = [one[3][0] for one in drawn]
            took = time.monotonic() - t0
            print(f"example {stats.examples}: {stats.frames - frames} frames {took:.2f}s {endings}")

    try:
        for r in range(rounds):
            fuzz_round = seed(r)(
                settings(
                    max_examples=examples,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                    print_blob=True,
                )(given(st.lists(sessions(), min_size=1, max_size=LANES))(fuzz))
            )
            fuzz_round()
            gc.collect()
            rss_rounds.append(_rss_kib())
        held = _broker_held() if trace else 0
    finally:
        tracemalloc.stop()
    elapsed = time.monotonic() - started
    rss_after, fds_after = _rss_kib(), len(os.listdir("/proc/self/fd"))
    print(
        f"\nfuzz: {stats.frames} frames (+{stats.flood_frames} flood frames, {stats.bytes >> 20} MiB) in "
        f"{stats.sessions} sessions, {stats.examples} examples, {elapsed:.1f}s; "
        f"{b.sink.script_lines} script log lines\nreasons {dict(stats.reasons)}"
        f"\nendings {dict(stats.endings)}\nmemory: RSS {rss_before} KiB before, {rss_rounds} after each round"
        f"{f'; held by broker code {held} B' if trace else ''}; fds {fds_before} -> {fds_after}"
    )
    assert stats.frames >= min_frames, f"only {stats.frames} frames fuzzed"
    # nothing left behind: sessions, channels, monitors, children, descriptors; memory bounded
    assert b.thread.is_alive()
    assert not b.server.sessions
    leftovers = [o for o in gc.get_objects() if isinstance(o, (Session, WorkerChannel, Monitor, Lease))]
    assert not leftovers, leftovers[:5]
    zygote = b.server.sandboxes.supply.zygote if isinstance(b.server.sandboxes, Sandboxes) else None
    assert not workers_alive(b) and [p for p in descendants(os.getpid()) if alive(p)] == [
        zygote and zygote.pid
    ]
    assert fds_after <= fds_before, (fds_before, fds_after)
    assert held < 1 << 20, f"the broker's code holds {held} bytes allocated during the campaign"
    assert rss_after - rss_before < 64 * 1024, (rss_before, rss_after)
    if rounds >= 4:  # steady state: the second half of the campaign does not keep growing
        half = rounds // 2
        assert max(rss_rounds[half:]) - max(rss_rounds[:half]) < 16 * 1024, rss_rounds
    return stats


# --- the tests -----------------------------------------------------------------------------------------

PREFIX = [
    (("send", b"abc"), (0, (), 0)),
    (("get_ip",), (1, (3,), 100)),
    (("log", b"hi\n", "info", [b"user", b"root"]), (3, (), 0)),
]
# Every ending at least once, whatever hypothesis happens to draw.
CATALOGUE: list[tuple[Any, ...]] = [
    ("badargs", "recv", [0], 0),
    ("badargs", "recv", [10.0], 0),
    ("badargs", "recv", [True], 0),
    ("badargs", "send", ["text, not bytes"], 1),
    ("badargs", "send", [b"x" * 70_000, 1], 2),
    ("badargs", "log", [b"x", "critical", []], 0),
    ("badargs", "log", [b"m" * (LOG_MAX + 2), "info", []], 0),
    ("badargs", "log", [b"x", "info"], 0),
    ("badargs", "log", [b"x", "info", [b"Bad", 1]], 0),
    ("badargs", "log", [b"x", "info", [b"a", 1, b"a", 2]], 0),
    ("badargs", "log", [b"x", "info", [b"a", 1.0]], 0),
    ("badargs", "log", [b"x", "info", [b"a", b"v" * (FIELD_MAX + 2)]], 0),
    ("badargs", "set_limits", [-1, 0], 3),
    ("badargs", "set_limits", [LIMIT_MAX + 1, 0], 3),
    ("badargs", "set_tarpit", [0, TARPIT_MAX + 1], 0),
    ("badargs", "sleep", [SLEEP_MAX + 1], 2),
    ("badargs", "sleep", [-1], 0),
    ("badargs", "done", ["pwned", b""], 0),
    ("badargs", "done", ["return", "text"], 0),
    ("unknown", "exec", [b"/bin/sh"], 0),
    ("unknown", "ready", [], 0),
    ("unknown", "start", [b"source"], 0),
    ("unknown", b"send", [b"x"], 0),
    ("unknown", None, [], 0),
    *[("other", request, 0) for request in OTHER_CONNECTIONS],
    ("notarray", 42, 0),
    ("notarray", [], 0),
    ("notarray", {}, 0),
    ("notarray", msgpack.ExtType(1, b""), 0),
    ("overlimit", b"\xdd\xff\xff\xff\xff"),
    ("overlimit", enc(["s" * (STR_MAX + 1)])),
    ("overlimit", msgpack.packb({"op": "send"})),
    ("overlimit", msgpack.packb(msgpack.ExtType(1, b"pickle?"))),
    ("overlimit", enc(["send", *range(ARRAY_MAX)])),
    ("nested", b"\x94" * 300_000 + b"\x90" * 4),
    ("nested", b"\x91" * 1000 + b"\xc0"),
    ("nested", enc(["send", [[b"x"]]])),
    ("nested", enc(["log", b"x", "info", [[b"k", b"v"]]])),
    ("random", b"\xc1\xc1\xc1"),
    ("random", b"\xc4\x80abc"),
    *[("truncated", ("send", b"abc"), 1, 4, how) for how in [("exit", 3), ("silent",), ("close-out",)]],
    ("truncated", ("log", b"x" * 60, "warn", []), 0, 30, ("signal", signal.SIGSEGV)),
    ("two", ("get_ip",), ("get_ip",), 0),
    ("two", ("send", b"a"), ("done", "return", b""), 3),
    ("ahead", 100, ("send", b"early"), 0),
    *[("done", kind, message, 0) for kind in DONE_REASON for message in (b"", b"why\n")],
    ("halt", ("exit", 0)),
    ("halt", ("exit", 255)),
    *[("halt", ("signal", signum)) for signum in SIGNALS],
    ("halt", ("close-out",)),
    ("flood", b"\x00", 64),
    ("flood", enc(["get_ip"]), 8),
    ("huge",),
    ("silent",),
    ("noread", 60, 20_000),
]


def test_each_ending_once(broker: Broker) -> None:
    stats = Stats()
    drawn: list[tuple[Any, ...]] = [(PREFIX, 3, [], ending) for ending in CATALOGUE]
    for i in range(0, len(drawn), LANES):
        run_example(broker, drawn[i : i + LANES], stats)
    assert stats.sessions == len(CATALOGUE)
    assert stats.frames >= len(CATALOGUE) * 9
    print(f"\ncatalogue: {stats.frames} frames, reasons {dict(stats.reasons)}")


def test_fuzz_slice(broker: Broker) -> None:
    campaign(broker, rounds=2, examples=25, min_frames=5_000, trace=True)


@pytest.mark.slow
def test_fuzz_campaign(broker: Broker) -> None:
    campaign(broker, rounds=12, examples=50, min_frames=100_000, trace=False)
