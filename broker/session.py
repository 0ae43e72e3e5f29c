"""One connection: the thin I/O layer that carries out what the monitor decides.

The session owns the client connection and one sandbox lease. It sends the start message, then loops:
read the worker's next request (within the CPU slice), let the monitor turn it into an action, do the
I/O, reply. Whatever happens, it ends with the socket closed, the lease released (the worker killed and
reaped, or its slot freed), and one session-end event. A `deadend.starttls()` is carried out here too:
the connection does the handshake (broker/connection.py), the session logs and records how it went.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from broker import monitor as m
from broker.channel import Deadline, WorkerGone, WorkerLost
from broker.connection import ClientConnection, Handshake
from broker.pool import Lease, key_of
from broker.ratelimit import TokenBucket
from broker.tls import TlsService
from deadend import wire
from deadend.config import Ceilings
from deadend.logs import EventLog, Where, sanitize
from deadend.reasons import LIMIT_OF, ClosedBy, Reason
from deadend.recording import SessionRecording
from deadend.scripts import Script
from deadend.tlscert import TlsCertError
from deadend.tlsinfo import NO_TLS, TlsInfo

EXIT_REPORT_TIMEOUT = 2.0  # how long to wait for the zygote to report a killed worker

_system_random = random.SystemRandom()


@dataclass(frozen=True, slots=True)
class SessionSettings:
    ceilings: Ceilings
    allow_clock: bool
    shutdown_grace: float
    calls: TokenBucket | None = None  # the API calls of all sessions together (--call-rate-total)
    tls: TlsService | None = None  # the port's certificate; None: starttls fails (no TLS here)
    measure: bool = False  # `deadend audit`: the worker reports its usage at the end (wire "usage")


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
        seed: tuple[int, int] | None = None,
    ) -> None:
        self.recording = recording
        # The script's PRNG seed: fresh per session, or given (a recording's, replayed; an audit's, fixed).
        self.seed = session_seed() if seed is None else seed
        self.where = where
        self.script = script
        self.settings = settings
        self.ceilings = settings.ceilings
        self.log = log
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        # the tarpit's jitter: from the seed too, so that a replayed session is paced as it was
        self.monitor = m.Monitor(
            where.peer, self.ceilings, random.Random(self.seed[0] ^ self.seed[1]), self.started
        )
        # `pending`: client bytes read before the session began (after a PROXY header)
        self.conn = ClientConnection(sock, pending, self._peer_departed)
        self.shutting_down = False
        self.lost: tuple[Reason, bytes] | None = None  # how the sandbox was lost while nobody waited on it
        self._timeout: asyncio.Timeout | None = None
        self._wake: asyncio.Future[None] | None = None  # ends the sleep in progress

    # --- lifecycle -------------------------------------------------------------------------------

    async def run(self, lease: Lease) -> None:
        reason, detail = Reason.CRASH, b""
        lease.channel.on_lost = self._lost_sandbox
        try:
            if lease.prepared_for == key_of(self.script):  # compiled already: only the seed is missing
                lease.channel.send(wire.go_frame(self.seed))
            else:
                start = start_message(self.script, self.settings, wire.Mode.RUN, self.seed)
                lease.channel.send(start.to_frame())
            try:
                try:
                    async with asyncio.timeout(self.ceilings.session_time) as self._timeout:
                        reason, detail = await self._serve(lease)
                finally:
                    self._timeout = None  # finished: begin_shutdown must not reschedule it any more
            except TimeoutError:
                reason = self._timeout_reason()
                if self.lost is not None:
                    reason, detail = self.lost
            except asyncio.CancelledError:
                reason = Reason.SHUTDOWN
                raise
        finally:
            lease.channel.on_lost = None
            self.conn.close()
            lease.release(reason)
            if reason == Reason.CRASH and not detail:
                reason, detail = await self._classify_exit(lease)
            if reason == Reason.DONE and self.shutting_down:
                reason = Reason.SHUTDOWN  # it returned because recv/send failed for the shutdown
            self._finish(self.monitor.final_reason(reason), detail)

    def begin_shutdown(self) -> None:
        """Shutdown: recv/send start failing now; the script gets a short grace, then is ended."""
        self.shutting_down = True
        self.monitor.close(ClosedBy.SHUTDOWN, self.loop.time())
        self.conn.shutdown()  # wakes a pending recv (end of input) or send (EPIPE)
        self._end_by(self.loop.time() + self.settings.shutdown_grace)

    def _end_by(self, when: float) -> None:
        """Bring the session's deadline forward to `when` (never back)."""
        timeout = self._timeout
        if timeout is None or timeout.expired():
            return
        current = timeout.when()
        if current is None or when < current:
            timeout.reschedule(when)

    def _lost_sandbox(self, exc: BaseException) -> None:
        """The sandbox failed while this session was not waiting on it (it slept, or waited on its
        socket). `exc` says whose fault it was: WorkerLost (another session's), or this session's own."""
        self.lost = self._ending(exc)
        self._end_by(self.loop.time())

    def _peer_departed(self) -> None:
        """The client sent FIN or RST, whatever the script is doing: --linger from now, as after a close,
        and a sleep in progress ends at once, so that the script sees it (a tarpit's next send fails)."""
        self.monitor.peer_left(self.loop.time())
        self._follow_monitor()
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _sleep(self, seconds: float) -> m.Reply:
        """Sleep, until the peer leaves at the latest; the reply is the milliseconds slept. A peer gone
        already ends it at once, as it would have ended a sleep in progress: nobody is there to wait for."""
        if self.monitor.peer_gone:
            return self.monitor.slept(0, cut=True)
        started = self.loop.time()
        self._wake = self.loop.create_future()
        cut = False
        try:
            async with asyncio.timeout(seconds):
                await self._wake
                cut = True
        except TimeoutError:
            pass
        finally:
            self._wake = None
        return self.monitor.slept(round((self.loop.time() - started) * 1000), cut)

    def _ending(self, exc: BaseException) -> tuple[Reason, bytes]:
        """The reason and detail a session ends with when its sandbox fails it."""
        if isinstance(exc, Deadline):
            return Reason.CPU_DEADLINE, b"no API call within %.1fs" % self.ceilings.cpu_slice
        if isinstance(exc, WorkerLost):
            return Reason.WORKER_LOST, exc.detail.encode()
        if isinstance(exc, wire.ProtocolViolation):
            return Reason.PROTOCOL, str(exc).encode()
        return Reason.CRASH, b""  # the worker is gone: classified later from its exit status

    def _timeout_reason(self) -> Reason:
        if self.shutting_down:
            return Reason.SHUTDOWN
        if self.monitor.gone_at is not None:
            return Reason.LINGER
        return Reason.SESSION_TIME

    # --- the request loop ------------------------------------------------------------------------

    async def _serve(self, lease: Lease) -> tuple[Reason, bytes]:
        channel, monitor, loop, mode = lease.channel, self.monitor, self.loop, lease.mode
        calls = self.settings.calls
        while True:
            try:
                frame = await channel.frame(self.ceilings.cpu_slice)
                action = monitor.handle(wire.parse_request(frame, mode), loop.time())
            except (Deadline, WorkerGone, wire.ProtocolViolation) as e:
                if isinstance(e, Deadline):
                    lease.worker.kill()
                return self._ending(e)

            if isinstance(action, m.End):
                return action.reason, action.detail
            now = loop.time()
            delay = monitor.call_delay(now)
            if calls is not None:
                delay = max(delay, calls.delay(now))
            if delay:
                await asyncio.sleep(delay)
            if isinstance(action, m.Reply):
                reply = action
            elif isinstance(action, m.Send):
                reply = await self._send(action.data)
            elif isinstance(action, m.Recv):
                reply = await self._recv(action.n)
            elif isinstance(action, m.Sleep):
                reply = await self._sleep(action.seconds)
            elif isinstance(action, m.StartTls):
                reply = await self._starttls(action.alpn)
            else:
                self._script_log(action)
                reply = monitor.carried_out()
            self._follow_monitor()
            channel.send(reply.value)

    def _follow_monitor(self) -> None:
        """Bring the socket and the session deadline in line with the monitor's state."""
        monitor = self.monitor
        if not monitor.open:
            self.conn.close()
        if monitor.gone_at is not None and not self.shutting_down:
            self._end_by(monitor.gone_at + self.ceilings.linger)

    # --- socket I/O ------------------------------------------------------------------------------

    async def _send(self, data: bytes) -> m.Reply:
        try:
            ok = await self.conn.send(data, self.ceilings.idle_timeout or None)
        except TimeoutError:  # the client stopped reading: as silent as one that stops sending
            return self.monitor.idle(self.loop.time())
        if not ok:
            return self.monitor.sent(False, len(data), self.loop.time())
        if self.recording is not None:
            self.recording.data("out", data, self.loop.time() - self.started)
        return self.monitor.sent(True, len(data), self.loop.time())

    async def _recv(self, n: int) -> m.Reply:
        idle = self.ceilings.idle_timeout or None
        try:
            data = await self.conn.recv(n, idle)
        except TimeoutError:
            return self.monitor.idle(self.loop.time())
        if data and self.recording is not None:
            self.recording.data("in", data, self.loop.time() - self.started)
        reply, delay = self.monitor.received(data, self.loop.time())
        if delay:
            await asyncio.sleep(delay)
        return reply

    async def _starttls(self, alpn: bytes) -> m.Reply:
        service, started = self.settings.tls, self.loop.time()
        try:
            if service is None:
                handshake = Handshake(error="TLS is not available here")
            else:
                if service.on_starttls is not None:
                    service.on_starttls()
                context = service.context(alpn)
                handshake = await self.conn.start_tls(context, self.ceilings.tls_handshake_timeout)
        except TlsCertError as e:  # a context for a new ALPN choice: the chain loaded at start-up, again
            handshake = Handshake(error=str(e))
        if handshake.error and self.shutting_down:  # it ended the connection, not the client
            handshake.error = "the broker shut down during the TLS handshake"
        now = self.loop.time()
        self._log_tls(handshake, now - started)
        if self.recording is not None and handshake.info is not None:
            self.recording.tls(handshake.info.recording_fields(), now - self.started, handshake.error)
        return self.monitor.tls_started(handshake.info, handshake.error, handshake.timed_out, now)

    def _log_tls(self, handshake: Handshake, seconds: float) -> None:
        info, cpu_ms = handshake.info, round(handshake.cpu * 1000, 3)
        fields = NO_TLS if info is None else info.event_fields()
        shown = "" if info is None else f" {info.summary()}"
        if handshake.error:
            error = sanitize(handshake.error)
            self.log.warn(
                self.where, "tls.failed", f"TLS failed: {error}{shown}", error=error, cpu_ms=cpu_ms, **fields
            )
            return
        assert info is not None
        self.log.info(
            self.where,
            "tls.handshake",
            f"TLS {info.version} {info.cipher} alpn_selected={info.alpn_selected or '-'}{shown} "
            f"in {seconds * 1000:.1f}ms (cpu {cpu_ms:.1f}ms)",
            version=info.version,
            cipher=info.cipher,
            alpn_selected=info.alpn_selected or None,
            handshake_ms=round(seconds * 1000, 3),
            cpu_ms=cpu_ms,
            **fields,
        )

    # --- logging ---------------------------------------------------------------------------------

    def _script_log(self, action: m.Log) -> None:
        self._report_dropped_logs()
        if not self.log.script_line(action.level, self.where, action.message, action.cut, action.fields):
            self.monitor.logs_dropped += 1  # the log queue holds too much of this session already

    def _report_dropped_logs(self) -> None:
        dropped = self.monitor.take_dropped_logs()
        if dropped:
            self.log.warn(
                self.where,
                "script.log_dropped",
                f"script log lines dropped: {dropped} (rate or volume)",
                dropped=dropped,
            )

    async def _classify_exit(self, lease: Lease) -> tuple[Reason, bytes]:
        """The worker ended without saying why: ask the zygote's report how it died."""
        try:
            status = await asyncio.wait_for(asyncio.shield(lease.worker.exited), EXIT_REPORT_TIMEOUT)
        except (TimeoutError, asyncio.CancelledError):
            return Reason.CRASH, b"exit status unknown"
        if status is None:
            return Reason.CRASH, b"sandbox zygote lost"
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGSYS:
                return Reason.SECCOMP, b"killed by SIGSYS: a forbidden system call"
            if sig == signal.SIGXCPU:
                return Reason.CPU_LIMIT, b"killed by SIGXCPU: session CPU time exhausted"
            return Reason.CRASH, signal.Signals(sig).name.encode()
        return Reason.CRASH, b"exit status %d" % os.WEXITSTATUS(status)

    def _finish(self, reason: Reason, detail: bytes) -> None:
        self._report_dropped_logs()
        if detail and reason != Reason.DONE:
            level = "error" if reason in (Reason.SCRIPT_ERROR, Reason.COMPILE_ERROR) else "warn"
            text = sanitize(detail)
            self.log.emit(
                level, self.where, "session.problem", f"{reason}: {text}", reason=reason, detail=text
            )
        mon = self.monitor
        duration = self.loop.time() - self.started
        closed_by = mon.final_closed_by()
        if self.recording is not None:
            self.recording.end(
                reason,
                duration,
                mon.bytes_in,
                mon.bytes_out,
                None if closed_by == ClosedBy.NONE else closed_by,
            )
        log_session_end(
            self.log, self.where, reason, duration, mon.bytes_in, mon.bytes_out, closed_by, mon.tls
        )


