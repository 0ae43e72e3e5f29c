"""hpfeeds:// sinks against a real hpfeeds broker, read back by a real subscriber."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

from hpfeeds.asyncio import ClientSession

from tests.sinks.collectors import (
    HpfeedsBroker,
    Reports,
    all_delivered,
    make_event,
    raw_server,
    run,
    sink_set,
    until,
)


def test_delivery_to_a_subscriber_in_order(hpfeeds_broker: HpfeedsBroker) -> None:
    broker = hpfeeds_broker
    reports = Reports()
    events = [make_event(i) for i in range(200)]

    async def main() -> list[tuple[str, str, bytes]]:
        received: list[tuple[str, str, bytes]] = []
        async with ClientSession("127.0.0.1", broker.port, broker.IDENT, broker.SECRET) as subscriber:
            subscriber.subscribe(broker.CHANNEL)
            await asyncio.sleep(0.3)  # the broker has the subscription before anything is published
            sinks = sink_set([broker.url()], reports)
            await sinks.start()
            for event in events:
                sinks.publish(event)
            await until(all_delivered(sinks, len(events)))
            while len(received) < len(events):
                received.append(await asyncio.wait_for(subscriber.read(), 5))
            await until(lambda: sinks.stats()[0].up)
            await sinks.close(2)
        return received

    received = run(main)
    assert [(ident, chan) for ident, chan, _ in received] == [(broker.IDENT, broker.CHANNEL)] * len(events)
    assert [json.loads(data)["id"] for _, _, data in received] == [e.id for e in events]
    [up] = reports.matching(" up")
    assert "(broker test-broker)" in up


def test_a_wrong_secret_is_one_line_and_spooling(hpfeeds_broker: HpfeedsBroker, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong-secret"
    wrong.write_text("not-the-secret\n")
    reports = Reports()

    async def main() -> None:
        sinks = sink_set([hpfeeds_broker.url(secret_file=wrong)], reports, spool_dir=tmp_path / "spool")
        await sinks.start()
        for i in range(10):
            sinks.publish(make_event(i))
        await asyncio.sleep(2.0)
        stats = sinks.stats()[0]
        assert not stats.up and stats.delivered == 0 and stats.queued + stats.spooled == 10
        await sinks.close(0.5)

    run(main)
    [down] = reports.matching(" down: ")
    assert "the broker refused: Authentication failed for deadend-test" in down and down.endswith("spooling")
    assert "not-the-secret" not in " ".join(line for _, line in reports.lines)


def test_a_broker_that_breaks_the_protocol(tmp_path: Path) -> None:
    """An unknown opcode, a length past hpfeeds' limit, a broker that says nothing: one down line,
    retried with back-off, no traceback."""
    secret = tmp_path / "secret"
    secret.write_text("s\n")
    greetings = [b"\x00\x00\x00\x06\x09x", b"\x7f\xff\xff\xff\x03", b"\x00\x00\x00\x05"]
    accepted: list[socket.socket] = []

    def greet(conn: socket.socket) -> bool:
        conn.sendall(greetings[len(accepted) % len(greetings)])
        accepted.append(conn)
        return True  # kept open: the sink must notice on its own

    reports = Reports()

    async def main(port: int) -> None:
        url = f"hpfeeds://i@127.0.0.1:{port}/c?secret_file={secret}"
        sinks = sink_set([url], reports)
        await sinks.start()
        sinks.publish(make_event(0))
        await asyncio.sleep(5.0)  # FAST's timeout (2 s) for the silent one, and a few more attempts
        assert sinks.stats()[0].queued == 1 and sinks.stats()[0].delivered == 0
        await sinks.close(0.2)

    with raw_server(greet) as port:
        run(lambda: main(port))
    [down] = reports.matching(" down: ")
    assert "the broker broke the protocol" in down or "no hpfeeds greeting" in down, down
    assert len(accepted) >= 3
