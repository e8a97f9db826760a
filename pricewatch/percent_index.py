"""In-memory matching engine for percent alerts (the tick path's second alert step).

A percent alert ``(id, symbol, window, percent P, direction)`` triggers on the first trade
whose price is at least P % above the lowest (``up``) or below the highest (``down``) trade
price inside the trailing window (``any``: either). Like ``alert_index``, matching removes
what it returns, everything is synchronous standard library, and alerts.py keeps it in step
with the database.

The window, exactly: trade time in whole seconds. At a trade in second S (epoch seconds,
``time_ms // 1000``) a window of W seconds holds the trades of seconds S-W+1 .. S, the trade
itself included. Time never runs backwards here: an older trade (backfill) counts as one in
the newest second seen. A window holds the trades seen since its first alert was added, and
the symbol's last trade before that (groups are made on demand and then kept, at most one
per symbol and window); after a restart windows start empty in the same way.

Layout, per (symbol, window) (one ``_Group``):

* two monotonic deques of ``(second, price)``: ``lows`` with increasing prices (its head is
  the window's minimum), ``highs`` with decreasing prices (head: maximum). Each second keeps
  at most one entry per deque, so a deque holds at most W entries however many trades come,
  and each trade costs amortised O(1).
* the alerts as two sorted sides (``up`` and ``down``), parallel ``array('d')`` keys
  ``-percent`` and ``array('q')`` ids ordered by (key, id): the alerts a move of M % crosses
  (``percent <= M``) are a suffix, cut off in O(log n + k). An ``any`` alert sits in both
  sides; when one side triggers it, it is taken out of the other.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from typing import Protocol

__all__ = ["PERCENT_DIRECTIONS", "WINDOWS", "PercentIndex"]

WINDOWS: dict[str, int] = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600, "4h": 14400, "1d": 86400}
UP, DOWN, ANY = "up", "down", "any"
PERCENT_DIRECTIONS = (UP, DOWN, ANY)
# The smallest move an alert may watch (the API's bound; a move of 1e-9 % is every trade).
MIN_PERCENT = 0.01
# A move is compared with a tolerance: (105 / 100 - 1) * 100 must count as 5 %.
_EPS = 1e-9


def _insert(keys: array, ids: array, key: float, alert_id: int) -> None:
    lo = bisect_left(keys, key)
    pos = bisect_left(ids, alert_id, lo, bisect_right(keys, key, lo))
    keys.insert(pos, key)
    ids.insert(pos, alert_id)


def _delete(keys: array, ids: array, key: float, alert_id: int) -> None:
    lo = bisect_left(keys, key)
    pos = bisect_left(ids, alert_id, lo, bisect_right(keys, key, lo))
    if pos < len(ids) and ids[pos] == alert_id:
        del keys[pos]
        del ids[pos]


def _take(keys: array, ids: array, move: float) -> list[int]:
    """Cut the alerts with percent <= move (key >= -move) off the end; return their ids."""
    cut = bisect_left(keys, -move - _EPS)
    taken = ids[cut:].tolist()
    del keys[cut:]
    del ids[cut:]
    return taken


class _Trade(Protocol):
    """A trade as `PercentIndex.last` keeps it (feeds.Tick is one)."""

    @property
    def time(self) -> float: ...  # ms since epoch UTC

    @property
    def price(self) -> float: ...


class _Group:
    __slots__ = (
        "seconds",
        "lows",
        "highs",
        "last",
        "up_keys",
        "up_ids",
        "down_keys",
        "down_ids",
        "alerts",
    )

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds
        self.lows: deque[tuple[int, float]] = deque()
        self.highs: deque[tuple[int, float]] = deque()
        self.last = -1  # the newest second seen
        self.up_keys, self.up_ids = array("d"), array("q")
        self.down_keys, self.down_ids = array("d"), array("q")
        self.alerts: dict[int, tuple[float, str]] = {}  # id -> (percent, direction)

    def feed(self, second: int, price: float) -> None:
        """Add a trade to the window and drop what fell out of it."""
        if second < self.last:
            second = self.last
        self.last = second
        lows, highs = self.lows, self.highs
        while lows and lows[-1][1] >= price:
            lows.pop()
        if not lows or lows[-1][0] != second:
            lows.append((second, price))
        while highs and highs[-1][1] <= price:
            highs.pop()
        if not highs or highs[-1][0] != second:
            highs.append((second, price))
        oldest = second - self.seconds  # entries of this second or before are outside
        while lows[0][0] <= oldest:
            lows.popleft()
        while highs[0][0] <= oldest:
            highs.popleft()

    def match(self, price: float) -> list[tuple[int, float, str]]:
        hits: list[tuple[int, float, str]] = []
        if self.up_keys:
            low = self.lows[0][1]
            move = (price / low - 1.0) * 100.0 if low > 0 else 0.0
            if move + _EPS >= -self.up_keys[-1]:
                for alert_id in _take(self.up_keys, self.up_ids, move):
                    hits.append(self._taken(alert_id, DOWN))
        if self.down_keys:
            high = self.highs[0][1]
            move = (1.0 - price / high) * 100.0 if high > 0 else 0.0
            if move + _EPS >= -self.down_keys[-1]:
                for alert_id in _take(self.down_keys, self.down_ids, move):
                    hits.append(self._taken(alert_id, UP))
        return hits

    def _taken(self, alert_id: int, other: str) -> tuple[int, float, str]:
        percent, direction = self.alerts.pop(alert_id)
        if direction == ANY:  # it also sits on the other side
            if other == UP:
                _delete(self.up_keys, self.up_ids, -percent, alert_id)
            else:
                _delete(self.down_keys, self.down_ids, -percent, alert_id)
        return alert_id, percent, direction

    def add(self, alert_id: int, percent: float, direction: str) -> None:
        self.alerts[alert_id] = (percent, direction)
        if direction in (UP, ANY):
            _insert(self.up_keys, self.up_ids, -percent, alert_id)
        if direction in (DOWN, ANY):
            _insert(self.down_keys, self.down_ids, -percent, alert_id)

    def remove(self, alert_id: int) -> bool:
        entry = self.alerts.pop(alert_id, None)
        if entry is None:
            return False
        percent, direction = entry
        if direction in (UP, ANY):
            _delete(self.up_keys, self.up_ids, -percent, alert_id)
        if direction in (DOWN, ANY):
            _delete(self.down_keys, self.down_ids, -percent, alert_id)
        return True


class PercentIndex:
    """Live percent alerts, grouped per (symbol, window); see the module docstring."""

    __slots__ = ("groups", "_where", "last", "_recent")

    def __init__(self) -> None:
        self.groups: dict[str, list[tuple[str, _Group]]] = {}  # symbol -> [(window, group)]
        self._where: dict[int, _Group] = {}  # alert id -> its group
        # symbol -> its last trade (anything with `time` in ms and `price`), from which a new
        # window starts. The caller keeps it for symbols without a group (see on_trade).
        self.last: dict[str, _Trade] = {}
        self._recent: dict[str, tuple[int, float]] = {}  # the same, once it has a group

    def on_trade(
        self, symbol: str, time_ms: float, price: float
    ) -> list[tuple[int, float, str, str]]:
        """Feed a trade to the symbol's windows; return ``(id, percent, direction, window)``
        of every alert it triggers (removed from the index). For a symbol not in `groups`
        the caller may skip this and only set ``last[symbol]`` (the tick path does)."""
        groups = self.groups.get(symbol)
        if groups is None:
            return []
        second = int(time_ms // 1000)
        self._recent[symbol] = (second, price)
        hits = []
        for window, group in groups:
            group.feed(second, price)
            if group.alerts:
                for alert_id, percent, direction in group.match(price):
                    del self._where[alert_id]
                    hits.append((alert_id, percent, direction, window))
        return hits

    def add(self, alert_id: int, symbol: str, window: str, percent: float, direction: str) -> None:
        """Add (or replace) an alert. Raises ValueError for an unknown window or direction,
        or a percent outside (0, 100]."""
        seconds = WINDOWS.get(window)
        if seconds is None:
            raise ValueError(f"window must be one of {', '.join(WINDOWS)}, not {window!r}")
        if direction not in PERCENT_DIRECTIONS:
            raise ValueError(f"direction must be up, down or any, not {direction!r}")
        if not 0.0 < percent <= 100.0:
            raise ValueError(f"percent must be in (0, 100], not {percent!r}")
        self.remove(alert_id)
        groups = self.groups.setdefault(symbol, [])
        for name, group in groups:  # noqa: B007 - the group found is used after the loop
            if name == window:
                break
        else:
            group = _Group(seconds)
            groups.append((window, group))
            recent = self._recent.get(symbol)
            last = self.last.get(symbol)
            if recent is not None:
                group.feed(*recent)
            elif last is not None:
                group.feed(int(last.time // 1000), last.price)
        group.add(alert_id, float(percent), direction)
        self._where[alert_id] = group

    def remove(self, alert_id: int) -> bool:
        group = self._where.pop(alert_id, None)
        return group is not None and group.remove(alert_id)

    def window_range(self, symbol: str, window: str) -> tuple[float, float] | None:
        """(lowest, highest) trade price in the window now, None before any trade."""
        for name, group in self.groups.get(symbol, ()):
            if name == window and group.lows:
                return group.lows[0][1], group.highs[0][1]
        return None

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, alert_id: object) -> bool:
        return alert_id in self._where
