"""Upstream market data: the Feed base, its health counters, and Binance's wire format.

The feeds build on this module and nothing here imports them: they live in the
`pricewatch.upstream` package (the Binance websocket feed, its REST client, gap filling,
candle history, the offline demo and replay feeds, the AlphaVantage quote client, and
`upstream.factory.make_feed`, which builds whichever PRICEWATCH_FEED names).

Each feed parses upstream JSON/CSV at the edge into small frozen dataclasses and hands them to
the synchronous callbacks it was given (``on_tick(Tick)``, ``on_book(Book)``). It knows nothing
of alerts, candles, storage or HTTP and imports no other pricewatch module but `clock`.

Trade sanity, for every feed: a trade stamped more than `max_clock_skew` seconds ahead of the
server clock is dropped and counted (`future_trades`): candles, 24 h figures and cooldowns
never count from a time that has not come yet. A trade id far out of line with the last one
(a venue restart, an id reset, one huge id) is sorted out by `FeedStats.note_trade_id` here
and by `backfill.Sequencer` on the Binance feed (`id_resets`).

Prices and quantities arrive as decimal strings ("42283.58000000"). They are parsed with
``float()``: a Python float holds 15-17 significant digits and ``repr(float(s))`` round-trips any
decimal string of at most 15 significant digits, which covers every Binance price and quantity
(at most 8 decimals, far fewer than 15 significant digits in practice). NaN, infinities and
non-positive prices are rejected as parse errors.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, final
from urllib.parse import urlsplit, urlunsplit

import orjson

from . import clock

log = logging.getLogger(__name__)

#: Ids at most this far behind the last one are late duplicates (dropped), never a reset.
REORDER_WINDOW = 100
#: Out-of-order drops in a row (no trade taken in between) that make a feed `degraded`...
DEGRADED_AFTER = 3
#: ... for this many seconds after the last of them.
DEGRADED_FOR = 60.0
LOG_EVERY = 60.0  # seconds between two log lines about the same kind of bad trade

__all__ = [
    "Bar",
    "Book",
    "Feed",
    "FeedConfigError",
    "FeedStats",
    "ParseError",
    "ServerShutdown",
    "Tick",
    "decode_event",
    "parse_agg_trade",
    "parse_book",
    "parse_trade",
]


# --------------------------------------------------------------------------- types


@final  # `type(event) is Tick` in Feed._deliver tells a Tick from a Book
@dataclass(slots=True, frozen=True)
class Tick:
    """One trade."""

    symbol: str
    price: float
    qty: float
    time: int  # ms since epoch UTC (trade time ``T``)
    trade_id: int | None
    count: int = 1  # trades it stands for: an aggregate trade from REST backfill holds several
    backfill: str | None = None  # "trade" when recovered over REST after a gap, not streamed


@dataclass(slots=True, frozen=True)
class Bar:
    """A stretch of trades known only in summary: one 1m kline standing in for trades a gap
    was too large to fetch one by one. `volume` and `trades` are what it adds to what was
    already delivered of [start, end]; `open` counts only when nothing of it was."""

    symbol: str
    start: int  # ms, the kline's open time
    end: int  # ms, its close time
    open: float
    high: float
    low: float
    close: float
    volume: float
    trades: int


@dataclass(slots=True, frozen=True)
class Book:
    """Best bid/ask of one symbol."""

    symbol: str
    bid: float
    ask: float
    bid_qty: float
    ask_qty: float


@final  # `type(event) is ServerShutdown` tells it from a Tick or a Book
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
BarCallback = Callable[[Bar], object]
BookCallback = Callable[[Book], object]


# --------------------------------------------------------------------------- parsers


def parse_number(value: object, name: str, zero_ok: bool = False) -> float:
    """A finite number > 0 (>= 0 with `zero_ok`) from a decimal string (or a JSON number, as
    replay files may hold); raises ParseError otherwise."""
    if type(value) is str or (type(value) in (int, float)):
        try:  # (the exact-type test above keeps bool out; mypy narrows no `type(x) in`)
            v = float(value)  # type: ignore[arg-type]
        except ValueError:
            raise ParseError("bad_number", f"{name}={value!r}") from None
        if (v > 0.0 or (zero_ok and v == 0.0)) and v < math.inf:  # also false for NaN
            return v
    raise ParseError("bad_number", f"{name}={value!r}")


def parse_price(value: object, name: str) -> float:
    """A finite price > 0."""
    return parse_number(value, name)


def parse_qty(value: object, name: str) -> float:
    """A finite quantity >= 0."""
    return parse_number(value, name, zero_ok=True)


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


def parse_trade_time(value: int) -> int:
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
    path = "/".join(
        ";".join([segment.split(";")[0], *map(_masked, segment.split(";")[1:])])
        for segment in parts.path.split("/")
    )
    query = "&".join(
        item if item.startswith("streams=") else _masked(item)
        for item in re.split("[&;]", parts.query)
        if item
    )
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
            parse_price(data["p"], "p"),
            parse_qty(data["q"], "q"),
            parse_trade_time(_int(data["T"], "T")),
            _int(data["t"], "t"),
        )
    except KeyError as exc:
        raise ParseError("missing_field", f"trade without {exc.args[0]!r}") from None


def parse_agg_trade(data: dict[str, Any]) -> Tick:
    """Parse the payload of a ``<symbol>@aggTrade`` event (the trade stream of futures).

    Sample::

        {"e":"aggTrade","E":123456789,"s":"BTCUSD_PERP","a":5933014,"p":"0.001","q":"100",
         "f":100,"l":105,"T":123456785,"m":true}

    Returns a Tick whose `trade_id` is the aggregate id ``a`` (it grows by one per
    aggregate: a jump means missed aggregates) and `count` the trades it holds.
    """
    try:
        first, last = _int(data["f"], "f"), _int(data["l"], "l")
        return Tick(
            _symbol(data["s"]),
            parse_price(data["p"], "p"),
            parse_qty(data["q"], "q"),
            parse_trade_time(_int(data["T"], "T")),
            _int(data["a"], "a"),
            max(1, last - first + 1),
        )
    except KeyError as exc:
        raise ParseError("missing_field", f"aggTrade without {exc.args[0]!r}") from None


def parse_book(data: dict[str, Any]) -> Book:
    """Parse the payload of a ``<symbol>@bookTicker`` event (it has no ``e`` or event time).

    Sample::

        {"u":400900217,"s":"BNBUSDT","b":"25.35190000","B":"31.21000000",
         "a":"25.36520000","A":"40.66000000"}

    Futures add event fields (``"e":"bookTicker","E":...,"T":...``, COIN-M also ``"ps"``).
    Returns a Book; raises ParseError on a missing or invalid field, and on a crossed book
    (bid above ask: no market quotes one, so it is garbage; the last good book stays).
    """
    try:
        book = Book(
            _symbol(data["s"]),
            parse_price(data["b"], "b"),
            parse_price(data["a"], "a"),
            parse_qty(data["B"], "B"),
            parse_qty(data["A"], "A"),
        )
    except KeyError as exc:
        raise ParseError("missing_field", f"bookTicker without {exc.args[0]!r}") from None
    if book.bid > book.ask:
        raise ParseError("crossed_book", f"{book.symbol} bid {book.bid!r} > ask {book.ask!r}")
    return book


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
    if event == "aggTrade":
        return parse_agg_trade(data)
    if (event is None and "u" in data) or event == "bookTicker":
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


FeedState = Literal[
    "history", "connecting", "connected", "backoff", "running", "finished", "stopped"
]


@dataclass(slots=True)
class FeedStats:
    """Counters and state of one feed, as reported by ``health()``.

    ``gaps[SYMBOL]`` counts trade-id jumps (> 1) and ``missed_trades[SYMBOL]`` the ids skipped;
    an id at or below the last seen one with a time not newer than the last trade's is out of
    order (``out_of_order``), never a gap. A jump of more than ``max_id_jump`` ids, or an id
    at or below the last one with a newer time (however close), is an id reset
    (``id_resets``): the sequence starts again there, nothing is counted as missed.
    ``future_trades`` counts trades dropped for a time more than ``max_skew_ms`` ahead of the
    server clock.
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
    future_trades: int = 0
    id_resets: int = 0
    max_skew_ms: int = 10_000
    max_id_jump: int = 10_000_000
    last_message_at: float | None = None  # time.monotonic()
    gaps: dict[str, int] = field(default_factory=dict)
    missed_trades: dict[str, int] = field(default_factory=dict)
    last_trade_id: dict[str, int] = field(default_factory=dict)
    last_trade_time: dict[str, int] = field(default_factory=dict)  # of note_trade_id's trades
    # Trade times up to here are not ahead of the clock: the clock is read only when a
    # trade passes it (about once per `max_skew_ms`), not once per trade.
    future_bound: int = 0
    drop_streak: int = 0  # out-of-order drops since the last trade taken
    _last_drop: float = -math.inf
    _logged: set[str] = field(default_factory=set)
    _logged_at: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for s in self.symbols:
            self.gaps[s] = 0
            self.missed_trades[s] = 0

    def is_ahead(self, trade_time: int) -> bool:
        """True when `trade_time` (ms) is more than the allowed skew ahead of the server
        clock (not counted: see `ahead_of_clock`)."""
        if trade_time <= self.future_bound:
            return False
        self.future_bound = int(clock.now() * 1000) + self.max_skew_ms
        return trade_time > self.future_bound

    def ahead_of_clock(self, trade_time: int) -> bool:
        """True (and counted, logged at most once a minute) when `trade_time` (ms) is more
        than the allowed skew ahead of the server clock: the trade must be dropped."""
        if not self.is_ahead(trade_time):
            return False
        self.future_trades += 1
        self.log_limited(
            "future",
            "%s feed: dropping trades stamped more than %.0f s ahead "
            "of the server clock (one at %d ms, %d dropped so far)",
            self.kind,
            self.max_skew_ms / 1000,
            trade_time,
            self.future_trades,
        )
        return True

    def id_reset(self, symbol: str, last: int, trade_id: int) -> None:
        self.id_resets += 1
        self.log_limited(
            "id_reset:" + symbol,
            "%s feed: %s trade id %d after %d: the id "
            "sequence starts again there (venue restart or id reset; %d so far)",
            self.kind,
            symbol,
            trade_id,
            last,
            self.id_resets,
        )

    def dropped_out_of_order(self, count: int = 1) -> None:
        """Trades dropped because their ids were already passed."""
        self.out_of_order += count
        self.drop_streak += count
        self._last_drop = time.monotonic()

    @property
    def degraded(self) -> bool:
        """Trades are being dropped as out of order: several in a row, none taken since."""
        return (
            self.drop_streak >= DEGRADED_AFTER and time.monotonic() - self._last_drop < DEGRADED_FOR
        )

    def log_limited(self, key: str, message: str, *args: object) -> None:
        """A warning at most once a minute per `key` (upstream can flood)."""
        now = time.monotonic()
        if now - self._logged_at.get(key, -math.inf) >= LOG_EVERY:
            if len(self._logged_at) > 1000:  # keys name symbols: bounded, but be sure
                self._logged_at.clear()
            self._logged_at[key] = now
            log.warning(message, *args)

    def note_future_id(self, symbol: str, trade_id: int) -> None:
        """A dropped future trade's id counts as seen when it is the next one (the trade
        after it is no gap); any other id of it is ignored: no gap, no reset."""
        if self.last_trade_id.get(symbol, trade_id) == trade_id - 1:
            self.last_trade_id[symbol] = trade_id

    def note_trade_id(self, symbol: str, trade_id: int, time_ms: int) -> None:
        """Account for a trade id of a feed that delivers every trade (demo, replay)."""
        last = self.last_trade_id.get(symbol)
        if last is None or trade_id == last + 1:
            pass
        elif trade_id - last > self.max_id_jump or (
            trade_id <= last and time_ms > self.last_trade_time.get(symbol, time_ms)
        ):
            self.id_reset(symbol, last, trade_id)
        elif trade_id > last:
            self.gaps[symbol] = self.gaps.get(symbol, 0) + 1
            self.missed_trades[symbol] = self.missed_trades.get(symbol, 0) + trade_id - last - 1
        else:
            self.out_of_order += 1
            return
        self.last_trade_id[symbol] = trade_id
        self.last_trade_time[symbol] = time_ms

    def parse_error(self, feed: str, exc: ParseError) -> None:
        """Count a malformed message; log the first of each kind only (upstream can flood)."""
        self.parse_errors += 1
        if exc.kind not in self._logged:
            self._logged.add(exc.kind)
            log.warning(
                "%s feed: skipping malformed message (%s); further ones of this kind "
                "are only counted",
                feed,
                exc,
            )

    def callback_error(self, feed: str, exc: BaseException) -> None:
        self.callback_errors += 1
        kind = "callback:" + type(exc).__name__
        if kind not in self._logged:
            self._logged.add(kind)
            log.error(
                "%s feed: tick/book callback raised; further %s errors are only counted",
                feed,
                type(exc).__name__,
                exc_info=exc,
            )

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
            out_of_order=self.out_of_order,
            future_trades=self.future_trades,
            id_resets=self.id_resets,
            degraded=self.degraded,
            gaps=dict(self.gaps),
            missed_trades=dict(self.missed_trades),
        )
        return out


