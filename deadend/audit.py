"""`deadend audit`: what a script does when it runs, judged in words an operator acts on. Pure: no I/O.

A static pass (`deadend check`) reads the bytecode; it cannot see a busy loop, a memory bomb, a log flood or
a script that keeps running after its client left. The audit runs the script (broker/auditrun.py, in the
real sandbox) against a battery of client behaviours and measures each run. This module holds the parts
that need no process, each as data where it can be:

- the battery (`battery()`, GENERIC, `transcript_behaviour()`): what each client does, as acts the runner
  carries out;
- the audit budget (BUDGET): the broker's ceilings, tightened so that a whole audit is quick;
- what one run measured (Run);
- the verdict rules (RULES), each a code, a severity and a function of one run that says what it saw;
  findings of the same code are gathered over the runs; `deadend check`'s problems are folded in;
- the changes between two versions of a script (`diff()`, for `--diff`);
- the reports, as text and as JSON.

Every run of a script gets a fixed PRNG seed (the audit's seed and the CRC-32 of the run's name), so a run
is repeated exactly where the script is deterministic, and two versions of a script meet the same
numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from deadend.logs import sanitize
from deadend.options import OPTIONS
from deadend.reasons import Reason

# --- the budget -------------------------------------------------------------------------------------------

# The broker's ceilings, tightened: by the ceiling flags' names (`deadend audit --instructions N` etc.
# change them). Logs are not rate-limited here: the audit counts what a script logs, and judges it
# against the broker's default --log-burst (LOG_BURST) instead of dropping lines.
BUDGET: Final[Mapping[str, float]] = {
    "instructions": 5_000_000,
    "memory": 32,
    "cpu-slice": 1.0,
    "session-cpu": 10,
    "session-time": 10.0,
    "idle-timeout": 5.0,
    "linger": 5.0,
    "linger-calls": 100,
    "log-rate": 100_000,
    "log-burst": 100_000,
    "call-rate": 1000,
    "tls-handshake-timeout": 5.0,
}

# The ceiling flags of `deadend audit`: the broker's, with the budget's defaults.
BUDGET_OPTIONS: Final = tuple(
    dataclasses.replace(o, default=(int if o.kind == "int" else float)(BUDGET[o.name]))
    for o in OPTIONS
    if o.ceiling
)

# --- thresholds: past these a run earns a warning -----------------------------------------------------------

LOG_BURST: Final = 100  # the broker's default --log-burst: lines past it in a burst are dropped
MEMORY_WARN: Final = 8 << 20  # a quarter of the default --memory
INSTRUCTIONS_WARN: Final = 20_000_000  # per session; an example stays under 2 million
CPU_WARN: Final = 0.5  # seconds of CPU per session
# Seconds a script may go on after its client left before it is remarked: the broker itself may take a
# second to see a client gone behind bytes the script has not read (broker/connection.py probes its TCP
# state once a second), and a tarpit's delay may be running.
AFTER_LEFT_WARN: Final = 2.0
SPIN_CALLS: Final = 2000  # API calls in one session, at more than...
SPIN_RATE: Final = 200.0  # ...calls a second on average: spinning on cheap calls

# --- the battery ------------------------------------------------------------------------------------------

RANDOM_BYTES: Final = 4096
LARGE_BYTES: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class Act:
    """One thing the client does. kinds: send (data, then wait `seconds` reading), trickle (data a byte
    at a time, `seconds` apart), read (for `seconds`, or until the server closes), hold (read until the
    session ends), close, shutdown (a half-close: stop sending, go on reading), reset (an abort: RST)."""

    kind: str
    data: bytes = b""
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Behaviour:
    name: str
    words: str  # how a finding names it: "ends by ... when the client is silent"
    acts: tuple[Act, ...]


def _random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def generic_exchange() -> tuple[Act, ...]:
    """A client that speaks a plausible line protocol, for a script that ships no transcript."""
    lines = (b"HELP\r\n", b"USER admin\r\n", b"PASS admin\r\n", b"QUIT\r\n")
    return (Act("read", seconds=1.0), *(Act("send", line, 0.5) for line in lines), Act("read", seconds=2.0))


def battery(seed: int) -> tuple[Behaviour, ...]:
    """The client behaviours every script meets (besides its transcripts, or the generic exchange)."""
    noise = _random_bytes(seed, RANDOM_BYTES)
    return (
        Behaviour("silent", "when the client is silent", (Act("hold"),)),
        Behaviour(
            "random",
            "when the client sends random bytes",
            (
                Act("read", seconds=0.5),
                *(Act("send", noise[i : i + 1024], 0.1) for i in range(0, RANDOM_BYTES, 1024)),
                Act("read", seconds=3.0),
                Act("close"),
            ),
        ),
        Behaviour(
            "large",
            "when the client sends a large body",
            # it gives up with a reset: a FIN would wait behind the bytes the script has not taken
            (Act("read", seconds=0.5), Act("send", b"A" * LARGE_BYTES, 3.0), Act("reset")),
        ),
        Behaviour("disconnect", "when the client disconnects at once", (Act("close"),)),
        Behaviour(
            "half-close",
            "when the client half-closes",
            (Act("read", seconds=0.5), Act("send", b"HELP\r\n"), Act("shutdown"), Act("hold")),
        ),
        Behaviour(
            "trickle",
            "when the client trickles a byte at a time",
            (
                Act("read", seconds=0.5),
                Act("trickle", b"USER admin\r\n", 0.1),
                Act("read", seconds=1.0),
                Act("close"),
            ),
        ),
    )


GENERIC: Final = Behaviour(
    "generic", "when the client speaks a line protocol", (*generic_exchange(), Act("close"))
)


def transcript_behaviour(name: str) -> Behaviour:
    """A run that plays a transcript (the runner plays its steps): the plausible client of its service."""
    return Behaviour(f"transcript {name}", f"when the client plays {name}", ())


def run_seed(seed: int, name: str) -> tuple[int, int]:
    """The fixed PRNG seed of the run `name` in an audit seeded with `seed`."""
    return seed, zlib.crc32(name.encode())


# --- what a run measured ----------------------------------------------------------------------------------

KEPT_BYTES: Final = 64 << 10  # what the client received, kept for --diff (the digest covers everything)


@dataclass(slots=True)
class Run:
    behaviour: str
    words: str
    seed: tuple[int, int]
    reason: str = Reason.CRASH.value
    limit: str | None = None  # the ceiling, by its flag name, when a ceiling ended the session
    detail: str = ""  # what the broker said of the end (an error's message), escaped
    duration: float = 0.0  # seconds, from the session's start to its end
    cpu: float | None = None  # seconds of CPU in the sandbox (reported by the worker at its end)
    memory: int | None = None  # peak Lua heap, bytes (idem)
    instructions: int | None = None  # Lua instructions in all, as the budget counts them (idem)
    calls: dict[str, int] = field(default_factory=dict)  # API calls by name
    log_lines: int = 0
    log_bytes: int = 0
    bytes_sent: int = 0  # by the script, to the client
    bytes_received: int = 0  # by the script, from the client
    ttfb: float | None = None  # seconds from the connection to the client's first byte
    left_at: float | None = None  # when the client closed or half-closed, seconds from the start
    closed_by: str = "-"
    transcript_failure: str = ""  # a transcript run that did not pass: where and why
    digest: str = ""  # SHA-256 of everything the client received
    got: bytes = b""  # the first KEPT_BYTES of it

    @property
    def after_left(self) -> float | None:
        """Seconds the session went on after the client left (closed or half-closed)."""
        return None if self.left_at is None else max(0.0, self.duration - self.left_at)

    @property
    def noticed(self) -> bool | None:
        """Whether the script noticed its client leaving: it ended on its own, not by --linger."""
        if self.left_at is None:
            return None
        return self.reason not in (Reason.LINGER, Reason.SESSION_TIME)

    def to_json(self) -> dict[str, Any]:
        fields = asdict(self)
        del fields["got"]
        fields["seed"] = list(self.seed)
        fields["after_left"] = self.after_left
        fields["noticed"] = self.noticed
        return fields


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- findings ---------------------------------------------------------------------------------------------

FAIL, WARN = "fail", "warn"
SEVERITY_ORDER: Final = {"ok": 0, WARN: 1, FAIL: 2}


@dataclass(slots=True)
class Finding:
    code: str  # stable, for CI and tests: "instruction-limit", "log-flood", "static", ...
    severity: str  # fail | warn
    text: str  # in an operator's words, the behaviours named
    behaviours: list[str] = field(default_factory=list)


Said = tuple[str, float]  # the start of a sentence, and how much (the worst run's words are kept)


@dataclass(frozen=True, slots=True)
class Rule:
    """One verdict rule: `says(run)` is what it saw in a run, or None."""

    code: str
    severity: str
    says: Callable[[Run], Said | None]


CEILING_WORDS: Final[dict[str, str]] = {
    Reason.INSTRUCTIONS: "ends by the instruction ceiling",
    Reason.MEMORY: "ends by the memory ceiling",
    Reason.CPU_DEADLINE: "is killed by the CPU deadline (it computed in C past --cpu-slice)",
    Reason.CPU_LIMIT: "ends by the session CPU ceiling",
    Reason.SECCOMP: "is killed by the seccomp filter (a forbidden system call)",
    Reason.CRASH: "crashes its sandbox",
    Reason.PROTOCOL: "breaks the sandbox protocol",
    Reason.COMPILE_ERROR: "does not compile",
}


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _ceiling(reason: Reason) -> Callable[[Run], Said | None]:
    return lambda run: (CEILING_WORDS[reason], 0) if run.reason == reason else None


def _linger(run: Run) -> Said | None:
    if run.reason != Reason.LINGER:
        return None
    if "send/recv" in run.detail:
        return "keeps calling send/recv after the peer left", 0
    if run.after_left is None:  # the client stayed: a ceiling (--idle-timeout) closed the connection
        return "keeps running after its connection closed", 0
    return f"keeps running {run.after_left:.0f} s after the peer left", run.after_left


def _late(run: Run) -> Said | None:
    after = run.after_left
    if run.reason == Reason.LINGER or after is None or after <= AFTER_LEFT_WARN:
        return None
    return f"goes on {after:.1f} s after the peer left", after


def _error(run: Run) -> Said | None:
    if run.reason != Reason.SCRIPT_ERROR:
        return None
    return f"raises an error ({run.detail or 'no message'})", 0


def _logs(run: Run) -> Said | None:
    if run.log_lines <= LOG_BURST:
        return None
    text = f"logs {run.log_lines:,} lines per session (the broker drops what passes --log-burst {LOG_BURST})"
    return text, run.log_lines


def _memory(run: Run) -> Said | None:
    if run.memory is None or run.memory <= MEMORY_WARN or run.reason == Reason.MEMORY:
        return None
    return f"allocates up to {_mib(run.memory)}", run.memory


def _instructions(run: Run) -> Said | None:
    n = run.instructions
    if n is None or n <= INSTRUCTIONS_WARN or run.reason == Reason.INSTRUCTIONS:
        return None
    return f"runs {n:,} Lua instructions per session", n


def _cpu(run: Run) -> Said | None:
    if run.cpu is None or run.cpu <= CPU_WARN:
        return None
    return f"uses {run.cpu:.1f} s of CPU per session", run.cpu


def _spin(run: Run) -> Said | None:
    calls = sum(run.calls.values())
    if calls < SPIN_CALLS or run.duration <= 0 or calls / run.duration < SPIN_RATE:
        return None
    top = max(run.calls, key=lambda name: run.calls[name])
    rate = calls / run.duration
    return f"spins on API calls ({rate:,.0f} a second, most of them {top})", rate


def _transcript(run: Run) -> Said | None:
    return (f"does not pass it: {run.transcript_failure}", 0) if run.transcript_failure else None


RULES: Final[tuple[Rule, ...]] = (
    *(
        Rule(reason.value, FAIL, _ceiling(reason))
        for reason in (
            Reason.COMPILE_ERROR,
            Reason.INSTRUCTIONS,
            Reason.MEMORY,
            Reason.CPU_DEADLINE,
            Reason.CPU_LIMIT,
            Reason.SECCOMP,
            Reason.CRASH,
            Reason.PROTOCOL,
        )
    ),
    Rule("linger", FAIL, _linger),
    Rule("after-left", WARN, _late),
    Rule("script-error", WARN, _error),
    Rule("log-flood", WARN, _logs),
    Rule("memory", WARN, _memory),
    Rule("instructions", WARN, _instructions),
    Rule("cpu", WARN, _cpu),
    Rule("spin", WARN, _spin),
    Rule("transcript", WARN, _transcript),
)


def _joined(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def findings(runs: Sequence[Run]) -> list[Finding]:
    """What the rules saw, one finding per rule: the words of its worst run, and every run it saw."""
    out = []
    for rule in RULES:
        said = [(s, run) for run in runs if (s := rule.says(run)) is not None]
        if not said:
            continue
        (text, _), _run = max(said, key=lambda pair: pair[0][1])
        shown = [run.words for _, run in said]
        if len(runs) > 2 and len(shown) == len(runs):
            text = f"{text} whatever the client does ({len(runs)} of {len(runs)} runs)"
        else:
            text = f"{text} {_joined(shown)}"
            if len(runs) > 2 and len(shown) > 1:
                text += f" ({len(shown)} of {len(runs)} runs)"
        out.append(Finding(rule.code, rule.severity, text, [run.behaviour for _, run in said]))
    return out


# `deadend check`'s problems that say a script reaches for what the sandbox forbids, rather than for a
# name it lacks: those fail, the others warn.
FORBIDDEN_MARKS: Final = (
    "files are not reachable",
    "modules cannot be loaded",
    "code cannot be compiled at run time",
    "the debug library",
    "coroutines are not available",
    "the collector cannot be driven",
    "no Python object",
    "string.dump",
    ":dump",
    "only os.time/date/clock/difftime exist",
    "does not compile",
)


def static_findings(problems: Iterable[str]) -> list[Finding]:
    """`deadend check`'s problems as findings (they are escaped already)."""
    out = []
    for problem in problems:
        severity = FAIL if any(mark in problem for mark in FORBIDDEN_MARKS) else WARN
        out.append(Finding("static", severity, f"check: {problem}"))
    return out


