"""Event sinks: delivery rate and CPU per 1,000 events for each sink, beside a baseline with no sink.

    python bench/sinks.py             # 20,000 events per row (a minute or so)
    python bench/sinks.py --events 2000

Method: the real collectors run on loopback (rsyslogd with an imtcp and a gtls listener, nats-server with
JetStream, the hpfeeds broker), started here with the test suite's launchers (tests/sinks/collectors.py)
and stopped at the end; a collector whose program is absent is left out, and the row says so. For each
sink URL, with and without a spool, a fresh SinkSet with that one sink is started on this script's event
loop and warmed up with one event. Then one publisher on the loop publishes a burst of N pre-built events
(a 420-byte session.end line each), yielding to the loop every 100 events as a busy broker would, and the
clock stops when the sink has confirmed the last one. Figures:

- delivered/s: N over the wall time from the first publish to the last confirmation;
- CPU per 1,000: this process's CPU time (all threads: loop, spool and disk threads; not the collector's)
  over the same window, per 1,000 events;
- publish(): the wall time spent inside the publish calls alone, per event (the loop's cost).

The baseline row runs the same burst through a SinkSet with no sink: what generating and handing over
the events costs without any delivery. Subtract it to get a sink's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pytest  # noqa: E402 (the collector launchers skip through it when a program is absent)

from deadend.sinks import OutEvent, SinkSet, Timing, parse_sink_url  # noqa: E402
from tests.sinks.collectors import HpfeedsBroker, NatsServer, Rsyslog, make_pki  # noqa: E402


def events(n: int) -> list[OutEvent]:
    out = []
    for i in range(n):
        ident = str(uuid.uuid4())
        record = {
            "v": 1, "id": ident, "time": "2026-11-25T16:35:55.529Z", "level": "info", "event": "session.end",
            "sensor": "bench-1", "port": 25, "conn": "96c319e43c7b", "peer": "203.0.113.9",
            "peer_port": 59636,
            "dst_ip": "198.51.100.4", "dst_port": 25, "reason": "done", "duration": 0.270427, "bytes_in": 24,
            "bytes_out": 205, "closed_by": "script", "limit": None, "n": i,
            "msg": "session end reason=done duration=0.270s bytes_in=24 bytes_out=205 closed_by=script",
        }  # fmt: skip
        body = json.dumps(record, separators=(",", ":")).encode("ascii")
        out.append(OutEvent(ident, record["time"], "info", "session.end", "bench-1", body))  # type: ignore[arg-type]
    return out


async def burst(url: str | None, batch: list[OutEvent], spool: Path | None) -> tuple[float, float, float]:
    """(delivered per second, CPU ms per 1,000 events, publish() microseconds per event)."""
    reports: list[str] = []
    specs = [parse_sink_url(url)] if url else []
    # A queue as long as the burst: without a spool, a shorter one would drop what the collector is slower
    # to take, and this measures delivery, not dropping.
    sinks = SinkSet(specs, spool_dir=spool, spool_max_bytes=1 << 30, queue_events=len(batch) + 1,
                    report=lambda level, line: reports.append(line), timing=Timing(proven=0.1))  # fmt: skip
    await sinks.start()
    done: Callable[[int], bool] = lambda n: all(s.delivered >= n for s in sinks.stats())  # noqa: E731
    try:
        sinks.publish(events(1)[0])
        await until(lambda: done(1), reports)
        wall, cpu, inside = time.perf_counter(), time.process_time(), 0.0
        for i, event in enumerate(batch):
            t = time.perf_counter()
            sinks.publish(event)
            inside += time.perf_counter() - t
            if i % 100 == 99:
                await asyncio.sleep(0)
        await until(lambda: done(len(batch) + 1), reports)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert all(s.dropped == 0 for s in sinks.stats()), sinks.stats()
    finally:
        await sinks.close(5)
    return len(batch) / wall, cpu / len(batch) * 1e6, inside / len(batch) * 1e6


async def until(condition: Callable[[], bool], reports: list[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not delivered in {timeout} s: {reports[-3:]}")
        await asyncio.sleep(0.002)


def collectors(folder: Path) -> tuple[dict[str, str | None], list[Callable[[], None]]]:
    """URL per sink name (None: absent, with why in the name's place), and how to stop each collector."""
    urls: dict[str, str | None] = {"file": f"file://{folder / 'events.jsonl'}"}
    stops: list[Callable[[], None]] = []
    for name, start in [("syslog", _rsyslog), ("nats", _nats), ("hpfeeds", _hpfeeds)]:
        sub = folder / name
        sub.mkdir()
        try:
            found, stop = start(sub)
        except pytest.skip.Exception as e:
            urls[name] = None
            print(f"  {name}: left out ({e.msg})")
            continue
        urls.update(found)
        stops.append(stop)
    return urls, stops


def _rsyslog(folder: Path) -> tuple[dict[str, str | None], Callable[[], None]]:
    pki = make_pki(folder)
    server = Rsyslog(folder, pki)
    return {
        "syslog+tcp": f"syslog+tcp://127.0.0.1:{server.tcp_port}?max_message=65536",
        "syslog+tls": f"syslog+tls://localhost:{server.tls_port}?ca={pki.ca}&max_message=65536",
    }, server.stop


def _nats(folder: Path) -> tuple[dict[str, str | None], Callable[[], None]]:
    server = NatsServer(folder)
    return {"nats": f"nats://127.0.0.1:{server.port}/deadend.bench"}, server.stop


def _hpfeeds(folder: Path) -> tuple[dict[str, str | None], Callable[[], None]]:
    broker = HpfeedsBroker(folder)
    return {"hpfeeds": broker.url()}, broker.stop


def machine() -> str:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    python = platform.python_version()
    return f"{platform.node()}, {os.cpu_count()} cores, {model}, Linux {platform.release()}, Python {python}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()
    print(__doc__)
    print(f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {machine()}")
    batch = events(args.events)
    with tempfile.TemporaryDirectory(prefix="deadend-bench-sinks-") as tmp:
        folder = Path(tmp)
        urls, stops = collectors(folder)
        try:
            rows: list[tuple[str, str | None, Path | None]] = [("baseline (no sink)", None, None)]
            for name, url in urls.items():
                if url is None:
                    continue
                rows.append((name, url, None))
                rows.append((f"{name} + spool", url, folder / f"spool-{name}"))
            print(f"\nN = {args.events:,} events per row\n")
            print("| sink | delivered/s | CPU per 1,000 events | publish() per event |")
            print("|---|---|---|---|")
            for label, url, spool in rows:
                rate, cpu, inside = await burst(url, batch, spool)
                print(f"| {label} | {rate:,.0f} | {cpu:.1f} ms | {inside:.1f} us |", flush=True)
        finally:
            for stop in stops:
                stop()


if __name__ == "__main__":
    asyncio.run(main())
