"""The launcher: the one process that may still start a zygote after the broker dropped its privileges.

A zygote is replaced when it dies and, for fresh address-space layouts, every so often. Starting one means
exec'ing the Python interpreter, which may live where the --user cannot read (a virtual environment
under /root), and switching it to that user before its first fork. So when the broker is going to drop
to --user, it first starts this launcher, which keeps root's uid and does nothing but start zygotes on
request: it never sees attacker data, it takes no argument from the broker but two descriptors (every
setting it uses, the user above all, it was given at its own start), it dies with the broker, and its
zygotes die with it. The LAUNCHER dialect of `deadend.wire` is all it speaks.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
from typing import Any, NoReturn

import msgpack

from deadend import wire
from sandbox.lockdown import PR_SET_PDEATHSIG, _prctl

MAX_CONTROL = 4096


class Launcher:
    def __init__(self, config: wire.ZygoteConfig, control: socket.socket) -> None:
        self.config = config
        self.control = control
        self.zygotes: dict[int, subprocess.Popen[bytes]] = {}

    def send(self, msg: list[Any]) -> None:
        self.control.send(msgpack.packb(msg))

    def spawn(self, fds: list[int]) -> None:
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            self.send(["spawn-failed", "expected two descriptors"])
            return
        control, stderr = fds
        config = wire.ZygoteConfig(
            parent_pid=os.getpid(),
            control_fd=control,
            libraries=self.config.libraries,
            run_as=self.config.run_as,  # ours, never the broker's
        )
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-m", wire.ZYGOTE_MODULE, config.encode()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                pass_fds=[control],
                start_new_session=True,
                close_fds=True,
                env=wire.ZYGOTE_ENV,
            )
        except OSError as e:
            self.send(["spawn-failed", f"cannot start the zygote: {e.strerror or e}"])
            return
        finally:
            os.close(control)
            os.close(stderr)
        self.zygotes[proc.pid] = proc
        self.send(["spawned", proc.pid])

    def reap(self) -> None:
        for pid, proc in list(self.zygotes.items()):
            status = proc.poll()
            if status is not None:
                del self.zygotes[pid]
                self.send(["exited", pid, status])

    def serve(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd does the work
        sel = selectors.DefaultSelector()
        sel.register(self.control, selectors.EVENT_READ, "control")
        sel.register(wake_r, selectors.EVENT_READ, "signal")
        self.send(["hello", os.getpid()])
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "signal":
                        os.read(wake_r, 4096)
                        continue
                    data, fds, _flags, _addr = socket.recv_fds(self.control, MAX_CONTROL, 2)
                    if not data:
                        return  # the broker is gone or shutting down
                    if msgpack.unpackb(data) == ["spawn"]:
                        self.spawn(fds)
                    else:
                        for fd in fds:
                            os.close(fd)
                self.reap()
        finally:
            for proc in self.zygotes.values():
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()  # its workers die with it (their parent-death signal)
            for proc in self.zygotes.values():
                proc.wait()


def main() -> NoReturn:
    config = wire.ZygoteConfig.decode(sys.argv[1])
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # a SIGKILLed broker takes the launcher with it
        if os.getppid() != config.parent_pid:
            os._exit(1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the broker's to handle
        Launcher(config, socket.socket(fileno=config.control_fd)).serve()
    except (BrokenPipeError, ConnectionResetError):
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
