"""Market data: the tick pipeline and its public face (prices, candles, market websockets).

`Market.on_tick` is THE tick path: one synchronous call per trade that updates the latest
price, adds the trade to the candles, runs the trade hooks (the alert engine) and marks the
price and candle topics dirty on the hub (state: the hub's rate groups render and send them,
conflated, at each subscription's max_rate). It never awaits, never serialises and never
touches SQLite.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from . import auth, clock
from .addresses import client_address, limit_key
from .alerts import ENGINE
from .api import ApiError, invalid, json_response, not_found
from .candle_writer import CANDLE_WRITER
from .feeds import Bar, Book, Tick
from .hub import MAX_SUBSCRIPTIONS, TOO_MANY_MESSAGES, WS_RATE, Client, Disconnect, Hub, frame
from .limits import WS_MAX_MESSAGE
from .ohlc import DAY_OF_MINUTES, TIMEFRAMES, CandleBook, candle_dict
from .upstream.history import KlineFill
from .ws_gate import FrameGate

log = logging.getLogger(__name__)

MAX_WS_MESSAGE = WS_MAX_MESSAGE
HEARTBEAT = 20.0  # seconds between server pings; a peer that does not answer is reaped
SNAPSHOT_CACHE = 32  # framed snapshots kept for repeated requests (at most ~4 MB)
WS_RETRY_AFTER = 10  # seconds suggested to an address refused for holding too many sockets
TOO_MANY_TOPICS = f"At most {MAX_SUBSCRIPTIONS} subscriptions per connection."


class Latest:
    """Latest trade and book of one symbol."""

    __slots__ = ("symbol", "price", "time", "bid", "ask")

    def __init__(self, symbol: str):
        self.symbol = symbol
        self.price: float | None = None
        self.time: int | None = None
        self.bid: float | None = None
        self.ask: float | None = None

    def public(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "price": self.price,
            "bid": self.bid,
            "ask": self.ask,
            "time": clock.iso_ms(self.time) if self.time is not None else None,
        }

    def with_day(self, candles: CandleBook) -> dict[str, Any]:
        """`public()` plus the rolling 24 h figures from the 1m candles (null until known)."""
        out = self.public()
        day = candles.rolling(self.symbol)
        price = self.price
        if day is None or price is None:
            out.update(open_24h=None, high_24h=None, low_24h=None, volume_24h=None, change_24h=None)
        else:
            open_, high, low, volume = day
            # The latest trade is within its own day, even when its candle is not (a late
            # trade, a ring seeded from elsewhere): high >= price >= low, always.
            high, low = max(high, price), min(low, price)
            out.update(
                open_24h=open_,
                high_24h=high,
                low_24h=low,
                volume_24h=round(volume, 8),
                change_24h=round((price - open_) / open_ * 100, 4),
            )
        return out


def price_message(latest: Latest) -> bytes:
    """The live feed's own price message, `{"type": "price", symbol, price, bid, ask, time}`."""
    return orjson.dumps({"type": "price", **latest.public()})


PriceFormat = Callable[[Latest], bytes]


SEEN_IDS = 2048  # trades per symbol remembered to drop a duplicate (a power of two)
_MAX_ID = 1 << 63


class SeenTrades:
    """The last SEEN_IDS trades of one symbol, as (id, time) in slots by id: a trade already
    taken (two feeds of one market, however they got past the one-feed-per-market check)
    is recognised in O(1) without allocating. The time makes the key: after a venue's id
    reset, old ids come back with new times and are new trades."""

    __slots__ = ("ids", "times")

    def __init__(self) -> None:
        self.ids = array("q", bytes(8 * SEEN_IDS))
        self.times = array("q", bytes(8 * SEEN_IDS))

    def seen(self, trade_id: int, time_ms: int) -> bool:
        """True when this trade was taken already; otherwise remembers it (False)."""
        if not 0 < trade_id < _MAX_ID or not 0 < time_ms < _MAX_ID:
            return False  # 0 is an empty slot; past int64 cannot be stored (nor is real)
        slot = trade_id & (SEEN_IDS - 1)
        if self.ids[slot] == trade_id and self.times[slot] == time_ms:
            return True
        self.ids[slot] = trade_id
        self.times[slot] = time_ms
        return False


