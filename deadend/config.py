"""The broker's configuration: built once from the command line and the config file, then read-only.

Every default comes from the option table (deadend/options.py); these dataclasses give the values types.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deadend.options import BY_NAME, OPTIONS, PER_PORT, Network, effective
from deadend.sinks.urls import SinkSpec


def _default(name: str) -> Any:
    return BY_NAME[name].default


CEILING_FIELDS = frozenset(o.field for o in OPTIONS if o.ceiling)


@dataclass(frozen=True, slots=True)
class Ceilings:
    """Limits the broker enforces whatever a script does. Each ends only the session that hits it."""

    memory: int = _default("memory")  # MiB of Lua heap per session (lupa max_memory)
    instructions: int = _default("instructions")  # VM instructions between two API calls (sticky hook)
    cpu_slice: float = _default("cpu-slice")  # wall seconds a worker may compute between two calls
    session_cpu: int = _default("session-cpu")  # CPU seconds per session (RLIMIT_CPU backstop: SIGXCPU)
    session_time: float = _default("session-time")  # wall seconds a session may last
    idle_timeout: float = _default("idle-timeout")  # seconds a recv may wait for a byte (0: no limit)
    linger: float = _default("linger")  # seconds a script may go on after its connection closed
    linger_calls: int = _default("linger-calls")  # send/recv calls allowed after its connection closed
    log_rate: float = _default("log-rate")  # script log lines per second (token bucket)
    log_burst: int = _default("log-burst")
    call_rate: float = _default("call-rate")  # API calls per second before replies are delayed
    tls_handshake_timeout: float = _default("tls-handshake-timeout")  # seconds a starttls may take

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Ceilings:
        """From a parser's values (the broker's, or a tool's ceiling flags)."""
        return cls(**{f: values[f] for f in CEILING_FIELDS})

    @property
    def call_burst(self) -> int:
        return max(1, int(self.call_rate * 2))

    @property
    def memory_bytes(self) -> int:
        return self.memory << 20

    @property
    def address_space(self) -> int:
        # The Lua heap plus room for the interpreter, lupa and its shared libraries (a warm worker maps
        # ~21 MiB) and transient frame buffers. It bounds what a compromised worker can map.
        return (self.memory + 96) << 20


@dataclass(frozen=True, slots=True)
class TlsSource:
    """One port's certificate: the operator's files, or what to generate (deadend/tlscert.py)."""

    cert: Path | None
    key: Path | None
    name: str | None  # None: this host's name
    key_type: str


@dataclass(frozen=True, slots=True)
class PortSettings:
    """What the config file sets for one script (`[port.22]`): the options marked per_port."""

    values: Mapping[str, Any] = field(default_factory=dict)  # option name -> value, only those set

    def ceilings(self, base: Ceilings) -> Ceilings:
        own = {BY_NAME[name].field: v for name, v in self.values.items() if BY_NAME[name].ceiling}
        return dataclasses.replace(base, **own) if own else base


