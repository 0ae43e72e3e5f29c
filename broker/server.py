"""The Server owns the lifecycle: scripts, sandboxes, listeners, privileges, reloads, shutdown.

Start-up order matters: systemd's sockets are taken first; the launcher (with --user) and the zygote are
exec'd before any socket is opened (they must never inherit one), the zygote as the --user from the
start; scripts are compiled in sandbox workers; every listener is bound before the first accept, so a
port already in use fails the start rather than half of it; only then does the broker drop root.
Connections are the Doorman's (doorman.py); the workers, the pools' (broker/sandboxes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import os
import signal
import socket
from dataclasses import dataclass, field

from broker.activation import ActivationError, address_of, inherited_listeners
from broker.compile import compile_error
from broker.doorman import Doorman
from broker.gate import Gate, connections_fd_allows, raise_fd_limit
from broker.listeners import Listener, ReloadPlan, plan_reload
from broker.metrics import BrokerMetrics, LiveState
from broker.net import BACKLOG, BindAddress, bind_addresses, ipv6_unavailable, open_listener
from broker.outbox import Outbox, OutboxError
from broker.privileges import (
    PrivilegeError,
    RunAs,
    discover_as,
    drop_privileges,
    forbid_tracing,
    launcher_tree,
    resolve_user,
)
from broker.sandboxes import Sandboxes, SandboxSet
from broker.session import Session, SessionSettings, start_message
from broker.supervised import SupervisorGone, SupervisorLink
from broker.tasks import Background
from broker.tls import TlsCertificates
from broker.workers import PoolClosed
from broker.zygote import DirectSpawner, LauncherSpawner, Spawner, ZygoteLost
from deadend import wire
from deadend.config import Config
from deadend.logs import BROKER, EventLog, Where, sanitize
from deadend.recording import Recorder
from deadend.scripts import PORT_MAX, Discovery, Script, discover, open_folder, refresh_folder
from deadend.tlscert import TlsCertError

ACCEPT_ERRORS_TRANSIENT = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EAGAIN}
ACCEPT_ERRORS_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
SHUTDOWN_EXTRA = 3.0  # seconds past the scripts' grace before remaining sessions are cancelled
FD_WARNING_INTERVAL = 10.0  # seconds between two "out of descriptors" lines


class StartupError(Exception):
    """A reason the broker cannot start (or, once running, cannot go on), worded for one log line."""


class BindError(Exception):
    """A listener for one script could not be opened."""


class Fatal(Exception):
    """The broker stopped because it cannot serve (logged already, as one line); exit non-zero."""


@dataclass(slots=True)
class Server:
    config: Config
    log: EventLog
    spawner: Spawner | None = None  # how zygotes are started; None: chosen from --user (broker/zygote.py)
    handle_signals: bool = True  # False when embedded in another program's loop (it stops us itself)
    sandboxes: SandboxSet | None = None  # None: Sandboxes, made at start-up (the bench brings its own)
    listeners: list[Listener] = field(default_factory=list)
    scripts: dict[int, Script] = field(default_factory=dict)  # what is served, by script port
    spare: dict[int, list[socket.socket]] = field(default_factory=dict)  # systemd's sockets, by port
    # Sockets of removed scripts, still bound but not listening: a later reload listens on them again,
    # which --user could not do with a fresh socket on a privileged port.
    parked: dict[BindAddress, socket.socket] = field(default_factory=dict)
    # The scripts folder, opened once at start-up (as root, when started as root): every rescan lists and
    # reads through it, each file with --user's permissions.
    scripts_fd: int | None = None
    doorman: Doorman | None = None
    metrics: BrokerMetrics | None = None
    recorder: Recorder | None = None
    tls: TlsCertificates | None = None
    outbox: Outbox | None = None  # the events' way to the --sink collectors
    link: SupervisorLink | None = None  # --brokers: this broker's supervisor (broker/supervised.py)
    background: Background | None = None
    fatal: str | None = None  # why the broker stopped on its own, if it did
    _stop: asyncio.Event | None = None
    _reload_wanted: asyncio.Event | None = None
    _last_fd_warning: float = float("-inf")

    # --- start-up --------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run until SIGINT/SIGTERM; raise StartupError if the broker cannot start, Fatal if it stopped
        because it could not go on serving."""
        self._stop = asyncio.Event()
        self._reload_wanted = asyncio.Event()
        self.background = Background(self.log, self._stop_fatally)
        try:
            if self.config.sink:  # first, so that the sinks get every event from here on
                self.outbox = Outbox(self.config, self.log)
        except OutboxError as e:
            raise StartupError(str(e)) from e
        try:
            for sock in inherited_listeners():
                self.spare.setdefault(address_of(sock).port, []).append(sock)
            if self.link is not None:  # the supervisor's sockets, taken as systemd's are
                self.link.die_with_supervisor()
                self._take_spare(self.link.initial_listeners())
            run_as = resolve_user(self.config.user, self.config.allow_root)
        except (ActivationError, PrivilegeError, SupervisorGone) as e:
            raise StartupError(str(e)) from e
        except OSError as e:
            raise StartupError(f"no listening sockets from the supervisor: {e.strerror or e}") from e
        found = await self._discover(run_as if run_as is not None and os.geteuid() == 0 else None)
        scripts = found.scripts
        if self.sandboxes is None:
            self.sandboxes = await self._make_sandboxes(run_as)
        try:
            await self.sandboxes.start()
        except ZygoteLost as e:
            await self.sandboxes.close()
            raise StartupError(str(e)) from e
        except OSError as e:
            await self.sandboxes.close()
            raise StartupError(f"cannot start the sandbox zygote: {e.strerror or e}") from e
        try:
            await self._start(scripts, run_as)
            await self._stop.wait()
        finally:
            await self._shutdown()
        if self.fatal is not None:
            raise Fatal(self.fatal)

    def _take_spare(self, socks: list[socket.socket]) -> None:
        for sock in socks:
            self.spare.setdefault(address_of(sock).port, []).append(sock)

    async def _make_sandboxes(self, run_as: RunAs | None) -> Sandboxes:
        spawner = self.spawner
        if spawner is None and run_as is not None:
            # The broker is about to drop to --user: keep a launcher that may start fresh zygotes later.
            launcher = LauncherSpawner()
            try:
                launcher_tree(run_as)
            except PrivilegeError as e:
                raise StartupError(str(e)) from e
            try:
                await launcher.start(run_as)
            except (ZygoteLost, OSError) as e:
                raise StartupError(f"cannot start the sandbox launcher: {e}") from e
            spawner = launcher
        assert self.background is not None
        return Sandboxes(
            self.config,
            self.log,
            self.background,
            spawner or DirectSpawner(),
            run_as,
            preparer=lambda script: start_message(script, self._settings(script), wire.Mode.PREPARE),
        )

    def _settings(self, script: Script) -> SessionSettings:
        c = self.config
        return SessionSettings(c.ceilings_for(script.port), c.allow_clock, c.shutdown_grace)

    def _stop_fatally(self, why: str) -> None:
        if self.fatal is None:
            self.fatal = why
        self.request_stop()

    async def _start(self, scripts: list[Script], run_as: RunAs | None) -> None:
        assert self.sandboxes is not None
        try:
            servable = await self._compile_all(scripts)
        except (OSError, ZygoteLost) as e:
            why = e.strerror if isinstance(e, OSError) else None
            raise StartupError(f"cannot start sandboxes to compile the scripts: {why or e}") from e
        if not servable:
            raise StartupError(f"no servable script in {self.config.scripts}")
        for script in servable:
            try:
                self._open_listeners(script)
            except BindError as e:
                raise StartupError(str(e)) from e
        self.sandboxes.serve(self.scripts.values())
        for port, socks in self.spare.items():
            self.log.warn(
                BROKER,
                "broker.warning",
                f"{'the supervisor' if self.link else 'socket activation'} passed {len(socks)} socket(s) "
                f"on port {port} "
                "with no script for them; not served",
            )
        gate = self._make_gate()
        await self._start_metrics()
        self._prepare_record_folder(run_as)
        self._load_certificates()
        await self._start_sinks(run_as)
        self._start_recorder(run_as)
        self.doorman = Doorman(self.config, self.log, self.sandboxes, gate, self.recorder, self.tls)
        loop = asyncio.get_running_loop()
        if self.handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
            if self.outbox is not None:
                loop.add_signal_handler(signal.SIGUSR1, self.outbox.reopen)
        assert self.background is not None
        self.background.spawn(self._reload_on_request(), "reload")
        for listener in self.listeners:
            self._start_accepting(listener)
        self._log_config()
        self.log.info(
            BROKER,
            "broker.ready",
            f"ready: {len(servable)} script(s), {self.config.workers} workers",
            scripts=len(servable),
            workers=self.config.workers,
        )
        failed = self.sandboxes.failed
        assert failed is not None
        failed.add_done_callback(lambda f: self._stop_fatally(f.result()))
        if self.link is not None:
            assert self.metrics is not None
            self.link.serve(self._take_spare, self.request_reload, self.metrics.exposition, self.request_stop)
            self.link.ready()

    def _load_certificates(self) -> None:
        """Still privileged: read the operator's certificates, or generate them (broker/tls.py)."""
        try:
            self.tls = TlsCertificates(self.config, self.scripts)
        except TlsCertError as e:
            raise StartupError(str(e)) from e
        for service in self.tls.services.values():
            scripts = sorted(
                (s.name for s in self.scripts.values() if self.tls.service(s.port) is service),
                key=lambda name: int(name.partition(".")[0]),
            )
            if len(scripts) == len(self.scripts) > 1:
                shown = "every script"
            else:
                shown = ", ".join(scripts) or "scripts added later"
            text = service.certificate.description
            self.log.info(
                BROKER,
                "tls.certificate",
                f"TLS certificate for {shown}: {text}",
                certificate=text,
                scripts=scripts,
            )

    def _log_config(self) -> None:
        """The effective configuration, as endlessh prints it: at start-up and after every reload."""
        text = self.config.effective()
        self.log.info(BROKER, "broker.config", f"config: {text}", config=text)

    @property
    def sessions(self) -> set[Session]:
        """The sessions running now."""
        return self.doorman.sessions if self.doorman is not None else set()

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def request_reload(self) -> None:
        """SIGHUP: rescan the scripts folder (a reload already running is followed by one more)."""
        if self._reload_wanted is not None:
            self._reload_wanted.set()

    async def _discover(self, run_as: RunAs | None = None, *, reloading: bool = False) -> Discovery:
        """The scripts folder, read off the event loop (a slow disk, a lease, a FIFO cannot stall it) and
        with --user's permissions: at start-up, still root, by a child that drops to it first."""
        folder = self.config.scripts
        try:
            if self.scripts_fd is None:
                self.scripts_fd = open_folder(folder)
            elif reloading:
                self.scripts_fd = await asyncio.to_thread(refresh_folder, folder, self.scripts_fd)
            if run_as is not None:
                found = discover_as(folder, self.scripts_fd, run_as)
            else:
                found = await asyncio.to_thread(discover, folder, self.scripts_fd)
        except OSError as e:
            user = f" as user {run_as.name}" if run_as else ""
            raise StartupError(f"cannot read scripts folder {folder}{user}: {e.strerror or e}") from e
        for ignored in found.ignored:
            name = sanitize(ignored.name, 256)
            self.log.info(BROKER, "script.ignored", f"ignored {name}: {ignored.why}", file=name)
        for item in found.unreadable:
            name, why = sanitize(item.name, 256), sanitize(item.why, 256)
            kept = reloading and item.port in self.scripts
            outcome = "keeping the previous version" if kept else "port not opened"
            self.log.warn(
                Where(port=item.port + self.config.port_offset),
                "script.unreadable",
                f"cannot read {name}: {why}; {outcome}",
                script=name,
                error=why,
                kept_previous=kept,
            )
        for script in found.scripts:
            port = script.port + self.config.port_offset
            if not 1 <= port <= PORT_MAX:
                raise StartupError(
                    f"port offset {self.config.port_offset} puts {script.name} on port {port}, "
                    f"outside 1..{PORT_MAX}"
                )
        return found

    async def _compile_all(self, scripts: list[Script], *, reloading: bool = False) -> list[Script]:
        assert self.sandboxes is not None
        servable = []
        for script in scripts:
            try:
                error = await compile_error(
                    self.sandboxes.compiler, script, self.config.ceilings_for(script.port)
                )
            except (ZygoteLost, PoolClosed, OSError) as e:
                if not reloading:
                    raise
                error = f"no sandbox to compile it in ({type(e).__name__})".encode()
            if error is None:
                servable.append(script)
                continue
            text = sanitize(error)
            kept = reloading and script.port in self.scripts
            outcome = "keeping the previous version" if kept else "port not opened"
            self.log.error(
                Where(port=script.port + self.config.port_offset),
                "script.compile_error",
                f"compile error in {script.name}: {text}; {outcome}",
                script=script.name,
                error=text,
                kept_previous=kept,
            )
        return servable

    def _open_listeners(self, script: Script) -> None:
        """Listen for `script`: on systemd's sockets for its port if there are any, else bind per --host."""
        port = script.port + self.config.port_offset
        opened = [
            Listener(sock, address_of(sock), script, inherited=True) for sock in self.spare.pop(port, [])
        ]
        if not opened:
            opened = self._bind(script, port)
        self.scripts[script.port] = script
        for listener in opened:
            self.listeners.append(listener)
            self.log.info(
                Where(port=port),
                "listen",
                f"listening on {listener.address} script={script.name}",
                address=str(listener.address),
                script=script.name,
            )

    def _bind(self, script: Script, port: int) -> list[Listener]:
        try:
            addresses = bind_addresses(self.config.host, port)
        except OSError as e:
            raise BindError(f"cannot resolve --host: {e.strerror or e}") from e
        bound: list[Listener] = []
        for address in addresses:
            try:
                parked = self.parked.pop(address, None)
                if parked is not None:
                    try:
                        parked.listen(BACKLOG)
                    except OSError:
                        parked.close()
                        raise
                    bound.append(Listener(parked, address, script))
                    continue
                bound.append(Listener(open_listener(address), address, script))
            except OSError as e:
                if address.optional and ipv6_unavailable(e):
                    self.log.warn(BROKER, "broker.warning", f"IPv6 unavailable, not listening on {address}")
                    continue
                for listener in bound:
                    listener.sock.close()
                raise BindError(f"cannot listen on {address} for {script.name}: {e.strerror}") from e
        return bound

    def _make_gate(self) -> Gate:
        c = self.config
        # Descriptors per session depend on the pool (dense sessions share their worker's): budget for
        # the costliest served.
        k = min(c.sessions_per_worker_for(port) for port in self.scripts)
        allowed = connections_fd_allows(raise_fd_limit(), len(self.listeners), c.warm, k)
        if allowed < c.max_connections:
            self.log.warn(
                BROKER,
                "broker.warning",
                f"the file descriptor limit allows {allowed} concurrent connections; capping there",
            )
        return Gate(max_connections=min(c.max_connections, allowed))

    async def _start_metrics(self) -> None:
        self.metrics = BrokerMetrics(self._live_state)
        self.log.observers.append(self.metrics.observe)
        if self.config.metrics is None:
            return
        host, port = self.config.metrics
        try:
            await self.metrics.serve(host, port)
        except OSError as e:
            raise StartupError(f"cannot serve --metrics on {host}:{port}: {e.strerror or e}") from e
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.log.info(BROKER, "metrics.listening", f"metrics on http://{address}/metrics", address=address)

    def _live_state(self) -> LiveState:
        # Called on the loop at each scrape: the broker's own state, read as it is.
        sandboxes, doorman = self.sandboxes, self.doorman
        return LiveState(
            active_by_port=doorman.active_by_port if doorman else {},
            sandboxes_busy=sandboxes.busy if sandboxes else 0,
            sandboxes_warm=sandboxes.warm if sandboxes else 0,
            workers=self.config.workers,
            queued=sandboxes.queued if sandboxes else 0,
            sandbox_starts=sandboxes.started if sandboxes else 0,
            recording_bytes=self.recorder.total_bytes if self.recorder else 0,
            log_lines_dropped=self.log.dropped_total,
            sinks=self.outbox.stats() if self.outbox else (),
        )

    def _drop_privileges(self, run_as: RunAs | None) -> None:
        try:
            if run_as is not None:
                # --user may not be able to read the interpreter's files (a virtualenv in root's home):
                # what is imported lazily later is imported now. asyncio.to_thread's executor (reloads).
                importlib.import_module("concurrent.futures.thread")
                drop_privileges(run_as)
                self.log.info(
                    BROKER,
                    "broker.privileges",
                    f"running as user {run_as.name} (uid {run_as.uid}, gid {run_as.gid})",
                    user=run_as.name,
                    uid=run_as.uid,
                    gid=run_as.gid,
                )
            forbid_tracing()
        except (PrivilegeError, OSError) as e:
            raise StartupError(f"cannot drop privileges: {e}") from e

    def _prepare_record_folder(self, run_as: RunAs | None) -> None:
        """Still root: a --record folder that does not exist yet is created for the --user."""
        folder = self.config.record
        if folder is None or run_as is None or folder.exists():
            return
        try:
            folder.mkdir(mode=0o700, parents=True)
            os.chown(folder, run_as.uid, run_as.gid)
        except OSError as e:
            raise StartupError(f"cannot create the recording folder {folder}: {e.strerror or e}") from e

    async def _start_sinks(self, run_as: RunAs | None) -> None:
        """Drop privileges, then start the sinks as --user (their spool's files are its own)."""
        outbox = self.outbox
        try:
            if outbox is not None:
                outbox.prepare_spool(*((run_as.uid, run_as.gid) if run_as else (None, None)))
            self._drop_privileges(run_as)
            if outbox is not None:
                await outbox.start()
        except OutboxError as e:
            hint = (
                f" (it must be writable by user {run_as.name})" if run_as and outbox and outbox.spool else ""
            )
            raise StartupError(f"{e}{hint}") from e

    def _start_recorder(self, run_as: RunAs | None) -> None:
        c = self.config
        if c.record is None:
            return

        def report(level: str, message: str) -> None:
            self.log.emit(level, BROKER, "record.warning", sanitize(message))

        try:
            self.recorder = Recorder(
                c.record, c.record_max_bytes, c.record_session_bytes, report, max_files=c.record_max_files
            )
        except OSError as e:
            hint = f" (it must be writable by user {run_as.name})" if run_as else ""
            raise StartupError(f"cannot record sessions to {c.record}: {e.strerror or e}{hint}") from e

    # --- accepting -------------------------------------------------------------------------------

    def _start_accepting(self, listener: Listener) -> None:
        listener.task = asyncio.get_running_loop().create_task(self._accept_loop(listener))

    async def _accept_loop(self, listener: Listener) -> None:
        loop = asyncio.get_running_loop()
        assert self.doorman is not None
        while True:
            try:
                conn, addr = await loop.sock_accept(listener.sock)
            except OSError as e:
                if e.errno in ACCEPT_ERRORS_RESOURCES:
                    await self._out_of_resources(listener, e)
                elif e.errno not in ACCEPT_ERRORS_TRANSIENT:
                    self.log.error(
                        BROKER,
                        "accept.error",
                        f"accept on {listener.address} failed: {e.strerror}",
                        address=str(listener.address),
                        error=str(e.strerror),
                    )
                    await asyncio.sleep(0.25)
                continue
            self.doorman.admit(conn, addr, listener.address.port, listener.script)

    async def _out_of_resources(self, listener: Listener, e: OSError) -> None:
        """Out of descriptors or buffers: keep serving what we have, and accept again once one ends."""
        loop = asyncio.get_running_loop()
        assert self.doorman is not None
        gate = self.doorman.gate
        if loop.time() - self._last_fd_warning >= FD_WARNING_INTERVAL:
            self._last_fd_warning = loop.time()
            self.log.warn(
                BROKER,
                "accept.error",
                f"accept on {listener.address} failed: {e.strerror}; pausing accepts "
                f"({gate.active} connections open)",
                address=str(listener.address),
                error=str(e.strerror),
            )
        gate.refused["accept-" + (errno.errorcode.get(e.errno or 0, "error").lower())] += 1
        released = self.doorman.released
        released.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await released.wait()

    # --- reload ----------------------------------------------------------------------------------

    async def _reload_on_request(self) -> None:
        assert self._reload_wanted is not None
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            try:
                await self.reload()
            except Exception as e:  # a reload must never take the serving broker down
                self.log.error(BROKER, "broker.error", f"reload failed: {sanitize(repr(e))}")

    async def reload(self) -> None:
        """Rescan the scripts folder: open new ports, close removed ones, serve changed scripts.

        Sessions already running keep the script they started with; removed ports' sessions finish.
        """
        try:
            found = await self._discover(reloading=True)
        except StartupError as e:
            none: list[str] = []
            self.log.error(
                BROKER,
                "reload",
                f"reload failed: {e}",
                added=none,
                removed=none,
                changed=none,
                failed=none,
                error=str(e),
            )
            return
        plan = plan_reload(self.scripts, found.scripts, keep={item.port for item in found.unreadable})
        compiled = {s.port for s in await self._compile_all([*plan.added, *plan.changed], reloading=True)}
        failed = [s.name for s in (*plan.added, *plan.changed) if s.port not in compiled]
        added = []
        for script in plan.added:
            if script.port not in compiled:
                continue
            try:
                self._open_listeners(script)
            except BindError as e:
                self.log.error(Where(port=script.port + self.config.port_offset), "broker.error", str(e))
                failed.append(script.name)
                continue
            added.append(script.name)
            for listener in self.listeners:
                if listener.script is script and listener.task is None:
                    self._start_accepting(listener)
        changed = [s for s in plan.changed if s.port in compiled]
        for script in changed:
            self.scripts[script.port] = script
            for listener in self.listeners:
                if listener.script.port == script.port:
                    listener.script = script
        removed = [self.scripts[port].name for port in plan.removed]
        await self._close_removed(plan)
        assert self.sandboxes is not None
        self.sandboxes.serve(self.scripts.values())
        self._log_reload(added, removed, [s.name for s in changed], failed)
        self._log_config()

    async def _close_removed(self, plan: ReloadPlan) -> None:
        for port in plan.removed:
            del self.scripts[port]
            for listener in [x for x in self.listeners if x.script.port == port]:
                self.listeners.remove(listener)
                await self._stop_listener(listener, park=True)
                self.log.info(
                    Where(port=listener.address.port),
                    "listen.stopped",
                    f"stopped listening on {listener.address}: {listener.script.name} was removed",
                    address=str(listener.address),
                )

    async def _stop_listener(self, listener: Listener, *, park: bool = False) -> None:
        if listener.task is not None:
            listener.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener.task
            listener.task = None
        if listener.inherited:  # we could not bind it again: keep it for a script that comes back
            self.spare.setdefault(listener.address.port, []).append(listener.sock)
        elif park:
            # shutdown() on a listening socket stops it listening (clients are refused, pending ones
            # reset) and, bound to an explicit port, it keeps the port: listen() takes it up again.
            with contextlib.suppress(OSError):
                listener.sock.shutdown(socket.SHUT_RDWR)
            self.parked[listener.address] = listener.sock
        else:
            listener.sock.close()

    def _log_reload(
        self, added: list[str], removed: list[str], changed: list[str], failed: list[str]
    ) -> None:
        summary = ", ".join(
            f"{word} {' '.join(names)}"
            for word, names in (
                ("added", added),
                ("removed", removed),
                ("changed", changed),
                ("failed", failed),
            )
            if names
        )
        level = "warn" if failed else "info"
        self.log.emit(
            level,
            BROKER,
            "reload",
            f"reload: {summary or 'no change'}",
            added=added,
            removed=removed,
            changed=changed,
            failed=failed,
            error=None,
        )

    # --- shutdown --------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        # 1. Say so, and take no more signals: a second SIGTERM must not interrupt the shutdown.
        if self.listeners:
            self.log.info(BROKER, "broker.stopping", "shutting down")
        if self.handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
        # 2. Stop accepting: listeners closed (systemd's kept by systemd), no new sandbox for anyone (queued
        # connections are refused with reason shutdown), reloads and other tasks stopped.
        if self.sandboxes is not None:
            self.sandboxes.stop_acquiring()
        if self.background is not None:
            await self.background.cancel_all()
        for listener in self.listeners:
            await self._stop_listener(listener)
        self.listeners.clear()
        for socks in self.spare.values():
            for sock in socks:
                sock.close()
        self.spare.clear()
        for sock in self.parked.values():
            sock.close()
        self.parked.clear()
        if self.scripts_fd is not None:
            os.close(self.scripts_fd)
            self.scripts_fd = None
        # 3. Running sessions get their grace, then end.
        if self.doorman is not None:
            await self.doorman.finish(self.config.shutdown_grace + SHUTDOWN_EXTRA)
        # 4. Every worker killed and reaped, the zygotes and the launcher stopped.
        if self.sandboxes is not None:
            await self.sandboxes.close()
        if self.link is not None:
            self.link.close()
        # 5. What is written off the event loop is flushed.
        if self.recorder is not None:
            self.recorder.close()
        if self.metrics is not None:
            await self.metrics.stop()
        # 6. Last, the sinks: every session's end is in them; they deliver what they can in a few seconds,
        # and the rest stays in the spool for the next start.
        if self.outbox is not None:
            await self.outbox.close()