def _normalise_symbols(symbols: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for s in symbols:
        if not isinstance(s, str) or not re.fullmatch(r"[A-Za-z0-9]{2,30}(_[A-Za-z0-9]{1,10})?", s):
            raise FeedConfigError(
                f"invalid symbol {s!r}: expected letters/digits like BTCUSDT "
                f"(futures: one underscore, like BTCUSD_PERP)"
            )
        if s.upper() not in out:
            out.append(s.upper())
    if not out:
        raise FeedConfigError("a feed needs at least one symbol")
    return tuple(out)


class Feed:
    """Base of every tick feed: ``await feed.run()`` until cancelled (or done, for replay).

    `max_clock_skew` (s): trades stamped further ahead of the server clock are dropped;
    `max_id_jump`: a larger trade-id jump is an id reset, not a gap (see FeedStats).
    `venue` names the upstream market the trades come from and `carries` the symbols whose
    trades it streams (None: not known); two feeds of one venue must not carry one symbol."""

    kind = "feed"
    venue: str | None = None

    def __init__(
        self,
        name: str,
        symbols: Iterable[str],
        on_tick: TickCallback,
        on_book: BookCallback,
        *,
        max_clock_skew: float = 10.0,
        max_id_jump: int = 10_000_000,
    ) -> None:
        self.name = name
        self.symbols = _normalise_symbols(symbols)
        self._watched = frozenset(self.symbols)
        self._on_tick = on_tick
        self._on_book = on_book
        self.stats = FeedStats(
            self.kind, self.symbols, max_skew_ms=int(max_clock_skew * 1000), max_id_jump=max_id_jump
        )
        self.carries: frozenset[str] | None = None

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
                stats = self.stats
                if event.time > stats.future_bound and stats.ahead_of_clock(event.time):
                    if event.trade_id is not None:
                        stats.note_future_id(event.symbol, event.trade_id)
                    return
                if event.trade_id is not None:
                    stats.note_trade_id(event.symbol, event.trade_id, event.time)
                self._on_tick(event)
            else:
                self._on_book(event)
        except Exception as exc:  # a downstream bug must not stop market data for everyone
            self.stats.callback_error(self.name, exc)
