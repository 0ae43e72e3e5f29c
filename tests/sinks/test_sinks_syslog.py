"""syslog+tcp and syslog+tls sinks against a real rsyslogd (imtcp, gtls), and against hostile fakes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

from deadend.sinks.rfc5424 import SEVERITY
from tests.sinks.collectors import (
    HOST,
    Pki,
    Reports,
    Rsyslog,
    all_delivered,
    first_seen,
    make_event,
    raw_server,
    rss_kib,
    run,
    sink_set,
    until,
)


def test_rsyslog_parses_every_field_over_tcp_and_tls(rsyslog: Rsyslog, pki: Pki) -> None:
    levels = ["debug", "info", "warn", "error"] * 5
    events = [make_event(i, level=level, sensor="edge-7.example") for i, level in enumerate(levels)]
    reports = Reports()

    async def main() -> None:
        urls = [f"syslog+tcp://{HOST}:{rsyslog.tcp_port}?facility=local3",
                f"syslog+tls://localhost:{rsyslog.tls_port}?ca={pki.ca}"]  # fmt: skip
        sinks = sink_set(urls, reports)
        await sinks.start()
        for event in events:
            sinks.publish(event)
        await until(all_delivered(sinks, len(events)))
        await until(lambda: all(s.up for s in sinks.stats()))
        await sinks.close(5)

    run(main)
    rows = rsyslog.wait_received(2 * len(events))
    assert len(rows) == 2 * len(events)
    by_body: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_body.setdefault(row["msg"], []).append(row)
    for event in events:
        got = by_body[event.body.decode()]
        assert len(got) == 2  # one over TCP, one over TLS
        facilities = sorted(row["syslogfacility-text"] for row in got)
        assert facilities == ["daemon", "local3"]
        for row in got:
            facility = 19 if row["syslogfacility-text"] == "local3" else 3
            assert row["pri"] == str(facility * 8 + SEVERITY[event.level])
            severity = {"warn": "warning", "error": "err"}.get(event.level, event.level)
            assert row["syslogseverity-text"] == severity
            assert row["timereported:::date-rfc3339"] == "2026-11-25T16:35:55.259Z"
            assert row["hostname"] == "edge-7.example"
            assert row["app-name"] == "deadend"
            assert row["procid"] == str(os.getpid())
            assert row["msgid"] == "session.end"
            assert row["structured-data"] == "-"
            assert json.loads(row["msg"])["id"] == row["$!id"] == event.id
    ups = reports.matching(" up")
    assert len(ups) == 2 and reports.matching("certificate sha256:"), reports.lines


def test_wrong_ca_is_one_line_and_spooling(rsyslog: Rsyslog, pki: Pki, tmp_path: Path) -> None:
    reports = Reports()

    async def main() -> None:
        url = f"syslog+tls://localhost:{rsyslog.tls_port}?ca={pki.other_ca}"
        sinks = sink_set([url], reports, spool_dir=tmp_path / "spool")
        await sinks.start()
        for i in range(50):
            sinks.publish(make_event(i))
        await asyncio.sleep(2.0)  # several attempts at FAST's back-off
        stats = sinks.stats()[0]
        assert not stats.up and stats.delivered == 0
        assert stats.queued + stats.spooled == 50 and stats.dropped == 0
        assert stats.last_error is not None and "certificate" in stats.last_error
        await sinks.close(0.5)

    run(main)
    downs = reports.matching(" down: ")
    assert len(downs) == 1, reports.lines
    assert "TLS certificate not accepted" in downs[0] and downs[0].endswith("; spooling")
    assert reports.matching("50 undelivered events stay in the spool")
    assert rsyslog.received() == []


def test_outage_mid_stream_every_event_arrives_in_order(rsyslog: Rsyslog, tmp_path: Path) -> None:
    reports = Reports()
    events = [make_event(i) for i in range(3000)]

    async def main() -> None:
        sinks = sink_set([f"syslog+tcp://{HOST}:{rsyslog.tcp_port}"], reports, spool_dir=tmp_path / "spool")
        await sinks.start()
        loop = asyncio.get_running_loop()
        stopped = restarted = 0.0
        for i, event in enumerate(events):  # about 8 s of events, with the collector away for 5.5 s
            sinks.publish(event)
            if i % 10 == 9:
                await asyncio.sleep(0.025)
            if i == 600:
                await loop.run_in_executor(None, rsyslog.stop)
                stopped = loop.time()
            if stopped and not restarted and loop.time() - stopped >= 5.5:
                assert reports.matching(" down: ") and i < len(events) - 200
                await loop.run_in_executor(None, rsyslog.start)
                restarted = loop.time()
        assert restarted, "the stream ended before the outage did"
        await until(all_delivered(sinks, len(events)), 20)
        await sinks.close(5)

    run(main)
    rows = rsyslog.wait_received(len(events))
    ids = [json.loads(row["msg"])["id"] for row in rows]
    assert first_seen(ids) == [e.id for e in events]  # all of them, in order, once after de-duplication
    assert len(reports.matching(" down: ")) == 1, reports.lines
    again = reports.matching(" up again after ")
    assert len(again) == 1 and "events to deliver" in again[0], reports.lines


def test_stalled_collector_does_not_stall_publish(tmp_path: Path) -> None:
    """A raw TCP server that accepts and never reads: publish() stays O(1), memory stays bounded."""

    def hold(conn: socket.socket) -> bool:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        return True  # kept open, never read

    reports = Reports()
    slowest = 0.0

    async def main(port: int) -> None:
        nonlocal slowest
        url = f"syslog+tcp://{HOST}:{port}?max_message=65536"
        spool = tmp_path / "spool"
        sinks = sink_set([url], reports, spool_dir=spool, spool_max_bytes=8 << 20, queue_events=1000)
        await sinks.start()
        before = rss_kib()
        for i in range(40_000):  # 40 MB of events at a collector that takes none
            event = make_event(i, size=1000)
            t = time.perf_counter()
            sinks.publish(event)
            slowest = max(slowest, time.perf_counter() - t)
            if i % 500 == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(3.0)  # the sink's stall timeout (2 s) passes
        stats = sinks.stats()[0]
        grown = rss_kib() - before
        assert not stats.up
        assert stats.dropped > 0 and stats.queued <= 1000 + 512  # the cache and one batch in flight
        assert grown < 40 << 10, f"RSS grew by {grown} KiB"
        await sinks.close(0.5)

    with raw_server(hold) as port:
        run(lambda: main(port))
    assert slowest < 0.05, f"one publish() took {slowest * 1000:.1f} ms"
    downs = reports.matching(" down: ")
    assert len(downs) == 1 and "stalled" in downs[0], reports.lines
    assert reports.matching("spool full"), reports.lines


def test_collector_that_talks_back_is_dropped_with_backoff(tmp_path: Path) -> None:
    """Something on the port that answers (not a syslog server): one down line, retried with back-off."""
    accepted: list[float] = []

    def banner(conn: socket.socket) -> bool:
        accepted.append(time.monotonic())
        conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        return False  # closed at once

    reports = Reports()

    async def main(port: int) -> None:
        sinks = sink_set([f"syslog+tcp://{HOST}:{port}"], reports)
        await sinks.start()
        sinks.publish(make_event(0))
        await asyncio.sleep(3.0)
        assert sinks.stats()[0].queued == 1
        await sinks.close(0.2)

    with raw_server(banner) as port:
        run(lambda: main(port))
    downs = reports.matching(" down: ")
    assert len(downs) == 1, reports.lines
    assert "sent" in downs[0] or "closed" in downs[0], downs
    # FAST backs off up to 0.5 s: about 8 attempts in 3 s, not hundreds.
    assert 2 <= len(accepted) <= 15, len(accepted)


def test_event_over_the_frame_limit_is_a_counted_drop(rsyslog: Rsyslog) -> None:
    reports = Reports()
    events = [make_event(0), make_event(1, size=9000), make_event(2)]

    async def main() -> None:
        sinks = sink_set([f"syslog+tcp://{HOST}:{rsyslog.tcp_port}"], reports)  # the default 8192-byte limit
        await sinks.start()
        for event in events:
            sinks.publish(event)
        await until(all_delivered(sinks, 2))
        stats = sinks.stats()[0]
        assert stats.dropped == 1 and stats.queued == 0
        await sinks.close(2)

    run(main)
    rows = rsyslog.wait_received(2)
    assert [json.loads(r["msg"])["n"] for r in rows] == [0, 2]
    [line] = reports.matching("dropped:")
    assert events[1].id in line and "over the syslog message limit of 8192" in line


def test_tcp_and_tls_on_uvloop(rsyslog: Rsyslog, pki: Pki) -> None:
    """--event-loop uvloop: its transports are not asyncio's classes, and its SSL has other insides."""
    import uvloop

    events = [make_event(i) for i in range(500)]
    reports = Reports()

    async def main() -> None:
        urls = [
            f"syslog+tcp://{HOST}:{rsyslog.tcp_port}",
            f"syslog+tls://localhost:{rsyslog.tls_port}?ca={pki.ca}",
        ]
        sinks = sink_set(urls, reports)
        await sinks.start()
        for event in events:
            sinks.publish(event)
        await until(all_delivered(sinks, len(events)))
        await sinks.close(2)

    run(main, loop_factory=uvloop.new_event_loop)
    rows = rsyslog.wait_received(2 * len(events))
    assert sorted(row["$!id"] for row in rows) == sorted([e.id for e in events] * 2)
    assert not reports.matching(" down: "), reports.lines
