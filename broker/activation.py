"""systemd socket activation: listening sockets passed in as fds 3.. (sd_listen_fds(3), without libsystemd).

With `deadend.socket` holding port 22, the broker serves it as an unprivileged user and never binds.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

from broker.net import BindAddress

LISTEN_FDS_START = 3
ACTIVATION_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(Exception):
    """Worded for one log line."""


def inherited_listeners(environ: MutableMapping[str, str] = os.environ) -> list[socket.socket]:
    """The listening TCP sockets systemd passed us (none if we were not socket-activated).

    The variables are removed so that nothing started later believes the fds are its own.
    """
    pid, count = environ.get("LISTEN_PID"), environ.get("LISTEN_FDS")
    for name in ACTIVATION_VARIABLES:
        environ.pop(name, None)
    if count is None or pid is None or pid != str(os.getpid()):
        return []
    if not count.isdigit() or not 0 < int(count) <= 1024:
        raise ActivationError(f"LISTEN_FDS={count!r} is not a usable socket count")
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise ActivationError(f"socket activation fd {fd} is not a socket: {e.strerror}") from e
        sockets.append(sock)
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise ActivationError(f"socket activation fd {fd} is not a TCP socket (use ListenStream=)")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ActivationError(f"socket activation fd {fd} is not listening")
        sock.set_inheritable(False)
        sock.setblocking(False)
    return sockets


def address_of(sock: socket.socket) -> BindAddress:
    host, port = sock.getsockname()[:2]
    return BindAddress(sock.family, host, port, optional=False)
