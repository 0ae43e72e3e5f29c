"""`deadend audit`'s runs: each script against the battery of client behaviours, in the real sandbox.

A run is a real session (broker.session.Session, the broker's own, with its monitor and every ceiling) on
one end of a TCP connection over loopback, in a sandbox of the standalone pool (broker.sandboxes.standalone:
the same lockdown as the broker's), under the audit budget, with a fixed PRNG seed; the client plays one
behaviour of deadend/audit.py's battery on the other end, or one of the script's transcripts. What the run
measured comes from the session's monitor (API calls, log lines, bytes), the worker's usage report (heap,
instructions, CPU; Start.measure) and the client (time to first byte, what it got, when it left).
deadend/audit.py judges the runs. Runs go in parallel, at most `workers` at once, on one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from broker.pool import Lease
from broker.rehearsal import TLS_NAME, as_logged, play
from broker.sandboxes import Sandboxes, standalone
from broker.session import Session, SessionSettings
from broker.staticcheck import check
from broker.tls import TlsService
from broker.zygote import ZygoteLost
from deadend import audit, wire
from deadend.audit import Act, Behaviour, Run
from deadend.config import Ceilings, Config
from deadend.logs import EventLog, Where, sanitize
from deadend.reasons import Reason
from deadend.scripts import Script, port_of, read_source
from deadend.tlscert import generate_certificate
from deadend.transcript import Transcript, TranscriptError, load

SEND_TIMEOUT = 3.0  # seconds a client's send may wait for the script to take the bytes
END_MARGIN = 5.0  # seconds past --session-time a run may take before it is given up
LOG_LINES_KEPT = 2000  # script log lines kept per run, for a transcript's `~ log` expectations
PEER_IP = "192.0.2.10"  # what get_ip() returns (TEST-NET-1), unless a transcript says otherwise
LOOPBACK = "127.0.0.1"


class _Logs(io.TextIOBase):
    """The audit's log stream: keeps each run's script lines (a few), by connection id; drops the rest."""

    def __init__(self) -> None:
        self.lines: dict[str, list[str]] = {}

    def write(self, s: str) -> int:
        for line in s.splitlines():
            seen = as_logged(line)
            if seen is None:
                continue
            conn = line.split(" conn=", 1)[1].split(" ", 1)[0]
            kept = self.lines.get(conn)
            if kept is not None and len(kept) < LOG_LINES_KEPT:
                kept.append(seen)
        return len(s)


@dataclass
class _Ended:
    """What the session-end events said of one run."""

    reason: str = Reason.CRASH.value
    limit: str | None = None
    detail: str = ""


@dataclass
class _Received:
    """What the client got."""

    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    head: bytes = b""
    first_at: float | None = None
    eof: asyncio.Event = field(default_factory=asyncio.Event)


class Auditor:
    """Sandboxes for an audit, and the runs."""

    def __init__(self, ceilings: Ceilings, workers: int, seed: int, allow_clock: bool) -> None:
        self.ceilings = ceilings
        self.seed = seed
        self.allow_clock = allow_clock
        self.slots = asyncio.Semaphore(workers)
        # A script's deadend.starttls() gets a handshake, as in the broker and `deadend test`: a throwaway
        # certificate, which the transcripts' clients (`! starttls`, `% tls`) do not verify.
        self.tls = TlsService(generate_certificate(TLS_NAME, "ecdsa"))
        # two workers more than runs at once: the static checks compile in workers of their own
        self.config = Config(
            scripts=Path(),
            workers=workers + 2,
            warm=min(workers, 4),
            queue_size=4 * workers,
            ceilings=ceilings,
        )
        self.stream = _Logs()
        self.log = EventLog(self.stream, level="debug")  # type: ignore[arg-type]
        self.log.observers.append(self._observe)
        self.ended: dict[str, _Ended] = {}
        self._sandboxes: contextlib.AbstractAsyncContextManager[Sandboxes] = standalone(self.config, self.log)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._accepting = asyncio.Lock()
        self.sandboxes: Sandboxes | None = None
        self._runs = 0

    async def __aenter__(self) -> Auditor:
        self.listener.bind((LOOPBACK, 0))
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.sandboxes = await self._sandboxes.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._sandboxes.__aexit__(None, None, None)
        self.listener.close()
        self.log.close()

    async def _lease(self, script: Script) -> Lease:
        """A sandbox for one run. A fork that fails (the machine short of processes or memory for a
        moment) is tried again once, a second later; a second failure stops the audit."""
        assert self.sandboxes is not None
        loop = asyncio.get_running_loop()
        try:
            return await self.sandboxes.process.acquire(script, loop.time() + 60.0)
        except (OSError, ZygoteLost):
            await asyncio.sleep(1.0)
            return await self.sandboxes.process.acquire(script, loop.time() + 60.0)

    async def _connection(self) -> tuple[socket.socket, socket.socket]:
        """A TCP connection over loopback: the client's end and the script's. TCP, not a socketpair: the
        broker notices a client that leaves with unread data by its TCP state, as in production."""
        loop = asyncio.get_running_loop()
        async with self._accepting:  # one at a time: each run accepts its own client
            ours = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ours.setblocking(False)
            try:
                await loop.sock_connect(ours, self.listener.getsockname())
                theirs, _ = await loop.sock_accept(self.listener)
            except BaseException:
                ours.close()
                raise
        theirs.setblocking(False)
        return ours, theirs

    def _observe(self, event: str, where: Where, fields: Mapping[str, object]) -> None:
        ended = self.ended.get(where.conn)
        if ended is None:
            return
        if event == "session.end":
            ended.reason, limit = str(fields["reason"]), fields["limit"]
            ended.limit = None if limit is None else str(limit)
        elif event == "session.problem":
            ended.detail = str(fields["detail"])

    # --- one script ----------------------------------------------------------------------------------

    async def audit(self, path: Path, transcript_dirs: list[Path]) -> audit.Report:
        """Every run of one script, judged; the static check folded in."""
        assert self.sandboxes is not None
        async with self.slots:
            static = await check(self.sandboxes.process, path, self.ceilings)
        report = static.to_json()
        runs: list[Run] = []
        unreadable: list[str] = []
        try:
            source: bytes | None = read_source(path)  # as the broker reads it: check said why if not
        except OSError:
            source = None
        if static.compile_error is None and source is not None:
            port = port_of(path.name)
            script = Script(port if isinstance(port, int) else 0, path, source)
            plans: list[tuple[Behaviour, Transcript | None]] = []
            transcripts, unreadable = _transcripts_of(path, transcript_dirs)
            for transcript in transcripts:
                plans.append((audit.transcript_behaviour(Path(transcript.path).name), transcript))
            if not transcripts:
                plans.append((audit.GENERIC, None))
            plans += [(behaviour, None) for behaviour in audit.battery(self.seed)]
            runs = list(await asyncio.gather(*(self.run(script, b, t) for b, t in plans)))
        return audit.judge(str(path), self.seed, runs, report, unreadable)

    # --- one run -------------------------------------------------------------------------------------

    async def run(self, script: Script, behaviour: Behaviour, transcript: Transcript | None) -> Run:
        async with self.slots:
            return await self._run(script, behaviour, transcript)

    async def _run(self, script: Script, behaviour: Behaviour, transcript: Transcript | None) -> Run:
        assert self.sandboxes is not None
        loop = asyncio.get_running_loop()
        self._runs += 1
        conn = f"audit{self._runs}"
        seed = audit.run_seed(self.seed, behaviour.name)
        if transcript is not None and transcript.seed is not None:
            seed = transcript.seed  # a transcript made from a recording: that session's random numbers
        run = Run(behaviour.name, behaviour.words, seed)
        self.ended[conn] = ended = _Ended()
        self.stream.lines[conn] = []
        peer = transcript.peer_ip if transcript is not None else PEER_IP
        clock = transcript.allow_clock if transcript is not None else self.allow_clock
        settings = SessionSettings(self.ceilings, clock, 1.0, tls=self.tls, measure=True)
        lease = await self._lease(script)
        try:
            ours, theirs = await self._connection()
        except BaseException:
            lease.release(Reason.CRASH)  # its worker is killed and reaped, as after any session
            raise
        started = time.monotonic()
        session = Session(theirs, Where(script.port, conn, peer), script, settings, self.log, seed=seed)
        task = loop.create_task(session.run(lease))
        client = loop.create_task(
            self._transcript(ours, transcript, run, started)
            if transcript is not None
            else self._client(ours, behaviour.acts, run, started)
        )
        limit = self.ceilings.session_time + self.ceilings.linger + END_MARGIN
        try:
            async with asyncio.timeout(limit):
                await asyncio.shield(task)
            run.duration = time.monotonic() - started
            async with asyncio.timeout(END_MARGIN):
                await client
        except TimeoutError:
            run.duration = time.monotonic() - started
            for t in (task, client):
                t.cancel()
            await asyncio.gather(task, client, return_exceptions=True)
        finally:
            ours.close()
        monitor = session.monitor
        run.reason, run.limit, run.detail = ended.reason, ended.limit, ended.detail
        run.calls = {name: n for name, n in monitor.calls.items() if name in wire.API_FUNCTIONS}
        run.log_lines, run.log_bytes = monitor.log_lines, monitor.log_bytes
        run.bytes_sent, run.bytes_received = monitor.bytes_out, monitor.bytes_in
        run.closed_by = str(monitor.final_closed_by())
        if monitor.usage is not None:
            run.memory, run.instructions, cpu_us = monitor.usage
            run.cpu = cpu_us / 1e6
        await asyncio.to_thread(self.log.flush)  # the session's last lines are written by the log's thread
        lines = self.stream.lines.pop(conn, [])
        if transcript is not None and not run.transcript_failure:
            run.transcript_failure = _missing_log(transcript, lines)
        del self.ended[conn]
        return run

    async def _client(self, sock: socket.socket, acts: tuple[Act, ...], run: Run, started: float) -> None:
        """Play `acts`, reading all the while; then leave (if the script has not closed already)."""
        loop = asyncio.get_running_loop()
        got = _Received()
        reader = loop.create_task(_read(sock, got))
        try:
            for act in acts:
                if got.eof.is_set() and act.kind != "close":
                    break  # the script closed: nothing left to play
                if act.kind == "send":
                    with contextlib.suppress(OSError, TimeoutError):
                        async with asyncio.timeout(SEND_TIMEOUT):
                            await loop.sock_sendall(sock, act.data)
                    await _wait(got.eof, act.seconds)
                elif act.kind == "trickle":
                    for i in range(len(act.data)):
                        with contextlib.suppress(OSError):
                            await loop.sock_sendall(sock, act.data[i : i + 1])
                        if await _wait(got.eof, act.seconds):
                            break
                elif act.kind == "read":
                    await _wait(got.eof, act.seconds)
                elif act.kind == "hold":
                    await got.eof.wait()
                elif act.kind == "shutdown":
                    run.left_at = time.monotonic() - started
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
                elif act.kind == "close":
                    if not got.eof.is_set():
                        run.left_at = time.monotonic() - started
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    break
                elif act.kind == "reset":
                    # An abort: a close would leave its FIN queued behind the bytes the script has not
                    # taken (a full window), and the script could never see it.
                    run.left_at = time.monotonic() - started
                    reader.cancel()
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
                    got.eof.set()
                    break
            await got.eof.wait()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            run.digest, run.got = got.digest.hexdigest(), got.head
            run.ttfb = None if got.first_at is None else got.first_at - started

    async def _transcript(
        self, sock: socket.socket, transcript: Transcript, run: Run, started: float
    ) -> None:
        played = await play(sock, transcript)
        run.transcript_failure = played.failure
        run.digest, run.got = played.digest, played.head
        run.ttfb = None if played.first_at is None else played.first_at - started
        if transcript.steps and transcript.steps[-1].kind in ("eof",):
            return  # the script closed: the client did not leave
        run.left_at = time.monotonic() - started
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


async def _read(sock: socket.socket, got: _Received) -> None:
    loop = asyncio.get_running_loop()
    try:
        while chunk := await loop.sock_recv(sock, 65536):
            if got.first_at is None:
                got.first_at = time.monotonic()
            got.digest.update(chunk)
            if len(got.head) < audit.KEPT_BYTES:
                got.head += chunk[: audit.KEPT_BYTES - len(got.head)]
    except OSError:
        pass
    finally:
        got.eof.set()


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Wait `seconds`, or until `event`; whether it happened."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


def _transcripts_of(path: Path, dirs: list[Path]) -> tuple[list[Transcript], list[str]]:
    """The script's transcripts: `<stem>-*.transcript` in a `transcripts` folder beside it and in `dirs`;
    and a problem for each one that cannot be read."""
    found, problems = [], []
    for folder in [path.parent / "transcripts", *dirs]:
        for candidate in sorted(folder.glob(f"{path.stem}-*.transcript")) if folder.is_dir() else []:
            try:
                found.append(load(candidate))
            except TranscriptError as e:
                problems.append(f"transcript {e}")
            except OSError as e:
                problems.append(sanitize(f"transcript {candidate}: cannot be read: {e.strerror or e}"))
    return found, problems


def _missing_log(transcript: Transcript, lines: list[str]) -> str:
    for expectation in transcript.logs:
        if not any(expectation.pattern.search(line) for line in lines):
            where = f"{sanitize(transcript.path)}:{expectation.line}: {expectation.source}"
            return f"{where}: no script log line matches"
    return ""
