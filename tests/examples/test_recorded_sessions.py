"""A recorded session passes `deadend test` against the script that produced it, for every example.

A real broker serves the examples with --record; a client plays the first part of each example's first
transcript over TCP, then leaves first (before the step that would make the script close). The session
must end `closed_by=peer` whatever the script does after (many call close()); `deadend replay
--transcript` turns its recording into a transcript (the server's bytes exactly, the session's PRNG seed,
`! close`), and `deadend test` passes it against the same script.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from broker.rehearsal import play
from deadend.recording import read_recording
from deadend.transcript import Step, Transcript, load
from tests.conftest import EXAMPLES, HOST, REPO, Broker

SCRIPTS = sorted(EXAMPLES.glob("*.lua"), key=lambda p: int(p.stem))


def first_transcript(script: Path) -> Transcript:
    """The script's first transcript that needs no clock (dates would differ between two runs)."""
    for path in sorted((EXAMPLES / "transcripts").glob(f"{script.stem}-*.transcript")):
        transcript = load(path)
        if not transcript.allow_clock:
            return transcript
    raise AssertionError(f"{script.name} has no transcript without % allow-clock")


def client_part(transcript: Transcript) -> list[Step]:
    """The steps before the client would make the script close: everything before the last thing the
    client sends ahead of the server's end (`= eof`), or before the client's own `! close`, less what the
    client sends last with no answer awaited (the script would still be answering it as the client left,
    and a script that closes before it reads the end of input closed first)."""
    steps = transcript.steps
    end = next((i for i, step in enumerate(steps) if step.kind in ("eof", "close")), len(steps))
    if end < len(steps) and steps[end].kind == "eof":
        end = max(i for i, step in enumerate(steps[:end]) if step.kind == "send")
    while end > 0 and steps[end - 1].kind == "send":
        end -= 1
    return steps[:end]


async def talk(port: int, transcript: Transcript, steps: list[Step]) -> tuple[str, int]:
    sock = socket.create_connection((HOST, port), timeout=5)
    sock.setblocking(False)
    try:
        played = await play(sock, transcript, steps)
        return played.failure, sock.getsockname()[1]
    finally:
        sock.close()  # the client leaves first


def deadend(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "deadend", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Every example's session, recorded by one broker: script name -> (recording, closed_by)."""
    from tests.conftest import finish

    folder = tmp_path_factory.mktemp("rec")
    (folder / "r").mkdir(mode=0o700)
    broker = Broker(EXAMPLES, ["--record", str(folder / "r")], [int(p.stem) for p in SCRIPTS])
    try:
        broker.wait_for(r"ready: \d+ script")
        found: dict[str, tuple[Path, str]] = {}
        transcripts = [first_transcript(script) for script in SCRIPTS]

        async def every_session() -> list[tuple[str, int]]:
            # all at once: the tarpits' pacing adds up to seconds when played one after the other
            talks = (
                talk(broker.port(int(script.stem)), transcript, client_part(transcript))
                for script, transcript in zip(SCRIPTS, transcripts, strict=True)
            )
            return list(await asyncio.gather(*talks))

        for script, (failure, local_port) in zip(SCRIPTS, asyncio.run(every_session()), strict=True):
            assert not failure, f"{script.name}: {failure}"
            rx = rf"conn=([0-9a-f]{{12}}) peer=\S+ connect from {re.escape(HOST)} port {local_port} "
            conn = broker.wait_for(rx).group(1)
            closed_by = broker.session_end(conn).group(2)
            paths = list((folder / "r").glob(f"*-{conn}.jsonl"))
            found[script.name] = (paths[0] if paths else Path(), closed_by)
        return found
    finally:
        finish([broker])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_recorded_session_passes_against_its_own_script(
    script: Path, recorded: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    path, closed_by = recorded[script.name]
    assert closed_by == "peer"  # the client left first, whatever the script did afterwards
    recording = read_recording(path)
    assert recording.meta.seed is not None and recording.end is not None
    made = deadend("replay", str(path), "--transcript")
    assert made.returncode == 0, made.stderr
    lines = made.stdout.splitlines()
    assert f"% seed {recording.meta.seed[0]} {recording.meta.seed[1]}" in lines
    assert lines[-1] == "! close"
    transcript = tmp_path / f"{script.stem}-recorded.transcript"
    transcript.write_text(made.stdout)
    tested = deadend("test", str(script), str(transcript))
    assert tested.returncode == 0, made.stdout + tested.stdout + tested.stderr
    assert "1 passed, 0 failed" in tested.stdout
