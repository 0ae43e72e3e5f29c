"""The pure parts, without sockets or processes: the wire schema, the monitor, the log sanitizer."""

from __future__ import annotations

import random

import msgpack
import pytest

from broker import monitor as m
from deadend import wire
from deadend.config import Ceilings
from deadend.logs import sanitize
from deadend.scripts import port_of

# --- wire ------------------------------------------------------------------------------------------

VALID = [
    ["send", b""],
    ["send", b"x" * wire.SEND_MAX],
    ["recv", 1],
    ["recv", 65535],
    ["sleep", 0],
    ["sleep", 3_600_000],
    ["get_ip"],
    ["log", b"m", "debug"],
    ["log", b"m" * (wire.LOG_MAX + 1), "error"],
    ["set_tarpit", 0, 60000],
    ["set_limits", 0, (1 << 63) - 1],
    ["close"],
    ["done", "error", b"boom"],
]
INVALID = [
    None,
    5,
    "send",
    [],
    {},
    [b"send", b"x"],
    ["SEND", b"x"],
    ["send"],
    ["send", "text"],
    ["send", b"x" * (wire.SEND_MAX + 1)],
    ["send", b"x", b"y"],
    ["recv", 0],
    ["recv", 65536],
    ["recv", True],
    ["recv", 1.0],
    ["recv", "1"],
    ["sleep", -1],
    ["sleep", 3_600_001],
    ["get_ip", 1],
    ["log", b"m", "critical"],
    ["log", "m", "info"],
    ["log", b"m" * (wire.LOG_MAX + 2), "info"],
    ["set_tarpit", 60001, 0],
    ["set_tarpit", 0],
    ["set_limits", -1, 0],
    ["set_limits", 1 << 63, 0],
    ["close", None],
    ["done", "pwned", b""],
    ["done", "return", "text"],
    ["exec", b"/bin/sh"],
]


@pytest.mark.parametrize("frame", VALID, ids=repr)
def test_valid_requests_parse(frame: list[object]) -> None:
    req = wire.parse_request(frame)
    assert req.op == frame[0] and list(req.args) == frame[1:]


@pytest.mark.parametrize("frame", INVALID, ids=lambda f: repr(f)[:40])
def test_invalid_requests_are_violations(frame: object) -> None:
    with pytest.raises(wire.ProtocolViolation):
        wire.parse_request(frame)


def test_unpacker_refuses_oversized_and_odd_frames() -> None:
    for data in (
        b"\xdd\xff\xff\xff\xff",  # array of 4 billion
        msgpack.packb({"a": 1}),  # maps are never sent by a child
        msgpack.packb(msgpack.ExtType(1, b"x")),
        msgpack.packb(["send", b"x" * (wire.SEND_MAX + 1)]),
    ):
        unpacker = wire.child_unpacker()
        with pytest.raises((ValueError, msgpack.exceptions.ExtraData, Exception)):
            unpacker.feed(data)
            list(unpacker)


def test_start_frame_roundtrip() -> None:
    start = wire.Start("run", b"src", "25.lua", (1, 2), 1 << 20, 1000, True)
    frame = msgpack.unpackb(wire.pack(start.to_frame()), raw=False)
    assert wire.Start.from_frame(frame) == start


# --- monitor ---------------------------------------------------------------------------------------


def monitor(**ceilings: float) -> m.Monitor:
    return m.Monitor("192.0.2.1", Ceilings(**ceilings), random.Random(1), now=0.0)  # type: ignore[arg-type]


def req(op: str, *args: object) -> wire.Request:
    return wire.parse_request([op, *args])


def test_recv_then_tarpit_delay() -> None:
    mon = monitor()
    assert mon.handle(req("set_tarpit", 100, 50), 0) == m.Reply(None)
    assert mon.handle(req("recv", 10), 0) == m.Recv(10)
    reply, delay = mon.received(b"abc", 0)
    assert reply == m.Reply(b"abc") and 0.1 <= delay <= 0.15
    assert mon.bytes_in == 3 and mon.recv_calls == 1


def test_recv_calls_limit_counts_from_the_start() -> None:
    mon = monitor()
    mon.handle(req("recv", 10), 0)
    mon.received(b"a", 0)
    mon.handle(req("set_limits", 2, 0), 0)
    mon.handle(req("recv", 10), 0)
    mon.received(b"b", 0)
    assert mon.handle(req("recv", 10), 0) == m.Reply(None)  # the third recv: nil, closed
    assert not mon.open and mon.closed_by == m.CLOSED_BY_LIMIT


def test_recv_bytes_limit_refuses_the_crossing_recv() -> None:
    mon = monitor()
    mon.handle(req("set_limits", 0, 5), 0)
    mon.handle(req("recv", 10), 0)
    assert mon.received(b"abcd", 0)[0] == m.Reply(b"abcd")
    mon.handle(req("recv", 10), 0)
    assert mon.received(b"ef", 0)[0] == m.Reply(None)
    assert mon.closed_by == m.CLOSED_BY_LIMIT and mon.bytes_in == 4


