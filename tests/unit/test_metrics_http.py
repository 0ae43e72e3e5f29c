"""The metrics endpoint's protocol (pure functions) and its limits, on an in-process event loop."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.metrics import (
    MAX_CONNECTIONS,
    MAX_HEAD,
    REASONS,
    SCRAPE_INTERVAL,
    BrokerMetrics,
    LiveState,
    response,
    route,
)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200),
        (b"GET /metrics HTTP/1.0\r\n\r\n", 200),
        (b"GET /metrics?name[]=x HTTP/1.1\n\n", 200),  # bare LF; a query is ignored
        (b"GET / HTTP/1.1\r\n\r\n", 404),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", 404),
        (b"HEAD /metrics HTTP/1.1\r\n\r\n", 405),
        (b"POST /metrics HTTP/1.1\r\n\r\n", 405),
        (b"GET /metrics\r\n\r\n", 400),  # HTTP/0.9
        (b"GET /metrics HTTP/2.0\r\n\r\n", 400),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
        (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /m\x1betrics HTTP/1.1\r\n\r\n", 400),
        (b"\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\n", None),  # the head is not over yet
        (b"", None),
        (b"G" * MAX_HEAD, None),  # at the limit: could still end
        (b"G" * (MAX_HEAD + 1), 431),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD - 40) + b"\r\n\r\n", 200),
    ],
)
def test_route(head: bytes, status: int | None) -> None:
    assert route(head) == status


@settings(deadline=None)  # a shared machine's pauses are not the parser's
@given(st.binary(max_size=MAX_HEAD + 64))
def test_route_never_raises_and_decides_past_the_limit(head: bytes) -> None:
    status = route(head)
    assert status is None or status in REASONS
    if len(head) > MAX_HEAD:
        assert status is not None


def test_responses_close_and_name_no_version() -> None:
    ok = response(200, b"x 1\n")
    assert ok == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
        b"Content-Length: 4\r\nConnection: close\r\n\r\nx 1\n"
    )
    refused = response(405, b"ignored")
    assert refused.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n") and b"\r\nAllow: GET\r\n" in refused
    assert refused.endswith(b"\r\n\r\n405 Method Not Allowed\n")
    assert all(b"\r\nserver:" not in response(s).lower() for s in REASONS)


async def _exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def test_endpoint_caps_connections_refuses_big_heads_and_stop_closes_all() -> None:
    async def main() -> None:
        metrics = BrokerMetrics(lambda: LiveState(active_by_port={25: 1}))
        await metrics.serve("127.0.0.1", 0)
        assert metrics._server is not None
        port = metrics._server.sockets[0].getsockname()[1]
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CONNECTIONS)]
        await asyncio.sleep(0.1)
        # One more is closed at once, unanswered.
        assert await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n") == b""
        held.pop()[1].close()
        await asyncio.sleep(0.1)
        answer = await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b'deadend_connections_active{port="25"} 1.0' in answer
        # A head past the limit, even one still coming, is refused as soon as the limit is passed.
        answer = await _exchange(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_HEAD)
        assert answer.startswith(b"HTTP/1.1 431 ")
        await metrics.stop()
        for reader, writer in held:
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 2) == b""
            writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    asyncio.run(main())


def test_the_text_is_made_at_most_once_per_interval_and_after_each_request() -> None:
    async def main() -> None:
        metrics = BrokerMetrics(LiveState)
        made: list[float] = []
        real = metrics.exposition

        def counted() -> bytes:
            made.append(asyncio.get_running_loop().time())
            return real()

        metrics.exposition = counted  # type: ignore[method-assign]
        await metrics.serve("127.0.0.1", 0)
        try:
            assert metrics._server is not None
            port = metrics._server.sockets[0].getsockname()[1]
            asked = asyncio.get_running_loop().time()
            request = b"GET /metrics HTTP/1.1\r\n\r\n"
            answers = await asyncio.gather(*(_exchange(port, request) for _ in range(MAX_CONNECTIONS)))
            assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") for a in answers)
            assert len(made) == MAX_CONNECTIONS and made[0] >= asked
            # The k-th text is made no sooner than k intervals after the first request (one late turn
            # on a loaded machine may run closer to the next, never ahead of its own).
            assert all(t >= asked + k * SCRAPE_INTERVAL * 0.9 for k, t in enumerate(made)), made
            # A request followed by the client's end of sending is still answered.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            writer.write_eof()
            assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200 OK\r\n")
            writer.close()
        finally:
            await metrics.stop()

    asyncio.run(main())


def test_a_port_in_use_is_an_oserror() -> None:
    async def main() -> None:
        first = BrokerMetrics(LiveState)
        await first.serve("127.0.0.1", 0)
        assert first._server is not None
        port = first._server.sockets[0].getsockname()[1]
        with pytest.raises(OSError):
            await BrokerMetrics(LiveState).serve("127.0.0.1", port)
        await first.stop()

    asyncio.run(main())
