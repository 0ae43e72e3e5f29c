"""nats:// sinks against a real nats-server with JetStream."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nats

from tests.sinks.collectors import (
    HOST,
    NatsServer,
    Reports,
    all_delivered,
    first_seen,
    make_event,
    run,
    sink_set,
    until,
)

SUBJECT = "deadend.events"


async def stored(server: NatsServer, **auth: str) -> list[tuple[str, dict[str, object]]]:
    """(Nats-Msg-Id header, body) of every message in the DEADEND stream, in stream order."""
    nc = await nats.connect(server.url, **auth)
    try:
        js = nc.jetstream()
        info = await js.stream_info("DEADEND")
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg("DEADEND", seq)
            assert msg.headers is not None and msg.data is not None
            out.append((msg.headers["Nats-Msg-Id"], json.loads(msg.data)))
        return out
    finally:
        await nc.close()


def test_delivery_creates_the_stream_and_sets_msg_id(nats_factory: Callable[..., NatsServer]) -> None:
    server = nats_factory()
    reports = Reports()
    events = [make_event(i) for i in range(300)]

    async def main() -> list[tuple[str, dict[str, object]]]:
        sinks = sink_set([f"nats://{HOST}:{server.port}/{SUBJECT}"], reports)
        await sinks.start()
        for event in events:
            sinks.publish(event)
        await until(all_delivered(sinks, len(events)))
        await until(lambda: sinks.stats()[0].up)
        await sinks.close(5)
        return await stored(server)

    messages = run(main)
    assert [ident for ident, _ in messages] == [e.id for e in events]
    assert all(body["id"] == ident for ident, body in messages)
    [up] = reports.matching(" up")
    assert "(stream DEADEND created " in up


def test_outage_mid_stream_every_event_stored_once(
    nats_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    server = nats_factory()
    reports = Reports()
    events = [make_event(i) for i in range(2500)]

    async def main() -> list[tuple[str, dict[str, object]]]:
        sinks = sink_set([f"nats://{HOST}:{server.port}/{SUBJECT}"], reports, spool_dir=tmp_path / "spool")
        await sinks.start()
        loop = asyncio.get_running_loop()
        stopped = restarted = 0.0
        for i, event in enumerate(events):
            sinks.publish(event)
            if i % 10 == 9:
                await asyncio.sleep(0.025)
            if i == 500:
                await loop.run_in_executor(None, server.stop)
                stopped = loop.time()
            if stopped and not restarted and loop.time() - stopped >= 5.0:
                assert reports.matching(" down: ")
                await loop.run_in_executor(None, server.start)
                restarted = loop.time()
        assert restarted, "the stream ended before the outage did"
        await until(all_delivered(sinks, len(events)), 20)
        await sinks.close(5)
        return await stored(server)

    messages = run(main)
    ids = [ident for ident, _ in messages]
    assert first_seen(ids) == [e.id for e in events]
    assert len(ids) == len(events)  # JetStream's duplicate window took out any re-send
    assert len(reports.matching(" down: ")) == 1, reports.lines
    assert len(reports.matching(" up again after ")) == 1, reports.lines


def test_max_payload_exceeded_is_a_counted_drop(nats_factory: Callable[..., NatsServer]) -> None:
    server = nats_factory("max_payload: 2048\n")
    reports = Reports()
    events = [make_event(0), make_event(1, size=3000), make_event(2)]

    async def main() -> list[tuple[str, dict[str, object]]]:
        sinks = sink_set([f"nats://{HOST}:{server.port}/{SUBJECT}"], reports)
        await sinks.start()
        for event in events:
            sinks.publish(event)
        await until(all_delivered(sinks, 2))
        stats = sinks.stats()[0]
        assert stats.dropped == 1 and stats.queued == 0
        await sinks.close(2)
        return await stored(server)

    messages = run(main)
    assert [body["n"] for _, body in messages] == [0, 2]
    [line] = reports.matching("dropped:")
    assert events[1].id in line and "over the server's max_payload of 2048" in line
    assert not reports.matching(" down: ")  # the connection survived: nothing oversize was sent


def test_password_from_a_file_and_a_wrong_one(
    nats_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    users = '{user: alice, password: "alice-pw"}, {user: reader, password: "reader-pw"}'
    server = nats_factory(f"authorization {{ users = [ {users} ] }}\n")
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("alice-pw\n")
    bad.write_text("guess\n")
    reports = Reports()

    async def main() -> list[tuple[str, dict[str, object]]]:
        base = f"nats://alice@{HOST}:{server.port}"
        right = sink_set([f"{base}/{SUBJECT}?password_file={good}"], reports)
        wrong = sink_set([f"{base}/other.subject?password_file={bad}"], reports)
        for sinks in (right, wrong):
            await sinks.start()
            sinks.publish(make_event(7))
        await until(all_delivered(right, 1))
        await asyncio.sleep(1.0)
        assert wrong.stats()[0].delivered == 0 and wrong.stats()[0].queued == 1
        for sinks in (right, wrong):
            await sinks.close(1)
        return await stored(server, user="reader", password="reader-pw")

    messages = run(main)
    assert [body["n"] for _, body in messages] == [7]
    [down] = reports.matching(" down: ")
    assert "other.subject" in down and "authorization" in down.lower(), down
    assert "guess" not in " ".join(line for _, line in reports.lines)


def test_a_server_that_lost_its_stream_gets_it_back(nats_factory: Callable[..., NatsServer]) -> None:
    """The collector comes back with a different identity: its JetStream storage was wiped."""
    server = nats_factory()
    reports = Reports()

    async def main() -> list[tuple[str, dict[str, object]]]:
        sinks = sink_set([f"nats://{HOST}:{server.port}/{SUBJECT}"], reports)
        await sinks.start()
        sinks.publish(make_event(0))
        await until(all_delivered(sinks, 1))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, server.stop)
        shutil.rmtree(server.folder / "js")
        await asyncio.sleep(1.1)  # the stream's creation time, in whole seconds, must differ
        await loop.run_in_executor(None, server.start)
        sinks.publish(make_event(1))
        await until(all_delivered(sinks, 2))
        await sinks.close(2)
        return await stored(server)

    messages = run(main)
    assert [body["n"] for _, body in messages] == [1]
    changed = reports.matching("the collector changed")
    assert len(changed) == 1 and "stream DEADEND created" in changed[0], reports.lines
