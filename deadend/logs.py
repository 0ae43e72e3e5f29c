r"""Log events: one line per event on stdout, in a form an attacker cannot break or forge.

Text line (the default): `<ISO-8601 UTC time> <LEVEL> port=<port> conn=<id> peer=<ip> <message>`; a
script's own line reads `... script: "<its text>"`, quoted, so no script text can pass for the broker's
fields. JSON line (`--log-format json`): one object with the event's name and fields (deadend/events.py),
encoded ASCII-only so no raw control, bidi or line-separator character can reach the output. ECS line
(`--log-format ecs`): the same object in Elastic Common Schema's names (deadend/ecs.py). Every event also
goes to the sinks (`forward`), as JSON whatever stdout shows.

Whatever a script or a client controls is escaped by Unicode category, not by a list: control (Cc),
format (Cf: bidi controls, zero-width characters, the tag block), surrogate (Cs: undecodable bytes),
private-use (Co), unassigned (Cn), line and paragraph separators (Zl, Zp), spaces other than the ASCII
space (Zs), and the few Default_Ignorable_Code_Point characters outside those categories (fillers and
variation selectors that render as nothing) become `\xNN`, `\uNNNN` or `\UNNNNNNNN`; backslashes are
doubled; invalid UTF-8 bytes become `\xNN`. Then the text is cut at 4 KiB (of escaped UTF-8), whole
escapes only, with a marker: a line's size is bounded whatever the input.
"""

from __future__ import annotations

import contextlib
import functools
import json
import queue
import re
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TextIO

from deadend.ecs import ecs_document
from deadend.events import EVENTS, SCHEMA_VERSION
from deadend.ids import uuid7
from deadend.wire import FIELD_MAX, IGNORABLE_RANGES, LOG_LEVELS, LOG_MAX, UNSAFE_CATEGORIES

BATCH_DELAY: Final = 0.005  # seconds the writer waits after a first line for more to join it

LEVEL_ORDER: Final = {name: i for i, name in enumerate(LOG_LEVELS)}
CUT_MARKER: Final = "…[cut]"

_ASCII_UNSAFE = re.compile(r"[\x00-\x1f\x7f\\]")
_ANY_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\U0010ffff\\]")


@functools.lru_cache(maxsize=4096)
def _escape_char(c: str) -> str:
    """One character as it is shown: itself, or its escape."""
    code = ord(c)
    if c == "\\":
        return "\\\\"
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if 0x20 <= code < 0x7F:
        return c
    unsafe = unicodedata.category(c) in UNSAFE_CATEGORIES or any(
        lo <= code <= hi for lo, hi in IGNORABLE_RANGES
    )
    if not unsafe:
        return c
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def first_hidden(text: str, allowed: str = "") -> int | None:
    """Where the first character is that a terminal would not show as written (sanitize escapes it; the
    backslash, which sanitize doubles, aside), or None. `allowed`: characters to let through (a tab)."""
    for m in _ANY_UNSAFE.finditer(text):
        c = m.group()
        if c != "\\" and c not in allowed and (0xD800 <= ord(c) <= 0xDFFF or _escape_char(c) != c):
            return m.start()
    return None


def _escape(match: re.Match[str]) -> str:
    return _escape_char(match.group())


# How many characters an escape sequence spans, by the character after its backslash.
_ESCAPE_WIDTH: Final = {"\\": 2, '"': 2, "x": 4, "u": 6, "U": 10}


def _cut(text: str, limit: int) -> str:
    """The longest prefix of escaped `text` within `limit` UTF-8 bytes that splits no escape."""
    size = i = 0
    while i < len(text):
        width = _ESCAPE_WIDTH[text[i + 1]] if text[i] == "\\" else 1
        piece = text[i : i + width]
        size += len(piece.encode("utf-8"))
        if size > limit:
            break
        i += width
    return text[:i]


