"""The command line: a thin layer that builds a Config and hands it to the Server."""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from deadend import __version__
from deadend.config import Ceilings, Config
from deadend.logs import EventLog
from deadend.scripts import PORT_MAX
from deadend.wire import LOG_LEVELS


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line, no usage dump: operators read this in a service log.
        self.exit(2, f"deadend: error: {message} (see --help)\n")


def _number(
    kind: Callable[[str], float], name: str, lo: float, hi: float | None = None
) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {name}") from None
        if value < lo or (hi is not None and value > hi):
            bounds = f"{lo:g}..{hi:g}" if hi is not None else f">= {lo:g}"
            raise argparse.ArgumentTypeError(f"{text!r} is out of range ({bounds})")
        return value

    parse.__name__ = name
    return parse


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
    limits = Ceilings()
    c = parser.add_argument_group("ceilings (per session; each ends only the session that hits it)")
    c.add_argument(
        "--memory",
        type=_number(int, "integer", 1, 4096),
        default=limits.memory_mib,
        metavar="MiB",
        help=f"Lua heap (default {limits.memory_mib})",
    )
    c.add_argument(
        "--instructions",
        type=_number(int, "integer", 1000, 10**12),
        default=limits.instructions,
        metavar="N",
        help=f"Lua instructions between two API calls (default {limits.instructions})",
    )
    c.add_argument(
        "--cpu-slice",
        type=_number(float, "number", 0.01, 3600),
        default=limits.cpu_slice,
        metavar="S",
        help=f"wall seconds between two API calls before SIGKILL (default {limits.cpu_slice:g})",
    )
    c.add_argument(
        "--session-cpu",
        type=_number(int, "integer", 1, 86400),
        default=limits.session_cpu,
        metavar="S",
        help=f"CPU seconds per session, RLIMIT_CPU (default {limits.session_cpu})",
    )
    c.add_argument(
        "--session-time",
        type=_number(float, "number", 0.1, 30 * 86400),
        default=limits.session_time,
        metavar="S",
        help=f"wall seconds per session (default {limits.session_time:g})",
    )
    c.add_argument(
        "--linger",
        type=_number(float, "number", 0, 3600),
        default=limits.linger,
        metavar="S",
        help=f"seconds a script may run on after its connection closed (default {limits.linger:g})",
    )
    c.add_argument(
        "--linger-calls",
        type=_number(int, "integer", 0, 10**6),
        default=limits.linger_calls,
        metavar="N",
        help=f"send/recv calls allowed after the connection closed (default {limits.linger_calls})",
    )
    c.add_argument(
        "--log-rate",
        type=_number(float, "number", 0.01, 10**6),
        default=limits.log_rate,
        metavar="N",
        help=f"script log lines per second (default {limits.log_rate:g})",
    )
    c.add_argument(
        "--log-burst",
        type=_number(int, "integer", 1, 10**6),
        default=limits.log_burst,
        metavar="N",
        help=f"script log lines allowed in a burst (default {limits.log_burst})",
    )
    c.add_argument(
        "--call-rate",
        type=_number(float, "number", 1, 10**7),
        default=limits.call_rate,
        metavar="N",
        help=f"API calls per second per session before they are slowed down (default {limits.call_rate:g})",
    )


def build_parser() -> ArgumentParser:
    defaults = Config(scripts=Path())
    parser = ArgumentParser(
        prog="deadend", description="Honeypot and tarpit daemon with sandboxed Lua services."
    )
    parser.add_argument("--version", action="version", version=f"deadend {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    b = commands.add_parser(
        "broker", help="serve <port>.lua scripts", description="Serve <port>.lua scripts."
    )
    b.add_argument("--scripts", type=Path, required=True, metavar="DIR", help="folder of <port>.lua files")
    b.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="ADDR",
        help="address to listen on (repeatable; default every IPv4 and IPv6 address)",
    )
    b.add_argument(
        "--port-offset",
        type=_number(int, "integer", -PORT_MAX, PORT_MAX),
        default=0,
        metavar="N",
        help="serve <port>.lua on port+N (e.g. 10000 to run 25.lua as 10025)",
    )
    b.add_argument(
        "--workers",
        type=_number(int, "integer", 1, 100_000),
        default=defaults.workers,
        metavar="N",
        help=f"sandbox processes alive at once (default {defaults.workers})",
    )
    b.add_argument(
        "--allow-clock",
        action="store_true",
        help="give scripts a read-only os.time/date/clock/difftime (UTC)",
    )
    b.add_argument("--log-level", choices=LOG_LEVELS, default=defaults.log_level)

    q = b.add_argument_group("pool and queue")
    q.add_argument(
        "--warm",
        type=_number(int, "integer", 0, 10_000),
        default=defaults.warm,
        metavar="N",
        help=f"pre-forked sandboxes kept ready (default {defaults.warm})",
    )
    q.add_argument(
        "--queue-size",
        type=_number(int, "integer", 0, 1_000_000),
        default=defaults.queue_size,
        metavar="N",
        help=f"connections that may wait for a sandbox (default {defaults.queue_size})",
    )
    q.add_argument(
        "--max-connections",
        type=_number(int, "integer", 1, 10**7),
        default=defaults.max_connections,
        metavar="N",
        help=f"connections at once; more are refused (default {defaults.max_connections})",
    )
    q.add_argument(
        "--max-per-ip",
        type=_number(int, "integer", 1, 10**7),
        default=defaults.max_per_ip,
        metavar="N",
        help=f"accepted connections at once from one address (default {defaults.max_per_ip})",
    )
    q.add_argument(
        "--queue-timeout",
        type=_number(float, "number", 0, 3600),
        default=defaults.queue_timeout,
        metavar="S",
        help=f"seconds a connection may wait (default {defaults.queue_timeout:g})",
    )

    _add_ceilings(b)
    _add_tools(commands)
    return parser


def ceilings_from_args(args: argparse.Namespace) -> Ceilings:
    return Ceilings(
        memory_mib=args.memory,
        instructions=args.instructions,
        cpu_slice=args.cpu_slice,
        session_cpu=args.session_cpu,
        session_time=args.session_time,
        linger=args.linger,
        linger_calls=args.linger_calls,
        log_rate=args.log_rate,
        log_burst=args.log_burst,
        call_rate=args.call_rate,
        call_burst=max(1, int(args.call_rate * 2)),
    )


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        scripts=args.scripts,
        hosts=tuple(args.host),
        port_offset=args.port_offset,
        workers=args.workers,
        warm=args.warm,
        queue_size=args.queue_size,
        queue_timeout=args.queue_timeout,
        max_connections=args.max_connections,
        max_per_ip=args.max_per_ip,
        allow_clock=args.allow_clock,
        log_level=args.log_level,
        ceilings=ceilings_from_args(args),
    )


def run_broker(config: Config) -> int:
    from broker.server import Server, StartupError  # the broker is heavier than the CLI

    if isinstance(sys.stdout, io.TextIOWrapper):
        # Whatever the locale, never lose a line to an encoding error: escape what cannot be encoded.
        sys.stdout.reconfigure(errors="backslashreplace")
    log = EventLog(level=config.log_level)
    server = Server(config, log)
    try:
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
    args = build_parser().parse_args(argv)
    if args.command == "broker":
        return run_broker(config_from_args(args))
    from deadend import tools  # the author/auditor tools

    run: Callable[[argparse.Namespace], int] = getattr(tools, f"run_{args.command}")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
