"""What every sink's transport offers the delivery loop (deadend/sinks/delivery.py), and the TCP link
with delivery confirmation that the syslog and hpfeeds transports share.

Neither syslog over TCP nor hpfeeds has an application-level acknowledgement. What a sender can know is
that the collector's TCP stack acknowledged the bytes: the socket's send queue (SIOCOUTQ: bytes not yet
acknowledged by the peer) and the transport's own buffers are empty. That is what "delivered" means for
those sinks: the bytes reached the collector's host. Events not acknowledged when the connection goes
are sent again after the reconnect; so are those acknowledged in the RESEND_WINDOW seconds before, which
a collector that stopped may have held unread in its socket buffer (at least once: consumers
de-duplicate by id).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import fcntl
import os
import socket
import ssl
import struct
import termios
import time
from collections.abc import Sequence
from typing import Any, Final, cast

from deadend.logs import sanitize
from deadend.sinks.event import OutEvent

SIOCOUTQ: Final = termios.TIOCOUTQ  # the same ioctl number: bytes in a TCP socket's send queue
POLL_FIRST: Final = 0.0005
POLL_MAX: Final = 0.02
# A collector that stops (a restart, a crash) drops what its kernel acknowledged and it had not read yet:
# on loopback and LANs that is well under a second of events, so two seconds' worth are sent again.
RESEND_WINDOW: Final = 2.0


class SinkDown(Exception):
    """The collector cannot take events now. `confirmed`: how many of the batch were delivered before."""

    def __init__(self, reason: str, confirmed: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.confirmed = confirmed


def describe(error: BaseException) -> str:
    """One safe line for an exception from a connect or a write (the collector may have worded it)."""
    if isinstance(error, SinkDown):
        text = error.reason
    elif isinstance(error, ssl.SSLCertVerificationError):
        text = f"TLS certificate not accepted: {error.verify_message or error.reason}"
    elif isinstance(error, ssl.SSLError):
        text = f"TLS: {error.reason or error}"
    elif isinstance(error, TimeoutError):
        text = "timed out"
    elif isinstance(error, OSError) and (error.errno or error.strerror):
        # asyncio words a refused connect "Connect call failed ('10.0.0.5', 514)": the errno says it plainer
        text = os.strerror(error.errno) if error.errno else str(error.strerror)
        text = text[0].lower() + text[1:]
        if error.filename is not None:
            text += f": {error.filename}"
    else:
        text = str(error) or type(error).__name__
    return sanitize(text, 300)


class Transport(abc.ABC):
    """One collector connection. Its methods run on the event loop; none blocks it."""

    # Seconds of confirmed events to send again when the connection is lost: for transports whose
    # confirmation is the peer's TCP acknowledgement, which a collector that goes away may not have read.
    resend_window: float = 0.0

    @abc.abstractmethod
    async def connect(self) -> str | None:
        """Connect (raising SinkDown, OSError or ssl.SSLError); the collector's identity if it has one."""

    @abc.abstractmethod
    def prepare(self, event: OutEvent) -> bytes | str:
        """The bytes that carry `event`, or (str) why this collector can never take it."""

    @abc.abstractmethod
    async def deliver(self, batch: Sequence[tuple[OutEvent, bytes]]) -> None:
        """Deliver in order and return once all are confirmed, or raise SinkDown (with how many were)."""

    @abc.abstractmethod
    def lost(self) -> asyncio.Future[str]:
        """Resolves with a reason when the connection is gone (never for a sink without one)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Drop the connection (idempotent, quick)."""

    def reopen(self) -> None:  # noqa: B027 (only a file sink has something to reopen)
        """Logrotate's signal."""


class LinkProtocol(asyncio.Protocol):
    """The asyncio side of one TCP link: knows when the connection went away and why."""

    transport: asyncio.Transport

    def __init__(self) -> None:
        self.gone: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have the same methods without deriving from asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail("the collector closed the connection" if exc is None else describe(exc))

    def fail(self, reason: str) -> None:
        if not self.gone.done():
            self.gone.set_result(reason)
        if hasattr(self, "transport"):
            self.transport.abort()


def _unacknowledged(transport: asyncio.Transport) -> int | None:
    """Bytes written but not yet acknowledged by the peer's TCP: our buffers plus the socket's queue.
    None when the socket is already closed."""
    waiting = transport.get_write_buffer_size()
    # An SSL transport counts its own buffers but not those of the socket transport under it.
    inner = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
    if inner is not None and hasattr(inner, "get_write_buffer_size"):
        waiting += inner.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            waiting += struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]
        except (OSError, ValueError):
            return None  # closed under us: the connection is gone
    return waiting


def confirmed_frames(sizes: Sequence[int], acknowledged: int) -> int:
    """How many whole frames of `sizes`, written back to back, lie within the first `acknowledged` bytes."""
    count = 0
    for size in sizes:
        if size > acknowledged:
            break
        acknowledged -= size
        count += 1
    return count


async def write_confirmed(link: LinkProtocol, frames: Sequence[bytes], stall: float, *, tls: bool) -> None:
    """Write `frames` and wait until the peer's TCP acknowledged all of them.

    SinkDown when the connection goes or no byte is acknowledged for `stall` seconds (a collector that
    accepted and stopped reading); `confirmed` counts the frames known to have arrived (over TLS the
    record overhead makes partial counts guesswork, so none are claimed).
    """
    if link.gone.done():
        raise SinkDown(link.gone.result())
    total = sum(len(f) for f in frames)
    link.transport.write(b"".join(frames))
    waiting = _unacknowledged(link.transport)
    progress_at = time.monotonic()
    delay = POLL_FIRST
    while waiting != 0:
        if waiting is not None:
            await asyncio.wait([link.gone], timeout=delay)
            delay = min(delay * 2, POLL_MAX)
        now_waiting = None if link.gone.done() else _unacknowledged(link.transport)
        if now_waiting is None:
            link.fail("the connection closed")
            known = total if waiting is None else waiting
            confirmed = 0 if tls else confirmed_frames([len(f) for f in frames], total - known)
            raise SinkDown(link.gone.result(), confirmed)
        if waiting is None or now_waiting < waiting:
            progress_at = time.monotonic()
        elif time.monotonic() - progress_at > stall:
            confirmed = 0 if tls else confirmed_frames([len(f) for f in frames], total - now_waiting)
            link.fail(f"stalled: {now_waiting} bytes not acknowledged for {stall:g} s")
            raise SinkDown(link.gone.result(), confirmed)
        waiting = now_waiting


def tcp_keepalive(transport: asyncio.BaseTransport) -> None:
    """Notice a collector host that vanished (no FIN, no RST) within about a minute, even when idle."""
    sock: Any = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):  # already closed by the peer: the caller finds out from `gone`
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def read_secret(path: str) -> str:
    """A password, token or secret from its file (blocking: call it off the loop). Re-read on every
    connect, so a rotated secret needs no restart. The file's one line; a trailing newline is not part
    of the secret."""
    with open(path, "rb") as f:
        data = f.read(4097)
    if len(data) > 4096:
        raise SinkDown(f"{path}: a secret file holds one line of at most 4 KiB")
    text = data.removesuffix(b"\n").removesuffix(b"\r")
    if not text or b"\n" in text or not text.isascii():
        raise SinkDown(f"{path}: a secret file holds one non-empty ASCII line")
    return text.decode("ascii")
