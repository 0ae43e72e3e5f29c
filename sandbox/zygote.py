"""The zygote: an exec'd fork server that starts sandbox workers on the broker's request.

It is exec'd before any listening socket exists (by the broker, or by the launcher once the broker has
dropped its privileges), imports lupa, msgpack and pyseccomp once, and then forks a worker per request:
measured on a 2-core VM, a fork from this warm process reaches "ready" in about 2-3 ms and 2 MiB of
private memory, against about 40 ms and 7 MiB for a fresh interpreter. It never sees untrusted data: it
only forks, hands the broker each worker's pipe ends and a pidfd over an anonymous SOCK_SEQPACKET
socketpair (SCM_RIGHTS), and reports how each worker exited. Its control messages are the ZYGOTE CONTROL
dialect of `deadend.wire`.

Before its first fork it confines itself once (sandbox/isolation.py), so every worker inherits that: in
its own PID namespace the fork server is the namespace's init, a child of the process the broker started,
and the pids it reports are its namespace's numbers (the pidfds it hands over are what the broker acts on).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import sys
import time
from typing import Any, NoReturn

import msgpack

from deadend import wire
from sandbox import prefork
from sandbox.isolation import die_with_broker, isolate
from sandbox.lockdown import Rlimits, compile_filter

MAX_CONTROL = 4096


class Zygote:
    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.filter = compile_filter()  # compiled once; each worker loads its inherited copy
        self.devnull = os.open(os.devnull, os.O_RDWR)
        self.workers: set[int] = set()

    def send(self, msg: list[Any], fds: list[int] | None = None) -> None:
        data = msgpack.packb(msg)
        if fds:
            socket.send_fds(self.control, [data], fds)
        else:
            self.control.send(data)

    def fork_worker(self, request: wire.ForkRequest) -> None:
        try:
            to_worker_r, to_worker_w = os.pipe()
        except OSError as e:
            self.send(["fork-failed", e.errno or 0])
            return
        try:
            from_worker_r, from_worker_w = os.pipe()
        except OSError as e:
            os.close(to_worker_r)
            os.close(to_worker_w)
            self.send(["fork-failed", e.errno or 0])
            return
        zygote_pid = os.getpid()
        try:
            pid = prefork.fork()
        except OSError as e:  # out of processes (pids cgroup, RLIMIT_NPROC) or memory: say so, live on
            for fd in (to_worker_r, to_worker_w, from_worker_r, from_worker_w):
                os.close(fd)
            self.send(["fork-failed", e.errno or 0])
            return
        if pid == 0:
            self._become_worker(request, to_worker_r, from_worker_w, zygote_pid)
        self.workers.add(pid)
        os.close(to_worker_r)
        os.close(from_worker_w)
        pidfd = os.pidfd_open(pid)  # cannot be a reused pid: only we reap, and we have not yet
        try:
            self.send(["child", pid], [to_worker_w, from_worker_r, pidfd])
        finally:
            for fd in (to_worker_w, from_worker_r, pidfd):
                os.close(fd)

    def _become_worker(self, request: wire.ForkRequest, stdin: int, stdout: int, zygote_pid: int) -> NoReturn:
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})  # blocked across the fork
            os.dup2(stdin, 0)
            os.dup2(stdout, 1)
            os.dup2(self.devnull, 2)  # a worker's stderr never reaches anyone's terminal
            from sandbox import worker  # imported by main() already: this is a lookup, not a load

            rlimits = Rlimits(address_space=request.address_space, cpu_seconds=request.cpu_seconds)
            if request.dense_session_cpu is None:
                worker.serve(rlimits, zygote_pid, self.filter)
            else:
                worker.serve_dense(rlimits, zygote_pid, self.filter, request.dense_session_cpu)
        finally:
            os._exit(1)

    def reap(self) -> None:
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.workers.discard(pid)
            self.send(["exit", pid, status])

    def kill_all(self) -> None:
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # safe: unreaped workers keep their pids

    def serve(self, pid: int, layers: list[wire.Layer]) -> None:
        """Fork on request until the broker closes its end. `pid`: the one the broker started (the fork
        server may be another process, the PID namespace's init); `layers`: what isolation applied."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd does the work
        sel = selectors.DefaultSelector()
        sel.register(self.control, selectors.EVENT_READ, "control")
        sel.register(wake_r, selectors.EVENT_READ, "signal")
        prefork.prepare()  # warm, sealed and frozen: each fork then costs less (sandbox/prefork.py)
        self.send(["hello", pid, wire.layers_to_wire(layers)])
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
                    if msg[0] == "fork":
                        self.fork_worker(wire.ForkRequest.from_fields(msg[1]))
                    elif msg[0] == "kill" and msg[1] in self.workers:
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
    config = wire.ZygoteConfig.decode(sys.argv[1])
    _use_resolved_libraries(config.libraries)
    import array  # noqa: F401  (socket.send_fds imports it at first use; by then the root is empty)

    import sandbox.worker  # noqa: F401  (lupa, msgpack and pyseccomp, loaded once for every worker)

    try:
        die_with_broker(config.parent_pid)  # a SIGKILLed broker (or launcher) takes the zygote with it
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the broker's to handle
        os.environ.update(wire.ZYGOTE_ENV)  # the zone is fixed before lockdown (SPEC.md, clock option)
        time.tzset()
        control = socket.socket(fileno=config.control_fd)
        zygote = Zygote(control)
        started_as = os.getpid()  # the pid the broker knows, even if the fork server becomes another
        # Everything is loaded and no worker forked yet: with --user the interpreter may live where that
        # user cannot read, and no sandbox ever runs with the broker's privileges or outside the layers.
        layers = isolate(config.run_as, config.parent_pid, config.isolation_off)
        zygote.serve(started_as, layers)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the broker closed its end: it is done with us
    os._exit(0)


if __name__ == "__main__":
    main()
