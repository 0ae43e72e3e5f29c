"""`deadend check`: review scripts before deploying them.

For each file: is the name a valid `<port>.lua`, does it compile (in a locked-down sandbox, never here),
which globals does it read or write that the environment does not provide, which `deadend.*` calls does
it use, and does it set limits and a tarpit. The answers come from the compiled bytecode (see
`deadend.bytecode`), not from the text, so comments, strings and odd spacing neither hide nor fake them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from broker.compile import compile_in_sandbox
from broker.pool import Pool
from deadend import bytecode, wire
from deadend.config import Ceilings
from deadend.logs import sanitize
from deadend.scripts import Script, port_of, read_source

PROVIDED = frozenset((*wire.BASE_FUNCTIONS, *wire.LIBRARIES, "print", "_G"))
# nil unless the operator allows the clock; a script that tests for it and falls back is well behaved, so
# reading `os` and its clock functions is not a problem, any other os.* is.
OPTIONAL = frozenset(("os",))
NEVER = {
    "io": "files are not reachable from the sandbox",
    "package": "modules cannot be loaded",
    "require": "modules cannot be loaded",
    "dofile": "files are not reachable from the sandbox",
    "loadfile": "files are not reachable from the sandbox",
    "load": "code cannot be compiled at run time",
    "loadstring": "code cannot be compiled at run time",
    "debug": "the debug library is not available",
    "coroutine": "coroutines are not available",
    "collectgarbage": "the collector cannot be driven",
    "python": "there is no Python object in the sandbox",
}


@dataclass
class Report:
    file: str
    port: int | None = None
    name_problem: str | None = None
    compile_error: str | None = None
    unknown_reads: dict[str, list[int]] = field(default_factory=dict)
    global_writes: dict[str, list[int]] = field(default_factory=dict)
    forbidden: dict[str, list[int]] = field(default_factory=dict)  # "string.dump" -> lines
    deadend_calls: dict[str, list[int]] = field(default_factory=dict)
    unknown_calls: dict[str, list[int]] = field(default_factory=dict)
    sets_limits: bool = False
    sets_tarpit: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"clean": self.clean}


def scripts_in(paths: list[Path]) -> list[Path]:
    """Files named on the command line, and the .lua files inside named folders."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".lua")
        else:
            found.append(path)
    return found


def _lines(lines: list[int]) -> str:
    unique = sorted(set(lines))
    shown = ", ".join(str(n) for n in unique[:8])
    return f"line {shown}" if len(unique) == 1 else f"lines {shown}" + (" …" if len(unique) > 8 else "")


def _escaped(analysis: bytecode.Analysis) -> bytecode.Analysis:
    """Names are constants of an untrusted script: escape them before they reach a terminal or a report."""

    def names(found: dict[str, list[int]]) -> dict[str, list[int]]:
        return {sanitize(name, 128): lines for name, lines in found.items()}

    analysis.global_reads = names(analysis.global_reads)
    analysis.global_writes = names(analysis.global_writes)
    analysis.deadend_calls = names(analysis.deadend_calls)
    analysis.method_names = names(analysis.method_names)
    analysis.field_uses = {
        (sanitize(t, 128), sanitize(k, 128)): v for (t, k), v in analysis.field_uses.items()
    }
    return analysis


def judge(report: Report, analysis: bytecode.Analysis) -> None:
    """Fill in the report's findings from the bytecode analysis (pure: no I/O)."""
    analysis = _escaped(analysis)
    written = set(analysis.global_writes)
    for name, lines in sorted(analysis.global_reads.items()):
        if name in PROVIDED or name in OPTIONAL or name in written:
            continue
        report.unknown_reads[name] = lines
        why = NEVER.get(name, "the sandbox does not provide it (a typo, or a missing local?)")
        report.problems.append(f"reads global '{name}' ({_lines(lines)}): {why}")
    for name, lines in sorted(analysis.global_writes.items()):
        report.global_writes[name] = lines
        if name in PROVIDED:
            report.problems.append(f"overwrites '{name}' ({_lines(lines)}), which the environment provides")
    for (table, key), lines in sorted(analysis.field_uses.items()):
        if table == "string" and key == "dump":
            report.forbidden["string.dump"] = lines
            report.problems.append(f"uses string.dump ({_lines(lines)}): it is removed from the sandbox")
        elif table == "os" and key not in wire.CLOCK_FUNCTIONS:
            report.forbidden[f"os.{key}"] = lines
            report.problems.append(
                f"uses os.{key} ({_lines(lines)}): only os.time/date/clock/difftime exist, with --allow-clock"
            )
        elif table in NEVER:
            report.forbidden[f"{table}.{key}"] = lines
    clock = sorted(key for table, key in analysis.field_uses if table == "os" and key in wire.CLOCK_FUNCTIONS)
    if clock and "os" not in analysis.guards:
        lines = sorted({n for key in clock for n in analysis.field_uses[("os", key)]})
        report.problems.append(
            f"uses os.{', os.'.join(clock)} ({_lines(lines)}) without testing for os: it is nil unless "
            'the broker runs with --allow-clock (guard it: `if type(os) == "table" then`)'
        )
    for method, lines in sorted(analysis.method_names.items()):
        if method == "dump":
            report.forbidden[":dump"] = lines
            report.problems.append(f"calls a :dump method ({_lines(lines)}): string.dump is removed")
    for name, lines in sorted(analysis.deadend_calls.items()):
        if name in wire.API_FUNCTIONS:
            report.deadend_calls[name] = lines
        else:
            report.unknown_calls[name] = lines
            report.problems.append(f"uses deadend.{name} ({_lines(lines)}): not part of the API")
    report.sets_limits = "set_limits" in report.deadend_calls
    report.sets_tarpit = "set_tarpit" in report.deadend_calls
    if not report.sets_limits:
        report.problems.append("never calls deadend.set_limits: an attacker may send without bound")
    if not report.sets_tarpit:
        report.problems.append("never calls deadend.set_tarpit: nothing slows an attacker down")


async def check(pool: Pool, path: Path, ceilings: Ceilings) -> Report:
    report = Report(str(path))
    verdict = port_of(path.name)
    if isinstance(verdict, str):
        report.name_problem = verdict
        report.problems.append(f"file name: {verdict}; the broker would ignore it")
    else:
        report.port = verdict
    try:
        source = read_source(path)
    except OSError as e:
        report.problems.append(f"cannot be read: {e.strerror or e}; the broker would not serve it")
        return report
    compiled = await compile_in_sandbox(pool, Script(report.port or 0, path, source), ceilings, dump=True)
    if compiled.error is not None:
        report.compile_error = sanitize(compiled.error)  # quotes the source: escape it
        report.problems.append(f"does not compile: {report.compile_error}")
        return report
    try:
        assert compiled.bytecode is not None
        analysis = bytecode.analyze(bytecode.parse(compiled.bytecode))
    except (bytecode.BytecodeError, AssertionError) as e:
        report.problems.append(f"its bytecode could not be analysed: {e}")
        return report
    judge(report, analysis)
    return report


def render(report: Report) -> str:
    head = f"{report.file}: " + (f"port {report.port}" if report.port is not None else "not a script name")
    lines = [head + (" — clean" if report.clean else f" — {len(report.problems)} problem(s)")]
    lines += [f"  ✗ {problem}" for problem in report.problems]
    if report.deadend_calls:
        lines.append("  uses deadend." + ", deadend.".join(sorted(report.deadend_calls)))
    own = sorted(set(report.global_writes) - PROVIDED)
    if own:
        lines.append("  defines globals: " + ", ".join(own) + " (locals are safer)")
    return "\n".join(lines)
