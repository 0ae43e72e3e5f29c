"""One connection: the thin I/O layer that carries out what the monitor decides.

The session owns the client socket and one sandbox. It sends the start message, then loops: read the
child's next request (within the CPU slice), let the monitor turn it into an action, do the I/O, reply.
Whatever happens, it ends with the socket closed, the child killed and reaped, and one session-end line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
from dataclasses import dataclass

from broker import monitor as m
from broker.channel import ChildGone, Deadline, WorkerLost
from broker.dense import Slot
from broker.pool import Sandbox, SandboxPool, key_of
from deadend import wire
from deadend.config import Ceilings
from deadend.logs import EventLog, Where, sanitize
from deadend.recording import SessionRecording
from deadend.scripts import Script

EXIT_REPORT_TIMEOUT = 2.0  # how long to wait for the zygote to report a killed child
DRAIN_LIMIT = 1 << 16  # unread bytes discarded at close, so the kernel sends FIN rather than RST

_system_random = random.SystemRandom()


@dataclass(frozen=True, slots=True)
class SessionSettings:
    ceilings: Ceilings
    allow_clock: bool
    shutdown_grace: float


class Session:
    def __init__(
        self,
        sock: socket.socket,
        where: Where,
        script: Script,
        settings: SessionSettings,
        log: EventLog,
        recording: SessionRecording | None = None,
        pending: bytes = b"",
    ) -> None:
        self.sock: socket.socket | None = sock
        self.recording = recording
        self.pending = pending  # client bytes read before the session began (after a PROXY header)
        self.where = where
        self.script = script
        self.settings = settings
        self.ceilings = settings.ceilings
        self.log = log
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.monitor = m.Monitor(
            where.peer, self.ceilings, random.Random(_system_random.random()), self.started
        )
        self.shutting_down = False
        self.lost: tuple[str, bytes] | None = None  # dense mode: how the shared child was lost to us
        self._timeout: asyncio.Timeout | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    async def run(self, pool: SandboxPool, sandbox: Sandbox) -> None:
        reason, detail = m.END_CRASH, b""
        if isinstance(sandbox.channel, Slot):  # dense mode: wake us if the shared child dies
            sandbox.channel.on_lost = self._lost_worker
        try:
            if sandbox.prepared_for == key_of(self.script):  # compiled already: only the seed is missing
                sandbox.channel.send([wire.GO, *session_seed()])
            else:
                sandbox.channel.send(start_message(self.script, self.settings, "run").to_frame())
            try:
                try:
                    async with asyncio.timeout(self.ceilings.session_time) as self._timeout:
                        reason, detail = await self._serve(sandbox)
                finally:
                    self._timeout = None  # finished: begin_shutdown must not reschedule it any more
            except TimeoutError:
                reason = self._timeout_reason()
                if self.lost is not None:
                    reason, detail = self.lost
            except asyncio.CancelledError:
                reason = m.END_SHUTDOWN
                raise
        finally:
            self._close_socket()
            pool.release(sandbox, reason)
            if reason == m.END_CRASH and not detail:
                reason, detail = await self._classify_exit(sandbox)
            if reason == m.END_RETURNED and self.shutting_down:
                reason = m.END_SHUTDOWN  # it returned because recv/send failed for the shutdown
            self._finish(reason, detail)

    def begin_shutdown(self) -> None:
        """Shutdown: recv/send start failing now; the script gets a short grace, then is ended."""
        self.shutting_down = True
        self.monitor.close(m.CLOSED_BY_SHUTDOWN, self.loop.time())
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes a pending recv (EOF) or send (EPIPE)
        if self._timeout is not None and not self._timeout.expired():
            self._timeout.reschedule(self.loop.time() + self.settings.shutdown_grace)

    def _lost_worker(self, exc: BaseException) -> None:
        """Dense mode: the shared child went away while this session was not waiting on it (sleep, socket).

        `exc` says whose fault it was: WorkerLost (another session's), or this session's own.
        """
        self.lost = self._ending(exc)
        if self._timeout is not None and not self._timeout.expired():
            self._timeout.reschedule(self.loop.time())

    def _ending(self, exc: BaseException) -> tuple[str, bytes]:
        """The reason and detail a session ends with when its sandbox fails it."""
        if isinstance(exc, Deadline):
            return m.END_CPU_DEADLINE, b"no API call within %.1fs" % self.ceilings.cpu_slice
        if isinstance(exc, WorkerLost):
            return m.END_WORKER_LOST, exc.detail.encode()
        if isinstance(exc, wire.ProtocolViolation):
            return m.END_PROTOCOL, str(exc).encode()
        return m.END_CRASH, b""  # the child is gone: classified later from its exit status

    def _timeout_reason(self) -> str:
        if self.shutting_down:
            return m.END_SHUTDOWN
        if not self.monitor.open:
            return m.END_LINGER
        return m.END_SESSION_TIME

    # --- the request loop ------------------------------------------------------------------------

    async def _serve(self, sandbox: Sandbox) -> tuple[str, bytes]:
        channel, monitor, loop = sandbox.channel, self.monitor, self.loop
        while True:
            try:
                frame = await channel.frame(self.ceilings.cpu_slice)
                action = monitor.handle(wire.parse_request(frame), loop.time())
            except (Deadline, ChildGone, wire.ProtocolViolation) as e:
                if isinstance(e, Deadline):
                    sandbox.child.kill()
                return self._ending(e)

            if isinstance(action, m.End):
                return action.reason, action.detail
            delay = monitor.call_delay(loop.time())
            if delay:
                await asyncio.sleep(delay)
            if isinstance(action, m.Reply):
                reply = action
            elif isinstance(action, m.Send):
                ok = await self._send(action.data)
                reply = monitor.sent(ok, len(action.data), loop.time())
            elif isinstance(action, m.Recv):
                data = await self._recv(action.n)
                reply, delay = monitor.received(data, loop.time())
                if delay:
                    await asyncio.sleep(delay)
            elif isinstance(action, m.Sleep):
                await asyncio.sleep(action.seconds)
                reply = monitor.carried_out()
            else:
                self._script_log(action)
                reply = monitor.carried_out()
            self._follow_monitor()
            channel.send(reply.value)

    def _follow_monitor(self) -> None:
        """Bring the socket and the session deadline in line with the monitor's state."""
        if self.monitor.open or self.sock is None:
            return
        self._close_socket()
        if self._timeout is not None and not self._timeout.expired() and not self.shutting_down:
            when = self._timeout.when()
            linger_end = self.loop.time() + self.ceilings.linger
            if when is None or linger_end < when:
                self._timeout.reschedule(linger_end)

    # --- socket I/O ------------------------------------------------------------------------------

    async def _send(self, data: bytes) -> bool:
        if self.sock is None:
            return False
        try:
            await self.loop.sock_sendall(self.sock, data)
        except OSError:
            return False
        if self.recording is not None:
            self.recording.data("out", data, self.loop.time() - self.started)
        return True

    async def _recv(self, n: int) -> bytes | None:
        if self.sock is None:
            return None
        if self.pending:
            data, self.pending = self.pending[:n], self.pending[n:]
        else:
            try:
                data = await self.loop.sock_recv(self.sock, n)
            except OSError:
                return None
        if data and self.recording is not None:
            self.recording.data("in", data, self.loop.time() - self.started)
        return data

    def _close_socket(self) -> None:
        """Close after flushing what was sent: FIN after the queued data, unread input discarded."""
        sock, self.sock = self.sock, None
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

    # --- logging ---------------------------------------------------------------------------------

    def _script_log(self, action: m.Log) -> None:
        self._report_dropped_logs()
        text = sanitize(action.message)
        if action.cut:
            text += "…[cut]"
        self.log.emit(action.level, self.where, "script.log", f"script: {text}", message=text)

    def _report_dropped_logs(self) -> None:
        dropped = self.monitor.take_dropped_logs()
        if dropped:
            self.log.warn(
                self.where,
                "script.log_dropped",
                f"script log rate exceeded: {dropped} lines dropped",
                dropped=dropped,
            )

    async def _classify_exit(self, sandbox: Sandbox) -> tuple[str, bytes]:
        """The child ended without saying why: ask the zygote's report how it died."""
        try:
            status = await asyncio.wait_for(asyncio.shield(sandbox.child.exited), EXIT_REPORT_TIMEOUT)
        except (TimeoutError, asyncio.CancelledError):
            return m.END_CRASH, b"exit status unknown"
        if status is None:
            return m.END_CRASH, b"sandbox zygote lost"
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGSYS:
                return m.END_SECCOMP, b"killed by SIGSYS: a forbidden system call"
            if sig == signal.SIGXCPU:
                return m.END_CPU_LIMIT, b"killed by SIGXCPU: session CPU time exhausted"
            return m.END_CRASH, signal.Signals(sig).name.encode()
        return m.END_CRASH, b"exit status %d" % os.WEXITSTATUS(status)

    def _finish(self, reason: str, detail: bytes) -> None:
        self._report_dropped_logs()
        if detail and reason != m.END_RETURNED:
            level = "error" if reason in (m.END_SCRIPT_ERROR, m.END_COMPILE_ERROR) else "warn"
            text = sanitize(detail)
            self.log.emit(
                level, self.where, "session.problem", f"{reason}: {text}", reason=reason, detail=text
            )
        mon = self.monitor
        duration = self.loop.time() - self.started
        if self.recording is not None:
            self.recording.end(reason, duration, mon.bytes_in, mon.bytes_out, mon.closed_by)
        log_session_end(
            self.log, self.where, reason, duration, mon.bytes_in, mon.bytes_out, mon.closed_by or "-"
        )


def session_seed() -> tuple[int, int]:
    """The seed of a session's Lua PRNG: from the system's generator, never shared between children."""
    return _system_random.getrandbits(63), _system_random.getrandbits(63)


def start_message(script: Script, settings: SessionSettings, mode: str) -> wire.Start:
    """What a child needs to run `script` ("run"), or to compile it and wait for GO ("prepare")."""
    seed = session_seed() if mode == "run" else (0, 0)  # a prepared child gets its seed with GO
    return wire.Start(
        mode=mode,
        source=script.source,
        chunkname=script.name,
        seed=seed,
        memory=settings.ceilings.memory_bytes,
        instructions=settings.ceilings.instructions,
        clock=settings.allow_clock,
    )


def log_session_end(
    log: EventLog, where: Where, reason: str, duration: float, bytes_in: int, bytes_out: int, closed_by: str
) -> None:
    """The one session-end line every accepted connection gets, whatever happened to it."""
    log.info(
        where,
        "session.end",
        f"session end reason={reason} duration={duration:.3f}s bytes_in={bytes_in} bytes_out={bytes_out} "
        f"closed_by={closed_by}",
        reason=reason,
        duration=round(duration, 6),
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        closed_by=closed_by,
        limit=m.LIMIT_OF_REASON.get(reason),
    )
