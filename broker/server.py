"""The Server owns the lifecycle: scripts, zygote and pool, listeners, connections, shutdown.

Start-up order matters: the zygote is exec'd before any socket is opened (it must never inherit one),
scripts are compiled in sandbox children, and every listener is bound before the first accept, so a port
already in use fails the start rather than half of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import secrets
import signal
import socket
from dataclasses import dataclass, field

from broker import monitor as m
from broker.compile import compile_error
from broker.gate import Gate, connections_fd_allows, raise_fd_limit
from broker.memory import return_free_memory
from broker.net import BindAddress, bind_addresses, ipv6_unavailable, open_listener, peer_ip
from broker.pool import PoolClosed, QueueFull, SandboxPool
from broker.session import Session, SessionSettings, log_session_end
from broker.zygote import ZygoteLost
from deadend.config import Config
from deadend.logs import BROKER, EventLog, Where, sanitize
from deadend.scripts import PORT_MAX, Script, discover

ACCEPT_ERRORS_TRANSIENT = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EAGAIN}
ACCEPT_ERRORS_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
SHUTDOWN_EXTRA = 3.0  # seconds past the scripts' grace before remaining sessions are cancelled
FD_WARNING_INTERVAL = 10.0  # seconds between two "out of descriptors" lines
TRIM_INTERVAL = 5.0  # at most this often, give freed heap back to the system when the broker goes idle


class StartupError(Exception):
    """A reason the broker cannot start (or, once running, cannot go on), worded for one log line."""


@dataclass(slots=True)
class Listener:
    sock: socket.socket
    address: BindAddress
    script: Script
    task: asyncio.Task[None] | None = None


@dataclass(slots=True)
class Server:
    config: Config
    log: EventLog
    pool: SandboxPool | None = None
    listeners: list[Listener] = field(default_factory=list)
    sessions: set[Session] = field(default_factory=set)
    handlers: set[asyncio.Task[None]] = field(default_factory=set)
    handle_signals: bool = True  # False when embedded in another program's loop (it stops us itself)
    gate: Gate | None = None
    _stop: asyncio.Event | None = None
    _released: asyncio.Event | None = None  # set whenever a connection ends (fds came free)
    _last_fd_warning: float = float("-inf")
    _last_trim: float = float("-inf")

    # --- start-up --------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run until SIGINT/SIGTERM; raise StartupError if the broker cannot start."""
        self._stop = asyncio.Event()
        scripts = self._discover()
        if self.pool is None:
            c = self.config
            self.pool = SandboxPool(c.ceilings, self.log, c.workers, c.warm, c.queue_size)
        try:
            await self.pool.start()
        except ZygoteLost as e:
            raise StartupError(str(e)) from e
        except OSError as e:
            raise StartupError(f"cannot start the sandbox zygote: {e.strerror or e}") from e
        try:
            try:
                servable = await self._compile_all(scripts)
            except OSError as e:
                raise StartupError(f"cannot start sandboxes to compile the scripts: {e.strerror or e}") from e
            if not servable:
                raise StartupError(f"no servable script in {self.config.scripts}")
            self._bind_all(servable)
            self.gate = self._make_gate()
            loop = asyncio.get_running_loop()
            if self.handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, self.request_stop)
            for listener in self.listeners:
                listener.task = loop.create_task(self._accept_loop(listener))
            self.log.info(BROKER, f"ready: {len(servable)} script(s), {self.config.workers} workers")
            assert self.pool.failed is not None
            self.pool.failed.add_done_callback(lambda _: self.request_stop())
            await self._stop.wait()
        finally:
            await self._shutdown()
        if self.pool.failed is not None and self.pool.failed.done():
            raise StartupError(f"stopped: {self.pool.failed.result()}")  # a supervisor should restart us

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def _discover(self) -> list[Script]:
        folder = self.config.scripts
        if not folder.is_dir():
            raise StartupError(f"scripts folder {folder} does not exist or is not a folder")
        try:
            scripts, ignored = discover(folder)
        except OSError as e:
            raise StartupError(f"cannot read scripts folder {folder}: {e.strerror}") from e
        for item in ignored:
            self.log.info(BROKER, f"ignored {sanitize(item.name, 256)}: {item.why}")
        for script in scripts:
            port = script.port + self.config.port_offset
            if not 1 <= port <= PORT_MAX:
                raise StartupError(
                    f"port offset {self.config.port_offset} puts {script.name} on port {port}, "
                    f"outside 1..{PORT_MAX}"
                )
        return scripts

    async def _compile_all(self, scripts: list[Script]) -> list[Script]:
        assert self.pool is not None
        servable = []
        for script in scripts:
            error = await compile_error(self.pool, script, self.config.ceilings)
            if error is None:
                servable.append(script)
            else:
                where = Where(port=script.port + self.config.port_offset)
                self.log.error(where, f"compile error in {script.name}: {sanitize(error)}; port not opened")
        return servable

    def _bind_all(self, scripts: list[Script]) -> None:
        for script in scripts:
            port = script.port + self.config.port_offset
            try:
                addresses = bind_addresses(self.config.hosts, port)
            except OSError as e:
                raise StartupError(f"cannot resolve --host: {e.strerror or e}") from e
            for address in addresses:
                try:
                    sock = open_listener(address)
                except OSError as e:
                    if address.optional and ipv6_unavailable(e):
                        self.log.warn(BROKER, f"IPv6 unavailable, not listening on {address}")
                        continue
                    raise StartupError(f"cannot listen on {address} for {script.name}: {e.strerror}") from e
                self.listeners.append(Listener(sock, address, script))
                self.log.info(Where(port=port), f"listening on {address} script={script.name}")

    def _make_gate(self) -> Gate:
        c = self.config
        allowed = connections_fd_allows(raise_fd_limit(), len(self.listeners), c.warm)
        if allowed < c.max_connections:
            self.log.warn(
                BROKER, f"the file descriptor limit allows {allowed} concurrent connections; capping there"
            )
        return Gate(max_connections=min(c.max_connections, allowed), max_per_ip=c.max_per_ip)

    # --- connections -----------------------------------------------------------------------------

    async def _accept_loop(self, listener: Listener) -> None:
        loop = asyncio.get_running_loop()
        assert self.gate is not None
        while True:
            try:
                conn, addr = await loop.sock_accept(listener.sock)
            except OSError as e:
                if e.errno in ACCEPT_ERRORS_RESOURCES:
                    await self._out_of_resources(listener, e)
                elif e.errno not in ACCEPT_ERRORS_TRANSIENT:
                    self.log.error(BROKER, f"accept on {listener.address} failed: {e.strerror}")
                    await asyncio.sleep(0.25)
                continue
            where = Where(listener.address.port, secrets.token_hex(6), peer_ip(addr[0]))
            refused = self.gate.admit(where.peer)
            if refused is not None:
                # Cheap: no sandbox, no connect line; the one session-end line says why.
                conn.close()
                log_session_end(self.log, where, refused, 0.0, 0, 0, "-")
                continue
            conn.setblocking(False)
            task = loop.create_task(self._handle(conn, addr, where, listener))
            self.handlers.add(task)
            task.add_done_callback(self.handlers.discard)

    async def _out_of_resources(self, listener: Listener, e: OSError) -> None:
        """Out of descriptors or buffers: keep serving what we have, and accept again once one ends."""
        loop = asyncio.get_running_loop()
        assert self.gate is not None
        if loop.time() - self._last_fd_warning >= FD_WARNING_INTERVAL:
            self._last_fd_warning = loop.time()
            self.log.warn(
                BROKER,
                f"accept on {listener.address} failed: {e.strerror}; pausing accepts "
                f"({self.gate.active} connections open)",
            )
        self.gate.refused["accept-" + (errno.errorcode.get(e.errno or 0, "error").lower())] += 1
        if self._released is None:
            self._released = asyncio.Event()
        self._released.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self._released.wait()

    async def _handle(
        self, conn: socket.socket, addr: tuple[str, int], where: Where, listener: Listener
    ) -> None:
        try:
            await self._serve_connection(conn, addr, where, listener)
        finally:
            assert self.gate is not None
            self.gate.release(where.peer)
            if self._released is not None:
                self._released.set()
            self._trim_when_idle()

    def _trim_when_idle(self) -> None:
        assert self.gate is not None
        now = asyncio.get_running_loop().time()
        if self.gate.active == 0 and now - self._last_trim >= TRIM_INTERVAL:
            self._last_trim = now
            return_free_memory()

    async def _serve_connection(
        self, conn: socket.socket, addr: tuple[str, int], where: Where, listener: Listener
    ) -> None:
        assert self.pool is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.log.info(where, f"connect from {where.peer} port {addr[1]} script={listener.script.name}")
        refused: str | None = None
        queued = self.pool.at_capacity() and self.pool.queued < self.config.queue_size
        if queued:
            self.log.info(
                where,
                f"all {self.config.workers} sandboxes busy; queued ({self.pool.queued} already waiting)",
            )
        try:
            sandbox = await self.pool.acquire(self.config.queue_timeout)
        except QueueFull:
            refused = m.END_QUEUE_FULL
            self.log.warn(where, f"refused: all {self.config.workers} sandboxes busy and the queue is full")
        except TimeoutError:
            refused = m.END_CAPACITY
            self.log.warn(where, f"refused: no sandbox free within {self.config.queue_timeout:g}s")
        except (PoolClosed, asyncio.CancelledError):
            refused = m.END_SHUTDOWN
        except OSError as e:  # the zygote could not fork: out of processes or memory
            refused = m.END_CAPACITY
            self.log.warn(where, f"refused: no sandbox could be forked ({sanitize(e.strerror or str(e))})")
        except Exception as e:  # zygote trouble: this connection fails, the broker goes on
            refused = m.END_CRASH
            self.log.error(where, f"no sandbox could be started: {sanitize(type(e).__name__)}")
        if refused is None and queued:
            self.log.info(where, f"dequeued after {(loop.time() - started) * 1000:.0f}ms")
        if refused is not None:
            conn.close()
            log_session_end(self.log, where, refused, loop.time() - started, 0, 0, "-")
            return
        settings = SessionSettings(self.config.ceilings, self.config.allow_clock, self.config.shutdown_grace)
        session = Session(conn, where, listener.script, settings, self.log)
        self.sessions.add(session)
        try:
            await session.run(self.pool, sandbox)
        finally:
            self.sessions.discard(session)

    # --- shutdown --------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        if self.listeners:
            self.log.info(BROKER, "shutting down")
        if self.handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        for listener in self.listeners:
            if listener.task is not None:
                listener.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener.task
            listener.sock.close()
        self.listeners.clear()
        if self.pool is not None:
            self.pool.stop_acquiring()
        for session in list(self.sessions):
            try:
                session.begin_shutdown()
            except Exception as e:  # one odd session must not keep the others from their grace
                self.log.error(session.where, f"shutdown of this session failed: {type(e).__name__}")
        if self.handlers:
            _done, pending = await asyncio.wait(
                self.handlers, timeout=self.config.shutdown_grace + SHUTDOWN_EXTRA
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.pool is not None:
            await self.pool.close()
