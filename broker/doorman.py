"""The Doorman: from an accepted socket to a running session, or to one clear refusal.

In order: the connection caps (gate), the PROXY header (--proxy-protocol: the real peer), the ignore
list (--ignore), a sandbox from the pool (maybe after a queue), a recording (--record), the session.
Every accepted connection ends with exactly one session-end event, whichever step it stopped at.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import ipaddress
import secrets
import socket
import time

from broker.gate import Counted, Gate
from broker.memory import return_free_memory
from broker.net import peer_ip, read_proxy_header
from broker.pool import Lease, Pool
from broker.ratelimit import TokenBucket
from broker.sandboxes import SandboxSet
from broker.session import Session, SessionSettings, log_session_end, session_seed
from broker.tls import TlsCertificates
from broker.workers import PoolClosed, QueueFull
from deadend.config import Config
from deadend.logs import EventLog, Where, sanitize
from deadend.proxy import ProxyError
from deadend.reasons import ClosedBy, Reason
from deadend.recording import Recorder, SessionMeta, SessionRecording
from deadend.scripts import Script

PROXY_HEADER_TIMEOUT = 5.0  # seconds a proxy has to send its header (it sends it at once)
TRIM_INTERVAL = 5.0  # at most this often, give freed heap back to the system when the broker goes idle


@dataclasses.dataclass(slots=True)
class Arrival:
    """One accepted connection on its way in."""

    conn: socket.socket
    where: Where
    script: Script
    started: float  # loop time of the accept
    wall_started: float  # time.time() of the accept, for recordings
    counted: Counted | None  # what the gate counted against the per-IP cap
    proxy: str | None = None  # the proxy's address when the peer came in a PROXY header
    pending: bytes = b""  # client bytes that arrived with the PROXY header
    # Its one session-end line is written (a refusal), or owed by its Session: whatever happens from
    # here (shutdown at any moment, a task cancelled before it ran), the doorman writes it otherwise.
    ended: bool = False
    released: bool = False  # its place at the gate given back


class Doorman:
    def __init__(
        self,
        config: Config,
        log: EventLog,
        sandboxes: SandboxSet,
        gate: Gate,
        recorder: Recorder | None,
        tls: TlsCertificates | None = None,
    ) -> None:
        self.config = config
        self.tls = tls
        self.log = log
        self.sandboxes = sandboxes
        self.gate = gate
        self.recorder = recorder
        loop = asyncio.get_running_loop()
        # The API calls of every session together: the broker's own CPU stays bounded however many spin.
        self.calls = TokenBucket(config.call_rate_total, config.call_rate_total / 10, loop.time())
        self.sessions: set[Session] = set()
        self.handlers: dict[asyncio.Task[None], Arrival] = {}
        self.active_by_port: collections.Counter[int] = collections.Counter()
        self.released = asyncio.Event()  # set whenever a connection ends (descriptors came free)
        self._last_trim = float("-inf")

    def settings(self, script: Script) -> SessionSettings:
        """What a session of `script` runs with (its port's own ceilings, from the config file)."""
        c = self.config
        tls = None if self.tls is None else self.tls.service(script.port)
        return SessionSettings(c.ceilings_for(script.port), c.allow_clock, c.shutdown_grace, self.calls, tls)

    def per_ip_cap(self, pool: Pool) -> tuple[str, int]:
        """The scope and the cap of the per-IP limit for a connection to `pool`."""
        if self.config.max_per_ip is not None:
            return "", self.config.max_per_ip
        return pool.name, max(1, pool.capacity // 4)

    def admit(self, conn: socket.socket, addr: tuple[str, int], port: int, script: Script) -> None:
        """Called for each accepted socket: refuse it at once, or start handling it."""
        loop = asyncio.get_running_loop()
        local = conn.getsockname()  # the address the client reached (a wildcard listener has many)
        where = Where(port, secrets.token_hex(6), peer_ip(addr[0]), addr[1], peer_ip(local[0]), local[1])
        scope, cap = self.per_ip_cap(self.sandboxes.pool_for(script))
        if self.config.proxy_protocol:
            ip = None  # the real peer, the one to count and to classify, comes in the header
        else:
            where = self._classify(where)
            ip = where.peer
        refused, counted = self.gate.admit(ip, scope, cap)
        if refused is not None:
            # Cheap: no sandbox, no connect line; the one session-end line says why.
            conn.close()
            log_session_end(self.log, where, refused, 0.0, 0, 0, ClosedBy.NONE)
            return
        conn.setblocking(False)
        arrival = Arrival(conn, where, script, loop.time(), time.time(), counted)
        task = loop.create_task(self._handle(arrival))
        self.handlers[task] = arrival
        task.add_done_callback(lambda t: self._handled(arrival, t))

    def _handled(self, a: Arrival, task: asyncio.Task[None]) -> None:
        """Every accepted connection ends with exactly one session-end line: a handler cancelled at
        shutdown before it wrote one (while reading a PROXY header, or before it even ran) writes it here."""
        self.handlers.pop(task, None)
        failure = None if task.cancelled() else task.exception()
        if failure is not None:  # a broker bug: this connection ends, the broker goes on
            self.log.error(a.where, "broker.error", f"connection handler failed: {type(failure).__name__}")
        if not a.ended:
            self._refuse(a, Reason.CRASH if failure is not None else Reason.SHUTDOWN)
        if not a.released:  # cancelled before it ran
            a.released = True
            self.gate.release(a.counted)

    def _classify(self, where: Where) -> Where:
        """Mark a peer in an --ignore network: its events are neither logged nor recorded."""
        if self.config.ignore and where.peer != "-":
            address = ipaddress.ip_address(where.peer)
            if any(address in network for network in self.config.ignore):
                return dataclasses.replace(where, quiet=True)
        return where

    async def _handle(self, a: Arrival) -> None:
        self.active_by_port[a.where.port or 0] += 1
        try:
            if self.config.proxy_protocol and not await self._read_proxy_header(a):
                return
            if a.where.quiet and self.config.ignore_action == "refuse":
                self._refuse(a, Reason.IGNORED)
                return
            await self._serve(a)
        finally:
            a.released = True
            self.gate.release(a.counted)
            port = a.where.port or 0
            self.active_by_port[port] -= 1
            if not self.active_by_port[port]:
                del self.active_by_port[port]
            self.released.set()
            self._trim_when_idle()

    def _refuse(self, a: Arrival, reason: Reason) -> None:
        a.ended = True
        a.conn.close()
        duration = asyncio.get_running_loop().time() - a.started
        log_session_end(self.log, a.where, reason, duration, 0, 0, ClosedBy.NONE)

    async def _read_proxy_header(self, a: Arrival) -> bool:
        try:
            header, a.pending = await read_proxy_header(a.conn, PROXY_HEADER_TIMEOUT)
        except (ProxyError, TimeoutError, OSError) as e:
            if isinstance(e, TimeoutError):
                error = f"no PROXY header within {PROXY_HEADER_TIMEOUT:g}s"
            elif isinstance(e, OSError):
                error = f"connection failed before the PROXY header: {e.strerror}"
            else:
                error = sanitize(str(e), 256)
            self.log.warn(a.where, "proxy.error", f"refused: {error}", error=error)
            self._refuse(a, Reason.PROXY_HEADER)
            return False
        if header.source is not None:  # else a LOCAL header (the proxy's health check): the proxy is the peer
            a.proxy = a.where.peer
            ip, port = header.source  # already in the form scripts see (deadend.proxy.peer_text)
            a.where = dataclasses.replace(a.where, peer=ip, peer_port=port)
            if header.destination is not None:  # the address the client reached, behind the proxy
                a.where = dataclasses.replace(
                    a.where, dst_ip=header.destination[0], dst_port=header.destination[1]
                )
        a.where = self._classify(a.where)
        scope, cap = self.per_ip_cap(self.sandboxes.pool_for(a.script))
        refused, a.counted = self.gate.admit_source(a.where.peer, scope, cap)
        if refused is not None:
            self._refuse(a, refused)
            return False
        return True

    async def _serve(self, a: Arrival) -> None:
        where = a.where
        via = f" via {a.proxy}" if a.proxy else ""
        self.log.info(
            where,
            "connect",
            f"connect from {where.peer} port {where.peer_port}{via} script={a.script.name}",
            script=a.script.name,
            proxy=a.proxy,
        )
        lease = await self._lease_for(a)
        if lease is None:
            return
        seed = session_seed()  # the recording keeps it: a replay gets the same random numbers
        session = Session(
            a.conn,
            where,
            a.script,
            self.settings(a.script),
            self.log,
            self._recording(a, seed),
            a.pending,
            seed,
        )
        a.ended = True  # the session writes its end line, however it ends
        self.sessions.add(session)
        try:
            await session.run(lease)
        finally:
            self.sessions.discard(session)

    async def _lease_for(self, a: Arrival) -> Lease | None:
        """A sandbox, or None after refusing the connection (each refusal logged once)."""
        loop, where, c = asyncio.get_running_loop(), a.where, self.config
        pool = self.sandboxes.pool_for(a.script)
        queued = pool.at_capacity(a.script) and self.sandboxes.queued < c.queue_size
        if queued:
            waiting = self.sandboxes.queued
            message = f"no sandbox free for port {where.port}; queued ({waiting} already waiting)"
            self.log.info(where, "queued", message, waiting=waiting)
        refused, level, why = None, "warn", ""
        try:
            lease = await pool.acquire(a.script, loop.time() + c.queue_timeout)
        except QueueFull:
            refused, why = Reason.QUEUE_FULL, "no sandbox free and the queue is full"
        except TimeoutError:
            refused, why = Reason.CAPACITY, f"no sandbox free within {c.queue_timeout:g}s"
        except (PoolClosed, asyncio.CancelledError):
            refused = Reason.SHUTDOWN
        except OSError as e:  # the zygote could not fork: out of processes or memory
            refused, why = Reason.CAPACITY, f"no sandbox could be forked ({sanitize(e.strerror or str(e))})"
        except Exception as e:  # zygote trouble: this connection fails, the broker goes on
            refused, level = Reason.CRASH, "error"
            why = f"no sandbox could be started: {sanitize(type(e).__name__)}"
        if refused is not None:
            if why:
                self.log.emit(level, where, "refused", f"refused: {why}", reason=refused)
            self._refuse(a, refused)
            return None
        if queued:
            waited = round((loop.time() - a.started) * 1000)
            self.log.info(where, "dequeued", f"dequeued after {waited}ms", waited_ms=waited)
        return lease

    def _recording(self, a: Arrival, seed: tuple[int, int]) -> SessionRecording | None:
        if self.recorder is None or a.where.quiet:
            return None
        w = a.where
        meta = SessionMeta(
            w.conn,
            w.port or 0,
            w.peer,
            w.peer_port or 0,
            a.script.name,
            a.script.sha256,
            a.wall_started,
            seed,
        )
        return self.recorder.open(meta)

    def _trim_when_idle(self) -> None:
        now = asyncio.get_running_loop().time()
        if self.gate.active == 0 and now - self._last_trim >= TRIM_INTERVAL:
            self._last_trim = now
            return_free_memory()

    async def finish(self, timeout: float) -> None:
        """Shutdown: running sessions get their grace, then whatever is left is cancelled."""
        for session in list(self.sessions):
            try:
                session.begin_shutdown()
            except Exception as e:  # one odd session must not keep the others from their grace
                self.log.error(
                    session.where, "broker.error", f"shutdown of this session failed: {type(e).__name__}"
                )
        # Connections not in a session yet (reading a PROXY header, waiting for a sandbox) have no script
        # to give grace to: they end now, each with its session-end line (reason shutdown).
        for task, arrival in list(self.handlers.items()):
            if not arrival.ended:
                task.cancel()
        if self.handlers:
            _done, pending = await asyncio.wait(self.handlers, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
