"""Back-off bounds and the OutEvent contract check: pure functions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from deadend.sinks.delivery import Backoff
from deadend.sinks.event import OutEvent, contract_breach
from deadend.sinks.transport import confirmed_frames


def test_backoff_doubles_to_its_cap_with_jitter_and_resets() -> None:
    low = Backoff(0.5, 30.0, rng=lambda: 0.0)
    assert [low.next() for _ in range(8)] == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]
    high = Backoff(0.5, 30.0, rng=lambda: 1.0)
    assert [high.next() for _ in range(8)][-1] == 30.0
    high.reset()
    assert high.next() == 0.5


@given(st.integers(0, 10_000))
def test_backoff_never_exceeds_its_cap(attempts: int) -> None:
    b = Backoff(0.5, 30.0)
    b.attempt = attempts
    assert 0.25 <= b.next() <= 30.0


def test_confirmed_frames() -> None:
    assert confirmed_frames([10, 10, 10], 0) == 0
    assert confirmed_frames([10, 10, 10], 19) == 1
    assert confirmed_frames([10, 10, 10], 20) == 2
    assert confirmed_frames([10, 10, 10], 99) == 3


GOOD = OutEvent("01939a4e-1f2a-7cc1-8d3e-5b9f0a6c7d21", "2026-11-25T16:35:55.259Z", "info", "connect",
                "edge-7", b'{"v":1}')  # fmt: skip


def test_the_contract() -> None:
    assert contract_breach(GOOD) is None
    for field, value in [("id", "a b"), ("time", ""), ("event", "x\ty"), ("sensor", "\u00e9"),
                         ("sensor", "x" * 256), ("level", "notice"), ("body", b"\xff"),
                         ("body", b"a\nb"), ("body", b"a\rb"), ("body", "text")]:  # fmt: skip
        fields = {name: getattr(GOOD, name) for name in GOOD.__slots__}
        fields[field] = value
        assert contract_breach(OutEvent(**fields)) is not None, (field, value)
