"""Framed, bounded, deadline-aware I/O on one worker's pipes (the broker's side).

A worker is hostile. `WorkerPipe` moves bytes, with a bounded buffer for what waits to be written.
`WorkerChannel` speaks the plain dialect on it: a bounded decoder, one frame in flight (a second request
before the first was answered is a violation, so a flood cannot grow a queue), and `Deadline` when the
worker computes longer than it may between two requests. Dense workers speak their dialect on the same
pipe (broker/dense.py). Neither interprets a frame: `deadend.wire` does.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any, Protocol

import msgpack

from broker.zygote import WorkerProcess
from deadend import wire


class WorkerGone(Exception):
    """The worker closed its end of the pipe (exited, crashed or was killed)."""


class Deadline(Exception):
    """The worker did not send its next frame in time."""


class WorkerLost(WorkerGone):
    """Dense mode: the worker this session shared was killed because of another session."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class FrameChannel(Protocol):
    """What a session needs of its sandbox: a WorkerChannel, or a slot of a dense worker."""

    # Called when the channel fails while nobody waits on it (the session sleeps, or waits on its
    # socket): the session ends now instead of at its next request. The argument says whose fault it was.
    on_lost: Callable[[BaseException], None] | None

    async def frame(self, timeout: float | None) -> Any: ...

    def send(self, obj: Any) -> None: ...


class WorkerPipe:
    """Non-blocking bytes both ways on a worker's pipe pair; the pipe owns both descriptors."""

    def __init__(self, worker: WorkerProcess, out_limit: int) -> None:
        self.worker = worker
        self.out_limit = out_limit  # what may wait for the worker to read; past it the worker is stuck
        self._loop = asyncio.get_running_loop()
        self._out = bytearray()
        self._writing = False
        self._reading = False
        self.on_write_failed: Callable[[BaseException], None] = lambda _exc: None
        os.set_blocking(worker.from_worker, False)
        os.set_blocking(worker.to_worker, False)

    def start_reading(self, callback: Callable[[], None]) -> None:
        self.stop_reading()
        self._loop.add_reader(self.worker.from_worker, callback)
        self._reading = True

    def stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.worker.from_worker)
            self._reading = False

    def read(self) -> bytes:
        """What the pipe holds (maybe nothing yet); raises WorkerGone at its end."""
        try:
            data = os.read(self.worker.from_worker, wire.READ_CHUNK)
        except BlockingIOError:
            return b""
        except OSError:
            data = b""
        if not data:
            raise WorkerGone()
        return data

    def queue(self, data: bytes) -> None:
        """Add to what waits to be written; a worker that stopped reading fails the channel."""
        if self.worker.to_worker < 0:
            return
        self._out += data
        if len(self._out) > self.out_limit:  # a worker that stopped reading its replies: hostile
            self._out.clear()
            self.on_write_failed(wire.ProtocolViolation("worker stopped reading its replies"))

    def flush(self) -> None:
        if self.worker.to_worker < 0:
            return
        try:
            while self._out:
                n = os.write(self.worker.to_worker, self._out)
                del self._out[:n]
        except BlockingIOError:
            if not self._writing:
                self._loop.add_writer(self.worker.to_worker, self.flush)
                self._writing = True
            return
        except OSError:
            self._out.clear()
            self.on_write_failed(WorkerGone())
        if self._writing:
            self._loop.remove_writer(self.worker.to_worker)
            self._writing = False

    def close(self) -> None:
        """Unregister and close both pipe ends. Idempotent."""
        self.stop_reading()
        if self._writing:
            self._loop.remove_writer(self.worker.to_worker)
            self._writing = False
        for fd in (self.worker.to_worker, self.worker.from_worker):
            if fd >= 0:
                os.close(fd)
        self.worker.to_worker = self.worker.from_worker = -1


class WorkerChannel:
    """The plain dialect: one session, one request in flight, a deadline on the worker's computing."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker
        self.pipe = WorkerPipe(worker, out_limit=2 * wire.MAX_BROKER_FRAME)
        self.pipe.on_write_failed = self._fail
        self.unpacker: msgpack.Unpacker = wire.worker_unpacker()
        self.on_lost: Callable[[BaseException], None] | None = None
        self._loop = asyncio.get_running_loop()
        self._frames: list[Any] = []
        self._waiter: asyncio.Future[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._failure: BaseException | None = None
        self.pipe.start_reading(self._on_readable)

    # --- reading ---------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = self.pipe.read()
        except WorkerGone as e:
            self._fail(e)
            return
        if not data:
            return
        try:
            self.unpacker.feed(data)
            for frame in self.unpacker:
                self._frames.append(frame)
        except Exception as e:  # BufferFull, malformed msgpack, limits exceeded
            self._fail(wire.ProtocolViolation(f"unreadable frame: {type(e).__name__}"))
            return
        if len(self._frames) > 1 or (self._frames and (self._waiter is None or self._waiter.done())):
            # The broker always waits for the next request before the worker can have its reply, so a
            # frame nobody waits for is a request sent ahead of its answer.
            self._fail(wire.ProtocolViolation("a second request before the first was answered"))
            return
        self._deliver()

    def _deliver(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            if self._failure is not None and self.on_lost is not None:
                on_lost, self.on_lost = self.on_lost, None
                on_lost(self._failure)
            return
        if self._frames:
            waiter.set_result(self._frames.pop(0))
        elif self._failure is not None:
            waiter.set_exception(self._failure)
        else:
            return
        self._waiter = None

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self._frames.clear()
        self.pipe.stop_reading()
        self._deliver()

    def _expire(self) -> None:
        # One timer per channel, moved forward lazily: a round trip only sets `_deadline` (a timer made and
        # cancelled per frame was a measurable part of the ~40 us round trip).
        self._timer = None
        if self._waiter is None or self._waiter.done():
            return  # nobody waits now; the next frame() arms the timer again
        if self._loop.time() < self._deadline:
            if self._deadline != float("inf"):
                self._timer = self._loop.call_at(self._deadline, self._expire)
            return
        self._waiter.set_exception(Deadline())
        self._waiter = None

    async def frame(self, timeout: float | None) -> Any:
        """The worker's next frame; raises WorkerGone, Deadline or ProtocolViolation."""
        if self._frames:
            return self._frames.pop(0)
        if self._failure is not None:
            raise self._failure
        self._waiter = self._loop.create_future()
        self._deadline = float("inf") if timeout is None else self._loop.time() + timeout
        if timeout is not None and (self._timer is None or self._timer.when() > self._deadline):
            # A timer left from a longer wait (a worker's start-up) would fire late: bring it forward.
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(self._deadline, self._expire)
        try:
            return await self._waiter
        finally:
            self._waiter = None

    # --- writing ---------------------------------------------------------------------------------

    def send(self, obj: Any) -> None:
        """Queue one frame to the worker; it is written as the pipe drains."""
        self.pipe.queue(wire.pack(obj))
        self.pipe.flush()

    # --- teardown --------------------------------------------------------------------------------

    def detach(self) -> tuple[WorkerPipe, msgpack.Unpacker]:
        """Hand the pipe and its decoder (with any bytes already read) to another dialect: dense mode
        takes over a worker once its plain "ready" frame has been read."""
        self.pipe.stop_reading()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return self.pipe, self.unpacker

    def close(self) -> None:
        """Unregister and close both pipe ends (the channel owns them). Idempotent."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.pipe.close()
