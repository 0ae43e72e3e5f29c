"""Ceilings the broker enforces whatever the script does; each ends only the session that hits it."""

from __future__ import annotations

import re
import time

from tests.conftest import read_all

GOOD = 'deadend.send("good:" .. deadend.recv(10))'


def _good(b) -> bytes:
    with b.connect(7) as s:
        s.sendall(b"ping")
        return read_all(s)


def _end_reason(b, port: int, timeout: float = 15) -> str:
    return b.wait_for(rf"port={b.port(port)} .*session end reason=(\S+)", timeout).group(1)


def test_session_cpu_rlimit_sigxcpu(make_broker) -> None:
    # Work split into small slices with API calls between them: no per-slice ceiling fires, the total does.
    b = make_broker(
        {"7.lua": GOOD, "8.lua": "while true do for i = 1, 2e6 do end deadend.sleep(0) end"},
        "--session-cpu",
        "1",
    )
    s = b.connect(8)
    assert _good(b) == b"good:ping"
    assert _end_reason(b, 8) == "cpu-limit"
    b.wait_for(r"cpu-limit: killed by SIGXCPU")
    assert read_all(s) == b""
    assert _good(b) == b"good:ping"


def test_instruction_budget_is_per_slice(make_broker) -> None:
    b = make_broker(
        {
            "7.lua": GOOD,
            # 20 slices of ~60k instructions each: fine under a 100k budget that resets at each call
            "8.lua": "for n = 1, 20 do local x = 0 for i = 1, 15000 do x = x + i end deadend.sleep(0) end "
            "deadend.send('ok')",
            "9.lua": "local x = 0 for i = 1, 1e7 do x = x + i end deadend.send('unreachable')",
        },
        "--instructions",
        "100000",
    )
    with b.connect(8) as s:
        assert read_all(s) == b"ok"
    with b.connect(9) as s:
        assert read_all(s) == b""
    assert _end_reason(b, 8) == "done"
    assert _end_reason(b, 9) == "instruction-limit"
    assert _good(b) == b"good:ping"


def test_memory_ceiling(make_broker) -> None:
    b = make_broker(
        {
            "7.lua": GOOD,
            "8.lua": "local s = string.rep('x', 2 << 20) deadend.send(tostring(#s))",
            "9.lua": "local t = {} for i = 1, 1e8 do t[i] = ('x'):rep(64) .. i end",
        },
        "--memory",
        "8",
    )
    with b.connect(8) as s:
        assert read_all(s) == str(2 << 20).encode()
    with b.connect(9) as s:
        assert read_all(s) == b""
    assert _end_reason(b, 9) == "memory-limit"
    assert _good(b) == b"good:ping"


def test_session_time(make_broker) -> None:
    b = make_broker({"8.lua": "while true do deadend.sleep(50) end"}, "--session-time", "0.6")
    start = time.monotonic()
    with b.connect(8) as s:
        assert read_all(s) == b""
    assert 0.5 < time.monotonic() - start < 5
    assert _end_reason(b, 8) == "session-time"


def test_linger_after_close(make_broker) -> None:
    # The script closed its connection but keeps running: ended after --linger seconds.
    b = make_broker(
        {"8.lua": "deadend.send('bye') deadend.close() while true do deadend.sleep(50) end"},
        "--linger",
        "0.5",
    )
    with b.connect(8) as s:
        assert read_all(s) == b"bye"
    b.wait_for(r"session end reason=linger .*closed_by=script")


def test_linger_calls_after_peer_left(make_broker) -> None:
    # recv keeps returning nil after the peer left; a script that ignores it is ended quickly.
    b = make_broker({"8.lua": "while true do deadend.recv(10) end"}, "--linger-calls", "50")
    start = time.monotonic()
    s = b.connect(8)
    s.close()
    b.wait_for(r"session end reason=linger .*closed_by=peer")
    b.wait_for(r"linger: kept calling send/recv after the peer was done")
    assert time.monotonic() - start < 5


def test_capacity_queue_then_refuse(make_broker) -> None:
    b = make_broker(
        {"7.lua": GOOD},
        "--workers",
        "1",
        "--warm",
        "1",
        "--queue-timeout",
        "0.4",
        "--queue-size",
        "1",
        "--max-per-ip",
        "8",  # one client address queues here; the default cap (a quarter of one worker) would refuse it
    )
    holder = b.connect(7)  # takes the only sandbox and waits in recv
    b.wait_for(r"connect from")
    time.sleep(0.1)
    queued = b.connect(7)
    b.wait_for(r"no sandbox free for port \d+; queued")
    time.sleep(0.05)
    overflow = b.connect(7)  # the queue (size 1) is full: refused at once
    assert read_all(overflow) == b""
    b.wait_for(r"refused: no sandbox free and the queue is full")
    b.wait_for(r"session end reason=queue-full")
    assert read_all(queued) == b""  # waited 0.4 s, then closed
    b.wait_for(r"refused: no sandbox free within 0.4s")
    b.wait_for(r"session end reason=capacity")
    holder.sendall(b"hold")
    assert read_all(holder) == b"good:hold"


def test_queued_connection_is_served_when_a_slot_frees(make_broker) -> None:
    b = make_broker(
        {"7.lua": GOOD}, "--workers", "1", "--warm", "1", "--queue-timeout", "5", "--max-per-ip", "8"
    )
    holder = b.connect(7)
    b.wait_for(r"connect from")
    time.sleep(0.1)
    waiting = b.connect(7)
    b.wait_for(r"no sandbox free for port \d+; queued")
    waiting.sendall(b"y")
    holder.sendall(b"x")
    assert read_all(holder) == b"good:x"
    assert read_all(waiting) == b"good:y"
    b.wait_for(r"dequeued after \d+ms")


def test_api_call_rate_throttles_spinning_scripts(make_broker) -> None:
    # A script spinning on cheap calls is slowed to --call-rate, so it cannot monopolise the broker.
    spin = "local n = 0 while true do deadend.get_ip() n = n + 1 if n % 100 == 0 then deadend.log(n) end end"
    b = make_broker({"7.lua": GOOD, "8.lua": spin}, "--call-rate", "200", "--session-time", "2")
    start = time.monotonic()
    s = b.connect(8)
    assert _good(b) == b"good:ping"
    assert _end_reason(b, 8) == "session-time"
    elapsed = time.monotonic() - start
    counts = [int(x) for x in re.findall(r'script: "(\d+)"$', "\n".join(b.lines), re.M)]
    # burst (2x rate) plus the rate over the session, with slack for timing
    assert max(counts) <= 400 + 200 * elapsed + 100, (max(counts), elapsed)
    assert max(counts) >= 200  # it did run
    s.close()


def test_cpu_slice_holds_on_a_worker_forked_a_moment_ago(make_broker) -> None:
    """The deadline of a slice that starts right after a worker's start-up: the timer of the start-up
    wait (5 s) must not outlive it and stretch a 1 s slice."""
    bomb = 'deadend.send("go\\n") string.find(string.rep("a", 3000), ".-.-.-.-b$")'
    b = make_broker({"9.lua": bomb}, "--cpu-slice", "1", "--warm", "0")
    with b.connect(9) as s:
        s.settimeout(5)
        assert s.recv(3) == b"go\n"
        started = time.monotonic()
        assert read_all(s, 10) == b""
        took = time.monotonic() - started
    assert _end_reason(b, 9) == "cpu-deadline"
    assert took < 2.5, f"killed after {took:.1f} s for a 1 s slice"
