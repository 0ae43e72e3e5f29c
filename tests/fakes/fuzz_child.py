"""A compromised sandbox child driven by a plan: the hands of `test_fuzz.py`.

The script source the broker passes in the start message is the path of a plan file (msgpack), written by
the test just before it connects. A plan is a list of steps; the child carries them out in order:

    ["call", frame]              write one frame, count it, read exactly one reply
    ["chunks", [piece...], us]   write one frame in pieces with a pause between them, then read one reply
    ["write", data, n]           write bytes that hold `n` frames (or a broken one) and expect no reply
    ["write", data, 0, n]        the same for `n` frames of a flood (counted apart)
    ["noread", frame, n, us]     write the frame `n` times, a pause between, never reading a reply
    ["silent", seconds]          say nothing for that long (never answering, or a pause before the next step)
    ["exit", status]             exit at once, whatever is half-written
    ["signal", signum]           die by a signal
    ["close-out"]                close the request pipe but stay alive

After the last step it reads (and discards) whatever the broker sends until the pipe closes, so a broker
that failed to end the session shows up as a child that went quiet (a cpu-deadline), never as a hang.
Progress goes to `<plan>.n` (frames, flood frames, bytes written) after every step, so the test counts
the frames that really reached the pipe even when the broker kills the child half-way.
"""

import contextlib
import os
import resource
import struct
import sys
import time
from typing import Any

import msgpack

from tests.fakes.child_pipe import raw, read


class Counter:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.frames = 0
        self.flood = 0
        self.bytes = 0

    def add(self, frames: int, nbytes: int, flood: int = 0) -> None:
        self.frames += frames
        self.flood += flood
        self.bytes += nbytes
        os.pwrite(self.fd, struct.pack("<QQQ", self.frames, self.flood, self.bytes), 0)


def run(plan: list[list[Any]], count: Counter) -> None:
    for step in plan:
        kind = step[0]
        if kind == "call":
            raw(step[1])
            count.add(1, len(step[1]))
            read()
        elif kind == "chunks":
            pieces, pause = step[1], step[2] / 1e6
            for i, piece in enumerate(pieces):
                if i:
                    time.sleep(pause)
                raw(piece)
            count.add(1, sum(map(len, pieces)))
            read()
        elif kind == "write":
            raw(step[1])
            count.add(step[2], len(step[1]), step[3] if len(step) > 3 else 0)
        elif kind == "noread":
            for _ in range(step[2]):
                raw(step[1])
                count.add(1, len(step[1]))
                time.sleep(step[3] / 1e6)
        elif kind == "silent":
            time.sleep(step[1])
        elif kind == "exit":
            os._exit(step[1])
        elif kind == "signal":
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            os.kill(os.getpid(), step[1])
            time.sleep(60)
        elif kind == "close-out":
            os.close(1)
            time.sleep(60)
        else:
            os._exit(99)


def main() -> None:
    os.write(1, msgpack.packb(["ready"]))
    start = read()
    assert isinstance(start, list)
    fields = start[1]
    if fields["mode"] == "compile":
        os.write(1, msgpack.packb(["done", "return", b""], use_bin_type=True))
        os._exit(0)
    path = fields["source"].decode().strip()
    with open(path, "rb") as f:
        plan = msgpack.unpackb(f.read(), raw=False)
    run(plan, Counter(path + ".n"))
    while True:
        read()


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
    sys.stdout.flush()
    os._exit(0)
