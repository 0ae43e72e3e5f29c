"""The on-disk spool of one sink: an append-only log of events waiting for their collector.

Only ever used from the sink's spool thread (blocking I/O); the event loop talks to it through
deadend/sinks/delivery.py. Layout of a spool folder (mode 0700, files 0600, all opened relative to a
descriptor of the folder, none following a symlink):

    00000000000000000001.seg   segment files, named by the sequence number of their first record
    00000000000000004711.seg   (the last one is the only one written to)
    progress                   "<seq>\\n": every record up to <seq> was delivered

A record is one line: `<crc32 8 hex> <seq> <id>\\t<time>\\t<level>\\t<event>\\t<sensor>\\t<body>\\n`, the
CRC-32 covering everything between its space and the newline. The fields are OutEvent's, which the
contract (deadend/sinks/event.py) keeps free of tabs and line breaks, so a line is also greppable.

Guarantees: records are read back in the order written; a torn or corrupt line (a crash mid-write, a
flipped bit) is skipped and counted, never returned half. Segments are fdatasync'd when they are rolled
over, by `sync()` (the sink calls it about once a second while it writes) and at close: a crash of the
process loses nothing written, a power loss at most the last second. `progress` is replaced by rename at
most every PROGRESS_INTERVAL seconds: after a crash the records since the last one are delivered again
(at least once; consumers de-duplicate by id). The folder's size is capped: when an append takes it past
`max_bytes`, whole segments are deleted, oldest first, and the undelivered records in them are counted as
dropped.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from deadend.sinks.event import OutEvent

PROGRESS: Final = "progress"
PROGRESS_INTERVAL: Final = 0.5  # seconds between two progress writes (at most this much re-delivered)
SEGMENT_MAX: Final = 4 << 20
SEGMENT_MIN: Final = 4 << 10
READ_CHUNK: Final = 256 << 10

_SEGMENT: Final = re.compile(r"(\d{20})\.seg")
_OPEN_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_APPEND
_APPEND: Final = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
_READ: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


# --- records: pure ----------------------------------------------------------------------------------


def encode_record(seq: int, event: OutEvent) -> bytes:
    rest = b"%d %s\t%s\t%s\t%s\t%s\t%s" % (
        seq,
        event.id.encode(),
        event.time.encode(),
        event.level.encode(),
        event.event.encode(),
        event.sensor.encode(),
        event.body,
    )
    return b"%08x %s\n" % (zlib.crc32(rest), rest)


def decode_record(line: bytes) -> tuple[int, OutEvent] | None:
    """(seq, event) from one line without its newline, or None if the line is torn or corrupt."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    rest = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(rest):
            return None
        seq_text, _, fields = rest.partition(b" ")
        parts = fields.split(b"\t", 5)
        if len(parts) != 6 or not seq_text.isdigit():
            return None
        ident, when, level, name, sensor = (p.decode("ascii") for p in parts[:5])
    except (ValueError, UnicodeDecodeError):
        return None
    return int(seq_text), OutEvent(ident, when, level, name, sensor, parts[5])


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}.seg"


def folder_key(sink_name: str) -> str:
    """The subfolder of one sink: readable, and distinct for distinct sink names."""
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", sink_name).strip("_")[:60]
    return f"{slug}-{zlib.crc32(sink_name.encode()):08x}"


