"""broker.ratelimit: one token bucket, for drops (log lines) and for pacing (API calls)."""

from __future__ import annotations

import pytest

from broker.ratelimit import TokenBucket


def test_take_drops_past_the_burst_and_refills() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5) and not bucket.take(0.5)


def test_delay_paces_spinners_fairly() -> None:
    """Callers that each wait one call at a time share the rate equally (they wait in turn)."""
    bucket = TokenBucket(rate=100.0, burst=1, now=0.0)
    now, served = 0.0, {n: 0 for n in range(4)}
    ready = {n: 0.0 for n in range(4)}
    while now < 2.0:
        n = min(ready, key=lambda k: ready[k])
        now = ready[n]
        ready[n] = now + bucket.delay(now)
        served[n] += 1
    total = sum(served.values())
    assert total == pytest.approx(1 + 100 * 2.0, abs=5)
    assert max(served.values()) - min(served.values()) <= 1  # each spinner got the same share
