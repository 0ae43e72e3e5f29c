"""Script discovery, the file-name rule of SPEC.md (its one home), and how a script file is read."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from deadend.wire import MAX_SCRIPT_BYTES

_NAME: Final = re.compile(r"[1-9][0-9]{0,4}\.lua")
PORT_MAX: Final = 65535


@dataclass(frozen=True, slots=True)
class Script:
    port: int  # the port the name says; the listener may add an offset
    path: Path
    source: bytes
    sha256: str = field(init=False)  # names the version in recordings and reload lines

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", hashlib.sha256(self.source).hexdigest())

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True, slots=True)
class Ignored:
    name: str
    why: str


def port_of(name: str) -> int | str:
    """The port a file name serves, or why the name is not a script (SPEC.md: `^[1-9][0-9]{0,4}\\.lua$`)."""
    if not name.endswith(".lua"):
        return "not a .lua file"
    if not _NAME.fullmatch(name):
        return "name is not <port>.lua with a port 1..65535 without leading zeros"
    port = int(name[:-4])
    if port > PORT_MAX:
        return f"port {port} is above {PORT_MAX}"
    return port


class ScriptFileError(OSError):
    """A `<port>.lua` entry that is not a script file: not regular, or too large."""


def read_source(path: Path, folder: int | None = None) -> bytes:
    """A script's bytes, read the one way every reader of scripts uses (broker, reload, tools).

    `folder`: a descriptor of the folder that `path`'s name is taken relative to. A symlink is followed.
    The file is opened non-blocking: a FIFO swapped in for a script cannot block the reader, nor a lease
    another process holds on it (EWOULDBLOCK). Only a regular file of at most MAX_SCRIPT_BYTES is a
    script. OSError (ScriptFileError for the last two rules) says why not.
    """
    name: Path | str = path if folder is None else path.name
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=folder)
    except BlockingIOError:
        raise OSError(errno.EWOULDBLOCK, "another process holds a lease on it") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ScriptFileError(errno.EINVAL, "not a regular file")
        chunks, size = [], 0
        while size <= MAX_SCRIPT_BYTES and (chunk := os.read(fd, MAX_SCRIPT_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_SCRIPT_BYTES:
        raise ScriptFileError(errno.EFBIG, f"larger than {MAX_SCRIPT_BYTES} bytes")
    return b"".join(chunks)


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A `<port>.lua` entry that could not be read as a script: at start-up its port is not opened; on
    reload the port keeps the version it serves, as for a script that no longer compiles."""

    port: int
    name: str
    why: str


@dataclass(frozen=True, slots=True)
class Discovery:
    scripts: list[Script] = field(default_factory=list)  # sorted by port
    ignored: list[Ignored] = field(default_factory=list)  # entries whose name is not <port>.lua
    unreadable: list[Unreadable] = field(default_factory=list)


def open_folder(folder: Path) -> int:
    """The scripts folder, opened once (O_DIRECTORY): discovery lists and reads through this descriptor."""
    return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def refresh_folder(folder: Path, fd: int) -> int:
    """On reload: the descriptor to rescan through. The same folder keeps `fd`; a folder replaced at the
    same path (a deployment that swaps a symlink) is opened anew, and `fd` closed; a path that no longer
    leads to a folder raises OSError. A path the process may not walk (a clone in /root, the broker
    running as --user) cannot be checked: `fd` is kept."""
    try:
        st = os.stat(folder)
    except PermissionError:
        return fd
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a folder")
    current = os.fstat(fd)
    if (st.st_dev, st.st_ino) == (current.st_dev, current.st_ino):
        return fd
    fresh = open_folder(folder)
    os.close(fd)
    return fresh


def discover(folder: Path, fd: int | None = None) -> Discovery:
    """Every servable script in `folder` (through its descriptor `fd` when given), every other entry with
    the reason. OSError if the folder cannot be listed. Blocking file I/O: the broker calls it off its
    event loop."""
    found = Discovery()
    names = sorted(os.listdir(folder if fd is None else fd))
    for name in names:
        path = folder / name
        verdict = port_of(name)
        if isinstance(verdict, str):
            found.ignored.append(Ignored(name, verdict))
            continue
        try:
            found.scripts.append(Script(verdict, path, read_source(path, fd)))
        except OSError as e:
            found.unreadable.append(Unreadable(verdict, path.name, e.strerror or str(e)))
    found.scripts.sort(key=lambda script: script.port)
    return found


def to_json(found: Discovery) -> bytes:
    """A Discovery across a pipe (from the reader that runs as --user at start-up)."""
    return json.dumps(
        {
            "scripts": [[s.port, str(s.path), base64.b64encode(s.source).decode()] for s in found.scripts],
            "ignored": [[i.name, i.why] for i in found.ignored],
            "unreadable": [[u.port, u.name, u.why] for u in found.unreadable],
        }
    ).encode()


def from_json(data: bytes) -> Discovery:
    raw = json.loads(data)
    return Discovery(
        [Script(int(port), Path(path), base64.b64decode(source)) for port, path, source in raw["scripts"]],
        [Ignored(str(name), str(why)) for name, why in raw["ignored"]],
        [Unreadable(int(port), str(name), str(why)) for port, name, why in raw["unreadable"]],
    )