def verdict(found: Iterable[Finding]) -> str:
    worst = "ok"
    for finding in found:
        if SEVERITY_ORDER[finding.severity] > SEVERITY_ORDER[worst]:
            worst = finding.severity
    return worst


@dataclass(slots=True)
class Report:
    file: str
    seed: int
    runs: list[Run]
    static: dict[str, Any]  # `deadend check`'s report of the file, as its JSON
    findings: list[Finding] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return verdict(self.findings)

    def to_json(self, budget: Mapping[str, float]) -> dict[str, Any]:
        return {
            "file": self.file,
            "verdict": self.verdict,
            "findings": [asdict(f) for f in self.findings],
            "seed": self.seed,
            "budget": dict(budget),
            "runs": [run.to_json() for run in self.runs],
            "check": self.static,
        }


def judge(
    file: str, seed: int, runs: list[Run], static: Mapping[str, Any], unreadable: Iterable[str] = ()
) -> Report:
    """The report of one script: `deadend check`'s report as JSON, the runs, and the script's transcripts
    that could not be read (each a warning: the plausible client it meant is missing)."""
    problems = static.get("problems", [])
    report = Report(file, seed, runs, dict(static))
    report.findings = static_findings(problems) + findings(runs)
    report.findings += [Finding("transcript", WARN, f"cannot play {why}") for why in unreadable]
    report.findings.sort(key=lambda f: -SEVERITY_ORDER[f.severity])
    return report


