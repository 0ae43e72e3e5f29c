"""Exactly one session-end line per accepted connection, whatever the moment shutdown begins: while the
connection is still sending its PROXY header, waiting in the queue for a sandbox, starting one, or in a
session. A property test: random mixes of clients, shutdown at a random moment once the broker holds them.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import AS_ROOT, HOST, Broker

# A banner, then wait for a line: at shutdown recv returns nil and the script ends.
SCRIPT = 'deadend.send("220 hi\\r\\n")\ndeadend.recv(100)\n'
HEADER = b"PROXY TCP4 198.51.100.%d 192.0.2.1 4%03d 25\r\n"
KINDS = ("silent", "partial", "header", "header")  # a full header makes a session, or queues for one


def accepted_by(pid: int, port: int) -> int:
    """Connections to `port` the process holds (accepted, not yet closed)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].split(":")[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=6, max_size=14), delay=st.floats(0.0, 0.6))
def test_every_accepted_connection_ends_once_whatever_the_moment_of_shutdown(
    make_broker: Callable[..., Broker], kinds: list[str], delay: float
) -> None:
    b = make_broker(
        {"25.lua": SCRIPT}, "--proxy-protocol", "--workers", "2", "--warm", "0", "--queue-size", "64",
        "--queue-timeout", "30", "--max-per-ip", "100", *AS_ROOT,
    )  # fmt: skip
    port = b.port(25)
    clients = []
    for i, kind in enumerate(kinds):
        c = socket.create_connection((HOST, port), timeout=5)
        b.sockets.append(c)
        if kind == "partial":
            c.sendall(HEADER[:14])
        elif kind == "header":
            c.sendall(HEADER % (i + 1, i))
        clients.append(c)
    deadline = time.monotonic() + 10
    while accepted_by(b.proc.pid, port) < len(kinds):
        assert time.monotonic() < deadline, (
            f"the broker accepted {accepted_by(b.proc.pid, port)} of {len(kinds)}"
        )
        time.sleep(0.02)
    time.sleep(delay)
    started = time.monotonic()
    assert b.stop(signal.SIGTERM) == 0
    took = time.monotonic() - started
    ends = Counter(re.findall(r"conn=([0-9a-f]{12}) .*session end reason=(\S+)", "\n".join(b.lines)))
    conns = Counter(conn for conn, _ in ends.elements())
    assert len(conns) == len(kinds), (kinds, delay, ends)
    assert all(n == 1 for n in conns.values()), ends
    reasons = Counter(reason for _, reason in ends)
    assert set(reasons) <= {"shutdown", "done"}, reasons
    # What had no session yet ends at once: shutdown waits only for the sessions' grace.
    assert took < 8, took
    for c in clients:
        c.close()
