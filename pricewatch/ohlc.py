"""OHLC candles built from trades, kept in bounded in-memory rings.

Pure in-memory code on the tick path: `CandleBook.add` runs for every trade, so it allocates
only when a trade opens a new candle and never does I/O.

Rules (the tests pin each of them):

- A trade belongs to the candle starting at ``ts_ms - ts_ms % tf`` (UTC boundaries from the
  *trade* time; a trade exactly on a boundary opens the new candle). Empty intervals make no
  candle.
- Each (symbol, timeframe) ring keeps the newest ``size`` candles by start time.
- A late trade still lands in its candle if the ring holds it, or creates it in order if its
  interval is empty; when that insertion overflows a full ring the oldest candle goes. A trade
  older than the oldest candle of a *full* ring is dropped and counted (a ring that is not
  full yet accepts any older trade).
- Open/close follow trade time, not arrival: a trade with a time strictly earlier than the
  candle's first trade becomes the open; one with a time later than *or equal to* the
  candle's last trade becomes the close. So among trades with the same time the first to
  arrive is the open and the last to arrive is the close.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Mapping
from itertools import islice
from operator import attrgetter

TIMEFRAMES: dict[str, int] = {
    "1s": 1_000,
    "1m": 60_000,
    "5m": 300_000,
    "15m": 900_000,
    "1h": 3_600_000,
    "4h": 14_400_000,
    "1d": 86_400_000,
}
"""Supported timeframe names -> length in milliseconds, shortest first."""

DAY_OF_MINUTES = {"1m": 1440}  # ring sizes for the rolling 24 h figures


def parse_timeframe(name: str) -> int:
    """Return the length in ms of timeframe `name` (e.g. ``"1m"``); raise ValueError if unknown."""
    try:
        return TIMEFRAMES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown timeframe {name!r}; expected one of {', '.join(TIMEFRAMES)}"
        ) from None


def _iso(ms: float) -> str:
    sec, msec = divmod(int(ms), 1000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    # Every standard timeframe starts on a whole second; only custom ones need the millis.
    return f"{text}.{msec:03d}Z" if msec else text + "Z"


class _Candle:
    __slots__ = (
        "start",
        "open",
        "high",
        "low",
        "close",
        "volume",
        "trades",
        "first_ts",
        "last_ts",
        "iso",
    )

    def __init__(self, start: float, price: float, qty: float, ts_ms: int, count: int = 1) -> None:
        self.start = start
        self.open = self.high = self.low = self.close = price
        self.volume = qty
        self.trades = count
        self.first_ts = self.last_ts = ts_ms
        self.iso: str | None = None  # formatted on first read, then reused

    def add(self, price: float, qty: float, ts_ms: int, count: int = 1) -> None:
        # Same logic as the inlined copy in CandleBook.add; keep them in step.
        if price > self.high:
            self.high = price
        elif price < self.low:
            self.low = price
        self.volume += qty
        self.trades += count
        if ts_ms >= self.last_ts:
            self.close = price
            self.last_ts = ts_ms
        elif ts_ms < self.first_ts:
            self.open = price
            self.first_ts = ts_ms

    def as_dict(self) -> dict:
        iso = self.iso
        if iso is None:
            iso = self.iso = _iso(self.start)
        return {
            "timestamp": iso,
            "open": self.open,
            "high": self.high,
            "low": self.low,
            "close": self.close,
            # A running float sum drifts (0.6285499999999999); Binance quotes 8 decimals.
            "volume": round(self.volume, 8),
            "trades": self.trades,
        }


# Stands in for "no candle yet" so the hot path needs no None check: no start equals -inf
# and every start is greater, so the first trade takes the new-candle branch.
_NO_CANDLE = _Candle(float("-inf"), 0.0, 0.0, 0)
_START = attrgetter("start")


def candle_dict(row: tuple) -> dict:
    """A storage row as the wire's candle object (the same as `_Candle.as_dict`)."""
    return {
        "timestamp": _iso(row[2]),
        "open": row[3],
        "high": row[4],
        "low": row[5],
        "close": row[6],
        "volume": round(row[7], 8),
        "trades": row[8],
    }


def _row(symbol: str, timeframe: str, c: _Candle) -> tuple:
    return (
        symbol,
        timeframe,
        int(c.start),
        c.open,
        c.high,
        c.low,
        c.close,
        c.volume,
        c.trades,
        c.first_ts,
        c.last_ts,
    )


