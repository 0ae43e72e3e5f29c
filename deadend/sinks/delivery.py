"""One sink's delivery: a bounded queue, the spool, one connection, back-off, and the operator's lines.

Everything here runs on the event loop; disk work goes to the sink's DiskThread, network work is
asynchronous, so `publish` is O(1) and never waits.

With a spool, the spool is the queue (a write-ahead log): every event is given the next sequence number
and appended to the spool, in batches, off the loop; the in-memory queue is a read cache of the spool's
newest part, so a collector that keeps up is fed from memory and never read back from disk. The reader
takes events in sequence order: from the cache when it holds the next one, from the spool otherwise (after
an outage, after a restart, or when the cache was full). Order per sink and at-least-once delivery follow
from the one log; a crash loses nothing the spool had written (deadend/sinks/spool.py).

Without a spool, the in-memory queue is all there is: when it is full, the oldest event is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from deadend.logs import sanitize
from deadend.sinks.disk import DiskThread
from deadend.sinks.event import OutEvent
from deadend.sinks.spool import AppendResult, ReadResult, SpoolStore
from deadend.sinks.transport import SinkDown, Transport, describe

Report = Callable[[str, str], None]

# Bytes of events handed to the spool thread and not yet written: a disk slower than the event rate costs
# dropped events (counted), never the broker's memory.
WRITE_BEHIND_BYTES: Final = 8 << 20
RECORD_OVERHEAD: Final = 96  # a spool record's bytes beyond the body, about
REPEAT_INTERVAL: Final = 60.0  # seconds between two lines about the same kind of drop
RESEND_MAX: Final = 4096  # events kept for sending again after a lost connection (Transport.resend_window)


@dataclass(frozen=True, slots=True)
class Timing:
    """How a sink paces itself. The defaults suit production; tests shorten them."""

    backoff_first: float = 0.5  # seconds before the first reconnect attempt
    # The longest wait between attempts; a connection that lived this long starts the back-off afresh.
    backoff_max: float = 30.0
    # To connect, and for a collector to acknowledge anything before it counts as stalled.
    timeout: float = 15.0
    batch_events: int = 512
    batch_bytes: int = 256 << 10
    sync_interval: float = 1.0  # seconds between two fdatasyncs of a spool being written
    proven: float = 5.0  # seconds a connection must stand before the sink reports itself up


@dataclass(frozen=True, slots=True)
class SinkStats:
    name: str  # the URL without its query (never a secret)
    up: bool  # connected to its collector
    queued: int  # events waiting in memory
    delivered: int  # events confirmed since start
    spooled: int  # events waiting on disk only
    dropped: int  # events given up since start (queue or spool full, too large, not writable)
    last_error: str | None  # why it was last down


class Backoff:
    """Exponential back-off with jitter: attempts spread between half and all of the current step."""

    def __init__(self, first: float, cap: float, rng: Callable[[], float] = random.random) -> None:
        self.first, self.cap, self.rng = first, cap, rng
        self.attempt = 0

    def next(self) -> float:
        step = min(self.cap, self.first * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return float(step * (0.5 + self.rng() / 2))

    def reset(self) -> None:
        self.attempt = 0


class Sink:
    def __init__(
        self,
        name: str,
        transport: Transport,
        disk: DiskThread,
        report: Report,
        *,
        queue_events: int,
        spool_folder: Path | None,
        spool_max_bytes: int,
        timing: Timing,
    ) -> None:
        self.name = name
        self.transport = transport
        self.disk = disk
        self.report = report
        self.cap = queue_events
        self.spool_folder = spool_folder
        self.spool_max_bytes = spool_max_bytes
        self.timing = timing
        self.state = "starting"  # starting | up | down
        self.delivered = 0
        self.dropped = 0
        self.last_error: str | None = None
        self._store: SpoolStore | None = None
        self._started = False
        self._closing = False
        self._closed = False
        self._cache: collections.deque[tuple[int, OutEvent]] = collections.deque()
        self._retry: list[tuple[int, OutEvent]] = []  # sent but not confirmed when the connection went
        self._inflight: list[tuple[int, OutEvent]] = []
        self._next_seq = 1
        self._read_seq = 1  # with a spool: the next sequence number to deliver
        self._pending: list[tuple[int, OutEvent]] = []  # for the spool, not yet handed to its thread
        self._unwritten = 0
        self._flush_handle: asyncio.Handle | None = None
        self._sync_handle: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self._connected_at = 0.0
        self._down_since = 0.0
        self._identity: str | None = None
        self._connection = 0  # counts connections, so a timer knows whether its connection still stands
        self._up_timer: asyncio.TimerHandle | None = None
        self._said: dict[str, float] = {}
        self._backoff = Backoff(timing.backoff_first, timing.backoff_max)
        # (confirmed at, seq, event) of the last seconds, for transports whose confirmation is only TCP's
        self._recent: collections.deque[tuple[float, int, OutEvent]] = collections.deque()

    # --- the broker's side ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the spool (OSError if its folder is unusable) and start delivering."""
        if self.spool_folder is not None:
            store = await self.disk.call(SpoolStore, self.spool_folder, self.spool_max_bytes)
            self._store = store
            self._next_seq = store.next_seq
            self._read_seq = store.first_seq
            if store.torn:
                self._say("warn", f"sink {self.name}: {store.torn} torn spool record(s) skipped (a crash?)")
        self._started = True
        early, self._cache = list(self._cache), collections.deque()
        for _, event in early:
            self.publish(event)
        self._task = asyncio.create_task(self._run(), name=f"sink {self.name}")

    def publish(self, event: OutEvent) -> None:
        if self._closed:
            self.dropped += 1
            return
        cache = self._cache
        if self._store is None:
            if len(cache) >= self.cap:
                cache.popleft()
                self._drop(1, "queue", f"the queue of {self.cap:,} events is full (no spool): oldest dropped")
            cache.append((self._next_seq, event))
            self._next_seq += 1
        else:
            size = len(event.body) + RECORD_OVERHEAD
            if self._unwritten + size > WRITE_BEHIND_BYTES:
                self._drop(1, "disk", "the spool's disk does not keep up: newest events dropped")
                return
            seq = self._next_seq
            self._next_seq += 1
            self._unwritten += size
            self._pending.append((seq, event))
            if self._flush_handle is None:
                self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
            if len(cache) < self.cap and (cache[-1][0] == seq - 1 if cache else seq == self._read_seq):
                cache.append((seq, event))
        self._wake.set()

    def stats(self) -> SinkStats:
        if self._store is None:
            queued, spooled = len(self._cache) + len(self._retry) + len(self._inflight), 0
        else:
            cached = sum(1 for seq, _ in self._cache if seq >= self._read_seq)
            queued = cached + len(self._retry) + len(self._inflight)
            spooled = max(0, self._next_seq - self._read_seq - cached)
        up = self._connected and self.state == "up"
        return SinkStats(self.name, up, queued, self.delivered, spooled, self.dropped, self.last_error)

    async def close(self, timeout: float) -> None:
        """Deliver what can be within `timeout`; with a spool the rest stays there for the next start."""
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        if self._task is not None:
            done, _ = await asyncio.wait([self._task], timeout=timeout)
            if not done:
                self._task.cancel()
                await asyncio.wait([self._task], timeout=2.0)
            elif not self._task.cancelled() and self._task.exception() is not None:
                self._say("error", f"sink {self.name}: delivery failed: {self._task.exception()!r}")
        self._closed = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.transport.close(), 2.0)
        left = self._backlog() + len(self._inflight)
        if self._store is not None:
            self._flush()
            if self._sync_handle is not None:
                self._sync_handle.cancel()
            try:
                await asyncio.wait_for(asyncio.shield(self.disk.call(self._store.close)), 5.0)
            except Exception as e:
                self._say("error", f"sink {self.name}: closing the spool failed: {describe(e)}")
            if left:
                self._say("info", f"sink {self.name}: {left:,} undelivered events stay in the spool")
        elif left:
            self.dropped += left
            self._say("warn", f"sink {self.name}: closed with {left:,} events undelivered (no spool)")
        self.disk.stop()

    # --- the delivery task ----------------------------------------------------------------------

    async def _run(self) -> None:
        me = asyncio.current_task()
        while True:
            if me is not None and me.cancelling():
                # A client library swallowed our cancellation (nats-py's close does): honour it here.
                raise asyncio.CancelledError
            if not self._connected:
                if self._closing and not self._backlog():
                    return
                try:
                    identity = await asyncio.wait_for(self.transport.connect(), self.timing.timeout * 2)
                except Exception as e:
                    await self._fail(describe(e))
                    continue
                self._connected_to(identity)
            batch = await self._take()
            if not batch:
                if self._closing:
                    return
                await self._idle()
                continue
            items: list[tuple[OutEvent, bytes]] = []
            kept: list[tuple[int, OutEvent]] = []
            for seq, event in batch:
                data = self.transport.prepare(event)
                if isinstance(data, str):
                    self._drop(1, "refused", f"{event.event} event {event.id} dropped: {data}")
                    continue
                items.append((event, data))
                kept.append((seq, event))
            self._inflight = kept
            try:
                if items:
                    await self.transport.deliver(items)
            except Exception as e:
                confirmed = e.confirmed if isinstance(e, SinkDown) else 0
                self._inflight = []
                self._confirmed(kept[:confirmed])
                self._retry = kept[confirmed:] + self._retry  # the rest of a long retry list waits behind
                await self._fail(describe(e))
                continue
            self._inflight = []
            self._confirmed(kept, through=batch[-1][0])

    async def _idle(self) -> None:
        """Wait for an event to deliver, noticing meanwhile a connection that goes away."""
        self._wake.clear()
        if self._backlog():
            return
        self._mark_up()
        lost = self.transport.lost()
        waiter: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait([waiter, lost], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if lost.done() and not self._closing:
            await self._fail(lost.result())

    async def _take(self) -> list[tuple[int, OutEvent]]:
        """The next batch in order: what the last connection left unconfirmed, then the cache or the spool."""
        limit = self.timing.batch_events
        batch, self._retry = self._retry[:limit], self._retry[limit:]
        budget = self.timing.batch_bytes - sum(len(e.body) for _, e in batch)
        cache = self._cache
        while len(batch) < self.timing.batch_events and budget > 0:
            if self._store is None:
                if not cache:
                    break
                item = cache.popleft()
            else:
                while cache and cache[0][0] < self._read_seq:
                    cache.popleft()  # dropped with its spool segment
                if not (cache and cache[0][0] == self._read_seq):
                    upper = cache[0][0] if cache else self._next_seq
                    if self._read_seq >= upper or batch:
                        break  # nothing more, or deliver what is in hand before waiting on the disk
                    return await self._read_spool(upper, budget)
                item = cache.popleft()
                self._read_seq = item[0] + 1
            batch.append(item)
            budget -= len(item[1].body)
        return batch

    async def _read_spool(self, upper: int, budget: int) -> list[tuple[int, OutEvent]]:
        assert self._store is not None
        self._flush()  # the thread runs calls in order: the read sees every event published so far
        start = self._read_seq
        result: ReadResult = await self.disk.call(self._store.read, start, self.timing.batch_events, budget)
        if result.skipped:
            self._drop(result.skipped, "corrupt", "torn or corrupt spool records skipped")
        records = [r for r in result.records if self._read_seq <= r[0] < upper]
        # Nothing on disk below the cache: those events were never written (disk errors) or dropped.
        self._read_seq = records[-1][0] + 1 if records else max(self._read_seq, upper)
        return records

    def _confirmed(self, items: list[tuple[int, OutEvent]], through: int | None = None) -> None:
        self.delivered += len(items)
        last = through if through is not None else (items[-1][0] if items else None)
        if self._store is not None and last is not None:
            self.disk.call(self._store.commit, last).add_done_callback(self._disk_done)
        window = self.transport.resend_window
        if window and items:
            now = time.monotonic()
            recent = self._recent
            recent.extend((now, seq, event) for seq, event in items)
            while recent and (recent[0][0] < now - window or len(recent) > RESEND_MAX):
                recent.popleft()
        if through is not None:
            self._mark_up()

    def _backlog(self) -> int:
        if self._store is None:
            return len(self._cache) + len(self._retry)
        return len(self._retry) + max(0, self._next_seq - self._read_seq)

    # --- state changes: one line each -----------------------------------------------------------

    def _connected_to(self, identity: str | None) -> None:
        self._connected = True
        self._connection += 1
        self._connected_at = time.monotonic()
        if identity is not None and self._identity is not None and identity != self._identity:
            was = self._identity
            self._say("warn", f"sink {self.name}: the collector changed: now {identity}, was {was}")
        self._identity = identity or self._identity

    def _mark_up(self) -> None:
        """The collector took a batch, or had nothing to take, on a connection that lived `proven`
        seconds: up. Only then, so that a collector which accepts connections and stalls or drops them
        stays one "down" line, not a flapping pair of lines per attempt."""
        if self.state == "up" or not self._connected:
            return
        wait = self._connected_at + self.timing.proven - time.monotonic()
        if wait > 0:
            if self._up_timer is None:
                loop = asyncio.get_running_loop()
                self._up_timer = loop.call_later(wait, self._proven, self._connection)
            return
        if self.state == "starting":
            self._say("info", f"sink {self.name} up" + (f" ({self._identity})" if self._identity else ""))
        else:
            held = self._backlog()
            down_for = time.monotonic() - self._down_since
            self._say("info", f"sink {self.name} up again after {down_for:.1f} s; {held:,} events to deliver")
        self.state = "up"

    def _proven(self, connection: int) -> None:
        self._up_timer = None
        if connection == self._connection:
            self._mark_up()

    async def _fail(self, reason: str) -> None:
        if self._up_timer is not None:
            self._up_timer.cancel()
            self._up_timer = None
        lived = time.monotonic() - self._connected_at if self._connected else 0.0
        if self._connected and self._recent:
            # What the collector's TCP acknowledged just before the connection went may never have been
            # read by the collector (a restart drops its socket buffer): send it again.
            self._retry = [(seq, event) for _, seq, event in self._recent] + self._retry
            self._recent.clear()
        self._connected = False
        with contextlib.suppress(Exception):
            await self.transport.close()
        self.last_error = reason
        if self.state != "down":
            self._down_since = time.monotonic()
            held = "spooling" if self._store is not None else f"holding up to {self.cap:,} events in memory"
            self._say("warn", f"sink {self.name} down: {reason}; {held}")
            self.state = "down"
        if lived >= self.timing.backoff_max:
            self._backoff.reset()
        if not self._closing or self._backlog():
            await asyncio.sleep(self._backoff.next())

    def _drop(self, count: int, kind: str, what: str) -> None:
        self.dropped += count
        now = time.monotonic()
        if now - self._said.get(kind, -REPEAT_INTERVAL) >= REPEAT_INTERVAL:
            self._said[kind] = now
            self._say("warn", f"sink {self.name}: {what} ({self.dropped:,} dropped so far)")

    def _say(self, level: str, message: str) -> None:
        line = sanitize(message, 1000).encode("ascii", "backslashreplace").decode("ascii")
        with contextlib.suppress(Exception):  # a failing report must not stop delivery
            self.report(level, line)

    # --- the spool's thread ---------------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_handle = None
        if not self._pending or self._store is None:
            return
        records, self._pending = self._pending, []
        size = sum(len(e.body) + RECORD_OVERHEAD for _, e in records)
        future = self.disk.call(self._store.append, records)
        future.add_done_callback(lambda f: self._appended(records, size, f))
        if self._sync_handle is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._sync_handle = loop.call_later(self.timing.sync_interval, self._sync)

    def _appended(
        self, records: list[tuple[int, OutEvent]], size: int, future: asyncio.Future[AppendResult]
    ) -> None:
        self._unwritten -= size
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            cached = {seq for seq, _ in self._cache}
            lost = sum(1 for seq, _ in records if seq not in cached and seq >= self._read_seq)
            self._say_error("append", f"sink {self.name}: spool write failed: {describe(error)}")
            if lost:
                self._drop(lost, "unwritten", "events that reached neither the spool nor memory")
            return
        result = future.result()
        for low, high in result.dropped:
            count = high - max(low, self._read_seq) + 1
            self._read_seq = max(self._read_seq, high + 1)
            if count > 0:
                self._drop(
                    count, "full", f"spool full ({self.spool_max_bytes:,} bytes): oldest events dropped"
                )
        if result.refused:
            self._drop(result.refused, "huge", "an event too large for the spool dropped")

    def _sync(self) -> None:
        self._sync_handle = None
        if self._store is not None and not self._closed:
            self.disk.call(self._store.sync).add_done_callback(self._disk_done)

    def _disk_done(self, future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self._say_error("disk", f"sink {self.name}: spool: {describe(future.exception())}")  # type: ignore[arg-type]

    def _say_error(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now - self._said.get(kind, -REPEAT_INTERVAL) >= REPEAT_INTERVAL:
            self._said[kind] = now
            self._say("error", message)