def session_seed() -> tuple[int, int]:
    """The seed of a session's Lua PRNG: from the system's generator, never shared between workers."""
    return _system_random.getrandbits(63), _system_random.getrandbits(63)


def start_message(
    script: Script, settings: SessionSettings, mode: wire.Mode, seed: tuple[int, int] = (0, 0)
) -> wire.Start:
    """What a worker needs to run `script` (RUN, with the session's seed), or to compile it and wait for
    GO (PREPARE: the seed comes with GO)."""
    return wire.Start(
        mode=mode.value,
        source=script.source,
        chunkname=script.name,
        seed=seed,
        memory=settings.ceilings.memory_bytes,
        instructions=settings.ceilings.instructions,
        clock=settings.allow_clock,
        measure=settings.measure,
    )


def log_session_end(
    log: EventLog,
    where: Where,
    reason: Reason,
    duration: float,
    bytes_in: int,
    bytes_out: int,
    closed_by: ClosedBy,
    tls: TlsInfo | None = None,
) -> None:
    """The one session-end event every accepted connection gets, whatever happened to it. `tls`: the
    client's ClientHello, if it sent one (to a `deadend.starttls()`)."""
    fields: Mapping[str, object] = NO_TLS if tls is None else tls.event_fields()
    log.info(
        where,
        "session.end",
        f"session end reason={reason} duration={duration:.3f}s bytes_in={bytes_in} bytes_out={bytes_out} "
        f"closed_by={closed_by}{'' if tls is None else ' ' + tls.summary()}",
        reason=reason,
        duration=round(duration, 6),
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        closed_by=closed_by,
        limit=LIMIT_OF.get(reason),
        **fields,
    )
