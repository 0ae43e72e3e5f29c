"""A real zygote started the three ways the broker can start it, and driven over its control socket.

    as root (the broker's --allow-root), as root with --user nobody, and as an ordinary user

The broker's own start path (broker/zygote.py) cannot run this interpreter as an ordinary user: it lives
under /root. So the ordinary user is made the way a login makes one: a root process that imports
everything while the files are readable, then switches to nobody with setresuid alone, keeping the full
bounding set and no capability, and dumpable again: exactly what an unprivileged broker's zygote starts
with.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from broker.zygote import resolved_libraries
from deadend.wire import ZYGOTE_ENV, ForkRequest, Layer, ZygoteConfig, layers_from_wire
from tests.conftest import REPO

NOBODY = 65534
MODES = ("root", "root --user nobody", "ordinary user")

# sandbox.zygote.main() after `prelude`, everything imported first (the prelude may take the right to).
LAUNCH = """
import array, ctypes, ctypes.util, os, sys
import pyseccomp, sandbox.worker, sandbox.zygote
{prelude}
sandbox.zygote.main()
"""
# nobody, without dropping the bounding set first (see the module docstring)
AS_ORDINARY_USER = """
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: as any process an ordinary user starts
"""


def host_pid(pidfd: int) -> int:
    """A child's pid as this test's /proc numbers it (the zygote reports its own namespace's number)."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise AssertionError("no Pid: line in the pidfd's fdinfo")


@dataclass
class Worker:
    pid: int  # as this test sees it
    to_child: int
    from_child: int
    pidfd: int

    def close(self) -> None:
        for fd in (self.to_child, self.from_child, self.pidfd):
            os.close(fd)


@dataclass
class ZygoteUnderTest:
    mode: str
    env: dict[str, str] = field(default_factory=lambda: dict(ZYGOTE_ENV))
    off: tuple[str, ...] = ()  # layers the zygote leaves out (as if the kernel refused them)
    prelude: str = ""  # Python run in the zygote's process before its main()
    proc: subprocess.Popen[bytes] | None = None
    control: socket.socket | None = None
    layers: list[Layer] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)

    def start(self, timeout: float = 10.0) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = ZygoteConfig(
            parent_pid=os.getpid(),
            control_fd=theirs.fileno(),
            libraries=resolved_libraries(),
            run_as=(NOBODY, NOBODY) if self.mode == "root --user nobody" else None,
            isolation_off=self.off,
        )
        prelude = self.prelude + (AS_ORDINARY_USER if self.mode == "ordinary user" else "")
        program = ["-c", LAUNCH.format(prelude=prelude)] if prelude else ["-m", "sandbox.zygote"]
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", *program, config.encode()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=[theirs.fileno()],
                start_new_session=True,
                env=self.env,
                cwd=REPO,
            )
        finally:
            theirs.close()
        self.control = ours
        ours.settimeout(timeout)
        msg = self._receive()[0]
        assert msg[0] == "hello" and msg[1] == self.proc.pid, msg
        self.layers = layers_from_wire(msg[2])

    def _receive(self) -> tuple[Any, list[int]]:
        assert self.control is not None
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.control, 4096, 4)
        except TimeoutError:
            raise AssertionError(f"the zygote said nothing; stderr: {self.stderr()}") from None
        assert data, f"the zygote exited; stderr: {self.stderr()}"
        return msgpack.unpackb(data), fds

    def stderr(self) -> str:
        if self.proc is None or self.proc.stderr is None:
            return ""
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            return "(still running)"
        return self.proc.stderr.read().decode(errors="replace")[-2000:]

    def fork(self) -> Worker:
        """A worker that has built its Lua state and locked itself down (it said "ready")."""
        assert self.control is not None
        self.control.send(ForkRequest(address_space=1 << 31, cpu_seconds=30).to_message())
        msg, fds = self._receive()
        assert msg[0] == "child" and len(fds) == 3, msg
        worker = Worker(host_pid(fds[2]), *fds)
        self.workers.append(worker)
        unpacker = msgpack.Unpacker()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            unpacker.feed(os.read(worker.from_child, 4096))
            for frame in unpacker:
                assert frame == ["ready"], frame
                return worker
        raise AssertionError("the worker never said ready")

    def fork_server(self) -> int:
        """The process the workers were forked by (the zygote itself without a PID namespace)."""
        with open(f"/proc/{self.workers[0].pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])

    def stop(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(worker.pidfd, signal.SIGKILL)
            worker.close()
        self.workers.clear()
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stderr is not None:
                self.proc.stderr.close()
