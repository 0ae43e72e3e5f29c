"""--brokers: the listening sockets the brokers share, and the program that tells them apart.

For each address (and port) the supervisor opens N sockets with SO_REUSEPORT, one per broker, in one
reuseport group. By default the kernel spreads connections over such a group by a hash of the whole
4-tuple: one client's connections would reach every broker, and no broker could enforce --max-per-ip
alone. So a classic BPF program is attached to the group (SO_ATTACH_REUSEPORT_CBPF): it reads the
client's address from the packet's IP header and returns the index of the socket that takes it, the
same for every connection of that address. The key is broker/gate.py's: an IPv4 address, an IPv6 /64.

The index is the socket's place in the group, the order the sockets began to listen. The supervisor
keeps every socket open for the group's whole life (a broker that dies and is started again gets the
same socket back): the places never move, and the connections of a broker being restarted wait in its
socket's backlog.

The programs are data (`steering_program`), checked without a kernel by `run_program`, a classic BPF
interpreter for the few instructions they use.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from typing import Final

from broker.net import BACKLOG, BindAddress

SO_ATTACH_REUSEPORT_CBPF: Final = 51  # asm-generic/socket.h (absent from Python's socket module)

# Classic BPF opcodes (linux/filter.h, linux/bpf_common.h), those the programs use.
LD_W_ABS: Final = 0x20  # A = the 32-bit word at offset k (big-endian, as the packet holds it)
ALU_MUL_K: Final = 0x24
ALU_RSH_K: Final = 0x74
ALU_XOR_X: Final = 0xAC
ALU_MOD_K: Final = 0x94
MISC_TAX: Final = 0x07  # X = A
RET_A: Final = 0x16
SKF_NET_OFF: Final = -0x100000  # offsets from here are into the network (IP) header
IPV4_SOURCE: Final = 12  # offset of the source address in an IPv4 header
IPV6_SOURCE: Final = 8  # ... in an IPv6 header; its /64 prefix is the first 8 bytes
GOLDEN: Final = 0x9E3779B1  # Knuth's multiplicative hash: the high bits of the product are well mixed

Instruction = tuple[int, int, int, int]  # code, jt, jf, k


def steering_program(family: socket.AddressFamily, count: int) -> list[Instruction]:
    """The program for a group of `count` sockets of `family`: the client's address (an IPv6 address's
    /64) hashed to a socket index."""
    net = SKF_NET_OFF & 0xFFFFFFFF
    if family == socket.AF_INET:
        load = [(LD_W_ABS, 0, 0, net + IPV4_SOURCE)]
    else:
        load = [
            (LD_W_ABS, 0, 0, net + IPV6_SOURCE),
            (MISC_TAX, 0, 0, 0),
            (LD_W_ABS, 0, 0, net + IPV6_SOURCE + 4),
            (ALU_XOR_X, 0, 0, 0),
        ]
    return [
        *load,
        (ALU_MUL_K, 0, 0, GOLDEN),
        (ALU_RSH_K, 0, 0, 16),
        (ALU_MOD_K, 0, 0, count),
        (RET_A, 0, 0, 0),
    ]


def encode(program: list[Instruction]) -> bytes:
    """struct sock_filter[], as the kernel reads it."""
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


def run_program(program: list[Instruction], ip_header: bytes) -> int:
    """What the kernel would return for a packet whose IP header is `ip_header` (the tests' interpreter;
    only the instructions `steering_program` emits)."""
    a = x = 0
    net = SKF_NET_OFF & 0xFFFFFFFF
    for code, _jt, _jf, k in program:
        if code == LD_W_ABS:
            offset = k - net
            a = int.from_bytes(ip_header[offset : offset + 4], "big")
        elif code == MISC_TAX:
            x = a
        elif code == ALU_XOR_X:
            a ^= x
        elif code == ALU_MUL_K:
            a = (a * k) & 0xFFFFFFFF
        elif code == ALU_RSH_K:
            a >>= k
        elif code == ALU_MOD_K:
            a %= k
        elif code == RET_A:
            return a
        else:
            raise ValueError(f"instruction {code:#x} is not one the steering programs use")
    raise ValueError("the program does not return")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach(sock: socket.socket, program: list[Instruction]) -> None:
    """Attach `program` to the reuseport group of `sock` (OSError if the kernel refuses it)."""
    code = encode(program)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = _SockFprog(len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


def steered_group(address: BindAddress, count: int) -> list[socket.socket]:
    """`count` listening sockets on `address`, one reuseport group, steered by client address: socket i
    takes the addresses the program sends to i. OSError if any cannot be opened (none is left open)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(address.family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if address.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address.host, address.port))
        # Attached before any listens: no connection is ever placed by the kernel's own hash. A socket
        # joins the group when it listens, so listening in order gives socket i place i.
        attach(socks[0], steering_program(address.family, count))
        for sock in socks:
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks
