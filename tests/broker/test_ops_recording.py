"""`broker --record` end to end: the real broker records real sessions, `deadend replay` reads them back.

tests/test_recording.py covers the Recorder and the reader with no broker; these tests check the wiring:
what the broker puts into the files (and what it keeps out), the caps as the operator sees them, the
start-up errors, --user, and `deadend replay` against those files and against a live broker. Loopback only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deadend.recording import Data, End, Recording, RecordingError, Truncated, read_recording
from tests.conftest import HOST, REPO, Broker, read_all, read_until

IS_ROOT = os.geteuid() == 0
NOBODY = 65534

SMTP_SCRIPT = (REPO / "examples" / "25.lua").read_text()
# The client's side of the SMTP session, and the reply that ends each of the server's answers.
SMTP_STEPS = [
    (b"EHLO x\r\n", b"250 SMTPUTF8\r\n"),
    (b"MAIL FROM:<a@b>\r\n", b"250 2.1.0 Ok\r\n"),
    (b"QUIT\r\n", b"221 2.0.0 Bye\r\n"),
]

# Echoes every read until the client is done.
ECHO_LOOP = """
while true do
  local d = deadend.recv(4096)
  if not d then break end
  deadend.send(d)
end
"""

# One read, one answer.
ONE_REPLY = """
local d = deadend.recv(100)
deadend.send("ok:" .. (d or ""))
"""

SESSION_END = (
    r"port=(\d+) conn={conn} peer=\S+ session end reason=(\S+) duration=\S+ "
    r"bytes_in=(\d+) bytes_out=(\d+) closed_by=(\S+)"
)
STAMP = r"\d{8}T\d{6}Z"


# --- helpers --------------------------------------------------------------------------------------


def connect_id(b: Broker, local_port: int, since: int, peer: str = HOST) -> str:
    """The connection id the broker gave the connection from our socket's local port."""
    rx = rf"conn=([0-9a-f]{{12}}) peer={re.escape(peer)} connect from {re.escape(peer)} port {local_port} "
    return b.wait_for(rx, since=since).group(1)


def session_end_fields(b: Broker, conn: str) -> tuple[int, str, int, int, str]:
    """port, reason, bytes_in, bytes_out, closed_by of the session-end line of `conn`."""
    found = b.wait_for(SESSION_END.format(conn=conn))
    port, reason, bytes_in, bytes_out, closed_by = found.groups()
    return int(port), reason, int(bytes_in), int(bytes_out), closed_by


def files_of(folder: Path, conn: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(f"-{conn}.jsonl"))


def wait_recording(folder: Path, conn: str, timeout: float = 8.0) -> Recording:
    """The recording of `conn` once its end line is written (the writer thread is behind the log)."""
    deadline = time.monotonic() + timeout
    while True:
        paths = files_of(folder, conn) if folder.is_dir() else []
        assert len(paths) <= 1, paths
        if paths:
            try:
                recording = read_recording(paths[0])
            except RecordingError:
                recording = None  # the header is being written
            if recording is not None and recording.end is not None:
                return recording
        if time.monotonic() > deadline:
            raise AssertionError(f"no complete recording for conn {conn} in {sorted(os.listdir(folder))}")
        time.sleep(0.05)


def payload(recording: Recording, direction: str) -> bytes:
    return b"".join(e.payload for e in recording.entries if isinstance(e, Data) and e.dir == direction)


def smtp_session(b: Broker) -> tuple[str, bytes, int]:
    """EHLO, MAIL, QUIT against 25.lua; returns the conn id, every byte received, our local port."""
    mark = b.mark()
    with b.connect(25) as c:
        local_port = c.getsockname()[1]
        received = read_until(c, b"\r\n")
        assert received.startswith(b"220 "), received
        for line, last_reply in SMTP_STEPS:
            c.sendall(line)
            got = read_until(c, last_reply)
            assert got.endswith(last_reply), got
            received += got
        received += read_all(c)
    return connect_id(b, local_port, mark), received, local_port


