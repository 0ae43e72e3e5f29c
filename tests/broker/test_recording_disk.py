"""`broker --record` caps as the disk sees them: a real broker, real sessions, files counted by st_blocks."""

from __future__ import annotations

import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from deadend.recording import End, Truncated, read_recording
from tests.conftest import HOST, Broker

# Reads one byte per recv until the client is done: one recording line per byte.
ONE_BYTE_READER = """
deadend.send("ready\\n")
while true do
  if not deadend.recv(1) then break end
end
"""
WAIT_FOR_CLOSE = "deadend.recv(10)\n"


def du(folder: Path) -> int:
    """The folder's size on disk, as `du` counts it: its own blocks and its entries'."""
    return (folder.stat().st_blocks + sum(p.lstat().st_blocks for p in folder.iterdir())) * 512


def session_ends(b: Broker) -> int:
    return sum("session end reason=" in line for line in b.lines)


def wait_session_ends(b: Broker, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while session_ends(b) < n:
        assert time.monotonic() < deadline, f"{session_ends(b)} of {n} sessions ended"
        time.sleep(0.05)


def test_connect_and_close_sessions_stay_under_the_folder_cap_on_disk(make_broker, tmp_path: Path) -> None:
    rec, cap, sessions = tmp_path / "rec", 400_000, 200
    b = make_broker(
        {"25.lua": WAIT_FOR_CLOSE},
        *("--record", str(rec), "--record-max-bytes", str(cap)),
        *("--workers", "16", "--max-per-ip", "1000", "--queue-size", "1000", "--queue-timeout", "30"),
    )

    def connect_and_close(_: int) -> None:
        socket.create_connection((HOST, b.port(25)), timeout=10).close()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(connect_and_close, range(sessions)))
    wait_session_ends(b, sessions)
    assert sum("session end reason=done" in line for line in b.lines) == sessions
    b.wait_for(rf"recording stopped: the --record-max-bytes cap of {cap} bytes is reached")
    assert b.stop() == 0  # the recorder is flushed and closed: the folder is final
    files = list(rec.iterdir())
    # ~480 bytes each as written, 200 of them fit in 400 kB that way; a block each on disk, they do not.
    assert 20 < len(files) < sessions
    assert du(rec) <= cap, (du(rec), len(files))
    for path in files:
        assert read_recording(path).end is not None


def test_one_byte_reads_stay_within_the_session_cap_on_disk(make_broker, tmp_path: Path) -> None:
    rec, cap = tmp_path / "rec", 64 << 10
    b = make_broker({"25.lua": ONE_BYTE_READER}, "--record", str(rec), "--record-session-bytes", str(cap))
    with socket.create_connection((HOST, b.port(25)), timeout=10) as c:
        assert c.recv(100) == b"ready\n"
        c.sendall(b"x" * 3000)
        c.shutdown(socket.SHUT_WR)
        assert c.recv(100) == b""
    found = b.wait_for(r"conn=(\w+) .*session end reason=done .*bytes_in=3000 ")
    b.stop()
    (path,) = [p for p in rec.iterdir() if re.search(found.group(1), p.name)]
    assert path.stat().st_size <= cap and path.stat().st_blocks * 512 <= cap, path.stat()
    recording = read_recording(path)
    assert Truncated in {type(e) for e in recording.entries}
    assert isinstance(recording.end, End) and recording.end.bytes_in == 3000
