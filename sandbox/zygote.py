"""The zygote: an exec'd fork server that starts sandbox children on the broker's request.

It is exec'd by the broker before any socket is opened, imports lupa, msgpack and pyseccomp once, and then
forks a child per request (about 17x cheaper than a fresh interpreter, research/sandbox.md §4). It never
sees untrusted data: it only forks, hands the broker each child's pipe ends and a pidfd over an anonymous
SOCK_SEQPACKET socketpair (SCM_RIGHTS), and reports how each child exited.

Control messages (msgpack, one per datagram):
    broker -> zygote   ["fork"]
    broker -> zygote   ["kill", pid]      a child whose fds the broker could not receive
    zygote -> broker   ["hello", pid, layers]   once, when ready: its pid, the isolation report
    zygote -> broker   ["child", pid]   + fds [to_child, from_child, pidfd]
    zygote -> broker   ["fork-failed", errno]                          out of processes or memory
    zygote -> broker   ["exit", pid, wait_status]

A child's pid is the one the fork server sees: in its own PID namespace (sandbox/namespaces.py) that is
not the broker's number for the process; the pidfd is what the broker acts through.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import selectors
import signal
import socket
import sys
import time
from typing import Any, NoReturn

import msgpack

from sandbox.environment import ENVIRONMENT
from sandbox.isolation import die_with_broker, isolate
from sandbox.layers import Layer, to_wire
from sandbox.lockdown import Rlimits, build_filter

MAX_CONTROL = 4096


class Zygote:
    def __init__(
        self, control: socket.socket, rlimits: Rlimits, broker_pid: int, dense_session_cpu: float | None
    ) -> None:
        self.control = control
        self.rlimits = rlimits
        self.dense_session_cpu = dense_session_cpu  # None: one session per child
        self.broker_pid = broker_pid
        self.filter = build_filter()  # compiled once; each child loads its inherited copy
        self.devnull = os.open(os.devnull, os.O_RDWR)
        self.children: set[int] = set()

    def send(self, msg: list[Any], fds: list[int] | None = None) -> None:
        data = msgpack.packb(msg)
        if fds:
            socket.send_fds(self.control, [data], fds)
        else:
            self.control.send(data)

    def fork_child(self) -> None:
        try:
            to_child_r, to_child_w = os.pipe()
        except OSError as e:
            self.send(["fork-failed", e.errno or 0])
            return
        try:
            from_child_r, from_child_w = os.pipe()
        except OSError as e:
            os.close(to_child_r)
            os.close(to_child_w)
            self.send(["fork-failed", e.errno or 0])
            return
        zygote_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError as e:  # out of processes (pids cgroup, RLIMIT_NPROC) or memory: say so, live on
            for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
                os.close(fd)
            self.send(["fork-failed", e.errno or 0])
            return
        if pid == 0:
            self._become_child(to_child_r, from_child_w, zygote_pid)
        self.children.add(pid)
        os.close(to_child_r)
        os.close(from_child_w)
        pidfd = os.pidfd_open(pid)  # cannot be a reused pid: only we reap, and we have not yet
        try:
            self.send(["child", pid], [to_child_w, from_child_r, pidfd])
        finally:
            for fd in (to_child_w, from_child_r, pidfd):
                os.close(fd)

    def _become_child(self, stdin: int, stdout: int, zygote_pid: int) -> NoReturn:
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            os.dup2(stdin, 0)
            os.dup2(stdout, 1)
            os.dup2(self.devnull, 2)  # child stderr never reaches anyone's terminal
            from sandbox import child  # imported by main() already: this is a lookup, not a load

            if self.dense_session_cpu is None:
                child.serve(self.rlimits, zygote_pid, self.filter)
            else:
                child.serve_dense(self.rlimits, zygote_pid, self.filter, self.dense_session_cpu)
        finally:
            os._exit(1)

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.send(["exit", pid, status])

    def kill_all(self) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # safe: unreaped children keep their pids

    def serve(self, pid: int, layers: list[Layer]) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd does the work
        sel = selectors.DefaultSelector()
        sel.register(self.control, selectors.EVENT_READ, "control")
        sel.register(wake_r, selectors.EVENT_READ, "signal")
        self.send(["hello", pid, to_wire(layers)])
        gc.freeze()  # keep the GC from dirtying shared pages in every forked child
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "signal":
                        os.read(wake_r, 4096)
                        self.reap()
                        continue
                    data = self.control.recv(MAX_CONTROL)
                    if not data:
                        return  # the broker closed its end: we are done
                    msg = msgpack.unpackb(data)
                    if msg == ["fork"]:
                        self.fork_child()
                    elif msg[0] == "kill" and msg[1] in self.children:
                        os.kill(msg[1], signal.SIGKILL)  # still unreaped: the pid cannot be reused
                self.reap()
        finally:
            self.kill_all()


def _use_resolved_libraries(paths: dict[str, str]) -> None:
    """pyseccomp resolves libseccomp with ctypes' find_library, which forks ldconfig. The broker resolved
    the names once; use them, so a zygote restarted when processes are scarce needs no fork."""
    import ctypes.util

    original = ctypes.util.find_library
    ctypes.util.find_library = lambda name: paths.get(name) or original(name)


def main() -> NoReturn:
    config = json.loads(sys.argv[1])
    broker_pid = config["broker_pid"]
    _use_resolved_libraries(config.get("libraries", {}))
    import array  # noqa: F401  (socket.send_fds imports it at first use; by then the root is empty)

    import sandbox.child  # noqa: F401  (lupa, msgpack and pyseccomp, loaded once for every child)

    try:
        die_with_broker(broker_pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the broker's to handle
        os.environ.update(ENVIRONMENT)  # the zone is fixed before lockdown (SPEC.md, clock option)
        time.tzset()
        control = socket.socket(fileno=config["control_fd"])
        rlimits = Rlimits(address_space=config["address_space"], cpu_seconds=config["cpu_seconds"])
        dense_session_cpu = float(config["session_cpu"]) if config.get("dense") else None
        zygote = Zygote(control, rlimits, broker_pid, dense_session_cpu)
        started_as = os.getpid()  # the pid the broker knows, even if the fork server becomes another
        run_as = config.get("run_as")
        # Everything is loaded and no child forked yet: with --user the interpreter may live where that
        # user cannot read, and no sandbox ever runs with the broker's privileges or outside the layers.
        layers = isolate(tuple(run_as) if run_as else None, broker_pid, config.get("isolation_off", ()))
        zygote.serve(started_as, layers)
    except BrokenPipeError:
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
