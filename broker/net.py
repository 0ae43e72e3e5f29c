"""Listening sockets and peer addresses."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from dataclasses import dataclass

from deadend.proxy import MAX_V2_PAYLOAD, ProxyError, ProxyHeader, parse_proxy_header, peer_text

BACKLOG = 1024
# A v2 header is at most 16 + MAX_V2_PAYLOAD bytes (v1: 107); the parser rejects it before this is reached.
PROXY_READ_LIMIT = 16 + MAX_V2_PAYLOAD + 1


@dataclass(frozen=True, slots=True)
class BindAddress:
    family: socket.AddressFamily
    host: str
    port: int
    optional: bool  # part of the "every address" default: a missing IPv6 stack is not fatal

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == socket.AF_INET6 else f"{self.host}:{self.port}"


def bind_addresses(hosts: tuple[str, ...], port: int) -> list[BindAddress]:
    """Where to listen: each --host resolved, or every IPv4 and IPv6 address by default."""
    if not hosts:
        return [
            BindAddress(socket.AF_INET, "0.0.0.0", port, optional=False),
            BindAddress(socket.AF_INET6, "::", port, optional=True),
        ]
    found: list[BindAddress] = []
    for host in hosts:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, _type, _proto, _name, sockaddr in infos:
            addr = BindAddress(family, str(sockaddr[0]), port, optional=False)
            if addr not in found:
                found.append(addr)
    return found


def open_listener(addr: BindAddress) -> socket.socket:
    sock = socket.socket(addr.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if addr.family == socket.AF_INET6:
            # One socket per family: dual-stack behaviour varies by system; explicit is predictable.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((addr.host, addr.port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def ipv6_unavailable(e: OSError) -> bool:
    return e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


def peer_ip(host: str) -> str:
    """An accepted socket's peer address as scripts and logs show it (the scope of a link-local dropped)."""
    if ":" not in host:  # an AF_INET address: the kernel's dotted quad is the shown form already
        return host
    return peer_text(ipaddress.ip_address(host.split("%", 1)[0]))


async def read_proxy_header(sock: socket.socket, timeout: float) -> tuple[ProxyHeader, bytes]:
    """Read a PROXY v1/v2 header; return it and any client bytes that arrived with it.

    Raises ProxyError (malformed or missing header), TimeoutError, or OSError.
    """
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout):
        while True:
            header = parse_proxy_header(data)
            if header is not None:
                return header, data[header.length :]
            chunk = await loop.sock_recv(sock, PROXY_READ_LIMIT - len(data))
            if not chunk:
                raise ProxyError("the connection closed before a complete PROXY header")
            data += chunk
