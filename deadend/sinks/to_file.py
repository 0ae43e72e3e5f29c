"""file:///PATH: JSON lines (each event's body and a newline) appended to a file, for log shippers.

Delivered means written: write(2) returned (the kernel has the bytes; a crash of the broker loses none, a
power loss what the kernel had not flushed). Writes run in the sink's disk thread. The file is created
0600 and opened with O_APPEND|O_NOFOLLOW (a symlink planted at the path is refused, not followed); an
existing file keeps its mode. `reopen()` (SIGUSR1, after logrotate moved the file) makes the next write
go to a new file at the path.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable, Sequence
from typing import Final

from deadend.sinks.disk import DiskThread
from deadend.sinks.event import OutEvent
from deadend.sinks.transport import SinkDown, Transport, describe
from deadend.sinks.urls import SinkSpec

_OPEN: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


class FileTransport(Transport):
    def __init__(self, spec: SinkSpec, disk: DiskThread, *, timeout: float) -> None:
        self.path = spec.target
        self.disk = disk
        self.timeout = timeout
        self._fd = -1  # only the disk thread opens, writes and closes it
        self._reopen = False
        self._torn = False  # a write cut short mid-line: the next one starts on a new line
        self._never: asyncio.Future[str] | None = None

    async def connect(self) -> str | None:
        self._never = asyncio.get_running_loop().create_future()
        await self._run(self._open)
        return None

    def _open(self) -> None:
        if self._fd >= 0:
            return
        try:
            self._fd = os.open(self.path, _OPEN, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise SinkDown(f"{self.path} is a symlink; a file sink does not follow one") from None
            raise

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _write(self, data: bytes, reopen: bool) -> int:
        """Append `data`; how many bytes went out (less only when an error cut it short)."""
        if reopen:
            self._close()
        self._open()
        prefix = 1 if self._torn else 0
        if prefix:
            data = b"\n" + data
        view = memoryview(data)
        done = 0
        while done < len(data):
            try:
                done += os.write(self._fd, view[done:])
            except OSError as e:
                self._close()  # the next attempt starts from a fresh open
                self._torn = self._torn if done == 0 else not data[:done].endswith(b"\n")
                e.strerror = f"{e.strerror} (after {done} of {len(data)} bytes)"
                raise SinkDown(describe(e), max(0, done - prefix)) from None
        self._torn = False
        return done - prefix

    async def _run(self, fn: Callable[..., object], *args: object) -> object:
        future = self.disk.call(fn, *args)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError:
            raise SinkDown(f"writing {self.path} stalled for {self.timeout:g} s") from None

    def prepare(self, event: OutEvent) -> bytes | str:
        return event.body + b"\n"

    async def deliver(self, batch: Sequence[tuple[OutEvent, bytes]]) -> None:
        reopen, self._reopen = self._reopen, False
        try:
            await self._run(self._write, b"".join(line for _, line in batch), reopen)
        except SinkDown as e:
            written, confirmed = e.confirmed, 0
            for _, line in batch:  # SinkDown from _write counts bytes; the loop wants events
                if len(line) > written:
                    break
                written -= len(line)
                confirmed += 1
            raise SinkDown(e.reason, confirmed) from None

    def lost(self) -> asyncio.Future[str]:
        assert self._never is not None
        return self._never

    def reopen(self) -> None:
        self._reopen = True

    async def close(self) -> None:
        self.disk.call(self._close)
