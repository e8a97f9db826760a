"""Offline quotes: PRICEWATCH_QUOTES=demo, the stand-in for the AlphaVantage poller.

Every ``interval`` seconds it stores one quote per pair, derived from the latest trade of the
matching market symbol (BTC/USD reads BTCUSDT; any other FROM/TO reads FROMTO), with that
market's book as bid/ask and ``source_time`` = now. Quotes go through the same ``on_quote``
as AlphaVantage's, so `/ws/rates/`, `GET /api/v1/quotes` and the live page behave alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..feeds import FeedConfigError
from .alphavantage import Quote

log = logging.getLogger(__name__)

# (price, bid, ask) of a symbol's latest trade and book, or None while it has no trade yet.
LatestLookup = Callable[[str], "tuple[float, float | None, float | None] | None"]

# Until a pair has its first quote the market may simply not have traded yet (the feed starts
# after the quote source): look again this often instead of waiting a whole interval.
FIRST_QUOTE_RETRY = 1.0


def market_symbol(from_currency: str, to_currency: str) -> str:
    """The market a pair is read from: USD is quoted by the USDT market."""
    return from_currency + ("USDT" if to_currency == "USD" else to_currency)


class DemoQuotes:
    """Store a quote per pair every ``interval`` s from ``latest``; same surface as
    QuotePoller (``kind``, ``name``, ``health()``, ``run()``) so FeedRunner shows it in
    /healthz under ``name``."""

    kind = "demo-quotes"

    def __init__(
        self,
        latest: LatestLookup,
        pairs: list[tuple[str, str]],
        interval: float,
        on_quote: Callable[[Quote], Awaitable[object]],
        *,
        name: str = "quotes-demo",
    ) -> None:
        if interval <= 0 or not pairs:
            raise FeedConfigError("DemoQuotes needs pairs and an interval > 0")
        self.name = name
        self.pairs = [(a.upper(), b.upper()) for a, b in pairs]
        self.interval = interval
        self._latest = latest
        self._on_quote = on_quote
        self.state = "waiting"
        self.quotes = 0
        self.errors = 0
        self.last_quote_at: float | None = None

    def health(self) -> dict[str, Any]:
        age = (
            None if self.last_quote_at is None else round(time.monotonic() - self.last_quote_at, 3)
        )
        return {
            "kind": self.kind,
            "state": self.state,
            "last_message_age": age,
            "messages": self.quotes,
            "errors": self.errors,
        }

    def quote(self, from_currency: str, to_currency: str) -> Quote | None:
        """The pair's quote now, or None while its market has no trade."""
        latest = self._latest(market_symbol(from_currency, to_currency))
        if latest is None:
            return None
        price, bid, ask = latest
        source_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return Quote(from_currency, to_currency, price, bid, ask, source_time)

    async def poll_once(self) -> bool:
        """Store a quote for every pair that has a price; True when all of them had one."""
        complete = True
        for a, b in self.pairs:
            quote = self.quote(a, b)
            if quote is None:
                complete = False
                continue
            try:
                await self._on_quote(quote)
            except Exception:  # a failed store must not end the source
                self.errors += 1
                log.exception("%s: on_quote failed for %s/%s", self.name, a, b)
                continue
            self.quotes += 1
            self.last_quote_at = time.monotonic()
        return complete

    async def run(self) -> None:
        """The first round as soon as every pair's market has traded, then every interval."""
        try:
            while True:
                self.state = "polling"
                complete = await self.poll_once()
                self.state = "waiting"
                early = not complete and self.quotes == 0  # nothing traded yet
                await asyncio.sleep(
                    min(self.interval, FIRST_QUOTE_RETRY) if early else self.interval
                )
        except asyncio.CancelledError:
            self.state = "stopped"
            raise
