"""sandbox.worker.Ahead: a dense worker's next Lua state, built while it has nothing to read, in process
(no lockdown: the logic only). A session served from a prepared state behaves as one from a fresh state."""

from __future__ import annotations

import dataclasses

from deadend import wire
from sandbox.worker import Ahead, ScriptRun, new_runtime

SCRIPT = b'deadend.send(tostring(math.random(1, 1 << 40))) deadend.log("x")'


def start(source: bytes = SCRIPT, seed: tuple[int, int] = (1, 2)) -> wire.Start:
    return wire.Start(
        mode="run",
        source=source,
        chunkname="7.lua",
        seed=seed,
        memory=8 << 20,
        instructions=10**6,
        clock=False,
    )


def fresh_outcome(s: wire.Start) -> object:
    lua, start_fn = new_runtime()
    return ScriptRun(lua, start_fn, s).begin()


def idle_until_prepared(ahead: Ahead) -> None:
    for _ in range(4):
        ahead.idle()
    assert ahead.prepared is not None


def test_the_same_script_starts_from_its_prepared_state_as_from_a_fresh_one() -> None:
    ahead = Ahead(new_runtime())
    _run, outcome = ahead.start(start())
    assert outcome == fresh_outcome(start())
    idle_until_prepared(ahead)
    prepared = ahead.prepared
    run, outcome = ahead.start(start(seed=(7, 8)))
    assert run is prepared  # the prepared state served it
    assert outcome == fresh_outcome(start(seed=(7, 8)))  # the session's own seed, not the preparation's
    assert run.resume(True)[:3] == ["log", b"x", "info"]


def test_another_script_gets_a_fresh_state() -> None:
    ahead = Ahead(new_runtime())
    ahead.start(start())
    idle_until_prepared(ahead)
    other = start(source=b'deadend.send("other")')
    _run, outcome = ahead.start(other)
    assert outcome == ["send", b"other"]
    assert ahead.prepared is None


def test_a_script_that_does_not_compile_is_not_kept_prepared() -> None:
    ahead = Ahead(new_runtime())
    broken = start(source=b"this is not Lua")
    _run, outcome = ahead.start(broken)
    assert isinstance(outcome, tuple) and outcome[0] == "compile"
    for _ in range(4):
        ahead.idle()
    assert ahead.prepared is None
    _run, outcome = ahead.start(dataclasses.replace(broken, seed=(3, 4)))
    assert isinstance(outcome, tuple) and outcome[0] == "compile"
