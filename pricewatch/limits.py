"""Rate limits with bounded memory: a token bucket per connection, a sliding count per key.

Both are pure and clock-injected (monotonic seconds), so tests drive them without sleeping.
"""

from __future__ import annotations

import time
from collections import deque

# What one websocket connection may send (docs/limits.md): frames of any kind (text,
# binary, continuation, ping, pong) per second, with bursts of this many...
WS_RATE = 20.0
WS_BURST = 40
WS_MAX_MESSAGE = 64 * 1024  # ...and bytes in one message (1009 from here up)


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; `take()` is False when empty."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float | None = None):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic() if now is None else now

    def take(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class SlidingWindow:
    """At most `limit` hits per `window` seconds for each key.

    `check(key)` tells how long until the next hit is allowed (None: now); `hit(key)` records
    one. Keys that fall quiet are forgotten, and past `max_keys` the least recently hit keys
    are evicted first, so a spray of keys costs bounded memory and never frees an active one.
    """

    def __init__(self, limit: int, window: float, max_keys: int = 50_000):
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._hits: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float] | None:
        hits = self._hits.get(key)
        if hits is None:
            return None
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        if not hits:
            del self._hits[key]
            return None
        return hits

    def check(self, key: str, now: float | None = None) -> int | None:
        """Whole seconds (>= 1) until `key` may hit again, or None when it may now."""
        now = time.monotonic() if now is None else now
        hits = self._recent(key, now)
        if hits is None or len(hits) < self.limit:
            return None
        wait = hits[-self.limit] + self.window - now
        return max(1, int(wait + 0.999))

    def count(self, key: str, now: float | None = None) -> int:
        """Hits of `key` inside the window."""
        hits = self._recent(key, time.monotonic() if now is None else now)
        return len(hits) if hits else 0

    def forget(self, key: str) -> None:
        self._hits.pop(key, None)

    def hit(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        hits = self._hits.pop(key, None) or deque()
        hits.append(now)
        self._hits[key] = hits  # re-inserted last: the dict is ordered by last hit
        while len(self._hits) > self.max_keys:  # forget the key quiet for longest
            del self._hits[next(iter(self._hits))]

    def take(self, key: str, now: float | None = None) -> int | None:
        """`check` then, when allowed, `hit`: None when the hit was taken, else the wait."""
        wait = self.check(key, now)
        if wait is None:
            self.hit(key, now)
        return wait

    def __len__(self) -> int:
        return len(self._hits)
