"""Session recordings (`--record`): real files in tmp_path, and `deadend replay` on them."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import re
import socket
import socketserver
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from deadend.recording import (
    Data,
    End,
    Gap,
    Recorder,
    RecordingError,
    SessionMeta,
    Tls,
    Truncated,
    file_name,
    read_recording,
)
from deadend.replay import add_replay_parser, run_replay
from deadend.transcript import parse
from tests.conftest import RECORDING_HEADER, REPO

META = SessionMeta("0123456789ab", 25, "203.0.113.7", 42702, "25.lua", "ab" * 32, 1764080689.25)
NAME = "20251125T142449Z-25-0123456789ab.jsonl"
KEYS = {
    frozenset(
        {"format", "version", "conn", "port", "peer", "peer_port", "script", "script_sha256", "started"}
    )
    | {"started_unix"},
    frozenset({"t", "dir", "data"}),
    frozenset({"t", "dir", "b64"}),
    frozenset({"t", "event", "reason"}),
    frozenset({"t", "event", "dropped_bytes"}),
    frozenset({"t", "event", "reason", "bytes_in", "bytes_out"}),
    frozenset({"t", "event", "reason", "bytes_in", "bytes_out", "closed_by"}),
}


def record(folder: Path, chunks: list[tuple[str, bytes]], meta: SessionMeta = META, **kw: int) -> Path:
    recorder = Recorder(folder, kw.pop("total", 1 << 20), kw.pop("session", 1 << 20), **kw)  # type: ignore[arg-type]
    rec = recorder.open(meta)
    assert rec is not None
    for i, (direction, payload) in enumerate(chunks):
        rec.data(direction, payload, i / 10)
    rec.end("done", 9.5, 1, 2, closed_by="script")
    recorder.close()
    return folder / file_name(meta)


def test_round_trip_names_and_permissions(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "rec"
    chunks = [("out", b"220 hi\r\n"), ("in", b"\xff\xfe\x00\x01binary"), ("in", "h\u00e9llo\n".encode())]
    path = record(folder, chunks)
    assert path.name == NAME and [p.name for p in folder.iterdir()] == [NAME]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["started"] == "2025-11-25T14:24:49.250Z"
    assert lines[1] == '{"t":0.000000,"dir":"out","data":"220 hi\\r\\n"}'
    assert json.loads(lines[2])["b64"] == "//4AAWJpbmFyeQ==" and '"data":"h\\u00e9llo\\n"' in lines[3]
    assert (
        lines[4]
        == '{"t":9.500000,"event":"end","reason":"done","bytes_in":1,"bytes_out":2,"closed_by":"script"}'
    )
    got = read_recording(path)
    assert got.meta == META and got.end == End(9.5, "done", 1, 2, "script")
    assert [(e.dir, e.payload) for e in got.entries if isinstance(e, Data)] == chunks
    # A restart counts what is already there, on disk.
    on_disk = (folder.stat().st_blocks + path.stat().st_blocks) * 512
    assert Recorder(folder, 1 << 20, 1 << 20).total_bytes == on_disk


def test_the_seed_is_kept_and_checked(tmp_path: Path) -> None:
    seeded = dataclasses.replace(META, seed=(0, 2**63 - 1))
    folder = tmp_path / "rec"
    recorder = Recorder(folder, 1 << 20, 1 << 20)
    rec = recorder.open(seeded)
    assert rec is not None
    rec.end("done", 1.0, 0, 0)
    recorder.close()
    path = folder / file_name(seeded)
    assert json.loads(path.read_text().splitlines()[0])["seed"] == [0, 2**63 - 1]
    assert read_recording(path).meta.seed == (0, 2**63 - 1)
    header = json.loads(path.read_text().splitlines()[0])
    for bad in ([1], [1, -1], [1, 2**63], [1, 2.0], "1 2", [True, 1]):
        path.write_text(json.dumps(header | {"seed": bad}) + "\n")
        with pytest.raises(RecordingError, match=r"'seed' .* is not two integers"):
            read_recording(path)


def test_hostile_payloads_cannot_break_or_forge_a_line(tmp_path: Path) -> None:
    hostile = [
        b'x","dir":"out","data":"forged',
        b'"}\n{"t":0,"event":"end","reason":"forged","bytes_in":0,"bytes_out":0}\n',
        "a\u2028b\u2029c\x85d\r\x0b\x0c".encode(),
        b"\x00\x1b[2J\x7f",
        b"\xc3\x28\xed\xa0\x80 invalid utf-8 and an encoded surrogate",
        b"\\u0041\\",
    ]
    meta = SessionMeta("0123456789ab", 25, "203.0.113.7", 1, 'x"\n{"forged":1}\u2028.lua', "0" * 64, 1.0)
    path = record(tmp_path, [(d, p) for p in hostile for d in ("in", "out")], meta)
    raw = path.read_bytes()
    assert all(b < 0x80 for b in raw) and raw.count(b"\n") == 2 + 2 * len(hostile)
    for line in raw.splitlines():
        assert frozenset(json.loads(line)) in KEYS
    got = read_recording(path)
    assert got.meta == meta and [e.payload for e in got.entries if isinstance(e, Data)][::2] == hostile


def test_planted_symlinks_and_a_swapped_folder_are_not_followed(tmp_path: Path) -> None:
    folder, victim = tmp_path / "rec", tmp_path / "victim"
    folder.mkdir()
    (folder / NAME).symlink_to(victim)
    events: list[tuple[str, str]] = []
    recorder = Recorder(folder, 1 << 20, 1 << 20, lambda *e: events.append(e))
    rec = recorder.open(META)
    assert rec is not None
    rec.data("in", b"payload", 0.1)
    rec.end("done", 0.2, 7, 0)
    recorder.flush()
    assert not victim.exists() and (folder / NAME).is_symlink()
    assert events == [("error", f"recording: cannot create {NAME} in {folder}: File exists")]
    # The folder's path now leads elsewhere: writes still go where the recorder was started.
    folder.rename(tmp_path / "moved")
    (tmp_path / "elsewhere").mkdir()
    folder.symlink_to(tmp_path / "elsewhere")
    record_two = recorder.open(SessionMeta("0000000000ff", 25, "192.0.2.1", 1, "25.lua", "", 2.0))
    assert record_two is not None
    record_two.end("done", 0.0, 0, 0)
    recorder.close()
    assert not list((tmp_path / "elsewhere").iterdir())
    assert (tmp_path / "moved" / "19700101T000002Z-25-0000000000ff.jsonl").is_file()


def test_folder_that_cannot_be_made_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError) as e:
        Recorder(tmp_path / "file" / "rec", 1, 1)
    assert e.value.strerror == "Not a directory" and e.value.filename == str(tmp_path / "file" / "rec")


def test_session_cap_writes_what_fits_then_one_truncated_line(tmp_path: Path) -> None:
    # The cap counts the file's bytes; the last 512 are kept for the truncated and end lines.
    chunks = [("in", b"hello"), ("out", b"w" * 2000), ("in", b"more"), ("out", b"x")]
    path = record(tmp_path, chunks, session=1500)
    entries = read_recording(path).entries
    assert entries[0] == Data(0.0, "in", b"hello")
    cut = entries[1]
    assert isinstance(cut, Data) and cut.dir == "out" and 0 < len(cut.payload) < 2000
    assert cut.payload == b"w" * len(cut.payload)
    assert entries[2] == Truncated(0.1, "session-cap")
    assert isinstance(entries[3], End) and len(entries) == 4
    assert 1500 - 512 - 40 < path.stat().st_size <= 1500


def test_total_cap_counts_old_recordings_and_stops(tmp_path: Path) -> None:
    (tmp_path / "old.jsonl").write_bytes(b"x" * 500)
    (tmp_path / "notes.txt").write_bytes(b"x" * 10_000)  # not a recording, but on the same disk
    block = os.statvfs(tmp_path).f_frsize
    events: list[tuple[str, str]] = []
    recorder = Recorder(tmp_path, 8192, 1 << 20, lambda *e: events.append(e))
    folder = tmp_path.stat().st_blocks * 512
    assert recorder.total_bytes == folder + block * (1 + -(-10_000 // block))
    assert recorder.open(META) is None and recorder.open(META) is None
    assert events == [("warn", "recording stopped: the --record-max-bytes cap of 8192 bytes is reached")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "old.jsonl"]
    recorder.close()


def test_a_full_queue_drops_into_a_gap_without_blocking(tmp_path: Path) -> None:
    # The writer reports a planted file it cannot replace, from its own thread, to a sink that stalls it.
    (tmp_path / NAME).write_text("")
    stalled, release = threading.Event(), threading.Event()
    events: list[tuple[str, str]] = []

    def on_event(level: str, message: str) -> None:
        events.append((level, message))
        if level == "error":
            stalled.set()
            release.wait(5)

    recorder = Recorder(tmp_path, 1 << 20, 1 << 20, on_event, queue_bytes=10)
    assert recorder.open(META) is not None
    assert stalled.wait(5)
    rec = recorder.open(SessionMeta("0000000000aa", 25, "192.0.2.1", 1, "25.lua", "", 2.0))
    assert rec is not None
    for t, chunk in enumerate([b"12345678", b"dropped1", b"dropped2"]):
        rec.data("in", chunk, t)  # returns at once although nothing is being written
    release.set()
    recorder.flush()
    rec.data("in", b"after", 3.0)
    rec.end("done", 4.0, 29, 0)
    recorder.close()
    got = read_recording(tmp_path / file_name(rec.meta))
    assert got.entries[:3] == [Data(0.0, "in", b"12345678"), Gap(1.0, 16), Data(3.0, "in", b"after")]
    assert ("warn", "recording cannot keep up with the disk: 8 bytes dropped so far (gap lines)") in events


BAD_FILES = [
    (b"", 1, "empty file"),
    (b'{"format":"pcap"}\n', 1, "not a deadend-recording header"),
    (b'{"format":"deadend-recording","version":2}\n', 1, "version 2 is not 1"),
    (b"HEADER\nnot json\n", 2, "not a JSON line"),
    (b'HEADER\n{"t":1,"dir":"in","b64":"@@"}\n', 2, "'b64' is not valid base64"),
    (b'HEADER\n{"t":NaN,"dir":"in","data":""}\n', 2, "not a JSON line"),
    (b'HEADER\n{"t":1,"dir":"up","data":""}\n', 2, "neither 'in' nor 'out'"),
    (
        b'HEADER\n{"t":1,"event":"end","reason":"done","bytes_in":0,"bytes_out":0}\n{"t":2,"event":"gap"}\n',
        3,
        "after",
    ),
    (b'HEADER\n{"t":1,"event":"party"}\n', 2, "neither a data line nor a known event (party)"),
]


@pytest.mark.parametrize(("content", "line", "message"), BAD_FILES)
def test_read_recording_rejects_malformed_files(
    tmp_path: Path, content: bytes, line: int, message: str
) -> None:
    header = record(tmp_path / "good", []).read_bytes().splitlines()[0]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content.replace(b"HEADER", header))
    with pytest.raises(RecordingError, match=f"^{path}:{line}: .*") as e:
        read_recording(path)
    assert message in str(e.value)


def replay(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_replay_parser(parser.add_subparsers(dest="command"))
    return run_replay(parser.parse_args(["replay", *argv]))


def test_replay_shows_the_conversation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = record(tmp_path, [("out", b"220 hi\r\n"), ("in", b"EHLO \x1b[2J\\\nQUIT\r\n\xff")])
    assert replay(str(path)) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "# port 25 conn 0123456789ab peer 203.0.113.7 port 42702",
        f"# script 25.lua sha256 {'ab' * 32}",
        "# started 2025-11-25T14:24:49.250Z",
        "+0.000s < 220 hi\\r\\n",
        "+0.100s > EHLO \\x1b[2J\\\\\\n",
        "+0.100s > QUIT\\r\\n",
        "+0.100s > \\xff",
        "+9.500s ! end reason=done bytes_in=1 bytes_out=2 closed_by=script",
    ]


def test_replay_transcript_passes_deadend_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "7.lua"
    script.write_text(
        'deadend.send("hello\\r\\n\\0\\255 ") local line = deadend.recv(100) '
        'if line then deadend.send("got " .. line) end deadend.close()'
    )
    chunks = [("out", b"hello\r\n\x00\xff "), ("in", b"ping\r\n"), ("out", b"got ping\r\n")]
    assert replay(str(record(tmp_path, chunks)), "--transcript") == 0
    text = capsys.readouterr().out
    steps = [line for line in text.splitlines() if line[0] not in "#%"]
    # The end was recorded 9.3 s after the last bytes: more than the default timeout allows.
    assert steps == [
        "<| hello\\r\\n",
        "<| \\x00\\xff\\s",
        ">| ping\\r\\n",
        "<| got ping\\r\\n",
        "@ within 11300",
        "= eof",
    ]
    assert parse(text).peer_ip == "203.0.113.7"
    (tmp_path / "t.transcript").write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "deadend", "test", str(script), str(tmp_path / "t.transcript")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0 and "1 passed, 0 failed" in result.stdout, result.stdout + result.stderr


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:  # a banner, then every chunk echoed upper-cased, until "BYE"
        self.request.sendall(b"hi\r\n")
        while data := self.request.recv(1024):
            self.request.sendall(data.upper())
            if b"bye" in data:
                return


def test_replay_to_a_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # recorded at 0.1 s and 0.3 s: the banner is in by then
    path = record(tmp_path, [("out", b"hi\r\n"), ("in", b"hello\r\n"), ("out", b"x"), ("in", b"bye\r\n")])
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            assert replay(str(path), "--to", f"127.0.0.1:{server.server_address[1]}", "--speed", "1") == 0
        finally:
            server.shutdown()
    lines = [line.split(" ", 1)[1] for line in capsys.readouterr().out.splitlines()[1:]]
    assert lines == [
        "< hi\\r\\n",
        "> hello\\r\\n",
        "< HELLO\\r\\n",
        "> bye\\r\\n",
        "< BYE\\r\\n",
        "! the server closed the connection",
    ]


def test_replay_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = record(tmp_path, [("in", b"x")])
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: nothing answers there
        port = unused.getsockname()[1]
        cases = [
            ([str(tmp_path / "missing.jsonl")], "cannot read"),
            ([str(path), "--to", "localhost"], "is not HOST:PORT"),
            ([str(path), "--to", f"127.0.0.1:{port}"], "Connection refused"),
        ]
        for argv, message in cases:
            assert replay(*argv) == 2
            err = capsys.readouterr().err.splitlines()
            assert len(err) == 1 and err[0].startswith("deadend: error: ") and message in err[0], err
    os.truncate(path, path.stat().st_size - 3)  # a last line cut mid-write: read up to it
    assert read_recording(path).end is None


# --- where TLS began --------------------------------------------------------------------------------


def tls_fields(sni: str = "www.example.com") -> dict[str, object]:
    hello = bytes.fromhex("16030100") + b"\x05" + b"hello"  # the recorder keeps what it is given
    return {
        "ja4": "t13d3112h2_e8f1e7e78f70_b26ce05bbdd6",
        "ja3": "0149f47eabf9a20d0893e2a44e5a6323",
        "sni": sni,
        "alpn": ["h2", "http/1.1"],
        "version": "TLSv1.3",
        "cipher": "TLS_AES_256_GCM_SHA384",
        "alpn_selected": "http/1.1",
        "hello": base64.b64encode(hello).decode(),
    }


def test_a_tls_line_says_where_tls_began(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recorder = Recorder(tmp_path, 1 << 20, 1 << 20)
    rec = recorder.open(META)
    assert rec is not None
    rec.data("out", b"220 hi\r\n", 0.1)
    rec.data("in", b"STARTTLS\r\n", 0.2)
    rec.tls(tls_fields("www.example.com\\x1b[2J"), 0.3)
    rec.data("in", b"EHLO x\r\n", 0.4)
    rec.end("done", 1.0, 18, 8, closed_by="script")
    recorder.close()
    path = tmp_path / file_name(META)
    recording = read_recording(path)
    tls = recording.entries[2]
    assert isinstance(tls, Tls) and tls.version == "TLSv1.3" and tls.alpn == ("h2", "http/1.1")
    assert tls.hello == b"\x16\x03\x01\x00\x05hello" and not tls.error
    assert replay(str(path)) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[6] == (
        "+0.300s ! tls TLSv1.3 TLS_AES_256_GCM_SHA384 alpn_selected=http/1.1 "
        "ja4=t13d3112h2_e8f1e7e78f70_b26ce05bbdd6 ja3=0149f47eabf9a20d0893e2a44e5a6323 "
        "sni=www.example.com\\\\x1b[2J alpn=h2,http/1.1"
    )
    assert replay(str(path), "--transcript") == 0
    steps = [line for line in capsys.readouterr().out.splitlines() if line[0] not in "%"]
    assert steps[-5:] == [
        ">| STARTTLS\\r\\n",
        f"# {shown[6].split('! ', 1)[1]}",
        "! starttls",
        ">| EHLO x\\r\\n",
        "= eof",
    ]


def test_a_failed_tls_line_ends_the_transcript(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recorder = Recorder(tmp_path, 1 << 20, 1 << 20)
    rec = recorder.open(META)
    assert rec is not None
    fields = {k: v for k, v in tls_fields().items() if k not in ("version", "cipher", "alpn_selected")}
    rec.tls(fields, 0.1, error="TLS handshake failed: NO_SHARED_CIPHER")
    rec.end("tls-handshake", 0.2, 0, 0, closed_by="peer")
    recorder.close()
    recording = read_recording(tmp_path / file_name(META))
    tls = recording.entries[0]
    assert isinstance(tls, Tls) and tls.error == "TLS handshake failed: NO_SHARED_CIPHER" and not tls.version
    assert replay(str(tmp_path / file_name(META)), "--transcript") == 0
    out = capsys.readouterr().out
    assert "! starttls" not in out and "the client's TLS failed here" in out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hello": "not base64!"}, "'hello' is not valid base64"),
        ({"alpn": "h2"}, "'alpn' is missing or not a list of strings"),
        ({"alpn": [1]}, "'alpn' is missing or not a list of strings"),
        ({"ja4": None}, "'ja4' is missing or not a string"),
        ({"version": 3}, "'version' is missing or not a string"),
    ],
)
def test_a_tampered_tls_line_is_refused(tmp_path: Path, change: dict[str, object], message: str) -> None:
    path = tmp_path / "r.jsonl"
    header = json.dumps(RECORDING_HEADER)
    line = json.dumps({"t": 0.1, "event": "tls", **tls_fields(), **change})
    path.write_text(f"{header}\n{line}\n")
    with pytest.raises(RecordingError, match=re.escape(message)):
        read_recording(path)
