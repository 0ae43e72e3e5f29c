"""Broker-side control of a zygote: start it, ask it for workers, learn how they exited.

How a zygote is started is a sibling choice (uvicorn style): `DirectSpawner` execs it from the broker,
which works while the broker may still read the interpreter; `LauncherSpawner` asks the launcher, a small
process the broker started before it dropped its privileges and the only one left that may start the
interpreter (a virtual environment under /root, say) and switch a fresh zygote to --user. Either way the
zygote and its workers start with an environment built from nothing: whatever the operator gave the
broker (tokens, sink credentials) never reaches a sandbox.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes.util
import errno
import functools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from broker.privileges import RunAs
from deadend import wire
from deadend.logs import BROKER, EventLog, sanitize

MAX_CONTROL = 4096
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0  # a zygote exits as soon as its control socket closes; this only bounds a stuck one


@functools.cache
def resolved_libraries() -> dict[str, str]:
    """Shared-library names the zygote needs, resolved once (find_library forks ldconfig)."""
    found = {name: ctypes.util.find_library(name) for name in ("c", "seccomp")}
    return {name: path for name, path in found.items() if path}


def pid_in_our_namespace(pidfd: int, fallback: int) -> int:
    """The broker's number for a worker, for its log lines. The fork server counts in a PID namespace of
    its own (2, 3, ...); the pidfd names the process itself, and its fdinfo shows the pid as the reader's
    /proc numbers it."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
            for line in f:
                if line.startswith(b"Pid:"):
                    pid = int(line.split()[1])
                    return pid if pid > 0 else fallback
    except (OSError, ValueError, IndexError):
        pass
    return fallback


class ZygoteLost(Exception):
    """The zygote died or could not start; no worker can be forked until it is restarted."""


class WorkerProcess:
    """One forked sandbox worker as the broker holds it: two pipe ends and a pidfd."""

    def __init__(self, zygote_pid: int, to_worker: int, from_worker: int, pidfd: int) -> None:
        self.zygote_pid = zygote_pid  # its number in the zygote's PID namespace
        self._pid: int | None = None
        self.to_worker = to_worker
        self.from_worker = from_worker
        self.pidfd = pidfd
        self.released = False
        self.exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    @property
    def pid(self) -> int:
        """The broker's number for it (log lines), read from its pidfd when first asked: a file opened
        and read per worker was a measurable part of a fork's cost to the broker, for a number most
        workers never show. After its pidfd is closed, the zygote's number stands in."""
        if self._pid is None:
            self._pid = (
                pid_in_our_namespace(self.pidfd, self.zygote_pid) if self.pidfd >= 0 else self.zygote_pid
            )
        return self._pid

    def kill(self) -> None:
        """SIGKILL through the pidfd: never hits a recycled pid."""
        if self.exited.done() or self.pidfd < 0:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def release(self) -> None:
        """The broker is done with this worker (its pipes are closed); free the pidfd once it is reaped."""
        self.released = True
        self.close_pidfd_if_done()

    def close_pidfd_if_done(self) -> None:
        if self.released and self.exited.done() and self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


# --- starting a zygote -----------------------------------------------------------------------------


@dataclass(slots=True)
class Started:
    """A zygote process just started: its pid, and how to wait for and reap it."""

    pid: int
    wait: Callable[[], asyncio.Future[None]]  # resolves once the process is gone (reaped)


class Spawner(Protocol):
    """Starts a zygote with one end of its control socket and a pipe for its stderr."""

    async def spawn(self, control: socket.socket, stderr: int, run_as: RunAs | None) -> Started: ...

    async def close(self) -> None: ...


def command(module: str, config: wire.ZygoteConfig) -> list[str]:
    return [sys.executable, "-I", "-m", module, config.encode()]


