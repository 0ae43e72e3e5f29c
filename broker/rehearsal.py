"""Run one script outside the daemon, in the real sandbox: for `deadend try` and `deadend test`.

The script gets one end of a socketpair as its connection, exactly as the broker would give it a TCP
socket; the caller drives the other end (a terminal, or a transcript). A script's `deadend.starttls()`
gets a certificate generated for the rehearsal (for `localhost`); the client side speaks TLS through
TlsClient when the transcript says so (`% tls`, `! starttls`), or, for `deadend try --tls`, as soon as
the script asks for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.sandboxes import Sandboxes, standalone
from broker.session import Session, SessionSettings
from broker.tls import TlsService
from deadend.config import Config
from deadend.logs import SCRIPT_LINE, EventLog, Where, sanitize, unquote
from deadend.scripts import Script
from deadend.tlscert import generate_certificate
from deadend.transcript import LOOKAHEAD, Step, Transcript

END_WAIT = 5.0  # seconds a script may take to finish after the client is done with it
RECEIVED_KEPT = 4096  # the last bytes the script sent, kept for the report
HEAD_KEPT = 64 << 10  # the first bytes the script sent, kept for `deadend audit --diff`
SEND_BLOCK = 65536  # a repeated send goes out in blocks of about this size
TLS_NAME = "localhost"  # what the rehearsal's certificate is for


class TlsClient:
    """The client side of TLS over a socket on the event loop (memory BIOs, as the broker's side): for
    the rehearsal's clients. It checks no certificate: the server is the script being tried."""

    def __init__(self, sock: socket.socket, sni: str | None = None, alpn: Sequence[str] = ()) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if alpn:
            context.set_alpn_protocols(list(alpn))
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=False, server_hostname=sni)
        self._loop = asyncio.get_running_loop()

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            await self._loop.sock_sendall(self.sock, data)

    async def _feed(self) -> bool:
        """Bytes from the server into OpenSSL; False at the end of the connection."""
        data = await self._loop.sock_recv(self.sock, 65536)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    async def handshake(self) -> None:
        """Complete the handshake; ssl.SSLError if it fails, ConnectionError if the server closed."""
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._feed():
                    raise ConnectionError(
                        "the script closed the connection during the TLS handshake"
                    ) from None
        await self._flush()

    async def send(self, data: bytes) -> None:
        self._tls.write(data)
        await self._flush()

    async def recv(self) -> bytes:
        """The next plaintext; b"" once the server is done (close_notify, or the connection's end)."""
        while True:
            try:
                return self._tls.read(65536)
            except ssl.SSLWantReadError:
                await self._flush()  # what OpenSSL answers to the server's records (a key update)
                if not await self._feed():
                    with contextlib.suppress(ssl.SSLError):
                        return self._tls.read(65536)
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def close_notify(self) -> None:
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()
        with contextlib.suppress(OSError):
            await self._flush()


class Rehearsal:
    """A small pool and a log for running scripts one at a time."""

    def __init__(self, config: Config, log: EventLog) -> None:
        self.config = dataclasses.replace(config, workers=2, warm=1, queue_size=1)
        self.log = log
        self._sandboxes: contextlib.AbstractAsyncContextManager[Sandboxes] = standalone(self.config, log)
        self.sandboxes: Sandboxes | None = None
        # ECDSA: made in a few milliseconds, where RSA takes a tenth of a second every run
        self.tls = TlsService(generate_certificate(TLS_NAME, "ecdsa"))

    async def __aenter__(self) -> Rehearsal:
        self.sandboxes = await self._sandboxes.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._sandboxes.__aexit__(None, None, None)

    def start_session(
        self,
        script: Script,
        sock: socket.socket,
        peer_ip: str,
        allow_clock: bool,
        on_starttls: Callable[[], None] | None = None,
        seed: tuple[int, int] | None = None,
    ) -> asyncio.Task[None]:
        """`on_starttls`: called when the script asks for TLS, before its handshake waits for the
        ClientHello (`deadend try --tls` starts its client's handshake then)."""
        tls = self.tls if on_starttls is None else dataclasses.replace(self.tls, on_starttls=on_starttls)
        settings = SessionSettings(self.config.ceilings, allow_clock, self.config.shutdown_grace, tls=tls)
        where = Where(script.port, "rehearsal", peer_ip)
        assert self.sandboxes is not None
        pool = self.sandboxes.process

        async def run() -> None:
            lease = await pool.acquire(script, asyncio.get_running_loop().time() + 10.0)
            await Session(sock, where, script, settings, self.log, seed=seed).run(lease)

        return asyncio.get_running_loop().create_task(run())


