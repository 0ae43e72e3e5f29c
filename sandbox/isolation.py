"""The zygote's confinement, applied once at start-up before its first fork, so that every sandbox
inherits it. `lockdown()` is what each sandbox then does to itself; these are the layers that still
hold should a script reach native code in its sandbox and get past seccomp.

    environment -> [--user: bounding set dropped while root, then the switch] -> user namespace -> IPC,
    network, mount (an empty read-only root) and PID namespaces -> Landlock -> no capabilities -> the
    parent-death signal armed again -> the fork server becomes the PID namespace's init

A layer this kernel or setup refuses is skipped, with its reason in the report, never a failure: the
seccomp allowlist holds alone if need be. The --user switch is not a layer: if it fails, nothing starts.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Callable, Collection

from deadend.wire import Layer
from sandbox import capabilities, environment, landlock, namespaces, syscalls
from sandbox.layers import Skipped
from sandbox.lockdown import switch_user

OFF_REASON = "turned off for a measurement"


def isolate(run_as: tuple[int, int] | None, broker_pid: int, off: Collection[str] = ()) -> list[Layer]:
    """Apply every layer in order; return the report. Returns in the fork server, which may be a new
    process (the PID namespace's init): the caller must not hold anything it expects to be its own pid.

    `off` names layers to leave out, for bench/isolation.py's measurements only.
    """
    report: list[Layer] = []

    def layer(name: str, apply: Callable[[], None]) -> bool:
        if name in off:
            report.append(Layer(name, OFF_REASON))
            return False
        try:
            apply()
        except Exception as e:  # a refusal (or a bug in a layer) costs that layer, never the start
            report.append(Layer(name, _why(e)))
            return False
        report.append(Layer(name))
        return True

    layer("environment", environment.check)
    if run_as is not None:
        with contextlib.suppress(PermissionError):  # root without CAP_SETPCAP: the user layer does it
            capabilities.drop_bounding_set()  # while root: outside a user namespace, only root can
        switch_user(*run_as)
    in_user_namespace = layer("user", namespaces.enter_user)
    layer("ipc", namespaces.enter_ipc)
    layer("net", namespaces.enter_net)
    layer("mnt", namespaces.enter_empty_root)
    pid_namespace = layer("pid", namespaces.enter_pid)
    layer("landlock", landlock.forbid_all)
    layer("capabilities", capabilities.drop_all)
    die_with_broker(broker_pid)  # a credential change (--user, the user namespace) disarms it
    if pid_namespace:
        namespaces.become_init()
    if not in_user_namespace and os.geteuid() != 0:
        report[:] = [_explained(layer) for layer in report]
    return report


def die_with_broker(broker_pid: int) -> None:
    """A SIGKILLed broker takes the zygote with it (and the zygote its sandboxes)."""
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != broker_pid:  # it died before the signal was armed
        os._exit(1)


def _why(e: Exception) -> str:
    if isinstance(e, Skipped):
        return str(e)
    if isinstance(e, OSError):
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror or str(e)
    return f"{type(e).__name__}: {e}"


def _explained(layer: Layer) -> Layer:
    """Without a user namespace an ordinary user may not create the others: say so, once per layer."""
    if layer.name in {"ipc", "net", "mnt", "pid"} and layer.skipped.endswith(os.strerror(errno.EPERM)):
        return Layer(layer.name, layer.skipped + " (no user namespace, not root)")
    return layer
