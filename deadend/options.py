"""Every broker option, once: name, type, default, range, help (nsjail's one schema for every option).

From this table come the command-line parser (deadend/cli.py), the config file's keys (deadend/configfile
.py), the README's option table (a test keeps it equal to `readme_table()`), the Config it builds
(deadend/config.py), and the effective configuration the broker logs at start-up and on every reload.
An option marked `per_port` may also be set for one script in the config file (`[port.22]`).
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from deadend.logs import FORMATTERS
from deadend.scripts import PORT_MAX
from deadend.sinks.urls import parse_sink_url
from deadend.tlscert import KEY_TYPES
from deadend.wire import LOG_LEVELS

LOG_FORMATS: Final = tuple(FORMATTERS)
EVENT_LOOPS: Final = ("asyncio", "uvloop")
IGNORE_ACTIONS: Final = ("serve", "refuse")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP network (e.g. 10.0.0.0/8, 2001:db8::/32)") from None


SENSOR_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def parse_sensor(text: str) -> str:
    # It becomes syslog's HOSTNAME and a header in NATS and hpfeeds: a host-name-like token.
    if not SENSOR_NAME.fullmatch(text):
        raise ValueError(
            f"{text!r} is not a sensor name (1 to 63 of A-Z a-z 0-9 . _ -, a letter or digit first)"
        )
    return text


def default_sensor() -> str:
    """The host name, as a sensor name (what --sensor would not take is left out)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "", socket.gethostname()).lstrip("._-")[:63]
    return name or "deadend"


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= PORT_MAX:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9464, [::1]:9464)")
    return host, int(port)


BROKERS_MAX: Final = 1024


def parse_brokers(text: str) -> int:
    """--brokers: a count, or `auto` for one broker per core."""
    if text == "auto":
        return max(1, min(BROKERS_MAX, os.cpu_count() or 1))
    if not text.isdigit() or not 1 <= int(text) <= BROKERS_MAX:
        raise ValueError(f"{text!r} is not a number of brokers (1..{BROKERS_MAX}) or auto")
    return int(text)


@dataclass(frozen=True, slots=True)
class Option:
    """One broker option. `field` is the Config (or Ceilings) attribute it sets."""

    name: str  # the flag without "--", and the config file's key
    kind: str  # int | float | bool | path | str | choice | network | hostport | sensor | sink | brokers
    default: Any  # None: unset (the option is off, or computed: see `help`)
    help: str
    group: str
    metavar: str = ""
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    repeatable: bool = False
    per_port: bool = False  # may be set for one script in the config file's [port.N] tables
    ceiling: bool = False  # a field of Ceilings (per session), not of Config
    readme_default: str = ""  # how the README shows the default, when the value alone would not say

    @property
    def field(self) -> str:
        return self.name.replace("-", "_")

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    def parse(self, text: str) -> Any:
        """One value from text (a flag's argument, or a config file's string); ValueError says why not."""
        if self.kind in ("int", "float"):
            try:
                value: float = int(text) if self.kind == "int" else float(text)
            except ValueError:
                raise ValueError(
                    f"{text!r} is not a valid {'integer' if self.kind == 'int' else 'number'}"
                ) from None
            if (
                not math.isfinite(value)
                or (self.lo is not None and value < self.lo)
                or (self.hi is not None and value > self.hi)
            ):
                bounds = f"{self.lo:g}..{self.hi:g}" if self.hi is not None else f">= {self.lo:g}"
                raise ValueError(f"{text!r} is out of range ({bounds})")
            return value
        if self.kind == "path":
            return Path(text)
        if self.kind == "choice":
            if text not in self.choices:
                raise ValueError(f"{text!r} is not one of {', '.join(self.choices)}")
            return text
        if self.kind == "network":
            return parse_network(text)
        if self.kind == "hostport":
            return parse_host_port(text)
        if self.kind == "sensor":
            return parse_sensor(text)
        if self.kind == "sink":
            return parse_sink_url(text)
        if self.kind == "brokers":
            return parse_brokers(text)
        return text

    def shown_default(self) -> str:
        if self.readme_default:
            return self.readme_default
        if self.default is None:
            return "—"
        if self.kind == "bool":
            return "on" if self.default else "off"
        if isinstance(self.default, int) and not isinstance(self.default, bool):
            return f"{self.default:,}"
        if isinstance(self.default, float):
            return f"{self.default:g}"
        return str(self.default)