class Market:
    """Latest prices, candles and the fan-out of both, for the watched symbols."""

    def __init__(self, symbols: tuple[str, ...], hub: Hub, candles: CandleBook | None = None):
        self.symbols = symbols
        self.hub = hub
        self.candles = candles or CandleBook(sizes=DAY_OF_MINUTES)
        self.latest = {s: Latest(s) for s in symbols}
        # Trades per symbol. Also the version of its candles: every change to them comes
        # through on_tick (a new path that changes candles must bump it too).
        self.ticks = dict.fromkeys(symbols, 0)
        self._seen = {s: SeenTrades() for s in symbols}
        self.duplicates = 0  # trades dropped as already taken (same id and time)
        self._snapshots: dict[tuple[str, str, int], tuple[int, bytes]] = {}
        self.trade_hooks: list[Callable[[Tick], None]] = []
        self.bar_hooks: list[Callable[[Bar], None]] = []
        self.closed = False  # set at shutdown: ticks still arriving are ignored
        # Topic keys built once, so the tick path allocates no tuples.
        self._price_topic = {s: ("price", s) for s in symbols}  # shared by every subscriber
        self._candle_topics = {
            s: [(ms, ("ohlc", s, tf)) for tf, ms in TIMEFRAMES.items()] for s in symbols
        }
        # Other price message formats a live-feed client may ask for (`?format=NAME`), added
        # by compat.py (seed 000's "binance"). Each has its own state topic per symbol, so a
        # message is rendered once per flush, not once per client.
        self.price_formats: dict[str, PriceFormat] = {}
        self._format_topics: dict[str, list[tuple]] = {s: [] for s in symbols}
        hub.register_state("price", self._render_price)
        hub.register_state("ohlc", self._render_candle)

    def add_price_format(self, name: str, render: PriceFormat) -> None:
        """Offer `?format=name` on the live feed: each price message is `render(latest)`."""
        self.price_formats[name] = render
        for symbol, topics in self._format_topics.items():
            topics.append(self.price_topic(symbol, name))

    def price_topic(self, symbol: str, fmt: str | None = None) -> tuple:
        """The hub topic of `symbol`'s price messages in format `fmt` (None: the default)."""
        return self._price_topic[symbol] if fmt is None else ("price", symbol, fmt)

    def on_tick(self, tick: Tick) -> None:
        symbol = tick.symbol
        latest = self.latest.get(symbol)
        if latest is None or self.closed:
            return
        if tick.trade_id is not None and self._seen[symbol].seen(tick.trade_id, tick.time):
            self.duplicates += 1  # never counted twice in candles or volumes
            return
        latest.price = tick.price
        latest.time = tick.time
        self.ticks[symbol] += 1
        self.candles.add(symbol, tick.price, tick.qty, tick.time, tick.count)
        for hook in self.trade_hooks:
            hook(tick)
        hub = self.hub
        topics = hub.topics
        if not topics:
            return
        topic = self._price_topic[symbol]
        if topic in topics:
            hub.mark_dirty(topic)
        for topic in self._format_topics[symbol]:  # `?format=` clients
            if topic in topics:
                hub.mark_dirty(topic)
        at = tick.time
        for ms, candle_topic in self._candle_topics[symbol]:
            if candle_topic in topics:  # keyed by the candle's start: each touched one is sent
                hub.mark_dirty(candle_topic, at - at % ms)

    def _render_price(self, topic: tuple, key: object) -> bytes:
        latest = self.latest[topic[1]]
        return price_message(latest) if len(topic) == 2 else self.price_formats[topic[2]](latest)

    def _render_candle(self, topic: tuple, start: object) -> bytes | None:
        _, symbol, tf = topic
        # The hub's keys are opaque; a candle topic's are the candles' start times (ms).
        candle = self.candles.candle_at(symbol, tf, start)  # type: ignore[arg-type]
        if candle is None:  # a late trade older than the ring: dropped, no change
            return None
        return orjson.dumps({"type": "candle", "symbol": symbol, "timeframe": tf, "candle": candle})

    def snapshot(self, symbol: str, timeframe: str, limit: int) -> bytes:
        """The framed `/ws/ohlc/` snapshot message of the newest `limit` candles.

        Built (~0.7 ms and ~128 KB for 1000 candles) at most once per change of the symbol's
        candles; repeated requests, however many clients send them, cost a lookup. The
        SNAPSHOT_CACHE most recently used are kept.
        """
        key = (symbol, timeframe, limit)
        version = self.ticks[symbol]
        cached = self._snapshots.pop(key, None)
        if cached is None or cached[0] != version:
            cached = (
                version,
                frame(
                    orjson.dumps(
                        {
                            "type": "snapshot",
                            "symbol": symbol,
                            "timeframe": timeframe,
                            "data": self.candles.candles(symbol, timeframe, limit),
                        }
                    )
                ),
            )
        self._snapshots[key] = cached  # (re)inserted last: the dict is ordered by use
        if len(self._snapshots) > SNAPSHOT_CACHE:
            del self._snapshots[next(iter(self._snapshots))]
        return cached[1]

    def on_bar(self, bar: Bar) -> None:
        """A kline filling a gap too large for trades: into the candles (1m and longer) and
        the bar hooks (the alert engine)."""
        if bar.symbol not in self.latest or self.closed:
            return
        self.candles.merge_bar(
            bar.symbol,
            bar.start,
            bar.end,
            bar.open,
            bar.high,
            bar.low,
            bar.close,
            bar.volume,
            bar.trades,
        )
        self._snapshots.clear()
        for hook in self.bar_hooks:
            hook(bar)

    def on_history(self, fill: KlineFill) -> None:
        """History from REST klines replaces the ring's part it covers (and is stored)."""
        if fill.symbol in self.latest:
            self.candles.seed(fill.symbol, fill.timeframe, fill.rows, fill.replace_from, touch=True)
            self._snapshots.clear()  # built from the candles just replaced

    def on_book(self, book: Book) -> None:
        latest = self.latest.get(book.symbol)
        if latest is not None:
            latest.bid = book.bid
            latest.ask = book.ask

    def price(self, symbol: str) -> float | None:
        latest = self.latest.get(symbol)
        return latest.price if latest is not None else None