def segment_size(max_bytes: int) -> int:
    """Segments small enough that dropping the oldest one costs at most about an eighth of the spool."""
    return max(SEGMENT_MIN, min(SEGMENT_MAX, max_bytes // 8))


# --- the store: blocking, one thread -----------------------------------------------------------------


@dataclass(slots=True)
class _Segment:
    first: int
    size: int


@dataclass(slots=True)
class ReadResult:
    records: list[tuple[int, OutEvent]]
    skipped: int = 0  # torn or corrupt lines passed over


@dataclass(slots=True)
class AppendResult:
    dropped: list[tuple[int, int]] = field(default_factory=list)  # seq ranges deleted by the size cap
    refused: int = 0  # records too large for this spool at all


class SpoolStore:
    """One sink's spool folder. Not thread-safe: one thread owns it.

    OSError (with the folder's name) if the folder cannot be made, is a symlink, or is not writable.
    """

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.segment_bytes = segment_size(max_bytes)
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._dir = os.open(folder, _OPEN_DIR)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(folder)) from None
        self._write_fd = -1
        # (segment first, offset, next seq): where the last read stopped, so the next one goes on from there
        self._read: tuple[int, int, int] | None = None
        self._dirty = False
        self._progress_at = 0.0
        self._progress_written = -1
        try:
            info = os.fstat(self._dir)
            if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != 0o700:
                os.fchmod(self._dir, 0o700)  # events are attacker data and sensor details: ours alone
            self.committed = self._read_progress()
            self.segments = self._scan()
            self.torn = self._repair_tail()
            self.next_seq = self._last_seq() + 1
            self._forget_delivered()
        except OSError as e:
            os.close(self._dir)
            raise OSError(e.errno, e.strerror, str(folder)) from None

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    @property
    def first_seq(self) -> int:
        """The oldest sequence number still on disk (next_seq when the spool is empty)."""
        return max(self.segments[0].first, self.committed + 1) if self.segments else self.next_seq

    # --- writing --------------------------------------------------------------------------------

    def append(self, records: list[tuple[int, OutEvent]]) -> AppendResult:
        result = AppendResult()
        chunk: list[bytes] = []
        chunk_bytes = 0
        for seq, event in records:
            line = encode_record(seq, event)
            if len(line) > self.max_bytes // 4:
                result.refused += 1
                continue
            current = self.segments[-1] if self.segments else None
            if current is None or current.size + chunk_bytes >= self.segment_bytes:
                self._write(b"".join(chunk))
                chunk, chunk_bytes = [], 0
                self._roll(seq)
            chunk.append(line)
            chunk_bytes += len(line)
            self.next_seq = seq + 1
        self._write(b"".join(chunk))
        while self.total_bytes > self.max_bytes and len(self.segments) > 1:
            oldest, following = self.segments[0], self.segments[1]
            self._delete(oldest.first)
            self.segments.pop(0)
            low = max(oldest.first, self.committed + 1)
            if low <= following.first - 1:
                result.dropped.append((low, following.first - 1))
        return result

    def _roll(self, first_seq: int) -> None:
        if self._write_fd >= 0:
            os.fdatasync(self._write_fd)
            os.close(self._write_fd)
            self._write_fd = -1
        name = segment_name(first_seq)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self._dir)  # left by an earlier run that was emptied before it wrote
        self._write_fd = os.open(name, _CREATE, 0o600, dir_fd=self._dir)
        self.segments.append(_Segment(first_seq, 0))

    def _write(self, data: bytes) -> None:
        if not data:
            return
        if self._write_fd < 0:
            name = segment_name(self.segments[-1].first)
            self._write_fd = os.open(name, _APPEND, dir_fd=self._dir)
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                done += os.write(self._write_fd, view[done:])
        finally:
            self.segments[-1].size += done
            self._dirty = True

    def sync(self) -> None:
        """Make what was written durable, and record the progress."""
        if self._dirty and self._write_fd >= 0:
            os.fdatasync(self._write_fd)
        self._dirty = False
        self._write_progress(force=True)

    # --- reading --------------------------------------------------------------------------------

    def read(self, from_seq: int, max_records: int, max_bytes: int) -> ReadResult:
        """Records with seq >= from_seq, oldest first, at most `max_records` and about `max_bytes`."""
        result = ReadResult([])
        budget = max_bytes
        position = self._position(from_seq)
        next_seq = from_seq
        while position is not None and len(result.records) < max_records and budget > 0:
            index, offset = position
            segment = self.segments[index]
            lines, end, torn = self._lines(segment, offset, min(budget, READ_CHUNK))
            result.skipped += torn
            for line in lines:
                if len(result.records) >= max_records or budget <= 0:
                    break
                offset += len(line) + 1
                decoded = decode_record(line)
                if decoded is None:
                    result.skipped += 1
                elif decoded[0] >= from_seq:
                    result.records.append(decoded)
                    next_seq = decoded[0] + 1
                    budget -= len(line)
            else:
                offset = end
            self._read = (segment.first, offset, next_seq)
            if lines and offset == end:
                position = (index, offset)
            elif not lines and index + 1 < len(self.segments):
                position = (index + 1, 0)
                self._read = (self.segments[index + 1].first, 0, next_seq)
            else:
                position = None
        return result

    def _position(self, from_seq: int) -> tuple[int, int] | None:
        if not self.segments:
            return None
        if self._read is not None and self._read[2] == from_seq:
            first, offset, _ = self._read
            for index, segment in enumerate(self.segments):
                if segment.first == first:
                    return index, offset
        index = 0
        for i, segment in enumerate(self.segments):
            if segment.first <= from_seq:
                index = i
        return index, 0

    def _lines(self, segment: _Segment, offset: int, want: int) -> tuple[list[bytes], int, int]:
        """Whole lines from `offset`: (lines, the offset after them, 1 if a torn end was passed over)."""
        if offset >= segment.size:
            return [], offset, 0
        fd = os.open(segment_name(segment.first), _READ, dir_fd=self._dir)
        try:
            size = max(want, 4096)
            while True:
                data = os.pread(fd, size, offset)
                cut = data.rfind(b"\n")
                if cut >= 0 or offset + len(data) >= segment.size or len(data) < size:
                    break
                size *= 2  # one line longer than the chunk
        finally:
            os.close(fd)
        if cut < 0:
            # No newline up to the end of the segment: the writer repairs the last segment at start and
            # writes whole lines, so this is an older segment cut short by a crash. Pass over it.
            return [], offset + len(data), 1 if data else 0
        return data[:cut].split(b"\n"), offset + cut + 1, 0

    # --- progress -------------------------------------------------------------------------------

    def commit(self, seq: int) -> None:
        """Every record up to `seq` was delivered: forget them (whole segments) and note the progress."""
        if seq <= self.committed:
            return
        self.committed = seq
        self._forget_delivered()
        self._write_progress(force=False)

    def _forget_delivered(self) -> None:
        while len(self.segments) > 1 and self.segments[1].first <= self.committed + 1:
            self._delete(self.segments.pop(0).first)

    def _write_progress(self, *, force: bool) -> None:
        now = time.monotonic()
        if self.committed == self._progress_written:
            return
        if not force and now - self._progress_at < PROGRESS_INTERVAL:
            return
        tmp = PROGRESS + ".tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=self._dir)
        fd = os.open(tmp, _CREATE, 0o600, dir_fd=self._dir)
        try:
            os.write(fd, b"%d\n" % self.committed)
        finally:
            os.close(fd)
        os.rename(tmp, PROGRESS, src_dir_fd=self._dir, dst_dir_fd=self._dir)
        self._progress_at = now
        self._progress_written = self.committed

    def _read_progress(self) -> int:
        try:
            fd = os.open(PROGRESS, _READ, dir_fd=self._dir)
        except FileNotFoundError:
            return 0
        try:
            text = os.read(fd, 64)
        finally:
            os.close(fd)
        # A torn or foreign progress file means "nothing known delivered": re-delivery, never loss.
        return int(text) if text.endswith(b"\n") and text[:-1].isdigit() else 0

    # --- start-up -------------------------------------------------------------------------------

    def _scan(self) -> list[_Segment]:
        found = []
        with os.scandir(self._dir) as entries:
            for entry in entries:
                match = _SEGMENT.fullmatch(entry.name)
                if match and entry.is_file(follow_symlinks=False):
                    found.append(_Segment(int(match.group(1)), entry.stat(follow_symlinks=False).st_size))
        return sorted(found, key=lambda s: s.first)

    def _repair_tail(self) -> int:
        """Cut a torn last record off the last segment (a crash mid-append); how many lines were cut."""
        if not self.segments:
            return 0
        last = self.segments[-1]
        fd = os.open(segment_name(last.first), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dir)
        try:
            data = os.pread(fd, last.size, 0)
            good = data.rfind(b"\n") + 1
            cut = 1 if good < len(data) else 0
            lines = data[:good].split(b"\n")[:-1]
            # A last whole line with a bad checksum is a torn write too (its end made it, its middle not).
            while lines and decode_record(lines[-1]) is None:
                good -= len(lines.pop()) + 1
                cut += 1
            if good < len(data):
                os.ftruncate(fd, good)
                last.size = good
        finally:
            os.close(fd)
        return cut

    def _last_seq(self) -> int:
        """The newest sequence number on disk, or the committed one when the spool is empty."""
        for segment in reversed(self.segments):
            fd = os.open(segment_name(segment.first), _READ, dir_fd=self._dir)
            try:
                start = max(0, segment.size - 2 * READ_CHUNK)
                data = os.pread(fd, segment.size - start, start)
            finally:
                os.close(fd)
            for line in reversed(data.split(b"\n")):
                decoded = decode_record(line)
                if decoded is not None:
                    return max(decoded[0], self.committed)
        return self.committed

    def _delete(self, first_seq: int) -> None:
        if self.segments and self.segments[-1].first == first_seq and self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(segment_name(first_seq), dir_fd=self._dir)
        if self._read is not None and self._read[0] == first_seq:
            self._read = None

    def close(self) -> None:
        try:
            self.sync()
        finally:
            if self._write_fd >= 0:
                os.close(self._write_fd)
                self._write_fd = -1
            os.close(self._dir)
