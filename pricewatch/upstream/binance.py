"""The Binance websocket feed: one combined stream for every watched symbol, supervised.

Spot, USDⓈ-M and COIN-M futures differ only in data (`binance_rest.MARKETS`): hosts, REST
paths, and the trade stream (`@trade` on spot, `@aggTrade` on futures). Every streamed trade
passes a `backfill.Sequencer` (ids in order, gaps filled over REST); before the first
connection the candle rings may be filled from REST klines (`history.py`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from ..feeds import (
    BarCallback,
    Book,
    BookCallback,
    Feed,
    FeedConfigError,
    FeedRefused,
    ParseError,
    ServerShutdown,
    Tick,
    TickCallback,
    decode_event,
    redact_url,
)
from .backfill import Sequencer
from .binance_rest import MARKETS, BinanceMarket, BinanceRest, RestError
from .history import KlineFill, fetch_history, last_id_before

log = logging.getLogger(__name__)

#: Binance allows 1024 streams per connection; each symbol uses two (trade + bookTicker).
#: Rather than juggle several sockets, one feed refuses more symbols than fit in one.
MAX_SYMBOLS = 512


#: Venue names of Binance's own hosts (`venue_of`).
BINANCE_VENUES = frozenset(
    {"binance:spot", "binance:usdm", "binance:coinm", "binance-testnet:spot", "binanceus:spot"}
)


def venue_of(url: str, market: BinanceMarket) -> str:
    """The upstream market a stream URL's trades come from. Binance serves one market on
    several hosts (`stream.binance.com` and `data-stream.binance.vision` stream the very same
    spot trades), so a Binance host names its market (`binance:spot`, `binance:usdm`,
    `binance:coinm`); any other host is its own venue (host, port and market)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    if host == "binance.com" or host.endswith(".binance.com"):
        kind = (
            "usdm"
            if host.startswith("fstream")
            else "coinm"
            if host.startswith("dstream")
            else "spot"
        )
        return f"binance:{kind}"
    if host == "binance.vision" or host.endswith(".binance.vision"):
        return "binance-testnet:spot" if "testnet" in host else "binance:spot"
    if host == "binance.us" or host.endswith(".binance.us"):
        return "binanceus:spot"
    try:
        port = parts.port or (443 if parts.scheme == "wss" else 80)
    except ValueError:
        port = 0
    return f"{host}:{port}{market.prefix}"


def traded_symbols(
    url: str, symbols: Iterable[str], venue: str | None = None
) -> frozenset[str] | None:
    """The watched `symbols` whose trades a stream URL carries: all of them for a bare base
    (the feed asks for every one), those with a `@trade`/`@aggTrade` stream named in a
    `/stream?streams=` or `/ws/` URL. When the URL does not say (another path): all of them
    on a Binance host (`venue` in BINANCE_VENUES: it is judged, never waved through),
    None elsewhere (a relay of unknown content)."""
    parts = urlsplit(url)
    path = parts.path.strip("/")
    if not path or (
        venue is not None
        and venue in BINANCE_VENUES
        and path != "stream"
        and not path.startswith("ws/")
    ):
        return frozenset(symbols)
    if path == "stream":
        names = [n for v in parse_qs(parts.query).get("streams", []) for n in v.split("/")]
    elif path.startswith("ws/"):
        names = path[3:].split("/")
    else:
        return None
    streamed = {
        name.partition("@")[0].upper()
        for name in names
        if name.partition("@")[2].lower() in ("trade", "aggtrade")
    }
    return frozenset(streamed & set(symbols))


