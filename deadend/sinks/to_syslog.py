"""syslog+tcp:// and syslog+tls://: RFC 5424 messages in RFC 6587 octet-counting frames.

Delivered means acknowledged by the collector's TCP (deadend/sinks/transport.py). TLS verifies the
collector's certificate against the CA file of the URL (or the system's CAs without one) and checks its
name against the URL's host. A syslog collector never sends anything back: one that does is not what the
URL promised, and the connection is dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from collections.abc import Sequence

from deadend.sinks import rfc5424
from deadend.sinks.event import OutEvent
from deadend.sinks.transport import (
    RESEND_WINDOW,
    LinkProtocol,
    SinkDown,
    Transport,
    tcp_keepalive,
    write_confirmed,
)
from deadend.sinks.urls import SinkSpec


class _SyslogLink(LinkProtocol):
    def data_received(self, data: bytes) -> None:
        self.fail(f"the collector sent {len(data)} bytes; a syslog collector sends none (wrong port?)")


def tls_context(spec: SinkSpec) -> ssl.SSLContext:
    """Reads the CA and client certificate files: call it off the event loop."""
    ca = spec.file("ca")
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    cert, key = spec.file("cert"), spec.file("key")
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


class SyslogTransport(Transport):
    resend_window = RESEND_WINDOW

    def __init__(self, spec: SinkSpec, *, timeout: float) -> None:
        self.spec = spec
        self.timeout = timeout
        self.tls = spec.scheme == "syslog+tls"
        self.procid = str(os.getpid()).encode()
        self._link: _SyslogLink | None = None

    async def connect(self) -> str | None:
        context = await asyncio.to_thread(tls_context, self.spec) if self.tls else None
        loop = asyncio.get_running_loop()
        _, link = await asyncio.wait_for(
            loop.create_connection(
                _SyslogLink,
                self.spec.host,
                self.spec.port,
                ssl=context,
                server_hostname=self.spec.host if context else None,
            ),
            self.timeout,
        )
        tcp_keepalive(link.transport)
        self._link = link
        if link.gone.done():
            raise SinkDown(link.gone.result())
        if context is None:
            return None
        der = link.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return f"certificate sha256:{hashlib.sha256(der).hexdigest()[:16]}" if der else None

    def prepare(self, event: OutEvent) -> bytes | str:
        message = rfc5424.message(event, self.spec.facility, self.procid)
        if len(message) > self.spec.max_message:
            return (
                f"{len(message)} bytes, over the syslog message limit of {self.spec.max_message}"
                " (raise max_message= in the URL and the collector's maxMessageSize together)"
            )
        return rfc5424.frame(message)

    async def deliver(self, batch: Sequence[tuple[OutEvent, bytes]]) -> None:
        if self._link is None:
            raise SinkDown("not connected")
        await write_confirmed(self._link, [frame for _, frame in batch], self.timeout, tls=self.tls)

    def lost(self) -> asyncio.Future[str]:
        assert self._link is not None
        return self._link.gone

    async def close(self) -> None:
        if self._link is not None:
            self._link.fail("closed")
            self._link = None
