"""Script discovery and the file-name rule of SPEC.md (its one home)."""

from __future__ import annotations

import hashlib
import re
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


def discover(folder: Path) -> tuple[list[Script], list[Ignored]]:
    """Every servable script in `folder`, sorted by port, and every other entry with the reason."""
    scripts: list[Script] = []
    ignored: list[Ignored] = []
    for path in sorted(folder.iterdir()):
        verdict = port_of(path.name)
        if isinstance(verdict, str):
            ignored.append(Ignored(path.name, verdict))
            continue
        if not path.is_file():
            ignored.append(Ignored(path.name, "not a regular file"))
            continue
        try:
            with path.open("rb") as f:
                source = f.read(MAX_SCRIPT_BYTES + 1)
        except OSError as e:
            ignored.append(Ignored(path.name, f"cannot be read: {e.strerror}"))
            continue
        if len(source) > MAX_SCRIPT_BYTES:
            ignored.append(Ignored(path.name, f"larger than {MAX_SCRIPT_BYTES} bytes"))
            continue
        scripts.append(Script(verdict, path, source))
    scripts.sort(key=lambda s: s.port)
    return scripts, ignored
