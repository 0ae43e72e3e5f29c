"""A compromised sandbox child: speaks the wire protocol badly on purpose.

The broker hands it a start message like any child; the script source names the misbehaviour.
"""

import contextlib
import os
import sys
import time

import msgpack

from tests.fakes.child_pipe import raw, read


def write(obj: object) -> None:
    os.write(1, msgpack.packb(obj, use_bin_type=True))


SINGLE_FRAMES = {
    "unknown-op": ["exec", b"/bin/sh"],
    "recv-zero": ["recv", 0],
    "recv-string": ["recv", "10"],
    "recv-bool": ["recv", True],
    "recv-float": ["recv", 10.0],
    "send-text": ["send", "text, not bytes"],
    "sleep-negative": ["sleep", -1],
    "sleep-too-long": ["sleep", 3_600_001],
    "tarpit-range": ["set_tarpit", 60001, 0],
    "limits-negative": ["set_limits", -1, 0],
    "log-level": ["log", b"x", "critical", []],
    "log-huge": ["log", b"x" * 5000, "info", []],
    "log-no-fields": ["log", b"x", "info"],
    "log-field-name": ["log", b"x", "info", [b"Bad Name", b"v"]],
    "log-field-float": ["log", b"x", "info", [b"n", 1.5]],
    "log-field-twice": ["log", b"x", "info", [b"n", 1, b"n", 2]],
    "log-fields-17": ["log", b"x", "info", [x for i in range(17) for x in (b"k%d" % i, i)]],
    "log-field-huge": ["log", b"x", "info", [b"v", b"x" * 2000]],
    "extra-args": ["get_ip", b"other connection"],
    "done-kind": ["done", "pwned", b""],
    "not-an-array": 42,
    "empty-array": [],
    "op-not-text": [7, 1],
}
RAW = {
    "garbage": b"\xc1\xc1\xc1\xc1",  # 0xc1 is never used by msgpack
    "array-bomb": b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 billion elements
    "map": msgpack.packb({"op": "send"}),
    "send-huge": msgpack.packb(["send", b"x" * ((1 << 20) + 1)], use_bin_type=True),
    "ext": msgpack.packb(msgpack.ExtType(1, b"pickle?")),
    # a 1 MiB frame of nested 4-element arrays: must be refused before it is built
    "nested": b"\x94" * 300_000 + b"\x90" * 4,
    # arrays nest one deep at most: the fields of a log request, never deeper
    "nested-fields": msgpack.packb(["log", b"x", "info", [[b"k", b"v"]]], use_bin_type=True),
}


def main() -> None:
    write(["ready"])
    start = read()
    assert isinstance(start, list)
    fields = start[1]
    behaviour = fields["source"].decode().strip()
    if fields["mode"] == "compile":
        write(["done", "return", b""])
        os._exit(0)
    if behaviour == "good":
        write(["get_ip"])
        ip = read()
        write(["send", b"good " + ip])
        read()
        write(["done", "return", b""])
    elif behaviour in SINGLE_FRAMES:
        write(["send", b"x"])
        read()
        write(SINGLE_FRAMES[behaviour])
        read()
    elif behaviour in RAW:
        raw(RAW[behaviour])
        read()
    elif behaviour == "ahead-of-reply":  # a request sent while the broker carries out the previous one
        write(["sleep", 300])
        time.sleep(0.05)
        write(["get_ip"])
        read()
    elif behaviour == "two-requests":
        raw(msgpack.packb(["get_ip"]) * 2)
        read()
    elif behaviour == "flood":
        chunk = b"\x00" * 65536  # each byte is a valid frame (the integer 0)
        for _ in range(320):  # 20 MiB
            raw(chunk)
    elif behaviour == "truncated":
        raw(msgpack.packb(["send", b"y" * 1000], use_bin_type=True)[:500])
        os._exit(0)
    elif behaviour == "silent":
        time.sleep(60)
    elif behaviour == "exit":
        os._exit(3)
    elif behaviour == "close-then-send":
        write(["close"])
        read()
        for _ in range(1000):
            write(["send", b"z"])
            if read() is not False:
                os._exit(9)
    time.sleep(60)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
    sys.stdout.flush()
    os._exit(0)
