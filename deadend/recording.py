"""Session recordings: every byte of a session both ways, as JSON Lines, written off the event loop.

One file per session, `<YYYYmmddTHHMMSSZ>-<port>-<conn>.jsonl`; docs/recording.md has the format. The
broker calls `Recorder.open` at accept, `SessionRecording.data` for each chunk and `SessionRecording.end`
once. None of them touch the disk: one writer thread does, fed by a queue bounded in bytes, so a slow or
full disk costs recorded data (marked by a `gap` line), never the event loop's time.

The caps bound the disk, not the payload: a file counts as its size rounded up to whole blocks of the
folder's filesystem, plus what its name adds to the folder; a session's cap counts its file's bytes as
written (JSON and base64 included); the number of files is capped too. Reading is streamed, one line at a
time, because a recording is an attacker's bytes in a file anyone could have edited.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import errno
import json
import math
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final

from deadend.logs import sanitize, utc_timestamp
from deadend.proxy import peer_address
from deadend.wire import SEED_MAX

FORMAT: Final = "deadend-recording"
VERSION: Final = 1

DEFAULT_MAX_TOTAL_BYTES: Final = 1 << 30
DEFAULT_MAX_SESSION_BYTES: Final = 1 << 20
DEFAULT_MAX_FILES: Final = 100_000
QUEUE_BYTES: Final = 8 << 20  # payload that may wait for a slow disk
REPORT_INTERVAL: Final = 10.0  # seconds between two reports of the same condition
# Recording files held open at once. The broker's descriptor budget counts 4 per session and none for
# recordings, so a busy session's file is reopened (O_APPEND) rather than held for its whole life.
MAX_OPEN_FILES: Final = 32
# Room each file keeps, in both caps, for its last lines (a gap, `truncated`, `end`: under 300 bytes with
# the broker's words and 64-bit counts), so that they never need a check they could fail.
TAIL_RESERVE: Final = 512
# What one file's name adds to the folder itself: ext4 took 78 bytes per entry for 1,000 of these names.
NAME_COST: Final = 128
_BATCH: Final = 256  # queue items per write batch
_WORD_MAX: Final = 64  # an end line's reason and closed_by: the broker's own words, cut to bound the line
_ERROR_MAX: Final = 512  # a tls-failed line's error: the broker's words about the client's bytes

# O_NONBLOCK: a FIFO planted under a file's name must not hang the writer (it opens with ENXIO instead);
# fstat then checks that what was opened is the regular file the recorder created.
_CREATE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_REOPEN: Final = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
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
    seed: tuple[int, int] | None = None  # the script's PRNG seed (None: a file from before it was kept)


def file_name(meta: SessionMeta) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(meta.started))
    return f"{stamp}-{meta.port}-{meta.conn}.jsonl"


def on_disk(size: int, block: int) -> int:
    """`size` bytes of a file as the filesystem allocates them: whole blocks."""
    return -(-size // block) * block


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
    if meta.seed is not None:
        fields["seed"] = list(meta.seed)
    return json.dumps(fields, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


@dataclass(slots=True)
class _Item:
    rec: SessionRecording
    kind: str  # open | data | gap | tls | truncated | end
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
        self._payload = 0  # payload bytes queued for writing: no more can fit once it reaches the cap
        self._truncated = False
        self._ended = False
        self._dropped = 0  # bytes the full queue refused since the last gap line
        self._gap_t = 0.0
        # the writer's side
        self._dead = False  # no file, or it failed: nothing more is written
        self._cut = False  # a truncated line is written: no more data
        self._size = 0  # bytes in the file (written or about to be, in this batch)
        self._charge = 0  # what the file counts for in Recorder._total
        self._inode: tuple[int, int] | None = None  # (st_dev, st_ino) of the file created

    def data(self, direction: str, payload: bytes, t: float) -> None:
        """Record `payload` going `direction` ("in": client to us, "out"), `t` s after the session began."""
        if direction not in ("in", "out"):
            raise ValueError(f"direction must be 'in' or 'out', not {direction!r}")
        if self._ended or self._truncated or not payload:
            return
        # A line is never shorter than its payload, so payload past the cap could never be written: it is
        # not queued. The writer holds each line to the cap exactly, as encoded.
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

    def tls(self, fields: Mapping[str, object], t: float, error: str = "") -> None:
        """Where TLS began (`deadend.starttls()`): a `tls` line, or a `tls-failed` one with the `error`; the
        data lines after a `tls` line are the plaintext. `fields` come from deadend.tlsinfo."""
        if self._ended or self._truncated:
            return
        self._put_gap()
        if error:
            line = _line(t, event="tls-failed", error=error[:_ERROR_MAX], **fields)
        else:
            line = _line(t, event="tls", **fields)
        self._recorder._put(_Item(self, "tls", payload=line))

    def end(self, reason: str, t: float, bytes_in: int, bytes_out: int, closed_by: str | None = None) -> None:
        """Write the last line and close the file. `closed_by` (peer, script, limit, shutdown) is optional."""
        if self._ended:
            return
        self._ended = True
        self._put_gap()
        fields: dict[str, object] = {
            "reason": reason[:_WORD_MAX],
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
        }
        if closed_by is not None:
            fields["closed_by"] = closed_by[:_WORD_MAX]
        self._recorder._put(_Item(self, "end", payload=_line(t, event="end", **fields)))

    def _put_gap(self) -> None:
        if self._dropped:
            line = _line(self._gap_t, event="gap", dropped_bytes=self._dropped)
            self._recorder._put(_Item(self, "gap", payload=line))
            self._dropped = 0


class Recorder:
    """Writes every session's recording into `folder`, within caps on the disk it takes.

    `max_total_bytes` bounds the folder on disk, files found there at start included; `max_session_bytes`
    one session's file, as written; `max_files` the entries in the folder, old ones included. An existing
    folder must belong to this process's user and be writable by nobody else.

    `on_event(level, message)` hears what the operator must know (cap reached, write errors, drops), from
    any thread, at most once per condition per REPORT_INTERVAL; the message is one plain ASCII line.
    A folder that cannot be made or used raises OSError (errno, strerror, filename=folder).
    """

    def __init__(
        self,
        folder: Path,
        max_total_bytes: int,
        max_session_bytes: int,
        on_event: Callable[[str, str], None] | None = None,
        *,
        max_files: int = DEFAULT_MAX_FILES,
        queue_bytes: int = QUEUE_BYTES,
    ) -> None:
        self.folder = folder
        self.max_total_bytes = max_total_bytes
        self.max_session_bytes = max_session_bytes
        self.max_files = max_files
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
            self._check_folder()
            self._check_writable()
            fs = os.fstatvfs(self._dir_fd)
            self.block_size = fs.f_frsize or fs.f_bsize or 4096
            # Old recordings count: no filling the disk by restarts.
            self._total, self._count = self._existing()
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
        """The folder's size on disk as counted against the cap: old recordings included."""
        return self._total

    @property
    def files(self) -> int:
        """Entries in the folder, old ones included."""
        return self._count

    def open(self, meta: SessionMeta) -> SessionRecording | None:
        """Begin a session's recording; None (and no file) once a cap on the folder is reached."""
        if not _CONN.fullmatch(meta.conn):
            raise ValueError(f"connection id {meta.conn!r} is not safe in a file name")
        if self._closed:
            return None
        # The writer decides for good (it alone changes the counts); this spares a doomed queue item.
        if self._count >= self.max_files:
            self._report("files-cap", "warn", self._files_cap_message())
            return None
        if self._total + self.block_size > self.max_total_bytes:
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

    def _files_cap_message(self) -> str:
        return f"recording stopped: the --record-max-files cap of {self.max_files} files is reached"

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

    # --- start-up ---------------------------------------------------------------------------------

    def _check_folder(self) -> None:
        """Refuse a folder another user could write to or take over (planted files, removed recordings).

        Refused rather than warned about: the broker would otherwise run for months on a folder whose
        contents someone else decides, and the fix is one chown or chmod.
        """
        st = os.fstat(self._dir_fd)
        uid = os.geteuid()
        if st.st_uid != uid:
            why = f"the folder belongs to uid {st.st_uid}, not to the recording user (uid {uid}); chown it"
            raise OSError(errno.EPERM, why)
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            mode = stat.S_IMODE(st.st_mode)
            raise OSError(
                errno.EPERM, f"the folder is writable by its group or others (mode {mode:04o}); chmod go-w it"
            )

    def _check_writable(self) -> None:
        probe = f".deadend-probe-{os.getpid()}-{threading.get_ident()}"
        os.close(os.open(probe, _CREATE, 0o600, dir_fd=self._dir_fd))
        os.unlink(probe, dir_fd=self._dir_fd)

    def _existing(self) -> tuple[int, int]:
        """The folder's size on disk (its own blocks and every entry's) and its number of entries.

        Every entry counts, not only `*.jsonl` files: the cap is on the disk the folder takes. A regular
        file counts as the larger of its allocated blocks and its size rounded up to blocks (a sparse file
        could grow into the latter).
        """
        total = os.fstat(self._dir_fd).st_blocks * 512
        count = 0
        with os.scandir(self._dir_fd) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                size = on_disk(st.st_size, self.block_size) if stat.S_ISREG(st.st_mode) else 0
                total += max(st.st_blocks * 512, size)
                count += 1
        return total, count

    # --- the writer's side ------------------------------------------------------------------------

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
            rec = item.rec
            if item.kind == "open":
                if self._create(rec, len(item.payload)):
                    self._admit(rec, item.payload, pending)
                continue
            if rec._dead:
                continue
            if item.kind == "end":
                ended.append(rec)
                self._admit(rec, item.payload, pending, reserve=0)
            elif rec._cut:
                continue
            elif item.kind == "truncated":
                rec._cut = True
                self._admit(rec, item.payload, pending, reserve=TAIL_RESERVE - len(item.payload))
            else:
                line = (
                    item.payload if item.kind != "data" else _data_line(item.t, item.direction, item.payload)
                )
                cap = self._room(rec, len(line))
                if cap:
                    self._cut(rec, item, cap, pending)
                else:
                    self._admit(rec, line, pending)
        for rec, lines in pending.items():
            self._write(rec, b"".join(lines))
        for rec in ended:
            self._forget(rec)

    def _room(self, rec: SessionRecording, size: int) -> str:
        """ "" if `size` more bytes of data fit in both caps (the tail reserve kept), else the cap's name."""
        after = rec._size + size + TAIL_RESERVE
        if after > self.max_session_bytes:
            return "session-cap"
        if self._total - rec._charge + self._charge_of(after) > self.max_total_bytes:
            return "total-cap"
        return ""

    def _cut(
        self, rec: SessionRecording, item: _Item, cap: str, pending: dict[SessionRecording, list[bytes]]
    ) -> None:
        """A line past `cap`: what fits of its payload, then the file's one `truncated` line."""
        if item.kind == "data":
            # The longest prefix whose line fits (a line grows with its payload nearly always; where it
            # does not, less is recorded, never more). Once per file, so the encodings are affordable.
            lo, hi, best = 1, len(item.payload) - 1, b""
            while lo <= hi:
                mid = (lo + hi) // 2
                line = _data_line(item.t, item.direction, item.payload[:mid])
                if self._room(rec, len(line)):
                    hi = mid - 1
                else:
                    best, lo = line, mid + 1
            if best:
                self._admit(rec, best, pending)
        if cap == "total-cap":
            self._report("total-cap", "warn", self._cap_message())
        rec._cut = True
        line = _line(item.t, event="truncated", reason=cap)
        self._admit(rec, line, pending, reserve=TAIL_RESERVE - len(line))

    def _charge_of(self, size: int) -> int:
        return on_disk(size, self.block_size) + NAME_COST

    def _admit(
        self,
        rec: SessionRecording,
        line: bytes,
        pending: dict[SessionRecording, list[bytes]],
        reserve: int = TAIL_RESERVE,
    ) -> None:
        """Count `line` into the file's size and the folder's total, and queue it for this batch's write.

        The file keeps `reserve` bytes counted for the lines still to come: TAIL_RESERVE while data may
        follow, what the reserve still holds after a `truncated` line, nothing after the `end` line.
        """
        rec._size += len(line)
        charge = self._charge_of(rec._size + reserve)
        self._total += charge - rec._charge
        rec._charge = charge
        pending.setdefault(rec, []).append(line)

    def _create(self, rec: SessionRecording, header: int) -> bool:
        if self._count >= self.max_files:
            rec._dead = True
            self._report("files-cap", "warn", self._files_cap_message())
            return False
        if self._total + self._charge_of(header + TAIL_RESERVE) > self.max_total_bytes:
            rec._dead = True
            self._report("total-cap", "warn", self._cap_message())
            return False
        try:
            fd = os.open(rec.name, _CREATE, 0o600, dir_fd=self._dir_fd)
        except OSError as e:  # EEXIST also for a planted symlink or FIFO: O_EXCL never opens one
            rec._dead = True
            message = f"recording: cannot create {rec.name} in {self.folder}: {e.strerror}"
            self._report("create", "error", message)
            return False
        st = os.fstat(fd)
        rec._inode = (st.st_dev, st.st_ino)
        self._count += 1
        self._keep(rec, fd)
        return True

    def _write(self, rec: SessionRecording, data: bytes) -> None:
        done = 0
        try:
            fd = self._files.get(rec)
            if fd is None:
                fd = self._reopen(rec)
            else:
                self._files.move_to_end(rec)
            while done < len(data):
                done += os.write(fd, data[done:])
        except OSError as e:
            rec._size -= len(data) - done
            charge = self._charge_of(rec._size)
            self._total += charge - rec._charge
            rec._charge = charge
            rec._dead = True
            self._forget(rec)
            message = f"recording: cannot write {rec.name}: {e.strerror}; the rest of that session is lost"
            self._report("write", "error", message)

    def _reopen(self, rec: SessionRecording) -> int:
        """The session's file again, only if it is still the regular file created for it."""
        fd = os.open(rec.name, _REOPEN, dir_fd=self._dir_fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != rec._inode:
            os.close(fd)
            raise OSError(errno.ESTALE, "the file was replaced")
        self._keep(rec, fd)
        return fd

    def _keep(self, rec: SessionRecording, fd: int) -> None:
        self._files[rec] = fd
        while len(self._files) > MAX_OPEN_FILES:
            os.close(self._files.popitem(last=False)[1])

    def _forget(self, rec: SessionRecording) -> None:
        fd = self._files.pop(rec, None)
        if fd is not None:
            os.close(fd)


# --- reading ---------------------------------------------------------------------------------------

# A line longer than this is not one the broker writes: the longest is a 1 MiB send of control bytes,
# about 6 MiB as JSON text. Reading holds one line at a time, so this also bounds a reader's memory.
MAX_LINE: Final = 8 << 20
MAX_OFFSET: Final = 1e8  # seconds since the session's start (~3 years; a session lasts at most 30 days)
MAX_UNIX: Final = 253402300799.0  # 9999-12-31T23:59:59Z, the last second a timestamp can show
MAX_COUNT: Final = (1 << 63) - 1  # byte counts
_INT_DIGITS: Final = 20  # longer integers are refused before Python converts them


class RecordingError(ValueError):
    """Where a recording is malformed and why; its text is safe to print (values from the file are
    escaped, and so is the path)."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{sanitize(path)}:{line}: {message}")


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


@dataclass(frozen=True, slots=True)
class Tls:
    """Where TLS began (or was tried): the client's hello and, when it succeeded, what was negotiated."""

    t: float
    hello: bytes  # the records that carried the ClientHello
    ja4: str
    ja3: str
    sni: str | None  # escaped as in the log
    alpn: tuple[str, ...]
    version: str = ""  # empty when it failed
    cipher: str = ""
    alpn_selected: str | None = None
    error: str = ""  # why it failed (a tls-failed line)


Entry = Data | Gap | Tls | Truncated | End


@dataclass(frozen=True, slots=True)
class Recording:
    path: Path
    meta: SessionMeta
    entries: list[Entry]
    end: End | None  # None: the recording was cut short (broker killed, disk full)


class RecordingReader:
    """A recording read as a stream: `meta` once opened, then the entries as they are iterated.

    Memory stays about one line (at most MAX_LINE) whatever the file's size. Every value is checked: text
    is valid Unicode, numbers finite and in range, the peer an IP address. The strings still came from
    whoever wrote the file: escape them (deadend.logs.sanitize) before showing them. Raises OSError when
    the file cannot be read or is not a regular file, RecordingError ("path:line: message") for a
    malformed line, at open for the header, while iterating for the rest. `end` is set once the end
    line has been read.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.end: End | None = None
        self._number = 0
        # O_NONBLOCK: a FIFO given as the file must not hang the reader; it is refused just below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", str(path))
            self._file: BinaryIO = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        try:
            header = self._next_object()
            if header is None:
                raise RecordingError(str(path), 1, "empty file, no header")
            self.meta = _read_header(str(path), header)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> RecordingReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def __iter__(self) -> Iterator[Entry]:
        while (obj := self._next_object()) is not None:
            if self.end is not None:
                raise self._error("a line after the end line")
            try:
                entry = _read_entry(obj)
            except ValueError as e:
                raise self._error(str(e)) from None
            if isinstance(entry, End):
                self.end = entry
            yield entry

    def _error(self, message: str) -> RecordingError:
        return RecordingError(str(self.path), self._number, message)

    def _next_object(self) -> dict[str, object] | None:
        """The next line's object; None at the end (where a last line cut off mid-write also ends it)."""
        line = self._file.readline(MAX_LINE + 1)
        if not line:
            return None
        self._number += 1
        terminated = line.endswith(b"\n")
        if len(line) > MAX_LINE and not terminated:
            raise self._error(f"a line longer than {MAX_LINE} bytes, more than any recording holds")
        try:
            obj = _json(line)
        except ValueError as e:
            if not terminated and self._number > 1:
                return None  # a last line cut off mid-write: the recording simply ends before it
            raise self._error(f"not a JSON line ({e})") from None
        if not isinstance(obj, dict):
            raise self._error("not a JSON object")
        return obj


def open_recording(path: Path) -> RecordingReader:
    """Open a recording for streaming (use it in a `with`); see RecordingReader."""
    return RecordingReader(path)


def read_recording(path: Path) -> Recording:
    """A whole recording in memory (for tests and small files; `open_recording` streams)."""
    with open_recording(path) as reader:
        entries = list(reader)
        return Recording(path, reader.meta, entries, reader.end)


def _json(line: bytes) -> object:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"byte 0x{line[e.start]:02x} is not UTF-8") from None
    try:
        return json.loads(text, parse_constant=_no_constant, parse_int=_short_int, parse_float=_finite)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number here")


