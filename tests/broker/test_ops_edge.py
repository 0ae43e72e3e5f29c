"""Operator features at their edges: --proxy-protocol, systemd socket activation, --user and root refusal.

Everything runs the real broker on loopback. PROXY headers are written by hand (v1 text, v2 with struct),
socket activation is driven as systemd does it (listening sockets at fds 3.., LISTEN_PID/LISTEN_FDS set
to the broker's own pid right before exec), and privileges are read from /proc.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import HOST, REPO, Broker, descendants, free_offset, read_all, read_until, sandboxes_below

IS_ROOT = os.geteuid() == 0

# Says who the script thinks the peer is, then echoes one read: enough to see the real client and to see
# that bytes sent along with the header reach the script.
ECHO = """
deadend.send(deadend.get_ip() .. "\\n")
local d = deadend.recv(4096)
if d then deadend.send("got:" .. d) end
"""

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_TCP4 = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 25\r\n"


def v2_header(source: str, sport: int, dest: str, dport: int, command: int = 1, tlv: bytes = b"") -> bytes:
    """A binary PROXY v2 header: PROXY (1) or LOCAL (0), TCP over IPv4 or IPv6, optional TLV bytes."""
    if ":" in source:
        family = 0x21
        addresses = socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(socket.AF_INET6, dest)
    else:
        family = 0x11
        addresses = socket.inet_aton(source) + socket.inet_aton(dest)
    payload = addresses + struct.pack("!HH", sport, dport) + tlv
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(payload)) + payload


def read_closed(sock: socket.socket, timeout: float = 8.0) -> bytes:
    """Everything until the broker closes the connection (a reset counts as a close)."""
    try:
        return read_all(sock, timeout)
    except ConnectionResetError:
        return b""


def proxied(b: Broker, header: bytes, port: int = 25) -> socket.socket:
    c = b.connect(port)
    c.sendall(header)
    return c


def connect_id(b: Broker, peer: str, since: int | None = None, timeout: float = 10.0) -> str:
    """The connection id of the connect line for `peer` (at or after `since`)."""
    return b.wait_for(rf"conn=([0-9a-f]{{12}}) peer={re.escape(peer)} connect from ", timeout, since).group(1)


def wait_count(b: Broker, text: str, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while "\n".join(b.lines).count(text) < n:
        assert time.monotonic() < deadline, f"fewer than {n} lines with {text!r}:\n" + "\n".join(b.lines)
        time.sleep(0.05)
    assert "\n".join(b.lines).count(text) == n


def good_session(b: Broker, source: str = "198.51.100.20") -> None:
    """One complete proxied session: the broker is still serving."""
    mark = b.mark()
    c = proxied(b, f"PROXY TCP4 {source} 10.0.0.1 40000 25\r\n".encode())
    with c:
        assert read_until(c, b"\n") == f"{source}\n".encode()
        c.sendall(b"still there")
        assert read_all(c) == b"got:still there"
    conn = connect_id(b, source, mark)
    assert b.session_end(conn).group(1) == "done"


# --- PROXY protocol: the real client ---------------------------------------------------------------


HEADERS = {
    "v1-tcp4": (V1_TCP4, "203.0.113.7", 51000),
    "v1-tcp6": (b"PROXY TCP6 2001:db8::5 2001:db8::1 51001 25\r\n", "2001:db8::5", 51001),
    "v1-tcp6-mapped": (b"PROXY TCP6 ::ffff:203.0.113.9 ::ffff:10.0.0.1 51002 25\r\n", "203.0.113.9", 51002),
    "v2-ipv4": (v2_header("203.0.113.7", 51003, "10.0.0.1", 25), "203.0.113.7", 51003),
    "v2-ipv6": (v2_header("2001:db8::5", 51004, "2001:db8::1", 25), "2001:db8::5", 51004),
    # A TLV (PP2_TYPE_AUTHORITY "example.org") after the addresses: skipped, not handed to the script.
    "v2-ipv4-tlv": (
        v2_header("203.0.113.8", 51005, "10.0.0.1", 25, tlv=b"\x02\x00\x0bexample.org"),
        "203.0.113.8",
        51005,
    ),
}


@pytest.mark.parametrize("name", list(HEADERS))
def test_proxy_header_gives_the_real_client(make_broker, name: str) -> None:
    header, ip, sport = HEADERS[name]
    b = make_broker({"25.lua": ECHO}, "--proxy-protocol")
    with proxied(b, header) as c:
        assert read_until(c, b"\n") == f"{ip}\n".encode()
        c.sendall(b"hi")
        assert read_all(c) == b"got:hi"
    line = b.wait_for(rf"conn=([0-9a-f]{{12}}) peer={re.escape(ip)} connect from (.*)")
    assert line.group(2) == f"{ip} port {sport} via 127.0.0.1 script=25.lua"
    end = b.wait_for(rf"conn={line.group(1)} peer=(\S+) session end reason=(\S+) .*bytes_in=(\d+)")
    # the header is not client data: only "hi" counts
    assert end.groups() == (ip, "done", "2")
    assert b.conn_ids() == [line.group(1)]


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 25\r\nhello", id="v1"),
        pytest.param(v2_header("203.0.113.7", 51000, "10.0.0.1", 25) + b"hello", id="v2"),
    ],
)
def test_client_bytes_sent_with_the_header_reach_the_script(make_broker, header: bytes) -> None:
    b = make_broker({"25.lua": ECHO}, "--proxy-protocol")
    with proxied(b, header) as c:
        assert read_all(c) == b"203.0.113.7\ngot:hello"
    conn = connect_id(b, "203.0.113.7")
    assert re.search(r"bytes_in=5 ", b.wait_for(rf"conn={conn} .*session end reason=done.*").group(0))


def test_header_arriving_in_pieces_is_assembled(make_broker) -> None:
    b = make_broker({"25.lua": ECHO}, "--proxy-protocol")
    with b.connect(25) as c:
        for piece in (b"PRO", b"XY TCP4 203.0.1", b"13.7 10.0.0.1 510", b"00 25\r", b"\nab"):
            c.sendall(piece)
            time.sleep(0.05)
        assert read_all(c) == b"203.0.113.7\ngot:ab"
    conn = connect_id(b, "203.0.113.7")
    assert b.session_end(conn).group(1) == "done"


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(v2_header("203.0.113.7", 51000, "10.0.0.1", 25, command=0), id="v2-local"),
        pytest.param(b"PROXY UNKNOWN\r\n", id="v1-unknown"),
        pytest.param(b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", id="v1-unknown-long"),
    ],
)
def test_header_without_a_client_keeps_the_connection_peer(make_broker, header: bytes) -> None:
    b = make_broker({"25.lua": ECHO}, "--proxy-protocol")
    with proxied(b, header) as c:
        assert read_until(c, b"\n") == b"127.0.0.1\n"
        c.sendall(b"x")
        assert read_all(c) == b"got:x"
    line = b.wait_for(r"conn=([0-9a-f]{12}) peer=127\.0\.0\.1 connect from (.*)")
    assert " via " not in line.group(2)
    assert b.session_end(line.group(1)).group(1) == "done"


# --- PROXY protocol: refusals ----------------------------------------------------------------------


BAD_HEADERS = {
    "http": (b"GET / HTTP/1.0\r\n\r\n", "not a PROXY protocol header"),
    "v1-bad-address": (b"PROXY TCP4 999.1.1.1 10.0.0.1 51000 25\r\n", "source address"),
    "v1-tcp4-with-ipv6": (b"PROXY TCP4 2001:db8::5 10.0.0.1 51000 25\r\n", "source address"),
    "v1-bad-port": (b"PROXY TCP4 203.0.113.7 10.0.0.1 65536 25\r\n", "source port"),
    "v1-lf-only": (b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 25\n", "LF without a CR"),
    "v2-udp": (V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "datagram"),
    "v2-version-1": (V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "version 1"),
    # half a header, then the client hangs up
    "truncated": (b"PROXY TCP4 203.0.113.7 10.0.", "closed before a complete PROXY header"),
}


@pytest.mark.parametrize("name", list(BAD_HEADERS))
def test_bad_header_is_refused_without_a_byte(make_broker, name: str) -> None:
    data, why = BAD_HEADERS[name]
    b = make_broker({"25.lua": ECHO}, "--proxy-protocol")
    with proxied(b, data) as c:
        if name == "truncated":
            c.shutdown(socket.SHUT_WR)
        assert read_closed(c) == b""
    warn = b.wait_for(r"WARN .* conn=([0-9a-f]{12}) peer=127\.0\.0\.1 refused: (.*)")
    assert why in warn.group(2)
    end = b.session_end(warn.group(1))
    assert end.group(1) == "proxy-header"
    assert b.conn_ids() == []  # no connect line: no sandbox was involved
    good_session(b)


def test_silent_client_is_dropped_after_the_header_timeout(make_broker) -> None:
    from broker.doorman import PROXY_HEADER_TIMEOUT

    b = make_broker({"25.lua": ECHO}, "--proxy-protocol")
    silent = b.connect(25)
    started = time.monotonic()
    with silent:
        good_session(b)  # a silent client holds nobody else up
        warn = b.wait_for(
            r"WARN .* conn=([0-9a-f]{12}) peer=127\.0\.0\.1 refused: no PROXY header within 5s",
            PROXY_HEADER_TIMEOUT + 5,
        )
        assert time.monotonic() - started >= PROXY_HEADER_TIMEOUT - 0.5
        assert read_closed(silent, 2) == b""
    assert b.session_end(warn.group(1)).group(1) == "proxy-header"
    good_session(b, "198.51.100.21")


def test_per_ip_cap_counts_the_real_client(make_broker) -> None:
    b = make_broker({"25.lua": ECHO}, "--proxy-protocol", "--max-per-ip", "1")

    def hold(source: str) -> socket.socket:
        family = "TCP6" if ":" in source else "TCP4"
        dest = "2001:db8::1" if ":" in source else "10.0.0.1"
        return proxied(b, f"PROXY {family} {source} {dest} 40000 25\r\n".encode())

    first = hold("203.0.113.7")
    assert read_until(first, b"\n") == b"203.0.113.7\n"
    # Same real client, same proxy address: over the cap.
    mark = b.mark()
    second = hold("203.0.113.7")
    assert read_closed(second) == b""
    b.wait_for(r"peer=203\.0\.113\.7 session end reason=per-ip-limit ", since=mark)
    # Other real clients through the same proxy address: each has its own count.
    others = [hold("203.0.113.8"), hold("2001:db8::5")]
    assert read_until(others[0], b"\n") == b"203.0.113.8\n"
    assert read_until(others[1], b"\n") == b"2001:db8::5\n"
    # IPv6 is counted per /64.
    mark = b.mark()
    same64 = hold("2001:db8::6")
    assert read_closed(same64) == b""
    b.wait_for(r"peer=2001:db8::6 session end reason=per-ip-limit ", since=mark)
    other64 = hold("2001:db8:0:1::5")
    assert read_until(other64, b"\n") == b"2001:db8:0:1::5\n"
    held = [first, *others, other64]
    for c in held:
        c.sendall(b"bye")
        assert read_all(c) == b"got:bye"
        c.close()
    for c in (second, same64):
        c.close()
    wait_count(b, "session end reason=done", 4)
    assert "\n".join(b.lines).count("session end reason=per-ip-limit") == 2
    # the refused ones did not leave a count behind: 203.0.113.7 is served again
    good_session(b, "203.0.113.7")


def test_ignore_list_applies_to_the_real_client(make_broker) -> None:
    b = make_broker({"25.lua": ECHO}, "--proxy-protocol", "--ignore", "203.0.113.0/24")
    with proxied(b, V1_TCP4) as c:  # 203.0.113.7: served, but not logged
        assert read_until(c, b"\n") == b"203.0.113.7\n"
        c.sendall(b"a")
        assert read_all(c) == b"got:a"
    good_session(b)  # 198.51.100.20: logged
    assert "203.0.113.7" not in "\n".join(b.lines)


def test_ignoring_the_proxy_address_does_not_hide_its_clients(make_broker) -> None:
    # --ignore is about the real client: a balancer inside an ignored network still passes its clients on.
    b = make_broker(
        {"25.lua": ECHO}, "--proxy-protocol", "--ignore", "127.0.0.0/8", "--ignore-action", "refuse"
    )
    with proxied(b, V1_TCP4) as c:
        assert read_until(c, b"\n") == b"203.0.113.7\n"
        c.sendall(b"a")
        assert read_all(c) == b"got:a"
    connect_id(b, "203.0.113.7", timeout=3)


def test_without_the_flag_a_proxy_line_is_just_data(make_broker) -> None:
    b = make_broker({"25.lua": ECHO})
    with proxied(b, V1_TCP4) as c:
        assert read_all(c) == b"127.0.0.1\ngot:" + V1_TCP4
    line = b.wait_for(r"conn=([0-9a-f]{12}) peer=127\.0\.0\.1 connect from (.*)")
    assert " via " not in line.group(2)
    assert b.session_end(line.group(1)).group(1) == "done"


# --- systemd socket activation ---------------------------------------------------------------------


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def inode(sock: socket.socket | int) -> int:
    return os.fstat(sock if isinstance(sock, int) else sock.fileno()).st_ino


def socket_inodes(pid: int) -> dict[int, int]:
    """fd -> socket inode, for each socket `pid` holds."""
    found = {}
    for entry in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            found[int(entry)] = int(m.group(1))
    return found


def listening_tcp_inodes() -> set[int]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.readlines()[1:]:
                fields = row.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    found.add(int(fields[9]))
    return found


def environ_of(pid: int) -> list[str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return [v.decode(errors="replace") for v in f.read().split(b"\0") if v]


def zygote_of(broker_pid: int) -> int:
    for pid in descendants(broker_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"sandbox.zygote" in cmdline:
            return pid
    raise AssertionError("no zygote below the broker")


def listening_socket(port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((HOST, port))
    s.listen(16)
    return s


@contextmanager
def fds_from_three(*fds: int) -> Iterator[tuple[Callable[[], None], tuple[int, ...]]]:
    """A preexec_fn that puts `fds` at 3, 4, ... in the child (as systemd does), and the pass_fds to go with
    it. Fds 3.. are kept open in the parent while the child starts, so that Popen's own error pipe cannot
    sit where the sockets go (it would be overwritten)."""
    targets = tuple(range(3, 3 + len(fds)))
    placeholders = []
    while not all(fd_open(t) for t in targets):
        placeholders.append(os.open(os.devnull, os.O_RDONLY))

    def move() -> None:
        # Out of the way first: a source may sit on another's target.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
        for target, fd in zip(targets, high, strict=True):
            os.dup2(fd, target)
            os.close(fd)

    try:
        yield move, targets
    finally:
        for fd in placeholders:
            os.close(fd)


def start_activated(
    make_broker,
    scripts: dict[str, str],
    fds: list[int],
    *args: str,
    listen_pid: int | None = None,
    listen_fds: str | None = None,
    ready: bool = True,
    expect_exit: int = 0,
) -> Broker:
    """Start the broker as systemd would: `fds` at 3.., LISTEN_PID = its pid (unless given), LISTEN_FDS."""
    count = listen_fds if listen_fds is not None else str(len(fds))
    with fds_from_three(*fds) as (move, keep):

        def activate() -> None:
            move()
            # Popen without env= execs with the C environment, which os.environ writes through to.
            os.environ["LISTEN_PID"] = str(listen_pid if listen_pid is not None else os.getpid())
            os.environ["LISTEN_FDS"] = count
            os.environ["LISTEN_FDNAMES"] = ":".join(["deadend"] * len(fds))

        return make_broker(
            scripts, *args, ready=ready, expect_exit=expect_exit, preexec_fn=activate, pass_fds=keep
        )


def startup_error(b: Broker) -> str:
    assert b.proc.wait(15) == 1
    return b.stderr_closed()


def test_socket_activation_serves_the_inherited_socket(make_broker) -> None:
    sock = listening_socket()
    port = sock.getsockname()[1]
    with sock:
        b = start_activated(make_broker, {"25.lua": ECHO}, [sock.fileno()], "--port-offset", str(port - 25))
        b.wait_for(rf"listening on 127\.0\.0\.1:{port} script=25\.lua")
        held = socket.create_connection((HOST, port), timeout=5)
        assert read_until(held, b"\n") == b"127.0.0.1\n"
        # The broker's only listening socket is ours, at fd 3: it bound nothing of its own.
        ours = inode(sock)
        broker_sockets = socket_inodes(b.proc.pid)
        assert broker_sockets.get(3) == ours
        assert set(broker_sockets.values()) & listening_tcp_inodes() == {ours}
        # Nothing sandbox-side holds it, or believes it was socket-activated.
        zygote = zygote_of(b.proc.pid)
        children = descendants(zygote)
        assert children, "no sandbox child (a session is held open)"
        for pid in [zygote, *children]:
            assert ours not in socket_inodes(pid).values(), f"pid {pid} holds the inherited socket"
            assert not [v for v in environ_of(pid) if v.startswith("LISTEN_")], f"pid {pid}"
        for pid in sandboxes_below(zygote):
            assert sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd")) == [0, 1, 2], f"pid {pid}"
        with held:
            held.sendall(b"over systemd")
            assert read_all(held) == b"got:over systemd"
        conn = connect_id(b, "127.0.0.1")
        assert b.session_end(conn).group(1) == "done"
        assert b.stop() == 0
    assert "socket activation passed" not in "\n".join(b.lines)


def test_socket_activation_mixes_with_bound_ports(make_broker) -> None:
    # 25.lua on the inherited socket at P, 26.lua bound by the broker at P+1, and an inherited socket
    # with no script (kept, warned about, never served).
    for _ in range(50):
        port = random.randint(20000, 60000)
        try:
            sock = listening_socket(port)
        except OSError:
            continue
        try:
            listening_socket(port + 1).close()
            break
        except OSError:
            sock.close()
    else:
        pytest.skip("no two consecutive free ports")
    stray = listening_socket()
    with sock, stray:
        scripts = {"25.lua": ECHO, "26.lua": ECHO}
        offset = ["--port-offset", str(port - 25)]
        b = start_activated(make_broker, scripts, [sock.fileno(), stray.fileno()], *offset)
        stray_port = stray.getsockname()[1]
        b.wait_for(rf"listening on 127\.0\.0\.1:{port} script=25\.lua")
        b.wait_for(rf"listening on 127\.0\.0\.1:{port + 1} script=26\.lua")
        b.wait_for(rf"WARN .*socket activation passed 1 socket\(s\) on port {stray_port} with no script")
        for p in (port, port + 1):
            with socket.create_connection((HOST, p), timeout=5) as c:
                c.sendall(b"x")
                assert read_all(c) == b"127.0.0.1\ngot:x"
        listening = set(socket_inodes(b.proc.pid).values()) & listening_tcp_inodes()
        assert inode(sock) in listening and inode(stray) in listening
        assert len(listening) == 3  # the two inherited ones and the one it bound for 26.lua
        assert len(b.conn_ids()) == 2


def test_socket_activation_for_another_pid_is_ignored(make_broker) -> None:
    sock = listening_socket()
    with sock:
        # LISTEN_PID names this test process, as if the variables had leaked from a parent.
        b = start_activated(make_broker, {"25.lua": ECHO}, [sock.fileno()], listen_pid=os.getpid())
        own = b.port(25)
        b.wait_for(rf"listening on 127\.0\.0\.1:{own} script=25\.lua")
        with b.connect(25) as c:
            c.sendall(b"x")
            assert read_all(c) == b"127.0.0.1\ngot:x"
        # It bound its own socket; ours is merely still open in it (not its to close), and not accepted on.
        listening = set(socket_inodes(b.proc.pid).values()) & listening_tcp_inodes()
        assert len(listening - {inode(sock)}) == 1
        b.wait_for(r"session end reason=done")  # the log is written in batches: that session's lines first
        mark = b.mark()
        with socket.create_connection(sock.getsockname(), timeout=5):
            time.sleep(0.3)
            sock.setblocking(False)
            accepted, _ = sock.accept()  # still in the backlog: the broker never accepted it
            accepted.close()
        assert not [line for line in b.lines[mark:] if "connect from" in line]
        zygote = zygote_of(b.proc.pid)
        assert not [v for v in environ_of(zygote) if v.startswith("LISTEN_")]
        assert inode(sock) not in socket_inodes(zygote).values()


@contextmanager
def bad_fd(kind: str) -> Iterator[int]:
    if kind == "pipe":
        r, w = os.pipe()
        try:
            yield r
        finally:
            os.close(r)
            os.close(w)
        return
    if kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((HOST, 0))
    elif kind == "tcp-not-listening":
        s = socket.socket()
        s.bind((HOST, 0))
    elif kind == "unix-stream":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(f"\0deadend-test-{os.getpid()}-{random.getrandbits(32)}")  # abstract: no file to clean up
        s.listen(1)
    else:
        raise AssertionError(kind)
    with s:
        yield s.fileno()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("pipe", "socket activation fd 3 is not a socket"),
        ("udp", "socket activation fd 3 is not a TCP socket"),
        ("unix-stream", "socket activation fd 3 is not a TCP socket"),
        ("tcp-not-listening", "socket activation fd 3 is not listening"),
    ],
)
def test_socket_activation_refuses_what_is_not_a_listening_tcp_socket(
    make_broker, kind: str, message: str
) -> None:
    with bad_fd(kind) as fd:
        b = start_activated(make_broker, {"25.lua": ECHO}, [fd], ready=False, expect_exit=1)
        stderr = startup_error(b)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"deadend: error: {message}"), stderr
    assert not [line for line in b.lines if "listening on" in line]


@pytest.mark.parametrize(
    ("listen_fds", "message"),
    [
        ("two", "LISTEN_FDS='two' is not a usable socket count"),
        ("0", "LISTEN_FDS='0' is not a usable socket count"),
        ("2", "socket activation fd 4 is not a socket"),  # only fd 3 was passed
    ],
)
def test_socket_activation_refuses_a_bad_count(make_broker, listen_fds: str, message: str) -> None:
    sock = listening_socket()
    with sock:
        b = start_activated(
            make_broker, {"25.lua": ECHO}, [sock.fileno()], listen_fds=listen_fds, ready=False, expect_exit=1
        )
        stderr = startup_error(b)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"deadend: error: {message}"), stderr


# --- privileges ------------------------------------------------------------------------------------


def credentials(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.rstrip("\n").split(":", 1) for line in f if ":" in line)
    return {k: " ".join(fields[k].split()) for k in ("Uid", "Gid", "Groups")}


@pytest.mark.skipif(not IS_ROOT, reason="switching user needs root")
@pytest.mark.parametrize("user", ["nobody", "65534"])
def test_user_nobody_runs_broker_zygote_and_sandboxes_unprivileged(make_broker, user: str) -> None:
    b = make_broker({"25.lua": ECHO}, "--user", user)
    b.wait_for(r"running as user nobody \(uid 65534, gid 65534\)")
    with b.connect(25) as c:
        assert read_until(c, b"\n") == b"127.0.0.1\n"  # a session is held open: its child exists
        zygote = zygote_of(b.proc.pid)
        children = descendants(zygote)
        assert children
        nobody = {"Uid": "65534 65534 65534 65534", "Gid": "65534 65534 65534 65534", "Groups": ""}
        for pid in [b.proc.pid, zygote, *children]:
            assert credentials(pid) == nobody, f"pid {pid}"
        # Not dumpable: the kernel then gives the process's /proc files to root. (With fs.suid_dumpable=0
        # the uid switch alone has that effect too, so this cannot tell prctl(PR_SET_DUMPABLE) apart.)
        for pid in [b.proc.pid, *children]:
            assert os.stat(f"/proc/{pid}/status").st_uid == 0, f"pid {pid} is dumpable"
        c.sendall(b"as nobody")
        assert read_all(c) == b"got:as nobody"
    conn = connect_id(b, "127.0.0.1")
    assert b.session_end(conn).group(1) == "done"


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    scripts = tmp_path / "scripts"
    scripts.mkdir(exist_ok=True)
    (scripts / "25.lua").write_text(ECHO)
    offset = free_offset([25])
    cmd = [sys.executable, "-m", "deadend", "broker", "--scripts", str(scripts), "--host", HOST]
    cmd += ["--port-offset", str(offset), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            [],
            "refusing to run sandboxes as root",
            id="root-without-user",
            marks=pytest.mark.skipif(not IS_ROOT, reason="only root is refused"),
        ),
        pytest.param(
            ["--user", "deadend-no-such-user"], "--user deadend-no-such-user: no such user", id="nosuch"
        ),
        pytest.param(["--user", "root"], "--user root is root; pass --allow-root", id="root"),
        pytest.param(["--user", "0"], "--user 0 is root; pass --allow-root", id="uid-0"),
    ],
)
def test_privilege_refusals(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli(tmp_path, *args)
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deadend: error: "), result.stderr
    assert message in lines[0], result.stderr
    assert "listening on" not in result.stdout
