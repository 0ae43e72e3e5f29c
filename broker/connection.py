"""One client connection on the event loop: bytes in, bytes out, and whether the peer is still there.

The socket is watched all the time, not only inside a script's `recv`: a client that sends FIN or RST
while its script sleeps, computes or logs is noticed at once (`on_departed`), so that its session gets
the --linger budget and then frees its sandbox, instead of holding it until --session-time. To see a FIN
behind data the script has not read yet, the connection reads ahead into a buffer of at most READ_AHEAD
bytes (the kernel holds the rest, and TCP flow control still applies); while that buffer is full, the
peer's TCP state is checked every PROBE_INTERVAL seconds instead.

What the script gets is unchanged by reading ahead: `recv` returns buffered bytes first, then the end of
input (b"") or the failure (None) it would have got from the socket.

`start_tls` turns the connection into a TLS server's (`deadend.starttls()`): it reads the client's
ClientHello into the same buffer (up to MAX_SPAN bytes, the most one can take) until `read_client_hello`
has all of it, fingerprints it, hands every byte read so far to OpenSSL (broker/tls.py) and completes the
handshake. From then on the buffer holds plaintext: the client's bytes go through OpenSSL on their way in,
the script's on their way out, and everything above (recv, send, the read-ahead bound, departures) works
as before. Bytes that came before the ClientHello (a client that pipelined commands behind STARTTLS) are
not a ClientHello: the handshake fails on them, and they never reach the script as if they were protected.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from broker.tls import TlsLayer
from deadend.clienthello import MAX_SPAN, ClientHelloError, Complete, read_client_hello
from deadend.tlsinfo import TlsInfo

READ_AHEAD = 1 << 16  # bytes read before the script asks (one recv's worth at most)
PROBE_INTERVAL = 1.0  # seconds between TCP state checks while the read-ahead buffer is full
DRAIN_LIMIT = 1 << 16  # unread bytes discarded at close, so the kernel sends FIN rather than RST
_TCP_CLOSE_WAIT = 8  # tcp_info.tcpi_state: the peer sent FIN
_TCP_CLOSE = 7  # ... the connection is gone (RST)


@dataclass(slots=True)
class Handshake:
    """How a `start_tls` went. `info` is set once the ClientHello was read (with what was negotiated, if
    the handshake completed); `error` says why it failed (empty: TLS now carries the connection)."""

    info: TlsInfo | None = None
    error: str = ""
    timed_out: bool = False
    cpu: float = 0.0  # the broker's CPU seconds: the hello's parsing and fingerprints, and the handshake


class ClientConnection:
    __slots__ = (
        "_buffer",
        "_departed",
        "_eof",
        "_failed",
        "_limit",
        "_loop",
        "_out",
        "_probe",
        "_reading",
        "_sending",
        "_tcp",
        "_tls",
        "_waiter",
        "on_departed",
        "sock",
    )

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
        self._limit = READ_AHEAD  # the buffer's bound (MAX_SPAN while a ClientHello is read)
        self._tls: TlsLayer | None = None  # set once the ClientHello is read
        self._out = bytearray()  # TLS records made but not yet handed to the kernel
        self._sending = False  # a send is in progress: it takes the records made meanwhile along
        self._watch()

    # --- watching the peer -----------------------------------------------------------------------

    def _watch(self) -> None:
        """Read ahead while there is room; probe the TCP state while there is none."""
        if self.sock is None or self._eof or self._failed:
            return
        if self._room() > 0:
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

    def _room(self) -> int:
        """How many bytes the next read from the socket may take. Through TLS, the plaintext buffer and
        the client's bytes OpenSSL has not taken yet are each held to the bound."""
        if self._tls is None:
            return self._limit - len(self._buffer)
        if len(self._buffer) >= self._limit:
            return 0
        return self._limit - self._tls.unread

    def _on_readable(self) -> None:
        if self.sock is None:
            return
        room = self._room()
        if room <= 0:  # the bound changed under a registered reader (a hello handed to OpenSSL)
            self._watch()
            return
        try:
            data = self.sock.recv(room)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._failed = True
        else:
            if not data:
                self._eof = True
            elif self._tls is None:
                self._buffer += data
            else:
                self._tls.feed(data)
                if self._tls.established:
                    self._decrypt()
        self._after_input()
        self._wake()

    def _after_input(self) -> None:
        if self._eof or self._failed:
            self._stop_reading()
            self._departure()
        else:
            self._watch()

    def _decrypt(self) -> None:
        """Plaintext from the records received, into the buffer while it has room."""
        tls = self._tls
        assert tls is not None
        while len(self._buffer) < self._limit:
            try:
                data = tls.read(self._limit - len(self._buffer))
            except ssl.SSLError:  # a forged or broken record: as a failed read (OpenSSL made an alert)
                self._failed = True
                break
            if data is None:  # close_notify: the client is done, as with a FIN
                self._eof = True
                break
            if not data:
                break
            self._buffer += data
        self._push_out()

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

    def readable(self) -> bool:
        """Would `take` answer now (bytes read ahead, the end of input, or the failure)?"""
        return bool(self._buffer) or self._eof or self._failed or self.sock is None

    def take(self, n: int) -> bytes | None:
        """What a recv gets once `readable`: up to n bytes; b"" at the end of input, None once the
        connection failed."""
        if self._buffer:
            data = bytes(self._buffer[:n])
            del self._buffer[:n]
            if self._tls is not None and self._tls.established and not (self._eof or self._failed):
                self._decrypt()
            self._after_input()
            return data
        if self._eof:
            return b""
        return None

    async def recv(self, n: int, timeout: float | None) -> bytes | None:
        """Up to n bytes; b"" at the end of input, None once the connection failed. TimeoutError when
        nothing arrived within `timeout` seconds (None: no limit)."""
        if not self.readable():
            async with asyncio.timeout(timeout):
                while not self.readable():  # through TLS, bytes may arrive that hold no plaintext yet
                    await self._input()
        return self.take(n)

    async def _input(self) -> None:
        """Until the next bytes arrive (or the end, a failure, a close)."""
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def send_now(self, data: bytes) -> int | None:
        """Write what the socket takes without waiting: the bytes written (maybe 0), None once the
        connection failed or was closed. Through TLS, 0: records are made and sent by `send`."""
        if self.sock is None:
            return None
        if self._tls is not None:
            return 0
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            return None

    async def send(self, data: bytes, idle: float | None = None) -> bool:
        """Send it all: False if the connection failed. TimeoutError if the client took no byte for `idle`
        seconds (it stopped reading: its receive window and our send buffer are full). Through TLS, the
        records that carry it."""
        if self.sock is None:
            return False
        if self._tls is not None:
            try:
                self._tls.write(data)
            except ssl.SSLError:
                return False
            return await self._flush(idle)
        return await self._send_raw(data, idle)

    async def _send_raw(self, data: bytes, idle: float | None) -> bool:
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

    async def _flush(self, idle: float | None = None) -> bool:
        """Send every TLS record made so far, in order; False if the connection failed or closed (and
        TimeoutError, as `send`)."""
        assert self._tls is not None
        self._out += self._tls.output()
        while self._out:
            chunk = bytes(self._out)
            self._out.clear()
            self._sending = True
            try:
                if not await self._send_raw(chunk, idle):
                    return False
            finally:
                self._sending = False
            self._out += self._tls.output()  # made while we waited (an alert, a key update's answer)
        return True

    def _push_out(self) -> None:
        """Records OpenSSL made while reading: sent now as far as the socket takes them, else by the next
        send (or the close)."""
        assert self._tls is not None
        self._out += self._tls.output()
        if self._sending or not self._out or self.sock is None:
            return
        with contextlib.suppress(OSError):
            del self._out[: self.sock.send(self._out)]

    # --- TLS ---------------------------------------------------------------------------------------

    async def start_tls(self, context: ssl.SSLContext, timeout: float) -> Handshake:
        """Read the ClientHello, then complete the server's handshake with `context`, within `timeout`
        seconds in all. The connection is of no further use when it fails (the caller closes it)."""
        result = Handshake()
        try:
            async with asyncio.timeout(timeout):
                await self._handshake(context, result)
        except TimeoutError:
            result.timed_out = True
            if result.info is not None:
                what = "the TLS handshake did not complete"
            else:
                what = "the ClientHello was not complete" if self._buffer else "no ClientHello"
            result.error = f"{what} within {timeout:g}s"
        if result.error and self._tls is not None:
            self._push_out()  # the alert OpenSSL made, if any
        self._limit = READ_AHEAD
        return result

    async def _handshake(self, context: ssl.SSLContext, result: Handshake) -> None:
        clock = time.thread_time
        self._limit = MAX_SPAN
        self._watch()
        while True:
            started = clock()
            try:
                answer = read_client_hello(bytes(self._buffer))
            except ClientHelloError as e:
                result.error = str(e)
                return
            finally:
                result.cpu += clock() - started
            if isinstance(answer, Complete):
                break
            while len(self._buffer) < answer.at_least:
                if not await self._more():
                    result.error = self._gone("before its ClientHello was complete")
                    return
        started = clock()
        result.info = info = TlsInfo.of(answer.hello, bytes(self._buffer[: answer.length]))
        self._limit = READ_AHEAD
        tls = self._tls = TlsLayer(context)
        tls.feed(bytes(self._buffer))  # the hello and whatever came behind it: all of it is TLS
        self._buffer.clear()
        result.cpu += clock() - started
        while True:
            started = clock()
            try:
                done = tls.handshake()
            except ssl.SSLError as e:
                result.error = f"TLS handshake failed: {e.reason or type(e).__name__}"
                return
            finally:
                result.cpu += clock() - started
            if not await self._flush():
                result.error = self._gone("during the TLS handshake")
                return
            if done:
                break
            if not await self._more():
                result.error = self._gone("during the TLS handshake")
                return
        result.info = dataclasses.replace(
            info, version=tls.version, cipher=tls.cipher, alpn_selected=tls.alpn_selected
        )
        self._decrypt()  # what came right behind the client's Finished (a request, often)
        self._after_input()

    async def _more(self) -> bool:
        """Wait for more client bytes; False if none can come any more."""
        if self._eof or self._failed or self.sock is None:
            return False
        await self._input()
        return not (self._eof or self._failed or self.sock is None)

    def _gone(self, when: str) -> str:
        if self._eof:
            return f"the client closed the connection {when}"
        if self._failed:
            return f"the connection failed {when}"
        return f"the connection was closed {when}"

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
        if self._tls is not None:
            if self._tls.established:
                self._tls.close_notify()
            self._out += self._tls.output()
            if self._out and not self._sending:  # best effort, as the socket takes it: never waits
                with contextlib.suppress(OSError):
                    sock.send(self._out)
            self._out.clear()
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
