"""The connection gate: global and per-IP caps, applied at accept time before any sandbox is involved.

No peer honeypot caps concurrent connections per source address (research/peers.md); without it one
address can hold every worker. Refused connections cost one accept and one close, and are counted.
"""

from __future__ import annotations

import collections
import ipaddress
import resource
from dataclasses import dataclass, field
from typing import Final

from broker import monitor as m

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


@dataclass
class Gate:
    max_connections: int
    max_per_ip: int
    active: int = 0
    per_ip: dict[str, int] = field(default_factory=dict)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)

    def admit(self, ip: str | None) -> str | None:
        """Count a new connection in, or return the reason it is refused.

        `ip` None defers the per-IP cap to `admit_source` (the real peer comes in a PROXY header).
        """
        if self.active >= self.max_connections:
            reason = m.END_CONN_LIMIT
        elif ip is not None and self.per_ip.get(source_of(ip), 0) >= self.max_per_ip:
            reason = m.END_PER_IP_LIMIT
        else:
            self.active += 1
            if ip is not None:
                self._count_source(ip)
            return None
        self.refused[reason] += 1
        return reason

    def admit_source(self, ip: str) -> str | None:
        """The per-IP cap for a connection already admitted with `admit(None)`."""
        if self.per_ip.get(source_of(ip), 0) >= self.max_per_ip:
            self.refused[m.END_PER_IP_LIMIT] += 1
            return m.END_PER_IP_LIMIT
        self._count_source(ip)
        return None

    def _count_source(self, ip: str) -> None:
        source = source_of(ip)
        self.per_ip[source] = self.per_ip.get(source, 0) + 1

    def release(self, ip: str | None) -> None:
        """`ip` is what was counted: None for a connection whose source never was."""
        self.active -= 1
        if ip is None:
            return
        source = source_of(ip)
        left = self.per_ip[source] - 1
        if left:
            self.per_ip[source] = left
        else:
            del self.per_ip[source]  # the table never holds more sources than live connections


def source_of(ip: str) -> str:
    """What the per-IP cap counts: an IPv4 address, or an IPv6 /64 (one host usually owns a whole /64)."""
    if ":" not in ip:
        return ip
    return str(ipaddress.IPv6Network((ip, 64), strict=False).network_address)
