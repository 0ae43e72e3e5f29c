"""A token bucket, the one rate rule the broker applies: to a session's log lines and API calls, and to
the API calls of all sessions together (pure: the caller passes the time)."""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate  # tokens per second
        self.burst = burst  # the most that may be spent at once
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float) -> bool:
        """Take a token if there is one (the caller drops what gets none)."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def delay(self, now: float) -> float:
        """Take a token, going into debt if need be; the seconds until the debt is paid.

        Callers that wait this long are paced at `rate` in the order they came: with several callers
        that each wait for one call at a time (spinning scripts), each gets an equal share.
        """
        self._refill(now)
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate
