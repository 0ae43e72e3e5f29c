"""The spool with a real collector (nats-server): events survive a broker restart and an outage, and a
full spool drops the oldest events, counted, with the broker's memory bounded."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable
from pathlib import Path

from tests.sinks.collectors import (
    HOST,
    NatsServer,
    Reports,
    free_port,
    make_event,
    rss_kib,
    run,
    sink_set,
    until,
)
from tests.sinks.test_sinks_nats import SUBJECT, stored


def test_a_new_sink_set_delivers_what_the_last_one_spooled(
    nats_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    port = free_port()
    url = f"nats://{HOST}:{port}/{SUBJECT}"
    spool = tmp_path / "spool"
    reports = Reports()
    events = [make_event(i) for i in range(1200)]

    async def first_run() -> None:  # the collector is down the whole time
        sinks = sink_set([url], reports, spool_dir=spool, queue_events=100)
        await sinks.start()
        for event in events[:1000]:
            sinks.publish(event)
        await until(lambda: sinks.stats()[0].spooled + sinks.stats()[0].queued == 1000)
        await until(lambda: bool(reports.matching(" down: ")))
        await sinks.close(0.2)

    run(first_run)
    assert reports.matching("1,000 undelivered events stay in the spool"), reports.lines
    [down] = reports.matching(" down: ")
    assert down.endswith(" down: connection refused; spooling"), down
    [folder] = list(spool.iterdir())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in folder.iterdir())
    server = nats_factory(port=port)

    async def second_run() -> list[tuple[str, dict[str, object]]]:
        sinks = sink_set([url], reports, spool_dir=spool, queue_events=100)
        await sinks.start()
        for event in events[1000:]:
            sinks.publish(event)
        await until(lambda: sinks.stats()[0].delivered >= 200 and sinks.stats()[0].spooled == 0)
        await until(lambda: sinks.stats()[0].queued == 0)
        await sinks.close(2)
        return await stored(server)

    messages = run(second_run)
    assert [ident for ident, _ in messages] == [e.id for e in events]


def test_a_full_spool_drops_the_oldest_counted_and_memory_stays_bounded(
    nats_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    port = free_port()
    url = f"nats://{HOST}:{port}/{SUBJECT}"
    reports = Reports()
    total = 60_000
    cap = 1 << 20

    async def main() -> list[tuple[str, dict[str, object]]]:
        sinks = sink_set([url], reports, spool_dir=tmp_path / "spool", spool_max_bytes=cap, queue_events=1000)
        await sinks.start()
        before = rss_kib()
        peak = 0
        for i in range(total):  # about 66 MB of events, the collector away
            sinks.publish(make_event(i, size=1000))
            if i % 200 == 0:  # paced for the disk: this test is about the cap, not a slow disk
                await asyncio.sleep(0.002)
                peak = max(peak, rss_kib() - before)
        await until(lambda: sinks.stats()[0].queued + sinks.stats()[0].spooled < 2000)
        assert peak < 32 << 10, f"RSS grew by {peak} KiB while 66 MB were published"
        server = nats_factory(port=port)
        await until(lambda: sinks.stats()[0].delivered + sinks.stats()[0].dropped == total, 20)
        stats = sinks.stats()[0]
        assert stats.queued == stats.spooled == 0, stats
        assert stats.dropped > total * 0.9
        await sinks.close(2)
        spool_bytes = sum(f.stat().st_size for f in (tmp_path / "spool").rglob("*.seg"))
        assert spool_bytes <= cap
        return await stored(server)

    messages = run(main)
    numbers = [int(body["n"]) for _, body in messages]  # type: ignore[call-overload]
    assert numbers == sorted(set(numbers)) and numbers[0] > 0  # in order, the oldest gone
    if not reports.matching("does not keep up"):
        assert numbers == list(range(numbers[0], total))  # the newest ones, none missing
    assert len(reports.matching("spool full (1,048,576 bytes): oldest events dropped")) == 1, reports.lines
    assert os.path.isdir(tmp_path / "spool")
