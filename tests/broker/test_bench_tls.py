"""bench/tls.py runs end to end and prints each of its figures (their values are not judged here)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO

FIGURES = (
    "TTFB of GET /, one client, p50",
    "TTFB of GET /, one client, p99",
    "broker process CPU per session (8 clients)",
    "all processes' CPU per session (8 clients)",
    "TLS adds, broker process",
    "the broker's own account: CPU per handshake (metrics)",
)


def test_bench_tls_prints_every_figure() -> None:
    run = subprocess.run(
        [sys.executable, "bench/tls.py", "--sessions", "12", "--rounds", "6", "--key-type", "ecdsa"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert re.search(r"Run \d{4}-\d\d-\d\d \d\d:\d\d UTC on \d+-core ", run.stdout)
    for figure in FIGURES:
        row = re.search(rf"^\| ecdsa \| {re.escape(figure)} \| (-?[\d.]+) ms \|", run.stdout, re.M)
        assert row, (figure, run.stdout[-2000:])
    assert float(re.search(r"CPU per handshake \(metrics\) \| ([\d.]+) ms", run.stdout).group(1)) > 0  # type: ignore[union-attr]
