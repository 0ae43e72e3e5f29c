"""Namespaces: the zygote enters new user, IPC, network, mount and PID namespaces once, at start, and
every sandbox it forks lives in them. None of this needs privileges where user namespaces are allowed.

- user: the zygote keeps its uid and gid (each mapped to itself) and holds, inside the namespace only,
  the capabilities the other four need; the capability layer empties every set right after them.
- ipc: no System V or POSIX IPC object of the host is reachable.
- net: one loopback interface, down: no address, no route, nothing to connect to or bind.
- mnt: an empty, read-only tmpfs is the root (pivot_root, the host's tree detached): no file, no /proc,
  no /dev to open, should seccomp and Landlock both fail.
- pid: a sandbox sees only the processes of its namespace: the fork server and its sibling sandboxes.
  The first process forked after unshare() is the namespace's init; `become_init` makes the fork server
  that process, while the process the broker started waits outside for it.
"""

from __future__ import annotations

import os
import select
import signal
from typing import NoReturn

from sandbox import syscalls
from sandbox.layers import Skipped

# Any existing directory serves: the empty tmpfs is mounted there only to pivot into it.
MOUNT_POINTS = (b"/tmp", b"/proc")
EMPTY_ROOT_OPTIONS = b"size=4k,nr_inodes=2,mode=0555"


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def enter_user() -> None:
    if not os.path.exists("/proc/self/uid_map"):  # checked first: an unmapped namespace is worse than none
        raise Skipped("no /proc/self/uid_map to map the zygote's ids")
    uid, gid = os.geteuid(), os.getegid()
    # The maps are written through our own /proc files, which the kernel gives to root while the process
    # is not dumpable (as after --user): dumpable just for these writes, and never again after them.
    syscalls.prctl(syscalls.PR_SET_DUMPABLE, 1)
    try:
        syscalls.unshare(syscalls.CLONE_NEWUSER, "unshare(user)")
        _write("/proc/self/setgroups", "deny")  # the kernel's condition for an unprivileged gid map
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    finally:
        syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)


def enter_ipc() -> None:
    syscalls.unshare(syscalls.CLONE_NEWIPC, "unshare(ipc)")


def enter_net() -> None:
    syscalls.unshare(syscalls.CLONE_NEWNET, "unshare(net)")


def enter_empty_root() -> None:
    syscalls.unshare(syscalls.CLONE_NEWNS, "unshare(mnt)")
    try:
        # Private: nothing mounted here reaches the host's namespace, and nothing of the host's arrives.
        syscalls.mount(None, b"/", None, syscalls.MS_REC | syscalls.MS_PRIVATE, None)
        flags = syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
        for point in MOUNT_POINTS:
            try:
                syscalls.mount(b"tmpfs", point, b"tmpfs", flags, EMPTY_ROOT_OPTIONS)
                break
            except OSError:
                if point == MOUNT_POINTS[-1]:
                    raise
        os.chdir(point)
        syscalls.pivot_root(b".", b".")  # the old root now sits on top of the new one, at "."
        syscalls.umount2(b".", syscalls.MNT_DETACH)  # and goes, with every mount below it
        os.chdir("/")
    except OSError as e:
        raise Skipped(f"a mount namespace of its own, but the host's files in it ({e.strerror})") from e
    if os.listdir("/"):
        raise Skipped("the new root is not empty")


def enter_pid() -> None:
    """Takes effect at the next fork: `become_init`."""
    syscalls.unshare(syscalls.CLONE_NEWPID, "unshare(pid)")


def become_init() -> None:
    """Fork the PID namespace's first process and return in it, as its init and the fork server.

    The calling process, the one the broker started and watches, stays outside: it waits for the init
    and exits with it. When the init exits the kernel kills everything left in the namespace, so the
    parent-death chain is broker -> this process -> the init -> every sandbox, and nothing is left over.
    """
    outside = os.pidfd_open(os.getpid())
    pid = os.fork()
    if pid:
        os.close(outside)
        _wait_outside(pid)
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    if select.select([outside], [], [], 0)[0]:  # a pidfd is readable once its process has exited
        os._exit(1)  # it died before the death signal was armed: nobody would end us
    os.close(outside)


def _wait_outside(init: int) -> NoReturn:
    # The control socket is the fork server's alone: its exit must be the broker's end of file.
    os.closerange(3, 1 << 20)
    while True:
        try:
            _, status = os.waitpid(init, 0)
        except ChildProcessError:
            os._exit(1)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)
