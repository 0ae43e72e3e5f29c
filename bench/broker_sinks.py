"""The broker with each event sink on: its CPU per 1,000 events and the sessions' time to first byte,
beside the same run with stdout only, and with a collector that is gone for good.

    python bench/broker_sinks.py                 # 600 sessions per row
    python bench/broker_sinks.py --sessions 200

Method: for each row a fresh `deadend broker` process serves one script (a banner, four `deadend.log`
lines with fields, close: six events per session with connect and session.end), its stdout (JSON lines)
going to a file. The real collectors run on loopback, started with the test suite's launchers
(tests/sinks/collectors.py); a collector whose program is absent leaves its row out, and says so. One
client runs the sessions back to back from several 127.x addresses. Figures:

- CPU per 1,000 events: the broker process's user+system time (/proc/PID/stat, all its threads; not the
  sandboxes', which are other processes) from the first connection until every event was delivered
  (the sink's delivered counter, read from --metrics), over the events its stdout shows;
- TTFB p50 / p99: connect() to the banner's first byte, per session;
- delivered: events the sink confirmed, over the events written.

The "gone" row's sink points at a port where nothing listens: it spools (--spool) and never delivers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pytest  # noqa: E402 (the collector launchers skip through it when a program is absent)

from tests.sinks.collectors import HpfeedsBroker, NatsServer, Rsyslog, free_port, make_pki  # noqa: E402

HOST = "127.0.0.1"
SCRIPT = """
deadend.send("220 bench ESMTP\\r\\n")
for i = 1, 4 do deadend.log("probe", "info", {user = "root", password = "pw" .. i, n = i}) end
deadend.close()
"""
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def scrape(port: int) -> str:
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def delivered(text: str) -> int:
    return sum(int(float(v)) for v in re.findall(r"deadend_sink_delivered_total\{[^}]*\} (\S+)", text))


def run_row(
    folder: Path, sink: list[str], sessions: int, wait_delivery: bool
) -> tuple[float, float, float, str]:
    scripts = folder / "scripts"
    scripts.mkdir(exist_ok=True)
    (scripts / "25.lua").write_text(SCRIPT)
    metrics = free_port()
    offset = free_port() - 25
    out = folder / f"stdout-{time.monotonic_ns()}.jsonl"
    cmd = [sys.executable, "-m", "deadend", "broker", "--scripts", str(scripts), "--host", HOST,
           "--port-offset", str(offset), "--log-format", "json", "--metrics", f"{HOST}:{metrics}",
           "--max-per-ip", "1000", "--call-rate-total", "1e8", *sink]  # fmt: skip
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    with open(out, "w") as stdout:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while '"event":"broker.ready"' not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "the broker did not start"
            time.sleep(0.05)
        ttfb = []
        cpu0 = cpu_seconds(proc.pid)
        for i in range(sessions):
            started = time.perf_counter()
            with socket.create_connection((HOST, 25 + offset), source_address=(f"127.0.{i % 200}.2", 0)) as s:
                s.recv(1)
                ttfb.append(time.perf_counter() - started)
                while s.recv(4096):
                    pass
        written = 0
        deadline = time.monotonic() + 60
        while True:
            written = sum(1 for line in out.read_text().splitlines() if line.startswith("{"))
            enough = written >= 6 * sessions
            if enough and (not wait_delivery or delivered(scrape(metrics)) >= written - 10):
                break  # (the few broker events after the last scrape may still be on their way)
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        cpu = cpu_seconds(proc.pid) - cpu0
        got = delivered(scrape(metrics))
        shown = f"{got:,} of {written:,}" if sink else "—"
        return cpu / written * 1000, statistics.median(ttfb), statistics.quantiles(ttfb, n=100)[98], shown
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=600)
    args = parser.parse_args()
    print("# deadend bench: the broker with event sinks")
    print(f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}")
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, {platform.platform()}")
    print(f"method: {args.sessions} sessions per row, 6 events each; see bench/broker_sinks.py's docstring\n")
    with tempfile.TemporaryDirectory(prefix="deadend-bench-broker-sinks-") as tmp:
        folder = Path(tmp)
        stops = []
        rows: list[tuple[str, list[str], bool]] = [("stdout only", [], False)]
        rows.append(("file", ["--sink", f"file://{folder / 'events.jsonl'}"], True))
        try:
            pki = make_pki(folder)
            (folder / "rsyslog").mkdir()
            rsyslog = Rsyslog(folder / "rsyslog", pki)
            stops.append(rsyslog.stop)
            rows.append(("syslog+tcp (rsyslog)", ["--sink", f"syslog+tcp://{HOST}:{rsyslog.tcp_port}"], True))
            tls = f"syslog+tls://localhost:{rsyslog.tls_port}?ca={pki.ca}"
            rows.append(("syslog+tls (rsyslog)", ["--sink", tls], True))
        except pytest.skip.Exception as e:
            print(f"(rsyslog rows left out: {e})")
        try:
            (folder / "nats").mkdir()
            nats_server = NatsServer(folder / "nats")
            stops.append(nats_server.stop)
            rows.append(
                ("nats (JetStream)", ["--sink", f"nats://{HOST}:{nats_server.port}/deadend.events"], True)
            )
        except pytest.skip.Exception as e:
            print(f"(NATS row left out: {e})")
        try:
            (folder / "hpfeeds").mkdir()
            hpfeeds = HpfeedsBroker(folder / "hpfeeds")
            stops.append(hpfeeds.stop)
            rows.append(("hpfeeds", ["--sink", hpfeeds.url()], True))
        except pytest.skip.Exception as e:
            print(f"(hpfeeds row left out: {e})")
        dead = ["--sink", f"syslog+tcp://{HOST}:{free_port()}", "--spool", str(folder / "spool")]
        rows.append(("syslog+tcp, collector gone (spooling)", dead, False))
        try:
            print("| sinks | broker CPU per 1,000 events | TTFB p50 | TTFB p99 | delivered |")
            print("|---|---|---|---|---|")
            for label, sink, wait in rows:
                cpu, p50, p99, shown = run_row(folder, sink, args.sessions, wait)
                print(
                    f"| {label} | {cpu * 1000:.0f} ms | {p50 * 1000:.2f} ms | {p99 * 1000:.2f} ms | {shown} |"
                )
        finally:
            for stop in stops:
                stop()


if __name__ == "__main__":
    main()