def sanitize(
    text: bytes | str, limit: int | None = LOG_MAX, *, quote: bool = False, cut: bool = False
) -> str:
    """Make untrusted text safe for a one-line log: escaped, then cut at `limit` bytes with a marker.

    `limit` None: never cut (the caller bounds the input). `quote`: the text goes between double quotes,
    so `"` is escaped too (within the limit). `cut`: the text was cut before it got here (the marker is
    added whatever happens here).
    """
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
    if limit is not None:
        # Every input byte yields at least one output byte: what lies past `limit` could never be shown.
        cut = cut or len(raw) > limit
        raw = raw[:limit]
    s = raw.decode("utf-8", "surrogateescape")
    s = (_ASCII_UNSAFE if s.isascii() else _ANY_UNSAFE).sub(_escape, s)
    if quote:
        s = s.replace('"', '\\"')
    if limit is not None and (len(s) > limit or (not s.isascii() and len(s.encode("utf-8")) > limit)):
        s, cut = _cut(s, limit), True
    return s + CUT_MARKER if cut else s


# A script's line in the text format (its fields, if any, after the quoted text), and how that text reads
# back (every backslash in it starts an escape, so the quotes' escapes can be undone alone, left to right).
SCRIPT_LINE: Final = re.compile(r'^\S+ (\w+)\s+port=\S+ conn=\S+ peer=\S+ script: "((?:[^"\\]|\\.)*)"(.*)$')
_QUOTE_ESCAPE: Final = re.compile(r"\\(.)")


def unquote(shown: str) -> str:
    """A script's quoted text as `sanitize(..., quote=True)` showed it, less the quotes' escapes."""
    return _QUOTE_ESCAPE.sub(lambda m: m.group(1) if m.group(1) == '"' else m.group(0), shown)


# The last second's text, kept: an event stamp is then one division and one format, not a strftime
# (half of a text line's cost). One tuple, so that threads stamping at once read a consistent pair.
_second: tuple[int, str] = (-1, "")


def utc_timestamp(now: float | None = None) -> str:
    global _second
    seconds, ms = divmod(round((time.time() if now is None else now) * 1000), 1000)
    second = _second
    if second[0] != seconds:
        second = _second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return f"{second[1]}.{ms:03d}Z"


@dataclass(frozen=True, slots=True)
class Where:
    """Which connection an event belongs to; '-' for broker-wide events."""

    port: int | None = None
    conn: str = "-"
    peer: str = "-"
    peer_port: int | None = None
    # The address the client reached: the accepted socket's own, or what a PROXY header names.
    dst_ip: str | None = None
    dst_port: int | None = None
    quiet: bool = False  # a peer in an --ignore network: its events reach observers but are not written


BROKER: Final = Where()

Fields = Mapping[str, object]
ScriptFields = Sequence[tuple[str, bytes | int | bool]]  # deadend.log's third argument, checked (wire.py)


def _shown(value: object) -> str:
    """A script field's value in a text line: strings (escaped already) quoted, the rest as Lua shows them."""
    if isinstance(value, str):
        return f'"{value}"'
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


Observer = Callable[[str, Where, Fields], None]  # (event, where, fields), called in the emitting thread


# A formatter: (id, time, level, sensor, where, event, message, fields) -> one line.
Formatter = Callable[[str, str, str, str, Where, str, str, Fields], str]


def text_line(
    ident: str, time: str, level: str, sensor: str, where: Where, event: str, message: str, fields: Fields
) -> str:
    port = "-" if where.port is None else str(where.port)
    return f"{time} {level.upper():5} port={port} conn={where.conn} peer={where.peer} {message}\n"


def json_record(
    ident: str, time: str, level: str, sensor: str, where: Where, event: str, message: str, fields: Fields
) -> dict[str, object]:
    """The event as one JSON object: the base fields of deadend/events.py, then the event's own."""
    record: dict[str, object] = {
        "v": SCHEMA_VERSION,
        "id": ident,
        "time": time,
        "level": level,
        "event": event,
        "sensor": sensor,
        "port": where.port,
        "conn": None if where.conn == "-" else where.conn,
        "peer": None if where.peer == "-" else where.peer,
        "peer_port": where.peer_port,
        "dst_ip": where.dst_ip,
        "dst_port": where.dst_port,
        "msg": message,
    }
    record.update(fields)  # field names come from EVENTS, never from input, and never shadow the above
    return record


