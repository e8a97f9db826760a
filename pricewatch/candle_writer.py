"""Candles that survive restarts: changed candles go to SQLite in batches, and come back at start.

Once a second the writer asks the candle book what changed (`CandleBook.changes()`: candles that
closed or opened since, the open candle while it moves, older candles hit by late trades) and
upserts them in one transaction: never a write per trade. At start, before any feed runs, the
newest candles of every ring are loaded back. Each hour, candles older than
`PRICEWATCH_CANDLE_RETENTION` periods of their timeframe are deleted, counted back from the
newest candle or from now, whichever is earlier: a candle stamped in the future (a bogus
trade time, stored before such trades were dropped) can neither make the prune delete every
real candle nor be loaded back (candles starting more than `max_clock_skew` ahead of the
clock are skipped at load and deleted by the prune). A failed write keeps
its rows and retries at the next flush; the final flush runs at shutdown after the feeds
have stopped. Reading older history (`GET /api/v1/ohlc?start=&end=`) goes through `between`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from . import clock
from .ohlc import TIMEFRAMES, CandleBook
from .store import Store, log_failure

log = logging.getLogger(__name__)


class CandleWriter:
    def __init__(
        self,
        book: CandleBook,
        store: Store,
        symbols: tuple[str, ...],
        retention: int,
        interval: float = 1.0,
        prune_every: float = 3600.0,
        max_clock_skew: float = 10.0,
    ):
        self.book = book
        self.max_skew_ms = int(max_clock_skew * 1000)
        self.store = store
        self.symbols = symbols
        self.retention = retention
        self.interval = interval
        self.prune_every = prune_every
        self._pending: dict[tuple[str, str, int], tuple] = {}
        self.written = 0

    async def load(self) -> int:
        """Fill the rings from storage; returns the number of candles loaded."""
        loaded = 0
        future = self._now_ms() + self.max_skew_ms
        for symbol in self.symbols:
            for timeframe in TIMEFRAMES:
                size = self.book.ring_size(timeframe)
                rows = await self.store.recent_candles(symbol, timeframe, size)
                rows = [row for row in rows if row[2] <= future]  # none from the future
                if rows:
                    self.book.seed(symbol, timeframe, rows)
                    loaded += len(rows)
        self.book.mark_flushed()  # what was just loaded need not be written back
        return loaded

    async def flush(self) -> int:
        """Write every candle changed since the last flush; returns how many were written."""
        for row in self.book.changes():
            self._pending[(row[0], row[1], row[2])] = row
        if not self._pending:
            return 0
        rows = list(self._pending.values())
        await self.store.upsert_candles(rows)
        self._pending.clear()
        self.written += len(rows)
        return len(rows)

    @staticmethod
    def _now_ms() -> int:
        return int(clock.now() * 1000)

    async def prune(self) -> int:
        """Delete candles past the retention, counted back from min(newest candle, now),
        and candles from the future; returns how many were deleted."""
        deleted = 0
        now = self._now_ms()
        for timeframe, size_ms in TIMEFRAMES.items():
            deleted += await self.store.prune_candles(
                timeframe, self.retention, size_ms, now_ms=now, future_ms=now + self.max_skew_ms
            )
        if deleted:
            log.info(
                "deleted %d candles past the retention of %d per timeframe", deleted, self.retention
            )
        return deleted

    async def run(self) -> None:
        """Flush every `interval` seconds and prune every `prune_every` until cancelled."""
        next_prune = time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + self.prune_every
                    await self.prune()
            except Exception as exc:  # the DB hiccupped: rows stay pending for the next flush
                log_failure(log, exc, "candle write failed; retrying at the next flush")

    async def between(
        self, symbol: str, timeframe: str, start: int, end: int, limit: int
    ) -> list[tuple]:
        """The newest `limit` candles starting within [start, end], oldest first: stored
        ones, with those in memory (fresher) taking precedence."""
        rows = {
            r[2]: r for r in await self.store.candles_between(symbol, timeframe, start, end, limit)
        }
        rows.update((r[2], r) for r in self.book.between(symbol, timeframe, start, end))
        return [rows[k] for k in sorted(rows)[-limit:]]


CANDLE_WRITER = web.AppKey("candle_writer", CandleWriter)