def test_close_is_terminal_for_io_and_idempotent() -> None:
    mon = monitor()
    assert mon.handle(req("close"), 0) == m.Reply(None)
    assert mon.handle(req("close"), 0) == m.Reply(None)
    assert mon.handle(req("send", b"x"), 0) == m.Reply(False)
    assert mon.handle(req("recv", 1), 0) == m.Reply(None)
    assert mon.handle(req("get_ip"), 0) == m.Reply(b"192.0.2.1")
    assert mon.handle(req("sleep", 5), 0) == m.Sleep(0.005)
    mon.carried_out()
    assert mon.closed_by == m.CLOSED_BY_SCRIPT


def test_empty_send_is_true_without_io_while_open() -> None:
    mon = monitor()
    assert mon.handle(req("send", b""), 0) == m.Reply(True)
    assert mon.handle(req("send", b"x"), 0) == m.Send(b"x")
    assert mon.sent(False, 1, 0) == m.Reply(False)
    assert mon.closed_by == m.CLOSED_BY_PEER


def test_linger_calls_end_the_session() -> None:
    mon = monitor(linger_calls=3)
    mon.close(m.CLOSED_BY_PEER, 0)
    for _ in range(3):
        assert mon.handle(req("recv", 1), 0) == m.Reply(None)
    assert isinstance(mon.handle(req("recv", 1), 0), m.End)


def test_a_second_request_while_one_is_carried_out_is_a_violation() -> None:
    mon = monitor()
    assert mon.handle(req("recv", 1), 0) == m.Recv(1)
    with pytest.raises(wire.ProtocolViolation):
        mon.handle(req("get_ip"), 0)


def test_log_rate_drops_and_counts() -> None:
    mon = monitor(log_rate=1.0, log_burst=2)
    results = []
    for _ in range(5):
        results.append(mon.handle(req("log", b"x", "info"), 0.0))
        if isinstance(results[-1], m.Log):
            mon.carried_out()
    assert sum(isinstance(r, m.Log) for r in results) == 2
    assert mon.take_dropped_logs() == 3 and mon.take_dropped_logs() == 0
    assert isinstance(mon.handle(req("log", b"x", "info"), 1.5), m.Log)  # refilled


def test_log_message_is_cut_with_a_flag() -> None:
    mon = monitor()
    action = mon.handle(req("log", b"y" * (wire.LOG_MAX + 1), "warn"), 0)
    assert isinstance(action, m.Log) and action.cut and len(action.message) == wire.LOG_MAX


def test_done_maps_to_reasons() -> None:
    assert monitor().handle(req("done", "instructions", b""), 0) == m.End(m.END_INSTRUCTIONS, b"")
    assert monitor().handle(req("done", "error", b"x"), 0) == m.End(m.END_SCRIPT_ERROR, b"x")


# --- log hygiene and names -------------------------------------------------------------------------


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
    ],
)
def test_sanitize(raw: bytes, shown: str) -> None:
    assert sanitize(raw) == shown


def test_sanitize_cuts_with_marker() -> None:
    assert sanitize(b"x" * 5000) == "x" * 4096 + "…[cut]"


@pytest.mark.parametrize(
    ("name", "port"),
    [("22.lua", 22), ("1.lua", 1), ("65535.lua", 65535), ("5222.lua", 5222)],
)
def test_valid_names(name: str, port: int) -> None:
    assert port_of(name) == port


@pytest.mark.parametrize(
    "name",
    [
        "ssh.lua",
        "22.txt",
        "00000.lua",
        "70000.lua",
        "022.lua",
        "0.lua",
        "65536.lua",
        "123456.lua",
        "22.lua.bak",
        " 22.lua",
        "22.LUA",
        "-1.lua",
    ],
)
def test_ignored_names(name: str) -> None:
    assert isinstance(port_of(name), str)


def test_call_rate_throttles_a_spinning_script() -> None:
    mon = monitor(call_rate=100.0, call_burst=10)
    delays = [mon.call_delay(0.0) for _ in range(20)]
    assert delays[:10] == [0.0] * 10  # the burst is free
    assert delays[10] == pytest.approx(0.01) and delays[-1] == pytest.approx(0.10)
    assert mon.call_delay(10.0) == 0.0  # refilled after a quiet spell


def test_gate_caps_per_source_and_globally() -> None:
    from broker.gate import Gate

    gate = Gate(max_connections=5, max_per_ip=2)
    assert gate.admit("192.0.2.1") is None and gate.admit("192.0.2.1") is None
    assert gate.admit("192.0.2.1") == m.END_PER_IP_LIMIT
    # one IPv6 host rotating addresses inside its /64 counts as one source
    assert gate.admit("2001:db8::1") is None and gate.admit("2001:db8::2") is None
    assert gate.admit("2001:db8::3") == m.END_PER_IP_LIMIT
    assert gate.admit("198.51.100.1") is None
    assert gate.admit("198.51.100.2") == m.END_CONN_LIMIT
    for ip in ("192.0.2.1", "192.0.2.1", "2001:db8::1", "2001:db8::2", "198.51.100.1"):
        gate.release(ip)
    assert gate.active == 0 and gate.per_ip == {}
    assert gate.refused == {m.END_PER_IP_LIMIT: 2, m.END_CONN_LIMIT: 1}
