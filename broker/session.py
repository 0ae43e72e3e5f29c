"""One connection: the thin I/O layer that carries out what the monitor decides.

The session owns the client connection and one sandbox lease. It sends the start message; then each
request the worker sends (within the CPU slice) goes to the monitor, which turns it into an action; the
session does the I/O and replies. Whatever happens, it ends with the socket closed, the lease released
(the worker killed and reaped, or its slot freed), and one session-end event.

Two paths, one order. Requests reach `_on_frame` from the pipe's reader callback; an action that needs
no waiting (a reply, a log line, a send the socket takes at once, a recv with bytes already read) is
carried out and answered right there: no task is woken and no future made, which was half the cost of a
round trip. A sleep is answered by a timer. Whatever else must wait (a recv with nothing to read, a
throttled call, a tarpit, a send the socket cannot take yet, a `deadend.starttls()`, the end) is handed
to the session's task (`_serve`), which carries it out and answers. Either way the worker has one
request in flight, and the next arrives only after its answer. The TLS handshake itself is the
connection's (broker/connection.py); the session logs and records how it went.
"""

from __future__ import annotations

import asyncio
import enum
import os
import random
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

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
class _SendRest:
    """A send the socket took only `done` bytes of at once: the rest is the session task's to write."""

    data: bytes
    done: int


Slow = m.Action | _SendRest  # what `_serve` carries out


class Later(enum.Enum):
    """Answered later by a callback (a sleep's timer), neither now nor by `_serve`."""

    LATER = "later"


LATER: Final = Later.LATER


@dataclass(frozen=True, slots=True)
class SessionSettings:
    ceilings: Ceilings
    allow_clock: bool
    shutdown_grace: float
    calls: TokenBucket | None = None  # the API calls of all sessions together (--call-rate-total)
    tls: TlsService | None = None  # the port's certificate; None: starttls fails (no TLS here)
    measure: bool = False  # `deadend audit`: the worker reports its usage at the end (wire "usage")


