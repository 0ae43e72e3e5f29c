"""The hostile-script corpus (tests/data/hostile/*.lua): every attack from inside Lua, in several disguises,
each with its expected outcome in its first line:

    -- expect: REASON[|REASON...] [REGEX]

REASON is the session-end reason; REGEX is matched against what the script sent (for `done`) or against
its error line (otherwise). All of them run at once, next to a well-behaved session that must not notice.
"""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time
from pathlib import Path

from tests.conftest import DATA, read_all

CORPUS = sorted((DATA / "hostile").glob("*.lua"))
GOOD = 'deadend.send("good:" .. deadend.recv(10))'
FLAGS = (
    "--cpu-slice",
    "2",
    "--memory",
    "16",
    "--instructions",
    "5000000",
    "--session-time",
    "6",
    "--linger",
    "2",  # a script spinning after close must reach --instructions first, on a loaded machine too
    "--workers",
    "80",
    "--log-rate",
    "50",
    "--max-per-ip",
    "200",
)


def expectation(path: Path) -> tuple[set[str], str | None]:
    header = path.read_text().splitlines()[0]
    m = re.fullmatch(r"-- expect: (\S+)(?: (.*))?", header)
    assert m, f"{path.name}: bad header {header!r}"
    return set(m.group(1).split("|")), m.group(2)


def test_corpus_is_large_and_covers_every_class() -> None:
    names = [p.stem for p in CORPUS]
    assert len(names) >= 45
    for prefix in (
        "files",
        "processes",
        "network",
        "python",
        "no_shared",
        "stdout",
        "cpu",
        "mem",
        "api",
        "gc",
    ):
        assert any(n.startswith(prefix) for n in names), prefix


def test_hostile_corpus(make_broker) -> None:
    scripts = {"7.lua": GOOD} | {f"{300 + i}.lua": p.read_text() for i, p in enumerate(CORPUS)}
    b = make_broker(scripts, *FLAGS)
    stop = threading.Event()
    good_results: list[bytes | BaseException] = []

    def good_client() -> None:
        # Whatever happens is kept for the test: a failure in this thread alone would go unseen.
        while not stop.is_set():
            try:
                with b.connect(7) as s:
                    s.sendall(b"ping")
                    good_results.append(read_all(s, timeout=10))
            except OSError as e:
                good_results.append(e)
            time.sleep(0.05)

    def hostile_client(i: int) -> bytes:
        with b.connect(300 + i) as s:
            return read_all(s, timeout=20)

    watcher = threading.Thread(target=good_client)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(len(CORPUS)) as pool:
            outputs = list(pool.map(hostile_client, range(len(CORPUS))))
    finally:
        stop.set()
        watcher.join(20)
    # a well-behaved session was served all along, while every hostile one ran
    assert good_results and all(r == b"good:ping" for r in good_results), good_results
    failures = []
    for i, (path, output) in enumerate(zip(CORPUS, outputs, strict=True)):
        reasons, pattern = expectation(path)
        port = b.port(300 + i)
        end = b.wait_for(rf"port={port} .*session end reason=(\S+)", timeout=20)
        reason = end.group(1)
        if reason not in reasons:
            failures.append(f"{path.name}: ended with {reason}, expected {reasons}")
            continue
        if pattern:
            if reason == "done":
                subject = output.decode(errors="replace")
            else:
                lines = [ln for ln in b.lines if f"port={port} " in ln and f"{reason}:" in ln]
                subject = "\n".join(lines)
            if not re.search(pattern, subject):
                failures.append(f"{path.name}: {subject[:200]!r} does not match {pattern!r}")
    assert not failures, "\n".join(failures)
    # the well-behaved client was served throughout, and the broker is still up with nothing escaped
    assert good_results and all(r == b"good:ping" for r in good_results), good_results[:5]
    assert b.proc.poll() is None
    text = "\n".join(b.lines)
    assert "\x1b" not in text and "\r" not in text and "\x00" not in text
    assert not re.search(r"reason=(seccomp|sandbox-crash|protocol-violation)", text)
    assert "script log lines dropped" in text  # the log flood was cut down and counted
