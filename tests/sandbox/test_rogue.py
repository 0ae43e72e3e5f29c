"""A compromised child: the real Server, Session, Monitor and ChildChannel in this process, with a pool
whose children are `rogue_child.py` — a stand-in for a script that gained native code execution and now
writes whatever it likes on its pipe. Each misbehaviour must end exactly its own session, with a reason,
while the broker keeps serving."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.server import Server
from deadend.config import Ceilings, Config
from deadend.logs import EventLog
from tests.conftest import FAKES, HOST, Lines, free_offset, read_all, rogue_spawner
from tests.fakes.rogue_child import RAW, SINGLE_FRAMES

ROGUE = FAKES / "rogue_child.py"


BEHAVIOURS = [
    "good",
    *SINGLE_FRAMES,
    *RAW,
    "two-requests",
    "ahead-of-reply",
    "flood",
    "truncated",
    "silent",
    "exit",
    "close-then-send",
]
PORT = {name: 1000 + i for i, name in enumerate(BEHAVIOURS)}


@pytest.fixture
def rogue(tmp_path: Path) -> Iterator[tuple[Server, Lines, int]]:
    for name, port in PORT.items():
        (tmp_path / f"{port}.lua").write_text(name)
    offset = free_offset(list(PORT.values()))
    ceilings = Ceilings(cpu_slice=0.5, linger_calls=20)
    config = Config(
        scripts=tmp_path,
        host=(HOST,),
        port_offset=offset,
        warm=0,
        ceilings=ceilings,
        allow_root=True,
        max_per_ip=1000,
        queue_size=16,
    )
    out = Lines()
    log = EventLog(out)  # type: ignore[arg-type]
    server = Server(config, log, spawner=rogue_spawner(ROGUE), handle_signals=False)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    thread.start()
    out.wait_for(r"ready: ")
    yield server, out, offset
    loop.call_soon_threadsafe(server.request_stop)
    thread.join(15)
    assert not thread.is_alive()
    loop.close()


def _session(offset: int, name: str) -> bytes:
    import socket

    with socket.create_connection((HOST, PORT[name] + offset), timeout=10) as s:
        return read_all(s, timeout=10)


EXPECTED = {
    name: "protocol-violation" for name in [*SINGLE_FRAMES, *RAW, "two-requests", "ahead-of-reply", "flood"]
}
EXPECTED |= {
    "truncated": "sandbox-crash",
    "exit": "sandbox-crash",
    "silent": "cpu-deadline",
    "close-then-send": "linger",
    "good": "done",
}


def test_each_misbehaviour_ends_only_its_own_session(rogue: tuple[Server, Lines, int]) -> None:
    server, out, offset = rogue
    bad = [name for name in BEHAVIOURS if name != "good"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        hostile = {name: pool.submit(_session, offset, name) for name in bad}
        # well-behaved sessions keep being served in the middle of it
        goods = [pool.submit(_session, offset, "good") for _ in range(6)]
        assert [g.result() for g in goods] == [b"good 127.0.0.1"] * 6
        for name, fut in hostile.items():
            data = fut.result()
            assert data in (b"", b"x"), f"{name}: {data[:50]!r}"
    for name in BEHAVIOURS:
        port = PORT[name] + offset
        reason = out.wait_for(rf"port={port} .*session end reason=(\S+)").group(1)
        assert reason == EXPECTED[name], f"{name}: {reason}"
    text = out.text()
    # one clear line per ended child, saying what it did wrong
    assert re.search(r"protocol-violation: unknown request 'exec'", text)
    assert re.search(r"protocol-violation: bad arguments to 'recv'", text)
    assert re.search(r"protocol-violation: a second request before the first was answered", text)
    assert re.search(r"protocol-violation: unreadable frame: BufferFull|unreadable frame", text)
    assert re.search(r"cpu-deadline: no API call within 0\.5s", text)
    assert re.search(r"sandbox-crash: exit status 3", text)
    # every session ended and every child is gone
    assert not server.sessions
    assert text.count("session end") == len(BEHAVIOURS) - 1 + 6


def test_flood_keeps_broker_memory_bounded(rogue: tuple[Server, Lines, int]) -> None:
    _server, out, offset = rogue

    def rss_kib() -> int:
        with open("/proc/self/status") as f:
            found = re.search(r"VmRSS:\s+(\d+)", f.read())
        assert found
        return int(found.group(1))

    before = rss_kib()
    for _ in range(5):
        _session(offset, "flood")
        _session(offset, "send-huge")
        _session(offset, "nested")
    deadline = time.monotonic() + 10
    while out.text().count("session end") < 15 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out.text().count("session end") == 15
    assert rss_kib() - before < 32 * 1024  # 100 MiB of hostile output, no more than a few MiB kept
