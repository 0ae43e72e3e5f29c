"""One client connection on the event loop: bytes in, bytes out, and whether the peer is still there.

The socket is watched all the time, not only inside a script's `recv`: a client that sends FIN or RST
while its script sleeps, computes or logs is noticed at once (`on_departed`), so that its session gets
the --linger budget and then frees its sandbox, instead of holding it until --session-time. To see a FIN
behind data the script has not read yet, the connection reads ahead into a buffer of at most READ_AHEAD
bytes (the kernel holds the rest, and TCP flow control still applies); while that buffer is full, the
peer's TCP state is checked every PROBE_INTERVAL seconds instead.

What the script gets is unchanged by reading ahead: `recv` returns buffered bytes first, then the end of
input (b"") or the failure (None) it would have got from the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

READ_AHEAD = 1 << 16  # bytes read before the script asks (one recv's worth at most)
PROBE_INTERVAL = 1.0  # seconds between TCP state checks while the read-ahead buffer is full
DRAIN_LIMIT = 1 << 16  # unread bytes discarded at close, so the kernel sends FIN rather than RST
_TCP_CLOSE_WAIT = 8  # tcp_info.tcpi_state: the peer sent FIN
_TCP_CLOSE = 7  # ... the connection is gone (RST)


class ClientConnection:
    def __init__(self, sock: socket.socket, pending: bytes, on_departed: Callable[[], None]) -> None:
        self.sock: socket.socket | None = sock
        self.on_departed = on_departed  # the peer sent FIN or RST (called once, maybe while it sleeps)
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray(pending)  # client bytes read, not yet given to the script
        self._eof = False
        self._failed = False
        self._departed = False
        self._reading = False
        self._probe: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self._watch()

    # --- watching the peer -----------------------------------------------------------------------

    def _watch(self) -> None:
        """Read ahead while there is room; probe the TCP state while there is none."""
        if self.sock is None or self._eof or self._failed:
            return
        if len(self._buffer) < READ_AHEAD:
            # A probe already due is left to run: a script that reads a little at a time makes room
            # again and again, and a probe moved each time would never come (a peer gone behind queued
            # bytes would go unseen until they were all read).
            if not self._reading:
                self._loop.add_reader(self.sock.fileno(), self._on_readable)
                self._reading = True
        else:
            self._stop_reading()
            if self._probe is None and self._tcp:
                self._probe = self._loop.call_later(PROBE_INTERVAL, self._check_state)

    def _stop_reading(self) -> None:
        if self._reading and self.sock is not None:
            self._loop.remove_reader(self.sock.fileno())
        self._reading = False

    def _on_readable(self) -> None:
        if self.sock is None:
            return
        try:
            data = self.sock.recv(READ_AHEAD - len(self._buffer))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._failed = True
        else:
            if data:
                self._buffer += data
            else:
                self._eof = True
        if self._eof or self._failed:
            self._stop_reading()
            self._departure()
        else:
            self._watch()
        self._wake()

    def _check_state(self) -> None:
        self._probe = None
        if self.sock is None:
            return
        try:
            state = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        except OSError:
            return
        if state in (_TCP_CLOSE_WAIT, _TCP_CLOSE):
            self._departure()  # the bytes still queued are the script's to read; the peer is gone
        else:
            self._watch()

    def _departure(self) -> None:
        if not self._departed:
            self._departed = True
            self.on_departed()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- the script's I/O ------------------------------------------------------------------------

    async def recv(self, n: int, timeout: float | None) -> bytes | None:
        """Up to n bytes; b"" at the end of input, None once the connection failed. TimeoutError when
        nothing arrived within `timeout` seconds (None: no limit)."""
        if not self._buffer and not self._eof and not self._failed and self.sock is not None:
            self._waiter = self._loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            finally:
                self._waiter = None
        if self._buffer:
            data = bytes(self._buffer[:n])
            del self._buffer[:n]
            self._watch()
            return data
        if self._eof:
            return b""
        return None

    async def send(self, data: bytes, idle: float | None = None) -> bool:
        """Send it all: False if the connection failed. TimeoutError if the client took no byte for `idle`
        seconds (it stopped reading: its receive window and our send buffer are full)."""
        sock = self.sock
        if sock is None:
            return False
        view = memoryview(data)
        while view:
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                pass
            except OSError:
                return False
            if view and not await self._writable(sock, idle):
                raise TimeoutError
            if self.sock is None:
                return False
        return True

    async def _writable(self, sock: socket.socket, timeout: float | None) -> bool:
        """Wait until `sock` takes bytes again; False after `timeout` seconds without."""
        ready: asyncio.Future[None] = self._loop.create_future()
        fd = sock.fileno()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        self._loop.add_writer(fd, wake)
        try:
            await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            return False
        finally:
            self._loop.remove_writer(fd)
        return True

    def close(self) -> None:
        """Close after flushing what was sent: FIN after the queued data, unread input dropped. Idempotent."""
        self._stop_reading()
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        sock, self.sock = self.sock, None
        self._wake()
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            drained = 0
            while drained < DRAIN_LIMIT:
                chunk = sock.recv(DRAIN_LIMIT)
                if not chunk:
                    break
                drained += len(chunk)
        sock.close()

    def shutdown(self) -> None:
        """Broker shutdown: a pending recv sees the end of input, a pending send fails."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
