"""`deadend replay` on hostile recordings, in-process: tampered fields, absurd numbers, random files.

A recording is an attacker's bytes in a file anyone with access could have edited. Whatever it holds,
replay prints no terminal control, emits no transcript directive its bytes did not mean, and fails with
one line, never a traceback. tests/broker/test_replay_cli.py runs the command itself (memory, `| head`).
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deadend.recording import MAX_LINE, Data, End, Gap, RecordingError, Truncated, open_recording
from deadend.replay import add_replay_parser, conversation, run_replay, transcript_of
from deadend.transcript import parse
from tests.conftest import RECORDING_HEADER

HEADER = RECORDING_HEADER
ENTRIES: list[dict[str, object]] = [
    {"t": 0.1, "dir": "out", "data": "220 hi\r\n"},
    {"t": 0.2, "dir": "in", "data": "EHLO x\r\n"},
    {"t": 0.3, "dir": "in", "b64": "AAEC"},
    {"t": 0.4, "event": "gap", "dropped_bytes": 7},
    {"t": 0.5, "event": "truncated", "reason": "session-cap"},
    {"t": 0.6, "event": "end", "reason": "done", "bytes_in": 1, "bytes_out": 2, "closed_by": "peer"},
]
HOSTILE_TEXT = [
    "\x1b]0;owned\x07\x1b[2J",
    "a\rb",
    "x\n> EVIL\n= eof",
    "\u202eevil\u202c",
    "nul\x00",
    "\x9b31m",
    "fe80::1%\x1b]0;x\x07\n> EVIL",
]
HOSTILE_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "-1", "1" + "0" * 30, "9" * 5000, "true", '"1"']


def write(path: Path, header: dict[str, object], entries: list[dict[str, object]]) -> Path:
    lines = [json.dumps(header), *(json.dumps(e) for e in entries)]
    path.write_text("\n".join(lines) + "\n")
    return path


def replay(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add_replay_parser(parser.add_subparsers(dest="command"))
    code = run_replay(parser.parse_args(["replay", *argv]))
    out, err = capsys.readouterr()
    return code, out, err


def assert_safe(text: str) -> None:
    bad = [
        c
        for c in text
        if (ord(c) < 0x20 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F or c in "\u202e\u202c"
    ]
    assert not bad, (bad, text[:500])


def assert_holds_only_the_bytes(transcript: str, path: Path) -> None:
    """The transcript sends the client's bytes and expects the server's, as data, and nothing else."""
    sent, expected, ends = b"", b"", 0
    with open_recording(path) as reader:
        for entry in reader:  # as far as the transcript went
            if isinstance(entry, Gap | Truncated):
                break
            if isinstance(entry, Data):
                sent += entry.payload if entry.dir == "in" else b""
                expected += entry.payload if entry.dir == "out" else b""
            ends += isinstance(entry, End)
    t = parse(transcript)
    assert b"".join(s.data * s.repeat for s in t.steps if s.kind == "send") == sent
    assert b"".join(s.data for s in t.steps if s.kind == "expect_bytes") == expected
    assert {s.kind for s in t.steps} <= {"send", "expect_bytes", "eof", "close"}
    assert len([s for s in t.steps if s.kind in ("eof", "close")]) <= ends
    assert not t.logs and not t.allow_clock


def tampered() -> list[tuple[str, dict[str, object], list[dict[str, object]]]]:
    """Every string field with every hostile text, every number field with every hostile number."""
    cases = []
    for value in HOSTILE_TEXT:
        for key in ("conn", "peer", "script", "script_sha256", "started"):
            cases.append((f"header.{key}", {**HEADER, key: value}, ENTRIES))
        for i, entry in enumerate(ENTRIES):
            for key in entry:
                if isinstance(entry[key], str):
                    changed = [*ENTRIES[:i], {**entry, key: value}, *ENTRIES[i + 1 :]]
                    cases.append((f"entry{i}.{key}", HEADER, changed))
    return cases


def tampered_numbers(tmp_path: Path) -> list[Path]:
    paths = []
    good = [json.dumps(HEADER), *(json.dumps(e) for e in ENTRIES)]
    for n, number in enumerate(HOSTILE_NUMBERS):
        for key in (
            "version",
            "port",
            "peer_port",
            "started_unix",
            "t",
            "dropped_bytes",
            "bytes_in",
            "bytes_out",
        ):
            lines = [line.replace(f'"{key}": ', f'"{key}": {number}, "was": ', 1) for line in good]
            path = tmp_path / f"n{n}-{key}.jsonl"
            path.write_text("\n".join(lines) + "\n")
            paths.append(path)
    return paths


@pytest.mark.parametrize("mode", [[], ["--transcript"]])
def test_tampered_strings_print_no_control_and_forge_no_directive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: list[str]
) -> None:
    for n, (what, header, entries) in enumerate(tampered()):
        path = write(tmp_path / f"{n}.jsonl", header, entries)
        code, out, err = replay(capsys, str(path), *mode)
        assert_safe(out + err)
        assert code in (0, 2), what
        if code == 2:
            assert out == "" or not mode, what  # --transcript writes nothing from a bad file
            assert err.count("\n") == 1 and err.startswith("deadend: error: "), (what, err)
        if mode and code == 0:
            assert_holds_only_the_bytes(out, path)


def test_a_peer_with_a_scope_id_is_refused_with_one_escaped_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "scope.jsonl", {**HEADER, "peer": "fe80::1%\x1b]0;x\x07\n> EVIL"}, ENTRIES)
    for mode in ([], ["--transcript"], ["--to", "127.0.0.1:9"]):
        code, out, err = replay(capsys, str(path), *mode)
        assert (code, out) == (2, "")
        assert err == (
            f"deadend: error: {path}:1: 'peer' fe80::1%\\x1b]0;x\\x07\\x0a> EVIL is not an IP address "
            "(without a scope)\n"
        )


def test_an_empty_chunk_after_a_long_wait_makes_no_dangling_timing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found by test_random_recordings: `@ within` was written for a chunk with no bytes, and nothing after.
    path = write(tmp_path / "empty.jsonl", HEADER, [{"t": 9.0, "dir": "out", "b64": ""}])
    code, out, _err = replay(capsys, str(path), "--transcript")
    assert code == 0 and parse(out).steps == []


def test_absurd_numbers_are_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for path in tampered_numbers(tmp_path):
        for mode in ([], ["--transcript"]):
            code, out, err = replay(capsys, str(path), *mode)
            assert code == 2, (path.name, out)
            assert err.count("\n") == 1 and err.startswith(f"deadend: error: {path}:"), (path.name, err)
            assert_safe(out + err)


def test_a_line_longer_than_any_recording_holds_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(HEADER) + "\n")
        f.write('{"t":1,"dir":"in","data":"' + "x" * MAX_LINE + '"}\n')
    with (
        open_recording(path) as reader,
        pytest.raises(RecordingError, match=f":2: a line longer than {MAX_LINE}"),
    ):
        list(reader)


# --- random recordings -----------------------------------------------------------------------------

texts = st.text(max_size=30)
numbers = st.one_of(st.integers(-5, 2**64), st.floats(allow_nan=True, allow_infinity=True), texts, st.none())
payloads = st.binary(max_size=80)
EXTREMES = ["fe80::1%eth0", "fe80::1%\n> EVIL", "::1", 1e308, 2**70, -0.0, 2**63]


@st.composite
def entries(draw: st.DrawFn, valid: bool) -> dict[str, object]:
    """A line of a recording; with `valid`, numbers and words in range (the text is still anyone's)."""

    def pick(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any] = numbers) -> Any:
        return draw(good if valid else st.one_of(good, bad))

    kind = draw(st.sampled_from(["data"] * 12 + ["gap", "truncated"] + ([] if valid else ["end", "junk"])))
    t = pick(st.floats(0, 100))
    if kind == "data":
        payload = draw(payloads)
        entry: dict[str, object] = {"t": t, "dir": pick(st.sampled_from(["in", "out"]), texts)}
        try:
            entry["data" if draw(st.booleans()) else "b64"] = payload.decode()
        except UnicodeDecodeError:
            entry["b64"] = base64.b64encode(payload).decode()
        return entry
    count = st.integers(0, 2**63 - 1)
    if kind == "gap":
        return {"t": t, "event": "gap", "dropped_bytes": pick(count)}
    if kind == "truncated":
        return {"t": t, "event": "truncated", "reason": draw(texts)}
    if kind == "end":
        end = {
            "t": t,
            "event": "end",
            "reason": draw(texts),
            "bytes_in": pick(count),
            "bytes_out": pick(count),
        }
        return {**end, "closed_by": draw(st.sampled_from(["peer", "script", "limit", "shutdown"]) | texts)}
    return {"t": t, "event": draw(texts)}