# --- the text report --------------------------------------------------------------------------------------

COLUMNS: Final = ("run", "end", "ttfb", "cpu", "heap", "instructions", "calls", "logs", "sent", "after-left")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1 << 20 else _mib(n)


def run_row(run: Run) -> tuple[str, ...]:
    # who closed, when the script returned: the client first, or the script (neither: nobody)
    end = f"done ({run.closed_by})" if run.reason == Reason.DONE and run.closed_by != "-" else run.reason
    return (
        run.behaviour,
        end,
        _ms(run.ttfb),
        _ms(run.cpu),
        _size(run.memory),
        "-" if run.instructions is None else f"{run.instructions:,}",
        f"{sum(run.calls.values()):,}",
        f"{run.log_lines:,}",
        _size(run.bytes_sent),
        _ms(run.after_left),
    )


def table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def render(report: Report) -> str:
    lines = [f"{sanitize(report.file)}: {report.verdict}"]
    mark = {FAIL: "✗", WARN: "!"}
    lines += [f"  {mark[f.severity]} {f.text}" for f in report.findings]
    if report.runs:
        lines += table([COLUMNS, *(run_row(run) for run in report.runs)])
    return "\n".join(lines)


def budget_line(budget: Mapping[str, float], seed: int) -> str:
    shown = ", ".join(
        f"--{name} {value:,}" if isinstance(value, int) else f"--{name} {value:g}"
        for name, value in budget.items()
    )
    return f"audit budget: {shown}; seed {seed} (a run's: {seed} and the CRC-32 of its name)"


