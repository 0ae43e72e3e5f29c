"""The recording caps bound the disk: files counted on disk, lines as encoded, the number of files, and a
folder nobody else controls. Real files in tmp_path; the Recorder's writer thread, no other process."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from deadend.recording import (
    TAIL_RESERVE,
    Data,
    End,
    Recorder,
    SessionMeta,
    Truncated,
    file_name,
    on_disk,
    read_recording,
)

IS_ROOT = os.geteuid() == 0


def meta(i: int) -> SessionMeta:
    return SessionMeta(f"{i:012x}", 25, "203.0.113.7", 40000 + i % 20000, "25.lua", "ab" * 32, 1764080689.25)


def du(folder: Path) -> int:
    """The folder's size on disk as `du` counts it: its own blocks and its entries'."""
    return (folder.stat().st_blocks + sum(p.lstat().st_blocks for p in folder.iterdir())) * 512


def events_sink() -> tuple[list[tuple[str, str]], object]:
    events: list[tuple[str, str]] = []
    return events, lambda *e: events.append(e)


def test_connect_and_close_sessions_stay_under_the_folder_cap_on_disk(tmp_path: Path) -> None:
    # 1,000 sessions of a header and an end line: ~480 bytes each, but a block and a name each on disk.
    cap = 2 << 20
    events: list[tuple[str, str]] = []
    recorder = Recorder(tmp_path / "rec", cap, 1 << 20, lambda *e: events.append(e))
    for i in range(1000):
        rec = recorder.open(meta(i))
        if rec is not None:
            rec.end("done", 0.01, 0, 0, "peer")
    recorder.close()
    files = list((tmp_path / "rec").iterdir())
    assert 100 < len(files) < 1000
    assert du(tmp_path / "rec") <= cap, (du(tmp_path / "rec"), len(files))
    assert recorder.total_bytes >= du(tmp_path / "rec")  # the count never under-estimates the disk
    assert ("warn", f"recording stopped: the --record-max-bytes cap of {cap} bytes is reached") in events
    for path in files:
        assert read_recording(path).end == End(0.01, "done", 0, 0, "peer")


def test_one_byte_reads_stay_within_the_session_cap_on_disk(tmp_path: Path) -> None:
    # 3,000 payload bytes read one at a time: one line each, ~40 bytes of JSON per byte.
    cap = 64 << 10
    recorder = Recorder(tmp_path, 1 << 30, cap)
    rec = recorder.open(meta(1))
    assert rec is not None
    for i in range(3000):
        rec.data("in", b"x", i / 1000)
    rec.end("done", 3.5, 3000, 0, "peer")
    recorder.close()
    path = tmp_path / file_name(meta(1))
    assert path.stat().st_size <= cap and path.stat().st_blocks * 512 <= cap
    entries = read_recording(path).entries
    assert isinstance(entries[-2], Truncated) and entries[-2].reason == "session-cap"
    assert entries[-1] == End(3.5, "done", 3000, 0, "peer")
    assert 1000 < len(entries) < 3000
    # What fits is recorded: no more room for another line with the tail reserve kept.
    line = len(b'{"t":3.000000,"dir":"in","data":"x"}\n')
    assert path.stat().st_size > cap - TAIL_RESERVE - line


def test_session_cap_counts_what_is_written_not_the_payload(tmp_path: Path) -> None:
    # Control bytes take six bytes each as JSON: the cap holds to the file, and the chunk that crosses it
    # is recorded up to what fits.
    cap = 4096
    recorder = Recorder(tmp_path, 1 << 30, cap)
    rec = recorder.open(meta(2))
    assert rec is not None
    rec.data("out", b"\x01" * 3000, 0.5)
    rec.data("out", b"more", 0.6)
    rec.end("done", 1.0, 0, 3004)
    recorder.close()
    path = tmp_path / file_name(meta(2))
    entries = read_recording(path).entries
    assert isinstance(entries[0], Data) and 0 < len(entries[0].payload) < 3000
    assert entries[0].payload == b"\x01" * len(entries[0].payload)
    assert entries[1:] == [Truncated(0.5, "session-cap"), End(1.0, "done", 0, 3004)]
    assert cap - TAIL_RESERVE - 6 < path.stat().st_size - len(path.read_bytes().splitlines()[-1]) - 1
    assert path.stat().st_size <= cap


def test_total_cap_cuts_a_session_where_the_disk_is_full(tmp_path: Path) -> None:
    folder = tmp_path / "rec"
    folder.mkdir(mode=0o700)
    block = os.statvfs(folder).f_frsize
    # Room for the folder itself and one file of one block.
    cap = folder.stat().st_blocks * 512 + block + 128
    recorder = Recorder(folder, cap, 1 << 20)
    rec = recorder.open(meta(3))
    assert rec is not None
    rec.data("in", b"a" * 40, 0.1)
    rec.data("in", b"b" * (2 * block), 0.2)
    rec.data("in", b"c", 0.3)
    rec.end("done", 0.4, 1, 0)
    assert recorder.open(meta(4)) is not None  # the caller cannot know yet; the writer refuses it
    recorder.close()
    entries = read_recording(folder / file_name(meta(3))).entries
    assert entries[0] == Data(0.1, "in", b"a" * 40)
    assert isinstance(entries[1], Data) and 0 < len(entries[1].payload) < block
    assert entries[2:] == [Truncated(0.2, "total-cap"), End(0.4, "done", 1, 0)]
    assert os.listdir(folder) == [file_name(meta(3))]
    assert du(folder) <= cap


def test_old_entries_count_on_disk_and_toward_the_file_cap(tmp_path: Path) -> None:
    folder = tmp_path / "rec"
    folder.mkdir(mode=0o700)
    block = os.statvfs(folder).f_frsize
    (folder / "old.jsonl").write_bytes(b"x")
    (folder / "notes.txt").write_bytes(b"y" * (block + 1))
    with open(folder / "sparse.jsonl", "wb") as f:
        f.truncate(10 * block)  # no blocks yet, but it may grow into them
    (folder / "sub").mkdir()
    events: list[tuple[str, str]] = []
    recorder = Recorder(folder, 1 << 30, 1 << 20, lambda *e: events.append(e), max_files=6)
    own = folder.stat().st_blocks * 512 + (folder / "sub").stat().st_blocks * 512
    assert recorder.total_bytes == own + block + 2 * block + 10 * block
    assert recorder.files == 4
    opened = [recorder.open(meta(i)) for i in range(3)]
    for rec in opened:
        assert rec is not None
        rec.end("done", 0.1, 0, 0)
    recorder.flush()
    assert recorder.open(meta(9)) is None  # 4 old + 2 new: the cap is reached
    recorder.close()
    assert len(os.listdir(folder)) == 6
    assert events == [("warn", "recording stopped: the --record-max-files cap of 6 files is reached")]
    assert Recorder(folder, 1 << 30, 1 << 20).files == 6


def test_a_file_replaced_behind_the_writer_is_not_opened(tmp_path: Path) -> None:
    # A session's file is held open only while busy (MAX_OPEN_FILES); one swapped for a FIFO or another
    # file while closed must neither hang the writer nor receive the rest.
    events: list[tuple[str, str]] = []
    recorder = Recorder(tmp_path, 1 << 30, 1 << 20, lambda *e: events.append(e))
    victims = [recorder.open(meta(i)) for i in range(2)]
    for rec in victims:
        assert rec is not None
        rec.data("in", b"first", 0.1)
    crowd = [recorder.open(meta(100 + i)) for i in range(40)]  # pushes the victims' files out
    for rec in crowd:
        assert rec is not None
        rec.data("in", b"x", 0.1)
    recorder.flush()
    fifo, swapped = (tmp_path / file_name(meta(i)) for i in range(2))
    fifo.unlink()
    os.mkfifo(fifo, 0o600)
    swapped.rename(tmp_path / "moved")
    swapped.write_bytes(b"")
    done = threading.Event()
    for rec in victims:
        assert rec is not None
        rec.data("in", b"second", 0.2)
        rec.end("done", 0.3, 11, 0)

    def flush() -> None:
        recorder.flush()
        done.set()

    threading.Thread(target=flush, daemon=True).start()
    assert done.wait(5), "the writer hangs on a FIFO"
    recorder.close()
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and swapped.read_bytes() == b""
    assert b"second" not in (tmp_path / "moved").read_bytes()
    assert [level for level, message in events if "cannot write" in message] == ["error"]  # once per 10 s


@pytest.mark.skipif(not IS_ROOT, reason="giving a folder to another user needs root")
def test_a_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "rec"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    with pytest.raises(OSError) as e:
        Recorder(folder, 1 << 20, 1 << 20)
    assert e.value.filename == str(folder)
    assert e.value.strerror == "the folder belongs to uid 65534, not to the recording user (uid 0); chown it"


@pytest.mark.parametrize("mode", [0o770, 0o702, 0o1777])
def test_a_folder_others_can_write_to_is_refused(tmp_path: Path, mode: int) -> None:
    folder = tmp_path / "rec"
    folder.mkdir()
    folder.chmod(mode)
    with pytest.raises(OSError) as e:
        Recorder(folder, 1 << 20, 1 << 20)
    assert e.value.strerror == (
        f"the folder is writable by its group or others (mode {mode:04o}); chmod go-w it"
    )
    assert os.listdir(folder) == []  # nothing was written there


def test_a_readable_folder_is_fine(tmp_path: Path) -> None:
    folder = tmp_path / "rec"
    folder.mkdir()
    folder.chmod(0o755)
    Recorder(folder, 1 << 20, 1 << 20).close()


def test_on_disk_rounds_up_to_whole_blocks() -> None:
    assert [on_disk(n, 4096) for n in (0, 1, 4096, 4097)] == [0, 4096, 4096, 8192]


def test_the_tail_reserve_holds_the_longest_last_lines() -> None:
    longest = (
        '{"t":99999999.999999,"event":"gap","dropped_bytes":9223372036854775807}\n'
        '{"t":99999999.999999,"event":"truncated","reason":"session-cap"}\n'
        + json.dumps({"t": 99999999.999999, "event": "end", "reason": "r" * 64, "bytes_in": 2**63 - 1})
        + json.dumps({"bytes_out": 2**63 - 1, "closed_by": "c" * 64})
    )
    assert len(longest) <= TAIL_RESERVE