async def relay(
    plain: socket.socket,
    wire: socket.socket,
    tls_wanted: asyncio.Event | None,
    sni: str | None,
    alpn: Sequence[str],
) -> str:
    """`deadend try --tls` / `--starttls`: carry bytes between the terminal's side (`plain`) and the
    script's connection (`wire`) through a TlsClient: from the start (`tls_wanted` None), or, as they are,
    until the script asks for TLS (`tls_wanted` set). Returns once the script's side is done: "" or why
    TLS failed."""
    loop = asyncio.get_running_loop()

    async def copy(read: Callable[[], Awaitable[bytes]], write: Callable[[bytes], Awaitable[None]]) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            while data := await read():
                await write(data)

    def up() -> Awaitable[bytes]:
        return loop.sock_recv(plain, 65536)

    async def to_plain(data: bytes) -> None:
        await loop.sock_sendall(plain, data)

    async def to_wire(data: bytes) -> None:
        await loop.sock_sendall(wire, data)

    upward: asyncio.Future[None] = loop.create_future()
    downward: asyncio.Future[None] = loop.create_future()
    wanted: asyncio.Future[Any] = loop.create_future()
    try:
        if tls_wanted is not None:
            upward = asyncio.ensure_future(copy(up, to_wire))
            downward = asyncio.ensure_future(copy(lambda: loop.sock_recv(wire, 65536), to_plain))
            wanted = asyncio.ensure_future(tls_wanted.wait())
            await asyncio.wait({wanted, downward}, return_when=asyncio.FIRST_COMPLETED)
            if not wanted.done():  # the script ended the connection without TLS
                return ""
            # Before its handshake the script sends nothing more: what was read so far was plaintext.
            await _cancel(upward)
            await _cancel(downward)
        tls = TlsClient(wire, sni, alpn)
        try:
            await tls.handshake()
        except (ssl.SSLError, ConnectionError, OSError) as e:
            return f"TLS handshake failed: {sanitize(str(e), 300)}"
        upward = asyncio.ensure_future(copy(up, tls.send))
        downward = asyncio.ensure_future(copy(tls.recv, to_plain))
        await downward
        return ""
    finally:
        for task in (wanted, upward, downward):
            await _cancel(task)
        with contextlib.suppress(OSError):
            plain.shutdown(socket.SHUT_WR)


