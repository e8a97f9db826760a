"""Candle history at start: every ring filled from Binance REST klines, meeting the live
stream without counting a trade twice or losing one.

The seam is the *cut*: the start of the current minute when history is fetched.
- Everything before the cut comes from klines: closed klines of each timeframe, and for a
  timeframe whose open candle began before the cut (5m ... 1d) a partial candle summed from
  the 1m klines between its start and the cut.
- Everything from the cut on comes from trades: the trade sequencer is told the last trade id
  before the cut, so the first live trade opens a gap that the backfill fills from REST, in
  id order, through the same tick pipeline (see backfill.py).
Klines with no trades (Binance sends them for quiet intervals) make no candle, as live
trades would not. A failure leaves the rings as they were (stored candles) and is logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from .binance_rest import BinanceRest, Kline

log = logging.getLogger(__name__)

MINUTE = 60_000


@dataclass(slots=True, frozen=True)
class KlineFill:
    """Candles for one ring (storage rows, oldest first): ring candles starting at or after
    `replace_from` are replaced by `rows`."""

    symbol: str
    timeframe: str
    rows: list[tuple]
    replace_from: int


def _row(symbol: str, timeframe: str, k: Kline, last_ts: int) -> tuple:
    return (
        symbol,
        timeframe,
        k.open_time,
        k.open,
        k.high,
        k.low,
        k.close,
        k.volume,
        k.trades,
        k.open_time,
        last_ts,
    )


def _partial(
    symbol: str, timeframe: str, start: int, minutes: list[Kline], cut: int
) -> tuple | None:
    """The open candle [start, cut) summed from 1m klines, or None without trades."""
    inside = [k for k in minutes if start <= k.open_time < cut and k.trades]
    if not inside:
        return None
    return (
        symbol,
        timeframe,
        start,
        inside[0].open,
        max(k.high for k in inside),
        min(k.low for k in inside),
        inside[-1].close,
        sum(k.volume for k in inside),
        sum(k.trades for k in inside),
        inside[0].open_time,
        cut - 1,
    )


async def fetch_history(
    rest: BinanceRest, symbol: str, rings: Mapping[str, tuple[int, int]], now_ms: int | None = None
) -> tuple[list[KlineFill], int]:
    """Klines for every ring of `symbol` (`rings`: timeframe -> (ms, size)), cut at the
    current minute. Returns the fills and the cut (ms)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    cut = now_ms - now_ms % MINUTE
    minutes = await _klines(rest, symbol, "1m", max(rings.get("1m", (0, 0))[1], 1440), cut)
    fills = []
    for timeframe, (size_ms, size) in rings.items():
        if timeframe not in rest.market.kline_intervals:
            continue  # futures have no 1s klines: that ring starts with the stream
        klines = minutes if timeframe == "1m" else await _klines(rest, symbol, timeframe, size, cut)
        rows = [
            _row(symbol, timeframe, k, k.open_time + size_ms - 1)
            for k in klines
            if k.trades and k.open_time + size_ms <= cut
        ]
        open_start = cut - cut % size_ms
        if open_start < cut:
            partial = _partial(symbol, timeframe, open_start, minutes, cut)
            if partial is not None:
                rows.append(partial)
        replace_from = min(rows[0][2], open_start) if rows else open_start
        fills.append(KlineFill(symbol, timeframe, rows[-size:], replace_from))
    return fills, cut


async def _klines(
    rest: BinanceRest, symbol: str, interval: str, count: int, cut: int
) -> list[Kline]:
    """The `count` newest klines opening before `cut`, oldest first (pages of 1000)."""
    out: list[Kline] = []
    end = cut - 1
    while len(out) < count:
        page = await rest.klines(symbol, interval, limit=min(1000, count - len(out)), end_ms=end)
        page = [k for k in page if k.open_time <= end]
        if not page:
            break
        out[:0] = page
        end = page[0].open_time - 1
        if len(page) < 1000:
            break
    return out[-count:]


async def last_id_before(rest: BinanceRest, symbol: str, cut: int) -> tuple[int, int] | None:
    """(id, time) of the last trade before `cut`: the sequencer resumes after it. None when
    the symbol has never traded."""
    aggs = await rest.agg_trades(symbol, cut, cut + 3_600_000 - 1, limit=1)
    if aggs:
        first = aggs[0].trade_id  # the first trade (aggregate on futures) at or after the cut
        assert first is not None  # agg_trades always sets it
        if not rest.market.by_aggregate:
            first -= aggs[0].count - 1
        return first - 1, cut - 1
    if rest.market.by_aggregate:  # the newest aggregate
        newest = await rest.agg_trades(symbol, limit=1)
        last = newest[-1] if newest else None
    else:  # nothing since the cut: the newest trade
        last = await rest.last_trade(symbol)
    if last is None or last.trade_id is None:
        return None
    return (last.trade_id, last.time) if last.time < cut else (last.trade_id - 1, cut - 1)
