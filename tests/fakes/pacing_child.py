"""A sandbox child that times its own calls: it makes N cheap API calls (N is its script's text), then
sends how many seconds the broker took to answer them all. What a script sees of the call rate."""

import os
import time

import msgpack

from tests.fakes.child_pipe import read


def write(obj: object) -> None:
    os.write(1, msgpack.packb(obj, use_bin_type=True))


def main() -> None:
    write(["ready"])
    start = read()
    assert isinstance(start, list)
    fields = start[1]
    if fields["mode"] == "compile":
        write(["done", "return", b""])
        os._exit(0)
    if fields["mode"] == "prepare":
        write(["prepared"])
        read()  # GO
    began = time.monotonic()
    for _ in range(int(fields["source"])):
        write(["get_ip"])
        read()
    write(["send", b"%.3f" % (time.monotonic() - began)])
    read()
    write(["done", "return", b""])
    time.sleep(60)


if __name__ == "__main__":
    main()