# --- --diff: what changed between two versions -----------------------------------------------------------


@dataclass(slots=True)
class Change:
    code: str  # calls | end | logs | memory | instructions | cpu | bytes
    text: str


def _grew(old: float | None, new: float | None, factor: float, floor: float) -> bool:
    """`new` differs from `old` by more than `factor` times and by more than `floor` (noise aside)."""
    if old is None or new is None or abs(new - old) <= floor:
        return False
    low, high = sorted((old, new))
    return high > low * factor


def _first_difference(a: bytes, b: bytes) -> int | None:
    """Where two byte strings differ, unless one is a prefix of the other (timing: more of the same)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None


def diff(old: Report, new: Report) -> list[Change]:
    """What the new version does differently, run by run (the runs are paired by name)."""
    changes: list[Change] = []
    old_calls = {name for run in old.runs for name in run.calls}
    new_calls = {name for run in new.runs for name in run.calls}
    for name in sorted(new_calls - old_calls):
        runs = [run.words for run in new.runs if name in run.calls]
        changes.append(Change("calls", f"now calls deadend.{name} {_joined(runs)}"))
    for name in sorted(old_calls - new_calls):
        changes.append(Change("calls", f"no longer calls deadend.{name}"))
    before = {run.behaviour: run for run in old.runs}
    for run in new.runs:
        was = before.get(run.behaviour)
        if was is None:
            continue
        changes += _run_changes(was, run)
    return changes


def _run_changes(was: Run, run: Run) -> list[Change]:
    out = []
    w = run.words
    if was.reason != run.reason:
        out.append(Change("end", f"ends {run.reason} (was {was.reason}) {w}"))
    if _grew(was.log_lines, run.log_lines, 2, 20):
        out.append(Change("logs", f"logs {run.log_lines:,} lines instead of {was.log_lines:,} {w}"))
    if _grew(was.memory, run.memory, 2, 1 << 20):
        assert was.memory is not None and run.memory is not None
        out.append(Change("memory", f"peak heap {_mib(run.memory)} instead of {_mib(was.memory)} {w}"))
    if _grew(was.instructions, run.instructions, 2, 1_000_000):
        out.append(
            Change(
                "instructions", f"runs {run.instructions:,} instructions instead of {was.instructions:,} {w}"
            )
        )
    if _grew(was.cpu, run.cpu, 3, 0.2):
        out.append(Change("cpu", f"uses {run.cpu:.2f} s of CPU instead of {was.cpu:.2f} s {w}"))
    at = _first_difference(was.got, run.got)
    if at is not None:
        out.append(Change("bytes", f"sends different bytes {w} (from offset {at:,})"))
    return out


def render_diff(old: Report, new: Report, changes: Sequence[Change]) -> str:
    head = f"{sanitize(old.file)} ({old.verdict}) → {sanitize(new.file)} ({new.verdict}): "
    if not changes:
        return head + "no change in behaviour"
    return "\n".join([head + f"{len(changes)} change(s)", *(f"  ~ {c.text}" for c in changes)])
