"""Operations features against the real broker: JSON log events and their schema, Prometheus metrics,
--ignore networks and --config files.

Every JSON line a broker writes here is checked against the shipped docs/events.schema.json; metrics are
scraped over HTTP and parsed with prometheus_client's own parser, and compared with the log lines.
"""

from __future__ import annotations

import ast
import collections
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deadend import __version__
from deadend.events import BASE_FIELDS, EVENTS
from tests.conftest import (
    AS_ROOT,
    HOST,
    REPO,
    Broker,
    descendants,
    finish,
    free_offset,
    read_all,
    read_until,
    wait_gone,
)

SCHEMA_FILE = REPO / "docs" / "events.schema.json"
SCHEMA = json.loads(SCHEMA_FILE.read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
TEXT_LINE = re.compile(
    rf"{TIME} (DEBUG|INFO |WARN |ERROR) port=(-|\d+) conn=(-|[0-9a-f]{{12}}) peer=\S+ \S.*"
)
# What must never reach a log line raw: C0/C1 controls, DEL, bidi controls, zero-width and line separators.
UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
METRIC_LABELS = {"port", "reason", "limit", "state", "action", "result", "version", "le"}

HOLD = 'local d = deadend.recv(10) if d then deadend.send("got " .. d) end'
BANNER_ECHO = (
    'deadend.log("hello") deadend.send("hello\\n") '
    'local d = deadend.recv(100) if d then deadend.send("echo:" .. d) end'
)
LOOP = "while true do end"


# --- helpers ---------------------------------------------------------------------------------------


def json_records(lines: list[str]) -> list[dict[str, Any]]:
    """Parse and schema-check every line; each must be one ASCII-only JSON object."""
    records = []
    for line in lines:
        assert line.isascii() and not UNSAFE.search(line), f"raw unsafe character in {line!r}"
        record = json.loads(line)
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(record)
        ]
        assert not errors, f"{line}\n" + "\n".join(errors)
        assert re.fullmatch(TIME, record["time"]), record
        if record["conn"] is not None:  # a connection's event names its peer
            assert re.fullmatch(r"[0-9a-f]{12}", record["conn"]), record
            assert record["peer"] == HOST and isinstance(record["peer_port"], int), record
            assert isinstance(record["port"], int), record
        records.append(record)
    return records


