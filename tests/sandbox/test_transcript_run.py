"""`deadend test` with transcripts, against scripts in the real sandbox: the new forms, the limits, and
hostile transcripts (shared between operators) that must not reach the operator's terminal."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

# A prompt without a line end, a line with terminal controls in it, then counting what the client sends.
PROMPTER = r"""
deadend.send("login: ")
local name = deadend.recv(100)
deadend.send("\27[2J\7 hello " .. (name or "") .. "\r\n")
local total, lines = 0, 0
while true do
  local d = deadend.recv(65535)
  if not d then break end
  total = total + #d
  local _, n = string.gsub(d, "\n", "")
  lines = lines + n
end
deadend.log("total=" .. total .. " lines=" .. lines)
"""

# 100,000 bytes without a line end, then it never reads.
FLOODER = """
deadend.send(string.rep("x", 100000))
deadend.sleep(1500)
"""

GOOD = r"""# the new forms
<~| login:\s
>| root
<~ \x1b\[2J\x07 hello root
>* 3 NOOP
>|* 100000 A
! shutdown
= eof
~ log ^info total=100018 lines=3
"""


def deadend_test(script: Path, *transcripts: Path) -> subprocess.CompletedProcess[bytes]:
    cmd = [sys.executable, "-m", "deadend", "test", str(script), *map(str, transcripts)]
    return subprocess.run(cmd, capture_output=True, timeout=120, cwd=REPO)


def controls(data: bytes) -> list[int]:
    return [b for b in data if (b < 0x20 and b not in (0x0A, 0x09)) or b == 0x7F]


def test_hostile_and_broken_transcripts_fail_alone_and_reach_no_terminal(tmp_path: Path) -> None:
    script = tmp_path / "7.lua"
    script.write_text(PROMPTER)
    good = tmp_path / "good.transcript"
    good.write_text(GOOD)
    renamed = tmp_path / "esc\x1b[31m.transcript"  # a shared folder's file names are someone's too
    renamed.write_text(GOOD)
    evil = tmp_path / "evil.transcript"
    evil.write_bytes(b"<~| login:\\s\n< \x1b]0;fake: PASS everything\x07\x1b[2J\n")
    broken = tmp_path / "broken.transcript"
    broken.write_text("<~| login:\\s\n> hello \\q\n")
    mismatch = tmp_path / "mismatch.transcript"
    mismatch.write_text("<~| login:\\s\n>| root\n< nope\n")

    result = deadend_test(script, good, evil, broken, renamed, mismatch)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert controls(out) == [] and controls(result.stderr) == [], out
    text = out.decode()
    assert f"PASS {good}" in text and "PASS " + str(renamed).replace("\x1b", "\\x1b") in text
    assert f"FAIL {evil}\n  {evil}:2: column 3: a raw U+001B character" in text
    assert f"FAIL {broken}\n  {broken}:2: column 9: unknown escape '\\q'" in text
    assert f"FAIL {mismatch}\n  {mismatch}:3: < nope" in text
    assert "got b'\\x1b[2J\\x07 hello root'" in text  # received bytes shown escaped
    assert "2 passed, 3 failed" in text


def test_limits_of_the_client_side(tmp_path: Path) -> None:
    script = tmp_path / "8.lua"
    script.write_text(FLOODER)
    no_line = tmp_path / "line.transcript"
    no_line.write_text("% timeout 1000\n< x\n")
    no_match = tmp_path / "prefix.transcript"
    no_match.write_text("% timeout 1000\n<~| y\n")
    not_read = tmp_path / "send.transcript"
    not_read.write_text("% timeout 500\n>|* 1000000 A\n")
    result = deadend_test(script, no_line, no_match, not_read)
    text = result.stdout.decode()
    assert result.returncode == 1 and "0 passed, 3 failed" in text, text
    assert f"{no_line}:2: < x\n    no line end in the first 65536 bytes: b'xxx" in text
    assert f"{no_match}:2: <~| y\n    no match in the first 65536 bytes: b'xxx" in text
    found = re.search(
        rf"{re.escape(str(not_read))}:2: >\|\* 1000000 A\n    the script took (\d+) of 1000000 bytes", text
    )
    assert found and int(found.group(1)) < 1000000, text


def test_log_expectations_match_the_escaped_text(tmp_path: Path) -> None:
    script = tmp_path / "9.lua"
    script.write_text('deadend.log("a\\tb\\27[2J \\\\ end", "warn")\n')
    escaped = tmp_path / "escaped.transcript"
    escaped.write_text("= eof\n~ log ^warn a\\\\x09b\\\\x1b\\[2J \\\\\\\\ end$\n")
    raw = tmp_path / "raw.transcript"
    raw.write_text("= eof\n~ log a\\tb\n")
    text = deadend_test(script, escaped, raw).stdout.decode()
    assert f"PASS {escaped}" in text and f"FAIL {raw}" in text, text
    assert 'WARN  port=9 conn=rehearsal peer=192.0.2.10 script: "a\\x09b\\x1b[2J \\\\ end"\n' in text
