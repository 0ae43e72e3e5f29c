"""The command line: a thin layer that builds a Config and hands it to the Server."""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from deadend import __version__
from deadend.config import Ceilings, Config, Network
from deadend.configfile import ConfigFileError, defaults_from_file
from deadend.logs import LOG_FORMATS, EventLog
from deadend.replay import add_replay_parser, run_replay
from deadend.scripts import PORT_MAX
from deadend.wire import LOG_LEVELS


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line, no usage dump: operators read this in a service log.
        self.exit(2, f"deadend: error: {message} (see --help)\n")


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


def _network(text: str) -> Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an IP network (e.g. 10.0.0.0/8, 2001:db8::/32)"
        ) from None


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= PORT_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9464, [::1]:9464)")
    return host, int(port)


def _number(
    kind: Callable[[str], float], name: str, lo: float, hi: float | None = None
) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {name}") from None
        if not math.isfinite(value) or value < lo or (hi is not None and value > hi):
            bounds = f"{lo:g}..{hi:g}" if hi is not None else f">= {lo:g}"
            raise argparse.ArgumentTypeError(f"{text!r} is out of range ({bounds})")
        return value

    parse.__name__ = name
    return parse


@dataclass(frozen=True, slots=True)
class NumberOption:
    """A numeric flag: its range is checked when parsed, its default is the dataclass field's."""

    flag: str
    field: str  # the Config or Ceilings field it sets
    kind: Callable[[str], float]
    lo: float
    hi: float
    metavar: str
    help: str

    def add_to(self, group: argparse._ActionsContainer, defaults: object) -> None:
        default = getattr(defaults, self.field)
        group.add_argument(
            self.flag,
            dest=self.field,
            type=_number(self.kind, "integer" if self.kind is int else "number", self.lo, self.hi),
            default=default,
            metavar=self.metavar,
            help=f"{self.help} (default {default if isinstance(default, int) else f'{default:g}'})",
        )


RECORD_OPTIONS = (
    NumberOption(
        "--record-max-bytes",
        "record_max_bytes",
        int,
        0,
        2**62,
        "BYTES",
        "all recordings together, old ones too",
    ),
    NumberOption(
        "--record-session-bytes", "record_session_bytes", int, 0, 2**62, "BYTES", "bytes recorded per session"
    ),
)
POOL_OPTIONS = (
    NumberOption("--warm", "warm", int, 0, 10_000, "N", "pre-forked sandboxes kept ready"),
    NumberOption(
        "--queue-size", "queue_size", int, 0, 1_000_000, "N", "connections that may wait for a sandbox"
    ),
    NumberOption("--queue-timeout", "queue_timeout", float, 0, 3600, "S", "seconds a connection may wait"),
    NumberOption(
        "--max-connections", "max_connections", int, 1, 10**7, "N", "connections at once; more are refused"
    ),
    NumberOption(
        "--max-per-ip", "max_per_ip", int, 1, 10**7, "N", "connections at once from one address (IPv6: /64)"
    ),
)
CEILING_OPTIONS = (
    NumberOption("--memory", "memory_mib", int, 1, 4096, "MiB", "Lua heap"),
    NumberOption(
        "--instructions", "instructions", int, 1000, 10**12, "N", "Lua instructions between two API calls"
    ),
    NumberOption(
        "--cpu-slice",
        "cpu_slice",
        float,
        0.01,
        3600,
        "S",
        "wall seconds between two API calls before SIGKILL",
    ),
    NumberOption("--session-cpu", "session_cpu", int, 1, 86400, "S", "CPU seconds per session (RLIMIT_CPU)"),
    NumberOption("--session-time", "session_time", float, 0.1, 30 * 86400, "S", "wall seconds per session"),
    NumberOption(
        "--linger", "linger", float, 0, 3600, "S", "seconds a script may run on after its connection closed"
    ),
    NumberOption(
        "--linger-calls", "linger_calls", int, 0, 10**6, "N", "send/recv calls allowed after the peer is done"
    ),
    NumberOption("--log-rate", "log_rate", float, 0.01, 10**6, "N", "script log lines per second"),
    NumberOption("--log-burst", "log_burst", int, 1, 10**6, "N", "script log lines allowed in a burst"),
    NumberOption(
        "--call-rate",
        "call_rate",
        float,
        1,
        10**7,
        "N",
        "API calls per second per session before they are slowed",
    ),
)


