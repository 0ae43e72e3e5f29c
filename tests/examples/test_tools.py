"""The author and auditor tools: `deadend check`, `deadend try`, `deadend test`, on the real sandbox."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deadend.transcript import TranscriptError, parse, unescape
from tests.conftest import DATA, EXAMPLES, REPO

BAD = DATA / "bad"


def deadend(
    *args: str, stdin: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "deadend", *args], input=stdin, capture_output=True, timeout=timeout, cwd=REPO
    )


# --- check -----------------------------------------------------------------------------------------


def test_check_examples_is_clean() -> None:
    result = deadend("check", str(EXAMPLES))
    out = result.stdout.decode()
    assert result.returncode == 0, out
    assert re.search(r"(\d+) file\(s\) checked, 0 with problems", out)
    assert "examples/25.lua: port 25 — clean" in out


def test_check_flags_every_planted_defect() -> None:
    result = deadend("check", "--format", "json", str(BAD))
    assert result.returncode == 1
    reports = {Path(r["file"]).name: r for r in json.loads(result.stdout)}
    files = sorted(BAD.glob("*.lua"))
    assert len(files) >= 18 and set(reports) == {p.name for p in files}
    for path in files:
        header = path.read_text().splitlines()[0]
        report = reports[path.name]
        if header.startswith("-- clean"):
            assert report["clean"], (path.name, report["problems"])
            continue
        found = re.fullmatch(r"-- defect: (.*)", header)
        assert found, (path.name, header)
        defect = found.group(1)
        assert not report["clean"], path.name
        assert any(re.search(defect, p) for p in report["problems"]), (path.name, defect, report["problems"])
        # the planted defect is the only one: nothing else about the file is flagged
        assert len(report["problems"]) == 1, (path.name, report["problems"])


def test_check_reports_calls_and_limits_in_text() -> None:
    result = deadend("check", str(EXAMPLES / "25.lua"), str(BAD / "1008.lua"))
    out = result.stdout.decode()
    assert result.returncode == 1
    calls = r"uses deadend\.close, deadend\.get_ip, deadend\.log, .*deadend\.set_limits, deadend\.set_tarpit"
    assert re.search(calls, out)
    assert "✗ never calls deadend.set_limits" in out
    assert "2 file(s) checked, 1 with problems" in out


def test_check_compiles_in_the_sandbox_not_here(tmp_path: Path) -> None:
    # A binary chunk is refused by the sandbox's text-only compiler, and reported, not run.
    (tmp_path / "7.lua").write_bytes(b"\x1bLuaT\x00\x19\x93\r\n\x1a\n\x04\x08\x08")
    result = deadend("check", str(tmp_path / "7.lua"))
    assert result.returncode == 1
    assert b"does not compile" in result.stdout and b"binary chunk" in result.stdout


def test_check_missing_path_is_a_clear_error() -> None:
    result = deadend("check", "/nonexistent/9.lua")
    assert result.returncode == 2
    assert result.stderr.decode().strip().splitlines() == [
        "deadend: error: no such file or folder: /nonexistent/9.lua"
    ]


# --- try -------------------------------------------------------------------------------------------


def test_try_uses_stdin_and_stdout_as_the_client() -> None:
    result = deadend(
        "try", str(EXAMPLES / "25.lua"), "--peer-ip", "203.0.113.9", stdin=b"EHLO me\r\nQUIT\r\n"
    )
    assert result.returncode == 0
    assert result.stdout.startswith(b"220 mail.example.com ESMTP")
    assert b"250-PIPELINING" in result.stdout and result.stdout.endswith(b"221 2.0.0 Bye\r\n")
    err = result.stderr.decode()
    assert 'peer=203.0.113.9 script: "connect from 203.0.113.9"' in err
    assert "session end reason=done" in err


def test_try_reports_a_hostile_script(tmp_path: Path) -> None:
    (tmp_path / "7.lua").write_text("deadend.send('x') while true do end")
    result = deadend("try", str(tmp_path / "7.lua"), "--instructions", "100000", stdin=b"")
    assert result.stdout == b"x"
    assert b"session end reason=instruction-limit" in result.stderr
    assert result.returncode == 1  # a ceiling is a failed try


def test_try_exits_non_zero_after_a_script_error(tmp_path: Path) -> None:
    (tmp_path / "7.lua").write_text("local line = deadend.recv(10)\ndeadend.send(line:upper())\n")
    failed = deadend("try", str(tmp_path / "7.lua"), stdin=b"")  # recv gives nil: indexing it fails
    assert b"session end reason=script-error" in failed.stderr
    assert failed.returncode == 1
    worked = deadend("try", str(tmp_path / "7.lua"), stdin=b"hi")
    assert (worked.stdout, worked.returncode) == (b"HI", 0)


def test_try_tls_is_a_tls_client_from_the_first_byte() -> None:
    request = b"GET / HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n"
    result = deadend("try", str(EXAMPLES / "443.lua"), "--tls", "--sni", "shop.example", stdin=request)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"HTTP/1.1 200 OK\r\nServer: nginx/1.24.0\r\n")
    err = result.stderr.decode()
    assert re.search(r"TLS TLSv1\.3 \S+ alpn_selected=- ja4=t13d\S+ ja3=\w{32} sni=shop\.example", err), err
    assert "session end reason=done" in err


def test_try_starttls_upgrades_when_the_script_asks() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "deadend", "try", str(EXAMPLES / "25.lua"), "--starttls"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b"EHLO me\r\nSTARTTLS\r\n")
        proc.stdin.flush()
        seen = b""
        while b"220 2.0.0 Ready to start TLS\r\n" not in seen:
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, seen
            seen += chunk
        assert b"250-STARTTLS" in seen
        # The script asks for TLS right after its 220; bytes that beat that request go in plaintext, as
        # they would from a client that did not wait for the 220.
        time.sleep(0.5)
        out, err = proc.communicate(b"EHLO me\r\nQUIT\r\n", timeout=30)  # over TLS now, through the relay
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert b"250 SMTPUTF8" in out and b"250-STARTTLS" not in out and out.endswith(b"221 2.0.0 Bye\r\n")
    assert b"TLS TLSv1.3" in err and b"session end reason=done" in err


# --- test (transcripts) ----------------------------------------------------------------------------


def test_transcripts_pass_and_fail_with_context(tmp_path: Path) -> None:
    good = tmp_path / "good.transcript"
    good.write_text(
        "# SMTP AUTH LOGIN, refused and logged\n"
        "<~ 220 .*ESMTP.*\n> EHLO tester\n<* 250 .*\n> AUTH LOGIN\n< 334 VXNlcm5hbWU6\n> cm9vdA==\n"
        "< 334 UGFzc3dvcmQ6\n> aHVudGVyMg==\n@ after 90\n<~ 535 .*\n> QUIT\n<~ 221 .*\n= eof\n~ log root\n"
    )
    bad = tmp_path / "bad.transcript"
    bad.write_text("<~ 220 .*\n> EHLO tester\n< 250 nope\n")
    result = deadend("test", str(EXAMPLES / "25.lua"), str(good), str(bad))
    out = result.stdout.decode()
    assert result.returncode == 1
    assert f"PASS {good}" in out and f"FAIL {bad}" in out
    assert f"{bad}:3: < 250 nope" in out
    assert "expected line b'250 nope', got b'250-mail.example.com'" in out
    assert "1 passed, 1 failed" in out


@pytest.mark.parametrize(
    ("script", "failure"),
    [
        # 25.lua takes the ClientHello for a command and answers in plaintext
        (EXAMPLES / "25.lua", "the TLS handshake failed: [SSL: WRONG_VERSION_NUMBER]"),
        (None, "the TLS handshake did not complete within 1000 ms"),  # a script that never answers
    ],
)
def test_a_transcript_starttls_the_script_does_not_take_is_a_clear_failure(
    tmp_path: Path, script: Path | None, failure: str
) -> None:
    if script is None:
        script = tmp_path / "7.lua"
        script.write_text('deadend.send("220 hi\\r\\n") deadend.sleep(3000)')
    transcript = tmp_path / "t.transcript"
    transcript.write_text("% timeout 1000\n<~ 220 .*\n! starttls\n")
    result = deadend("test", str(script), str(transcript))
    out = result.stdout.decode()
    assert result.returncode == 1 and f"{transcript}:3: ! starttls" in out
    assert failure in out


def test_transcript_log_and_timing_expectations(tmp_path: Path) -> None:
    script = tmp_path / "7.lua"
    script.write_text(
        "deadend.set_tarpit(300) deadend.send('hi\\n') local d = deadend.recv(10) "
        "deadend.log('got ' .. tostring(d), 'warn') deadend.send('bye\\n')"
    )
    fast = tmp_path / "fast.transcript"
    fast.write_text("< hi\n> x\n@ within 100\n< bye\n")
    slow = tmp_path / "slow.transcript"
    slow.write_text("< hi\n> x\n@ after 250\n< bye\n= eof\n~ log ^warn got x\n")
    missing_log = tmp_path / "log.transcript"
    missing_log.write_text("< hi\n> x\n< bye\n~ log never logged\n")
    result = deadend("test", str(script), str(fast), str(slow), str(missing_log))
    out = result.stdout.decode()
    assert f"FAIL {fast}" in out and "nothing within 100 ms" in out  # the tarpit delays the reply
    assert f"PASS {slow}" in out
    assert f"FAIL {missing_log}" in out and "no script log line matches" in out


def test_transcript_parser() -> None:
    t = parse(
        "% peer-ip 198.51.100.7\n% timeout 2000\n>| \\x16\\x03\\x01\n"
        "@ within 50\n<| A\\sB\\r\\n\n! shutdown\n"
    )
    assert t.peer_ip == "198.51.100.7" and t.timeout_ms == 2000
    assert [s.kind for s in t.steps] == ["send", "expect_bytes", "shutdown"]
    assert t.steps[0].data == b"\x16\x03\x01" and t.steps[1].data == b"A B\r\n" and t.steps[1].within_ms == 50
    assert unescape("a\\\\b\\t") == b"a\\b\t"
    for bad in ("< x\n% allow-clock\n", "@ within 5\n> x\n", "?? what\n", "<~ (\n", "@ sometime 5\n< x\n"):
        with pytest.raises(TranscriptError):
            parse(bad)


def test_check_escapes_names_from_the_script(tmp_path: Path) -> None:
    # Global names are the script's own constants: a terminal escape in one must not reach the reviewer.
    # Both compile, so the analysis sees the names (a script that does not compile is never analysed).
    (tmp_path / "7.lua").write_text('deadend.set_limits(1) deadend.set_tarpit(1) _ENV["\\27[2Jx"] = 1')
    (tmp_path / "8.lua").write_bytes(
        b"deadend.set_limits(1) deadend.set_tarpit(1) local v = _ENV['\x1b]0;t\x07']"
    )
    for fmt in ("json", "text"):
        result = deadend("check", "--format", fmt, str(tmp_path))
        assert b"\x1b" not in result.stdout and b"\x07" not in result.stdout, result.stdout
        assert b"does not compile" not in result.stdout, result.stdout
        shown = result.stdout.replace(b"\\\\", b"\\")  # JSON doubles the escapes' backslashes
        assert b"\\x1b[2Jx" in shown, result.stdout  # the written global, escaped
        assert b"\\x1b]0;t\\x07" in shown, result.stdout  # the unknown global read, escaped