def _opt(name: str, kind: str, default: Any, metavar: str, help: str, **more: Any) -> Option:
    return Option(name, kind, default, help, more.pop("group"), metavar, **more)


WHAT = "what to serve"
LOGS = "logs"
POOL = "pool, queue and connection caps"
CEILINGS = "ceilings (per session; each ends only the session that hits it)"
TLS = "TLS (deadend.starttls)"
OPS = "recording, metrics, proxies, privileges"
SINKS = "event sinks"

OPTIONS: Final[tuple[Option, ...]] = (
    # --- what to serve
    _opt(
        "scripts",
        "path",
        None,
        "DIR",
        "folder of `<port>.lua` files (required)",
        group=WHAT,
        readme_default="(required)",
    ),
    _opt(
        "host",
        "str",
        (),
        "ADDR",
        "address to listen on; repeat for several",
        group=WHAT,
        repeatable=True,
        readme_default="every IPv4 and IPv6 address",
    ),
    _opt(
        "port-offset",
        "int",
        0,
        "N",
        "serve `<port>.lua` on `port + N`; a result outside 1..65535 is an error at start-up",
        group=WHAT,
        lo=-PORT_MAX,
        hi=PORT_MAX,
    ),
    _opt(
        "allow-clock",
        "bool",
        False,
        "",
        "give scripts a read-only `os` with `time`, `date`, `clock`, `difftime` (UTC)",
        group=WHAT,
    ),
    # --- logs
    _opt(
        "log-level",
        "choice",
        "info",
        "L",
        "`debug`, `info`, `warn` or `error`",
        group=LOGS,
        choices=LOG_LEVELS,
    ),
    _opt(
        "log-format",
        "choice",
        "text",
        "F",
        "`text`, `json` (an object per line) or `ecs` (Elastic Common Schema): "
        "[docs/events.md](docs/events.md)",
        group=LOGS,
        choices=LOG_FORMATS,
    ),
    _opt(
        "sensor",
        "sensor",
        None,
        "NAME",
        "this sensor's name on every event (fleets tell their sensors apart by it)",
        group=LOGS,
        readme_default="the host name",
    ),
    _opt(
        "sink",
        "sink",
        (),
        "URL",
        "deliver every event there too (repeatable): `syslog+tcp://`, `syslog+tls://`, `nats://`, "
        "`hpfeeds://`, `file://` ([docs/sinks.md](docs/sinks.md))",
        group=SINKS,
        repeatable=True,
    ),
    _opt(
        "spool",
        "path",
        None,
        "DIR",
        "keep each sink's undelivered events on disk there: they survive an outage and a restart",
        group=SINKS,
        readme_default="off (memory only)",
    ),
    _opt(
        "spool-max-bytes",
        "int",
        1 << 30,
        "N",
        "cap on each sink's spool; past it the oldest events are dropped and counted",
        group=SINKS,
        lo=256 << 10,
        hi=2**62,
        readme_default="1 GiB",
    ),
    _opt(
        "sink-queue",
        "int",
        10_000,
        "N",
        "events each sink holds in memory (with a spool: before writing them to it)",
        group=SINKS,
        lo=1,
        hi=10**7,
    ),
    _opt(
        "nats-stream",
        "str",
        "DEADEND",
        "NAME",
        "the JetStream stream `nats://` sinks publish to, created for their subject if missing",
        group=SINKS,
    ),
    _opt(
        "event-loop",
        "choice",
        "asyncio",
        "L",
        "`asyncio`, or `uvloop` (an optional extra, see Set up)",
        group=LOGS,
        choices=EVENT_LOOPS,
    ),
    # --- pool, queue and connection caps
    _opt(
        "workers",
        "int",
        64,
        "N",
        "sandbox processes alive at once, all ports together (one per "
        "connection, or K per process in dense mode); ports share them fairly (below); per port in the "
        "config file: a cap for that port",
        group=POOL,
        lo=1,
        hi=100_000,
        per_port=True,
    ),
    _opt(
        "sessions-per-worker",
        "int",
        1,
        "K",
        "dense mode above 1: up to K sessions share one sandbox process, each in its own Lua state (below)",
        group=POOL,
        lo=1,
        hi=100_000,
        per_port=True,
    ),
    _opt("warm", "int", 4, "N", "pre-forked, locked-down sandboxes kept ready", group=POOL, lo=0, hi=10_000),
    _opt(
        "queue-size",
        "int",
        128,
        "N",
        "connections that may wait for a sandbox beyond `--workers`...",
        group=POOL,
        lo=0,
        hi=1_000_000,
    ),
    _opt(
        "queue-timeout",
        "float",
        2.0,
        "S",
        "...for this many seconds; then they are closed",
        group=POOL,
        lo=0,
        hi=3600,
    ),
    _opt(
        "max-connections",
        "int",
        4096,
        "N",
        "connections at once (also capped by the descriptor limit); "
        "more are refused at accept, without a sandbox",
        group=POOL,
        lo=1,
        hi=10**7,
    ),
    _opt(
        "max-per-ip",
        "int",
        None,
        "N",
        "connections at once from one address (IPv4, or IPv6 /64); more "
        "are refused at accept. Unset: a quarter of what its port's pool can hold",
        group=POOL,
        lo=1,
        hi=10**7,
        readme_default="¼ of the pool",
    ),
    _opt(
        "brokers",
        "brokers",
        1,
        "N",
        "broker processes sharing the ports, each with its own sandboxes, under one supervisor (`auto`: "
        "one per core). Each client address (IPv4, or IPv6 /64) always reaches the same broker, so "
        "--max-per-ip holds whole; --workers, --warm, --queue-size, --max-connections, --call-rate-total, "
        "the recording and spool caps and each port's own workers are divided between the brokers "
        "(the remainder to the first)",
        group=POOL,
    ),
    _opt(
        "zygote-forks",
        "int",
        1000,
        "N",
        "sandboxes forked from one zygote before a freshly started one "
        "(a fresh address-space layout) replaces it; it is also replaced every 10 minutes",
        group=POOL,
        lo=1,
        hi=10**9,
    ),
    # --- ceilings
    _opt(
        "memory",
        "int",
        32,
        "MiB",
        "Lua heap per session",
        group=CEILINGS,
        lo=1,
        hi=4096,
        per_port=True,
        ceiling=True,
    ),
    _opt(
        "instructions",
        "int",
        50_000_000,
        "N",
        "Lua instructions between two API calls",
        group=CEILINGS,
        lo=1000,
        hi=10**12,
        per_port=True,
        ceiling=True,
    ),
    _opt(
        "cpu-slice",
        "float",
        3.0,
        "S",
        "wall seconds a script may compute between two API calls; then SIGKILL",
        group=CEILINGS,
        lo=0.01,
        hi=3600,
        per_port=True,
        ceiling=True,
    ),
    _opt(
        "session-cpu",
        "int",
        30,
        "S",
        "CPU seconds per session (`RLIMIT_CPU`, SIGXCPU)",
        group=CEILINGS,
        lo=1,
        hi=86400,
        ceiling=True,
    ),
    _opt(
        "session-time",
        "float",
        3600.0,
        "S",
        "wall seconds per session",
        group=CEILINGS,
        lo=0.1,
        hi=30 * 86400,
        per_port=True,
        ceiling=True,
    ),
    _opt(
        "idle-timeout",
        "float",
        120.0,
        "S",
        "a `recv` that gets no byte, or a `send` whose bytes the client does not take, for this long ends "
        "the session `idle` (a tarpit's trickle to a reading client is unaffected); 0: no limit",
        group=CEILINGS,
        lo=0,
        hi=30 * 86400,
        per_port=True,
        ceiling=True,
    ),
    _opt(
        "linger",
        "float",
        10.0,
        "S",
        "how long a script may go on after its connection closed or its peer left (FIN or RST)...",
        group=CEILINGS,
        lo=0,
        hi=3600,
        per_port=True,
        ceiling=True,
    ),
    _opt(
        "linger-calls",
        "int",
        100,
        "N",
        "...and how many `send`/`recv` calls it may make meanwhile",
        group=CEILINGS,
        lo=0,
        hi=10**6,
        per_port=True,
        ceiling=True,
    ),
    _opt(
        "log-rate",
        "float",
        20.0,
        "N",
        "script log lines per second...",
        group=CEILINGS,
        lo=0.01,
        hi=10**6,
        per_port=True,
        ceiling=True,
    ),
    _opt(
        "log-burst",
        "int",
        100,
        "N",
        "...and in a burst; the excess is dropped and counted",
        group=CEILINGS,
        lo=1,
        hi=10**6,
        per_port=True,
        ceiling=True,
    ),
    _opt(
        "call-rate",
        "float",
        1000.0,
        "N",
        "API calls per second per session before replies are delayed "
        "(a spinning script costs the broker little)",
        group=CEILINGS,
        lo=1,
        hi=10**7,
        per_port=True,
        ceiling=True,
    ),
    _opt(
        "call-rate-total",
        "float",
        4000.0,
        "N",
        "API calls per second of all sessions together, shared "
        "fairly between those that spin: the broker's own CPU stays bounded",
        group=POOL,
        lo=1,
        hi=10**8,
    ),
    _opt(
        "tls-handshake-timeout",
        "float",
        10.0,
        "S",
        "seconds a `deadend.starttls()` may take, from the first byte of the ClientHello awaited to the "
        "end of the handshake; then it returns nil and the connection closes",
        group=CEILINGS,
        lo=0.1,
        hi=3600,
        per_port=True,
        ceiling=True,
    ),
    # --- TLS
    _opt(
        "tls-cert",
        "path",
        None,
        "FILE",
        "the certificate chain (PEM) `deadend.starttls()` presents, with `--tls-key`; read at start-up. "
        "Unset: one generated at start-up for `--tls-name` ([docs/tls.md](docs/tls.md))",
        group=TLS,
        per_port=True,
        readme_default="generated",
    ),
    _opt(
        "tls-key",
        "path",
        None,
        "FILE",
        "its private key (PEM, not encrypted), read before the broker drops its privileges",
        group=TLS,
        per_port=True,
    ),
    _opt(
        "tls-name",
        "str",
        None,
        "NAME",
        "the DNS name (or IP address) the generated certificate is for, with an organisation, a place and "
        "a validity period such as a real server's has",
        group=TLS,
        per_port=True,
        readme_default="this host's name",
    ),
    _opt(
        "tls-key-type",
        "choice",
        "rsa",
        "T",
        "`rsa` (2048 bits: every client and scanner can use it) or `ecdsa` (P-256) for the generated "
        "certificate",
        group=TLS,
        choices=KEY_TYPES,
        per_port=True,
    ),
    # --- recording, metrics, proxies, privileges
    _opt(
        "record",
        "path",
        None,
        "DIR",
        "record every session's bytes, one file each ([docs/recording.md](docs/recording.md))",
        group=OPS,
        readme_default="off",
    ),
    _opt(
        "record-max-bytes",
        "int",
        1 << 30,
        "N",
        "cap on the recordings folder's size on disk (old files included)",
        group=OPS,
        lo=0,
        hi=2**62,
        readme_default="1 GiB",
    ),
    _opt(
        "record-session-bytes",
        "int",
        1 << 20,
        "N",
        "cap on one session's recording file as written",
        group=OPS,
        lo=0,
        hi=2**62,
        readme_default="1 MiB",
    ),
    _opt(
        "record-max-files",
        "int",
        100_000,
        "N",
        "cap on the number of files in the recordings folder (old ones included)",
        group=OPS,
        lo=1,
        hi=10**9,
    ),
    _opt(
        "metrics",
        "hostport",
        None,
        "HOST:PORT",
        "Prometheus text at `http://HOST:PORT/metrics`",
        group=OPS,
        readme_default="off",
    ),
    _opt(
        "proxy-protocol",
        "bool",
        False,
        "",
        "every connection starts with a PROXY v1 or v2 header; the peer is the one it names",
        group=OPS,
    ),
    _opt(
        "ignore",
        "network",
        (),
        "CIDR",
        "your own networks (repeatable): their connections are not logged or recorded",
        group=OPS,
        repeatable=True,
    ),
    _opt(
        "ignore-action",
        "choice",
        "serve",
        "A",
        "`serve` ignored peers quietly, or `refuse` them",
        group=OPS,
        choices=IGNORE_ACTIONS,
    ),
    _opt(
        "user",
        "str",
        None,
        "NAME",
        "sandboxes run as NAME; the broker drops to it once its ports are bound",
        group=OPS,
    ),
    _opt(
        "allow-root",
        "bool",
        False,
        "",
        "let sandboxes run as root (without it, root needs `--user`)",
        group=OPS,
    ),
)
BY_NAME: Final = {option.name: option for option in OPTIONS}
PER_PORT: Final = {option.name: option for option in OPTIONS if option.per_port}


