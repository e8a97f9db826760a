"""Offline feeds: the demo random walk and the replay of recorded Binance trades.

Both drive the same pipeline as the live Binance feed (feeds.py), through the same Feed
base class and callbacks, so a demo or a replay exercises everything downstream.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from collections.abc import Iterable
from pathlib import Path

from ..feeds import (
    Book,
    BookCallback,
    Feed,
    FeedConfigError,
    ParseError,
    ServerShutdown,
    Tick,
    TickCallback,
    decode_event,
    parse_price,
    parse_qty,
    parse_trade_time,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- demo

_START_PRICES = {"BTCUSDT": 60000.0, "ETHUSDT": 3000.0, "BNBUSDT": 600.0, "SOLUSDT": 150.0}


class DemoFeed(Feed):
    """Offline random walk: ``rate`` trades per second per symbol plus a bookTicker each.

    Ticks carry wall-clock times and per-symbol ids counting from 1. A fixed-rate schedule on
    ``loop.time()`` keeps the rate exact; after a long stall it resynchronises, never bursts.
    """

    kind = "demo"

    def __init__(
        self,
        symbols: Iterable[str],
        on_tick: TickCallback,
        on_book: BookCallback,
        *,
        rate: float = 10.0,
        seed: int | None = None,
        name: str = "demo",
        max_clock_skew: float = 10.0,
    ) -> None:
        super().__init__(name, symbols, on_tick, on_book, max_clock_skew=max_clock_skew)
        if not (0 < rate <= 10_000):
            raise FeedConfigError(f"demo rate must be in (0, 10000] trades/s, got {rate!r}")
        self.rate = rate
        self._rng = random.Random(seed)
        self._prices = {s: _START_PRICES.get(s, 100.0) for s in self.symbols}
        self._ids = dict.fromkeys(self.symbols, 0)
        self.stats.state = "running"

    def _step(self, symbol: str) -> None:
        """One trade and its book. The book goes first and holds the trade's price
        (bid < price < ask): a price message, sent on the trade, then shows a price inside
        its own bid/ask, as it would on a real market."""
        rng = self._rng
        price = self._prices[symbol] * math.exp(rng.gauss(0.0, 0.0003))
        self._prices[symbol] = price
        self._ids[symbol] += 1
        px = round(price, 2)
        half = max(0.01, round(px * 0.00001, 2))
        self.stats.messages += 1
        self.stats.last_message_at = time.monotonic()
        self._deliver(
            Book(
                symbol,
                round(px - half, 2),
                round(px + half, 2),
                round(rng.uniform(0.01, 5.0), 5),
                round(rng.uniform(0.01, 5.0), 5),
            )
        )
        self._deliver(
            Tick(
                symbol,
                px,
                round(rng.expovariate(20.0) + 0.00001, 5),
                time.time_ns() // 1_000_000,
                self._ids[symbol],
            )
        )

    async def run(self) -> None:
        """Run until cancelled (state "running", then "stopped")."""
        loop = asyncio.get_running_loop()
        period = 1.0 / self.rate
        next_at = loop.time()
        self.stats.state = "running"
        try:
            while True:
                for symbol in self.symbols:
                    self._step(symbol)
                next_at += period
                now = loop.time()
                if next_at < now - 1.0:  # stalled (debugger, suspend): skip, do not burst
                    next_at = now
                await asyncio.sleep(max(0.0, next_at - now))
        except asyncio.CancelledError:
            self.stats.state = "stopped"
            raise


# --------------------------------------------------------------------------- replay

_FILE_SYMBOL = re.compile(r"^([A-Za-z0-9]{2,30})-(?:trades|aggTrades)-")
_READ_CHUNK = 1 << 20  # bytes of lines read per worker-thread hop
_YIELD_EVERY = 500


def _csv_time_ms(value: int) -> int:
    # Dumps from 2025 on carry microseconds (16 digits now); milliseconds have 13.
    return parse_trade_time(value)


def parse_trades_csv_line(line: bytes, symbol: str) -> Tick:
    """Parse one line of a data.binance.vision trades dump.

    Sample (``id,price,qty,quote_qty,time,is_buyer_maker,is_best_match``)::

        3340000001,42283.58000000,0.00120000,50.74029600,1704067200121,True,True

    ``time`` in ms, or in µs (files from 2025 on) - both return ms. Raises ParseError.
    """
    parts = line.split(b",")
    if len(parts) < 5:
        raise ParseError("csv_columns", repr(line[:80]))
    try:
        trade_id = int(parts[0])
        t = int(parts[4])
    except ValueError:
        raise ParseError("csv_bad_int", repr(line[:80])) from None
    return Tick(
        symbol,
        parse_price(parts[1].decode("ascii", "replace"), "price"),
        parse_qty(parts[2].decode("ascii", "replace"), "qty"),
        _csv_time_ms(t),
        trade_id,
    )


class ReplayFeed(Feed):
    """Replay a Binance trades CSV dump or a JSONL recording of websocket frames, in file order.

    CSV: the symbol comes from the file name (``BTCUSDT-trades-2024-01-01.csv``), else the first
    watched symbol; a header line is skipped. JSONL: one raw or combined-stream event per line
    (trade, bookTicker; control replies and serverShutdown are ignored). ``speed=0`` replays as
    fast as possible, yielding to the loop every 500 ticks; ``speed>0`` keeps the trades' time
    spacing divided by ``speed``. ``done`` is set (state "finished") at the end of the file.
    """

    kind = "replay"

    def __init__(
        self,
        path: str | Path,
        symbols: Iterable[str],
        on_tick: TickCallback,
        on_book: BookCallback,
        *,
        speed: float = 0.0,
        name: str = "replay",
        max_clock_skew: float = 10.0,
        max_id_jump: int = 10_000_000,
    ) -> None:
        super().__init__(
            name, symbols, on_tick, on_book, max_clock_skew=max_clock_skew, max_id_jump=max_id_jump
        )
        self.path = Path(path)
        if not self.path.is_file():
            raise FeedConfigError(f"replay file not found: {str(self.path)!r}")
        if not (speed >= 0 and math.isfinite(speed)):
            raise FeedConfigError(f"replay speed must be >= 0, got {speed!r}")
        self.speed = speed
        self.done = asyncio.Event()
        suffix = self.path.suffix.lower()
        if suffix in (".jsonl", ".ndjson", ".json"):
            self.format = "jsonl"
        elif suffix == ".csv":
            self.format = "csv"
        else:
            with self.path.open("rb") as f:
                self.format = "jsonl" if f.read(64).lstrip().startswith(b"{") else "csv"
        m = _FILE_SYMBOL.match(self.path.name)
        self.csv_symbol = m.group(1).upper() if m else self.symbols[0]
        if self.format == "csv" and self.csv_symbol not in self._watched:
            raise FeedConfigError(
                f"replay file {self.path.name!r} holds {self.csv_symbol} "
                f"trades, which is not a watched symbol"
            )
        self.stats.state = "running"

    def _decode(self, line: bytes, first: bool) -> Tick | Book | ServerShutdown | None:
        if self.format == "jsonl":
            return decode_event(line)
        if first and not line[:1].isdigit():
            return None  # header
        return parse_trades_csv_line(line, self.csv_symbol)

    async def run(self) -> None:
        """Replay the whole file, set ``done`` and return; cancel → state "stopped"."""
        stats = self.stats
        loop = asyncio.get_running_loop()
        anchor: tuple[float, int] | None = None  # (loop time, trade time) of the first trade
        count = 0
        first = True
        try:
            with self.path.open("rb") as f:
                while lines := await asyncio.to_thread(f.readlines, _READ_CHUNK):
                    for line in lines:
                        line = line.strip()
                        if not line:
                            continue
                        stats.messages += 1
                        stats.last_message_at = time.monotonic()
                        try:
                            event = self._decode(line, first)
                        except ParseError as exc:
                            stats.parse_error(self.name, exc)
                            continue
                        finally:
                            first = False
                        if event is None or type(event) is ServerShutdown:
                            continue
                        if self.speed and type(event) is Tick and not stats.is_ahead(event.time):
                            # A trade from the future is not waited for: `_deliver` drops
                            # it (counted, its id seen) at once.
                            if anchor is None:
                                anchor = (loop.time(), event.time)
                            due = anchor[0] + (event.time - anchor[1]) / 1000 / self.speed
                            if due > loop.time():
                                await asyncio.sleep(due - loop.time())
                        self._deliver(event)
                        count += 1
                        if count % _YIELD_EVERY == 0:
                            await asyncio.sleep(0)
            stats.state = "finished"
            log.info(
                "%s feed: replay of %s finished (%d events, %d bad lines)",
                self.name,
                self.path.name,
                count,
                stats.parse_errors,
            )
            self.done.set()
        except asyncio.CancelledError:
            stats.state = "stopped"
            raise
