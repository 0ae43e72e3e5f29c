"""`deadend check`, `deadend audit`, `deadend try` and `deadend test`: the tools for script authors and
auditors.

Each runs scripts only in the real, locked-down sandbox, never in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import socket
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

from deadend.config import Ceilings, Config
from deadend.logs import EventLog, Where, sanitize
from deadend.reasons import Reason
from deadend.scripts import Script, port_of, read_source
from deadend.transcript import Transcript, TranscriptError, load
from deadend.wire import check_alpn


def _fail(message: str) -> int:
    print(f"deadend: error: {message}", file=sys.stderr)
    return 2


def _script(path: Path) -> Script | str:
    try:
        source = read_source(path)
    except OSError as e:
        return sanitize(f"cannot read {path}: {e.strerror or e}")
    port = port_of(path.name)
    return Script(port if isinstance(port, int) else 0, path, source)


class _Lines(io.TextIOBase):
    """A log stream that keeps its lines (the rehearsal's log is read back for `~ log`)."""

    def __init__(self, echo: io.TextIOBase | None = None) -> None:
        self.lines: list[str] = []
        self.echo = echo

    def write(self, s: str) -> int:
        self.lines += s.splitlines()
        if self.echo is not None:
            self.echo.write(s)
        return len(s)


# --- examples --------------------------------------------------------------------------------------


def shipped_examples() -> Path | None:
    """Where the example scripts are: installed from a wheel under the installation's data folder
    (pyproject.toml's data-files: share/deadend/examples, for the environment or the user), or, in a
    checkout, the repository's examples/ folder beside the package."""
    candidates = [Path(sysconfig.get_path("data")), Path(sys.prefix)]
    with contextlib.suppress(KeyError):
        candidates.append(Path(sysconfig.get_path("data", f"{os.name}_user")))
    folders = [c / "share" / "deadend" / "examples" for c in candidates]
    folders.append(Path(__file__).resolve().parent.parent / "examples")
    return next((f for f in folders if any(f.glob("*.lua"))), None)


def run_examples(args: argparse.Namespace) -> int:
    folder = shipped_examples()
    if folder is None:
        return _fail("no example scripts are installed with this deadend")
    print(folder)
    return 0


# --- check -----------------------------------------------------------------------------------------


def run_check(args: argparse.Namespace) -> int:
    from broker.sandboxes import standalone
    from broker.staticcheck import Report, check, render, scripts_in
    from broker.zygote import ZygoteLost

    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        return _fail(f"no such file or folder: {', '.join(missing)}")
    files = scripts_in(args.paths)
    config = Config(scripts=Path(), workers=2, warm=1, queue_size=4)
    log = EventLog(open(os.devnull, "w"))  # noqa: SIM115 (closed with the log)

    async def main() -> list[Report]:
        async with standalone(config, log) as sandboxes:
            return [await check(sandboxes.process, path, config.ceilings) for path in files]

    try:
        reports = asyncio.run(main())
    except (ZygoteLost, OSError) as e:
        return _fail(f"cannot start the sandbox: {e}")
    finally:
        log.close()
    if args.format == "json":
        print(json.dumps([r.to_json() for r in reports], indent=2))
    else:
        for report in reports:
            print(render(report))
        bad = sum(not r.clean for r in reports)
        print(f"{len(reports)} file(s) checked, {bad} with problems")
    return 0 if reports and all(r.clean for r in reports) else 1


# --- audit -----------------------------------------------------------------------------------------


def run_audit(args: argparse.Namespace) -> int:
    from broker.auditrun import Auditor
    from broker.staticcheck import scripts_in
    from broker.zygote import ZygoteLost
    from deadend import audit

    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        return _fail(f"no such file or folder: {', '.join(missing)}")
    if args.diff and (len(args.paths) != 2 or not all(p.is_file() for p in args.paths)):
        return _fail("--diff compares two scripts: deadend audit --diff OLD NEW")
    files = list(args.paths) if args.diff else scripts_in(args.paths)
    if not files:
        return _fail(f"no .lua file in {', '.join(str(p) for p in args.paths)}")
    ceilings = Ceilings.from_values(vars(args))
    budget = {o.name: getattr(ceilings, o.field) for o in audit.BUDGET_OPTIONS}

    async def main() -> list[audit.Report]:
        async with Auditor(ceilings, args.workers, args.seed, args.allow_clock) as auditor:
            return list(await asyncio.gather(*(auditor.audit(path, args.transcripts) for path in files)))

    started = time.monotonic()
    try:
        reports = asyncio.run(main())
    except (ZygoteLost, OSError) as e:
        # Where it failed, in one line: the sandbox could not start, or a run could not get one.
        frames = traceback.extract_tb(e.__traceback__)
        where = f" (in {frames[-1].name}, {Path(frames[-1].filename).name})" if frames else ""
        return _fail(f"the audit stopped: {e}{where}")
    elapsed = time.monotonic() - started
    if args.diff:
        changes = audit.diff(reports[0], reports[1])
        if args.format == "json":
            old, new = (r.to_json(budget) for r in reports)
            print(json.dumps({"old": old, "new": new, "changes": [asdict(c) for c in changes]}, indent=2))
        else:
            print(audit.budget_line(budget, args.seed))
            print(audit.render_diff(reports[0], reports[1], changes))
        return 1 if changes else 0
    if args.format == "json":
        print(json.dumps([r.to_json(budget) for r in reports], indent=2))
    else:
        print(audit.budget_line(budget, args.seed))
        for report in reports:
            print(audit.render(report))
        counts = {v: sum(r.verdict == v for r in reports) for v in ("ok", "warn", "fail")}
        shown = ", ".join(f"{n} {v}" for v, n in counts.items())
        print(f"{len(reports)} script(s) audited in {elapsed:.1f} s: {shown}")
    worst = audit.SEVERITY_ORDER[args.fail_on]
    return 1 if any(audit.SEVERITY_ORDER[r.verdict] >= worst for r in reports) else 0


# --- try -------------------------------------------------------------------------------------------


def run_try(args: argparse.Namespace) -> int:
    from broker.rehearsal import Rehearsal, relay

    script = _script(args.script)
    if isinstance(script, str):
        return _fail(script)
    alpn = args.alpn.split(",") if args.alpn else []
    if args.alpn and not check_alpn(args.alpn.encode()):
        return _fail(f"--alpn {sanitize(args.alpn, 100)!r} is not protocol names separated by commas")
    config = Config(scripts=Path(), ceilings=Ceilings.from_values(vars(args)))
    log = EventLog(sys.stderr, level="debug")
    ended: list[object] = []  # the session's end reason, from its session-end event

    def observe(event: str, _where: Where, fields: Mapping[str, object]) -> None:
        if event == "session.end":
            ended.append(fields["reason"])

    log.observers.append(observe)
    ours, theirs = socket.socketpair()
    # --tls, --starttls: the terminal's bytes reach the script through a relay that speaks TLS
    terminal, relayed = socket.socketpair() if args.tls or args.starttls else (ours, None)

    def pump_in() -> None:  # stdin -> the script
        try:
            while chunk := os.read(sys.stdin.fileno(), 65536):
                terminal.sendall(chunk)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            terminal.shutdown(socket.SHUT_WR)

    def pump_out() -> None:  # the script -> stdout
        try:
            while chunk := terminal.recv(65536):
                os.write(sys.stdout.fileno(), chunk)
        except OSError:
            pass

    async def main() -> None:
        async with Rehearsal(config, log) as rehearsal:
            theirs.setblocking(False)
            if relayed is None:
                await rehearsal.start_session(script, theirs, args.peer_ip, args.allow_clock)
                return
            tls_wanted = asyncio.Event() if args.starttls else None
            ours.setblocking(False)
            relayed.setblocking(False)
            carrying = asyncio.ensure_future(relay(relayed, ours, tls_wanted, args.sni, alpn))
            on_starttls = tls_wanted.set if tls_wanted is not None else None
            await rehearsal.start_session(script, theirs, args.peer_ip, args.allow_clock, on_starttls)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):  # what the script sent last, on its way to stdout
                    problem = await asyncio.shield(carrying)
                    if problem:
                        print(f"deadend: {problem}", file=sys.stderr)
            carrying.cancel()
            await asyncio.gather(carrying, return_exceptions=True)

    threading.Thread(target=pump_in, daemon=True).start()
    out = threading.Thread(target=pump_out, daemon=True)
    out.start()
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        return 130
    finally:
        out.join(2)
        ours.close()
        if relayed is not None:
            relayed.close()
            terminal.close()
        log.close()
    # A script error or a ceiling is a failed try (a script under development, a CI smoke test); the
    # session-end line on stderr says which.
    return 0 if ended == [Reason.DONE] else 1


