"""deadend/audit.py without a process: the battery, the verdict rules, the findings' words, the diff."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deadend import audit
from deadend.audit import Run
from deadend.options import OPTIONS


def run(name: str = "silent", **fields: Any) -> Run:
    words = {"silent": "when the client is silent", "random": "when the client sends random bytes"}
    r = Run(name, words.get(name, f"when {name}"), (0, 1), reason="done", closed_by="peer")
    for key, value in fields.items():
        setattr(r, key, value)
    return r


def codes(runs: list[Run]) -> dict[str, str]:
    return {f.code: f.severity for f in audit.findings(runs)}


# --- the battery and the budget ------------------------------------------------------------------------


def test_the_budget_tightens_every_ceiling_flag() -> None:
    ceilings = {o.name: o for o in OPTIONS if o.ceiling}
    assert set(audit.BUDGET) == set(ceilings)
    for name in (
        "instructions",
        "cpu-slice",
        "session-cpu",
        "session-time",
        "idle-timeout",
        "linger",
        "tls-handshake-timeout",
    ):
        assert audit.BUDGET[name] < ceilings[name].default, name
    # logs are counted, not dropped: the finding is judged against the broker's own --log-burst
    assert audit.BUDGET["log-burst"] > ceilings["log-burst"].default == audit.LOG_BURST
    assert {o.name: o.default for o in audit.BUDGET_OPTIONS} == audit.BUDGET


def test_the_battery_is_the_issue_s_and_each_run_has_its_own_fixed_seed() -> None:
    names = [b.name for b in audit.battery(0)]
    assert names == ["silent", "random", "large", "disconnect", "half-close", "trickle"]
    assert audit.battery(7) == audit.battery(7) and audit.battery(7) != audit.battery(8)  # random bytes
    seeds = {audit.run_seed(5, name) for name in [*names, "generic", "transcript 25-mail.transcript"]}
    assert len(seeds) == len(names) + 2 and all(seed[0] == 5 for seed in seeds)
    assert audit.run_seed(5, "silent") == audit.run_seed(5, "silent")


# --- the rules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "code", "severity"),
    [
        ({"reason": "instruction-limit"}, "instruction-limit", "fail"),
        ({"reason": "memory-limit"}, "memory-limit", "fail"),
        ({"reason": "cpu-deadline"}, "cpu-deadline", "fail"),
        ({"reason": "seccomp"}, "seccomp", "fail"),
        ({"reason": "linger", "left_at": 1.0, "duration": 11.0}, "linger", "fail"),
        (
            {"reason": "script-error", "detail": "s.lua:3: attempt to index a nil value"},
            "script-error",
            "warn",
        ),
        ({"log_lines": 101}, "log-flood", "warn"),
        ({"memory": 9 << 20}, "memory", "warn"),
        ({"instructions": 20_000_001}, "instructions", "warn"),
        ({"cpu": 0.6}, "cpu", "warn"),
        ({"calls": {"get_ip": 3000}, "duration": 3.0}, "spin", "warn"),
        ({"left_at": 1.0, "duration": 3.5}, "after-left", "warn"),
        ({"transcript_failure": "t:3: < 250 ok\n    timed out"}, "transcript", "warn"),
    ],
)
def test_each_rule(fields: dict[str, Any], code: str, severity: str) -> None:
    assert codes([run(**fields)]) == {code: severity}


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"reason": "idle"},
        {"reason": "session-time"},  # a tarpit holds a silent client: that is its job
        {"log_lines": 100},  # at --log-burst, nothing is dropped
        {"memory": 8 << 20, "instructions": 20_000_000, "cpu": 0.5},
        {"calls": {"get_ip": 1999}, "duration": 1.0},  # few calls, however fast
        {"calls": {"recv": 5000}, "duration": 60.0},  # many calls, but slowly
        {"left_at": 1.0, "duration": 3.0},  # within two seconds of the client leaving
    ],
)
def test_what_a_well_behaved_run_may_do(fields: dict[str, Any]) -> None:
    assert codes([run(**fields)]) == {}


def test_a_ceiling_is_not_also_a_resource_warning() -> None:
    assert codes([run(reason="memory-limit", memory=32 << 20)]) == {"memory-limit": "fail"}
    assert codes([run(reason="instruction-limit", instructions=50_000_000)]) == {"instruction-limit": "fail"}


def test_linger_says_whether_it_was_time_or_calls() -> None:
    by_time = audit.findings([run(reason="linger", left_at=0.5, duration=5.6)])
    assert by_time[0].text == "keeps running 5 s after the peer left when the client is silent"
    by_calls = audit.findings([run(reason="linger", detail="kept calling send/recv after the peer was done")])
    assert by_calls[0].text == "keeps calling send/recv after the peer left when the client is silent"


def test_a_finding_names_every_run_and_keeps_the_worst_words() -> None:
    runs = [run("silent", log_lines=150), run("random", log_lines=4000), run("trickle"), run("half-close")]
    [finding] = audit.findings(runs)
    assert finding.code == "log-flood" and finding.behaviours == ["silent", "random"]
    assert finding.text == (
        "logs 4,000 lines per session (the broker drops what passes --log-burst 100) when the client is "
        "silent and when the client sends random bytes (2 of 4 runs)"
    )


@pytest.mark.parametrize(
    ("problem", "severity"),
    [
        ("reads global 'io' (line 2): files are not reachable from the sandbox", "fail"),
        ("uses string.dump (line 4): it is removed from the sandbox", "fail"),
        ("uses os.execute (line 2): only os.time/date/clock/difftime exist, with --allow-clock", "fail"),
        ("does not compile: 7.lua:1: unexpected symbol near '='", "fail"),
        (
            "reads global 'pritn' (line 2): the sandbox does not provide it (a typo, or a missing local?)",
            "warn",
        ),
        ("never calls deadend.set_limits: an attacker may send without bound", "warn"),
        ("file name: name is not <port>.lua; the broker would ignore it", "warn"),
    ],
)
def test_check_s_problems_are_folded_in(problem: str, severity: str) -> None:
    [finding] = audit.static_findings([problem])
    assert (finding.code, finding.severity, finding.text) == ("static", severity, f"check: {problem}")


def test_the_verdict_is_the_worst_finding_and_the_report_is_json() -> None:
    ok = audit.judge("a.lua", 0, [run()], {"problems": []})
    assert ok.verdict == "ok"
    warned = audit.judge("b.lua", 0, [run(log_lines=500)], {"problems": []})
    assert warned.verdict == "warn"
    failed = audit.judge(
        "c.lua", 0, [run(log_lines=500), run("random", reason="memory-limit")], {"problems": []}
    )
    assert failed.verdict == "fail" and failed.findings[0].severity == "fail"  # the worst first
    entry = json.loads(json.dumps(failed.to_json(audit.BUDGET)))
    assert (entry["file"], entry["verdict"], entry["seed"]) == ("c.lua", "fail", 0)
    assert {f["code"] for f in entry["findings"]} == {"memory-limit", "log-flood"}
    assert entry["runs"][0]["seed"] == [0, 1] and "got" not in entry["runs"][0]
    assert entry["budget"]["instructions"] == audit.BUDGET["instructions"]


def test_a_transcript_that_cannot_be_read_is_a_warning() -> None:
    report = audit.judge("25.lua", 0, [run()], {"problems": []}, ["transcript t.transcript:3: bad regex"])
    assert report.verdict == "warn"
    assert [(f.code, f.text) for f in report.findings] == [
        ("transcript", "cannot play transcript t.transcript:3: bad regex")
    ]


def test_the_text_report_escapes_the_file_name() -> None:
    shown = audit.render(audit.judge("evil\x1b[2J.lua", 0, [run(reason="memory-limit")], {"problems": []}))
    assert "\x1b" not in shown and "evil\\x1b[2J.lua: fail" in shown
    assert "✗ ends by the memory ceiling when the client is silent" in shown


# --- --diff --------------------------------------------------------------------------------------------


def report(*runs: Run) -> audit.Report:
    return audit.judge("25.lua", 0, list(runs), {"problems": []})


def test_no_change_is_no_change() -> None:
    same = [run(got=b"220 hi\r\n", log_lines=5, memory=200_000, instructions=7000, cpu=0.003)]
    assert audit.diff(report(*same), report(*same)) == []


def test_noise_is_not_a_change() -> None:
    old = run(got=b"220 hi\r\nx", log_lines=5, memory=200_000, instructions=7000, cpu=0.003)
    # more of the same bytes (timing), a few more lines, a little more memory, CPU jitter
    new = run(got=b"220 hi\r\nxxxx", log_lines=20, memory=1_100_000, instructions=900_000, cpu=0.15)
    assert audit.diff(report(old), report(new)) == []


def test_each_kind_of_change() -> None:
    old = run(got=b"220 hi\r\n", log_lines=5, memory=200_000, instructions=7000, cpu=0.003, calls={"send": 1})
    new = run(
        reason="linger",
        got=b"220 HI\r\n",
        log_lines=1005,
        memory=9 << 20,
        instructions=4_000_000,
        cpu=0.5,
        calls={"send": 1, "sleep": 400},
    )
    changes = audit.diff(report(old), report(new))
    assert [c.code for c in changes] == [
        "calls",
        "end",
        "logs",
        "memory",
        "instructions",
        "cpu",
        "bytes",
    ]
    text = {c.code: c.text for c in changes}
    assert text["calls"] == "now calls deadend.sleep when the client is silent"
    assert text["logs"] == "logs 1,005 lines instead of 5 when the client is silent"
    assert text["bytes"] == "sends different bytes when the client is silent (from offset 4)"
    shown = audit.render_diff(report(old), report(new), changes)
    assert shown.splitlines()[0] == "25.lua (ok) → 25.lua (fail): 7 change(s)"  # the verdicts, in the head