def _short_int(text: str) -> int:
    if len(text.lstrip("-")) > _INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a number too large to be finite")
    return value


def _shown(value: object, limit: int = 80) -> str:
    """A value from the file, for an error message: escaped and short."""
    return sanitize(str(value).encode("utf-8", "backslashreplace"), limit)


def _text(obj: dict[str, object], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key!r} is missing or not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{key!r} holds a lone surrogate") from None
    return value


def _int(obj: dict[str, object], key: str, hi: int) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= hi:
        raise ValueError(f"{key!r} is missing or not an integer in 0..{hi}")
    return value


def _number(obj: dict[str, object], key: str, hi: float) -> float:
    value = obj.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= hi:
        raise ValueError(f"{key!r} is missing or not a number in 0..{hi:g}")
    return float(value)


def _read_header(path: str, obj: dict[str, object]) -> SessionMeta:
    if obj.get("format") != FORMAT:
        raise RecordingError(path, 1, f"not a {FORMAT} header")
    if type(obj.get("version")) is not int or obj.get("version") != VERSION:
        version = _shown(obj.get("version"), 20)
        raise RecordingError(path, 1, f"version {version} is not {VERSION}, the one this reads")
    try:
        conn = _text(obj, "conn")
        if not _CONN.fullmatch(conn):
            raise ValueError(f"'conn' {_shown(conn)} is not a connection id")
        peer = _text(obj, "peer")
        try:
            peer = peer_address(peer)
        except ValueError:
            raise ValueError(f"'peer' {_shown(peer)} is not an IP address (without a scope)") from None
        return SessionMeta(
            conn=conn,
            port=_int(obj, "port", 65535),
            peer=peer,
            peer_port=_int(obj, "peer_port", 65535),
            script=_text(obj, "script"),
            script_sha256=_text(obj, "script_sha256"),
            started=_number(obj, "started_unix", MAX_UNIX),
            seed=_seed(obj),
        )
    except ValueError as e:
        raise RecordingError(path, 1, str(e)) from None


