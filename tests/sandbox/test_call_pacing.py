"""--call-rate holds back every call past the burst, one answered at once included: a worker spinning on
cheap calls (tests/fakes/pacing_child.py, timing the broker's answers itself) gets them at the rate."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

from broker.server import Server
from deadend.config import Ceilings, Config
from deadend.logs import EventLog
from tests.conftest import FAKES, HOST, Lines, free_offset, read_all, rogue_spawner

CALLS, RATE = 600, 200.0  # a burst of 2 x RATE = 400 calls, then RATE a second: 200 calls take 1 s


def test_cheap_calls_past_the_burst_wait_for_their_turn(tmp_path: Path) -> None:
    (tmp_path / "1000.lua").write_text(str(CALLS))
    offset = free_offset([1000])
    config = Config(
        scripts=tmp_path,
        host=(HOST,),
        port_offset=offset,
        warm=0,
        ceilings=Ceilings(call_rate=RATE),
        call_rate_total=1e8,
        allow_root=True,
    )
    out = Lines()
    log = EventLog(out)  # type: ignore[arg-type]
    server = Server(config, log, spawner=rogue_spawner(FAKES / "pacing_child.py"), handle_signals=False)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    thread.start()
    try:
        out.wait_for(r"ready: ")
        with socket.create_connection((HOST, 1000 + offset), timeout=10) as s:
            seconds = float(read_all(s, timeout=10))
        assert seconds >= 0.8 * (CALLS - 2 * RATE) / RATE, seconds
    finally:
        loop.call_soon_threadsafe(server.request_stop)
        thread.join(15)
        loop.close()
    assert not thread.is_alive()
