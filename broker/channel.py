"""Framed, bounded, deadline-aware I/O on one child's pipes (the broker's side).

A child is hostile. The channel reads with a bounded unpacker, refuses a second request before the first
was answered (so a flood cannot grow a queue), and wakes the session with `Deadline` when the child
computes longer than it may between two requests. It never interprets a frame: `deadend.wire` does.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Protocol

import msgpack

from broker.zygote import ChildProcess
from deadend import wire


class ChildGone(Exception):
    """The child closed its end of the pipe (exited, crashed or was killed)."""


class Deadline(Exception):
    """The child did not send its next frame in time."""


class WorkerLost(ChildGone):
    """Dense mode: the child this session shared was killed because of another session."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class FrameChannel(Protocol):
    """What a session needs of its sandbox: a ChildChannel, or a dense mode Slot."""

    async def frame(self, timeout: float | None) -> Any: ...

    def send(self, obj: Any) -> None: ...

    def close(self) -> None: ...


class ChildChannel:
    def __init__(self, child: ChildProcess) -> None:
        self.child = child
        self._loop = asyncio.get_running_loop()
        self._unpacker = wire.child_unpacker()
        self._frames: list[Any] = []
        self._waiter: asyncio.Future[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._failure: BaseException | None = None
        self._out = bytearray()
        self.out_limit = 2 * wire.MAX_BROKER_FRAME  # what may wait for a child to read
        self._writing = False
        os.set_blocking(child.from_child, False)
        os.set_blocking(child.to_child, False)
        self._loop.add_reader(child.from_child, self._on_readable)
        self._reading = True

    # --- reading ---------------------------------------------------------------------------------

    def _read(self) -> bytes:
        """What the pipe holds (maybe nothing yet); raises ChildGone at its end."""
        try:
            data = os.read(self.child.from_child, 1 << 16)
        except BlockingIOError:
            return b""
        except OSError:
            data = b""
        if not data:
            raise ChildGone()
        return data

    def _on_readable(self) -> None:
        try:
            data = self._read()
        except ChildGone as e:
            self._fail(e)
            return
        if not data:
            return
        try:
            self._unpacker.feed(data)
            for frame in self._unpacker:
                self._frames.append(frame)
        except Exception as e:  # BufferFull, malformed msgpack, limits exceeded
            self._fail(wire.ProtocolViolation(f"unreadable frame: {type(e).__name__}"))
            return
        if len(self._frames) > 1 or (self._frames and (self._waiter is None or self._waiter.done())):
            # The broker always waits for the next request before the child can have its reply, so a
            # frame nobody waits for is a request sent ahead of its answer.
            self._fail(wire.ProtocolViolation("a second request before the first was answered"))
            return
        self._deliver()

    def _deliver(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
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
        self._stop_reading()
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
        """The child's next frame; raises ChildGone, Deadline or ProtocolViolation."""
        if self._frames:
            return self._frames.pop(0)
        if self._failure is not None:
            raise self._failure
        self._waiter = self._loop.create_future()
        self._deadline = float("inf") if timeout is None else self._loop.time() + timeout
        if timeout is not None and self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._expire)
        try:
            return await self._waiter
        finally:
            self._waiter = None

    # --- writing ---------------------------------------------------------------------------------

    def send(self, obj: Any) -> None:
        """Queue one frame to the child; it is written as the pipe drains."""
        if self.child.to_child < 0:
            return
        self._out += msgpack.packb(obj, use_bin_type=True)
        if len(self._out) > self.out_limit:  # a child that stopped reading: hostile
            self._fail(wire.ProtocolViolation("child stopped reading its replies"))
            return
        self._flush()

    def _flush(self) -> None:
        try:
            while self._out:
                n = os.write(self.child.to_child, self._out)
                del self._out[:n]
        except BlockingIOError:
            if not self._writing:
                self._loop.add_writer(self.child.to_child, self._flush)
                self._writing = True
            return
        except OSError:
            self._out.clear()
            self._fail(ChildGone())
        if self._writing:
            self._loop.remove_writer(self.child.to_child)
            self._writing = False

    # --- teardown --------------------------------------------------------------------------------

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.child.from_child)
            self._reading = False

    def close(self) -> None:
        """Unregister and close both pipe ends (the channel owns them). Idempotent."""
        self._stop_reading()
        if self._writing:
            self._loop.remove_writer(self.child.to_child)
            self._writing = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fd in (self.child.to_child, self.child.from_child):
            if fd >= 0:
                os.close(fd)
        self.child.to_child = self.child.from_child = -1