def assert_one_end_per_conn(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every connection id has exactly one session.end; returns them by connection id."""
    conns = {r["conn"] for r in records if r["conn"] is not None}
    ends = collections.Counter(r["conn"] for r in records if r["event"] == "session.end")
    assert set(ends) == conns, (conns, ends)
    assert all(n == 1 for n in ends.values()), ends
    return {r["conn"]: r for r in records if r["event"] == "session.end"}


def wait_event(b: Broker, event: str, peer_port: int | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """The first JSON line of `event` (for the client whose local port is `peer_port`)."""
    pattern = rf'^\{{.*"event":"{re.escape(event)}",'
    if peer_port is not None:
        pattern += rf'.*"peer_port":{peer_port},'
    return json.loads(b.wait_for(pattern + ".*$", timeout).string)


def stop_and_check(b: Broker, last: str = r"shutting down") -> None:
    """Stop the broker now (its last lines are wanted) and check it left no process behind."""
    children = descendants(b.proc.pid)
    assert b.stop() == 0, b.stderr
    assert not wait_gone(children), "processes left behind by the broker"
    b.wait_for(last, timeout=5)
    time.sleep(0.1)  # the line pump reads the rest up to EOF


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def local_port(s: socket.socket) -> int:
    return s.getsockname()[1]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def metric(samples: Samples, name: str, **labels: str | int) -> float | None:
    """The sample with exactly these labels, or None."""
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())))


def metric_sum(samples: Samples, name: str, **labels: str | int) -> float:
    """The sum of the samples of `name` whose labels include these."""
    want = {(k, str(v)) for k, v in labels.items()}
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def poll_metrics(port: int, ready: Callable[[Samples], bool], timeout: float = 5.0) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def run_cli(args: list[str], timeout: float = 20.0) -> tuple[int, str, str]:
    """Run `python -m deadend broker ...` expecting it to exit by itself."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "deadend", "broker", *args, *AS_ROOT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        cwd=REPO,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"deadend broker {' '.join(args)} did not exit within {timeout}s")
    return proc.returncode, out, err


def one_error_line(stderr: str, *words: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def write_scripts(folder: Path, scripts: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in scripts.items():
        (folder / name).write_text(source)
    return folder


# --- 1. JSON events and their schema ----------------------------------------------------------------


def test_schema_file_is_generated_from_the_catalogue():
    Draft = jsonschema.Draft202012Validator
    Draft.check_schema(SCHEMA)
    out = subprocess.run(
        [sys.executable, "-m", "deadend.events"], cwd=REPO, capture_output=True, text=True, timeout=20
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == SCHEMA_FILE.read_text(), "docs/events.schema.json is stale: regenerate it"
    assert set(SCHEMA["properties"]["event"]["enum"]) == set(EVENTS)
    for name, (_meaning, fields) in EVENTS.items():  # an event field never shadows a base field
        assert not set(fields) & set(BASE_FIELDS), name


LOG_METHODS = {"debug": 1, "info": 1, "warn": 1, "error": 1, "emit": 2}  # method -> index of the event


def emitted_events() -> list[tuple[str, str, set[str] | None]]:
    """(where, event, keyword fields or None when unknown) for each log call with a literal event name."""
    found: list[tuple[str, str, set[str] | None]] = []
    for path in sorted([*REPO.glob("broker/*.py"), *REPO.glob("deadend/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            receiver, method = ast.unparse(node.func.value), node.func.attr
            if method == "script_line" and receiver.endswith(".log"):  # a script's own line: its fields
                found.append((f"{path.relative_to(REPO)}:{node.lineno}", "script.log", {"fields"}))
                continue
            if method in LOG_METHODS and (receiver == "log" or receiver.endswith(".log")):
                index = LOG_METHODS[method]
                fields: set[str] | None = {k.arg for k in node.keywords if k.arg is not None}
                if any(k.arg is None for k in node.keywords):
                    fields = None  # **kwargs: the wrappers in logs.py
            elif method == "format" and receiver == "self" and len(node.args) == 8:
                index = 5  # EventLog._drain's own log.dropped line: fields are a dict literal
                literal = node.args[7]
                fields = {k.value for k in literal.keys} if isinstance(literal, ast.Dict) else None  # type: ignore[union-attr]
            else:
                continue
            if len(node.args) > index:
                arg = node.args[index]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.append((f"{path.relative_to(REPO)}:{node.lineno}", arg.value, fields))
    return found


def test_every_event_in_the_code_is_in_the_catalogue():
    found = emitted_events()
    assert len({name for _, name, _ in found}) >= 15, f"the scan found too little: {found}"
    for where, name, fields in found:
        assert name in EVENTS, f"{where}: event {name!r} is not in deadend/events.py EVENTS"
        if fields is not None:
            assert fields == set(EVENTS[name][1]), f"{where}: {name} fields {fields} != catalogue"
    unused = set(EVENTS) - {name for _, name, _ in found}
    assert not unused, f"catalogued but never emitted: {unused}"


def test_json_lines_validate_and_every_session_ends_once(make_broker):
    scripts = {
        "25.lua": BANNER_ECHO.replace('deadend.log("hello")', 'deadend.log("hello " .. deadend.get_ip())')
        + ' deadend.log("bye", "warn")',
        "26.lua": 'deadend.send("oops\\n") error("boom")',
        "27.lua": 'deadend.send("x") ' + LOOP,
        "28.lua": 'local s = "x" for i = 1, 40 do s = s .. s end',
        "29.lua": HOLD,
        "99.lua": "this is not lua",
        "notes.txt": "not a script",
    }
    b = make_broker(
        scripts, "--log-format", "json", "--instructions", "100000", "--memory", "4", "--max-per-ip", "1"
    )
    # A normal session: the bytes in the session.end line are the client's.
    s = b.connect(25)
    received = read_until(s, b"\n")
    s.sendall(b"HELO there\r\n")
    received += read_all(s)
    assert received == b"hello\necho:HELO there\r\n"
    normal = wait_event(b, "session.end", local_port(s))
    assert (normal["reason"], normal["limit"]) == ("done", None)
    assert (normal["bytes_in"], normal["bytes_out"]) == (12, len(received))
    assert normal["duration"] > 0

    expected = {26: ("script-error", None, b"oops\n"), 27: ("instruction-limit", "instructions", b"x")}
    expected[28] = ("memory-limit", "memory", b"")
    for port, (reason, limit, data) in expected.items():
        s = b.connect(port)
        assert read_all(s) == data
        end = wait_event(b, "session.end", local_port(s))
        assert (end["reason"], end["limit"], end["bytes_in"], end["bytes_out"]) == (
            reason,
            limit,
            0,
            len(data),
        )
        assert end["duration"] > 0
        problem = wait_event(b, "session.problem", local_port(s))
        assert problem["reason"] == reason and problem["detail"], problem

    # Two connections from one address with --max-per-ip 1: the second is refused with one line.
    held = b.connect(29)
    wait_event(b, "connect", local_port(held))
    refused = b.connect(29)
    assert read_all(refused) == b""
    end = wait_event(b, "session.end", local_port(refused))
    assert (end["reason"], end["bytes_in"], end["bytes_out"], end["closed_by"]) == ("per-ip-limit", 0, 0, "-")
    held.sendall(b"z")
    assert read_all(held) == b"got z"
    end = wait_event(b, "session.end", local_port(held))
    assert (end["reason"], end["bytes_in"], end["bytes_out"]) == ("done", 1, 5)

    stop_and_check(b)
    records = json_records(b.lines)
    by_event = collections.defaultdict(list)
    for r in records:
        by_event[r["event"]].append(r)
    assert [r["file"] for r in by_event["script.ignored"]] == ["notes.txt"]
    (bad,) = by_event["script.compile_error"]
    assert (bad["script"], bad["kept_previous"], bad["port"]) == ("99.lua", False, b.port(99))
    assert "syntax error" in bad["error"]
    assert sorted(r["script"] for r in by_event["listen"]) == [
        "25.lua",
        "26.lua",
        "27.lua",
        "28.lua",
        "29.lua",
    ]
    (ready,) = by_event["broker.ready"]
    assert ready["scripts"] == 5
    assert len(by_event["broker.stopping"]) == 1
    logs = [(r["level"], r["msg"]) for r in by_event["script.log"]]
    assert logs == [("info", f"hello {HOST}"), ("warn", "bye")]
    ends = assert_one_end_per_conn(records)
    assert len(ends) == 6
    assert len(by_event["connect"]) == 5  # the refused connection has only its session.end


def test_json_queue_events_and_pool_gauges(make_broker):
    mport = free_port()
    b = make_broker(
        {"29.lua": 'deadend.log("running") ' + HOLD},
        *("--log-format", "json", "--workers", "1", "--warm", "0", "--queue-timeout", "10"),
        *("--metrics", f"{HOST}:{mport}", "--max-per-ip", "2"),
    )
    first = b.connect(29)
    wait_event(b, "script.log", local_port(first))  # its sandbox is forked and running the script
    second = b.connect(29)
    queued = wait_event(b, "queued", local_port(second))
    assert queued["waiting"] == 0
    samples = scrape(mport)
    assert metric(samples, "deadend_queue_length") == 1
    assert metric(samples, "deadend_sandboxes", state="busy") == 1
    assert metric(samples, "deadend_sandboxes", state="warm") == 0
    assert metric(samples, "deadend_sandboxes_max") == 1
    assert metric(samples, "deadend_connections_active", port=b.port(29)) == 2

    first.sendall(b"1")
    assert read_all(first) == b"got 1"
    dequeued = wait_event(b, "dequeued", local_port(second))
    assert dequeued["waited_ms"] >= 0
    second.sendall(b"2")
    assert read_all(second) == b"got 2"
    assert wait_event(b, "session.end", local_port(second))["reason"] == "done"
    samples = scrape(mport)
    assert metric(samples, "deadend_queue_length") == 0
    assert metric_sum(samples, "deadend_connections_active") == 0
    assert metric(samples, "deadend_sessions_ended_total", port=b.port(29), reason="done") == 2

    stop_and_check(b)
    records = json_records(b.lines)
    assert [r["event"] for r in records].count("metrics.listening") == 1
    assert len(assert_one_end_per_conn(records)) == 2


HOSTILE_SCRIPT = """
local buf = ""
while not buf:find("END", 1, true) do
  local d = deadend.recv(4096)
  if not d then break end
  buf = buf .. d
end
deadend.log(buf)
deadend.send("ok")
"""
HOSTILE = (
    b'x\n{"event":"session.end","reason":"forged"}\r\n'
    + "\u2028".encode()
    + b"\x1b[2J\xff\xfe\x00\\x41"
    + "\u202e\u200b".encode()
    + b"END"
)
# What the script.log message must say: every one of those escaped, the backslash doubled.
HOSTILE_LOGGED = (
    r'x\x0a{"event":"session.end","reason":"forged"}\x0d\x0a\u2028\x1b[2J\xff\xfe\x00\\x41\u202e\u200bEND'
)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_hostile_input_cannot_break_or_forge_lines(make_broker, fmt):
    b = make_broker({"30.lua": HOSTILE_SCRIPT}, "--log-format", fmt)
    s = b.connect(30)
    s.sendall(HOSTILE)
    assert read_all(s) == b"ok"
    if fmt == "json":
        wait_event(b, "session.end", local_port(s))
    else:
        b.wait_for(rf"peer={HOST} session end reason=done")
    stop_and_check(b)
    if fmt == "json":
        records = json_records(b.lines)
        (logged,) = [r for r in records if r["event"] == "script.log"]
        assert logged["msg"] == HOSTILE_LOGGED  # the script's text, once: no field repeats it
        assert len(assert_one_end_per_conn(records)) == 1
        assert sum('"event":"session.end"' in line for line in b.lines) == 1
        assert not any(r.get("reason") == "forged" for r in records)
    else:
        for line in b.lines:
            assert TEXT_LINE.fullmatch(line) and not UNSAFE.search(line), f"broken line: {line!r}"
        (logged,) = [line for line in b.lines if " script: " in line]
        quoted = HOSTILE_LOGGED.replace('"', '\\"')  # between quotes in text lines, with quotes escaped
        assert logged.endswith(f' script: "{quoted}"')
        assert sum(" session end " in line for line in b.lines) == 1
        assert sum("forged" in line for line in b.lines) == 1


# --- 2. Prometheus metrics --------------------------------------------------------------------------


def test_metrics_count_sessions_bytes_limits_and_refusals(make_broker):
    mport = free_port()
    b = make_broker(
        {"25.lua": BANNER_ECHO, "27.lua": LOOP, "29.lua": HOLD},
        *("--log-format", "json", "--metrics", f"{HOST}:{mport}", "--max-per-ip", "1"),
        *("--instructions", "100000", "--warm", "2", "--workers", "8"),
    )
    p25, p27, p29 = b.port(25), b.port(27), b.port(29)
    b.wait_for(rf"metrics on http://{re.escape(HOST)}:{mport}/metrics")
    before = poll_metrics(mport, lambda s: metric(s, "deadend_sandboxes", state="warm") == 2)
    assert metric(before, "deadend_sandboxes", state="warm") == 2
    starts = metric(before, "deadend_sandbox_starts_total")
    assert starts is not None
    assert starts is not None and starts >= 2

    sent_to_clients = 0
    for i in range(3):
        s = b.connect(25)
        data = read_until(s, b"\n")
        s.sendall(b"ping%d" % i)
        data += read_all(s)
        assert data == b"hello\necho:ping%d" % i
        sent_to_clients += len(data)
        wait_event(b, "session.end", local_port(s))
    s = b.connect(27)
    assert read_all(s) == b""
    assert wait_event(b, "session.end", local_port(s))["reason"] == "instruction-limit"

    held = b.connect(29)
    wait_event(b, "connect", local_port(held))
    during = scrape(mport)
    assert metric(during, "deadend_connections_active", port=p29) == 1
    assert metric_sum(during, "deadend_connections_active") == 1
    refused = b.connect(29)
    assert read_all(refused) == b""
    assert wait_event(b, "session.end", local_port(refused))["reason"] == "per-ip-limit"
    held_port = local_port(held)
    held.close()
    wait_event(b, "session.end", held_port)

    after = poll_metrics(mport, lambda s: metric(s, "deadend_sandboxes", state="warm") == 2)
    assert metric(after, "deadend_connections_accepted_total", port=p25) == 3
    assert metric(after, "deadend_connections_accepted_total", port=p27) == 1
    assert metric(after, "deadend_connections_accepted_total", port=p29) == 1
    assert metric(after, "deadend_sessions_ended_total", port=p25, reason="done") == 3
    assert metric(after, "deadend_sessions_ended_total", port=p27, reason="instruction-limit") == 1
    assert metric(after, "deadend_sessions_ended_total", port=p29, reason="per-ip-limit") == 1
    assert metric(after, "deadend_sessions_ended_total", port=p29, reason="done") == 1
    assert metric_sum(after, "deadend_connections_refused_total", reason="per-ip-limit") == 1
    assert metric_sum(after, "deadend_connections_refused_total") == 1
    assert metric(after, "deadend_received_bytes_total", port=p25) == len(b"ping0") * 3
    assert metric(after, "deadend_sent_bytes_total", port=p25) == sent_to_clients
    assert metric_sum(after, "deadend_received_bytes_total") == len(b"ping0") * 3
    assert metric_sum(after, "deadend_sent_bytes_total") == sent_to_clients
    assert metric(after, "deadend_limits_hit_total", limit="instructions") == 1
    assert metric_sum(after, "deadend_limits_hit_total") == 1
    assert metric(after, "deadend_script_log_lines_total", port=p25) == 3
    assert metric(after, "deadend_session_duration_seconds_count", port=p25) == 3
    assert metric_sum(after, "deadend_trapped_seconds_total") > 0
    assert metric_sum(after, "deadend_connections_active") == 0
    assert metric(after, "deadend_queue_length") == 0
    assert metric(after, "deadend_sandboxes_max") == 8
    assert (metric(after, "deadend_sandbox_starts_total") or 0) >= starts + 5  # one worker per session
    assert metric(after, "deadend_build_info", version=__version__) == 1
    # Bounded labels only, and never a peer.
    names = {name for (_, labels) in after for name, _ in labels}
    assert names <= METRIC_LABELS, names - METRIC_LABELS
    assert not [key for key in after if any(HOST in v for _, v in key[1])]

    # The counters agree with the log lines.
    stop_and_check(b)
    records = json_records(b.lines)
    ends = assert_one_end_per_conn(records)
    by_reason = collections.Counter((e["port"], e["reason"]) for e in ends.values())
    counted = {
        (int(dict(ls)["port"]), dict(ls)["reason"]): v
        for (n, ls), v in after.items()
        if n == "deadend_sessions_ended_total"
    }
    assert counted == dict(by_reason)


def test_metrics_bad_address_exits_2(tmp_path):
    folder = write_scripts(tmp_path / "s", {"25.lua": HOLD})
    code, _out, err = run_cli(["--scripts", str(folder), "--host", HOST, "--metrics", "nope"])
    assert code == 2
    one_error_line(err, "--metrics", "nope")


def test_metrics_port_in_use_exits_1(tmp_path):
    folder = write_scripts(tmp_path / "s", {"25.lua": HOLD})
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        offset = str(free_offset([25]))
        args = [
            "--scripts",
            str(folder),
            "--host",
            HOST,
            "--port-offset",
            offset,
            "--metrics",
            f"{HOST}:{port}",
        ]
        code, _out, err = run_cli(args)
    assert code == 1
    one_error_line(err, "--metrics", f"{HOST}:{port}", "in use")


# --- 3. --ignore ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("network", "action", "reply"),
    [
        ("127.0.0.0/8", "serve", b"220 banner\r\n"),
        ("127.0.0.0/8", "refuse", b""),
        ("10.0.0.0/8", "serve", b"220 banner\r\n"),
    ],
)
def test_ignore_networks(make_broker, network, action, reply):
    mport = free_port()
    script = 'deadend.log("seen") deadend.send("220 banner\\r\\n")'
    b = make_broker(
        {"25.lua": script}, "--ignore", network, "--ignore-action", action, "--metrics", f"{HOST}:{mport}"
    )
    port = b.port(25)
    s = b.connect(25)
    assert read_all(s) == reply
    if network == "10.0.0.0/8":  # not ours: logged as usual
        conn = b.wait_for(rf"conn=([0-9a-f]{{12}}) peer={HOST} connect from").group(1)
        assert b.session_end(conn).group(1) == "done"
        b.wait_for(rf'conn={conn} .*script: "seen"')
        samples = scrape(mport)
        assert metric_sum(samples, "deadend_ignored_connections_total") == 0
        assert metric(samples, "deadend_connections_accepted_total", port=port) == 1
        return
    samples = poll_metrics(mport, lambda s: metric_sum(s, "deadend_ignored_connections_total") > 0)
    assert metric(samples, "deadend_ignored_connections_total", port=port, action=action) == 1
    assert metric_sum(samples, "deadend_ignored_connections_total") == 1
    for name in ("accepted", "refused"):
        assert metric_sum(samples, f"deadend_connections_{name}_total") == 0
    for name in ("sessions_ended", "script_log_lines", "received_bytes", "sent_bytes"):
        assert metric_sum(samples, f"deadend_{name}_total") == 0
    # A reload line is queued after anything the session could have logged: once it is out, all is.
    b.proc.send_signal(signal.SIGHUP)
    b.wait_for(r"reload: no change")
    for line in b.lines:
        assert " conn=- " in line and "seen" not in line, f"an ignored peer was logged: {line}"


def test_ignore_bad_network_exits_2(tmp_path):
    folder = write_scripts(tmp_path / "s", {"25.lua": HOLD})
    code, _out, err = run_cli(["--scripts", str(folder), "--host", HOST, "--ignore", "notanet"])
    assert code == 2
    one_error_line(err, "--ignore", "notanet")


# --- 4. --config FILE -------------------------------------------------------------------------------


class CliBroker(Broker):
    """A broker started with exactly `args`: no --scripts/--host/--port-offset added (for --config)."""

    def __init__(self, args: list[str], offset: int) -> None:
        self.scripts = Path()
        self.offset = offset
        self._launch([sys.executable, "-m", "deadend", "broker", *args, *AS_ROOT])


@pytest.fixture
def cli_broker() -> Iterator[Callable[..., CliBroker]]:
    started: list[CliBroker] = []

    def start(*args: str, offset: int) -> CliBroker:
        b = CliBroker(list(args), offset)
        started.append(b)
        b.wait_for(r"ready: \d+ script")
        return b

    yield start
    finish(started)


def config_folder(tmp_path: Path, body: str) -> tuple[Path, int]:
    """A config folder: `s/25.lua` and `deadend.toml` (body plus a free port offset)."""
    folder = tmp_path / "cfg"
    write_scripts(folder / "s", {"25.lua": HOLD})
    offset = free_offset([25])
    (folder / "deadend.toml").write_text(f"{body}\nport-offset = {offset}\n")
    return folder / "deadend.toml", offset


CONFIG = 'scripts = "s"\nmax-per-ip = 1\nlog-format = "json"\nhost = ["127.0.0.1"]\n'


def test_config_file_is_honoured(cli_broker, tmp_path):
    path, offset = config_folder(tmp_path, CONFIG)
    b = cli_broker("--config", str(path), offset=offset)  # the scripts folder comes only from the file
    records = json_records(b.lines)
    assert [r["address"] for r in records if r["event"] == "listen"] == [f"{HOST}:{b.port(25)}"]
    held = b.connect(25)
    wait_event(b, "connect", local_port(held))
    second = b.connect(25)
    assert read_all(second) == b""
    assert wait_event(b, "session.end", local_port(second))["reason"] == "per-ip-limit"
    held.sendall(b"k")
    assert read_all(held) == b"got k"
    wait_event(b, "session.end", local_port(held))
    json_records(b.lines)


def test_command_line_overrides_config_file(cli_broker, tmp_path):
    path, offset = config_folder(tmp_path, CONFIG.replace('["127.0.0.1"]', '["::1"]'))
    b = cli_broker(
        *("--config", str(path), "--log-format", "text", "--max-per-ip", "5", "--host", HOST), offset=offset
    )
    for line in b.lines:
        assert TEXT_LINE.fullmatch(line), f"not a text line: {line!r}"
    listens = [line for line in b.lines if "listening on" in line]
    assert len(listens) == 1 and f"listening on {HOST}:{b.port(25)} " in listens[0], listens  # replaced
    first, second = b.connect(25), b.connect(25)
    for s in (first, second):
        b.wait_for(rf"peer={HOST} connect from {HOST} port {local_port(s)} ")
    for i, s in enumerate((first, second)):
        s.sendall(b"%d" % i)
        assert read_all(s) == b"got %d" % i
    assert len(b.conn_ids()) == 2
    for conn in b.conn_ids():
        assert b.session_end(conn).group(1) == "done"


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("bogus = 1", "bogus"),
        ('max-per-ip = "x"', "max-per-ip"),
        ("max-per-ip = 0", "max-per-ip"),
        ("max-per-ip = 1.5", "max-per-ip"),
        ("max-per-ip = true", "max-per-ip"),
        ("proxy-protocol = 1", "proxy-protocol"),
        ('log-format = "xml"', "log-format"),
        ('host = ["127.0.0.1", false]', "host"),
        ("scripts = ", None),  # not TOML
        (None, None),  # no such file
    ],
)
def test_config_file_errors_exit_2_with_one_line(tmp_path, body, key):
    folder = write_scripts(tmp_path / "s", {"25.lua": HOLD})
    path = tmp_path / "deadend.toml"
    if body is not None:
        path.write_text(f'scripts = "s"\n{body}\n' if key else f"{body}\n")
    code, out, err = run_cli(["--config", str(path), "--host", HOST, "--scripts", str(folder)])
    assert code == 2, (out, err)
    line = one_error_line(err, str(path), *([key] if key else []))
    assert line.startswith("deadend: error: ")
    assert out == ""
