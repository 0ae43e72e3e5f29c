"""deadend.ids: UUIDv7 as RFC 9562 lays it out, strictly increasing within a process."""

from __future__ import annotations

import threading
import uuid

from hypothesis import given
from hypothesis import strategies as st

from deadend.ids import uuid7


def test_layout_version_variant_and_time() -> None:
    now_ns = 1_764_000_000_123_456_789
    u = uuid.UUID(uuid7(now_ns))
    assert u.version == 7 and u.variant == uuid.RFC_4122
    assert u.int >> 80 >= now_ns // 1_000_000  # its millisecond, or a later one (a clock that went back)


def test_strictly_increasing_even_in_one_millisecond_and_past_the_counter() -> None:
    ids = [uuid7(1_900_000_000_000_000_000) for _ in range(10_000)]  # the same instant, 10,000 times
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 7 for i in ids)


def test_a_clock_that_goes_back_does_not_reorder() -> None:
    first = uuid7(2_000_000_000_000_000_000)
    assert uuid7(1_000_000_000_000_000_000) > first


def test_unique_across_threads() -> None:
    found: list[str] = []

    def make() -> None:
        found.extend(uuid7() for _ in range(2000))

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(found)) == 8000


@given(st.integers(0, (1 << 48) - 1))
def test_any_millisecond_is_carried(ms: int) -> None:
    u = uuid.UUID(uuid7(ms * 1_000_000 + 999_999))
    assert u.version == 7 and u.variant == uuid.RFC_4122 and u.int >> 80 >= ms
