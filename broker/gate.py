"""The connection gate: global and per-IP caps, applied at accept time before any sandbox is involved.

Comparable honeypots (Cowrie, OpenCanary, endlessh) do not cap concurrent connections per source address;
without it one address can hold every worker. Refused connections cost one accept and one close, and are
counted.
"""

from __future__ import annotations

import collections
import ipaddress
import resource
from dataclasses import dataclass, field
from typing import Final

from deadend.reasons import Reason

FDS_PER_SESSION: Final = 4  # client socket, two pipe ends, one pidfd
FDS_PER_WARM_CHILD: Final = 3
FDS_RESERVED: Final = 64  # listeners, zygote control, stdio, event loop, logs, headroom


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (the usual practice for servers); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connections_fd_allows(fd_limit: int, listeners: int, warm: int, sessions_per_child: int = 1) -> int:
    """How many concurrent connections the descriptor limit can carry, with room to spare.

    Dense mode: a session costs its client socket, plus its share of its child's three descriptors.
    """
    spare = fd_limit - FDS_RESERVED - listeners - warm * FDS_PER_WARM_CHILD
    if sessions_per_child == 1:
        return max(1, spare // FDS_PER_SESSION)
    per_child = sessions_per_child + FDS_PER_WARM_CHILD
    return max(1, spare // per_child * sessions_per_child + max(0, spare % per_child - FDS_PER_WARM_CHILD))


Counted = tuple[str, str]  # (scope, source): what one connection is counted as against the per-IP cap


@dataclass
class Gate:
    """--max-connections, and the per-IP cap: `--max-per-ip` for every address across the broker when
    given, else a quarter of what the connection's pool can hold, per pool (the caller names the scope)."""

    max_connections: int
    active: int = 0
    per_ip: dict[Counted, int] = field(default_factory=dict)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)

    def admit(self, ip: str | None, scope: str = "", cap: int = 0) -> tuple[Reason | None, Counted | None]:
        """Count a new connection in, or say why it is refused; also what was counted for the per-IP cap.

        `ip` None defers the per-IP cap to `admit_source` (the real peer comes in a PROXY header).
        """
        if self.active >= self.max_connections:
            self.refused[Reason.CONN_LIMIT] += 1
            return Reason.CONN_LIMIT, None
        counted = None
        if ip is not None:
            refused, counted = self.admit_source(ip, scope, cap)
            if refused is not None:
                return refused, None
        self.active += 1
        return None, counted

    def admit_source(self, ip: str, scope: str, cap: int) -> tuple[Reason | None, Counted | None]:
        """The per-IP cap alone (for a connection admitted with `admit(None)`)."""
        key = (scope, source_of(ip))
        if self.per_ip.get(key, 0) >= cap:
            self.refused[Reason.PER_IP_LIMIT] += 1
            return Reason.PER_IP_LIMIT, None
        self.per_ip[key] = self.per_ip.get(key, 0) + 1
        return None, key

    def release(self, counted: Counted | None) -> None:
        """`counted` is what `admit` counted: None for a connection whose source never was."""
        self.active -= 1
        if counted is None:
            return
        left = self.per_ip[counted] - 1
        if left:
            self.per_ip[counted] = left
        else:
            del self.per_ip[counted]  # the table never holds more sources than live connections


def source_of(ip: str) -> str:
    """What the per-IP cap counts: an IPv4 address, or an IPv6 /64 (one host usually owns a whole /64)."""
    if ":" not in ip:
        return ip
    return str(ipaddress.IPv6Network((ip, 64), strict=False).network_address)