def json_line(
    ident: str, time: str, level: str, sensor: str, where: Where, event: str, message: str, fields: Fields
) -> str:
    record = json_record(ident, time, level, sensor, where, event, message, fields)
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n"


def ecs_line(
    ident: str, time: str, level: str, sensor: str, where: Where, event: str, message: str, fields: Fields
) -> str:
    document = ecs_document(json_record(ident, time, level, sensor, where, event, message, fields))
    return json.dumps(document, ensure_ascii=True, separators=(",", ":")) + "\n"


FORMATTERS: Final[dict[str, Formatter]] = {"text": text_line, "json": json_line, "ecs": ecs_line}
# What the sinks carry: the JSON object of the stdout format when it is one, else the deadend JSON form.
_BODY: Final[dict[str, Formatter]] = {"text": json_line, "json": json_line, "ecs": ecs_line}
# (id, time, level, event name, body): an event on its way to the sinks (ASCII JSON, no newline)
Forward = Callable[[str, str, str, str, bytes], None]


class EventLog:
    """The broker's single sink for events. `message` must already be safe (use `sanitize`).

    Lines go through a bounded queue to a writer thread: a slow or stopped reader of stdout (a paused
    terminal, a stuck log shipper) must never stall the event loop, whose timers enforce the ceilings.
    When the queue is full, lines are dropped and their number is reported once the writer catches up.
    Scripts' own lines may fill at most SCRIPT_SHARE of it, and one session's at most SESSION_SHARE: a
    session logging in bursts cannot push out other sessions' lines, nor the broker's (session ends).
    """

    QUEUE_BYTES = 2 << 20  # what may wait for a slow stdout; bounded in bytes
    SCRIPT_SHARE = QUEUE_BYTES * 3 // 4
    SESSION_SHARE = QUEUE_BYTES // 16

    def __init__(
        self, stream: TextIO | None = None, level: str = "info", fmt: str = "text", sensor: str = "-"
    ) -> None:
        self.stream = stream or sys.stdout
        self.threshold = LEVEL_ORDER[level]
        self.format = FORMATTERS[fmt]
        self.body = _BODY[fmt]
        self.sensor = sensor
        # Every event written, also handed here (the sinks), in the emitting thread, before the stdout
        # queue's shares are applied: a stuck stdout must not cost the collectors their events.
        self.forward: Forward | None = None
        self.quoted = fmt == "text"  # a script's text is shown between quotes
        self.observers: list[Observer] = []  # e.g. the metrics: they see every event, quiet ones included
        self._queue: queue.SimpleQueue[tuple[str, str | None] | threading.Event | None] = queue.SimpleQueue()
        self._queued_bytes = 0
        self._script_bytes = 0
        self._per_session: dict[str, int] = {}  # a session's script lines waiting in the queue, in bytes
        self._dropped = 0
        self.dropped_total = 0  # for the metrics
        self._lock = threading.Lock()
        self._writer = threading.Thread(target=self._drain, name="deadend-log", daemon=True)
        self._writer.start()

    def emit(self, level: str, where: Where, event: str, message: str, /, **fields: object) -> None:
        """Log one event. `message` and string fields must already be safe (use `sanitize`)."""
        self._emit(level, where, event, message, fields, None)

    def script_line(
        self, level: str, where: Where, text: bytes, cut: bool, fields: ScriptFields = ()
    ) -> bool:
        """A line a script logged (escaped and cut here); False if it was dropped: its session already
        has SESSION_SHARE waiting, or scripts together have SCRIPT_SHARE."""
        shown = sanitize(text, quote=self.quoted, cut=cut)
        values = {k: sanitize(v, FIELD_MAX, quote=self.quoted) if type(v) is bytes else v for k, v in fields}
        if self.quoted:
            message = f'script: "{shown}"' + "".join(f" {k}={_shown(v)}" for k, v in values.items())
        else:
            message = shown
        return self._emit(level, where, "script.log", message, {"fields": values}, where.conn)

    def _emit(
        self, level: str, where: Where, event: str, message: str, fields: Fields, session: str | None
    ) -> bool:
        assert event in EVENTS and fields.keys() == EVENTS[event][1].keys(), (event, sorted(fields))
        for observe in self.observers:
            observe(event, where, fields)
        if where.quiet or LEVEL_ORDER[level] < self.threshold:
            return True
        # The text format shows no id: one is made only when a line or a sink carries it.
        ident = uuid7() if self.forward is not None or self.format is not text_line else ""
        stamp = utc_timestamp()
        line = self.format(ident, stamp, level, self.sensor, where, event, message, fields)
        if self.forward is not None:
            body = (
                line
                if self.body is self.format
                else self.body(ident, stamp, level, self.sensor, where, event, message, fields)
            )
            self.forward(ident, stamp, level, event, body.rstrip("\n").encode("ascii"))
        size = len(line)
        with self._lock:
            if self._queued_bytes + size > self.QUEUE_BYTES or (
                session is not None
                and (
                    self._script_bytes + size > self.SCRIPT_SHARE
                    or self._per_session.get(session, 0) + size > self.SESSION_SHARE
                )
            ):
                if session is None:  # a script's dropped lines are counted and reported by its session
                    self._dropped += 1
                    self.dropped_total += 1
                return False
            self._queued_bytes += size
            if session is not None:
                self._script_bytes += size
                self._per_session[session] = self._per_session.get(session, 0) + size
        self._queue.put((line, session))
        return True

    def _drain(self) -> None:
        while True:
            items = [self._queue.get()]
            if isinstance(items[0], tuple):
                # Let a burst gather: one wake-up and one write per batch instead of a GIL hand-off per
                # line (measured: ~14% of the broker's CPU under load went to those hand-offs).
                time.sleep(BATCH_DELAY)
            with contextlib.suppress(queue.Empty):
                while len(items) < 128 and isinstance(items[-1], tuple):
                    items.append(self._queue.get_nowait())  # bounded batches: small transient buffers
            done = items[-1] is None
            flushed = items[-1] if isinstance(items[-1], threading.Event) else None
            lines = [item for item in items if isinstance(item, tuple)]
            text = "".join(line for line, _ in lines)
            with self._lock:
                dropped, self._dropped = self._dropped, 0
            if dropped:
                message = f"log output too slow: {dropped} lines dropped"
                ident, stamp, sensor = uuid7(), utc_timestamp(), self.sensor
                text += self.format(
                    ident, stamp, "warn", sensor, BROKER, "log.dropped", message, {"dropped": dropped}
                )
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed or broken stdout must not take the broker down
            self._written(lines)
            if flushed is not None:
                flushed.set()
            if done:
                return

    def _written(self, lines: list[tuple[str, str | None]]) -> None:
        """Lines are out: their bytes no longer count (only now, so a stuck write holds its batch's share)."""
        with self._lock:
            for line, session in lines:
                self._queued_bytes -= len(line)
                if session is not None:
                    self._script_bytes -= len(line)
                    left = self._per_session[session] - len(line)
                    if left:
                        self._per_session[session] = left
                    else:
                        del self._per_session[session]

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every line emitted so far has been written."""
        written = threading.Event()
        self._queue.put(written)
        written.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write out what is queued and stop the writer (waits at most `timeout` for a blocked stdout)."""
        if not self._writer.is_alive():
            return
        self._queue.put(None)
        self._writer.join(timeout)

    def debug(self, where: Where, event: str, message: str, /, **fields: object) -> None:
        self.emit("debug", where, event, message, **fields)

    def info(self, where: Where, event: str, message: str, /, **fields: object) -> None:
        self.emit("info", where, event, message, **fields)

    def warn(self, where: Where, event: str, message: str, /, **fields: object) -> None:
        self.emit("warn", where, event, message, **fields)

    def error(self, where: Where, event: str, message: str, /, **fields: object) -> None:
        self.emit("error", where, event, message, **fields)
