"""hpfeeds://IDENT@HOST:PORT/CHANNEL?secret_file=: the honeypot community's feed (optional extra).

The wire protocol comes from the `hpfeeds` package (3.x): its asyncio client protocol parses the broker's
messages and builds ours. Its ready-made session class is not used: it retries forever without saying
why and drops what is published while it is away, where a sink must report, back off and keep events.

hpfeeds has no acknowledgement either: delivered means acknowledged by the broker's TCP, as for syslog.
It has no "authenticated" message: a broker that refuses the ident, the secret or the channel sends an
error and closes. So after authenticating the sink waits SETTLE seconds for such an error before it
publishes, and any error later drops the connection (the unconfirmed events are sent again).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Final

from deadend.logs import sanitize
from deadend.sinks.event import OutEvent
from deadend.sinks.transport import (
    RESEND_WINDOW,
    LinkProtocol,
    SinkDown,
    Transport,
    read_secret,
    tcp_keepalive,
    write_confirmed,
)
from deadend.sinks.urls import SinkSpec

SETTLE: Final = 0.3
MISSING: Final = "hpfeeds:// needs the optional hpfeeds package: pip install 'deadend-honeypot[hpfeeds]'"


def available() -> bool:
    with contextlib.suppress(ImportError):
        import hpfeeds.asyncio.protocol  # noqa: F401

        return True
    return False


class HpfeedsTransport(Transport):
    resend_window = RESEND_WINDOW

    def __init__(self, spec: SinkSpec, *, timeout: float) -> None:
        from hpfeeds.protocol import MAXBUF, msgpublish

        assert spec.user is not None
        self.spec = spec
        self.timeout = timeout
        self._frame = msgpublish
        self._max = MAXBUF
        self._link: Any = None

    async def connect(self) -> str | None:
        from hpfeeds.asyncio.protocol import ClientProtocol

        secret_file = self.spec.file("secret_file")
        assert secret_file is not None
        secret = await asyncio.to_thread(read_secret, str(secret_file))

        class FeedLink(LinkProtocol, ClientProtocol):  # type: ignore[misc]
            def __init__(self) -> None:
                LinkProtocol.__init__(self)
                ClientProtocol.__init__(self, ident, secret)
                self.ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
                self.broker = "?"

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                LinkProtocol.connection_made(self, transport)

            def on_info(self, name: str, rand: bytes) -> None:
                self.broker = sanitize(name, 100)
                ClientProtocol.on_info(self, name, rand)

            def connection_ready(self) -> None:
                if not self.ready.done():
                    self.ready.set_result(self.broker)

            def on_error(self, error: str) -> None:
                self.fail(f"the broker refused: {sanitize(error, 200)}")

            def on_publish(self, ident: str, chan: str, data: bytes) -> None:
                pass  # we subscribe to nothing; a broker echoing is harmless

            def protocol_error(self, reason: str) -> None:
                self.fail(f"the broker broke the protocol: {sanitize(reason, 200)}")

        ident = self.spec.user
        loop = asyncio.get_running_loop()
        _, link = await asyncio.wait_for(
            loop.create_connection(FeedLink, self.spec.host, self.spec.port), self.timeout
        )
        self._link = link
        tcp_keepalive(link.transport)
        done, _ = await asyncio.wait(
            [link.ready, link.gone], timeout=self.timeout, return_when="FIRST_COMPLETED"
        )
        if link.gone.done():
            raise SinkDown(link.gone.result())
        if not done:
            link.fail("no hpfeeds greeting from the broker")
            raise SinkDown(link.gone.result())
        await asyncio.wait([link.gone], timeout=SETTLE)
        if link.gone.done():
            raise SinkDown(link.gone.result())
        return f"broker {link.ready.result()}"

    def prepare(self, event: OutEvent) -> bytes | str:
        frame: bytes = self._frame(self.spec.user, self.spec.target, event.body)
        if len(frame) > self._max:
            return f"{len(frame)} bytes, over the hpfeeds message limit of {self._max}"
        return frame

    async def deliver(self, batch: Sequence[tuple[OutEvent, bytes]]) -> None:
        if self._link is None:
            raise SinkDown("not connected")
        await write_confirmed(self._link, [frame for _, frame in batch], self.timeout, tls=False)

    def lost(self) -> asyncio.Future[str]:
        assert self._link is not None
        gone: asyncio.Future[str] = self._link.gone
        return gone

    async def close(self) -> None:
        if self._link is not None:
            self._link.fail("closed")
            self._link = None
