"""A zygote whose workers are an attacker's programs: the hands of the compromised-worker tests.

It speaks the real ZYGOTE CONTROL dialect (deadend/wire.py) to the real broker, which starts it as it would
start sandbox/zygote.py (`DirectSpawner(program=...)`). For each fork request it starts PLAIN (a worker
for one session) or DENSE (`--sessions-per-worker`) with the worker's pipes on fd 0 and 1, hands the
broker the pipe ends and a pidfd, and reports each exit, as the real zygote does. Nothing is locked down:
these programs stand for sandboxes in which a script already runs native code.

    python fake_zygote.py PLAIN DENSE ZYGOTE_CONFIG_JSON
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import signal
import socket
import sys
from pathlib import Path

import msgpack


def main() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the broker (the test)
    plain, dense, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    control = socket.socket(fileno=config["control_fd"])
    workers: set[int] = set()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)

    def send(msg: list[object], fds: list[int] | None = None) -> None:
        data = msgpack.packb(msg)
        if fds:
            socket.send_fds(control, [data], fds)
        else:
            control.send(data)

    def fork(request: dict[str, object]) -> None:
        program = plain if request["dense_session_cpu"] is None else dense
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        pid = os.posix_spawn(
            sys.executable,
            [sys.executable, program],
            {"PYTHONPATH": str(Path(__file__).resolve().parents[2])},  # the repository: tests.fakes.*
            file_actions=[
                (os.POSIX_SPAWN_DUP2, to_r, 0),
                (os.POSIX_SPAWN_DUP2, from_w, 1),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            ],
        )
        workers.add(pid)
        os.close(to_r)
        os.close(from_w)
        pidfd = os.pidfd_open(pid)
        send(["child", pid], [to_w, from_r, pidfd])
        for fd in (to_w, from_r, pidfd):
            os.close(fd)

    def reap() -> None:
        while workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            workers.discard(pid)
            send(["exit", pid, status])

    sel = selectors.DefaultSelector()
    sel.register(control, selectors.EVENT_READ, "control")
    sel.register(wake_r, selectors.EVENT_READ, "signal")
    send(["hello", os.getpid(), []])
    try:
        while True:
            for key, _ in sel.select():
                if key.data == "signal":
                    os.read(wake_r, 4096)
                else:
                    data = control.recv(4096)
                    if not data:
                        return
                    msg = msgpack.unpackb(data)
                    if msg[0] == "fork":
                        fork(msg[1])
                    elif msg[0] == "kill" and msg[1] in workers:
                        os.kill(msg[1], signal.SIGKILL)
            reap()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
