"""Soak: mixed benign and hostile traffic for a bounded time, then proof that nothing was lost or leaked.

Every accepted connection must have exactly one session-end line with a reason, no sandbox may outlive
its session, and the broker's descriptors, processes and memory must return to their idle values.
The default suite runs a short slice; `-m slow` runs the long one (DEADEND_SOAK_SECONDS overrides).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import DATA, EXAMPLES, descendants, read_all

HOSTILE = DATA / "hostile"
MIX = {
    "7.lua": 'local d = deadend.recv(100) if d then deadend.send("echo:" .. d) end',
    "8.lua": (HOSTILE / "cpu_plain.lua").read_text(),
    "9.lua": (HOSTILE / "mem_table.lua").read_text(),
    "10.lua": (HOSTILE / "cpu_pattern_find.lua").read_text(),
    "11.lua": (HOSTILE / "api_recv_after_close_loop.lua").read_text(),
    "12.lua": (HOSTILE / "log_flood.lua").read_text(),
}
FLAGS = (
    "--cpu-slice",
    "1",
    "--memory",
    "16",
    "--instructions",
    "5000000",
    "--session-time",
    "3",
    "--linger",
    "0.5",
    "--workers",
    "24",
    "--queue-size",
    "32",
    "--queue-timeout",
    "1",
    "--max-per-ip",
    "64",
)


def broker_stats(pid: int) -> tuple[int, int, int]:
    with open(f"/proc/{pid}/status") as f:
        found = re.search(r"VmRSS:\s+(\d+)", f.read())
    assert found
    rss = int(found.group(1))
    return len(os.listdir(f"/proc/{pid}/fd")), len(descendants(pid)), rss


def _client(b, stop: threading.Event, rng: random.Random, served: list[int], errors: list[str]) -> None:
    """Mixed traffic until `stop`. A benign conversation that fails is an error (kept, for the test to
    fail on: an assertion in this thread alone would only end the thread)."""
    while not stop.is_set():
        kind = rng.random()
        benign = kind < 0.60 or 0.85 <= kind < 0.95
        try:
            if kind < 0.35:  # benign echo
                with b.connect(7) as s:
                    s.sendall(b"hello")
                    assert read_all(s, timeout=10) == b"echo:hello"
            elif kind < 0.50:  # benign SMTP conversation against the shipped example
                with b.connect(25) as s:
                    s.settimeout(10)
                    assert s.recv(1024).startswith(b"220 ")
                    s.sendall(b"EHLO soak\r\nQUIT\r\n")
                    assert b"\r\n221 " in read_all(s, timeout=10)
            elif kind < 0.60:  # the SSH tarpit: take a line, leave
                with b.connect(22) as s:
                    s.settimeout(10)
                    assert s.recv(64).endswith(b"\r\n")
            elif kind < 0.75:  # hostile scripts
                with b.connect(rng.choice([8, 9, 10, 11, 12])) as s:
                    read_all(s, timeout=15)
            elif kind < 0.85:  # reset mid-conversation
                s = b.connect(25)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            elif kind < 0.95:  # half-close: the echo script gets the end of input and closes
                with b.connect(7) as s:
                    s.shutdown(socket.SHUT_WR)
                    assert read_all(s, timeout=10) == b""
            else:  # silent until the session time ceiling
                with b.connect(7) as s:
                    read_all(s, timeout=10)
            served[0] += 1
        except (OSError, AssertionError) as e:
            served[1] += 1
            if benign:
                errors.append(f"traffic kind {kind:.2f}: {e!r}")


def _settle(pid: int, idle: tuple[int, int, int], timeout: float = 20) -> tuple[int, int, int]:
    deadline = time.monotonic() + timeout
    now = broker_stats(pid)
    while time.monotonic() < deadline:
        now = broker_stats(pid)
        if now[0] <= idle[0] and now[1] <= idle[1]:
            break
        time.sleep(0.2)
    return now


def soak(make_broker, tmp_path: Path, seconds: float, clients: int) -> None:
    folder = tmp_path / "soak"
    folder.mkdir()
    for name in ("25.lua", "22.lua"):
        shutil.copy(EXAMPLES / name, folder / name)
    for name, source in MIX.items():
        (folder / name).write_text(source)
    b = make_broker(folder, *FLAGS)
    pid = b.proc.pid
    time.sleep(1.0)  # warm pool filled
    idle = broker_stats(pid)
    stop = threading.Event()
    served = [0, 0]
    errors: list[str] = []
    threads = [
        threading.Thread(target=_client, args=(b, stop, random.Random(i), served, errors))
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    after = _settle(pid, idle)
    assert b.proc.poll() is None, "the broker died"
    assert not errors, f"{len(errors)} benign conversations failed: {errors[:5]}"
    # nothing lost: one session-end line per accepted connection, each with a reason
    deadline = time.monotonic() + 20
    while True:
        text = "\n".join(b.lines)
        connects = len(re.findall(r"peer=\S+ connect from ", text))
        refused_at_accept = len(
            re.findall(r"session end reason=(?:conn-limit|per-ip-limit) duration=0\.000s", text)
        )
        ends = re.findall(r"session end reason=(\S+)", text)
        if len(ends) >= connects + refused_at_accept or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(ends) == connects + refused_at_accept, (len(ends), connects, refused_at_accept)
    assert connects >= seconds * 3, f"too little traffic: {connects}"
    assert not re.search(r"reason=(seccomp|sandbox-crash|protocol-violation)", text)
    # nothing leaked: descriptors and processes back to idle, memory within a few MiB of it
    fds, procs, rss = after
    assert fds <= idle[0], (idle, after)
    assert procs <= idle[1], (idle, after)
    assert rss - idle[2] < 16 * 1024, (idle, after)
    print(
        f"\nsoak {seconds:.0f}s, {clients} clients: {connects} connections, reasons "
        f"{ {r: ends.count(r) for r in sorted(set(ends))} }, client-side ok/err {served}, "
        f"broker fd/procs/RSS KiB idle {idle} after {after}"
    )


def test_soak_slice(make_broker, tmp_path: Path) -> None:
    soak(make_broker, tmp_path, seconds=12, clients=6)


@pytest.mark.slow
def test_soak_long(make_broker, tmp_path: Path) -> None:
    soak(make_broker, tmp_path, seconds=float(os.environ.get("DEADEND_SOAK_SECONDS", "180")), clients=12)