@dataclass(frozen=True, slots=True)
class Config:
    scripts: Path
    host: tuple[str, ...] = ()  # empty: every IPv4 and IPv6 address
    port_offset: int = _default("port-offset")
    allow_clock: bool = _default("allow-clock")
    log_level: str = _default("log-level")
    log_format: str = _default("log-format")  # "json" or "ecs": one object per line (deadend/events.py)
    sensor: str | None = None  # None: the host name
    sink: tuple[SinkSpec, ...] = ()  # where events go besides stdout (docs/sinks.md)
    spool: Path | None = None  # each sink's on-disk spool lives below it
    spool_max_bytes: int = _default("spool-max-bytes")
    sink_queue: int = _default("sink-queue")
    nats_stream: str = _default("nats-stream")
    event_loop: str = _default("event-loop")  # or "uvloop" (an optional extra)
    workers: int = _default("workers")  # sandbox processes alive at once, all ports together
    sessions_per_worker: int = _default("sessions-per-worker")  # dense mode above 1 (SECURITY.md)
    warm: int = _default("warm")  # pre-forked, locked-down workers kept ready
    queue_size: int = _default("queue-size")  # connections waiting for a sandbox
    queue_timeout: float = _default("queue-timeout")  # seconds a connection may wait for one
    max_connections: int = _default("max-connections")  # accepted connections at once (queued ones too)
    max_per_ip: int | None = _default("max-per-ip")  # None: a quarter of its pool's capacity
    zygote_forks: int = _default("zygote-forks")
    brokers: int = _default("brokers")  # broker processes under one supervisor (broker/supervisor.py)
    call_rate_total: float = _default("call-rate-total")
    ceilings: Ceilings = field(default_factory=Ceilings)
    tls_cert: Path | None = None  # the operator's certificate chain; None: a generated one
    tls_key: Path | None = None
    tls_name: str | None = None  # the generated certificate's name; None: this host's name
    tls_key_type: str = _default("tls-key-type")
    record: Path | None = None  # folder for session recordings (docs/recording.md)
    record_max_bytes: int = _default("record-max-bytes")  # the folder on disk (st_blocks), old files too
    record_session_bytes: int = _default("record-session-bytes")  # one session's file as written
    record_max_files: int = _default("record-max-files")  # files in the folder, old ones too
    metrics: tuple[str, int] | None = None  # where to serve Prometheus text
    proxy_protocol: bool = _default("proxy-protocol")  # every connection starts with a PROXY header
    ignore: tuple[Network, ...] = ()  # the operator's own networks
    ignore_action: str = _default("ignore-action")  # "serve" (unlogged, unrecorded) or "refuse"
    user: str | None = None  # drop to this user after binding; workers run as it from the start
    allow_root: bool = _default("allow-root")  # let sandbox workers run as root (not recommended)
    ports: Mapping[int, PortSettings] = field(default_factory=dict)  # per script port, from the file
    shutdown_grace: float = 1.0  # seconds scripts get to finish after recv/send start failing

    @classmethod
    def from_values(cls, values: Mapping[str, Any], ports: Mapping[int, Mapping[str, Any]]) -> Config:
        """From option fields to values (the parser's namespace), and each port's own settings."""
        own = {o.field: values[o.field] for o in OPTIONS if not o.ceiling}
        for name in ("host", "ignore", "sink"):
            own[name] = tuple(own[name])
        for value in ports.values():
            if set(value) - set(PER_PORT):  # the config file checks its keys; this guards other callers
                raise ValueError(f"not settable per port: {sorted(set(value) - set(PER_PORT))}")
        return cls(
            **own,
            ceilings=Ceilings.from_values(values),
            ports={p: PortSettings(dict(v)) for p, v in ports.items()},
        )

    def ceilings_for(self, port: int) -> Ceilings:
        settings = self.ports.get(port)
        return self.ceilings if settings is None else settings.ceilings(self.ceilings)

    def sessions_per_worker_for(self, port: int) -> int:
        settings = self.ports.get(port)
        value = None if settings is None else settings.values.get("sessions-per-worker")
        return self.sessions_per_worker if value is None else int(value)

    def tls_for(self, port: int) -> TlsSource:
        """Where the port's certificate comes from. A port whose table in the config file names a
        certificate or a name of its own (tls-cert, tls-key, tls-name) uses those alone: a global
        --tls-cert does not leak into a port that asked for a generated certificate, nor the reverse."""
        settings = self.ports.get(port)
        own = {} if settings is None else settings.values
        key_type = own.get("tls-key-type", self.tls_key_type)
        if own.keys() & {"tls-cert", "tls-key", "tls-name"}:
            return TlsSource(own.get("tls-cert"), own.get("tls-key"), own.get("tls-name"), key_type)
        return TlsSource(self.tls_cert, self.tls_key, self.tls_name, key_type)

    def workers_cap(self, port: int) -> int | None:
        """The port's own cap on workers (config file), or None."""
        settings = self.ports.get(port)
        value = None if settings is None else settings.values.get("workers")
        return None if value is None else int(value)

    def share(self, index: int, count: int) -> Config:
        """What broker `index` of `count` (--brokers) runs with: the global caps divided, the remainder to
        the first brokers; a spool folder of its own; no metrics endpoint (the supervisor serves their
        sum). --max-per-ip stays whole: each client address always reaches the same broker."""

        def part(total: int) -> int:
            return total // count + (1 if index < total % count else 0)

        ports = {
            port: PortSettings({**s.values, "workers": max(1, part(int(s.values["workers"])))})
            if "workers" in s.values
            else s
            for port, s in self.ports.items()
        }
        return dataclasses.replace(
            self,
            workers=part(self.workers),
            warm=part(self.warm),
            queue_size=part(self.queue_size),
            max_connections=part(self.max_connections),
            call_rate_total=self.call_rate_total / count,
            record_max_bytes=part(self.record_max_bytes),
            record_max_files=max(1, part(self.record_max_files)),
            spool=None if self.spool is None else self.spool / f"broker-{index}",
            spool_max_bytes=part(self.spool_max_bytes),
            metrics=None,
            ports=ports,
        )

    def effective(self) -> str:
        """The effective configuration, one line (logged at start-up and on every reload)."""
        values: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values.update({f: getattr(self.ceilings, f) for f in CEILING_FIELDS})
        return effective(values, {port: s.values for port, s in self.ports.items()})
