"""Serve examples/ on their real port numbers and scan them with `nmap -sV`, inside a network namespace of
our own (tests/examples/test_nmap.py runs this under `unshare --user --map-root-user --net`).

Why the real numbers: nmap chooses its probes by port (an nmap-service-probes probe registered for 443 is
tried there whatever the intensity), so a scan of shifted ports is not the scan an attacker runs. A fresh
namespace has every port free and a loopback of its own; being its root lets the broker bind 22 or 443.

    python -m tests.examples.netns_nmap INTENSITY   -> nmap's XML report on stdout, the broker's log on stderr
"""

from __future__ import annotations

import fcntl
import socket
import struct
import subprocess
import sys
import threading
import time

from tests.conftest import EXAMPLES, HOST, REPO

SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
READY_TIMEOUT = 60.0


def loopback_up() -> None:
    """`ip link set lo up`, without needing iproute2."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def main(intensity: str) -> int:
    loopback_up()
    ports = sorted(int(p.stem) for p in EXAMPLES.glob("*.lua"))
    cmd = [sys.executable, "-m", "deadend", "broker", "--scripts", str(EXAMPLES), "--host", HOST]
    # One scanner, one address: nmap's probes of 13 ports overlap, and the sessions it leaves keep running
    # for --linger; on a loaded machine they passed the default quarter of the capacity per address, and a
    # refused probe reads as "tcpwrapped". The per-address cap has tests of its own (tests/broker).
    cmd += ["--max-per-ip", "64"]
    broker = subprocess.Popen([*cmd, "--allow-root"], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert broker.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        for line in broker.stdout:
            sys.stderr.write(line)
            if " ready: " in line:
                break
            if time.monotonic() > deadline:
                return 2
        else:
            return 2
        # the rest of the broker's log, for the test's message (an unread pipe would only lose it)
        relay = threading.Thread(target=lambda: sys.stderr.writelines(broker.stdout or ()), daemon=True)
        relay.start()
        nmap = ["nmap", "-sT", "-sV", "--version-intensity", intensity, "-Pn", "-n", "--unprivileged"]
        scan = subprocess.run(
            [*nmap, "-p", ",".join(map(str, ports)), "-oX", "-", HOST],
            capture_output=True,
            text=True,
            timeout=300,
        )
        sys.stdout.write(scan.stdout)
        sys.stderr.write(scan.stderr)
        return scan.returncode
    finally:
        broker.terminate()
        broker.wait(30)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
