"""file:// sinks: JSON lines, 0600, logrotate's reopen, a planted symlink, and the sink set's contract."""

from __future__ import annotations

import asyncio
import json
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deadend.sinks import OutEvent
from tests.sinks.collectors import Reports, all_delivered, make_event, run, sink_set, until


def test_lines_mode_and_reopen_after_logrotate(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    reports = Reports()
    events = [make_event(i) for i in range(20)]

    async def main() -> None:
        sinks = sink_set([f"file://{path}"], reports)
        await sinks.start()
        for event in events[:10]:
            sinks.publish(event)
        await until(all_delivered(sinks, 10))
        path.rename(tmp_path / "events.jsonl.1")  # what logrotate does, then it sends SIGUSR1
        sinks.reopen()
        for event in events[10:]:
            sinks.publish(event)
        await until(all_delivered(sinks, 20))
        await sinks.close(1)

    run(main)
    old = (tmp_path / "events.jsonl.1").read_bytes().splitlines()
    new = path.read_bytes().splitlines()
    assert old == [e.body for e in events[:10]] and new == [e.body for e in events[10:]]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert all(json.loads(line)["id"] for line in new)


def test_a_symlink_at_the_path_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "events.jsonl").symlink_to(victim)
    reports = Reports()

    async def main() -> None:
        sinks = sink_set([f"file://{tmp_path / 'events.jsonl'}"], reports)
        await sinks.start()
        sinks.publish(make_event(0))
        await asyncio.sleep(0.5)
        assert sinks.stats()[0].queued == 1
        await sinks.close(0.1)

    run(main)
    assert victim.read_text() == "precious\n"
    [down] = reports.matching(" down: ")
    assert "is a symlink; a file sink does not follow one" in down


def test_an_event_breaking_the_contract_is_dropped_once_reported(tmp_path: Path) -> None:
    reports = Reports()
    good = make_event(1)
    bad = [
        OutEvent(good.id, good.time, "notice", good.event, good.sensor, good.body),
        OutEvent(good.id, good.time, good.level, good.event, "two words", good.body),
        OutEvent(good.id, good.time, good.level, good.event, good.sensor, b'{"a":"\xc3\xa9"}'),
        OutEvent(good.id, good.time, good.level, good.event, good.sensor, b"{}\n{}"),
    ]

    async def main() -> None:
        sinks = sink_set([f"file://{tmp_path / 'out'}"], reports)
        await sinks.start()
        for event in [*bad, good]:
            sinks.publish(event)
        await until(all_delivered(sinks, 1))
        await sinks.close(1)

    run(main)
    assert (tmp_path / "out").read_bytes() == good.body + b"\n"
    assert len(reports.matching("breaks the OutEvent contract")) == 1


def test_the_hpfeeds_extra_missing_is_one_clear_error(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['hpfeeds'] = None\n"
        "from pathlib import Path\n"
        "from deadend.sinks import SinkSet, parse_sink_url\n"
        "spec = parse_sink_url('hpfeeds://i@127.0.0.1:1/c?secret_file=/s')\n"
        "try:\n"
        "    SinkSet([spec], spool_dir=None, spool_max_bytes=0, queue_events=1, report=print)\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    needs = "hpfeeds:// needs the optional hpfeeds package: pip install 'deadend-honeypot[hpfeeds]'\n"
    assert out.stdout == needs
    assert out.stderr == ""


def test_configuration_errors(tmp_path: Path) -> None:
    reports = Reports()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"queue_events": 0}, "queue_events must be at least 1"),
        ({"spool_dir": tmp_path, "spool_max_bytes": 1000}, "a spool needs at least 262,144 bytes"),
        ({"stream": "a.b"}, "stream name"),
    ]
    for kw, reason in cases:
        with pytest.raises(ValueError, match=re.escape(reason)):
            sink_set([f"file://{tmp_path / 'x'}"], reports, **kw)
    with pytest.raises(ValueError) as twice:
        sink_set([f"file://{tmp_path / 'x'}", f"file://{tmp_path / 'x'}"], reports)
    assert str(twice.value) == f"the same sink twice: file://{tmp_path / 'x'}"