def deadend(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "deadend", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def check_exits_with(b: Broker, message: str) -> str:
    """The broker ends on its own with status 1 and exactly one error line on stderr; returns it."""
    assert b.proc.wait(30) == 1
    lines = b.stderr_closed().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deadend: error: "), b.stderr
    assert message in lines[0], b.stderr
    assert not any("ready:" in line for line in b.lines), b.lines
    return lines[0]


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder user nobody can reach (pytest's tmp_path sits in a root-only 0700 folder)."""
    base = Path(tempfile.mkdtemp(prefix="deadend-rec-", dir="/tmp"))
    base.chmod(0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- what a recording holds -----------------------------------------------------------------------


def test_smtp_session_is_recorded_exactly(make_broker, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    before = time.time()
    b = make_broker({"25.lua": SMTP_SCRIPT}, "--record", str(rec))
    conn, received, local_port = smtp_session(b)
    after = time.time()
    port, reason, bytes_in, bytes_out, closed_by = session_end_fields(b, conn)
    assert (reason, closed_by) == ("done", "script")
    recording = wait_recording(rec, conn)

    # One file, named <UTC accept time>-<port served, as in the log>-<conn>.jsonl.
    assert os.listdir(rec) == [recording.path.name]
    stamp = re.fullmatch(rf"({STAMP})-{port}-{conn}\.jsonl", recording.path.name)
    assert stamp, recording.path.name
    meta = recording.meta
    assert stamp.group(1) == datetime.fromtimestamp(meta.started, UTC).strftime("%Y%m%dT%H%M%SZ")
    assert before - 1 <= meta.started <= after + 1
    # Modes: the broker made the folder 0700 and the file 0600.
    assert rec.stat().st_mode & 0o7777 == 0o700
    assert recording.path.stat().st_mode & 0o7777 == 0o600

    script_bytes = (b.scripts / "25.lua").read_bytes()
    assert (meta.conn, meta.port, meta.peer, meta.peer_port) == (conn, port, HOST, local_port)
    assert meta.script == "25.lua"
    assert meta.script_sha256 == hashlib.sha256(script_bytes).hexdigest()
    header = json.loads(recording.path.read_bytes().split(b"\n", 1)[0])
    assert header["format"] == "deadend-recording" and header["version"] == 1
    assert header["started"].startswith(datetime.fromtimestamp(meta.started, UTC).strftime("%Y-%m-%dT"))

    # Both ways, byte for byte, in order.
    assert payload(recording, "in") == b"".join(line for line, _ in SMTP_STEPS)
    assert payload(recording, "out") == received
    times = [e.t for e in recording.entries]
    assert times == sorted(times) and times[0] >= 0
    assert [type(e) for e in recording.entries[-1:]] == [End]
    assert all(isinstance(e, Data) for e in recording.entries[:-1])
    end = recording.end
    assert end is not None
    assert (end.reason, end.bytes_in, end.bytes_out, end.closed_by) == (
        reason,
        bytes_in,
        bytes_out,
        closed_by,
    )
    assert (end.bytes_in, end.bytes_out) == (len(payload(recording, "in")), len(received))


def test_replay_transcript_passes_deadend_test_and_conversation_shows_it(make_broker, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    b = make_broker({"25.lua": SMTP_SCRIPT}, "--record", str(rec))
    conn, _received, _port = smtp_session(b)
    recording = wait_recording(rec, conn)

    made = deadend("replay", str(recording.path), "--transcript")
    assert made.returncode == 0, made.stderr
    assert ">| EHLO x\\r\\n" in made.stdout.splitlines()
    assert made.stdout.splitlines()[-1] == "= eof"
    transcript = tmp_path / "seen.transcript"
    transcript.write_text(made.stdout)
    tested = deadend("test", str(b.scripts / "25.lua"), str(transcript))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "1 passed, 0 failed" in tested.stdout

    shown = deadend("replay", str(recording.path))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"# {recording.path}"
    assert f"# port {recording.meta.port} conn {conn} peer {HOST} port {recording.meta.peer_port}" in lines
    assert any(re.fullmatch(r"\+\d+\.\d{3}s > EHLO x\\r\\n", line) for line in lines), lines
    assert any(re.fullmatch(r"\+\d+\.\d{3}s < 221 2\.0\.0 Bye\\r\\n", line) for line in lines), lines
    assert re.fullmatch(
        r"\+\d+\.\d{3}s ! end reason=done bytes_in=31 bytes_out=\d+ closed_by=script", lines[-1]
    )


def test_replay_to_live_broker_reproduces_the_session(make_broker, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    b = make_broker({"25.lua": SMTP_SCRIPT}, "--record", str(rec))
    conn, _received, _port = smtp_session(b)
    original = wait_recording(rec, conn)

    mark = b.mark()
    replayed = deadend("replay", str(original.path), "--to", f"{HOST}:{b.port(25)}", "--speed", "0")
    assert replayed.returncode == 0, replayed.stderr
    assert "> EHLO x\\r\\n" in replayed.stdout
    assert "< 221 2.0.0 Bye\\r\\n" in replayed.stdout
    assert "the server closed the connection" in replayed.stdout.splitlines()[-1]

    again = b.wait_for(r"conn=([0-9a-f]{12}) peer=127\.0\.0\.1 connect from ", since=mark).group(1)
    assert again != conn
    _port2, reason, _in, _out, _by = session_end_fields(b, again)
    assert reason == "done"
    copy = wait_recording(rec, again)
    assert payload(copy, "in") == payload(original, "in")
    assert payload(copy, "out") == payload(original, "out")
    assert copy.meta.script_sha256 == original.meta.script_sha256
    assert len(os.listdir(rec)) == 2


# --- caps -----------------------------------------------------------------------------------------


def test_session_cap_truncates_but_end_line_counts_everything(make_broker, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    script = 'deadend.send(string.rep("A", 1000))\nlocal d = deadend.recv(100)\n'
    b = make_broker({"25.lua": script}, "--record", str(rec), "--record-session-bytes", "1024")
    mark = b.mark()
    with b.connect(25) as c:
        local_port = c.getsockname()[1]
        got = b""
        while len(got) < 1000:
            chunk = c.recv(4096)
            assert chunk, got
            got += chunk
        c.sendall(b"y" * 50)
        got += read_all(c)
    assert got == b"A" * 1000
    conn = connect_id(b, local_port, mark)
    _port, reason, bytes_in, bytes_out, _by = session_end_fields(b, conn)
    assert (reason, bytes_in, bytes_out) == ("done", 50, 1000)

    recording = wait_recording(rec, conn)
    data = [e for e in recording.entries if isinstance(e, Data)]
    recorded = b"".join(e.payload for e in data)  # what fits in the file's 1024 bytes, nothing after
    assert 0 < len(recorded) < 1000 and recorded == b"A" * len(recorded)
    assert all(e.dir == "out" for e in data)
    assert recording.path.stat().st_size <= 1024
    cuts = [e for e in recording.entries if isinstance(e, Truncated)]
    assert [c.reason for c in cuts] == ["session-cap"]
    assert recording.entries[-2] == cuts[0]
    end = recording.end
    assert end is not None and (end.reason, end.bytes_in, end.bytes_out) == ("done", 50, 1000)


def one_reply_session(b: Broker, n: int) -> str:
    mark = b.mark()
    with b.connect(25) as c:
        local_port = c.getsockname()[1]
        c.sendall(b"hi %d" % n)
        assert read_all(c) == b"ok:hi %d" % n
    conn = connect_id(b, local_port, mark)
    assert session_end_fields(b, conn)[1] == "done"
    return conn


CAP_WARNING = r"WARN .*recording stopped: the --record-max-bytes cap of 20000 bytes is reached"


def du(folder: Path) -> int:
    """The folder's size on disk, as `du` counts it."""
    return (folder.stat().st_blocks + sum(p.lstat().st_blocks for p in folder.iterdir())) * 512


def test_total_cap_stops_new_recordings_not_service(make_broker, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    b = make_broker({"25.lua": ONE_REPLY}, "--record", str(rec), "--record-max-bytes", "20000")
    conns = [one_reply_session(b, n) for n in range(8)]
    b.wait_for(CAP_WARNING)
    assert b.stop() == 0  # the recorder is flushed and closed: the folder is final
    assert sum(1 for line in b.lines if re.search(CAP_WARNING, line)) == 1

    recorded = [conn for conn in conns if files_of(rec, conn)]
    assert recorded, os.listdir(rec)
    assert recorded == conns[: len(recorded)], "a session after an unrecorded one was recorded"
    assert len(recorded) <= len(conns) - 2, "the cap never stopped recording"
    assert len(os.listdir(rec)) == len(recorded)
    assert du(rec) <= 20000, du(rec)  # counted on disk: a block per file, whatever its size
    for conn in recorded:
        recording = read_recording(files_of(rec, conn)[0])
        assert recording.end is not None and recording.end.reason == "done"
        cuts = [e.reason for e in recording.entries if isinstance(e, Truncated)]
        assert cuts in ([], ["total-cap"])


def test_total_cap_counts_recordings_already_in_the_folder(make_broker, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    rec.mkdir(mode=0o700)
    (rec / "old.jsonl").write_bytes(b"x" * (20000 - du(rec)))  # with a new file, past the cap on disk
    b = make_broker({"25.lua": ONE_REPLY}, "--record", str(rec), "--record-max-bytes", "20000")
    conn = one_reply_session(b, 1)
    b.wait_for(CAP_WARNING)
    assert b.stop() == 0
    assert os.listdir(rec) == ["old.jsonl"], conn


# --- what is not recorded -------------------------------------------------------------------------


def test_ignored_peer_is_not_recorded(make_broker, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    b = make_broker({"25.lua": ONE_REPLY}, "--record", str(rec), "--ignore", "127.0.0.0/8")
    with b.connect(25) as c:
        c.sendall(b"hi 1")
        assert read_all(c) == b"ok:hi 1"
    assert b.stop() == 0  # the recorder is flushed and closed: anything it had would be on disk
    assert rec.is_dir() and os.listdir(rec) == []
    assert not any("connect from" in line or "session end" in line for line in b.lines), b.lines


def test_proxy_header_is_not_recorded_but_real_peer_is(make_broker, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    b = make_broker(
        {"25.lua": ECHO_LOOP}, "--record", str(rec), "--proxy-protocol", "--ignore", "198.51.100.0/24"
    )
    # An ignored real peer behind the proxy first: it gets no file.
    with b.connect(25) as c:
        c.sendall(b"PROXY TCP4 198.51.100.9 127.0.0.1 4444 25\r\nIGNORED\r\n")
        assert read_until(c, b"IGNORED\r\n") == b"IGNORED\r\n"
    mark = b.mark()
    with b.connect(25) as c:
        c.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 25\r\nHELLO\r\n")
        assert read_until(c, b"HELLO\r\n") == b"HELLO\r\n"
        c.shutdown(socket.SHUT_WR)
        assert read_all(c) == b""
    conn = b.wait_for(
        r"conn=([0-9a-f]{12}) peer=203\.0\.113\.7 connect from 203\.0\.113\.7 port 5555 via 127\.0\.0\.1 ",
        since=mark,
    ).group(1)
    _port, reason, bytes_in, _out, closed_by = session_end_fields(b, conn)
    assert (reason, bytes_in, closed_by) == ("done", 7, "peer")

    recording = wait_recording(rec, conn)
    assert (recording.meta.peer, recording.meta.peer_port) == ("203.0.113.7", 5555)
    assert payload(recording, "in") == b"HELLO\r\n"
    assert payload(recording, "out") == b"HELLO\r\n"
    raw = recording.path.read_bytes()
    assert b"PROXY" not in raw
    assert b"198.51.100" not in raw
    assert os.listdir(rec) == [recording.path.name]  # the ignored session left no file


# --- hostile bytes --------------------------------------------------------------------------------

HOSTILE = [
    # valid UTF-8: a `data` line, with NUL, a forged JSON line, and U+2028/U+2029 (JSON-legal, not line-safe)
    b'\x00NUL\n{"t":0}\n' + "\u2028\u2029 \u00e9 \U0001f600 \x1b[31m".encode() + b'"\\\r\x7f\n',
    # not UTF-8: a `b64` line
    b'\xff\xfe\x00\n{"t":0,"dir":"out","data":"forged"}\n\xed\xa0\x80\xc0\x80',
    bytes(range(256)),
]


def test_hostile_bytes_are_recorded_losslessly_in_valid_json_lines(make_broker, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    b = make_broker({"25.lua": ECHO_LOOP}, "--record", str(rec))
    mark = b.mark()
    received = b""
    with b.connect(25) as c:
        local_port = c.getsockname()[1]
        for chunk in HOSTILE:  # one at a time, echoed before the next: one recv each
            c.sendall(chunk)
            got = b""
            while len(got) < len(chunk):
                piece = c.recv(65536)
                assert piece, got
                got += piece
            assert got == chunk
            received += got
        c.shutdown(socket.SHUT_WR)
        assert read_all(c) == b""
    conn = connect_id(b, local_port, mark)
    assert session_end_fields(b, conn)[1] == "done"
    recording = wait_recording(rec, conn)

    assert payload(recording, "in") == b"".join(HOSTILE)
    assert payload(recording, "out") == received
    raw = recording.path.read_bytes()
    assert raw.endswith(b"\n")
    raw.decode("ascii")  # pure ASCII: no raw U+2028, no raw control byte
    lines = raw.split(b"\n")[:-1]
    assert all(0x20 <= byte < 0x7F for line in lines for byte in line)
    objects = [json.loads(line) for line in lines]
    assert all(isinstance(obj, dict) for obj in objects)
    assert len(objects) == 1 + len(recording.entries)  # nothing forged an extra line
    assert objects[0]["format"] == "deadend-recording"
    data_lines = [obj for obj in objects[1:] if "dir" in obj]
    assert all(("data" in obj) != ("b64" in obj) for obj in data_lines)
    assert sum("data" in obj for obj in data_lines) >= 2 and sum("b64" in obj for obj in data_lines) >= 2
    assert b"\\u2028" in raw and b"\\u0000" in raw
    for obj in data_lines:
        restored = obj["data"].encode() if "data" in obj else base64.b64decode(obj["b64"])
        assert restored in HOSTILE


# --- start-up errors and --user -------------------------------------------------------------------


@pytest.mark.parametrize("where", ["proc", "under-a-file"])
def test_unusable_record_folder_is_a_startup_error(make_broker, tmp_path: Path, where: str) -> None:
    if where == "proc":
        folder = Path("/proc/nope")
    else:
        (tmp_path / "plain").write_text("a file\n")
        folder = tmp_path / "plain" / "rec"
    b = make_broker({"25.lua": ONE_REPLY}, "--record", str(folder), ready=False, expect_exit=1)
    check_exits_with(b, f"cannot record sessions to {folder}: ")
    assert not folder.exists()


@pytest.mark.skipif(not IS_ROOT, reason="switching user needs root")
def test_user_nobody_gets_a_new_record_folder_of_its_own(make_broker, open_dir: Path) -> None:
    rec = open_dir / "rec"
    b = make_broker({"25.lua": ONE_REPLY}, "--record", str(rec), "--user", "nobody")
    b.wait_for(r"running as user nobody \(uid 65534, gid 65534\)")
    st = rec.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (NOBODY, 0o700)
    conn = one_reply_session(b, 1)
    recording = wait_recording(rec, conn)
    st = recording.path.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (NOBODY, 0o600)
    assert payload(recording, "in") == b"hi 1" and payload(recording, "out") == b"ok:hi 1"


@pytest.mark.skipif(not IS_ROOT, reason="switching user needs root")
def test_user_nobody_refuses_a_root_only_record_folder(make_broker, open_dir: Path) -> None:
    rec = open_dir / "rec"
    rec.mkdir(mode=0o700)
    b = make_broker(
        {"25.lua": ONE_REPLY}, "--record", str(rec), "--user", "nobody", ready=False, expect_exit=1
    )
    check_exits_with(
        b, f"cannot record sessions to {rec}: Permission denied (it must be writable by user nobody)"
    )
    st = rec.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o700)  # left as it was
    assert os.listdir(rec) == []
