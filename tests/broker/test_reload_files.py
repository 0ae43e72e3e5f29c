"""Script files as the broker reads them, at start-up and on reload: off the event loop, non-blocking,
regular files only, with --user's permissions; a script that cannot be read keeps its previous version;
a removed script's port keeps its socket for its return.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import AS_ROOT, HOST, Broker, read_all

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="reading as --user nobody needs root")


def banner(source: str) -> str:
    return f'deadend.send("{source}\\n")\n'


def greeting(b: Broker, port: int = 25) -> bytes:
    with b.connect(port, timeout=3) as c:
        return read_all(c, 3)


def reload(b: Broker, expect: str, timeout: float = 10.0) -> re.Match[str]:
    mark = b.mark()
    b.proc.send_signal(signal.SIGHUP)
    return b.wait_for(expect, timeout, since=mark)


@needs_root
def test_an_unreadable_script_keeps_its_previous_version_until_it_is_readable_again(
    make_broker: Callable[..., Broker],
) -> None:
    b = make_broker({"25.lua": banner("v1")}, "--user", "nobody")
    assert greeting(b) == b"v1\n"
    script = b.scripts / "25.lua"
    script.write_text(banner("v2"))
    script.chmod(0o000)  # root could still read it; --user nobody, who reloads, cannot
    mark = b.mark()
    reload(b, r"reload: no change")
    warnings = [line for line in b.lines[mark:] if "WARN" in line]
    assert len(warnings) == 1 and re.search(
        r"cannot read 25\.lua: Permission denied; keeping the previous version", warnings[0]
    ), warnings
    assert greeting(b) == b"v1\n"  # the port still serves what it served
    script.chmod(0o644)
    reload(b, r"reload: changed 25\.lua")
    assert greeting(b) == b"v2\n"


def test_a_fifo_swapped_in_for_a_script_neither_blocks_nor_removes_it(
    make_broker: Callable[..., Broker],
) -> None:
    b = make_broker({"25.lua": banner("v1")})
    script = b.scripts / "25.lua"
    script.unlink()
    os.mkfifo(script)  # nobody ever writes to it: a blocking open() would wait forever
    reload(b, r"cannot read 25\.lua: not a regular file; keeping the previous version")
    b.wait_for(r"reload: no change")
    started = time.monotonic()
    assert greeting(b) == b"v1\n"
    assert time.monotonic() - started < 2


@needs_root
def test_a_lease_on_a_script_does_not_stall_the_broker(make_broker: Callable[..., Broker]) -> None:
    """A write lease held by another process: a blocking open() for reading would wait for the lease
    break (up to /proc/sys/fs/lease-break-time, 45 s by default) on the event loop, stalling every
    session. Opened non-blocking, off the loop, the script keeps its version and sessions go on."""
    b = make_broker({"25.lua": banner("v1")}, *AS_ROOT)
    script = b.scripts / "25.lua"
    script.write_text(banner("v2"))
    fd = os.open(script, os.O_WRONLY)
    # The kernel tells the holder of a lease that someone wants the file with SIGIO, whose default
    # action would end this test process.
    previous = signal.signal(signal.SIGIO, signal.SIG_IGN)
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        except OSError as e:
            pytest.fail(f"cannot take a lease here: {e}")
        mark = b.mark()
        b.proc.send_signal(signal.SIGHUP)
        started = time.monotonic()
        assert greeting(b) == b"v1\n"  # served while the reload meets the lease
        b.wait_for(r"reload: ", 10, since=mark)
        assert time.monotonic() - started < 3
        b.wait_for(r"cannot read 25\.lua: another process holds a lease on it; keeping the previous version")
    finally:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        os.close(fd)
        signal.signal(signal.SIGIO, previous)
    reload(b, r"reload: changed 25\.lua")
    assert greeting(b) == b"v2\n"


@needs_root
def test_at_start_up_a_symlink_to_a_root_only_file_is_read_as_the_user_would(
    make_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    secret = tmp_path / "secret.lua"  # under pytest's root-only folder
    secret.write_text('local token = "TOKEN-7f3a9c" this is not lua\n')
    b = make_broker({"7.lua": banner("ok")}, "--user", "nobody")
    b.stop()
    link = b.scripts / "25.lua"
    link.symlink_to(secret)
    again = make_broker(b.scripts, "--user", "nobody")
    again.wait_for(r"cannot read 25\.lua: Permission denied; port not opened")
    assert greeting(again, 7) == b"ok\n"
    assert "TOKEN-7f3a9c" not in "\n".join(again.lines) + again.stderr
    with pytest.raises(OSError):
        greeting(again, 25)


def privileged_free_port() -> int:
    for port in range(950, 1020):
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    pytest.fail("no free port below 1024")


@needs_root
def test_a_removed_privileged_port_serves_again_when_its_script_returns(
    make_broker: Callable[..., Broker],
) -> None:
    """The broker runs as nobody after start-up: it could not bind a port below 1024 again, so a removed
    script's socket is kept, bound but not listening, for the reload that brings the script back."""
    port = privileged_free_port()
    b = make_broker({"7.lua": banner("seven"), "1.lua": banner("one")}, "--user", "nobody",
                    "--port-offset", str(port - 1))  # fmt: skip

    def hello(p: int) -> bytes:
        with socket.create_connection((HOST, p), timeout=3) as c:
            return read_all(c, 3)

    assert hello(port) == b"one\n"
    script = b.scripts / "1.lua"
    script.rename(b.scripts / "1.lua.off")
    reload(b, r"reload: removed 1\.lua")
    with pytest.raises(ConnectionRefusedError):
        hello(port)  # parked: bound, refusing
    probe = socket.socket()
    with pytest.raises(OSError, match="Address already in use"):
        probe.bind((HOST, port))  # and still ours
    probe.close()
    (b.scripts / "1.lua.off").rename(script)
    reload(b, r"reload: added 1\.lua")
    assert hello(port) == b"one\n"
    assert hello(port + 6) == b"seven\n"


@needs_root
def test_a_folder_the_user_cannot_reach_by_path_is_read_through_the_descriptor_root_opened(
    make_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    """A clone in /root with the quick start's --user nobody: nobody cannot walk to the folder, but its
    files are world-readable. Root opens the folder once; every rescan reads through that descriptor, each
    file with nobody's permissions."""
    folder = tmp_path / "scripts"  # below pytest's root-only 0700 folder
    folder.mkdir()
    (folder / "25.lua").write_text(banner("v1"))
    # the premise: some folder on the way is closed to others (pytest's 0700 base)
    assert any(p.stat().st_mode & 0o001 == 0 for p in folder.parents), "tmp_path is open to everyone here"
    b = make_broker(folder, "--user", "nobody")
    assert greeting(b) == b"v1\n"
    (folder / "25.lua").write_text(banner("v2"))
    reload(b, r"reload: changed 25\.lua")
    assert greeting(b) == b"v2\n"


def test_a_folder_swapped_in_at_the_same_path_is_followed(make_broker: Callable[..., Broker]) -> None:
    b = make_broker({"25.lua": banner("v1")})
    release = b.scripts.with_name(b.scripts.name + "-v2")
    release.mkdir()
    (release / "25.lua").write_text(banner("v2"))
    b.scripts.rename(b.scripts.with_name(b.scripts.name + "-v1"))
    release.rename(b.scripts)  # the deployment's swap
    reload(b, r"reload: changed 25\.lua")
    assert greeting(b) == b"v2\n"
