"""The broker's configuration: built once from the command line, then read-only."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Ceilings:
    """Limits the broker enforces whatever a script does. Each ends only the session that hits it."""

    memory_mib: int = 32  # Lua heap per session (lupa max_memory)
    instructions: int = 50_000_000  # VM instructions between two API calls (sticky count hook)
    cpu_slice: float = 3.0  # wall seconds a child may compute between two API calls, then SIGKILL
    session_cpu: int = 30  # CPU seconds per session (RLIMIT_CPU backstop: SIGXCPU)
    session_time: float = 3600.0  # wall seconds a session may last
    linger: float = 10.0  # seconds a script may keep running after its connection closed
    linger_calls: int = 100  # send/recv calls a script may make after its connection closed
    log_rate: float = 20.0  # script log lines per second (token bucket), excess dropped and counted
    log_burst: int = 100
    call_rate: float = 1000.0  # API calls per second before replies are delayed (broker CPU is shared)
    call_burst: int = 2000

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib << 20

    @property
    def address_space(self) -> int:
        # The Lua heap plus room for the interpreter, lupa and its shared libraries (a warm child maps
        # ~21 MiB) and transient frame buffers. It bounds what a compromised child can map.
        return (self.memory_mib + 96) << 20


@dataclass(frozen=True, slots=True)
class Config:
    scripts: Path
    hosts: tuple[str, ...] = ()  # empty: every IPv4 and IPv6 address
    port_offset: int = 0
    workers: int = 64  # sandbox processes alive at once
    sessions_per_worker: int = 1  # dense mode above 1: sessions sharing one sandbox child (SECURITY.md)
    warm: int = 4  # pre-forked, locked-down children kept ready
    queue_size: int = 128  # connections waiting for a sandbox
    queue_timeout: float = 2.0  # seconds a connection may wait for one
    max_connections: int = 4096  # accepted connections at once (queued ones included)
    max_per_ip: int = 32  # accepted connections at once from one address
    allow_clock: bool = False
    log_level: str = "info"
    log_format: str = "text"  # or "json": one object per line (deadend/events.py)
    event_loop: str = "asyncio"  # or "uvloop" (an optional extra)
    shutdown_grace: float = 1.0  # seconds scripts get to finish after recv/send start failing
    ceilings: Ceilings = field(default_factory=Ceilings)
    # operations
    record: Path | None = None  # folder for session recordings (docs/recording.md)
    record_max_bytes: int = 1 << 30  # all recordings in the folder together, old ones included
    record_session_bytes: int = 1 << 20  # payload recorded per session
    metrics: tuple[str, int] | None = None  # where to serve Prometheus text
    proxy_protocol: bool = False  # every connection starts with a PROXY v1/v2 header
    ignore: tuple[Network, ...] = ()  # the operator's own networks
    ignore_action: str = "serve"  # "serve" (unlogged, unrecorded) or "refuse"
    user: str | None = None  # drop to this user after binding; children run as it from the start
    allow_root: bool = False  # let sandbox children run as root (not recommended)
