"""Transcripts: a small text format for one conversation with a script, and its parser (pure, no I/O).

    # comment; blank lines are ignored
    % allow-clock | peer-ip ADDR | timeout MS     options, before the first exchange
    > TEXT        the client sends TEXT and CRLF
    >| TEXT       the client sends TEXT exactly
    < TEXT        the server sends a line equal to TEXT (without its CRLF or LF)
    <~ REGEX      the server sends a line that REGEX matches completely
    <| TEXT       the server sends exactly these bytes next
    <* REGEX      skip server lines until one that REGEX matches completely
    @ within MS   the next expectation is met within MS ms of the previous step
    @ after MS    ... and not sooner than MS ms
    ! close       the client closes the connection
    ! shutdown    the client stops sending (half-close) and goes on reading
    = eof         the server closes the connection: nothing more arrives
    ~ log REGEX   by the end, a script log line "LEVEL MESSAGE" matches REGEX (search)

TEXT takes the escapes \\r \\n \\t \\\\ \\xNN and \\s (a space). REGEX is Python `re` syntax, matched against
the line's bytes (non-ASCII in a pattern is UTF-8).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TIMEOUT_MS = 5000.0


class TranscriptError(Exception):
    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")


@dataclass(frozen=True, slots=True)
class Step:
    line: int  # where it is in the transcript, for reports
    kind: str  # send | expect_line | expect_match | expect_bytes | skip_until | close | shutdown | eof
    data: bytes = b""
    pattern: re.Pattern[bytes] | None = None
    within_ms: float | None = None
    after_ms: float | None = None
    source: str = ""  # the transcript line as written


@dataclass(frozen=True, slots=True)
class LogExpectation:
    line: int
    pattern: re.Pattern[str]
    source: str


@dataclass(slots=True)
class Transcript:
    path: str
    steps: list[Step] = field(default_factory=list)
    logs: list[LogExpectation] = field(default_factory=list)
    allow_clock: bool = False
    peer_ip: str = "192.0.2.10"
    timeout_ms: float = DEFAULT_TIMEOUT_MS


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|[rnts\\])")
_SIMPLE = {"r": b"\r", "n": b"\n", "t": b"\t", "s": b" ", "\\": b"\\"}


def unescape(text: str) -> bytes:
    out, pos = bytearray(), 0
    for m in _ESCAPE.finditer(text):
        out += text[pos : m.start()].encode()
        code = m.group(1)
        out += bytes([int(code[1:], 16)]) if code[0] == "x" else _SIMPLE[code]
        pos = m.end()
    if "\\" in text[pos:]:
        raise ValueError(f"unknown escape in {text[pos:]!r}")
    return bytes(out + text[pos:].encode())


def parse(text: str, path: str = "<transcript>") -> Transcript:
    t = Transcript(path)
    within: float | None = None
    after: float | None = None
    started = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        head, _, rest = line.partition(" ")

        def fail(message: str, number: int = number) -> TranscriptError:
            return TranscriptError(path, number, message)

        try:
            if head == "%":
                if started:
                    raise fail("options must come before the first exchange")
                name, _, value = rest.partition(" ")
                if name == "allow-clock":
                    t.allow_clock = True
                elif name == "peer-ip":
                    t.peer_ip = value.strip()
                elif name == "timeout":
                    t.timeout_ms = float(value)
                else:
                    raise fail(f"unknown option {name!r}")
                continue
            if head == "@":
                word, _, value = rest.partition(" ")
                ms = float(value)
                if word == "within":
                    within = ms
                elif word == "after":
                    after = ms
                else:
                    raise fail("expected '@ within MS' or '@ after MS'")
                continue
            if head == "~":
                word, _, regex = rest.partition(" ")
                if word != "log":
                    raise fail("expected '~ log REGEX'")
                t.logs.append(LogExpectation(number, re.compile(regex), line))
                continue
            started = True
            step = _step(head, rest, number, line)
        except (ValueError, re.error) as e:
            raise TranscriptError(path, number, str(e)) from None
        if step.kind in ("send", "close", "shutdown") and (within is not None or after is not None):
            raise TranscriptError(
                path, number, "'@' timing applies to an expectation, not to a client action"
            )
        t.steps.append(_timed(step, within, after))
        within = after = None
    if within is not None or after is not None:
        raise TranscriptError(path, len(text.splitlines()), "'@' timing with no expectation after it")
    return t


def _step(head: str, rest: str, number: int, line: str) -> Step:
    def regex(text: str) -> re.Pattern[bytes]:
        return re.compile(text.encode())

    if head == ">":
        return Step(number, "send", unescape(rest) + b"\r\n", source=line)
    if head == ">|":
        return Step(number, "send", unescape(rest), source=line)
    if head == "<":
        return Step(number, "expect_line", unescape(rest), source=line)
    if head == "<~":
        return Step(number, "expect_match", pattern=regex(rest), source=line)
    if head == "<|":
        return Step(number, "expect_bytes", unescape(rest), source=line)
    if head == "<*":
        return Step(number, "skip_until", pattern=regex(rest), source=line)
    if head == "!" and rest.strip() in ("close", "shutdown"):
        return Step(number, rest.strip(), source=line)
    if head == "=" and rest.strip() == "eof":
        return Step(number, "eof", source=line)
    raise ValueError(f"cannot read {line!r}")


def _timed(step: Step, within: float | None, after: float | None) -> Step:
    if within is None and after is None:
        return step
    return Step(step.line, step.kind, step.data, step.pattern, within, after, step.source)


def load(path: Path) -> Transcript:
    return parse(path.read_text(), str(path))
