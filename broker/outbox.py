"""The events' way out to the sinks (--sink): the broker's side of deadend/sinks.

The event log hands every event it writes to `Outbox.forward`, from whichever thread emitted it. Until the
sinks start (after the privileges drop, so that the spool's files belong to --user) events wait in a
small buffer; from then on they go to `SinkSet.publish` on the event loop's thread. The sinks' report
lines become `sink.report` events: one line when a sink goes down, one when it comes back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import threading
from typing import Final

from deadend.config import Config
from deadend.logs import BROKER, EventLog, sanitize
from deadend.sinks import OutEvent, SinkSet, SinkStats

EARLY_EVENTS: Final = 10_000  # events kept from start-up until the sinks run (the oldest go first)
CLOSE_TIMEOUT: Final = 3.0  # seconds the sinks get at shutdown to deliver what they hold


class OutboxError(Exception):
    """A sink configuration that cannot work, or a spool folder that cannot be used: a start-up error."""


class Outbox:
    def __init__(self, config: Config, log: EventLog) -> None:
        self.log = log
        self.sensor = log.sensor
        self.spool = config.spool
        try:
            self.sinks = SinkSet(
                config.sink,
                spool_dir=config.spool,
                spool_max_bytes=config.spool_max_bytes,
                queue_events=config.sink_queue,
                report=self._report,
                stream=config.nats_stream,
            )
        except ValueError as e:
            raise OutboxError(str(e)) from e
        self._early: collections.deque[OutEvent] | None = collections.deque(maxlen=EARLY_EVENTS)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._publishing = False
        log.forward = self.forward

    def forward(self, ident: str, stamp: str, level: str, event: str, body: bytes) -> None:
        """EventLog's hook: any thread, never blocks, never raises."""
        out = OutEvent(ident, stamp, level, event, self.sensor, body)
        early = self._early
        if early is not None:
            early.append(out)  # deque.append is atomic; the sinks take these when they start
        elif threading.get_ident() == self._loop_thread and not self._publishing:
            self._publish(out)
        elif self._loop is not None:
            # Another thread, or an event a sink reported while publishing: the loop takes it next.
            with contextlib.suppress(RuntimeError):  # the loop is closed: shutdown is over
                self._loop.call_soon_threadsafe(self._publish, out)

    def _publish(self, out: OutEvent) -> None:
        self._publishing = True
        try:
            self.sinks.publish(out)
        finally:
            self._publishing = False

    def prepare_spool(self, uid: int | None, gid: int | None) -> None:
        """Still root: the spool folder, created for --user if it does not exist yet."""
        if self.spool is None or uid is None or self.spool.exists():
            return
        try:
            self.spool.mkdir(mode=0o700, parents=True)
            os.chown(self.spool, uid, gid if gid is not None else -1)
        except OSError as e:
            raise OutboxError(f"cannot create the spool folder {self.spool}: {e.strerror or e}") from e

    async def start(self) -> None:
        """On the loop, as --user: the spools opened, what start-up emitted handed over, delivery begun."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        try:
            await self.sinks.start()
        except OSError as e:
            where = f" in {self.spool}" if self.spool else ""
            raise OutboxError(f"cannot open the sinks' spool{where}: {e.strerror or e}") from e
        early, self._early = self._early, None
        for out in early or ():
            self._publish(out)

    def reopen(self) -> None:
        """SIGUSR1 (logrotate): file sinks reopen their files."""
        self.sinks.reopen()

    def stats(self) -> list[SinkStats]:
        return self.sinks.stats()

    async def close(self) -> None:
        """Shutdown, last phase: no more events in; what the sinks hold is delivered or stays spooled."""
        self.log.forward = None
        if self._early is None:
            await self.sinks.close(CLOSE_TIMEOUT)

    def _report(self, level: str, line: str) -> None:
        self.log.emit(level, BROKER, "sink.report", sanitize(line))