class DirectSpawner:
    """The broker execs the zygote itself (it is not going to drop privileges, or has not yet).

    `program`: what to exec instead of sandbox/zygote.py, its configuration appended (the tests' fake
    zygote, whose workers are an attacker's programs). `isolation_off`: layers the zygote leaves out
    (bench/isolation.py's measurements only; the broker never sets it).
    """

    def __init__(self, program: Sequence[str] | None = None, isolation_off: tuple[str, ...] = ()) -> None:
        self.program = program
        self.isolation_off = isolation_off

    async def spawn(self, control: socket.socket, stderr: int, run_as: RunAs | None) -> Started:
        config = wire.ZygoteConfig(
            parent_pid=os.getpid(),
            control_fd=control.fileno(),
            libraries=resolved_libraries(),
            run_as=(run_as.uid, run_as.gid) if run_as else None,
            isolation_off=self.isolation_off,
        )
        argv = (
            command(wire.ZYGOTE_MODULE, config) if self.program is None else [*self.program, config.encode()]
        )
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            pass_fds=[control.fileno()],
            start_new_session=True,  # no controlling terminal for anything sandbox-side
            close_fds=True,
            env=wire.ZYGOTE_ENV,
        )

        def wait() -> asyncio.Future[None]:
            return asyncio.ensure_future(_reap(proc))

        return Started(proc.pid, wait)

    async def close(self) -> None:
        pass


class LauncherGone(ZygoteLost):
    """The launcher died: no zygote can be started any more (the broker cannot recover: it exits)."""