def _add_tools(commands: argparse._SubParsersAction[ArgumentParser]) -> None:
    check = commands.add_parser(
        "check",
        help="review scripts before deploying them",
        description="For each script: its name and port, whether it compiles (in the sandbox), the globals "
        "it uses that the sandbox does not provide, its deadend.* calls, and whether it sets limits and a "
        "tarpit. Exit status 0 only when every file is clean.",
    )
    check.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="scripts or folders of scripts")
    check.add_argument("--format", choices=("text", "json"), default="text")

    try_ = commands.add_parser(
        "try",
        help="run one script with this terminal as the client",
        description="Run SCRIPT in the real sandbox with stdin/stdout as the client connection; its log "
        "lines go to stderr.",
    )
    try_.add_argument("script", type=Path, metavar="SCRIPT")
    try_.add_argument("--peer-ip", default="192.0.2.10", help="what deadend.get_ip() returns")
    try_.add_argument("--allow-clock", action="store_true")
    _add_ceilings(try_)

    test = commands.add_parser(
        "test",
        help="replay transcripts against a script",
        description="Replay each TRANSCRIPT (see README) against SCRIPT in the real sandbox and report the "
        "first mismatch. Exit status 0 only when every transcript passes.",
    )
    test.add_argument("script", type=Path, metavar="SCRIPT")
    test.add_argument("transcripts", nargs="+", type=Path, metavar="TRANSCRIPT")
    test.add_argument("--verbose", "-v", action="store_true", help="also show the script's log lines")
    _add_ceilings(test)


def _add_ceilings(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ceilings (per session; each ends only the session that hits it)")
    for option in CEILING_OPTIONS:
        option.add_to(group, Ceilings())


class Parser(ArgumentParser):
    """The top-level parser; remembers its subcommands' parsers (the config file sets broker defaults)."""

    commands: dict[str, ArgumentParser]


def build_parser() -> Parser:
    defaults = Config(scripts=Path())
    parser = Parser(prog="deadend", description="Honeypot and tarpit daemon with sandboxed Lua services.")
    parser.commands = {}
    parser.add_argument("--version", action="version", version=f"deadend {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    b = commands.add_parser(
        "broker", help="serve <port>.lua scripts", description="Serve <port>.lua scripts."
    )
    b.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file of broker options (keys are the flags without --); flags given here override it",
    )
    b.add_argument("--scripts", type=Path, metavar="DIR", help="folder of <port>.lua files (required)")
    b.add_argument(
        "--host",
        action=Repeatable,
        default=[],
        metavar="ADDR",
        help="address to listen on (repeatable; default every IPv4 and IPv6 address)",
    )
    NumberOption(
        "--port-offset",
        "port_offset",
        int,
        -PORT_MAX,
        PORT_MAX,
        "N",
        "serve <port>.lua on port+N (e.g. 10000 to run 25.lua as 10025)",
    ).add_to(b, defaults)
    NumberOption("--workers", "workers", int, 1, 100_000, "N", "sandbox processes alive at once").add_to(
        b, defaults
    )
    NumberOption(
        "--sessions-per-worker",
        "sessions_per_worker",
        int,
        1,
        100_000,
        "K",
        "dense mode above 1: up to K sessions share one sandbox child, each in its own Lua state; a child "
        "killed for one session ends the others (reason worker-lost)",
    ).add_to(b, defaults)
    b.add_argument(
        "--allow-clock",
        action="store_true",
        help="give scripts a read-only os.time/date/clock/difftime (UTC)",
    )
    b.add_argument("--log-level", choices=LOG_LEVELS, default=defaults.log_level)
    b.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=defaults.log_format,
        help="text lines, or one JSON object per line (schema: docs/events.md)",
    )
    b.add_argument(
        "--event-loop",
        choices=("asyncio", "uvloop"),
        default=defaults.event_loop,
        help="the event loop; uvloop is an optional extra (pip install 'deadend[uvloop]')",
    )
    pool = b.add_argument_group("pool, queue and connection caps")
    for option in POOL_OPTIONS:
        option.add_to(pool, defaults)
    _add_operations(b, defaults)
    _add_ceilings(b)
    parser.commands["broker"] = b
    _add_tools(commands)
    add_replay_parser(commands)
    return parser


