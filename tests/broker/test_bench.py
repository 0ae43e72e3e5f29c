"""The benchmark harness runs end to end and prints every figure (its speed is not judged here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Every row bench/run.py prints, by key; True: the floors' columns (in-process, lean) hold numbers too.
ROWS = {
    "ttfb-seq-p50": True,
    "ttfb-seq-p99": True,
    "ttfb-conc-p50": True,
    "ttfb-conc-p99": True,
    "ttfb-seq-dense-p50": True,
    "ttfb-seq-dense-p99": True,
    "cpu-per-session": True,
    "faults-per-session": False,
    "zygote-faults-per-session": False,
    "cpu-per-session-dense": True,
    "sessions-per-second": True,
    "memory-per-session": True,
    "held-child-uss": False,
    "memory-dense": True,
    "cpu-dense-hold": True,
    "rpc-round-trip": True,
    "start-to-ready-p50": True,
    "start-to-ready-p99": True,
    "idle-warm-child-pss": False,
    "idle-warm-child-uss": False,
    "brokers-1": False,
    "brokers-2": False,
}
NUMBER = re.compile(r"^([\d,]+(?:\.\d+)?)( \S+)?$")  # "2.70 ms", "1,234 KiB", "278 /s", "681"
RATIO = re.compile(r"^\d+(\.\d+)?x$")
# PSS of the broker's non-dumpable processes can only be read as root (the harness then says so).
NEEDS_ROOT = {
    "memory-per-session",
    "held-child-uss",
    "memory-dense",
    "idle-warm-child-pss",
    "idle-warm-child-uss",
}
COLUMNS = ["figure", "deadend", "in-process", "lean", "÷ in-process", "÷ lean"]


def positive(cell: str) -> bool:
    """A figure: a number above zero (a zero is a measurement that did not happen), with its unit."""
    found = NUMBER.match(cell)
    return found is not None and float(found.group(1).replace(",", "")) > 0


def table(output: str) -> dict[str, list[str]]:
    """key -> [figure, deadend, in-process, lean, ÷ in-process, ÷ lean], from the first markdown table."""
    rows: dict[str, list[str]] = {}
    for line in output.split("\n\n", 2)[1].splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_quick_bench_prints_every_row_with_numbers() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table(proc.stdout)
    assert rows.pop("key") == COLUMNS
    assert set(rows) == set(ROWS), proc.stdout
    for key, has_floors in ROWS.items():
        _figure, deadend, in_process, lean, over_in_process, over_lean = rows[key]
        if key in NEEDS_ROOT and os.geteuid() != 0 and deadend.startswith("n/a"):
            continue
        assert positive(deadend), (key, deadend)
        if key == "cpu-dense-hold" and "0 cores" in (in_process, lean):
            continue  # --quick's short window can see no clock tick of a floor's CPU: no ratio then
        if has_floors:
            assert positive(in_process) and RATIO.match(over_in_process), (key, in_process, over_in_process)
            assert positive(lean) and RATIO.match(over_lean), (key, lean, over_lean)
    assert "method:" in proc.stdout and "machine:" in proc.stdout
    # The bench says when a server ended sessions for another reason than their end (refused, crashed):
    # the figures of such a run do not measure what they say.
    assert "also ended sessions with reason" not in proc.stdout, proc.stdout
    # The targets are printed, each with this run's figure (met or not is not judged here).
    targets = proc.stdout.split("targets (", 1)[1].split("method:", 1)[0]
    assert targets.count("| yes") + targets.count("| NO") == 10, targets