def _seed(obj: dict[str, object]) -> tuple[int, int] | None:
    if "seed" not in obj:
        return None
    seed = obj["seed"]
    if not (
        isinstance(seed, list) and len(seed) == 2 and all(type(v) is int and 0 <= v <= SEED_MAX for v in seed)
    ):
        raise ValueError(f"'seed' {_shown(seed)} is not two integers in 0..{SEED_MAX}")
    return seed[0], seed[1]


def _read_tls(t: float, obj: dict[str, object], failed: bool) -> Tls:
    try:
        hello = base64.b64decode(_text(obj, "hello"), validate=True)
    except binascii.Error:
        raise ValueError("'hello' is not valid base64") from None
    alpn = obj.get("alpn")
    if not isinstance(alpn, list) or not all(isinstance(name, str) for name in alpn):
        raise ValueError("'alpn' is missing or not a list of strings")
    sni = None if obj.get("sni") is None else _text(obj, "sni")
    selected = None if obj.get("alpn_selected") is None else _text(obj, "alpn_selected")
    shown = tuple(_text({"n": name}, "n") for name in alpn)
    if failed:
        return Tls(t, hello, _text(obj, "ja4"), _text(obj, "ja3"), sni, shown, error=_text(obj, "error"))
    version, cipher = _text(obj, "version"), _text(obj, "cipher")
    return Tls(t, hello, _text(obj, "ja4"), _text(obj, "ja3"), sni, shown, version, cipher, selected)