class _Ring:
    __slots__ = ("name", "tf", "candles", "last", "dropped", "flushed", "touched")

    def __init__(self, name: str, tf: int, size: int) -> None:
        self.name = name
        self.tf = tf
        self.candles: deque[_Candle] = deque(maxlen=size)  # sorted by start, oldest first
        self.last = _NO_CANDLE  # == candles[-1] once there is one
        self.dropped = 0
        # For `CandleBook.changes()`: the newest candle's (start, trades) when last reported,
        # and older candles changed since (late trades, seeded history).
        self.flushed: tuple[float, int] = (float("-inf"), 0)
        self.touched: set[_Candle] = set()

    def add_late(self, start: int, price: float, qty: float, ts_ms: int, count: int = 1) -> bool:
        """Put a trade whose candle is older than the newest one; False if it was dropped."""
        candles = self.candles
        # start < candles[-1].start, so i is a valid index.
        i = bisect_left(candles, start, key=_START)
        candle = candles[i]
        if candle.start == start:
            candle.add(price, qty, ts_ms, count)
            self.touched.add(candle)
            return True
        if len(candles) == candles.maxlen:
            if i == 0:
                self.dropped += 1
                return False
            # Make room first: insert() into a full bounded deque raises.
            candles.popleft()
            i -= 1
        candle = _Candle(start, price, qty, ts_ms, count)
        candles.insert(i, candle)
        self.touched.add(candle)
        return True

    def insert(self, candle: _Candle) -> None:
        """Put a candle older than the newest one in its place (the oldest goes if full)."""
        candles = self.candles
        i = bisect_left(candles, candle.start, key=_START)
        if len(candles) == candles.maxlen:
            if i == 0:
                self.dropped += 1
                return
            candles.popleft()
            i -= 1
        candles.insert(i, candle)

    def find(self, start: int) -> _Candle | None:
        if self.last.start == start:
            return self.last
        candles = self.candles
        i = bisect_left(candles, start, key=_START)
        if i < len(candles) and candles[i].start == start:
            return candles[i]
        return None


