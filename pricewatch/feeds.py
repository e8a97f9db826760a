"""Upstream market data: the Feed base, Binance's wire format and its websocket feed.

The offline demo and replay feeds live in offline_feeds.py, the AlphaVantage quote client in
alphavantage.py; `make_feed` builds whichever PRICEWATCH_FEED names.

Each feed parses upstream JSON/CSV at the edge into small frozen dataclasses and hands them to
the synchronous callbacks it was given (``on_tick(Tick)``, ``on_book(Book)``). It knows nothing
of alerts, candles, storage or HTTP and imports no other pricewatch module.

Prices and quantities arrive as decimal strings ("42283.58000000"). They are parsed with
``float()``: a Python float holds 15-17 significant digits and ``repr(float(s))`` round-trips any
decimal string of at most 15 significant digits, which covers every Binance price and quantity
(at most 8 decimals, far fewer than 15 significant digits in practice). NaN, infinities and
non-positive prices are rejected as parse errors.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

log = logging.getLogger(__name__)

__all__ = [
    "Book",
    "BinanceFeed",
    "Feed",
    "FeedConfigError",
    "FeedStats",
    "ParseError",
    "ServerShutdown",
    "Tick",
    "decode_event",
    "make_feed",
    "parse_book",
    "parse_trade",
]

#: Binance allows 1024 streams per connection; each symbol uses two (trade + bookTicker).
#: Rather than juggle several sockets, one feed refuses more symbols than fit in one.
MAX_SYMBOLS = 512


# --------------------------------------------------------------------------- types


@dataclass(slots=True, frozen=True)
class Tick:
    """One trade."""

    symbol: str
    price: float
    qty: float
    time: int  # ms since epoch UTC (trade time ``T``)
    trade_id: int | None


@dataclass(slots=True, frozen=True)
class Book:
    """Best bid/ask of one symbol."""

    symbol: str
    bid: float
    ask: float
    bid_qty: float
    ask_qty: float


@dataclass(slots=True, frozen=True)
class ServerShutdown:
    """Binance announced it is about to close the connection: reconnect at once."""

    time: int | None


class FeedRefused(Exception):
    """A connection attempt was refused before it started (e.g. a forbidden address)."""


class FeedConfigError(ValueError):
    """A feed was configured with a value that can never work (bad spec, missing file...)."""


class ParseError(ValueError):
    """An upstream message could not be understood. ``kind`` names the failure class."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


TickCallback = Callable[[Tick], object]
BookCallback = Callable[[Book], object]


# --------------------------------------------------------------------------- parsers


def _number(value: object, name: str, zero_ok: bool = False) -> float:
    """A finite number > 0 (>= 0 with `zero_ok`) from a decimal string (or a JSON number, as
    replay files may hold); raises ParseError otherwise."""
    if type(value) is str or (type(value) in (int, float)):
        try:
            v = float(value)  # type: ignore[arg-type]
        except ValueError:
            raise ParseError("bad_number", f"{name}={value!r}") from None
        if (0.0 < v or (zero_ok and v == 0.0)) and v < math.inf:  # also false for NaN
            return v
    raise ParseError("bad_number", f"{name}={value!r}")


def _price(value: object, name: str) -> float:
    """A finite price > 0."""
    return _number(value, name)


def _qty(value: object, name: str) -> float:
    """A finite quantity >= 0."""
    return _number(value, name, zero_ok=True)


def _int(value: object, name: str) -> int:
    if type(value) is int:
        return value
    raise ParseError("bad_field", f"{name}={value!r}")


def _symbol(value: object) -> str:
    if type(value) is str and value:
        return value.upper()
    raise ParseError("bad_field", f"s={value!r}")


#: Trade times outside [1970, 5138) in milliseconds are refused as parse errors: a bogus
#: timestamp must never reach candles or alerts (dates past 9999 cannot even be formatted).
_MAX_MS = 10**14


def _trade_time(value: int) -> int:
    """Milliseconds since the epoch; microsecond values (16 digits) are converted."""
    if value >= _MAX_MS:
        value //= 1000
    if not 0 < value < _MAX_MS:
        raise ParseError("bad_time", f"trade time {value!r} out of range")
    return value


def _masked(param: str) -> str:
    name, eq, _ = param.partition("=")
    return f"{name}=***" if eq else "***"  # a bare `?SECRET` is all value


