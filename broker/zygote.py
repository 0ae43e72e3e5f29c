"""Broker-side control of the zygote: start it, ask it for children, learn how they exited."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes.util
import errno
import functools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any, TextIO

import msgpack

from broker.privileges import PrivilegeError, RunAs, resolve_user
from deadend.config import Ceilings, Config
from deadend.logs import BROKER, EventLog, sanitize
from sandbox import layers
from sandbox.environment import ENVIRONMENT

MAX_CONTROL = 4096
START_TIMEOUT = 10.0


@functools.cache
def resolved_libraries() -> dict[str, str]:
    """Shared-library names the zygote needs, resolved once (find_library forks ldconfig)."""
    found = {name: ctypes.util.find_library(name) for name in ("c", "seccomp")}
    return {name: path for name, path in found.items() if path}


def pid_in_our_namespace(pidfd: int, fallback: int) -> int:
    """The broker's number for a child, for its log lines. The fork server counts in a PID namespace of
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
    """The zygote died or could not start; no child can be forked until it is restarted."""


class ChildProcess:
    """One forked sandbox child as the broker holds it: two pipe ends and a pidfd."""

    def __init__(self, pid: int, to_child: int, from_child: int, pidfd: int) -> None:
        self.pid = pid
        self.to_child = to_child
        self.from_child = from_child
        self.pidfd = pidfd
        self.released = False
        self.exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    def kill(self) -> None:
        """SIGKILL through the pidfd: never hits a recycled pid."""
        if self.exited.done() or self.pidfd < 0:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def release(self) -> None:
        """The broker is done with this child (its channel closed the pipes); free the pidfd once reaped."""
        self.released = True
        self._close_pidfd_if_done()

    def _close_pidfd_if_done(self) -> None:
        if self.released and self.exited.done() and self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class Zygote:
    def __init__(
        self,
        ceilings: Ceilings,
        log: EventLog,
        on_exit: Callable[[ChildProcess], None],
        run_as: RunAs | None = None,
        sessions_per_child: int = 1,
    ) -> None:
        self.ceilings = ceilings
        self.sessions_per_child = sessions_per_child
        self.run_as = run_as  # the zygote switches to it before its first fork
        self.log = log
        self.on_exit = on_exit  # called once per child when the zygote reports (or loses) it
        self.proc: subprocess.Popen[bytes] | None = None
        self.control: socket.socket | None = None
        self.pid = 0
        self._pending: collections.deque[asyncio.Future[ChildProcess]] = collections.deque()
        self._children: dict[int, ChildProcess] = {}  # by the pid the zygote reports
        self._hello: asyncio.Future[int] | None = None
        self.lost: asyncio.Future[None] | None = None
        self.layers: list[layers.Layer] = []  # the isolation the zygote reported in its hello
        self.isolation_off: tuple[str, ...] = ()  # bench/isolation.py only: layers left out, to measure them

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = {
            "broker_pid": os.getpid(),
            "libraries": resolved_libraries(),
            "control_fd": theirs.fileno(),
            "address_space": dense_address_space(self.ceilings, self.sessions_per_child),
            "cpu_seconds": self.ceilings.session_cpu * retire_after(self.sessions_per_child) + 10,
            "dense": self.sessions_per_child > 1,
            "session_cpu": self.ceilings.session_cpu,
            "run_as": [self.run_as.uid, self.run_as.gid] if self.run_as else None,
            "isolation_off": list(self.isolation_off),
        }
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-m", "sandbox.zygote", json.dumps(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=[theirs.fileno()],
                start_new_session=True,  # no controlling terminal for anything sandbox-side
                close_fds=True,
                env=dict(ENVIRONMENT),  # built from nothing: no secret of the broker's reaches a sandbox
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        self.control = ours
        self._hello = loop.create_future()
        self.lost = loop.create_future()
        loop.add_reader(ours.fileno(), self._on_control)
        assert self.proc.stderr is not None
        stderr_fd = self.proc.stderr.fileno()
        os.set_blocking(stderr_fd, False)
        loop.add_reader(stderr_fd, self._on_stderr, stderr_fd)
        try:
            self.pid = await asyncio.wait_for(asyncio.shield(self._hello), START_TIMEOUT)
        except (TimeoutError, ZygoteLost) as e:
            await self.stop()
            raise ZygoteLost("the sandbox zygote did not start (is libseccomp installed?)") from e

    def fork(self) -> asyncio.Future[ChildProcess]:
        """Ask for one child; the future resolves when the zygote hands over its fds."""
        fut: asyncio.Future[ChildProcess] = asyncio.get_running_loop().create_future()
        if self.control is None or (self.lost is not None and self.lost.done()):
            fut.set_exception(ZygoteLost("zygote is not running"))
            return fut
        try:
            self.control.send(msgpack.packb(["fork"]))
        except OSError as e:
            fut.set_exception(ZygoteLost(f"zygote control failed: {e}"))
            return fut
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
                if flags & socket.MSG_CTRUNC:  # out of descriptors: the child's fds never arrived
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
                self.control.send(msgpack.packb(["kill", int(msg[1])]))

    def _dispatch(self, msg: Any, fds: list[int]) -> None:
        kind = msg[0]
        if kind == "hello" and self._hello is not None and not self._hello.done():
            self._report_isolation(msg[2] if len(msg) > 2 else [])
            self._hello.set_result(int(msg[1]))
        elif kind == "child":
            to_child, from_child, pidfd = fds
            zygote_pid = int(msg[1])  # the zygote's reports name the child by it
            child = ChildProcess(pid_in_our_namespace(pidfd, zygote_pid), to_child, from_child, pidfd)
            self._children[zygote_pid] = child
            fut = self._pending.popleft() if self._pending else None
            if fut is None or fut.done():  # nobody waits any more: discard it
                child.kill()
                os.close(to_child)
                os.close(from_child)
                child.release()
            else:
                fut.set_result(child)
        elif kind == "fork-failed":
            fut = self._pending.popleft() if self._pending else None
            code = int(msg[1])
            if fut is not None and not fut.done():
                fut.set_exception(OSError(code, f"the zygote could not fork: {os.strerror(code)}"))
        elif kind == "exit":
            found = self._children.pop(int(msg[1]), None)
            if found is not None:
                self._exited(found, int(msg[2]))

    def _report_isolation(self, report: Any) -> None:
        try:
            self.layers = layers.from_wire(report)
        except ValueError as e:
            self.layers = []
            self.log.error(BROKER, "broker.error", f"zygote sent a bad isolation report: {sanitize(str(e))}")
            return
        skipped = [layer for layer in self.layers if not layer.applied]
        self.log.info(
            BROKER,
            "sandbox.isolation",
            sanitize(layers.summary(self.layers)),
            active=layers.active(self.layers),
            skipped=[layer.name for layer in skipped],
        )
        for layer in skipped:
            message, reason = sanitize(layers.skipped_line(layer)), sanitize(layer.skipped)
            self.log.warn(BROKER, "sandbox.layer_skipped", message, layer=layer.name, reason=reason)

    def _exited(self, child: ChildProcess, status: int | None) -> None:
        if not child.exited.done():
            child.exited.set_result(status)
        child._close_pidfd_if_done()
        self.on_exit(child)

    def _on_stderr(self, fd: int) -> None:
        # The zygote is trusted; its stderr (a crash traceback) is still logged escaped, a line at a time.
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(fd)
            return
        for line in data.splitlines()[-20:]:
            if line.strip():
                self.log.error(BROKER, "broker.error", f"zygote: {sanitize(line, 512)}")

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
        # Its children die with it (parent-death signal); account for each exactly once.
        for child in list(self._children.values()):
            child.kill()
            self._exited(child, None)
        self._children.clear()

    async def stop(self) -> None:
        """Close the control socket (the zygote kills its children and exits) and reap the zygote."""
        self._lose("zygote stopped")
        if self.control is not None:
            # _lose unregisters the reader only the first time the zygote is lost: a zygote that exited
            # and is now stopped must not leave a reader on a descriptor number about to be reused.
            asyncio.get_running_loop().remove_reader(self.control.fileno())
            self.control.close()
            self.control = None
        if self.proc is not None:
            proc = self.proc
            if proc.stderr is not None:
                with contextlib.suppress(ValueError, OSError):
                    asyncio.get_running_loop().remove_reader(proc.stderr.fileno())
            for _ in range(100):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.02)
            else:
                proc.kill()
                await asyncio.to_thread(proc.wait)
            if proc.stderr is not None:
                proc.stderr.close()
            self.proc = None