class Session:
    # Slots: a dense broker holds 10,000 of these (and of Monitor, ClientConnection, TokenBucket, Slot).
    __slots__ = (
        "_failure",
        "_handed",
        "_lease",
        "_mode",
        "_queued",
        "_sleeping",
        "_slept_from",
        "_timeout",
        "ceilings",
        "conn",
        "log",
        "loop",
        "lost",
        "monitor",
        "recording",
        "script",
        "seed",
        "settings",
        "shutting_down",
        "started",
        "where",
    )

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
            where.peer, self.ceilings, m.Jitter(self.seed[0] ^ self.seed[1]), self.started
        )
        # `pending`: client bytes read before the session began (after a PROXY header)
        self.conn = ClientConnection(sock, pending, self._peer_departed)
        self.shutting_down = False
        self.lost: tuple[Reason, bytes] | None = None  # how the sandbox was lost while nobody waited on it
        self._timeout: asyncio.Timeout | None = None
        self._sleeping: asyncio.TimerHandle | None = None  # answers the sleep in progress
        self._slept_from = 0.0
        self._lease: Lease | None = None
        self._mode = wire.Mode.RUN
        self._handed: asyncio.Future[tuple[Slow, float]] | None = None  # `_serve` waits on the worker
        self._queued: tuple[Slow, float] | None = None  # handed over while `_serve` was not waiting
        self._failure: BaseException | None = None  # the sandbox's failure, once it failed

    # --- lifecycle -------------------------------------------------------------------------------

    async def run(self, lease: Lease) -> None:
        reason, detail = Reason.CRASH, b""
        self._lease, self._mode = lease, lease.mode
        lease.channel.serve(self._on_frame, self._on_failure, self.ceilings.cpu_slice)
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
            self._lease = None  # a late frame, failure or timer finds nothing to act on
            if self._sleeping is not None:
                self._sleeping.cancel()
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

    def _on_failure(self, exc: BaseException) -> None:
        """The sandbox failed (the channel's callback; or a request broke the table). If the session's task
        waits on the worker it learns at once; if it is busy elsewhere (it sleeps, or waits on its socket)
        the session ends now instead of at its next request. `exc` says whose fault it was: WorkerLost
        (another session's), or this session's own."""
        if self._failure is not None or self._lease is None:
            return
        self._failure = exc
        if self._handed is not None and not self._handed.done():
            self._handed.set_exception(exc)
        else:
            self.lost = self._ending(exc)
            self._end_by(self.loop.time())

    def _peer_departed(self) -> None:
        """The client sent FIN or RST, whatever the script is doing: --linger from now, as after a close,
        and a sleep in progress ends at once, so that the script sees it (a tarpit's next send fails)."""
        self.monitor.peer_left(self.loop.time())
        self._follow_monitor()
        if self._sleeping is not None:
            self._sleeping.cancel()
            self._woke(cut=True)

    def _sleep(self, seconds: float) -> Later | m.Reply:
        """Answer the sleep in `seconds`, or when the peer leaves if sooner (`_woke`). A timer, not a task:
        a tarpit holding thousands of sessions costs one timer each between its lines. A peer gone already
        ends it at once, as it would have ended a sleep in progress: nobody is there to wait for."""
        if self.monitor.peer_gone:
            return self.monitor.slept(0, cut=True)
        self._slept_from = self.loop.time()
        self._sleeping = self.loop.call_later(seconds, self._woke)
        return LATER

    def _woke(self, cut: bool = False) -> None:
        self._sleeping = None
        self._answer(self.monitor.slept(round((self.loop.time() - self._slept_from) * 1000), cut))

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

    def _on_frame(self, frame: Any) -> None:
        """One request from the worker (the channel's reader callback): answered here if nothing need
        wait, else handed to `_serve` (the module docstring)."""
        if self._lease is None:
            return
        now = self.loop.time()
        try:
            action = self.monitor.handle(wire.parse_request(frame, self._mode), now)
        except wire.ProtocolViolation as e:
            self._on_failure(e)
            return
        delay = 0.0
        if not isinstance(action, m.End):
            delay = self.monitor.call_delay(now)
            calls = self.settings.calls
            if calls is not None:
                delay = max(delay, calls.delay(now))
        later = action if delay else self._at_once(action, now)  # a delayed reply waits in `_serve` too
        if later is LATER:
            return
        if isinstance(later, m.Reply) and not delay:
            self._answer(later)
        elif self._handed is not None and not self._handed.done():
            self._handed.set_result((later, delay))
        else:
            self._queued = (later, delay)

    def _at_once(self, action: m.Action, now: float) -> m.Reply | Slow | Later:
        """Carry out `action` if that needs no waiting: its reply; else what `_serve` must carry out."""
        monitor = self.monitor
        if isinstance(action, m.Reply):
            return action
        if isinstance(action, m.Log):
            self._script_log(action)
            return monitor.carried_out()
        if isinstance(action, m.Send):
            done = self.conn.send_now(action.data)
            if done is None:
                return monitor.sent(False, len(action.data), now)
            if done < len(action.data):
                return _SendRest(action.data, done)
            self._record("out", action.data)
            return monitor.sent(True, len(action.data), now)
        if isinstance(action, m.Recv) and self.conn.readable() and not monitor.tarpit_on():
            reply, _no_delay = self._received(self.conn.take(action.n))
            return reply
        if isinstance(action, m.Sleep):
            return self._sleep(action.seconds)
        return action

    async def _serve(self, lease: Lease) -> tuple[Reason, bytes]:
        """Carry out, in order, what `_on_frame` could not; until the script ends or the sandbox fails."""
        while True:
            if self._failure is not None:
                return self._failed(self._failure, lease)
            if self._queued is not None:
                (action, delay), self._queued = self._queued, None
            else:
                self._handed = self.loop.create_future()
                try:
                    action, delay = await self._handed
                except (Deadline, WorkerGone, wire.ProtocolViolation) as e:
                    return self._failed(e, lease)
                finally:
                    self._handed = None
            if isinstance(action, m.End):
                return action.reason, action.detail
            if delay:
                await asyncio.sleep(delay)
            reply = await self._carry_out(action)
            if reply is not LATER:
                self._answer(reply)

    def _failed(self, exc: BaseException, lease: Lease) -> tuple[Reason, bytes]:
        if isinstance(exc, Deadline):
            lease.worker.kill()
        return self._ending(exc)

    async def _carry_out(self, action: Slow) -> m.Reply | Later:
        monitor = self.monitor
        if isinstance(action, m.Reply):
            return action
        if isinstance(action, _SendRest):
            return await self._send(action.data, action.done)
        if isinstance(action, m.Send):
            return await self._send(action.data)
        if isinstance(action, m.Recv):
            return await self._recv(action.n)
        if isinstance(action, m.Sleep):
            return self._sleep(action.seconds)
        if isinstance(action, m.StartTls):
            return await self._starttls(action.alpn)
        assert isinstance(action, m.Log)
        self._script_log(action)
        return monitor.carried_out()

    def _answer(self, reply: m.Reply) -> None:
        self._follow_monitor()
        if self._lease is not None:
            self._lease.channel.send(reply.value)

    def _follow_monitor(self) -> None:
        """Bring the socket and the session deadline in line with the monitor's state."""
        monitor = self.monitor
        if not monitor.open:
            self.conn.close()
        if monitor.gone_at is not None and not self.shutting_down:
            self._end_by(monitor.gone_at + self.ceilings.linger)

    # --- socket I/O ------------------------------------------------------------------------------

    async def _send(self, data: bytes, done: int = 0) -> m.Reply:
        """Send `data` (its first `done` bytes were written already): the reply to the script's send."""
        try:
            ok = await self.conn.send(data[done:] if done else data, self.ceilings.idle_timeout or None)
        except TimeoutError:  # the client stopped reading: as silent as one that stops sending
            return self.monitor.idle(self.loop.time())
        if not ok:
            return self.monitor.sent(False, len(data), self.loop.time())
        self._record("out", data)
        return self.monitor.sent(True, len(data), self.loop.time())

    def _record(self, direction: str, data: bytes) -> None:
        if self.recording is not None:
            self.recording.data(direction, data, self.loop.time() - self.started)

    def _received(self, data: bytes | None) -> tuple[m.Reply, float]:
        if data:
            self._record("in", data)
        return self.monitor.received(data, self.loop.time())

    async def _recv(self, n: int) -> m.Reply:
        idle = self.ceilings.idle_timeout or None
        try:
            data = await self.conn.recv(n, idle)
        except TimeoutError:
            return self.monitor.idle(self.loop.time())
        reply, delay = self._received(data)
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
