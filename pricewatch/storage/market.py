"""Quotes, admin feeds and stored candles."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Collection

from .. import clock
from ..records import Quote
from .base import Conflict, Database, NotFound, inserted_id

_QUOTE_COLS = "id, from_currency, to_currency, rate, bid, ask, source_time, fetched_at"


def _quote(row) -> Quote:
    return Quote(*row)


class MarketMixin(Database):
    """Store methods for quotes, admin feeds and candles."""

    # quotes ---------------------------------------------------------------------------

    async def add_quote(
        self,
        from_currency: str,
        to_currency: str,
        rate: float,
        bid: float | None,
        ask: float | None,
        source_time: str,
    ) -> Quote:
        fetched_at = clock.now()
        async with self._tx() as db:
            cur = await db.execute(
                "INSERT INTO quotes(from_currency, to_currency, rate, bid, ask, source_time,"
                " fetched_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (from_currency, to_currency, rate, bid, ask, source_time, fetched_at),
            )
            quote_id = inserted_id(cur)
        return Quote(quote_id, from_currency, to_currency, rate, bid, ask, source_time, fetched_at)

    async def quote_span(self) -> tuple[int, int]:
        """(number of quotes, highest id): a consistent view for listing them all."""
        count, top = await self._one("SELECT COUNT(*), MAX(id) FROM quotes")
        return count, top or 0

    async def latest_quote(self) -> Quote | None:
        row = await self._one(f"SELECT {_QUOTE_COLS} FROM quotes ORDER BY id DESC LIMIT 1")
        return _quote(row) if row else None

    async def list_quotes(self, offset: int, limit: int) -> list[Quote]:
        """One page of quotes, newest first."""
        rows = await self._all(
            f"SELECT {_QUOTE_COLS} FROM quotes ORDER BY id DESC LIMIT ? OFFSET ?", (limit, offset)
        )
        return [_quote(r) for r in rows]

    async def iter_quotes(self, upto_id: int, batch: int = 1000) -> AsyncIterator[list[Quote]]:
        """Every quote with id <= `upto_id`, newest first, in batches (keyset pagination:
        constant memory however many rows there are)."""
        last = upto_id + 1
        while True:
            rows = await self._all(
                f"SELECT {_QUOTE_COLS} FROM quotes WHERE id < ? ORDER BY id DESC LIMIT ?",
                (last, batch),
            )
            if not rows:
                return
            yield [_quote(r) for r in rows]
            last = rows[-1][0]

    # extra feeds ----------------------------------------------------------------------

    async def add_feed(self, url: str, created_by: int | None) -> int:
        """Store an extra feed URL. Raises Conflict when it is stored already."""
        try:
            async with self._tx() as db:
                cur = await db.execute(
                    "INSERT INTO feeds(url, created_by, created_at) VALUES (?, ?, ?)",
                    (url, created_by, clock.now()),
                )
                return inserted_id(cur)
        except sqlite3.IntegrityError:
            raise Conflict("feed already exists") from None

    async def remove_feed(self, feed_id: int) -> None:
        async with self._tx() as db:
            cur = await db.execute("DELETE FROM feeds WHERE id = ?", (feed_id,))
            if cur.rowcount == 0:
                raise NotFound("feed not found")

    async def feeds(self) -> list[tuple[int, str]]:
        return [(r[0], r[1]) for r in await self._all("SELECT id, url FROM feeds ORDER BY id")]

    # ---- candles (rows: symbol, timeframe, start, open, high, low, close, volume, trades,
    #      first_ts, last_ts; times in ms)

    async def upsert_candles(self, rows: Collection[tuple]) -> None:
        """Write candles in one transaction (a newer state of a candle replaces the old)."""
        if rows:
            async with self._tx() as db:
                await db.executemany(_UPSERT_CANDLE, rows)

    async def recent_candles(self, symbol: str, timeframe: str, limit: int) -> list[tuple]:
        """The newest `limit` stored candles, oldest first."""
        rows = await self._all(
            f"SELECT {_CANDLE_COLUMNS} FROM candles WHERE symbol = ? AND timeframe = ? "
            "ORDER BY start DESC LIMIT ?",
            (symbol, timeframe, limit),
        )
        rows.reverse()
        return rows

    async def candles_between(
        self, symbol: str, timeframe: str, start: int, end: int, limit: int
    ) -> list[tuple]:
        """The newest `limit` stored candles starting within [start, end], oldest first."""
        rows = await self._all(
            f"SELECT {_CANDLE_COLUMNS} FROM candles WHERE symbol = ? AND timeframe = ? "
            "AND start BETWEEN ? AND ? ORDER BY start DESC LIMIT ?",
            (symbol, timeframe, start, end, limit),
        )
        rows.reverse()
        return rows

    async def prune_candles(
        self,
        timeframe: str,
        keep: int,
        size_ms: int,
        now_ms: int | None = None,
        future_ms: int | None = None,
    ) -> int:
        """Delete candles of `timeframe` older than `keep` periods before each symbol's newest
        (or before `now_ms` if that is earlier), and those starting after `future_ms`."""
        now = 2**62 if now_ms is None else now_ms
        future = 2**62 if future_ms is None else future_ms
        async with self._tx() as db:
            cur = await db.execute(
                "DELETE FROM candles WHERE timeframe = ?1 AND (start > ?4 OR start < "
                "MIN((SELECT MAX(start) FROM candles c WHERE c.symbol = candles.symbol "
                "AND c.timeframe = ?1 AND c.start <= ?4), ?3) - ?2)",
                (timeframe, keep * size_ms, now, future),
            )
            return cur.rowcount


_CANDLE_COLUMNS = (
    "symbol, timeframe, start, open, high, low, close, volume, trades, first_ts, last_ts"
)
_UPSERT_CANDLE = (
    f"INSERT OR REPLACE INTO candles ({_CANDLE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