def retire_after(sessions_per_child: int) -> int:
    """Sessions a child serves in its life (dense mode): bounds its heap fragmentation and CPU total."""
    return 1 if sessions_per_child == 1 else 4 * sessions_per_child


def dense_address_space(ceilings: Ceilings, sessions_per_child: int) -> int:
    """RLIMIT_AS of a child: room for every Lua heap it may hold at once, plus the interpreter."""
    return ceilings.address_space + (sessions_per_child - 1) * ceilings.memory_bytes


def check_isolation(config: Config, out: TextIO) -> int:
    """`deadend broker --check-isolation`: start a zygote as the broker would, print its isolation layers
    (applied, or skipped and why), stop it. 0 when it started, whatever it could apply; 1 if it could not."""
    try:
        run_as = resolve_user(config.user, config.allow_root)
    except PrivilegeError as e:
        print(f"deadend: {e}", file=sys.stderr)
        return 1

    async def report() -> list[layers.Layer]:
        with open(os.devnull, "w") as devnull:
            log = EventLog(devnull)
            zygote = Zygote(config.ceilings, log, lambda _child: None, run_as, config.sessions_per_worker)
            try:
                await zygote.start()
                return zygote.layers
            finally:
                await zygote.stop()
                log.close()

    try:
        found = asyncio.run(report())
    except (ZygoteLost, OSError) as e:
        print(f"deadend: cannot start the sandbox zygote: {e}", file=sys.stderr)
        return 1
    out.write(layers.table(found))
    return 0
