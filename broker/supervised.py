"""The broker's side of --brokers: its place under the supervisor (broker/supervisor.py), the listening
sockets it is handed, and the supervisor's requests it answers. The SUPERVISOR dialect of deadend/wire.py.

A supervised broker is an ordinary broker with a share of the caps (Config.share): it binds no port (its
sockets come from the supervisor, as systemd's would), serves no metrics endpoint (the supervisor serves
the sum) and dies with the supervisor (a parent-death signal, and the end of its control socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import msgpack

from deadend import wire

PR_SET_PDEATHSIG = 1
START_TIMEOUT = 10.0  # seconds to receive the first listeners
MAX_MESSAGE = 4096


class SupervisorGone(Exception):
    """The supervisor is gone, or said something no broker expects: this broker stops."""


class SupervisorLink:
    def __init__(self, place: wire.Supervised) -> None:
        self.place = place
        self.control = socket.socket(fileno=place.control_fd)
        self.control.set_inheritable(False)  # nothing the broker starts may speak for it
        self._reading = False

    def die_with_supervisor(self) -> None:
        """SIGTERM (an orderly shutdown) when the supervisor dies, however it dies."""
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != self.place.supervisor_pid:  # it died before the signal was armed
            raise SupervisorGone("the supervisor exited during start-up")

    def _receive(self) -> tuple[Any, list[int]]:
        data, fds, flags, _addr = socket.recv_fds(self.control, MAX_MESSAGE, wire.SUPERVISOR_FDS_MAX)
        if not data:
            for fd in fds:
                os.close(fd)
            raise SupervisorGone("the supervisor closed its end")
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise SupervisorGone("no descriptor free to receive the listening sockets")
        return msgpack.unpackb(data), fds

    def initial_listeners(self) -> list[socket.socket]:
        """The sockets to serve at start-up: read before anything else, blocking."""
        self.control.settimeout(START_TIMEOUT)
        socks: list[socket.socket] = []
        try:
            while True:
                msg, fds = self._receive()
                socks += _sockets(fds)
                if not (isinstance(msg, list) and msg[:1] == ["listeners"]):
                    raise SupervisorGone(f"unexpected first message {str(msg)[:40]!r}")
                if not msg[1]:
                    return socks
        except (OSError, SupervisorGone):
            for sock in socks:
                sock.close()
            raise
        finally:
            self.control.setblocking(False)

    def serve(
        self,
        on_listeners: Callable[[list[socket.socket]], None],
        on_reload: Callable[[], None],
        exposition: Callable[[], bytes],
        on_gone: Callable[[], None],
    ) -> None:
        """Answer the supervisor on the running loop from now on."""
        loop = asyncio.get_running_loop()

        def readable() -> None:
            while True:
                try:
                    msg, fds = self._receive()
                except BlockingIOError:
                    return
                except (OSError, SupervisorGone, ValueError):
                    self._stop_reading()
                    on_gone()
                    return
                kind = msg[0] if isinstance(msg, list) and msg else None
                if kind == "listeners":
                    on_listeners(_sockets(fds))
                    continue
                for fd in fds:
                    os.close(fd)
                if kind == "reload":
                    on_reload()
                elif kind == "metrics" and len(msg) == 2:
                    self._send_metrics(msg[1], exposition)

        loop.add_reader(self.control.fileno(), readable)
        self._reading = True

    def _send_metrics(self, number: Any, exposition: Callable[[], bytes]) -> None:
        try:
            text = exposition()
        except Exception:  # a collector's bug costs this scrape
            text = b""
        chunks = [text[i : i + wire.SUPERVISOR_CHUNK] for i in range(0, len(text), wire.SUPERVISOR_CHUNK)]
        chunks = chunks or [b""]
        self.control.setblocking(True)  # a few small datagrams; the supervisor reads them at once
        try:
            for i, chunk in enumerate(chunks):
                self.control.send(wire.pack(["metrics", number, chunk, i + 1 < len(chunks)]))
        except OSError:
            pass  # the supervisor is gone: the reader learns it next
        finally:
            self.control.setblocking(False)

    def ready(self) -> None:
        with contextlib.suppress(OSError):
            self.control.send(wire.pack(["ready"]))

    def _stop_reading(self) -> None:
        if self._reading:
            asyncio.get_running_loop().remove_reader(self.control.fileno())
            self._reading = False

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop: nothing registered
            self._stop_reading()
        self.control.close()


def _sockets(fds: list[int]) -> list[socket.socket]:
    socks = []
    for fd in fds:
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        sock.setblocking(False)
        socks.append(sock)
    return socks
