"""Log events: one line per event on stdout, in a form an attacker cannot break or forge.

Text line (the default): `<ISO-8601 UTC time> <LEVEL> port=<port> conn=<id> peer=<ip> <message>`.
JSON line (`--log-format json`): one object with the event's name and fields (deadend/events.py), encoded
ASCII-only so no raw control, bidi or line-separator character can reach the output.
Whatever a script or a client controls is escaped: control characters, bidi overrides and line separators
become `\\xNN`/`\\uNNNN`, backslashes are doubled, invalid UTF-8 bytes become `\\xNN`, and a message is
cut at 4 KiB with a marker.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, TextIO

from deadend.events import EVENTS, SCHEMA_VERSION
from deadend.wire import LOG_LEVELS, LOG_MAX

LOG_FORMATS: Final = ("text", "json")
BATCH_DELAY: Final = 0.005  # seconds the writer waits after a first line for more to join it

LEVEL_ORDER: Final = {name: i for i, name in enumerate(LOG_LEVELS)}
CUT_MARKER: Final = "…[cut]"

# C0 and C1 controls, DEL, bidi controls and overrides, zero-width and line/paragraph separators, the
# surrogates that `surrogateescape` uses for undecodable bytes, and the backslash itself.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\udc80-\udcff\\]")


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    if c == "\\":
        return "\\\\"
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def sanitize(text: bytes | str, limit: int = LOG_MAX) -> str:
    """Make untrusted text safe for a one-line log: escaped, and cut at `limit` bytes with a marker."""
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
    cut = len(raw) > limit
    s = raw[:limit].decode("utf-8", "surrogateescape")
    s = _UNSAFE.sub(_escape_char, s)
    return s + CUT_MARKER if cut else s


def utc_timestamp(now: float | None = None) -> str:
    seconds, ms = divmod(round((time.time() if now is None else now) * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


@dataclass(frozen=True, slots=True)
class Where:
    """Which connection an event belongs to; '-' for broker-wide events."""

    port: int | None = None
    conn: str = "-"
    peer: str = "-"
    peer_port: int | None = None
    quiet: bool = False  # a peer in an --ignore network: its events reach observers but are not written


BROKER: Final = Where()

Fields = Mapping[str, object]
Observer = Callable[[str, Where, Fields], None]  # (event, where, fields), called in the emitting thread


def text_line(time: str, level: str, where: Where, event: str, message: str, fields: Fields) -> str:
    port = "-" if where.port is None else str(where.port)
    return f"{time} {level.upper():5} port={port} conn={where.conn} peer={where.peer} {message}\n"


def json_line(time: str, level: str, where: Where, event: str, message: str, fields: Fields) -> str:
    record: dict[str, object] = {
        "v": SCHEMA_VERSION,
        "time": time,
        "level": level,
        "event": event,
        "port": where.port,
        "conn": None if where.conn == "-" else where.conn,
        "peer": None if where.peer == "-" else where.peer,
        "peer_port": where.peer_port,
        "msg": message,
    }
    record.update(fields)  # field names come from EVENTS, never from input, and never shadow the above
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n"


FORMATTERS: Final = {"text": text_line, "json": json_line}


class EventLog:
    """The broker's single sink for events. `message` must already be safe (use `sanitize`).

    Lines go through a bounded queue to a writer thread: a slow or stopped reader of stdout (a paused
    terminal, a stuck log shipper) must never stall the event loop, whose timers enforce the ceilings.
    When the queue is full, lines are dropped and their number is reported once the writer catches up.
    """

    QUEUE_BYTES = 2 << 20  # what may wait for a slow stdout; bounded in bytes, lines run up to 4 KiB

    def __init__(self, stream: TextIO | None = None, level: str = "info", fmt: str = "text") -> None:
        self.stream = stream or sys.stdout
        self.threshold = LEVEL_ORDER[level]
        self.format = FORMATTERS[fmt]
        self.observers: list[Observer] = []  # e.g. the metrics: they see every event, quiet ones included
        self._queue: queue.SimpleQueue[str | threading.Event | None] = queue.SimpleQueue()
        self._queued_bytes = 0
        self._dropped = 0
        self.dropped_total = 0  # for the metrics
        self._lock = threading.Lock()
        self._writer = threading.Thread(target=self._drain, name="deadend-log", daemon=True)
        self._writer.start()

    def emit(self, level: str, where: Where, event: str, message: str, /, **fields: object) -> None:
        """Log one event. `message` and string fields must already be safe (use `sanitize`)."""
        assert event in EVENTS and fields.keys() == EVENTS[event][1].keys(), (event, sorted(fields))
        for observe in self.observers:
            observe(event, where, fields)
        if where.quiet or LEVEL_ORDER[level] < self.threshold:
            return
        line = self.format(utc_timestamp(), level, where, event, message, fields)
        with self._lock:
            if self._queued_bytes + len(line) > self.QUEUE_BYTES:
                self._dropped += 1
                self.dropped_total += 1
                return
            self._queued_bytes += len(line)
        self._queue.put(line)

    def _drain(self) -> None:
        while True:
            lines = [self._queue.get()]
            if isinstance(lines[0], str):
                # Let a burst gather: one wake-up and one write per batch instead of a GIL hand-off per
                # line (measured: ~14% of the broker's CPU under load went to those hand-offs).
                time.sleep(BATCH_DELAY)
            with contextlib.suppress(queue.Empty):
                while len(lines) < 128 and not isinstance(lines[-1], threading.Event):
                    lines.append(self._queue.get_nowait())  # bounded batches: small transient buffers
            done = lines[-1] is None
            flushed = lines[-1] if isinstance(lines[-1], threading.Event) else None
            text = "".join(line for line in lines if isinstance(line, str))
            with self._lock:
                dropped, self._dropped = self._dropped, 0
                self._queued_bytes -= len(text)
            if dropped:
                message = f"log output too slow: {dropped} lines dropped"
                text += self.format(
                    utc_timestamp(), "warn", BROKER, "log.dropped", message, {"dropped": dropped}
                )
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed or broken stdout must not take the broker down
            if flushed is not None:
                flushed.set()
            if done:
                return

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