class CandleBook:
    """Candles for every symbol seen and every configured timeframe.

    Not thread-safe; meant to be driven from the event loop's tick path.
    """

    def __init__(
        self,
        timeframes: Mapping[str, int] = TIMEFRAMES,
        size: int = 1000,
        sizes: Mapping[str, int] | None = None,
    ) -> None:
        """Raise ValueError unless `size` >= 1 and each timeframe is a positive int of ms.

        `sizes` overrides `size` per timeframe (the market keeps 1440 1m candles, a day, for
        the rolling 24 h figures: `DAY_OF_MINUTES`)."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not timeframes:
            raise ValueError("at least one timeframe is required")
        for name, tf in timeframes.items():
            if isinstance(tf, bool) or not isinstance(tf, int) or tf < 1:
                raise ValueError(f"timeframe {name!r} must be a positive int of ms, got {tf!r}")
        self._timeframes = dict(timeframes)
        self._index = {name: i for i, name in enumerate(self._timeframes)}
        self._size = size
        self._sizes = {name: size for name in self._timeframes}
        self._sizes.update(sizes or {})
        self._rings: dict[str, tuple[_Ring, ...]] = {}
        self._rolling: dict[tuple[str, str], tuple[float, tuple | None]] = {}
        self._dropped: dict[str, int] = {}

    @property
    def size(self) -> int:
        """Maximum number of candles kept per (symbol, timeframe)."""
        return self._size

    def rings(self) -> dict[str, tuple[int, int]]:
        """Every timeframe's (length in ms, ring size)."""
        return {name: (tf, self._sizes[name]) for name, tf in self._timeframes.items()}

    def ring_size(self, timeframe: str) -> int:
        """How many candles of `timeframe` a ring keeps."""
        return self._sizes[timeframe]

    @property
    def timeframes(self) -> dict[str, int]:
        """A copy of the configured timeframes (name -> ms)."""
        return dict(self._timeframes)

    def add(self, symbol: str, price: float, qty: float, ts_ms: int, count: int = 1) -> None:
        """Fold one trade (trade time `ts_ms`, ms since the epoch) into every timeframe;
        `count` > 1 for an aggregate of several trades at one price and time."""
        rings = self._rings.get(symbol)
        if rings is None:
            rings = self._new_symbol(symbol)
        dropped = late = False
        for ring in rings:
            start = ts_ms - ts_ms % ring.tf
            c = ring.last
            if start == c.start:
                # Hot path: the open candle. Inlined _Candle.add (saves a call per timeframe).
                if price > c.high:
                    c.high = price
                elif price < c.low:
                    c.low = price
                c.volume += qty
                c.trades += count
                if ts_ms >= c.last_ts:
                    c.close = price
                    c.last_ts = ts_ms
                elif ts_ms < c.first_ts:
                    c.open = price
                    c.first_ts = ts_ms
            elif start > c.start:
                c = ring.last = _Candle(start, price, qty, ts_ms, count)
                ring.candles.append(c)  # the bounded deque evicts the oldest itself
            elif not ring.add_late(start, price, qty, ts_ms, count):
                dropped = True
            else:
                late = True
        if dropped:
            self._dropped[symbol] += 1
        if late and self._rolling:
            self._rolling.pop((symbol, "1m"), None)  # a closed minute of the day changed

    def merge_bar(
        self,
        symbol: str,
        start: int,
        end: int,
        open_: float,
        high: float,
        low: float,
        close: float,
        volume: float,
        trades: int,
    ) -> None:
        """Fold a summary of trades in [start, end] (a 1m kline filling a gap) into every
        timeframe at least as long as the bar; shorter ones (1s) cannot be known from it and
        are left alone. A candle the bar opens starts at `open_`; one it extends takes its
        high/low, adds its volume and trades, and closes at `close` if the bar is its newest."""
        rings = self._rings.get(symbol)
        if rings is None:
            rings = self._new_symbol(symbol)
        for ring in rings:
            if ring.tf < end - start + 1:
                continue
            cstart = start - start % ring.tf
            candle = ring.find(cstart)
            if candle is None:
                candle = _Candle(cstart, open_, volume, start, trades)
                candle.high, candle.low, candle.close, candle.last_ts = high, low, close, end
                if cstart > ring.last.start:
                    ring.candles.append(candle)
                    ring.last = candle
                else:
                    ring.insert(candle)
            else:
                candle.high = max(candle.high, high)
                candle.low = min(candle.low, low)
                candle.volume += volume
                candle.trades += trades
                if end >= candle.last_ts:
                    candle.close, candle.last_ts = close, end
                if start < candle.first_ts:
                    candle.open, candle.first_ts = open_, start
            ring.touched.add(candle)
        self._rolling.clear()

    def candles(self, symbol: str, timeframe: str, limit: int = 100) -> list[dict]:
        """The newest `limit` candles, oldest first (the last may still be open).

        Unknown symbol or limit < 1 -> []; unknown timeframe -> ValueError.
        """
        ring = self._ring(symbol, timeframe)
        if ring is None or limit < 1:
            return []
        newest = [c.as_dict() for c in islice(reversed(ring.candles), limit)]
        newest.reverse()
        return newest

    def candle_at(self, symbol: str, timeframe: str, ts_ms: int) -> dict | None:
        """The candle containing trade time `ts_ms`, or None if there is none (or unknown symbol).

        Raises ValueError for an unknown timeframe.
        """
        ring = self._ring(symbol, timeframe)
        if ring is None:
            return None
        candle = ring.find(ts_ms - ts_ms % ring.tf)
        return None if candle is None else candle.as_dict()

    def rolling(
        self, symbol: str, span_ms: int = 86_400_000, timeframe: str = "1m"
    ) -> tuple[float, float, float, float] | None:
        """(open, high, low, volume) over the `timeframe` candles of the trailing `span_ms`
        that ends with the newest candle, or None without candles. The closed part is
        summed once per new candle and cached; each call adds only the open candle."""
        ring = self._ring(symbol, timeframe)
        if ring is None or ring.last is _NO_CANDLE:
            return None
        last = ring.last
        cached = self._rolling.get((symbol, timeframe))
        if cached is None or cached[0] != last.start:
            first_start = last.start - span_ms + ring.tf
            closed = [c for c in ring.candles if first_start <= c.start < last.start]
            summary = None
            if closed:
                summary = (
                    closed[0].open,
                    max(c.high for c in closed),
                    min(c.low for c in closed),
                    sum(c.volume for c in closed),
                )
            cached = self._rolling[(symbol, timeframe)] = (last.start, summary)
        summary = cached[1]
        if summary is None:
            return (last.open, last.high, last.low, last.volume)
        return (
            summary[0],
            max(summary[1], last.high),
            min(summary[2], last.low),
            summary[3] + last.volume,
        )

    def between(self, symbol: str, timeframe: str, start: int, end: int) -> list[tuple]:
        """Candles in memory starting within [start, end], oldest first, as storage rows."""
        ring = self._ring(symbol, timeframe)
        if ring is None:
            return []
        candles = ring.candles
        i = bisect_left(candles, start, key=_START)
        out = []
        for c in islice(candles, i, None):
            if c.start > end:
                break
            out.append(_row(symbol, ring.name, c))
        return out

    def changes(self) -> list[tuple]:
        """Storage rows of every candle new or changed since the last call (the newest of
        each ring included while it is open). Cheap: O(rings + changed candles)."""
        out: list[tuple] = []
        for symbol, rings in self._rings.items():
            for ring in rings:
                last = ring.last
                if last is _NO_CANDLE:
                    continue
                mark_start, mark_trades = ring.flushed
                if (last.start, last.trades) != (mark_start, mark_trades):
                    for c in reversed(ring.candles):  # newest first, down to the mark
                        if c.start < mark_start:
                            break
                        ring.touched.add(c)
                    ring.flushed = (last.start, last.trades)
                if ring.touched:
                    out.extend(_row(symbol, ring.name, c) for c in ring.touched)
                    ring.touched.clear()
        return out

    def seed(
        self,
        symbol: str,
        timeframe: str,
        rows: list[tuple],
        replace_from: float | None = None,
        touch: bool = False,
    ) -> None:
        """Put stored or fetched candles (storage rows) into a ring. Ring candles starting at
        or after `replace_from`, and any of the same start as a row, are replaced. The ring
        keeps its newest candles. `touch`: report the rows in the next `changes()`."""
        ring = self._ring(symbol, timeframe)
        if ring is None:
            self._new_symbol(symbol)
            ring = self._ring(symbol, timeframe)
        assert ring is not None
        merged = {
            c.start: c for c in ring.candles if replace_from is None or c.start < replace_from
        }
        fresh = []
        for row in rows:
            candle = _Candle(row[2], row[3], 0.0, row[9])
            candle.high, candle.low, candle.close = row[4], row[5], row[6]
            candle.volume, candle.trades, candle.last_ts = row[7], row[8], row[10]
            merged[candle.start] = candle
            fresh.append(candle)
        size = ring.candles.maxlen
        assert size is not None  # every ring has one
        newest = sorted(merged.values(), key=_START)[-size:]
        ring.candles.clear()
        ring.candles.extend(newest)
        ring.last = newest[-1] if newest else _NO_CANDLE
        kept = set(newest)
        ring.touched.intersection_update(kept)
        if touch:
            ring.touched.update(c for c in fresh if c in kept)
        self._rolling.pop((symbol, timeframe), None)

    def put(self, symbol: str, timeframe: str, row: tuple) -> None:
        """One candle's state (a storage row) made the ring's: the newest candle is updated in
        place or a newer one appended (a cluster edge, many times a second: O(1)); an older
        one goes through `seed`."""
        ring = self._ring(symbol, timeframe)
        if ring is None or row[2] < ring.last.start:
            self.seed(symbol, timeframe, [row])
            return
        candle = ring.last
        if row[2] > candle.start:
            candle = _Candle(row[2], row[3], 0.0, row[9])
            ring.candles.append(candle)  # the bounded deque evicts the oldest itself
            ring.last = candle
        candle.open, candle.high, candle.low, candle.close = row[3], row[4], row[5], row[6]
        candle.volume, candle.trades = row[7], row[8]
        candle.first_ts, candle.last_ts = row[9], row[10]
        # The rolling 24 h cache holds only closed candles, keyed by the newest's start.

    def mark_flushed(self) -> None:
        """Forget pending changes (after seeding from storage: nothing new to write)."""
        for rings in self._rings.values():
            for ring in rings:
                ring.touched.clear()
                ring.flushed = (ring.last.start, ring.last.trades)

    def stats(self) -> dict:
        """Counters: ``dropped`` = per symbol, trades dropped by at least one timeframe's ring;
        ``dropped_by_timeframe`` = per symbol and timeframe."""
        return {
            "dropped": dict(self._dropped),
            "dropped_by_timeframe": {
                symbol: {ring.name: ring.dropped for ring in rings}
                for symbol, rings in self._rings.items()
            },
        }

    def _new_symbol(self, symbol: str) -> tuple[_Ring, ...]:
        rings = tuple(
            _Ring(name, tf, self._sizes.get(name, self._size))
            for name, tf in self._timeframes.items()
        )
        self._rings[symbol] = rings
        self._dropped[symbol] = 0
        return rings

    def _ring(self, symbol: str, timeframe: str) -> _Ring | None:
        try:
            i = self._index[timeframe]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown timeframe {timeframe!r}; expected one of {', '.join(self._index)}"
            ) from None
        rings = self._rings.get(symbol)
        return None if rings is None else rings[i]
