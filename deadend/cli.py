"""The command line: a thin layer that builds a Config (from the option table) and hands it on.

`deadend broker` serves; `check`, `audit`, `try` and `test` are the script authors' and auditors' tools
(deadend/tools.py); `replay` reads recordings (deadend/replay.py). This module sits above everything else:
nothing imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from deadend import __version__, options, wire
from deadend.audit import BUDGET_OPTIONS
from deadend.config import Config
from deadend.configfile import ConfigFileError, read_config_file
from deadend.logs import EventLog
from deadend.replay import add_replay_parser, run_replay
from deadend.wire import SEED_MAX


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line, no usage dump: operators read this in a service log.
        self.exit(2, f"deadend: error: {message} (see --help)\n")


CEILING_OPTIONS = tuple(option for option in options.OPTIONS if option.ceiling)


def _bounded(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range ({lo}..{hi})")
        return value

    parse.__name__ = "int"
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
    tls = try_.add_mutually_exclusive_group()
    tls.add_argument(
        "--tls",
        action="store_true",
        help="be a TLS client from the first byte (443.lua, 993.lua); the script's certificate is generated "
        "for localhost and not checked",
    )
    tls.add_argument(
        "--starttls",
        action="store_true",
        help="be a TLS client from the moment the script calls deadend.starttls() (25.lua after STARTTLS); "
        "what you send before it did is sent as it is, so wait for the server's go-ahead",
    )
    try_.add_argument("--sni", metavar="NAME", help="with --tls: the server name the client asks for")
    try_.add_argument(
        "--alpn", metavar="LIST", default="", help="with --tls: the protocols offered, comma-separated"
    )
    options.add_to_parser(try_, CEILING_OPTIONS)

    audit_ = commands.add_parser(
        "audit",
        help="run scripts against a battery of clients and judge what they do",
        description="Run each SCRIPT (or each .lua file of a folder) in the real sandbox, under a tightened "
        "budget, against a battery of clients (its transcripts or a line protocol, silent, random bytes, "
        "a large body, an instant disconnect, a half-close, a trickle) and report, per script, ok, warn or "
        "fail with the reasons, check's findings included. Exit status 0 only when no script reaches "
        "--fail-on. With --diff OLD NEW: what the new version does differently (exit status 1 when anything "
        "does).",
    )
    audit_.add_argument("paths", nargs="+", type=Path, metavar="SCRIPT", help="scripts or folders of scripts")
    audit_.add_argument("--diff", action="store_true", help="compare two versions of a script: OLD NEW")
    audit_.add_argument("--format", choices=("text", "json"), default="text")
    audit_.add_argument(
        "--fail-on",
        choices=("warn", "fail"),
        default="warn",
        help="the verdict that fails the run (default warn)",
    )
    audit_.add_argument(
        "--workers", type=_bounded(1, 64), default=8, metavar="N", help="runs at once (default 8)"
    )
    audit_.add_argument(
        "--seed", type=_bounded(0, SEED_MAX), default=0, metavar="N", help="the audit's PRNG seed (default 0)"
    )
    audit_.add_argument(
        "--transcripts",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="also look here for SCRIPT's transcripts (<name>-*.transcript; a transcripts folder beside the "
        "script is always looked in)",
    )
    audit_.add_argument("--allow-clock", action="store_true", help="give the scripts the read-only clock")
    options.add_to_parser(audit_, BUDGET_OPTIONS)

    commands.add_parser(
        "examples",
        help="print the folder of the example scripts shipped with deadend",
        description="Print the folder holding the example scripts (and their transcripts) installed with "
        'deadend, e.g. for `deadend broker --scripts "$(deadend examples)"`.',
    )

    test = commands.add_parser(
        "test",
        help="replay transcripts against a script",
        description="Replay each TRANSCRIPT (see README) against SCRIPT in the real sandbox and report the "
        "first mismatch. Exit status 0 only when every transcript passes.",
    )
    test.add_argument("script", type=Path, metavar="SCRIPT")
    test.add_argument("transcripts", nargs="+", type=Path, metavar="TRANSCRIPT")
    test.add_argument("--verbose", "-v", action="store_true", help="also show the script's log lines")
    options.add_to_parser(test, CEILING_OPTIONS)


class Parser(ArgumentParser):
    """The top-level parser; remembers its subcommands' parsers (the config file sets broker defaults)."""

    commands: dict[str, ArgumentParser]


def build_parser() -> Parser:
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
    b.add_argument(
        "--check-isolation",
        action="store_true",
        help="start a sandbox zygote as the broker would, print the isolation layers this machine allows "
        "(and why any is skipped), and exit",
    )
    options.add_to_parser(b)
    parser.commands["broker"] = b
    _add_tools(commands)
    add_replay_parser(commands)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line; for the broker, a --config file first provides the defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "broker":
        return args
    broker = parser.commands["broker"]
    ports: dict[int, dict[str, object]] = {}
    if args.config is not None:
        try:
            values, ports = read_config_file(args.config)
        except ConfigFileError as e:
            broker.error(str(e))
        broker.set_defaults(**values)
        args = parser.parse_args(argv)
    if args.scripts is None and not args.check_isolation:
        broker.error("--scripts DIR is required (on the command line or as `scripts` in --config)")
    args.ports = ports
    return args


def config_from_args(args: argparse.Namespace) -> Config:
    return Config.from_values(vars(args), args.ports)


def run_broker(config: Config, argv: Sequence[str]) -> int:
    from broker.server import Fatal, Server, StartupError  # the broker is heavier than the CLI
    from broker.supervised import SupervisorLink

    sensor = config.sensor or options.default_sensor()
    place = os.environ.pop(wire.SUPERVISED_ENV, None)  # --brokers: set by the supervisor for each broker
    if place is None and config.brokers > 1:
        from broker.supervisor import run_supervisor

        return run_supervisor(config, argv, sensor)
    link = None
    if place is not None:
        try:
            supervised = wire.Supervised.decode(place)
        except ValueError as e:
            print(f"deadend: error: {e}", file=sys.stderr)
            return 1
        config = config.share(supervised.index, supervised.count)
        link = SupervisorLink(supervised)
    if isinstance(sys.stdout, io.TextIOWrapper):
        # Whatever the locale, never lose a line to an encoding error: escape what cannot be encoded.
        sys.stdout.reconfigure(errors="backslashreplace")
    log = EventLog(level=config.log_level, fmt=config.log_format, sensor=sensor)
    server = Server(config, log, link=link)
    try:
        if config.event_loop == "uvloop":
            try:
                import uvloop  # the optional extra
            except ImportError:
                needs = "--event-loop uvloop needs the uvloop extra (see the README's Set up)"
                raise StartupError(needs) from None
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.run(server.serve())
    except StartupError as e:
        log.close()
        print(f"deadend: error: {e}", file=sys.stderr)
        return 1
    except Fatal:  # logged already, as one line: a supervisor should restart us
        return 1
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 130
    finally:
        log.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "broker" and args.check_isolation:
        from broker.isolation import check_isolation

        if args.scripts is None:
            args.scripts = Path()  # not needed to check, only to build the configuration
        return check_isolation(config_from_args(args), sys.stdout)
    if args.command == "broker":
        return run_broker(config_from_args(args), sys.argv[1:] if argv is None else argv)
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