async def _cancel(task: asyncio.Future[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@dataclass
class Replay:
    ok: bool
    failure: str = ""
    received: bytes = b""  # the last bytes the script sent (RECEIVED_KEPT at most)
    log_lines: list[str] = field(default_factory=list)


class _Mismatch(Exception):
    pass


class _Client:
    """The client side of a transcript: buffered reads with deadlines, bounded by LOOKAHEAD."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self.buffer = b""
        self.received = b""
        self.first_at: float | None = None  # when the first byte came (monotonic)
        self.digest = hashlib.sha256()  # of every byte that came
        self.head = b""  # the first HEAD_KEPT of them
        self.eof = False
        self.window_ms = timeout * 1000  # the current step's time budget, for messages
        self.loop = asyncio.get_running_loop()
        self.tls: TlsClient | None = None

    async def starttls(self, transcript: Transcript, deadline: float) -> None:
        if self.tls is not None:
            raise _Mismatch("the connection already speaks TLS")
        tls = TlsClient(self.sock, transcript.sni, transcript.alpn)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await tls.handshake()
        except TimeoutError:
            raise _Mismatch(f"the TLS handshake did not complete within {self.window_ms:.0f} ms") from None
        except (ssl.SSLError, ConnectionError) as e:
            self.eof = True
            raise _Mismatch(f"the TLS handshake failed: {sanitize(str(e), 300)}") from None
        self.tls = tls

    async def _chunk(self) -> bytes:
        if self.tls is not None:
            return await self.tls.recv()
        return await self.loop.sock_recv(self.sock, 65536)

    async def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or self.eof:
            raise _Mismatch("timed out" if not self.eof else "the script closed the connection")
        try:
            async with asyncio.timeout(remaining):
                chunk = await self._chunk()
        except TimeoutError:
            raise _Mismatch(f"nothing within {self.window_ms:.0f} ms") from None
        except (OSError, ssl.SSLError):
            chunk = b""
        if not chunk:
            self.eof = True
            raise _Mismatch("the script closed the connection")
        self.buffer += chunk
        self.received = (self.received + chunk)[-RECEIVED_KEPT:]
        if self.first_at is None:
            self.first_at = time.monotonic()
        self.digest.update(chunk)
        if len(self.head) < HEAD_KEPT:
            self.head += chunk[: HEAD_KEPT - len(self.head)]

    async def send(self, data: bytes, repeat: int, deadline: float) -> None:
        """`data` `repeat` times, in blocks; the script must take it all before the deadline."""
        total = len(data) * repeat
        block = data * max(1, min(repeat, SEND_BLOCK // max(1, len(data))))
        sent = 0
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                while sent < total:
                    piece = block[: total - sent]  # whole repetitions: len(block) divides what is left
                    if self.tls is not None:
                        await self.tls.send(piece)
                    else:
                        await self.loop.sock_sendall(self.sock, piece)
                    sent += len(piece)
        except TimeoutError:
            raise _Mismatch(
                f"the script took {sent} of {total} bytes within {self.window_ms:.0f} ms"
            ) from None

    async def line(self, deadline: float) -> bytes:
        while b"\n" not in self.buffer:
            if len(self.buffer) >= LOOKAHEAD:
                raise _Mismatch(f"no line end in the first {LOOKAHEAD} bytes: {self.buffer[:80]!r}...")
            await self._fill(deadline)
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.removesuffix(b"\r")

    async def exactly(self, n: int, deadline: float) -> bytes:
        while len(self.buffer) < n:
            await self._fill(deadline)
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    async def prefix(self, pattern: re.Pattern[bytes], deadline: float) -> None:
        """Consume the first match of `pattern` at the start of what arrives, as soon as there is one."""
        while not (m := pattern.match(self.buffer[:LOOKAHEAD])):
            if len(self.buffer) >= LOOKAHEAD:
                raise _Mismatch(f"no match in the first {LOOKAHEAD} bytes: {self.buffer[:80]!r}...")
            try:
                await self._fill(deadline)
            except _Mismatch as e:
                raise _Mismatch(f"{e}; got {self.buffer[:300]!r}") from None
        self.buffer = self.buffer[m.end() :]

    async def eof_next(self, deadline: float) -> None:
        if self.buffer:
            raise _Mismatch(f"expected the end, got {self.buffer[:80]!r}")
        try:
            await self._fill(deadline)
        except _Mismatch as e:
            if self.eof:
                return
            raise _Mismatch("expected the end, but the connection stayed open") from e
        raise _Mismatch(f"expected the end, got {self.buffer[:80]!r}")


async def _run_step(client: _Client, step: Step, previous: float, transcript: Transcript) -> None:
    client.window_ms = step.within_ms if step.within_ms is not None else client.timeout * 1000
    deadline = time.monotonic() + client.window_ms / 1000
    kind = step.kind
    if kind == "send":
        await client.send(step.data, step.repeat, deadline)
        return
    if kind == "starttls":
        await client.starttls(transcript, deadline)
        return
    if kind in ("close", "shutdown"):
        if client.tls is not None:  # a TLS client says goodbye first (close_notify): the script's recv ends
            await client.tls.close_notify()
        client.sock.shutdown(socket.SHUT_RDWR if kind == "close" else socket.SHUT_WR)
        return
    if kind == "expect_line":
        got = await client.line(deadline)
        if got != step.data:
            raise _Mismatch(f"expected line {step.data!r}, got {got!r}")
    elif kind == "expect_match":
        assert step.pattern is not None
        got = await client.line(deadline)
        if not step.pattern.fullmatch(got):
            raise _Mismatch(f"expected a line matching {step.pattern.pattern!r}, got {got!r}")
    elif kind == "expect_prefix":
        assert step.pattern is not None
        await client.prefix(step.pattern, deadline)
    elif kind == "expect_bytes":
        got = await client.exactly(len(step.data), deadline)
        if got != step.data:
            raise _Mismatch(f"expected bytes {step.data!r}, got {got!r}")
    elif kind == "skip_until":
        assert step.pattern is not None
        while not step.pattern.fullmatch(await client.line(deadline)):
            pass
    elif kind == "eof":
        await client.eof_next(deadline)
    if step.after_ms is not None and (time.monotonic() - previous) * 1000 < step.after_ms:
        waited = (time.monotonic() - previous) * 1000
        raise _Mismatch(f"arrived after {waited:.0f} ms, sooner than {step.after_ms:.0f} ms")


def as_logged(line: str) -> str | None:
    """A script's log line as a transcript's `~ log` sees it: "LEVEL MESSAGE", then the fields as the text
    line shows them (` user="root" tries=3`); None for the broker's own lines."""
    m = SCRIPT_LINE.match(line)
    return None if m is None else f"{m.group(1).lower()} {unquote(m.group(2))}{m.group(3)}"


@dataclass
class Played:
    failure: str  # empty when every step was met
    received: bytes  # the last bytes the script sent (RECEIVED_KEPT at most)
    head: bytes = b""  # the first bytes it sent (HEAD_KEPT at most)
    digest: str = ""  # SHA-256 of everything it sent
    first_at: float | None = None  # when the first byte came (monotonic)


async def play(sock: socket.socket, transcript: Transcript, steps: Sequence[Step] | None = None) -> Played:
    """Play the client's side of `steps` (default: all of the transcript's) over a non-blocking `sock`;
    stop at the first mismatch. The socket stays open: the caller closes it."""
    client = _Client(sock, transcript.timeout_ms / 1000)
    failure = ""
    previous = time.monotonic()
    steps = transcript.steps if steps is None else steps
    if transcript.tls:  # `% tls`: the client's first act is its ClientHello
        steps = [Step(0, "starttls", source="% tls"), *steps]
    for step in steps:
        try:
            await _run_step(client, step, previous, transcript)
        except (_Mismatch, OSError) as e:
            failure = f"{sanitize(transcript.path)}:{step.line}: {step.source}\n    {e}"
            break
        previous = time.monotonic()
    return Played(failure, client.received, client.head, client.digest.hexdigest(), client.first_at)


async def replay(rehearsal: Rehearsal, script: Script, transcript: Transcript, lines: list[str]) -> Replay:
    """Play the client's side of `transcript` against `script`; stop at the first mismatch.

    `lines` is where the rehearsal's log stream collects its output (the script's log lines are read
    from it for `~ log` expectations).
    """
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    first_log = len(lines)
    seed = transcript.seed
    task = rehearsal.start_session(script, theirs, transcript.peer_ip, transcript.allow_clock, seed=seed)
    try:
        played = await play(ours, transcript)
    finally:
        ours.close()
        try:
            async with asyncio.timeout(END_WAIT):
                await asyncio.shield(task)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    rehearsal.log.flush()
    failure = played.failure
    script_lines = [seen for line in lines[first_log:] if (seen := as_logged(line)) is not None]
    if not failure:
        for expectation in transcript.logs:
            if not any(expectation.pattern.search(line) for line in script_lines):
                where = f"{sanitize(transcript.path)}:{expectation.line}: {expectation.source}"
                failure = f"{where}\n    no script log line matches"
                break
    return Replay(not failure, failure, played.received, lines[first_log:])
