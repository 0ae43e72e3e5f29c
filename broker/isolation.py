"""How the broker shows the zygote's isolation report (deadend.wire.Layer): its start-up lines, and the
table `deadend broker --check-isolation` prints."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Final, TextIO

from broker.privileges import PrivilegeError, resolve_user
from broker.zygote import DirectSpawner, LauncherSpawner, Spawner, Zygote, ZygoteLost
from deadend import wire
from deadend.config import Config
from deadend.logs import BROKER, EventLog, sanitize

MEANING: Final = {
    "environment": "nothing inherited from the broker's environment",
    "user": "own user namespace",
    "ipc": "own IPC namespace",
    "net": "own network namespace, no interface up",
    "mnt": "own mount namespace, empty read-only root",
    "pid": "own PID namespace, the fork server its init",
    "landlock": "Landlock: no file access at all",
    "capabilities": "no capability in any set",
}


def active(layers: list[wire.Layer]) -> list[str]:
    return [layer.name for layer in layers if layer.applied]


def summary(layers: list[wire.Layer]) -> str:
    """The broker's start-up line: the layers every sandbox lives in, below its own lockdown()."""
    names = active(layers)
    return "sandbox isolation: " + (", ".join(names) if names else "no layer")


def skipped_line(layer: wire.Layer) -> str:
    """The broker's line for one skipped layer, and why."""
    return f"sandbox isolation: {layer.name} skipped: {layer.skipped}"


def report(log: EventLog, layers: list[wire.Layer], *, again: bool) -> None:
    """Log a zygote's layers: at info at start-up, at debug for the zygotes that replace it (every few
    minutes: a fresh layout) unless they differ from the first one's."""
    skipped = [layer for layer in layers if not layer.applied]
    level = "debug" if again else "info"
    log.emit(
        level,
        BROKER,
        "sandbox.isolation",
        sanitize(summary(layers)),
        active=active(layers),
        skipped=[layer.name for layer in skipped],
    )
    for layer in skipped:
        message, reason = sanitize(skipped_line(layer)), sanitize(layer.skipped)
        log.emit(
            "debug" if again else "warn",
            BROKER,
            "sandbox.layer_skipped",
            message,
            layer=layer.name,
            reason=reason,
        )


def table(layers: list[wire.Layer]) -> str:
    """`--check-isolation`'s output: one row per layer, in order, with what it gives or why not."""
    width = max(len(name) for name in wire.LAYERS)
    rows = []
    for layer in layers:
        state = f"skipped: {layer.skipped}" if layer.skipped else f"active: {MEANING[layer.name]}"
        rows.append(f"{layer.name:<{width}}  {state}")
    return "\n".join(rows) + "\n"


def check_isolation(config: Config, out: TextIO) -> int:
    """`deadend broker --check-isolation`: start a zygote as the broker would (as --user, through the
    launcher when run as root), print its layers (applied, or skipped and why), stop it. 0 when it
    started, whatever it could apply; 1 if it could not."""
    try:
        run_as = resolve_user(config.user, config.allow_root)
    except PrivilegeError as e:
        print(f"deadend: error: {e}", file=sys.stderr)
        return 1

    async def report() -> list[wire.Layer]:
        with open(os.devnull, "w") as devnull:
            log = EventLog(devnull)
            spawner: Spawner = DirectSpawner()
            if run_as is not None:
                launcher = LauncherSpawner()
                await launcher.start(run_as)
                spawner = launcher
            zygote = Zygote(spawner, log, lambda _worker: None, run_as)
            try:
                await zygote.start()
                return zygote.layers
            finally:
                await zygote.stop()
                await spawner.close()
                log.close()

    try:
        found = asyncio.run(report())
    except (ZygoteLost, OSError) as e:
        print(f"deadend: error: cannot start the sandbox zygote: {e}", file=sys.stderr)
        return 1
    out.write(table(found))
    return 0