class LauncherSpawner:
    """Zygotes come from the launcher (sandbox/launcher.py), started while the broker was still root."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._replies: collections.deque[asyncio.Future[int]] = collections.deque()
        self._exits: dict[int, asyncio.Future[None]] = {}
        self.gone: asyncio.Future[None] | None = None

    async def start(self, run_as: RunAs) -> None:
        """Start the launcher; must run before the broker drops to `run_as`."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = wire.ZygoteConfig(
            parent_pid=os.getpid(),
            control_fd=theirs.fileno(),
            libraries=resolved_libraries(),
            run_as=(run_as.uid, run_as.gid),
        )
        try:
            self._proc = subprocess.Popen(
                command(wire.LAUNCHER_MODULE, config),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
                start_new_session=True,
                close_fds=True,
                env=wire.ZYGOTE_ENV,
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        self._control = ours
        self.gone = loop.create_future()
        hello = loop.create_future()
        self._replies.append(hello)
        loop.add_reader(ours.fileno(), self._on_control)
        try:
            await asyncio.wait_for(asyncio.shield(hello), START_TIMEOUT)
        except (TimeoutError, ZygoteLost) as e:
            await self.close()
            raise ZygoteLost("the sandbox launcher did not start") from e

    def _on_control(self) -> None:
        if self._control is None:
            return
        while True:
            try:
                data = self._control.recv(MAX_CONTROL)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._lose()
                return
            msg = msgpack.unpackb(data)
            if msg[0] in ("hello", "spawned") and self._replies:
                fut = self._replies.popleft()
                if not fut.done():
                    fut.set_result(int(msg[1]))
            elif msg[0] == "spawn-failed" and self._replies:
                fut = self._replies.popleft()
                if not fut.done():
                    fut.set_exception(ZygoteLost(sanitize(str(msg[1]), 256)))
            elif msg[0] == "exited":
                done = self._exits.pop(int(msg[1]), None)
                if done is not None and not done.done():
                    done.set_result(None)

    def _lose(self) -> None:
        if self.gone is None or self.gone.done():
            return
        self.gone.set_result(None)
        if self._control is not None:
            asyncio.get_running_loop().remove_reader(self._control.fileno())
        while self._replies:
            fut = self._replies.popleft()
            if not fut.done():
                fut.set_exception(LauncherGone("the sandbox launcher is gone: no zygote can be started"))
        for done in self._exits.values():  # its zygotes died with it
            if not done.done():
                done.set_result(None)
        self._exits.clear()

    async def spawn(self, control: socket.socket, stderr: int, run_as: RunAs | None) -> Started:
        loop = asyncio.get_running_loop()
        if self._control is None or self.gone is None or self.gone.done():
            raise LauncherGone("the sandbox launcher is gone: no zygote can be started")
        reply: asyncio.Future[int] = loop.create_future()
        try:
            socket.send_fds(self._control, [msgpack.packb(["spawn"])], [control.fileno(), stderr])
        except OSError as e:
            raise LauncherGone(f"the sandbox launcher is gone: {e.strerror or e}") from e
        self._replies.append(reply)
        pid = await asyncio.wait_for(reply, START_TIMEOUT)
        exited = loop.create_future()
        self._exits[pid] = exited

        def wait() -> asyncio.Future[None]:
            return exited

        return Started(pid, wait)

    async def close(self) -> None:
        """Closing the socket makes the launcher kill its zygotes and exit; reap it."""
        self._lose()
        if self._control is not None:
            asyncio.get_running_loop().remove_reader(self._control.fileno())
            self._control.close()
            self._control = None
        if self._proc is not None:
            await _reap(self._proc)
            self._proc = None


async def _reap(proc: subprocess.Popen[bytes]) -> None:
    for _ in range(100):
        if proc.poll() is not None:
            return
        await asyncio.sleep(0.02)
    proc.kill()
    await asyncio.to_thread(proc.wait)


# --- one zygote ------------------------------------------------------------------------------------


class Zygote:
    def __init__(
        self,
        spawner: Spawner,
        log: EventLog,
        on_exit: Callable[[WorkerProcess], None],
        run_as: RunAs | None = None,
    ) -> None:
        self.spawner = spawner
        self.run_as = run_as  # the zygote switches to it before its first fork
        self.log = log
        self.on_exit = on_exit  # called once per worker when the zygote reports (or loses) it
        self.control: socket.socket | None = None
        self.pid = 0
        self.forks = 0  # workers asked for so far
        self.started_at = 0.0
        self.layers: list[wire.Layer] = []  # the isolation the zygote reported in its hello
        self._started: Started | None = None
        self._stderr = -1
        self._pending: collections.deque[asyncio.Future[WorkerProcess]] = collections.deque()
        self.workers: dict[int, WorkerProcess] = {}
        self._hello: asyncio.Future[int] | None = None
        self.lost: asyncio.Future[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        err_r, err_w = os.pipe()
        try:
            self._started = await self.spawner.spawn(theirs, err_w, self.run_as)
        except BaseException:
            ours.close()
            os.close(err_r)
            raise
        finally:
            theirs.close()
            os.close(err_w)
        self.started_at = loop.time()
        ours.setblocking(False)
        self.control = ours
        self._hello = loop.create_future()
        self.lost = loop.create_future()
        loop.add_reader(ours.fileno(), self._on_control)
        os.set_blocking(err_r, False)
        self._stderr = err_r
        loop.add_reader(err_r, self._on_stderr)
        try:
            self.pid = await asyncio.wait_for(asyncio.shield(self._hello), START_TIMEOUT)
        except (TimeoutError, ZygoteLost) as e:
            await self.stop()
            raise ZygoteLost("the sandbox zygote did not start (is libseccomp installed?)") from e

    def fork(self, request: wire.ForkRequest) -> asyncio.Future[WorkerProcess]:
        """Ask for one worker; the future resolves when the zygote hands over its fds."""
        fut: asyncio.Future[WorkerProcess] = asyncio.get_running_loop().create_future()
        if self.control is None or (self.lost is not None and self.lost.done()):
            fut.set_exception(ZygoteLost("zygote is not running"))
            return fut
        try:
            self.control.send(request.to_message())
        except OSError as e:
            fut.set_exception(ZygoteLost(f"zygote control failed: {e}"))
            return fut
        self.forks += 1
        self._pending.append(fut)
        return fut

    def _on_control(self) -> None:
        if self.control is None:  # stopped after this callback was queued
            return
        while True:
            try:
                data, fds, flags, _addr = socket.recv_fds(self.control, MAX_CONTROL, 4)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self._lose("zygote exited")
                return
            try:
                if flags & socket.MSG_CTRUNC:  # out of descriptors: the worker's fds never arrived
                    self._fds_lost(msgpack.unpackb(data), fds)
                    continue
                self._dispatch(msgpack.unpackb(data), fds)
            except Exception as e:  # the zygote is trusted, but a bug there must not kill the broker
                for fd in fds:
                    os.close(fd)
                self.log.error(
                    BROKER, "broker.error", f"zygote sent a bad control message: {sanitize(repr(e))}"
                )

    def _fds_lost(self, msg: Any, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        fds.clear()
        if msg[0] != "child":
            return
        fut = self._pending.popleft() if self._pending else None
        if fut is not None and not fut.done():
            fut.set_exception(OSError(errno.EMFILE, "no descriptor free to receive a sandbox"))
        if self.control is not None:
            with contextlib.suppress(OSError):  # only its parent can kill it safely
                self.control.send(wire.kill_message(int(msg[1])))

    def _dispatch(self, msg: Any, fds: list[int]) -> None:
        kind = msg[0]
        if kind == "hello" and self._hello is not None and not self._hello.done():
            self._report_isolation(msg[2] if len(msg) > 2 else [])
            self._hello.set_result(int(msg[1]))
        elif kind == "child":
            to_worker, from_worker, pidfd = fds
            zygote_pid = int(msg[1])  # the zygote's reports name the worker by it (in its PID namespace)
            worker = WorkerProcess(zygote_pid, to_worker, from_worker, pidfd)
            self.workers[zygote_pid] = worker
            fut = self._pending.popleft() if self._pending else None
            if fut is None or fut.done():  # nobody waits any more: discard it
                worker.kill()
                os.close(to_worker)
                os.close(from_worker)
                worker.release()
            else:
                fut.set_result(worker)
        elif kind == "fork-failed":
            fut = self._pending.popleft() if self._pending else None
            code = int(msg[1])
            if fut is not None and not fut.done():
                fut.set_exception(OSError(code, f"the zygote could not fork: {os.strerror(code)}"))
        elif kind == "exit":
            found = self.workers.pop(int(msg[1]), None)
            if found is not None:
                self._exited(found, int(msg[2]))

    def _report_isolation(self, report: Any) -> None:
        """Keep the layers the zygote reports (whoever started it logs them: broker/isolation.py)."""
        try:
            self.layers = wire.layers_from_wire(report)
        except ValueError as e:
            self.layers = []
            self.log.error(BROKER, "broker.error", f"zygote sent a bad isolation report: {sanitize(str(e))}")

    def _exited(self, worker: WorkerProcess, status: int | None) -> None:
        if not worker.exited.done():
            worker.exited.set_result(status)
        worker.close_pidfd_if_done()
        self.on_exit(worker)

    def _on_stderr(self) -> None:
        # The zygote is trusted; its stderr (a crash traceback) is still logged escaped, a line at a time.
        try:
            data = os.read(self._stderr, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_stderr()
            return
        for line in data.splitlines()[-20:]:
            if line.strip():
                self.log.error(BROKER, "broker.error", f"zygote: {sanitize(line, 512)}")

    def _close_stderr(self) -> None:
        if self._stderr >= 0:
            asyncio.get_running_loop().remove_reader(self._stderr)
            os.close(self._stderr)
            self._stderr = -1

    def _lose(self, why: str) -> None:
        if self.lost is None or self.lost.done():
            return
        self.lost.set_result(None)
        loop = asyncio.get_running_loop()
        if self.control is not None:
            loop.remove_reader(self.control.fileno())
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(ZygoteLost(why))
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(ZygoteLost(why))
        # Its workers die with it (parent-death signal); account for each exactly once.
        for worker in list(self.workers.values()):
            worker.kill()
            self._exited(worker, None)
        self.workers.clear()

    async def stop(self) -> None:
        """Close the control socket (the zygote kills its workers and exits) and reap the zygote."""
        self._lose("zygote stopped")
        if self.control is not None:
            # _lose unregisters the reader only the first time the zygote is lost: a zygote that exited
            # and is now stopped must not leave a reader on a descriptor number about to be reused.
            asyncio.get_running_loop().remove_reader(self.control.fileno())
            self.control.close()
            self.control = None
        started, self._started = self._started, None
        if started is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(started.wait(), STOP_TIMEOUT)
        self._close_stderr()
