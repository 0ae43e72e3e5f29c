"""`deadend replay` as a command, on hostile and huge recordings: no traceback, bounded memory, quiet
under `| head`. The `deadend` CLI runs as a subprocess (tests/unit/test_replay_hostile.py has the rest,
in-process)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import RECORDING_HEADER, REPO

HEADER = RECORDING_HEADER


def test_absurd_numbers_in_a_subprocess_leave_no_traceback(tmp_path: Path) -> None:
    for name, line in [
        ("inf", '{"t":1e400,"dir":"in","data":"x"}'),
        ("nan", '{"t":NaN,"dir":"in","data":"x"}'),
        ("deep", "[" * 100_000 + "]" * 100_000),
        ("digits", '{"t":1,"event":"gap","dropped_bytes":' + "9" * 100_000 + "}"),
        ("surrogate", '{"t":1,"event":"truncated","reason":"\\ud800\\u001b"}'),
    ]:
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(HEADER) + "\n" + line + "\n")
        for mode in ([], ["--transcript"]):
            cmd = [sys.executable, "-m", "deadend", "replay", str(path), *mode]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO)
            assert result.returncode == 2, (name, result.stderr)
            assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, (name, result.stderr)
            assert result.stderr.startswith(f"deadend: error: {path}:2: "), result.stderr


def test_a_fifo_is_refused_without_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    cmd = [sys.executable, "-m", "deadend", "replay", str(fifo)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO)  # no writer comes
    assert result.returncode == 2
    assert result.stderr == f"deadend: error: cannot read {fifo}: not a regular file\n"


MEASURE = """
import resource, subprocess, sys
with open(sys.argv[2], "wb") as out:
    replay = [sys.executable, "-m", "deadend", "replay", sys.argv[1], *sys.argv[3:]]
    code = subprocess.run(replay, stdout=out).returncode
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def big_recording(path: Path, size: int) -> None:
    """Mostly lines of text, some binary: what an HTTP flood looks like."""
    text = ("GET /" + "a" * 70 + " HTTP/1.1\r\n") * 700  # 61 kB of printable lines
    binary = base64.b64encode(bytes(range(256)) * 40).decode()  # 10 kB of bytes
    with open(path, "w") as f:
        f.write(json.dumps(HEADER) + "\n")
        t = 0.0
        while f.tell() < size:
            t += 0.001
            f.write(json.dumps({"t": round(t, 6), "dir": "in", "data": text}) + "\n")
            f.write(json.dumps({"t": round(t, 6), "dir": "out", "b64": binary}) + "\n")
        f.write(json.dumps({"t": t, "event": "end", "reason": "done", "bytes_in": 1, "bytes_out": 1}) + "\n")


@pytest.mark.parametrize("mode", [[], ["--transcript"]])
def test_a_50_mb_recording_is_replayed_in_bounded_memory(tmp_path: Path, mode: list[str]) -> None:
    path = tmp_path / "big.jsonl"
    big_recording(path, 50_000_000)
    out = tmp_path / "out.txt"
    cmd = [sys.executable, "-c", MEASURE, str(path), str(out), *mode]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    code, max_rss_kib = map(int, result.stdout.split())
    assert code == 0, result.stderr
    assert max_rss_kib < 64 * 1024, f"peak RSS {max_rss_kib / 1024:.1f} MiB"
    assert out.stat().st_size > 50_000_000  # it did print it all
    with open(out, "rb") as f:
        f.seek(-200, 2)
        tail = f.read()
    assert tail.endswith(b"end reason=done bytes_in=1 bytes_out=1\n" if not mode else b"= eof\n"), tail


def test_a_reader_that_leaves_early_is_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    big_recording(path, 2_000_000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "deadend", "replay", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"# ")  # `| head -1`
    proc.stdout.close()
    assert proc.wait(30) == 1
    with proc.stderr:
        assert proc.stderr.read() == b""
