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

from broker import monitor as m
from broker.gate import Gate
from broker.memory import return_free_memory
from broker.net import peer_ip, read_proxy_header
from broker.pool import PoolClosed, QueueFull, Sandbox, SandboxPool
from broker.session import Session, SessionSettings, log_session_end, start_message
from deadend.config import Config
from deadend.logs import EventLog, Where, sanitize
from deadend.proxy import ProxyError
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
    counted_ip: str | None  # what the gate counted against the per-IP cap
    proxy: str | None = None  # the proxy's address when the peer came in a PROXY header
    pending: bytes = b""  # client bytes that arrived with the PROXY header


class Doorman:
    def __init__(
        self, config: Config, log: EventLog, pool: SandboxPool, gate: Gate, recorder: Recorder | None
    ) -> None:
        self.config = config
        self.log = log
        self.pool = pool
        self.gate = gate
        self.recorder = recorder
        self.settings = SessionSettings(config.ceilings, config.allow_clock, config.shutdown_grace)
        # Warm children are prepared for the scripts connections ask for (a dense pool asks for none).
        pool.preparer = lambda script: start_message(script, self.settings, "prepare")
        self.sessions: set[Session] = set()
        self.handlers: set[asyncio.Task[None]] = set()
        self.active_by_port: collections.Counter[int] = collections.Counter()
        self.released = asyncio.Event()  # set whenever a connection ends (descriptors came free)
        self._last_trim = float("-inf")

    def admit(self, conn: socket.socket, addr: tuple[str, int], port: int, script: Script) -> None:
        """Called for each accepted socket: refuse it at once, or start handling it."""
        loop = asyncio.get_running_loop()
        where = Where(port, secrets.token_hex(6), peer_ip(addr[0]), addr[1])
        if self.config.proxy_protocol:
            counted = None  # the real peer, the one to count and to classify, comes in the header
        else:
            where = self._classify(where)
            counted = where.peer
        refused = self.gate.admit(counted)
        if refused is not None:
            # Cheap: no sandbox, no connect line; the one session-end line says why.
            conn.close()
            log_session_end(self.log, where, refused, 0.0, 0, 0, "-")
            return
        conn.setblocking(False)
        arrival = Arrival(conn, where, script, loop.time(), time.time(), counted)
        task = loop.create_task(self._handle(arrival))
        self.handlers.add(task)
        task.add_done_callback(self.handlers.discard)

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
                self._refuse(a, m.END_IGNORED)
                return
            await self._serve(a)
        finally:
            self.gate.release(a.counted_ip)
            port = a.where.port or 0
            self.active_by_port[port] -= 1
            if not self.active_by_port[port]:
                del self.active_by_port[port]
            self.released.set()
            self._trim_when_idle()

    def _refuse(self, a: Arrival, reason: str) -> None:
        a.conn.close()
        log_session_end(self.log, a.where, reason, asyncio.get_running_loop().time() - a.started, 0, 0, "-")

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
            self._refuse(a, m.END_PROXY_HEADER)
            return False
        if header.source is not None:  # else a LOCAL header (the proxy's health check): the proxy is the peer
            a.proxy = a.where.peer
            ip, port = header.source  # already in the form scripts see (deadend.proxy.peer_text)
            a.where = dataclasses.replace(a.where, peer=ip, peer_port=port)
        a.where = self._classify(a.where)
        refused = self.gate.admit_source(a.where.peer)
        if refused is not None:
            self._refuse(a, refused)
            return False
        a.counted_ip = a.where.peer
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
        sandbox = await self._sandbox_for(a)
        if sandbox is None:
            return
        session = Session(a.conn, where, a.script, self.settings, self.log, self._recording(a), a.pending)
        self.sessions.add(session)
        try:
            await session.run(self.pool, sandbox)
        finally:
            self.sessions.discard(session)

    async def _sandbox_for(self, a: Arrival) -> Sandbox | None:
        """A sandbox, or None after refusing the connection (each refusal logged once)."""
        loop, where, c = asyncio.get_running_loop(), a.where, self.config
        queued = self.pool.at_capacity() and self.pool.queued < c.queue_size
        if queued:
            waiting = self.pool.queued
            message = f"all {c.workers} sandboxes busy; queued ({waiting} already waiting)"
            self.log.info(where, "queued", message, waiting=waiting)
        refused, level, why = None, "warn", ""
        try:
            sandbox = await self.pool.acquire(c.queue_timeout, script=a.script)
        except QueueFull:
            refused, why = m.END_QUEUE_FULL, f"all {c.workers} sandboxes busy and the queue is full"
        except TimeoutError:
            refused, why = m.END_CAPACITY, f"no sandbox free within {c.queue_timeout:g}s"
        except (PoolClosed, asyncio.CancelledError):
            refused = m.END_SHUTDOWN
        except OSError as e:  # the zygote could not fork: out of processes or memory
            refused, why = m.END_CAPACITY, f"no sandbox could be forked ({sanitize(e.strerror or str(e))})"
        except Exception as e:  # zygote trouble: this connection fails, the broker goes on
            refused, level = m.END_CRASH, "error"
            why = f"no sandbox could be started: {sanitize(type(e).__name__)}"
        if refused is not None:
            if why:
                self.log.emit(level, where, "refused", f"refused: {why}", reason=refused)
            self._refuse(a, refused)
            return None
        if queued:
            waited = round((loop.time() - a.started) * 1000)
            self.log.info(where, "dequeued", f"dequeued after {waited}ms", waited_ms=waited)
        return sandbox

    def _recording(self, a: Arrival) -> SessionRecording | None:
        if self.recorder is None or a.where.quiet:
            return None
        w = a.where
        meta = SessionMeta(
            w.conn, w.port or 0, w.peer, w.peer_port or 0, a.script.name, a.script.sha256, a.wall_started
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
        if self.handlers:
            _done, pending = await asyncio.wait(self.handlers, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