def _add_operations(b: argparse.ArgumentParser, defaults: Config) -> None:
    ops = b.add_argument_group("recording, metrics, proxies, privileges")
    ops.add_argument("--record", type=Path, metavar="DIR", help="record every session's bytes into DIR")
    for option in RECORD_OPTIONS:
        option.add_to(ops, defaults)
    ops.add_argument(
        "--metrics", type=_host_port, metavar="HOST:PORT", help="serve Prometheus metrics over HTTP there"
    )
    ops.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="every connection starts with a PROXY v1/v2 header (behind HAProxy, nginx, a cloud LB)",
    )
    ops.add_argument(
        "--ignore",
        type=_network,
        action=Repeatable,
        default=[],
        metavar="CIDR",
        help="networks of your own (scanners, monitoring): see --ignore-action (repeatable)",
    )
    ops.add_argument(
        "--ignore-action",
        choices=("serve", "refuse"),
        default=defaults.ignore_action,
        help="serve ignored peers without logging or recording them, or refuse them (default serve)",
    )
    ops.add_argument(
        "--user", metavar="NAME", help="run sandboxes as NAME, and the broker too once its ports are bound"
    )
    ops.add_argument(
        "--allow-root", action="store_true", help="allow sandbox children to run as root (not recommended)"
    )


def ceilings_from_args(args: argparse.Namespace) -> Ceilings:
    values = {option.field: getattr(args, option.field) for option in CEILING_OPTIONS}
    return Ceilings(**values, call_burst=max(1, int(args.call_rate * 2)))


def config_from_args(args: argparse.Namespace) -> Config:
    values = {option.field: getattr(args, option.field) for option in (*POOL_OPTIONS, *RECORD_OPTIONS)}
    return Config(
        scripts=args.scripts,
        hosts=tuple(args.host),
        port_offset=args.port_offset,
        workers=args.workers,
        sessions_per_worker=args.sessions_per_worker,
        allow_clock=args.allow_clock,
        log_level=args.log_level,
        log_format=args.log_format,
        event_loop=args.event_loop,
        ceilings=ceilings_from_args(args),
        record=args.record,
        metrics=args.metrics,
        proxy_protocol=args.proxy_protocol,
        ignore=tuple(args.ignore),
        ignore_action=args.ignore_action,
        user=args.user,
        allow_root=args.allow_root,
        **values,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line; for the broker, a --config file first provides the defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "broker":
        return args
    broker = parser.commands["broker"]
    if args.config is not None:
        try:
            broker.set_defaults(**defaults_from_file(broker, args.config))
        except ConfigFileError as e:
            broker.error(str(e))
        args = parser.parse_args(argv)
    if args.scripts is None:
        broker.error("--scripts DIR is required (on the command line or as `scripts` in --config)")
    return args


def run_broker(config: Config) -> int:
    from broker.server import Server, StartupError  # the broker is heavier than the CLI

    if isinstance(sys.stdout, io.TextIOWrapper):
        # Whatever the locale, never lose a line to an encoding error: escape what cannot be encoded.
        sys.stdout.reconfigure(errors="backslashreplace")
    log = EventLog(level=config.log_level, fmt=config.log_format)
    server = Server(config, log)
    try:
        if config.event_loop == "uvloop":
            try:
                import uvloop  # the optional extra: pip install 'deadend[uvloop]'
            except ImportError:
                needs = "--event-loop uvloop needs the uvloop extra: pip install 'deadend[uvloop]'"
                raise StartupError(needs) from None
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.run(server.serve())
    except StartupError as e:
        log.close()
        print(f"deadend: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 130
    finally:
        log.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "broker":
        return run_broker(config_from_args(args))
    if args.command == "replay":
        return run_replay(args)
    from deadend import tools  # the author/auditor tools

    run: Callable[[argparse.Namespace], int] = getattr(tools, f"run_{args.command}")
    try:
        return run(args)
    except BrokenPipeError:  # `deadend check ... | head`: the reader left; that is not an error to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
