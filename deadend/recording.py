"""Session recordings: every byte of a session both ways, as JSON Lines, written off the event loop.

One file per session, `<YYYYmmddTHHMMSSZ>-<port>-<conn>.jsonl`; docs/recording.md has the format. The
broker calls `Recorder.open` at accept, `SessionRecording.data` for each chunk and `SessionRecording.end`
once. None of them touch the disk: one writer thread does, fed by a queue bounded in bytes, so a slow or
full disk costs recorded data (marked by a `gap` line), never the event loop's time.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import json
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from deadend.logs import sanitize, utc_timestamp

FORMAT: Final = "deadend-recording"
VERSION: Final = 1

DEFAULT_MAX_TOTAL_BYTES: Final = 1 << 30
DEFAULT_MAX_SESSION_BYTES: Final = 1 << 20
QUEUE_BYTES: Final = 8 << 20  # payload that may wait for a slow disk
REPORT_INTERVAL: Final = 10.0  # seconds between two reports of the same condition
# Recording files held open at once. The broker's descriptor budget counts 4 per session and none for
# recordings, so a busy session's file is reopened (O_APPEND) rather than held for its whole life.
MAX_OPEN_FILES: Final = 32
_BATCH: Final = 256  # queue items per write batch

_CREATE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_REOPEN: Final = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
_CONN: Final = re.compile(r"[0-9A-Za-z_-]{1,64}")


@dataclass(frozen=True, slots=True)
class SessionMeta:
    conn: str  # connection id, 12 hex chars (ours, safe for a file name)
    port: int  # the port served
    peer: str  # client IP (already normalised)
    peer_port: int
    script: str  # script file name e.g. "25.lua" (ours, but treated as text)
    script_sha256: str
    started: float  # time.time() at accept


def file_name(meta: SessionMeta) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(meta.started))
    return f"{stamp}-{meta.port}-{meta.conn}.jsonl"


def _line(t: float, **fields: object) -> bytes:
    # ensure_ascii: no raw control character or line separator can reach the file, whatever the payload.
    t = t if math.isfinite(t) and t > 0 else 0.0
    body = json.dumps(fields, ensure_ascii=True, separators=(",", ":"))
    return f'{{"t":{t:.6f},{body[1:]}\n'.encode("ascii")


def _data_line(t: float, direction: str, payload: bytes) -> bytes:
    try:
        return _line(t, dir=direction, data=payload.decode("utf-8"))  # strict: the text re-encodes exactly
    except UnicodeDecodeError:
        return _line(t, dir=direction, b64=base64.b64encode(payload).decode("ascii"))


def _header(meta: SessionMeta) -> bytes:
    fields = {
        "format": FORMAT,
        "version": VERSION,
        "conn": meta.conn,
        "port": meta.port,
        "peer": meta.peer,
        "peer_port": meta.peer_port,
        "script": meta.script,
        "script_sha256": meta.script_sha256,
        "started": utc_timestamp(meta.started),
        "started_unix": round(meta.started, 6),
    }
    return json.dumps(fields, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


@dataclass(slots=True)
class _Item:
    rec: SessionRecording
    kind: str  # open | data | gap | truncated | end
    t: float = 0.0
    direction: str = ""
    payload: bytes = b""  # data: the payload; otherwise the line, already built


class SessionRecording:
    """One session's file. `data` and `end` only queue; the Recorder's writer thread writes."""

    def __init__(self, recorder: Recorder, meta: SessionMeta) -> None:
        self.meta = meta
        self.name = file_name(meta)
        self._recorder = recorder
        # the caller's side (the event loop)
        self._payload = 0  # payload bytes queued for writing, against the session cap
        self._truncated = False
        self._ended = False
        self._dropped = 0  # bytes the full queue refused since the last gap line
        self._gap_t = 0.0
        # the writer's side
        self._dead = False  # no file, or it failed: nothing more is written
        self._cut = False  # a truncated line is written: no more data

    def data(self, direction: str, payload: bytes, t: float) -> None:
        """Record `payload` going `direction` ("in": client to us, "out"), `t` s after the session began."""
        if direction not in ("in", "out"):
            raise ValueError(f"direction must be 'in' or 'out', not {direction!r}")
        if self._ended or self._truncated or not payload:
            return
        room = self._recorder.max_session_bytes - self._payload
        chunk = payload if len(payload) <= room else payload[: max(room, 0)]
        if chunk:
            if self._recorder._fits(len(chunk)):
                self._put_gap()
                self._recorder._put(_Item(self, "data", t, direction, chunk))
                self._payload += len(chunk)
            else:
                if not self._dropped:
                    self._gap_t = t
                self._dropped += len(chunk)
                self._recorder._report_drop(len(chunk))
        if len(chunk) < len(payload):
            self._truncated = True
            self._put_gap()
            line = _line(t, event="truncated", reason="session-cap")
            self._recorder._put(_Item(self, "truncated", payload=line))

    def end(self, reason: str, t: float, bytes_in: int, bytes_out: int, closed_by: str | None = None) -> None:
        """Write the last line and close the file. `closed_by` (peer, script, limit, shutdown) is optional."""
        if self._ended:
            return
        self._ended = True
        self._put_gap()
        fields: dict[str, object] = {"reason": reason, "bytes_in": bytes_in, "bytes_out": bytes_out}
        if closed_by is not None:
            fields["closed_by"] = closed_by
        self._recorder._put(_Item(self, "end", payload=_line(t, event="end", **fields)))

    def _put_gap(self) -> None:
        if self._dropped:
            line = _line(self._gap_t, event="gap", dropped_bytes=self._dropped)
            self._recorder._put(_Item(self, "gap", payload=line))
            self._dropped = 0


class Recorder:
    """Writes every session's recording into `folder`, within a total and a per-session cap.

    `on_event(level, message)` hears what the operator must know (cap reached, write errors, drops), from
    any thread, at most once per condition per REPORT_INTERVAL; the message is one plain ASCII line.
    A folder that cannot be made or written to raises OSError (errno, strerror, filename=folder).
    """

    def __init__(
        self,
        folder: Path,
        max_total_bytes: int,
        max_session_bytes: int,
        on_event: Callable[[str, str], None] | None = None,
        *,
        queue_bytes: int = QUEUE_BYTES,
    ) -> None:
        self.folder = folder
        self.max_total_bytes = max_total_bytes
        self.max_session_bytes = max_session_bytes
        self.queue_bytes = queue_bytes
        self._on_event = on_event
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Every file is opened relative to this descriptor: a symlink swapped in for the folder's path
            # later does not redirect the writes.
            self._dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(folder)) from None
        try:
            self._check_writable()
            self._total = self._existing_bytes()  # old recordings count: no filling the disk by restarts
        except OSError as e:
            os.close(self._dir_fd)
            raise OSError(e.errno, e.strerror, str(folder)) from None  # the folder, not the probe file
        self._queue: queue.SimpleQueue[_Item | threading.Event | None] = queue.SimpleQueue()
        self._queued_bytes = 0
        self._dropped_total = 0
        self._lock = threading.Lock()
        self._reported: dict[str, float] = {}
        self._files: collections.OrderedDict[SessionRecording, int] = collections.OrderedDict()
        self._closed = False
        self._writer = threading.Thread(target=self._drain, name="deadend-record", daemon=True)
        self._writer.start()

    @property
    def total_bytes(self) -> int:
        """Bytes written so far, the recordings found in the folder at start included."""
        return self._total

    def open(self, meta: SessionMeta) -> SessionRecording | None:
        """Begin a session's recording; None (and no file) once the total cap is reached."""
        if not _CONN.fullmatch(meta.conn):
            raise ValueError(f"connection id {meta.conn!r} is not safe in a file name")
        if self._closed:
            return None
        if self._total >= self.max_total_bytes:
            self._report("total-cap", "warn", self._cap_message())
            return None
        rec = SessionRecording(self, meta)
        self._put(_Item(rec, "open", payload=_header(meta)))
        return rec

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything queued so far is written."""
        if not self._writer.is_alive():
            return
        written = threading.Event()
        self._queue.put(written)
        written.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write out what is queued and stop the writer (waits at most `timeout` for a stuck disk)."""
        self._closed = True
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join(timeout)

    # --- the caller's side ------------------------------------------------------------------------

    def _fits(self, size: int) -> bool:
        with self._lock:
            if self._queued_bytes + size > self.queue_bytes:
                return False
            self._queued_bytes += size
            return True

    def _put(self, item: _Item) -> None:
        if not self._closed:
            self._queue.put(item)

    def _report_drop(self, size: int) -> None:
        with self._lock:
            self._dropped_total += size
            total = self._dropped_total
        message = f"recording cannot keep up with the disk: {total} bytes dropped so far (gap lines)"
        self._report("drop", "warn", message)

    def _cap_message(self) -> str:
        return f"recording stopped: the --record-max-bytes cap of {self.max_total_bytes} bytes is reached"

    def _report(self, key: str, level: str, message: str) -> None:
        if self._on_event is None:
            return
        now = time.monotonic()
        with self._lock:
            last = self._reported.get(key)
            if last is not None and now - last < REPORT_INTERVAL:
                return
            self._reported[key] = now
        text = sanitize(message).encode("ascii", "backslashreplace").decode("ascii")
        with contextlib.suppress(Exception):  # a failing sink must not stop the writer or the caller
            self._on_event(level, text)

    # --- the writer's side ------------------------------------------------------------------------

    def _check_writable(self) -> None:
        probe = f".deadend-probe-{os.getpid()}-{threading.get_ident()}"
        os.close(os.open(probe, _CREATE, 0o600, dir_fd=self._dir_fd))
        os.unlink(probe, dir_fd=self._dir_fd)

    def _existing_bytes(self) -> int:
        total = 0
        with os.scandir(self._dir_fd) as entries:
            for entry in entries:
                if entry.name.endswith(".jsonl") and entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
        return total

    def _drain(self) -> None:
        try:
            while True:
                items = [self._queue.get()]
                with contextlib.suppress(queue.Empty):
                    while len(items) < _BATCH and isinstance(items[-1], _Item):
                        items.append(self._queue.get_nowait())  # bounded batches
                batch = [item for item in items if isinstance(item, _Item)]
                self._write_batch(batch)
                with self._lock:
                    self._queued_bytes -= sum(len(i.payload) for i in batch if i.kind == "data")
                last = items[-1]
                if isinstance(last, threading.Event):
                    last.set()
                elif last is None:
                    return
        finally:
            for fd in self._files.values():
                os.close(fd)
            self._files.clear()
            os.close(self._dir_fd)

    def _write_batch(self, items: list[_Item]) -> None:
        pending: dict[SessionRecording, list[bytes]] = {}
        ended: list[SessionRecording] = []
        for item in items:
            rec, line = item.rec, item.payload
            if item.kind == "open":
                self._create(rec, line)
            elif rec._dead or (rec._cut and item.kind in ("data", "gap", "truncated")):
                continue
            elif item.kind == "data":
                line = _data_line(item.t, item.direction, item.payload)
                if self._total + len(line) > self.max_total_bytes:
                    # The short truncated and end lines still go out: they bound the overshoot.
                    rec._cut = True
                    line = _line(item.t, event="truncated", reason="total-cap")
                    self._report("total-cap", "warn", self._cap_message())
            elif item.kind == "truncated":
                rec._cut = True
            elif item.kind == "end":
                ended.append(rec)
            if not rec._dead:
                pending.setdefault(rec, []).append(line)
                self._total += len(line)
        for rec, lines in pending.items():
            self._write(rec, b"".join(lines))
        for rec in ended:
            self._forget(rec)

    def _create(self, rec: SessionRecording, header: bytes) -> None:
        if self._total + len(header) > self.max_total_bytes:
            rec._dead = True
            self._report("total-cap", "warn", self._cap_message())
            return
        try:
            fd = os.open(rec.name, _CREATE, 0o600, dir_fd=self._dir_fd)
        except OSError as e:  # EEXIST also for a planted symlink: O_EXCL never follows one
            rec._dead = True
            message = f"recording: cannot create {rec.name} in {self.folder}: {e.strerror}"
            self._report("create", "error", message)
            return
        self._keep(rec, fd)

    def _write(self, rec: SessionRecording, data: bytes) -> None:
        done = 0
        try:
            fd = self._files.get(rec)
            if fd is None:
                fd = os.open(rec.name, _REOPEN, dir_fd=self._dir_fd)
                self._keep(rec, fd)
            else:
                self._files.move_to_end(rec)
            while done < len(data):
                done += os.write(fd, data[done:])
        except OSError as e:
            self._total -= len(data) - done
            rec._dead = True
            self._forget(rec)
            message = f"recording: cannot write {rec.name}: {e.strerror}; the rest of that session is lost"
            self._report("write", "error", message)

    def _keep(self, rec: SessionRecording, fd: int) -> None:
        self._files[rec] = fd
        while len(self._files) > MAX_OPEN_FILES:
            os.close(self._files.popitem(last=False)[1])

    def _forget(self, rec: SessionRecording) -> None:
        fd = self._files.pop(rec, None)
        if fd is not None:
            os.close(fd)


