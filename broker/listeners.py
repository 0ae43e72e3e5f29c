"""Listeners: which socket serves which script, and what a reload changes.

A port's sockets are either bound here (per --host) or inherited from systemd (socket activation); an
inherited socket is never closed by a reload, only put aside, because we could not bind it again.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping, Set
from dataclasses import dataclass, field

from broker.net import BindAddress
from deadend.scripts import Script


@dataclass(slots=True)
class Listener:
    sock: socket.socket
    address: BindAddress
    script: Script  # replaced by a reload that changes the script: new connections get the new version
    inherited: bool = False
    task: asyncio.Task[None] | None = None


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    added: list[Script] = field(default_factory=list)
    changed: list[Script] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)  # script ports

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


def plan_reload(
    serving: Mapping[int, Script], found: list[Script], keep: Set[int] = frozenset()
) -> ReloadPlan:
    """What a rescan changes, by script port; a script is changed when its bytes are. Ports in `keep`
    (a script there that could not be read) keep what they serve."""
    plan = ReloadPlan()
    ports = {script.port for script in found} | set(keep)
    for script in found:
        current = serving.get(script.port)
        if current is None:
            plan.added.append(script)
        elif current.sha256 != script.sha256:
            plan.changed.append(script)
    plan.removed.extend(sorted(port for port in serving if port not in ports))
    return plan
