"""nats://[USER@]HOST:PORT/SUBJECT: NATS JetStream, with publish acknowledgements (nats-py).

Delivered means JetStream acknowledged the message: it is stored in the stream (replicated as the stream
is configured). Each message carries the header `Nats-Msg-Id: <event id>`, so a message sent again after
a lost acknowledgement is recognised by the stream's duplicate window (2 minutes unless the stream says
otherwise) and stored once. Messages of a batch are published back to back and their acknowledgements
awaited together.

The client's own reconnection is off: the sink reconnects itself, with its back-off and its report lines.
When no stream covers the subject, a stream named `stream` (default DEADEND) is created for it; an
existing stream is used as it is, never changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import Sequence
from typing import Any, Final

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from deadend.sinks.event import OutEvent
from deadend.sinks.transport import SinkDown, Transport, describe, read_secret
from deadend.sinks.urls import SinkSpec

MSG_ID: Final = "Nats-Msg-Id"
# The header block nats-py writes for one header: "NATS/1.0\r\n" + "Nats-Msg-Id: <id>\r\n" + "\r\n".
_HEADER_OVERHEAD: Final = len("NATS/1.0\r\n") + len(MSG_ID) + len(": \r\n") + len("\r\n")


def _nats_error(error: BaseException) -> str:
    if isinstance(error, nats.js.errors.APIError):
        return f"JetStream refused: {error.description or error.code}"
    if isinstance(error, nats.errors.NoRespondersError | nats.js.errors.NoStreamResponseError):
        return "no JetStream answered (not enabled on the server, or the stream was deleted)"
    if isinstance(error, nats.errors.NoServersError):
        return "connection refused"
    return describe(error)


class NatsTransport(Transport):
    def __init__(self, spec: SinkSpec, *, stream: str, timeout: float) -> None:
        self.spec = spec
        self.stream = stream
        self.timeout = timeout
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._gone: asyncio.Future[str] | None = None
        self._error: str | None = None

    async def connect(self) -> str | None:
        auth: dict[str, Any] = {}
        password, token = self.spec.file("password_file"), self.spec.file("token_file")
        if password is not None:
            auth = {"user": self.spec.user, "password": await asyncio.to_thread(read_secret, str(password))}
        elif token is not None:
            auth = {"token": await asyncio.to_thread(read_secret, str(token))}
        elif self.spec.user is not None:
            auth = {"user": self.spec.user}
        gone: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._gone = gone
        self._error = None

        async def on_error(error: Exception) -> None:
            self._error = _nats_error(error)

        async def on_gone() -> None:
            if not gone.done():
                gone.set_result(self._error or "the server closed the connection")

        host = f"[{self.spec.host}]" if ":" in self.spec.host else self.spec.host
        # Our own client object, so that a connect that fails half-way (a wrong password after the TCP
        # connect) can still be closed: nats.connect() would leave its transport open.
        nc = Client()
        try:
            await asyncio.wait_for(
                nc.connect(
                    servers=[f"nats://{host}:{self.spec.port}"],
                    name="deadend",
                    allow_reconnect=False,
                    # nats-py retries even a first connect, forever when this is 0: give up at once
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0,
                    connect_timeout=max(1, round(self.timeout)),
                    ping_interval=20,
                    max_outstanding_pings=3,
                    error_cb=on_error,
                    disconnected_cb=on_gone,
                    closed_cb=on_gone,
                    **auth,
                ),
                self.timeout,
            )
        except (nats.errors.Error, OSError, TimeoutError) as e:
            self._nc = nc
            await self.close()
            raise SinkDown(self._error or _nats_error(e)) from None
        self._nc = nc
        js = nc.jetstream(timeout=self.timeout)
        try:
            info = await self._stream(js)
        except (nats.errors.Error, TimeoutError) as e:
            await self.close()
            raise SinkDown(_nats_error(e)) from None
        self._js = js
        created = info.created.astimezone(datetime.UTC).isoformat() if info.created else "?"
        return f"stream {info.config.name} created {created}"

    async def _stream(self, js: JetStreamContext) -> Any:
        try:
            name = await js.find_stream_name_by_subject(self.spec.target)
        except nats.js.errors.NotFoundError:
            return await js.add_stream(name=self.stream, subjects=[self.spec.target])
        return await js.stream_info(name)

    def prepare(self, event: OutEvent) -> bytes | str:
        limit = self._nc.max_payload if self._nc is not None else 1 << 20
        size = len(event.body) + _HEADER_OVERHEAD + len(event.id)
        if size > limit:
            return f"{size} bytes, over the server's max_payload of {limit}"
        return event.body

    async def deliver(self, batch: Sequence[tuple[OutEvent, bytes]]) -> None:
        js, gone = self._js, self._gone
        if js is None or gone is None:
            raise SinkDown("not connected")
        acks: list[asyncio.Future[Any]] = []
        try:
            for event, body in batch:
                headers = {MSG_ID: event.id}
                acks.append(
                    await js.publish_async(self.spec.target, body, wait_stall=self.timeout, headers=headers)
                )
        except (nats.errors.Error, OSError) as e:
            self._abandon(acks)
            raise SinkDown(self._error or _nats_error(e), self._confirmed(acks)) from None
        all_acks: asyncio.Future[Any] = asyncio.gather(*acks, return_exceptions=True)
        await asyncio.wait([all_acks, gone], timeout=self.timeout, return_when="FIRST_COMPLETED")
        confirmed = self._confirmed(acks)
        if confirmed == len(batch):
            return
        self._abandon(acks)
        all_acks.cancel()
        if gone.done():
            raise SinkDown(gone.result(), confirmed)
        failed = acks[confirmed]
        if failed.done() and not failed.cancelled() and failed.exception() is not None:
            error = failed.exception()
            assert error is not None
            raise SinkDown(_nats_error(error), confirmed)
        raise SinkDown(f"no acknowledgement within {self.timeout:g} s", confirmed)

    @staticmethod
    def _confirmed(acks: Sequence[asyncio.Future[Any]]) -> int:
        count = 0
        for ack in acks:
            if not ack.done() or ack.cancelled() or ack.exception() is not None:
                break
            count += 1
        return count

    @staticmethod
    def _abandon(acks: Sequence[asyncio.Future[Any]]) -> None:
        for ack in acks:
            if ack.done() and not ack.cancelled():
                ack.exception()  # retrieved: no "exception never retrieved" noise for the ones we gave up
            else:
                ack.cancel()

    def lost(self) -> asyncio.Future[str]:
        assert self._gone is not None
        return self._gone

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), self.timeout)