# --- reading ---------------------------------------------------------------------------------------


class RecordingError(ValueError):
    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")


@dataclass(frozen=True, slots=True)
class Data:
    t: float
    dir: str  # "in" (client to us) or "out"
    payload: bytes


@dataclass(frozen=True, slots=True)
class Gap:
    t: float
    dropped_bytes: int


@dataclass(frozen=True, slots=True)
class Truncated:
    t: float
    reason: str  # session-cap | total-cap


@dataclass(frozen=True, slots=True)
class End:
    t: float
    reason: str
    bytes_in: int
    bytes_out: int
    closed_by: str | None = None


Entry = Data | Gap | Truncated | End


@dataclass(frozen=True, slots=True)
class Recording:
    path: Path
    meta: SessionMeta
    entries: list[Entry]
    end: End | None  # None: the recording was cut short (broker killed, disk full)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number here")


def read_recording(path: Path) -> Recording:
    """Parse a recording; RecordingError ("path:line: message") if it is malformed. OSError if unreadable."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    unterminated = lines.pop()  # b"" when the file ends with a newline
    objects: list[tuple[int, dict[str, object]]] = []
    for number, line in enumerate([*lines, unterminated] if unterminated else lines, 1):
        try:
            obj = json.loads(line, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as e:
            if line is unterminated and number > 1:
                break  # a last line cut off mid-write: the recording simply ends before it
            raise RecordingError(str(path), number, f"not a JSON line ({e})") from None
        if not isinstance(obj, dict):
            raise RecordingError(str(path), number, "not a JSON object")
        objects.append((number, obj))
    if not objects:
        raise RecordingError(str(path), 1, "empty file, no header")
    meta = _read_header(str(path), objects[0][1])
    entries: list[Entry] = []
    end: End | None = None
    for number, obj in objects[1:]:
        if end is not None:
            raise RecordingError(str(path), number, "a line after the end line")
        try:
            entry = _read_entry(obj)
        except ValueError as e:
            raise RecordingError(str(path), number, str(e)) from None
        entries.append(entry)
        if isinstance(entry, End):
            end = entry
    return Recording(path, meta, entries, end)


def _get(obj: dict[str, object], key: str, kind: type[object]) -> object:
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{key!r} is missing or not a {kind.__name__}")
    return value


def _text(obj: dict[str, object], key: str) -> str:
    return str(_get(obj, key, str))


def _int(obj: dict[str, object], key: str) -> int:
    value = _get(obj, key, int)
    assert isinstance(value, int)
    if value < 0:
        raise ValueError(f"{key!r} is negative")
    return value


def _number(obj: dict[str, object], key: str) -> float:
    value = obj.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key!r} is missing or not a number >= 0")
    return float(value)


def _read_header(path: str, obj: dict[str, object]) -> SessionMeta:
    if obj.get("format") != FORMAT:
        raise RecordingError(path, 1, f"not a {FORMAT} header")
    if type(obj.get("version")) is not int or obj.get("version") != VERSION:
        raise RecordingError(path, 1, f"version {obj.get('version')!r} is not {VERSION}, the one this reads")
    try:
        return SessionMeta(
            conn=_text(obj, "conn"),
            port=_int(obj, "port"),
            peer=_text(obj, "peer"),
            peer_port=_int(obj, "peer_port"),
            script=_text(obj, "script"),
            script_sha256=_text(obj, "script_sha256"),
            started=_number(obj, "started_unix"),
        )
    except ValueError as e:
        raise RecordingError(path, 1, str(e)) from None


def _read_entry(obj: dict[str, object]) -> Entry:
    t = _number(obj, "t")
    if "dir" in obj:
        direction = obj["dir"]
        if direction not in ("in", "out"):
            raise ValueError("'dir' is neither 'in' nor 'out'")
        if ("data" in obj) == ("b64" in obj):
            raise ValueError("a data line needs exactly one of 'data' and 'b64'")
        if "data" in obj:
            try:
                payload = _text(obj, "data").encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("'data' holds a lone surrogate") from None
        else:
            try:
                payload = base64.b64decode(_text(obj, "b64"), validate=True)
            except binascii.Error:
                raise ValueError("'b64' is not valid base64") from None
        return Data(t, str(direction), payload)
    event = obj.get("event")
    if event == "gap":
        return Gap(t, _int(obj, "dropped_bytes"))
    if event == "truncated":
        return Truncated(t, _text(obj, "reason"))
    if event == "end":
        closed_by = _text(obj, "closed_by") if "closed_by" in obj else None
        return End(t, _text(obj, "reason"), _int(obj, "bytes_in"), _int(obj, "bytes_out"), closed_by)
    raise ValueError(f"neither a data line nor a known event ({sanitize(str(event), 80)})")