class BinanceFeed(Feed):
    """One combined-stream websocket to Binance carrying ``@trade`` (``@aggTrade`` on futures)
    and ``@bookTicker``.

    Reconnects forever with equal-jitter exponential backoff (first retry within
    ``backoff_initial`` s, at most ``backoff_cap`` s), reset after a connection that delivered a
    message. Server closes (the daily 24 h close) are routine; ``serverShutdown`` reconnects at
    once; no message for ``stale_after`` s closes and reconnects. Since the streams are in the
    URL, every reconnect resubscribes to all of them. ``reconnects`` counts connection attempts
    after the first. At most MAX_SYMBOLS symbols (1024 streams, Binance's per-connection cap).
    """

    kind = "binance"

    def __init__(
        self,
        base_url: str,
        symbols: Iterable[str],
        on_tick: TickCallback,
        on_book: BookCallback,
        *,
        name: str = "binance",
        backoff_initial: float = 0.5,
        backoff_cap: float = 30.0,
        stale_after: float = 60.0,
        open_timeout: float = 10.0,
        precheck: Callable[[str], Awaitable[dict | None]] | None = None,
        follow_redirects: bool = True,
        rest: BinanceRest | None = None,
        backfill_max_trades: int = 100_000,
        backfill_hold: float = 5.0,
        history: Mapping[str, tuple[int, int]] | None = None,
        on_history: Callable[[KlineFill], object] | None = None,
        market: BinanceMarket | None = None,
        on_bar: BarCallback | None = None,
        max_clock_skew: float = 10.0,
        max_id_jump: int = 10_000_000,
    ) -> None:
        super().__init__(
            name, symbols, on_tick, on_book, max_clock_skew=max_clock_skew, max_id_jump=max_id_jump
        )
        self.market = market or (rest.market if rest is not None else MARKETS["spot"])
        # Every streamed trade passes the sequencer: ids in order, gaps filled over REST
        # (`rest`), or counted as missed without it.
        self.sequencer = Sequencer(
            on_tick,
            self.stats,
            rest,
            max_trades=backfill_max_trades,
            hold_limit=backfill_hold,
            deliver_bar=on_bar,
        )
        self.rest = rest
        # Candle history from REST klines before the first connection (`history`: timeframe
        # -> (ms, ring size)), handed to `on_history`.
        self.history = history if rest is not None and on_history is not None else None
        self._on_history = on_history
        # `precheck(url)` runs before every connection attempt: it may raise FeedRefused to
        # skip the attempt, or return connection arguments (an admin's extra feed re-checks
        # its host's addresses each time and pins the connection to the address checked).
        self.precheck = precheck
        self._connect = connect if follow_redirects else _connect_no_redirects
        if len(self.symbols) > MAX_SYMBOLS:
            raise FeedConfigError(
                f"at most {MAX_SYMBOLS} symbols per Binance connection "
                f"(1024 streams), got {len(self.symbols)}"
            )
        if not re.match(r"wss?://[^/?#\s]+", base_url):
            raise FeedConfigError(
                f"Binance websocket URL must start with ws:// or wss://, got {base_url!r}"
            )
        if not (0 < backoff_initial <= backoff_cap) or stale_after <= 0 or open_timeout <= 0:
            raise FeedConfigError(
                "backoff/stale/open timeouts must be positive, backoff_initial <= backoff_cap"
            )
        if urlsplit(base_url).path.strip("/"):
            # A full stream URL (an admin's extra feed: `/stream?streams=...` or `/ws/x@trade`)
            # is used as given; a bare base gets every watched symbol's streams.
            self.url = base_url
        else:
            trade = self.market.trade_stream
            streams = "/".join(f"{s.lower()}@{trade}/{s.lower()}@bookTicker" for s in self.symbols)
            self.url = f"{base_url.rstrip('/')}/stream?streams={streams}"
        self.backoff_initial = backoff_initial
        self.backoff_cap = backoff_cap
        self.stale_after = stale_after
        self.open_timeout = open_timeout
        self.stats.url = redact_url(self.url)
        self.venue = venue_of(self.url, self.market)
        self.carries = traded_symbols(self.url, self.symbols, self.venue)

    async def run(self) -> None:
        """Run until cancelled; never returns. On cancel the socket is closed, state "stopped"."""
        stats = self.stats
        delay = self.backoff_initial
        first = True
        try:
            if self.history:
                await self._load_history()
            while True:
                if not first:
                    stats.reconnects += 1
                first = False
                stats.state = "connecting"
                outcome = "failed"
                seen = stats.messages
                try:
                    pinned = await self.precheck(self.url) if self.precheck else None
                    async with self._connect(
                        self.url,
                        open_timeout=self.open_timeout,
                        close_timeout=5.0,
                        **(pinned or {}),
                    ) as ws:
                        stats.state = "connected"
                        log.info("%s feed: connected to %s", self.name, stats.url)
                        outcome = await self._consume(ws)
                except ConnectionClosed as exc:
                    log.info(
                        "%s feed: upstream closed the connection (%s); reconnecting", self.name, exc
                    )
                except InvalidStatus as exc:
                    status = exc.response.status_code
                    log.warning("%s feed: handshake refused with HTTP %s", self.name, status)
                    if status in (418, 429):  # rate limited / banned: back off hard
                        delay = self.backoff_cap
                except (OSError, TimeoutError, WebSocketException, FeedRefused) as exc:
                    log.warning(
                        "%s feed: connection failed: %s", self.name, str(exc) or type(exc).__name__
                    )
                except Exception:
                    log.exception("%s feed: unexpected error; reconnecting", self.name)
                if outcome == "shutdown":
                    delay = self.backoff_initial
                    continue  # Binance asked us to move now: no wait
                if stats.messages > seen:  # that connection worked: start over gently
                    delay = self.backoff_initial
                stats.state = "backoff"
                # Equal jitter: never a tight loop (Binance bans >300 attempts / 5 min / IP).
                await asyncio.sleep(delay / 2 + random.uniform(0, delay / 2))
                delay = min(self.backoff_cap, delay * 2)
        except asyncio.CancelledError:
            stats.state = "stopped"
            await self.sequencer.stop()
            raise

    def health(self) -> dict[str, Any]:
        out = {**self.stats.health(), **self.sequencer.health()}
        if self.rest is not None:  # the REST budget: Binance bans clients that overrun it
            out["rest"] = {
                "calls": self.rest.calls,
                "used_weight": self.rest.used_weight,
                "blocked_for": round(self.rest.blocked_for(), 1),
            }
        return out

    async def _load_history(self, budget: float = 30.0) -> None:
        """Fill every symbol's candle rings from REST klines and tell the sequencer where the
        live trades take over (see history.py). Bounded in time; failures are logged."""
        assert self.rest is not None and self.history is not None
        self.stats.state = "history"
        began = time.monotonic()
        try:
            async with asyncio.timeout(budget):
                for symbol in self.symbols:
                    fills, cut = await fetch_history(self.rest, symbol, self.history)
                    resume = await last_id_before(self.rest, symbol, cut)
                    for fill in fills:
                        assert self._on_history is not None  # given with `history`
                        self._on_history(fill)
                    if resume is not None:
                        self.sequencer.resume(symbol, *resume)
            log.info(
                "%s feed: candle history of %d symbols loaded in %.2f s",
                self.name,
                len(self.symbols),
                time.monotonic() - began,
            )
        except (RestError, TimeoutError) as exc:
            log.warning(
                "%s feed: no candle history from REST (%s); starting without it",
                self.name,
                exc or type(exc).__name__,
            )
        except Exception:  # the live feed matters more than the history: never end run()
            log.exception("%s feed: no candle history from REST; starting without it", self.name)

    def _deliver(self, event: Tick | Book) -> None:
        if type(event) is Tick:
            if event.symbol in self._watched:
                self.sequencer.on_trade(event)
        else:
            super()._deliver(event)

    async def _consume(self, ws: ClientConnection) -> str:
        """Read frames until the socket closes (raises), goes stale or says serverShutdown.

        Returns "stale" or "shutdown". The watchdog is lazy: one timer per ``stale_after``
        window, re-armed from the last message time instead of on every message.
        """
        stats = self.stats
        loop = asyncio.get_running_loop()
        connected_at = time.monotonic()
        last = connected_at
        while True:
            deadline = loop.time() + (last + self.stale_after - time.monotonic())
            try:
                async with asyncio.timeout_at(deadline):
                    while True:
                        raw = await ws.recv()
                        last = stats.last_message_at = time.monotonic()
                        stats.messages += 1
                        try:
                            event = decode_event(raw)
                        except ParseError as exc:
                            stats.parse_error(self.name, exc)
                            continue
                        if event is None:
                            continue
                        if type(event) is ServerShutdown:
                            log.info(
                                "%s feed: serverShutdown received; reconnecting now", self.name
                            )
                            return "shutdown"
                        self._deliver(event)
            except TimeoutError:
                if time.monotonic() - last >= self.stale_after:
                    log.warning(
                        "%s feed: no message for %.1f s; reconnecting", self.name, self.stale_after
                    )
                    return "stale"


class _connect_no_redirects(connect):  # named like `connect`, and used exactly like it
    """`connect` that refuses HTTP redirects: a redirect could lead anywhere."""

    def process_redirect(self, exc: Exception) -> Exception:
        return exc