def _read_entry(obj: dict[str, object]) -> Entry:
    t = _number(obj, "t", MAX_OFFSET)
    if "dir" in obj:
        direction = obj["dir"]
        if direction not in ("in", "out"):
            raise ValueError("'dir' is neither 'in' nor 'out'")
        if ("data" in obj) == ("b64" in obj):
            raise ValueError("a data line needs exactly one of 'data' and 'b64'")
        if "data" in obj:
            payload = _text(obj, "data").encode("utf-8")
        else:
            try:
                payload = base64.b64decode(_text(obj, "b64"), validate=True)
            except binascii.Error:
                raise ValueError("'b64' is not valid base64") from None
        return Data(t, str(direction), payload)
    event = obj.get("event")
    if event == "gap":
        return Gap(t, _int(obj, "dropped_bytes", MAX_COUNT))
    if event in ("tls", "tls-failed"):
        return _read_tls(t, obj, failed=event == "tls-failed")
    if event == "truncated":
        return Truncated(t, _text(obj, "reason"))
    if event == "end":
        closed_by = _text(obj, "closed_by") if "closed_by" in obj else None
        bytes_in, bytes_out = _int(obj, "bytes_in", MAX_COUNT), _int(obj, "bytes_out", MAX_COUNT)
        return End(t, _text(obj, "reason"), bytes_in, bytes_out, closed_by)
    raise ValueError(f"neither a data line nor a known event ({_shown(event)})")
