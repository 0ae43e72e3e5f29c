"""Event sinks: every event delivered to the operator's collectors, nothing lost, nothing stalled.

The broker builds one SinkSet from the sink URLs (deadend/sinks/urls.py) and hands it each event once,
already serialised (OutEvent). Each sink has its own queue, optional on-disk spool, connection and
back-off (deadend/sinks/delivery.py), so a dead collector costs its own sink, never the event loop or the
other sinks. What "delivered" means per collector, the spool's format and the report lines:
docs/sinks.md.

    sinks = SinkSet([parse_sink_url(u) for u in urls], spool_dir=..., spool_max_bytes=..., queue_events=...,
                    report=lambda level, line: ...)
    await sinks.start()          # on the broker's loop
    sinks.publish(event)         # on the loop, per event: O(1), never blocks, never raises
    sinks.reopen()               # SIGUSR1
    await sinks.close(timeout)   # at shutdown
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from deadend.logs import sanitize
from deadend.sinks.delivery import Sink, SinkStats, Timing
from deadend.sinks.disk import DiskThread
from deadend.sinks.event import OutEvent, contract_breach
from deadend.sinks.spool import folder_key
from deadend.sinks.transport import Transport
from deadend.sinks.urls import SinkSpec, parse_sink_url

__all__ = ["OutEvent", "SinkSet", "SinkSpec", "SinkStats", "Timing", "parse_sink_url"]

SPOOL_MIN_BYTES: Final = 256 << 10


def _transport(spec: SinkSpec, disk: DiskThread, stream: str, timing: Timing) -> Transport:
    # Imported here: a broker without NATS sinks never loads nats-py, one without hpfeeds never needs it.
    if spec.scheme.startswith("syslog"):
        from deadend.sinks.to_syslog import SyslogTransport

        return SyslogTransport(spec, timeout=timing.timeout)
    if spec.scheme == "nats":
        from deadend.sinks.to_nats import NatsTransport

        return NatsTransport(spec, stream=stream, timeout=timing.timeout)
    if spec.scheme == "hpfeeds":
        from deadend.sinks.to_hpfeeds import HpfeedsTransport

        return HpfeedsTransport(spec, timeout=timing.timeout)
    from deadend.sinks.to_file import FileTransport

    return FileTransport(spec, disk, timeout=timing.timeout)


class SinkSet:
    """All configured sinks of one broker.

    `report(level, line)` hears one plain ASCII line per state change (a sink down, up again, dropping),
    always on the event loop's thread. ValueError for a configuration that cannot work (the same sink
    twice, the hpfeeds extra missing, a spool cap too small); OSError from start() for an unusable spool
    folder. A collector that is down is never an error: the sink reports it and waits for it.
    """

    def __init__(
        self,
        specs: Sequence[SinkSpec],
        *,
        spool_dir: Path | None,
        spool_max_bytes: int,
        queue_events: int,
        report: Callable[[str, str], None],
        stream: str = "DEADEND",
        timing: Timing | None = None,
    ) -> None:
        names = [spec.name for spec in specs]
        twice = {name for name in names if names.count(name) > 1}
        if twice:
            raise ValueError(f"the same sink twice: {sorted(twice)[0]}")
        if queue_events < 1:
            raise ValueError("queue_events must be at least 1")
        if spool_dir is not None and spool_max_bytes < SPOOL_MIN_BYTES:
            raise ValueError(f"a spool needs at least {SPOOL_MIN_BYTES:,} bytes")
        if any(spec.scheme == "hpfeeds" for spec in specs):
            from deadend.sinks import to_hpfeeds

            if not to_hpfeeds.available():
                raise ValueError(to_hpfeeds.MISSING)
        if not stream or not stream.replace("_", "").replace("-", "").isalnum() or not stream.isascii():
            raise ValueError("the JetStream stream name is letters, digits, - and _")
        self.report = report
        timing = timing or Timing()
        self._breaches = 0
        self._sinks: list[Sink] = []
        for spec in specs:
            disk = DiskThread(f"deadend-sink-{len(self._sinks)}")
            self._sinks.append(
                Sink(
                    spec.name,
                    _transport(spec, disk, stream, timing),
                    disk,
                    report,
                    queue_events=queue_events,
                    spool_folder=spool_dir / folder_key(spec.name) if spool_dir is not None else None,
                    spool_max_bytes=spool_max_bytes,
                    timing=timing,
                )
            )

    async def start(self) -> None:
        """Open the spools and start every sink (on the broker's event loop). Returns at once: a
        collector that is down is reported and retried, never waited for."""
        for sink in self._sinks:
            await sink.start()

    def publish(self, event: OutEvent) -> None:
        """Hand one event to every sink. On the loop thread; O(1) per sink; never blocks, never raises."""
        try:
            breach = contract_breach(event)
            if breach is not None:
                self._breaches += 1
                if self._breaches == 1:  # a broker bug, not an attacker: once is enough to find it
                    self._say("error", f"sinks: an event that breaks the OutEvent contract dropped: {breach}")
                return
            for sink in self._sinks:
                sink.publish(event)
        except Exception as e:
            self._say("error", f"sinks: publish failed: {type(e).__name__}: {e}")

    def reopen(self) -> None:
        """SIGUSR1 (logrotate): file sinks write to a new file at their path from the next event on."""
        for sink in self._sinks:
            sink.transport.reopen()

    def stats(self) -> list[SinkStats]:
        return [sink.stats() for sink in self._sinks]

    async def close(self, timeout: float) -> None:
        """Deliver what can be within `timeout` seconds; what is left stays in the spool."""
        # All at once: one slow collector does not eat the others' time.
        await asyncio.gather(*(sink.close(timeout) for sink in self._sinks))

    def _say(self, level: str, message: str) -> None:
        with contextlib.suppress(Exception):
            self.report(level, sanitize(message, 300).encode("ascii", "backslashreplace").decode("ascii"))
