"""The report of the zygote's isolation layers: each layer's name and, if it was skipped, why.

Pure data shared by both sides: the zygote fills it (sandbox/isolation.py) and sends it in its "hello"
message; the broker decodes it, logs it and can print it (`deadend broker --check-isolation`). Decoding
is strict because the message crosses a process boundary, even if from a trusted process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

# Every layer in the order the zygote applies it (sandbox/isolation.py); the names of the namespaces
# are the kernel's own (/proc/PID/ns/NAME).
ORDER: Final = ("environment", "user", "ipc", "net", "mnt", "pid", "landlock", "capabilities")
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
REASON_MAX: Final = 200  # a reason is one short line; anything longer is cut


class Skipped(Exception):
    """A layer this kernel or this setup does not allow; the message says why, in a few words."""


@dataclass(frozen=True, slots=True)
class Layer:
    name: str
    skipped: str = ""  # why it was not applied; empty when it was

    @property
    def applied(self) -> bool:
        return not self.skipped


def to_wire(layers: list[Layer]) -> list[list[str]]:
    return [[layer.name, layer.skipped] for layer in layers]


def from_wire(obj: Any) -> list[Layer]:
    """The layers of a hello message; ValueError for anything that is not a list of [name, reason]."""
    if not isinstance(obj, list) or len(obj) > len(ORDER):
        raise ValueError("layer report is not a short list")
    layers = []
    for item in obj:
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item)):
            raise ValueError("layer entry is not [name, reason]")
        if item[0] not in ORDER:
            raise ValueError(f"unknown layer {item[0][:40]!r}")
        layers.append(Layer(item[0], item[1][:REASON_MAX]))
    return layers


def active(layers: list[Layer]) -> list[str]:
    return [layer.name for layer in layers if layer.applied]


def summary(layers: list[Layer]) -> str:
    """The broker's start-up line: the layers every sandbox lives in, below its own lockdown()."""
    names = active(layers)
    return "sandbox isolation: " + (", ".join(names) if names else "no layer")


def skipped_line(layer: Layer) -> str:
    """The broker's line for one skipped layer, and why."""
    return f"sandbox isolation: {layer.name} skipped: {layer.skipped}"


def table(layers: list[Layer]) -> str:
    """`--check-isolation`'s output: one row per layer, in order, with what it gives or why not."""
    width = max(len(name) for name in ORDER)
    rows = []
    for layer in layers:
        state = f"skipped: {layer.skipped}" if layer.skipped else f"active: {MEANING[layer.name]}"
        rows.append(f"{layer.name:<{width}}  {state}")
    return "\n".join(rows) + "\n"
