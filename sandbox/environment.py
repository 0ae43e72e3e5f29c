"""The environment: a sandbox inherits nothing from the broker's, where secrets often live (API keys,
database URLs, LISTEN_FDS). The environment a process was started with stays readable in its memory
and in /proc/PID/environ for its whole life, and a forked child shares it, so the only cure is to never
pass it: the broker starts the zygote with exactly ZYGOTE_ENV. This layer checks that it did.
"""

from __future__ import annotations

from deadend.wire import ZYGOTE_ENV
from sandbox.layers import Skipped

# What the zygote is started with is `deadend.wire.ZYGOTE_ENV`, and why each variable is there:
# - TZ: scripts' dates (the clock option) are UTC; glibc reads the zone once, before the root is emptied.
# Nothing else: the interpreter is started by its full path and the broker resolves the shared libraries,
# so no PATH; with no LANG or LC_* Python uses UTF-8 for names, which is all the zygote handles.
SHOWN = 5  # variable names a report lists; values are never shown


def names(block: bytes) -> list[str]:
    """The variable names in an environment block as /proc/PID/environ holds it (NUL-separated)."""
    return [entry.partition(b"=")[0].decode(errors="replace") for entry in block.split(b"\0") if entry]


def extra(block: bytes) -> list[str]:
    return sorted(set(names(block)) - ZYGOTE_ENV.keys())


def check() -> None:
    """Skipped when the zygote's initial environment holds anything beyond ZYGOTE_ENV."""
    with open("/proc/self/environ", "rb") as f:
        inherited = extra(f.read())
    if inherited:
        listed = ", ".join(inherited[:SHOWN]) + (", ..." if len(inherited) > SHOWN else "")
        raise Skipped(f"{len(inherited)} variable(s) inherited from the broker: {listed}")