MARKET = web.AppKey("market", Market)
HUB = web.AppKey("hub", Hub)


def _symbol(request: web.Request, raw: object) -> str | None:
    """The watched symbol named by `raw` (any case), or None."""
    if not isinstance(raw, str):
        return None
    symbol = raw.strip().upper()
    return symbol if symbol in request.app[MARKET].latest else None


async def prices(request: web.Request) -> web.Response:
    market = request.app[MARKET]
    results = [lt.with_day(market.candles) for lt in market.latest.values() if lt.price is not None]
    return json_response({"results": results})


async def price(request: web.Request) -> web.Response:
    market = request.app[MARKET]
    symbol = _symbol(request, request.match_info["symbol"])
    if symbol is None or market.latest[symbol].price is None:
        raise not_found("No price known for this symbol.")
    return json_response(market.latest[symbol].with_day(market.candles))


def _ohlc_params(request: web.Request, source: dict) -> tuple[str, str, int]:
    """(symbol, timeframe, limit) from a query or a websocket message; raises ApiError 400."""
    errors = {}
    symbol = _symbol(request, source.get("symbol"))
    if source.get("symbol") in (None, ""):
        errors["symbol"] = "This field is required."
    elif symbol is None:
        errors["symbol"] = "Not a watched symbol: " + ", ".join(request.app[MARKET].symbols)
    timeframe = source.get("timeframe", "1m")
    # A websocket message may carry any JSON here; a list is unhashable for the dict lookup.
    if not isinstance(timeframe, str) or timeframe not in TIMEFRAMES:
        errors["timeframe"] = "Must be one of " + " ".join(TIMEFRAMES) + "."
    raw_limit = source.get("limit", 100)
    try:
        if isinstance(raw_limit, bool | float):
            raise ValueError
        limit = int(raw_limit)
        if not 1 <= limit <= 1000:
            raise ValueError
    except (TypeError, ValueError):
        errors["limit"] = "Ensure this value is an integer between 1 and 1000."
        limit = 0
    if errors:
        raise invalid(errors)
    assert symbol is not None  # else an error above
    return symbol, timeframe, limit


async def ohlc(request: web.Request) -> web.Response:
    """Candles: the newest `limit` in memory, or with `start`/`end` (ISO-8601 or ms, both
    inclusive) the newest `limit` starting in that range, stored history included."""
    query = request.query
    errors: dict[str, str] = {}
    span: dict[str, int] = {}
    for name in ("start", "end"):
        if name in query:
            ms = clock.parse_time_ms(query[name])
            if ms is None:
                errors[name] = "Enter an ISO-8601 time or milliseconds since the epoch."
            else:
                span[name] = ms
    try:
        symbol, timeframe, limit = _ohlc_params(request, dict(query))
    except ApiError as exc:
        raise invalid({**(exc.fields or {}), **errors}) from None
    if errors:
        raise invalid(errors)
    if not span:
        data = request.app[MARKET].candles.candles(symbol, timeframe, limit)
    else:
        start, end = span.get("start", 0), span.get("end", 2**53)
        rows = await request.app[CANDLE_WRITER].between(symbol, timeframe, start, end, limit)
        data = [candle_dict(row) for row in rows]
    return json_response({"symbol": symbol, "timeframe": timeframe, "data": data})