# --- test ------------------------------------------------------------------------------------------


def run_test(args: argparse.Namespace) -> int:
    from broker.rehearsal import Rehearsal, replay

    script = _script(args.script)
    if isinstance(script, str):
        return _fail(script)
    # A transcript that cannot be read is that transcript's failure; the others still run.
    transcripts: list[Transcript | str] = []
    for path in args.transcripts:
        try:
            transcripts.append(load(path))
        except TranscriptError as e:
            transcripts.append(str(e))
        except OSError as e:
            transcripts.append(sanitize(f"{path}: cannot read: {e.strerror or e}"))
    config = Config(scripts=Path(), ceilings=Ceilings.from_values(vars(args)))
    lines = _Lines()
    log = EventLog(lines, level="debug")  # type: ignore[arg-type]

    async def main() -> int:
        failed = 0
        async with Rehearsal(config, log) as rehearsal:
            for path, transcript in zip(args.transcripts, transcripts, strict=True):
                if isinstance(transcript, str):
                    failed += 1
                    print(f"FAIL {sanitize(str(path))}\n  {transcript}")
                    continue
                result = await replay(rehearsal, script, transcript, lines.lines)
                print(f"{'PASS' if result.ok else 'FAIL'} {sanitize(transcript.path)}")
                if not result.ok:
                    failed += 1
                    print(f"  {result.failure}")
                    tail = result.received[-300:]
                    print(f"    the script sent, last {len(tail)} bytes: {tail!r}")
                if args.verbose or not result.ok:
                    for line in result.log_lines:
                        print(f"    log: {line}")
        print(f"{len(transcripts) - failed} passed, {failed} failed")
        return 1 if failed else 0

    try:
        return asyncio.run(main())
    finally:
        log.close()
