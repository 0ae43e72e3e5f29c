"""Run one script outside the daemon, in the real sandbox: for `deadend try` and `deadend test`.

The script gets one end of a socketpair as its connection, exactly as the broker would give it a TCP
socket; the caller drives the other end (a terminal, or a transcript).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from broker.sandboxes import Sandboxes, standalone
from broker.session import Session, SessionSettings
from deadend.config import Config
from deadend.logs import SCRIPT_LINE, EventLog, Where, sanitize, unquote
from deadend.scripts import Script
from deadend.transcript import LOOKAHEAD, Step, Transcript

END_WAIT = 5.0  # seconds a script may take to finish after the client is done with it
RECEIVED_KEPT = 4096  # the last bytes the script sent, kept for the report
HEAD_KEPT = 64 << 10  # the first bytes the script sent, kept for `deadend audit --diff`
SEND_BLOCK = 65536  # a repeated send goes out in blocks of about this size


class Rehearsal:
    """A small pool and a log for running scripts one at a time."""

    def __init__(self, config: Config, log: EventLog) -> None:
        self.config = dataclasses.replace(config, workers=2, warm=1, queue_size=1)
        self.log = log
        self._sandboxes: contextlib.AbstractAsyncContextManager[Sandboxes] = standalone(self.config, log)
        self.sandboxes: Sandboxes | None = None

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
        seed: tuple[int, int] | None = None,
    ) -> asyncio.Task[None]:
        settings = SessionSettings(self.config.ceilings, allow_clock, self.config.shutdown_grace)
        where = Where(script.port, "rehearsal", peer_ip)
        assert self.sandboxes is not None
        pool = self.sandboxes.process

        async def run() -> None:
            lease = await pool.acquire(script, asyncio.get_running_loop().time() + 10.0)
            await Session(sock, where, script, settings, self.log, seed=seed).run(lease)

        return asyncio.get_running_loop().create_task(run())


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

    async def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or self.eof:
            raise _Mismatch("timed out" if not self.eof else "the script closed the connection")
        try:
            async with asyncio.timeout(remaining):
                chunk = await self.loop.sock_recv(self.sock, 65536)
        except TimeoutError:
            raise _Mismatch(f"nothing within {self.window_ms:.0f} ms") from None
        except OSError:
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


async def _run_step(client: _Client, step: Step, previous: float) -> None:
    client.window_ms = step.within_ms if step.within_ms is not None else client.timeout * 1000
    deadline = time.monotonic() + client.window_ms / 1000
    kind = step.kind
    if kind == "send":
        await client.send(step.data, step.repeat, deadline)
        return
    if kind == "close":
        client.sock.shutdown(socket.SHUT_RDWR)
        return
    if kind == "shutdown":
        client.sock.shutdown(socket.SHUT_WR)
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
    for step in transcript.steps if steps is None else steps:
        try:
            await _run_step(client, step, previous)
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
    task = rehearsal.start_session(script, theirs, transcript.peer_ip, transcript.allow_clock, seed)
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
