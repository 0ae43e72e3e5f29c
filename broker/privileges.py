"""Who the broker and its sandboxes run as: `--user`, and the refusal to run sandboxes as root.

Order (and why): the zygote switches to the target user once its imports are
done and before its first fork, so no sandbox ever holds root, not even for a moment (it is exec'd as
root because the interpreter may live where that user cannot read); the broker keeps root only until its
listeners are bound, then drops to the same user. With systemd socket activation the ports arrive already
bound and the broker never needs root at all.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import json
import os
import pwd
import select
import signal
import stat
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from deadend.scripts import Discovery, discover, from_json, to_json
from sandbox import lockdown
from sandbox.lockdown import LockdownError, switch_user

PR_SET_DUMPABLE = 4


class PrivilegeError(Exception):
    """Worded for one log line."""


@dataclass(frozen=True, slots=True)
class RunAs:
    name: str
    uid: int
    gid: int


def resolve_user(name: str | None, allow_root: bool) -> RunAs | None:
    """The user to switch to, or None to stay as we are; refuse root sandboxes unless allowed."""
    euid = os.geteuid()
    if name is None:
        if euid == 0 and not allow_root:
            raise PrivilegeError(
                "refusing to run sandboxes as root: pass --user NAME (e.g. --user nobody), "
                "or --allow-root if you really mean it"
            )
        return None
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(f"--user {name}: no such user") from None
    if entry.pw_uid == 0 and not allow_root:
        raise PrivilegeError(f"--user {name} is root; pass --allow-root if you really mean it")
    if entry.pw_gid == 0 and not allow_root:
        # Group root owns much of a system (/etc files, devices, sockets): a sandbox must not hold it.
        raise PrivilegeError(
            f"--user {name} has group root (gid 0) as its primary group; give it its own group "
            "(see the README's production section), or pass --allow-root if you really mean it"
        )
    if euid != 0:
        if entry.pw_uid != euid:
            raise PrivilegeError(f"--user {name} needs root to switch to (running as uid {euid})")
        return None  # already that user
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def drop_privileges(run_as: RunAs) -> None:
    """Become run_as for good (the same switch the zygote makes before its first fork)."""
    try:
        switch_user(run_as.uid, run_as.gid)
    except LockdownError as e:
        raise PrivilegeError(str(e)) from e


def forbid_tracing() -> None:
    """The sandboxes share the broker's uid: keep any same-uid process from ptracing or reading it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_DUMPABLE): {os.strerror(err)}")


def discover_as(folder: Path, fd: int, run_as: RunAs, timeout: float = 30.0) -> Discovery:
    """Still root at start-up: list and read the scripts with --user's permissions, in a forked child that
    drops to that user first, so the broker never reads as root a file its user could not (a symlink to
    a root-only file fails here as it does on reload). The folder itself is reached through `fd`, opened
    by root: the path to it (a clone in /root) need not be the user's. OSError says why it cannot be read."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls and the pure reader, then _exit
        status = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(run_as.gid, run_as.gid, run_as.gid)
            os.setresuid(run_as.uid, run_as.uid, run_as.uid)
            try:
                data = to_json(discover(folder, fd))
            except OSError as e:
                data = json.dumps({"error": e.strerror or str(e)}).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(w, view) :]
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise OSError(errno.ETIMEDOUT, f"reading the scripts as {run_as.name} took over {timeout:g}s")
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    raw = b"".join(chunks)
    if raw.startswith(b'{"error"'):
        raise OSError(errno.EACCES, json.loads(raw)["error"])
    if not raw:
        raise OSError(errno.EIO, f"the reader running as {run_as.name} failed")
    return from_json(raw)


def launcher_tree(run_as: RunAs, roots: Iterable[Path] | None = None) -> None:
    """Refuse an installation --user could change. The launcher keeps root to exec the interpreter and
    import this package whenever a zygote is (re)started; if the user the broker runs as could write the
    interpreter, the package, or a folder they live in, a compromised broker would become root there.
    PrivilegeError names the first such path."""
    if roots is None:
        package = Path(lockdown.__file__).resolve().parent  # the sandbox package the launcher imports
        roots = {Path(os.path.realpath(sys.executable)), package}
        for name in ("msgpack", "lupa", "pyseccomp"):  # what the launcher and the zygote import besides
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.origin:
                roots.add(Path(spec.origin).resolve())
    for root in sorted(roots):
        for path in [root, *root.parents]:
            try:
                st = os.stat(path)
            except OSError:
                continue
            writable = (
                st.st_uid == run_as.uid
                or (st.st_mode & stat.S_IWGRP and st.st_gid == run_as.gid)
                or (st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX)
            )
            if writable:
                raise PrivilegeError(
                    f"--user {run_as.name} could change {path}, from which the root launcher runs the "
                    "interpreter and this package: install deadend where that user cannot write"
                )
