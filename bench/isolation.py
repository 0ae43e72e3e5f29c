"""What each isolation layer of the zygote costs, at the zygote's start and per sandbox, each figure beside
the same run without that layer.

    python bench/isolation.py [--rounds 7] [--forks 40] [--user nobody]

Method. One configuration is every layer (what the broker runs); one is every layer but L, for each
layer L; one is no layer at all (the zygote before the isolation work). Configurations take turns, in a
new random order each round, so that a shared machine's noise hits them alike. In each round and
configuration a real zygote is started (broker/zygote.py, as the broker starts it, its `isolation_off`
naming what to leave out: a measurement hook, never set by the broker) and:

- start: from Zygote.start() to its hello (exec, imports, the filter built, the layers applied);
- start-to-ready: for --forks children one after another, from the fork request to the child's "ready"
  (fork, Lua state, lockdown(), seccomp), as bench/basics.py measures it.

A layer's cost is the median with every layer minus the median without it. Medians over rounds (start)
and over every child of every round (start-to-ready). Read differences of a few tenths of a millisecond
as noise: the machines here are shared, and a zygote's start (some 80 ms, mostly imports) varies by more
than the layers cost. So each layer is also timed directly: `isolate()` run in a fresh interpreter with
each layer's function wrapped in a timer (the "inside" column, median of --rounds runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import pwd
import random
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from broker.channel import WorkerChannel  # noqa: E402
from broker.privileges import RunAs  # noqa: E402
from broker.zygote import DirectSpawner, Zygote  # noqa: E402
from deadend import wire  # noqa: E402
from deadend.config import Ceilings  # noqa: E402
from deadend.logs import EventLog  # noqa: E402
from deadend.wire import LAYERS as ORDER  # noqa: E402
from deadend.wire import ZYGOTE_ENV  # noqa: E402

ALL = "every layer"
NONE = "no layer"


async def one_round(off: tuple[str, ...], forks: int, run_as: RunAs | None) -> tuple[float, list[float]]:
    with open(os.devnull, "w") as devnull:
        log = EventLog(devnull)
        zygote = Zygote(DirectSpawner(isolation_off=off), log, lambda _worker: None, run_as)
        ceilings = Ceilings()
        request = wire.ForkRequest(address_space=ceilings.address_space, cpu_seconds=ceilings.session_cpu)
        t = time.perf_counter()
        await zygote.start()
        started = (time.perf_counter() - t) * 1000
        skipped = {layer.name for layer in zygote.layers if not layer.applied}
        # Without a user namespace a non-root zygote (--user) can create none of the other four: that row
        # is then the cost of all five.
        enabled = {"ipc", "net", "mnt", "pid"} if "user" in off and run_as is not None else set()
        if not set(off) <= skipped or skipped - set(off) - enabled:
            raise SystemExit(f"asked to leave out {off}, the zygote skipped {zygote.layers}")
        ready = []
        try:
            for _ in range(forks):
                t = time.perf_counter()
                child = await zygote.fork(request)
                channel = WorkerChannel(child)
                assert await channel.frame(5) == ["ready"]
                ready.append((time.perf_counter() - t) * 1000)
                child.kill()
                channel.close()
                child.release()
                await child.exited
        finally:
            await zygote.stop()
            log.close()
    return started, ready


Samples = dict[str, tuple[list[float], list[float]]]  # configuration -> (starts, starts-to-ready), ms


async def measure(rounds: int, forks: int, run_as: RunAs | None) -> Samples:
    configs: dict[str, tuple[str, ...]] = {ALL: (), NONE: ORDER}
    configs.update({name: (name,) for name in ORDER})
    found: Samples = {name: ([], []) for name in configs}
    order = list(configs)
    for _ in range(rounds):
        random.shuffle(order)  # no configuration always right after a given other one
        for name in order:
            off = configs[name]
            started, ready = await one_round(off, forks, run_as)
            found[name][0].append(started)
            found[name][1].extend(ready)
    return found


# isolate() in a fresh process with a timer around each layer; the fork server (the PID namespace's
# init, if there is one) prints the times. argv: run_as as "uid,gid" or "".
TIMED = """
import json, os, sys, time
from sandbox import capabilities, environment, isolation, landlock, namespaces
times = {}
def timed(name, apply):
    def run():
        began = time.perf_counter()
        try:
            apply()
        finally:
            times[name] = (time.perf_counter() - began) * 1000
    return run
for module, attribute, name in [
    (environment, "check", "environment"), (namespaces, "enter_user", "user"),
    (namespaces, "enter_ipc", "ipc"), (namespaces, "enter_net", "net"),
    (namespaces, "enter_empty_root", "mnt"), (namespaces, "enter_pid", "pid"),
    (landlock, "forbid_all", "landlock"), (capabilities, "drop_all", "capabilities"),
]:
    setattr(module, attribute, timed(name, getattr(module, attribute)))
run_as = tuple(int(v) for v in sys.argv[1].split(",")) if sys.argv[1] else None
began = time.perf_counter()
report = isolation.isolate(run_as, os.getppid())
times["isolate"] = (time.perf_counter() - began) * 1000
assert all(layer.applied for layer in report), report
os.write(1, json.dumps(times).encode())
"""


def inside(rounds: int, run_as: RunAs | None) -> dict[str, float]:
    found: dict[str, list[float]] = {}
    user = f"{run_as.uid},{run_as.gid}" if run_as else ""
    for _ in range(rounds):
        done = subprocess.run(
            [sys.executable, "-I", "-c", TIMED, user],
            capture_output=True,
            timeout=30,
            env=dict(ZYGOTE_ENV),
            cwd=REPO,
        )
        if done.returncode != 0:
            raise SystemExit(f"isolate() failed: {done.stderr.decode(errors='replace')[-800:]}")
        for name, ms in json.loads(done.stdout).items():
            found.setdefault(name, []).append(ms)
    return {name: statistics.median(values) for name, values in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--forks", type=int, default=40)
    parser.add_argument("--user", help="start the zygote as root with --user NAME, as the broker would")
    args = parser.parse_args()
    run_as = None
    if args.user:
        entry = pwd.getpwnam(args.user)
        run_as = RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)
    found = asyncio.run(measure(args.rounds, args.forks, run_as))
    timed = inside(args.rounds, run_as)
    med = {name: (statistics.median(s), statistics.median(r)) for name, (s, r) in found.items()}
    who = f"root with --user {args.user}" if args.user else f"uid {os.geteuid()}"
    print(f"# isolation layers, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}; zygote started as {who}"
    )
    print(f"method: bench/isolation.py, {args.rounds} rounds x {args.forks} children per configuration\n")
    print(
        "| layer | inside isolate() (ms) | zygote start with / without (ms) | cost "
        "| start-to-ready p50 with / without (ms) | cost |"
    )
    print("|---|---|---|---|---|---|")
    all_start, all_ready = med[ALL]
    for name in ORDER:
        start, ready = med[name]
        label = "user (and so ipc, net, mnt, pid)" if name == "user" and run_as is not None else name
        print(
            f"| {label} | {timed[name]:.2f} | {all_start:.1f} / {start:.1f} | {all_start - start:+.1f} "
            f"| {all_ready:.2f} / {ready:.2f} | {all_ready - ready:+.2f} |"
        )
    start, ready = med[NONE]
    print(
        f"| **all of them** (vs none) | {timed['isolate']:.2f} | {all_start:.1f} / {start:.1f} "
        f"| {all_start - start:+.1f} "
        f"| {all_ready:.2f} / {ready:.2f} | {all_ready - ready:+.2f} |"
    )


if __name__ == "__main__":
    main()