@st.composite
def recordings(draw: st.DrawFn) -> tuple[dict[str, object], list[dict[str, object]]]:
    """Valid lines with anyone's text; or one header value out of range; or lines out of range."""
    mode = draw(st.sampled_from(["valid", "valid", "header", "lines"]))
    header = dict(HEADER)
    if mode == "header":
        header[draw(st.sampled_from(sorted(HEADER)))] = draw(st.sampled_from(EXTREMES) | numbers | texts)
    for key in draw(st.lists(st.sampled_from(["script", "script_sha256"]), max_size=2)):
        header[key] = draw(texts)
    lines = draw(st.lists(entries(mode != "lines"), max_size=12))
    if mode != "lines" and draw(st.booleans()):
        closed_by = draw(st.sampled_from(["peer", "script", "limit", "shutdown"]) | texts | st.none())
        end = {"t": 101.0, "event": "end", "reason": draw(texts), "bytes_in": 0, "bytes_out": 0}
        lines.append(end if closed_by is None else {**end, "closed_by": closed_by})
    return header, lines


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recordings())
def test_random_recordings(
    tmp_path: Path, recording: tuple[dict[str, object], list[dict[str, object]]]
) -> None:
    path = write(tmp_path / "r.jsonl", *recording)
    for render in (conversation, transcript_of):
        try:
            with open_recording(path) as reader:
                lines = list(render(reader))
        except RecordingError:
            continue
        for line in lines:
            assert_safe(line)
            assert "\n" not in line and "\t" not in line
    try:
        with open_recording(path) as reader:
            text = "\n".join(transcript_of(reader)) + "\n"
    except RecordingError:
        return
    assert_holds_only_the_bytes(text, path)