def redact_url(url: str) -> str:
    """`url` without credentials, fragment, or parameter values other than `streams` (safe
    to show/log): query values (`?apikey=***`, `&` or `;` separated) and matrix parameters
    in the path (`/stream;apikey=***`) are masked."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    if ":" in (parts.hostname or ""):
        netloc = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port is not None else "")
    path = "/".join(";".join([segment.split(";")[0], *map(_masked, segment.split(";")[1:])])
                    for segment in parts.path.split("/"))
    query = "&".join(item if item.startswith("streams=") else _masked(item)
                     for item in re.split("[&;]", parts.query) if item)
    return urlunsplit((parts.scheme, netloc, path, query, ""))


def parse_trade(data: dict[str, Any]) -> Tick:
    """Parse the payload of a ``<symbol>@trade`` event.

    Sample::

        {"e":"trade","E":1704067200123,"s":"BTCUSDT","t":3340000001,"p":"42283.58000000",
         "q":"0.00120000","T":1704067200121,"m":true,"M":true}

    Returns a Tick (time = trade time ``T``); raises ParseError on a missing or invalid field.
    """
    try:
        return Tick(
            _symbol(data["s"]),
            _price(data["p"], "p"),
            _qty(data["q"], "q"),
            _trade_time(_int(data["T"], "T")),
            _int(data["t"], "t"),
        )
    except KeyError as exc:
        raise ParseError("missing_field", f"trade without {exc.args[0]!r}") from None


def parse_book(data: dict[str, Any]) -> Book:
    """Parse the payload of a ``<symbol>@bookTicker`` event (it has no ``e`` or event time).

    Sample::

        {"u":400900217,"s":"BNBUSDT","b":"25.35190000","B":"31.21000000",
         "a":"25.36520000","A":"40.66000000"}

    Returns a Book; raises ParseError on a missing or invalid field.
    """
    try:
        return Book(
            _symbol(data["s"]),
            _price(data["b"], "b"),
            _price(data["a"], "a"),
            _qty(data["B"], "B"),
            _qty(data["A"], "A"),
        )
    except KeyError as exc:
        raise ParseError("missing_field", f"bookTicker without {exc.args[0]!r}") from None


def decode_event(raw: str | bytes) -> Tick | Book | ServerShutdown | None:
    """Decode one websocket text frame (or JSONL line) from Binance.

    Accepts combined-stream frames and raw events::

        {"stream":"btcusdt@trade","data":{"e":"trade","E":1704067200123,"s":"BTCUSDT",...}}
        {"e":"trade","E":1704067200123,"s":"BTCUSDT","t":3340000001,...}
        {"e":"serverShutdown","E":1704153600000}
        {"result":null,"id":1}                      (control reply: returns None)

    Returns a Tick, a Book, a ServerShutdown, or None for control replies.
    Raises ParseError for anything else (bad JSON, unknown event, invalid fields).
    """
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ParseError("invalid_json", repr(raw[:80])) from None
    if type(msg) is not dict:
        raise ParseError("not_an_object", f"JSON {type(msg).__name__}")
    data = msg.get("data")
    if data is None:
        data = msg
    elif type(data) is not dict:
        raise ParseError("not_an_object", f"data is JSON {type(data).__name__}")
    event = data.get("e")
    if event == "trade":
        return parse_trade(data)
    if event is None and "u" in data:
        return parse_book(data)
    if event == "serverShutdown":
        when = data.get("E")
        return ServerShutdown(when if type(when) is int else None)
    if event is None and "id" in msg and "result" in msg:
        return None
    if event is None and "code" in msg:
        raise ParseError("error_reply", f"code={msg.get('code')!r} msg={msg.get('msg')!r}")
    # One kind for every unknown event: the logged-once set must stay bounded.
    raise ParseError("unknown_event", repr(raw[:80]))


# --------------------------------------------------------------------------- health


FeedState = Literal["connecting", "connected", "backoff", "running", "finished", "stopped"]


@dataclass(slots=True)
class FeedStats:
    """Counters and state of one feed, as reported by ``health()``.

    ``gaps[SYMBOL]`` counts trade-id jumps (> 1) and ``missed_trades[SYMBOL]`` the ids skipped;
    an id at or below the last seen one is out of order (``out_of_order``), never a gap.
    """

    kind: str
    symbols: Iterable[str] = ()
    url: str | None = None
    state: FeedState = "connecting"
    reconnects: int = 0
    messages: int = 0
    parse_errors: int = 0
    callback_errors: int = 0
    out_of_order: int = 0
    last_message_at: float | None = None  # time.monotonic()
    gaps: dict[str, int] = field(default_factory=dict)
    missed_trades: dict[str, int] = field(default_factory=dict)
    last_trade_id: dict[str, int] = field(default_factory=dict)
    _logged: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        for s in self.symbols:
            self.gaps[s] = 0
            self.missed_trades[s] = 0

    def note_trade_id(self, symbol: str, trade_id: int) -> None:
        last = self.last_trade_id.get(symbol)
        if last is None or trade_id == last + 1:
            self.last_trade_id[symbol] = trade_id
        elif trade_id > last:
            self.gaps[symbol] = self.gaps.get(symbol, 0) + 1
            self.missed_trades[symbol] = self.missed_trades.get(symbol, 0) + trade_id - last - 1
            self.last_trade_id[symbol] = trade_id
        else:
            self.out_of_order += 1

    def parse_error(self, feed: str, exc: ParseError) -> None:
        """Count a malformed message; log the first of each kind only (upstream can flood)."""
        self.parse_errors += 1
        if exc.kind not in self._logged:
            self._logged.add(exc.kind)
            log.warning("%s feed: skipping malformed message (%s); further ones of this kind "
                        "are only counted", feed, exc)

    def callback_error(self, feed: str, exc: BaseException) -> None:
        self.callback_errors += 1
        kind = "callback:" + type(exc).__name__
        if kind not in self._logged:
            self._logged.add(kind)
            log.error("%s feed: tick/book callback raised; further %s errors are only counted",
                      feed, type(exc).__name__, exc_info=exc)

    def health(self) -> dict[str, Any]:
        age = None
        if self.last_message_at is not None:
            age = round(time.monotonic() - self.last_message_at, 3)
        out: dict[str, Any] = {"kind": self.kind, "state": self.state}
        if self.url is not None:
            out["url"] = self.url
        out.update(
            last_message_age=age,
            reconnects=self.reconnects,
            messages=self.messages,
            parse_errors=self.parse_errors,
            callback_errors=self.callback_errors,
            gaps=dict(self.gaps),
            missed_trades=dict(self.missed_trades),
        )
        return out


def _normalise_symbols(symbols: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for s in symbols:
        if not isinstance(s, str) or not re.fullmatch(r"[A-Za-z0-9]{2,30}", s):
            raise FeedConfigError(f"invalid symbol {s!r}: expected letters/digits like BTCUSDT")
        if s.upper() not in out:
            out.append(s.upper())
    if not out:
        raise FeedConfigError("a feed needs at least one symbol")
    return tuple(out)


class Feed:
    """Base of every tick feed: ``await feed.run()`` until cancelled (or done, for replay)."""

    kind = "feed"

    def __init__(self, name: str, symbols: Iterable[str], on_tick: TickCallback,
                 on_book: BookCallback) -> None:
        self.name = name
        self.symbols = _normalise_symbols(symbols)
        self._watched = frozenset(self.symbols)
        self._on_tick = on_tick
        self._on_book = on_book
        self.stats = FeedStats(self.kind, self.symbols)

    def health(self) -> dict[str, Any]:
        return self.stats.health()

    async def run(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _deliver(self, event: Tick | Book) -> None:
        """Hand one parsed event to its callback; a failing callback never kills the feed."""
        if event.symbol not in self._watched:
            return
        try:
            if type(event) is Tick:
                if event.trade_id is not None:
                    self.stats.note_trade_id(event.symbol, event.trade_id)
                self._on_tick(event)
            else:
                self._on_book(event)
        except Exception as exc:  # a downstream bug must not stop market data for everyone
            self.stats.callback_error(self.name, exc)


# --------------------------------------------------------------------------- Binance


class BinanceFeed(Feed):
    """One combined-stream websocket to Binance carrying ``@trade`` and ``@bookTicker``.

    Reconnects forever with equal-jitter exponential backoff (first retry within
    ``backoff_initial`` s, at most ``backoff_cap`` s), reset after a connection that delivered a
    message. Server closes (the daily 24 h close) are routine; ``serverShutdown`` reconnects at
    once; no message for ``stale_after`` s closes and reconnects. Since the streams are in the
    URL, every reconnect resubscribes to all of them. ``reconnects`` counts connection attempts
    after the first. At most MAX_SYMBOLS symbols (1024 streams, Binance's per-connection cap).
    """

    kind = "binance"

    def __init__(self, base_url: str, symbols: Iterable[str], on_tick: TickCallback,
                 on_book: BookCallback, *, name: str = "binance", backoff_initial: float = 0.5,
                 backoff_cap: float = 30.0, stale_after: float = 60.0,
                 open_timeout: float = 10.0,
                 precheck: Callable[[str], Awaitable[dict | None]] | None = None,
                 follow_redirects: bool = True) -> None:
        super().__init__(name, symbols, on_tick, on_book)
        # `precheck(url)` runs before every connection attempt: it may raise FeedRefused to
        # skip the attempt, or return connection arguments (an admin's extra feed re-checks
        # its host's addresses each time and pins the connection to the address checked).
        self.precheck = precheck
        self._connect = connect if follow_redirects else _connect_no_redirects
        if len(self.symbols) > MAX_SYMBOLS:
            raise FeedConfigError(f"at most {MAX_SYMBOLS} symbols per Binance connection "
                                  f"(1024 streams), got {len(self.symbols)}")
        if not re.match(r"wss?://[^/?#\s]+", base_url):
            raise FeedConfigError(f"Binance websocket URL must start with ws:// or wss://, "
                                  f"got {base_url!r}")
        if not (0 < backoff_initial <= backoff_cap) or stale_after <= 0 or open_timeout <= 0:
            raise FeedConfigError("backoff/stale/open timeouts must be positive, "
                                  "backoff_initial <= backoff_cap")
        if urlsplit(base_url).path.strip("/"):
            # A full stream URL (an admin's extra feed: `/stream?streams=...` or `/ws/x@trade`)
            # is used as given; a bare base gets every watched symbol's streams.
            self.url = base_url
        else:
            streams = "/".join(f"{s.lower()}@trade/{s.lower()}@bookTicker"
                               for s in self.symbols)
            self.url = f"{base_url.rstrip('/')}/stream?streams={streams}"
        self.backoff_initial = backoff_initial
        self.backoff_cap = backoff_cap
        self.stale_after = stale_after
        self.open_timeout = open_timeout
        self.stats.url = redact_url(self.url)

    async def run(self) -> None:
        """Run until cancelled; never returns. On cancel the socket is closed, state "stopped"."""
        stats = self.stats
        delay = self.backoff_initial
        first = True
        try:
            while True:
                if not first:
                    stats.reconnects += 1
                first = False
                stats.state = "connecting"
                outcome = "failed"
                seen = stats.messages
                try:
                    pinned = await self.precheck(self.url) if self.precheck else None
                    async with self._connect(self.url, open_timeout=self.open_timeout,
                                             close_timeout=5.0, **(pinned or {})) as ws:
                        stats.state = "connected"
                        log.info("%s feed: connected to %s", self.name, stats.url)
                        outcome = await self._consume(ws)
                except ConnectionClosed as exc:
                    log.info("%s feed: upstream closed the connection (%s); reconnecting",
                             self.name, exc)
                except InvalidStatus as exc:
                    status = exc.response.status_code
                    log.warning("%s feed: handshake refused with HTTP %s", self.name, status)
                    if status in (418, 429):  # rate limited / banned: back off hard
                        delay = self.backoff_cap
                except (OSError, TimeoutError, WebSocketException, FeedRefused) as exc:
                    log.warning("%s feed: connection failed: %s", self.name,
                                str(exc) or type(exc).__name__)
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
            raise

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
                            log.info("%s feed: serverShutdown received; reconnecting now",
                                     self.name)
                            return "shutdown"
                        self._deliver(event)  # type: ignore[arg-type]
            except TimeoutError:
                if time.monotonic() - last >= self.stale_after:
                    log.warning("%s feed: no message for %.1f s; reconnecting", self.name,
                                self.stale_after)
                    return "stale"


class _connect_no_redirects(connect):  # noqa: N801 - used exactly like `connect`
    """`connect` that refuses HTTP redirects: a redirect could lead anywhere."""

    def process_redirect(self, exc: Exception) -> Exception:
        return exc


# --------------------------------------------------------------------------- factory


def make_feed(spec: str, *, symbols: Iterable[str], binance_url: str, on_tick: TickCallback,
              on_book: BookCallback, replay_speed: float = 0.0) -> Feed | None:
    """Build the feed named by PRICEWATCH_FEED: ``binance``, ``demo``, ``replay:PATH`` or ``off``.

    Returns None for ``off``. Raises FeedConfigError (a ValueError) for anything else.
    """
    from .offline_feeds import DemoFeed, ReplayFeed  # they build on this module

    kind, sep, arg = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind == "binance" and not sep:
        return BinanceFeed(binance_url, symbols, on_tick, on_book)
    if kind == "demo" and not sep:
        return DemoFeed(symbols, on_tick, on_book)
    if kind == "replay" and sep and arg.strip():
        return ReplayFeed(arg.strip(), symbols, on_tick, on_book, speed=replay_speed)
    if kind == "off" and not sep:
        return None
    raise FeedConfigError(f"PRICEWATCH_FEED={spec!r} is not one of: binance, demo, "
                          f"replay:PATH, off")