def _error(detail: str) -> bytes:
    return orjson.dumps({"type": "error", "detail": detail})


def _ws_message(msg) -> dict | None:
    """A client's text message as a JSON object, or None when it is anything else."""
    if msg.type != WSMsgType.TEXT:
        return None
    try:
        data = orjson.loads(msg.data)
    except orjson.JSONDecodeError:  # includes nesting past orjson's depth limit
        return None
    return data if isinstance(data, dict) else None


def _max_rate(hub: Hub, data: dict) -> tuple[int | None, dict[str, str]]:
    """A subscribe message's `max_rate` (None: the default) and field errors."""
    raw = data.get("max_rate")
    if raw is None:
        return None, {}
    if type(raw) is int and (raw == 0 or 1 <= raw <= hub.max_rate):
        return raw, {}
    return None, {
        "max_rate": f"Ensure this value is an integer between 1 and {hub.max_rate}, "
        "or 0 for every update."
    }


def _named(values: list, most: int = 5) -> str:
    """A few client-sent values for an error text: strings (shortened) as they are, anything
    else only by its JSON type. (str() of a deeply nested list raises RecursionError.)"""
    shown = [v[:32] if isinstance(v, str) else f"<{type(v).__name__}>" for v in values[:most]]
    return ", ".join(shown) + (f" and {len(values) - most} more" if len(values) > most else "")


def _gate(hub: Hub, client: Client) -> FrameGate | None:
    """Connect the client to the FrameGate that counts its input (every frame, pings
    included, before aiohttp parses it; see ws_gate.py): past the budget it is dropped.
    None when the server was not started by httpd.make_runner: messages are then counted
    one by one as they are read (`hub.received`)."""
    gate = getattr(client.request.protocol, "ws_gate", None)
    if gate is None:
        return None
    client.gate, client.inbound = gate, gate.bucket

    def over(reason: Disconnect) -> None:
        why = (
            f"over {WS_RATE:g} frames/s"
            if reason is TOO_MANY_MESSAGES
            else f"a message of {gate.max_size} bytes or more"
        )
        hub.drop(client, reason, why)

    gate.on_over = over
    if gate.over is not None:  # already, in what came with the upgrade request
        over(gate.over)
    return gate


async def serve_ws(
    request: web.Request,
    endpoint: str,
    user_id: int | None,
    on_open: Callable[[Client], None] | None,
    on_message: Callable[[Client, dict], None],
) -> web.WebSocketResponse:
    """Run one websocket: admit its client address, attach to the hub, dispatch client
    messages (rate-limited), detach at the end.

    Raises ApiError 429 `rate_limited` *before* the upgrade when the client address already
    holds `max_ws_per_address` websockets. Nothing a client sends makes this raise after the
    upgrade (an HTTP error response cannot be written into an upgraded socket): a message
    whose handler fails is answered `{"type": "error"}` and the connection stays open.
    """
    hub = request.app[HUB]
    address = limit_key(client_address(request))  # an IPv6 client counts by its /64
    if not hub.admit(address):
        raise ApiError(
            429,
            "rate_limited",
            f"At most {hub.max_per_address} open websockets per client address.",
            headers={"Retry-After": str(WS_RETRY_AFTER)},
        )
    try:
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT, compress=False, max_msg_size=MAX_WS_MESSAGE)
        await ws.prepare(request)
        client = hub.attach(ws, request, endpoint, user_id)
        gate = _gate(hub, client)
        try:
            if on_open is not None and not client.closed:
                on_open(client)
            async for msg in ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY) or client.closed:
                    continue  # a client being closed: what it still sends is ignored
                if gate is None and not hub.received(client):
                    continue  # over the message rate: now being closed with 1008
                data = _ws_message(msg)
                if data is None:
                    hub.send(client, _error("Messages must be JSON objects."))
                    continue
                try:
                    on_message(client, data)
                except Exception:  # content must never kill the connection (see above)
                    log.debug("%s message handler failed", endpoint, exc_info=True)
                    hub.send(client, _error("Invalid message."))
        finally:
            await hub.detach(client)
    finally:
        hub.release(address)
    return ws


def _price_format(request: web.Request, market: Market) -> str | None:
    """The live feed's `?format=` (None: this server's own messages); 400 for an unknown one."""
    fmt = request.query.get("format")
    if fmt is not None and fmt not in market.price_formats:
        raise invalid({"format": "Must be one of: " + ", ".join(market.price_formats) + "."})
    return fmt


