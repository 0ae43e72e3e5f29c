"""A compromised dense-mode sandbox child (`--sessions-per-worker`): speaks the slot protocol badly.

fd 0 carries frames from the broker, each preceded by its slot number; fd 1 carries this child's frames,
each preceded by its slot number; the first frame is ["ready"] without one. Each session's script source
names its behaviour. "good" is an echo script: send "hi <pid>\\n", recv, send "echo:" and the line, return.
Every other behaviour starts the same way (so the broker has seen it behave for a while) and misbehaves
once the client sent its first line (the reply to the recv), or when the broker aborts it.
"""

import contextlib
import os
import random
import sys
import time
from collections.abc import Generator
from typing import Any

import msgpack

from tests.fakes.child_pipe import raw, read

PID = os.getpid()
SEND_MAX = 1 << 20  # deadend.wire.SEND_MAX (not imported: this is the attacker's program)
ABORT = ["abort"]
ABORTED = ["done", "aborted", b""]


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def frame(slot: object, obj: object) -> bytes:
    return pack(slot) + pack(obj)


behaviours: dict[int, str] = {}  # slot -> behaviour, for the sessions this child holds


def sibling_of(slot: int) -> int:
    """Another slot this child holds (for frames aimed at a session that is not owed one)."""
    return next(s for s in behaviours if s != slot)


def flood(slot: int, seed: bytes) -> bytes:
    """8 MiB of frames for random slots (held, not held, owed or not), all in one write."""
    rng = random.Random(seed)
    unit = b"".join(frame(rng.choice([0, 1, 2, 3, 999, slot]), ["get_ip"]) for _ in range(8192))
    return unit * ((8 << 20) // len(unit))


# What a misbehaving session writes once the client's first line arrived: bytes, written in one piece.
AFTER_GO = {
    "unknown-slot": lambda s: frame(999, ["send", b"x"]),
    "slot-negative": lambda s: frame(-1, ["send", b"x"]),
    "slot-huge": lambda s: frame((1 << 64) - 1, ["send", b"x"]),
    "slot-str": lambda s: frame(str(s), ["send", b"x"]),
    "slot-list": lambda s: frame([s], ["send", b"x"]),
    "slot-bool": lambda s: frame(True, ["send", b"x"]),
    "slot-float": lambda s: frame(float(s), ["send", b"x"]),
    "slot-nil": lambda s: frame(None, ["send", b"x"]),
    "two-requests": lambda s: frame(s, ["get_ip"]) * 2,
    "sibling-slot": lambda s: frame(sibling_of(s), ["get_ip"]),
    "garbage": lambda s: b"\xc1\xc1\xc1\xc1",
    "garbage-after-slot": lambda s: pack(s) + b"\xc1\xc1\xc1\xc1",
    "oversized": lambda s: pack(s) + pack(["send", b"x" * SEND_MAX, b"y" * SEND_MAX]),
    "send-huge": lambda s: frame(s, ["send", b"x" * (SEND_MAX + 1)]),
    "bad-args": lambda s: frame(s, ["get_ip", 1]),
    "unknown-op": lambda s: frame(s, ["exec", b"/bin/sh"]),
}


def session(slot: int, behaviour: str) -> Generator[bytes | None, Any, None]:
    """One session: yields what to write (None: nothing) and is sent the broker's next frame for it."""
    reply = yield frame(slot, ["send", b"hi %d\n" % PID])
    reply = yield frame(slot, ["recv", 100])
    if behaviour == "good":
        reply = yield frame(slot, ["send", b"echo:" + reply])
        yield frame(slot, ["done", "return", b""])
    elif behaviour == "flood":  # the client's line seeds the choice of slots
        yield flood(slot, reply)
    elif behaviour in AFTER_GO:
        yield AFTER_GO[behaviour](slot)
    elif behaviour == "ahead-of-reply":  # a request while the broker still carries out the previous one
        raw(frame(slot, ["sleep", 300]))
        time.sleep(0.05)
        yield frame(slot, ["get_ip"])
    elif behaviour == "done-then-frame":  # the session is over; a frame for its (now free) slot
        raw(frame(slot, ["done", "return", b""]))
        time.sleep(0.2)
        yield frame(slot, ["get_ip"])
    elif behaviour == "close-pipe":
        os.close(1)
        time.sleep(60)
    elif behaviour == "exit":
        os._exit(3)
    elif behaviour == "silent":  # neither reads nor writes any more
        time.sleep(60)
    elif behaviour == "noread-stream":  # asks for more and more, never reading a reply
        for _ in range(40):
            raw(frame(slot, ["recv", 65535]))
            time.sleep(0.05)
        time.sleep(60)
    elif behaviour.startswith("linger-calls"):  # the monitor ends it (End), the broker sends ABORT
        yield frame(slot, ["close"])
        while True:
            yield frame(slot, ["send", b"z"])
    elif behaviour.startswith("linger-owed"):  # the linger timer ends it while this child owes a frame
        yield frame(slot, ["close"])
        time.sleep(0.6)  # past --linger (0.2 s), within the CPU slice (1.5 s)
        yield frame(slot, ["get_ip"])
    elif behaviour.startswith("linger-time"):  # the linger timer ends it during a sleep: ABORT
        yield frame(slot, ["close"])
        yield frame(slot, ["sleep", 60_000])
    else:
        os._exit(99)


def on_abort(slot: int, behaviour: str) -> bytes | None:
    """What this child answers to ABORT for `slot` (None: nothing, ever)."""
    if behaviour.endswith("-request"):
        return frame(slot, ["get_ip"])  # a request after ABORT
    if behaviour.endswith("-ignored"):
        return None
    return frame(slot, ABORTED)


def main() -> None:
    raw(pack(["ready"]))
    runs: dict[int, Generator[bytes | None, Any, None]] = {}
    while True:
        slot, value = read(), read()
        if isinstance(value, list) and value[:1] == ["start"]:
            fields = value[1]
            if fields["mode"] == "compile":
                raw(frame(slot, ["done", "return", b""]))
                continue
            behaviours[slot] = fields["source"].decode().strip()
            runs[slot] = session(slot, behaviours[slot])
            out = next(runs[slot])
        elif value == ABORT:
            runs.pop(slot, None)
            out = on_abort(slot, behaviours.pop(slot, "good"))
        elif slot in runs:
            try:
                out = runs[slot].send(value)
            except StopIteration:
                out = None
        else:
            os._exit(98)  # the broker wrote to a slot this child never started
        if out:
            raw(out)
        if out is not None and out.endswith(pack(["done", "return", b""])):
            runs.pop(slot, None)
            behaviours.pop(slot, None)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
    sys.stdout.flush()
    os._exit(0)
