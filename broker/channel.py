"""Framed, bounded, deadline-aware I/O on one worker's pipes (the broker's side).

A worker is hostile. `WorkerPipe` moves bytes, with a bounded buffer for what waits to be written.
`WorkerChannel` speaks the plain dialect on it: a bounded decoder, one frame in flight (a second request
before the first was answered is a violation, so a flood cannot grow a queue), and `Deadline` when the
worker computes longer than it may between two requests. A session takes frames by callback. Dense
workers speak their dialect on the same pipe (broker/dense.py). Neither interprets a frame: `deadend.wire`
does.
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

    def serve(
        self,
        on_frame: Callable[[Any], None],
        on_failure: Callable[[BaseException], None],
        cpu_slice: float,
    ) -> None:
        """From now on each frame goes to `on_frame` as it arrives, and the channel's failure (the
        worker gone, a protocol violation, no frame within `cpu_slice` of a send) to `on_failure`, once
        (at once if it already failed)."""
        ...

    def send(self, obj: Any) -> None:
        """Queue one frame to the worker, which then owes one back."""
        ...

    async def frame(self, timeout: float | None) -> Any:
        """Outside a session (compiling): the worker's next frame, awaited."""
        ...


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

    def write(self, data: bytes) -> None:
        """queue() then flush(), writing straight from `data` when nothing waits before it (a reply: the
        usual case, without copying it through the buffer)."""
        if self._out or self.worker.to_worker < 0:
            self.queue(data)
            self.flush()
            return
        try:
            n = os.write(self.worker.to_worker, data)
        except BlockingIOError:
            n = 0
        except OSError:
            self.on_write_failed(WorkerGone())
            return
        if n < len(data):
            self.queue(data[n:])
            self.flush()

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
    """The plain dialect: one session, one request in flight, a deadline on the worker's computing.

    The worker owes a frame after each send (its "ready" from the start); any other frame is a request
    sent ahead of its answer, a violation. A session takes its frames by callback (`serve`): a request
    the monitor answers at once is answered from the pipe's reader callback, with no task woken. Before
    a session (ready, prepared, compiling) they are awaited (`frame`).
    """

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker
        self.pipe = WorkerPipe(worker, out_limit=2 * wire.MAX_BROKER_FRAME)
        self.pipe.on_write_failed = self._fail
        self.unpacker: msgpack.Unpacker = wire.worker_unpacker()
        self._loop = asyncio.get_running_loop()
        self._owed = True  # the worker owes its "ready"
        self._pending: list[Any] = []  # a frame nobody has taken yet (await mode), at most one
        self._waiter: asyncio.Future[Any] | None = None
        self._on_frame: Callable[[Any], None] | None = None
        self._on_failure: Callable[[BaseException], None] | None = None
        self._slice: float | None = None  # a session's --cpu-slice: the deadline after each send
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = float("inf")
        self._failure: BaseException | None = None
        self.pipe.start_reading(self._on_readable)

    def serve(
        self,
        on_frame: Callable[[Any], None],
        on_failure: Callable[[BaseException], None],
        cpu_slice: float,
    ) -> None:
        self._on_frame, self._on_failure, self._slice = on_frame, on_failure, cpu_slice
        if self._failure is not None:
            self._report(self._failure)

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
            frames = list(self.unpacker)
        except Exception as e:  # BufferFull, malformed msgpack, limits exceeded
            self._fail(wire.ProtocolViolation(f"unreadable frame: {type(e).__name__}"))
            return
        if not frames:
            return
        if len(frames) > 1 or not self._owed:
            self._fail(wire.ProtocolViolation("a second request before the first was answered"))
            return
        self._owed = False
        if self._on_frame is not None:
            self._on_frame(frames[0])  # may answer at once: send() makes the next frame owed
            return
        self._pending.append(frames[0])
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._pending:
            waiter.set_result(self._pending.pop())
        elif self._failure is not None:
            waiter.set_exception(self._failure)

    def _fail(self, exc: BaseException) -> None:
        if self._failure is not None:
            return
        self._failure = exc
        self._pending.clear()
        self.pipe.stop_reading()
        if self._on_failure is not None:
            self._report(exc)
        else:
            self._wake()

    def _report(self, exc: BaseException) -> None:
        on_failure, self._on_failure = self._on_failure, None
        if on_failure is not None:
            on_failure(exc)

    def _owe_by(self, deadline: float) -> None:
        self._deadline = deadline
        if deadline == float("inf"):
            return
        if self._timer is not None and self._timer.when() > deadline:
            # A timer left from a longer wait (a worker's start-up) would fire late: bring it forward.
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        # One timer per channel, moved forward lazily: a round trip only sets `_deadline` (a timer made and
        # cancelled per frame was a measurable part of the ~40 us round trip).
        self._timer = None
        if not self._owed or self._failure is not None:
            return  # the frame came; the next send arms the timer again
        if self._loop.time() < self._deadline:
            self._owe_by(self._deadline)
            return
        self._fail(Deadline())

    async def frame(self, timeout: float | None) -> Any:
        """The worker's next frame; raises WorkerGone, Deadline or ProtocolViolation."""
        if self._pending:
            return self._pending.pop()
        if self._failure is not None:
            raise self._failure
        self._waiter = self._loop.create_future()
        self._owe_by(float("inf") if timeout is None else self._loop.time() + timeout)
        try:
            return await self._waiter
        finally:
            self._waiter = None

    # --- writing ---------------------------------------------------------------------------------

    def send(self, obj: Any) -> None:
        """Queue one frame to the worker; it is written as the pipe drains. The worker owes one back: in a
        session, within --cpu-slice; outside one, by the deadline its awaiter sets."""
        self._owed = True
        self._owe_by(float("inf") if self._slice is None else self._loop.time() + self._slice)
        self.pipe.write(wire.pack(obj))

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