def _symbols_asked(request: web.Request, market: Market, data: dict) -> list[str] | str:
    """The watched symbols a live-feed (un)subscribe message names (every one when it names
    none), or the error to answer it with."""
    raw = data.get("symbols", list(market.symbols))
    if not isinstance(raw, list) or not raw:
        return "symbols must be a non-empty list of symbols."
    named = [_symbol(request, s) for s in raw]
    unknown = [s for s, known in zip(raw, named, strict=True) if known is None]
    if unknown:
        return "Unknown symbols: " + _named(unknown) + ". Watched: " + ", ".join(market.symbols)
    return [s for s in named if s is not None]  # all of them, by now


def _subscribe(hub: Hub, client: Client, topics: set, data: dict) -> bool:
    """Subscribe `client` to every one of `topics` at the message's max_rate; False when
    it is answered with an error instead (all or nothing)."""
    max_rate, errors = _max_rate(hub, data)
    if errors:
        hub.send(
            client, orjson.dumps({"type": "error", "detail": "Invalid max_rate.", "fields": errors})
        )
        return False
    if len(client.topics | topics) > MAX_SUBSCRIPTIONS:
        hub.send(client, _error(TOO_MANY_TOPICS))
        return False
    for topic in topics:
        hub.subscribe(client, topic, max_rate)
    return True


async def live_feed(request: web.Request) -> web.StreamResponse:
    """`/live-feed/subscribe/`: prices of subscribed symbols (state, at most `max_rate` a
    second per symbol) and the user's alert events (every one, in order)."""
    identity = auth.require_identity(request, allow_query=True)  # 401 before the upgrade
    market, hub = request.app[MARKET], request.app[HUB]
    fmt = _price_format(request, market)
    render = price_message if fmt is None else market.price_formats[fmt]

    def send_prices(client: Client, symbols) -> None:
        for symbol in symbols:
            latest = market.latest[symbol]
            if latest.price is not None:
                hub.send(client, render(latest))

    def on_open(client: Client) -> None:
        default = market.symbols[:MAX_SUBSCRIPTIONS]  # every watched symbol, up to the cap
        for symbol in default:
            hub.subscribe(client, market.price_topic(symbol, fmt))
        send_prices(client, default)

    def on_message(client: Client, data: dict) -> None:
        action = data.get("action")
        if action == "resume":  # alert events missed meanwhile (alerts.py)
            request.app[ENGINE].resume_client(hub, client, data)
            return
        if action not in ("subscribe", "unsubscribe"):
            hub.send(client, _error("action must be subscribe or unsubscribe."))
            return
        symbols = _symbols_asked(request, market, data)
        if isinstance(symbols, str):
            hub.send(client, _error(symbols))
            return
        topics = {market.price_topic(symbol, fmt) for symbol in symbols}
        if action == "subscribe":
            if not _subscribe(hub, client, topics, data):
                return
        else:
            for topic in topics:
                hub.unsubscribe(client, topic)
        current = sorted(t[1] for t in client.topics if t[0] == "price")
        hub.send(client, orjson.dumps({"type": action + "d", "symbols": current}))
        if action == "subscribe":
            send_prices(client, symbols)

    def on_open_session(client: Client) -> None:
        client.expires, client.family = identity.expires, identity.family
        on_open(client)

    # Another format serves clients that expect nothing but price messages (seed 000's):
    # they get no alert events.
    user_id = identity.user_id if fmt is None else None
    return await serve_ws(request, "live", user_id, on_open_session, on_message)


async def ws_ohlc(request: web.Request) -> web.StreamResponse:
    """`/ws/ohlc/`: a snapshot of a symbol's candles, then its candle's changes (state, at
    most `max_rate` a second: each message holds the newest state of a candle)."""
    market, hub = request.app[MARKET], request.app[HUB]

    def on_message(client: Client, data: dict) -> None:
        max_rate, errors = _max_rate(hub, data)
        try:
            symbol, timeframe, limit = _ohlc_params(request, data)
        except ApiError as exc:
            errors = {**(exc.fields or {}), **errors}
        if errors:  # answer on the socket, keep it open
            hub.send(
                client,
                orjson.dumps(
                    {"type": "error", "detail": "Invalid subscription.", "fields": errors}
                ),
            )
            return
        topic = ("ohlc", symbol, timeframe)
        if data.get("action") == "unsubscribe":
            hub.unsubscribe(client, topic)
            return
        # Subscription and snapshot in one synchronous step: no update can slip between.
        if not hub.subscribe(client, topic, max_rate):
            hub.send(client, _error(TOO_MANY_TOPICS))
            return
        hub.send_framed(client, market.snapshot(symbol, timeframe, limit))

    return await serve_ws(request, "ohlc", None, None, on_message)
