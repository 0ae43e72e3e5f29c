"""Every example ships transcripts, and they pass against it in the real sandbox (`deadend test`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import EXAMPLES, REPO

TRANSCRIPTS = EXAMPLES / "transcripts"
SCRIPTS = sorted(EXAMPLES.glob("*.lua"), key=lambda p: int(p.stem))


def test_there_are_at_least_ten_examples() -> None:
    assert len(SCRIPTS) >= 10


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_example_transcripts_pass(script) -> None:
    transcripts = sorted(TRANSCRIPTS.glob(f"{script.stem}-*.transcript"))
    assert transcripts, f"{script.name} has no transcript"
    result = subprocess.run(
        [sys.executable, "-m", "deadend", "test", str(script), *map(str, transcripts)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(transcripts)} passed, 0 failed" in result.stdout
