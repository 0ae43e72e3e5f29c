"""bench/sinks.py runs end to end and prints a row per sink (its speed is not judged here)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_sinks_bench_prints_every_row() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "sinks.py"), "--events", "300"],
        capture_output=True, text=True, timeout=180, check=True, cwd=REPO,
    ).stdout  # fmt: skip
    assert re.search(r"^date: \d{4}-\d\d-\d\d \d\d:\d\d UTC$", out, re.M)
    assert re.search(r"^machine: .*cores", out, re.M)
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([\d,]+) \| [\d.]+ ms \| [\d.]+ us \|$", out, re.M))
    expected = {"baseline (no sink)", "file", "file + spool"}
    sbin = "/usr/sbin:/sbin"
    if shutil.which("rsyslogd", path=sbin) and shutil.which("openssl"):
        expected |= {"syslog+tcp", "syslog+tcp + spool", "syslog+tls", "syslog+tls + spool"}
    if shutil.which("nats-server", path=f"/usr/bin:{sbin}"):
        expected |= {"nats", "nats + spool"}
    if (Path(sys.executable).parent / "hpfeeds-broker").exists():
        expected |= {"hpfeeds", "hpfeeds + spool"}
    assert set(rows) == expected, out
