"""Transcripts: a small text format for one conversation with a script, and its parser (pure, no I/O but
`load`). docs/transcripts.md is the full reference.

    # comment; blank lines are ignored
    % allow-clock | peer-ip ADDR | seed HI LO | timeout MS     options, before the first exchange
    % tls | sni NAME | alpn LIST                  TLS from the start; the client's SNI and ALPN offers
    > TEXT        the client sends TEXT and CRLF
    >| TEXT       the client sends TEXT exactly
    >* N TEXT     the client sends TEXT and CRLF, N times
    >|* N TEXT    the client sends TEXT exactly, N times
    < TEXT        the server sends a line equal to TEXT (without its CRLF or LF)
    <~ REGEX      the server sends a line that REGEX matches completely
    <| TEXT       the server sends exactly these bytes next
    <~| REGEX     the server's next bytes start with a match of REGEX (no line end needed)
    <* REGEX      skip server lines until one that REGEX matches completely
    @ within MS   the next expectation is met within MS ms of the previous step
    @ after MS    ... and not sooner than MS ms
    ! close       the client closes the connection
    ! shutdown    the client stops sending (half-close) and goes on reading
    ! starttls    the client starts TLS (the script's deadend.starttls() takes its ClientHello)
    = eof         the server closes the connection: nothing more arrives
    ~ log REGEX   by the end, a script log line "LEVEL MESSAGE" (escaped as in the log) matches REGEX

TEXT takes the escapes \\r \\n \\t \\\\ \\xNN and \\s (a space). REGEX is Python `re` syntax, matched against
the bytes (non-ASCII in a pattern is UTF-8). Transcripts are shared between operators, so they are hostile
input too: a raw control, bidi or invisible character is refused (write it as an escape), every number is
bounded, and the parser raises TranscriptError and nothing else.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from deadend.logs import first_hidden, sanitize
from deadend.proxy import peer_address
from deadend.wire import SEED_MAX, check_alpn

DEFAULT_TIMEOUT_MS: Final = 5000.0
DEFAULT_PEER_IP: Final = "192.0.2.10"  # TEST-NET-1: what deadend.get_ip() returns without `% peer-ip`
MAX_MS: Final = 30 * 86400 * 1000.0  # the longest --session-time
MAX_SEND_BYTES: Final = 64 << 20  # everything one transcript makes the client send, repeats included
MAX_FILE_BYTES: Final = 16 << 20
LOOKAHEAD: Final = 64 << 10  # server bytes a line (`<` `<~` `<*`) or a `<~|` match may span

# What a terminal or an editor would not show as written: C0 (but tab) and C1 controls, DEL, bidi
# controls and overrides, zero-width characters, line separators, lone surrogates. deadend.logs.sanitize
# escapes the same set (and backslashes): a line that passes this check is shown as it is.
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|[rnts\\])")
_SIMPLE = {"r": b"\r", "n": b"\n", "t": b"\t", "s": b" ", "\\": b"\\"}
_MS = re.compile(r"[0-9]{1,13}(?:\.[0-9]{1,6})?")
_COUNT = re.compile(r"[1-9][0-9]{0,9}")
_SEED = re.compile(r"0|[1-9][0-9]{0,18}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")  # what an SNI carries (RFC 6066 3)


class TranscriptError(Exception):
    """Where a transcript is wrong and why; its text is safe to print (the path is escaped)."""

    def __init__(self, path: str, line: int | None, message: str, column: int | None = None) -> None:
        self.path, self.line, self.column, self.message = path, line, column, message
        where = sanitize(path) if line is None else f"{sanitize(path)}:{line}"
        super().__init__(f"{where}: {'' if column is None else f'column {column}: '}{message}")


class _Bad(ValueError):
    """A problem on the line being read, with its column (1-based) when there is one."""

    def __init__(self, message: str, column: int | None = None) -> None:
        super().__init__(message)
        self.column = column


@dataclass(frozen=True, slots=True)
class Step:
    line: int  # where it is in the transcript, for reports
    # send | expect_line | expect_match | expect_bytes | expect_prefix | skip_until | close | shutdown |
    # starttls | eof
    kind: str
    data: bytes = b""
    pattern: re.Pattern[bytes] | None = None
    within_ms: float | None = None
    after_ms: float | None = None
    source: str = ""  # the transcript line as written (the parser refused anything unsafe to show)
    repeat: int = 1  # send: how many times `data` goes out


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
    peer_ip: str = DEFAULT_PEER_IP
    timeout_ms: float = DEFAULT_TIMEOUT_MS
    seed: tuple[int, int] | None = None  # the script's PRNG seed; None: a fresh one, as the broker does
    tls: bool = False  # TLS from the start: a starttls before the first step
    sni: str | None = None  # the server name the client's ClientHello asks for
    alpn: tuple[str, ...] = ()  # the protocols it offers


def unescape(text: str, column: int = 1) -> bytes:
    """TEXT as bytes; ValueError naming the escape and its column (`text` starts at `column`)."""
    out, pos = bytearray(), 0
    while (i := text.find("\\", pos)) >= 0:
        out += text[pos:i].encode()
        m = _ESCAPE.match(text, i)
        if m is None:
            raise _Bad(_escape_problem(text, i), column + i)
        code = m.group(1)
        out += bytes([int(code[1:], 16)]) if code[0] == "x" else _SIMPLE[code]
        pos = m.end()
    return bytes(out + text[pos:].encode())


def _escape_problem(text: str, i: int) -> str:
    if i + 1 == len(text):
        return "a lone '\\' at the end of the text: write '\\\\' for a backslash"
    after = text[i + 1]
    if after == "x":
        return f"'\\x' needs two hex digits, not {_shown(text[i + 2 : i + 4])!r}"
    return f"unknown escape '\\{_char(after)}' (the escapes are \\r \\n \\t \\s \\\\ \\xNN)"


def _char(c: str) -> str:
    return c if c.isascii() and c.isprintable() else f"U+{ord(c):04X}"


def _shown(text: str, limit: int = 60) -> str:
    return sanitize(text.encode("utf-8", "backslashreplace"), limit)


def parse(text: str, path: str = "<transcript>") -> Transcript:
    """The transcript in `text`; TranscriptError (path, line, column, message) at the first problem."""
    t = Transcript(path)
    timing: dict[str, float] = {}
    timing_line = 0
    started = False
    sent = 0
    # Lines end at "\n" only: str.splitlines would also split at characters such as U+2028 or \x1c.
    for number, raw in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
        line = raw.removesuffix("\r")
        try:
            if (bad := first_hidden(line, allowed="\t")) is not None:
                raise _Bad(
                    f"a raw U+{ord(line[bad]):04X} character, which a terminal or an editor would not "
                    "show as written: write it as an escape (\\xNN for its UTF-8 bytes)",
                    bad + 1,
                )
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            head, _, rest = line.partition(" ")
            at = len(head) + 2  # the column where `rest` starts
            if head == "%":
                if started:
                    raise _Bad("options must come before the first exchange")
                _option(t, rest, at)
                continue
            if head == "@":
                word, _, value = rest.partition(" ")
                if word not in ("within", "after"):
                    raise _Bad("expected '@ within MS' or '@ after MS'", at)
                timing[word] = _ms(value, f"'@ {word}'", at + len(word) + 1)
                timing_line = number
                if timing.get("after", 0) > timing.get("within", MAX_MS):
                    raise _Bad(f"'@ after {timing['after']:g}' is later than '@ within {timing['within']:g}'")
                continue
            if head == "~":
                word, _, regex = rest.partition(" ")
                if word != "log":
                    raise _Bad("expected '~ log REGEX'", at)
                t.logs.append(LogExpectation(number, _compile(regex, at + 4), line))
                continue
            started = True
            step = _step(head, rest, number, line, at)
            if step.kind in ("send", "close", "shutdown", "starttls") and timing:
                raise _Bad("'@' timing applies to an expectation, not to a client action")
            sent += len(step.data) * step.repeat if step.kind == "send" else 0
            if sent > MAX_SEND_BYTES:
                raise _Bad(
                    f"the client would send {sent} bytes in all; a transcript may send {MAX_SEND_BYTES}"
                )
        except _Bad as e:
            raise TranscriptError(path, number, str(e), e.column) from None
        if timing:
            step = dataclasses.replace(step, within_ms=timing.get("within"), after_ms=timing.get("after"))
            timing = {}
        t.steps.append(step)
    if timing:
        raise TranscriptError(path, timing_line, "'@' timing with no expectation after it")
    return t


def _option(t: Transcript, rest: str, at: int) -> None:
    name, _, value = rest.partition(" ")
    at_value = at + len(name) + 1
    if name == "allow-clock":
        if value.strip():
            raise _Bad("'% allow-clock' takes no value", at_value)
        t.allow_clock = True
    elif name == "peer-ip":
        try:
            t.peer_ip = peer_address(value.strip())
        except ValueError:
            raise _Bad(
                f"'% peer-ip' needs an IP address without a scope id, not {_shown(value)!r}", at_value
            ) from None
    elif name == "timeout":
        t.timeout_ms = _ms(value, "'% timeout'", at_value)
        if t.timeout_ms == 0:
            raise _Bad("'% timeout' must be more than 0 ms", at_value)
    elif name == "seed":
        halves = value.split(" ")
        if len(halves) != 2 or not all(_SEED.fullmatch(h) and int(h) <= SEED_MAX for h in halves):
            raise _Bad(f"'% seed' needs two whole numbers in 0..{SEED_MAX}, not {_shown(value)!r}", at_value)
        t.seed = (int(halves[0]), int(halves[1]))
    elif name == "tls":
        if value.strip():
            raise _Bad("'% tls' takes no value", at_value)
        t.tls = True
    elif name == "sni":
        if not _HOST_NAME.fullmatch(value.strip()):
            raise _Bad(f"'% sni' needs a DNS name such as www.example.com, not {_shown(value)!r}", at_value)
        t.sni = value.strip()
    elif name == "alpn":
        names = value.strip()
        if not names or not check_alpn(names.encode()):
            raise _Bad(
                f"'% alpn' needs protocol names separated by commas (h2,http/1.1), not {_shown(value)!r}",
                at_value,
            )
        t.alpn = tuple(names.split(","))
    else:
        raise _Bad(
            f"unknown option {_shown(name)!r} (allow-clock, peer-ip, seed, timeout, tls, sni, alpn)", at
        )


def _ms(value: str, what: str, column: int) -> float:
    if not _MS.fullmatch(value.strip()):
        raise _Bad(f"{what} needs a number of milliseconds such as 250 or 1.5, not {_shown(value)!r}", column)
    ms = float(value)
    if ms > MAX_MS:
        raise _Bad(f"{what} {ms:g} is more than {MAX_MS:.0f} ms (30 days)", column)
    return ms


def _compile(source: str | bytes, column: int) -> re.Pattern[Any]:
    try:
        return re.compile(source)
    except re.error as e:
        raise _Bad(f"bad regex: {e.msg}", column + (e.pos or 0)) from None
    except (OverflowError, RecursionError, ValueError) as e:  # a huge repeat count, deep nesting
        raise _Bad(f"bad regex: {_shown(str(e))}", column) from None


def _step(head: str, rest: str, number: int, line: str, at: int) -> Step:
    def text(value: str, column: int) -> bytes:
        return unescape(value, column)

    def regex(value: str) -> re.Pattern[bytes]:
        return _compile(value.encode(), at)

    def repeated(crlf: bytes) -> Step:
        count, _, value = rest.partition(" ")
        if not _COUNT.fullmatch(count):
            raise _Bad(f"'{head} N TEXT' needs a count N of 1 or more, not {_shown(count)!r}", at)
        data = text(value, at + len(count) + 1) + crlf
        return Step(number, "send", data, source=line, repeat=int(count))

    if head == ">":
        return Step(number, "send", text(rest, at) + b"\r\n", source=line)
    if head == ">|":
        return Step(number, "send", text(rest, at), source=line)
    if head == ">*":
        return repeated(b"\r\n")
    if head == ">|*":
        return repeated(b"")
    if head == "<":
        return Step(number, "expect_line", text(rest, at), source=line)
    if head == "<~":
        return Step(number, "expect_match", pattern=regex(rest), source=line)
    if head == "<|":
        return Step(number, "expect_bytes", text(rest, at), source=line)
    if head == "<~|":
        return Step(number, "expect_prefix", pattern=regex(rest), source=line)
    if head == "<*":
        return Step(number, "skip_until", pattern=regex(rest), source=line)
    if head == "!" and rest.strip() in ("close", "shutdown", "starttls"):
        return Step(number, rest.strip(), source=line)
    if head == "=" and rest.strip() == "eof":
        return Step(number, "eof", source=line)
    raise _Bad(f"cannot read {_shown(line)!r}: not a directive (see docs/transcripts.md)", 1)


def load(path: Path) -> Transcript:
    """Read and parse a transcript file; TranscriptError if it is malformed, OSError if unreadable."""
    # O_NONBLOCK: a FIFO named as a transcript must not hang the run; it is refused just below.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TranscriptError(str(path), None, "not a regular file")
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise TranscriptError(str(path), None, f"larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise TranscriptError(str(path), line, f"byte 0x{data[e.start]:02x} is not UTF-8", column) from None
    return parse(text, str(path))