def add_to_parser(parser: argparse.ArgumentParser, options: Iterable[Option] = OPTIONS) -> None:
    """Every option as a flag, grouped; defaults are the table's (a config file may replace them)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in options:
        group = groups.get(option.group)
        if group is None:
            group = groups[option.group] = parser.add_argument_group(option.group)
        add_one(group, option)


def add_one(group: argparse._ActionsContainer, option: Option) -> None:
    def parse(text: str) -> Any:
        try:
            return option.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = option.kind  # argparse names the type in its errors
    shown = "" if option.default is None else f" (default {option.shown_default()})"
    help_text = _MARKDOWN_LINK.sub(r"\1", option.help).replace("`", "").replace("%", "%%") + shown
    if option.kind == "bool":
        group.add_argument(
            option.flag, dest=option.field, action="store_true", default=option.default, help=help_text
        )
    elif option.repeatable:
        group.add_argument(
            option.flag,
            dest=option.field,
            action=Repeatable,
            type=parse,
            default=[],
            metavar=option.metavar,
            help=help_text,
        )
    else:
        group.add_argument(
            option.flag,
            dest=option.field,
            type=parse,
            default=option.default,
            metavar=option.metavar,
            help=help_text,
        )


_MARKDOWN_LINK = re.compile(r"\(?\[([^]]*)\]\([^)]*\)\)?")


class Repeatable(argparse.Action):
    """Like action="append", except that the command line replaces a list from the config file."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest)
        items = [] if current is self.default else list(current)
        setattr(namespace, self.dest, [*items, values])


def readme_table() -> str:
    """The README's option table, generated: a test keeps the README equal to it."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for option in OPTIONS:
        flag = f"`{option.flag} {option.metavar}`" if option.metavar else f"`{option.flag}`"
        port = " *(per port)*" if option.per_port else ""
        rows.append(f"| {flag}{port} | {option.shown_default()} | {option.help} |")
    return "\n".join(rows)


def show(option: Option, value: Any) -> str:
    """A value as the configuration line shows it (one token, no spaces)."""
    if value is None:
        return "-"
    if option.kind == "hostport":
        host, port = value
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if option.kind == "sink":
        return ",".join(spec.name for spec in value) or "-"  # the URL without its query
    if option.repeatable:
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def effective(values: Mapping[str, Any], ports: Mapping[int, Mapping[str, Any]]) -> str:
    """The effective configuration as `name=value` pairs (endlessh's config_log): every option, then each
    port's own settings as `port.N.name=value`."""
    parts = [f"{option.name}={show(option, values[option.field])}" for option in OPTIONS]
    for port, overrides in sorted(ports.items()):
        parts += [
            f"port.{port}.{name}={show(BY_NAME[name], value)}" for name, value in sorted(overrides.items())
        ]
    return " ".join(parts)
