"""A cluster edge (`python -m pricewatch edge`): websockets and market REST from Redis.

An edge has no database, no feeds and no alert engine. It keeps its own `Market` (latest
prices and a CandleBook) and `Hub`, applies what the core publishes (core.py) to them and
marks the hub's topics dirty, so the hub's own renderers make the very messages a single
process makes, under the same per-client limits: the hub does not know where its state came
from. User and topic events (alerts, quotes) are handed to the hub byte for byte.

Tokens: verified with the shared PRICEWATCH_JWT_SECRET and the revocations heard from the
core (kept in Redis for a starting edge). The single process also refuses the token of a
user deleted from the database since it was issued; an edge cannot look (no database) and
serves such a token until it expires, like any stateless JWT verifier.

Losing Redis: sockets stay open (they only see no updates), /healthz answers 503 `stale`
with the Redis state, the bus reconnects with backoff, and the snapshot read at the new
connection brings prices and candles up to date; a candle that changed meanwhile is sent to
its subscribers like any update.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import orjson
from aiohttp import web

from .. import auth
from ..api import ApiError, json_response
from ..config import Settings
from ..hub import Hub
from ..market import HUB, Market, ohlc, serve_ws
from ..metrics import HTTP_METRICS, Exposition, render_http, render_websockets
from ..resume import Events, Resumer
from .bus import RedisBus
from .core import (
    EVENTS_FLOOR,
    EVENTS_KEPT,
    LATEST,
    QUOTE,
    REVOKED,
    SEQ,
    candles_key,
    events_key,
)

log = logging.getLogger(__name__)


class Edge:
    """Applies the core's messages to this process's market, hub and auth."""

    def __init__(self, settings: Settings, market: Market, hub: Hub, auth_: auth.Auth):
        assert settings.redis_url is not None
        self.settings = settings
        self.market = market
        self.hub = hub
        self.auth = auth_
        self.bus = RedisBus(settings.redis_url, self._on_connect, self._on_message)
        self.timeframes = market.candles.timeframes
        self.quote: bytes | None = None  # the latest quote message, for new /ws/rates/
        self.synced_seq = 0  # the snapshot's seq: state messages up to it are in it
        self.resyncs = 0
        # Live-feed resumes, answered from the users' Redis streams (resume.py: the same
        # limits and messages as the single process).
        self.resumer = Resumer(hub, self._events)
        self.applied = 0  # state messages applied

    # -- the bus ----------------------------------------------------------------------

    async def _on_connect(self, client) -> None:
        await self._resync(client)

    async def _resync(self, client) -> None:
        """Read the whole snapshot in one transaction and make memory equal to it."""
        symbols = self.market.symbols
        pipe = client.pipeline(transaction=True)
        pipe.get(SEQ)
        pipe.hgetall(LATEST)
        pipe.get(QUOTE)
        pipe.zrangebyscore(REVOKED, time.time() - self.settings.access_ttl, "+inf", withscores=True)
        for symbol in symbols:
            for tf in self.timeframes:
                pipe.hgetall(candles_key(symbol, tf))
        seq, latest, quote, revoked, *rings = await pipe.execute()
        self.synced_seq = int(seq or 0)
        for family, at in revoked:
            self._revoke(family.decode(), at)
        if quote is not None:
            self.quote = quote
        book = self.market.candles
        rings_iter = iter(rings)
        for symbol in symbols:
            changed: dict[str, list[int]] = {}
            for tf in self.timeframes:
                stored = next(rings_iter)
                rows = sorted((symbol, tf, *orjson.loads(v)) for v in stored.values())
                before = {row[2]: row for row in book.between(symbol, tf, 0, 2**62)}
                book.seed(symbol, tf, rows, replace_from=0)
                changed[tf] = [row[2] for row in rows if before.get(row[2]) != row]
            raw = latest.get(symbol.encode())
            price = raw is not None and self._set_latest(symbol, orjson.loads(raw))
            self._touch(symbol, price, changed)
        self.resyncs += 1
        log.info("edge synchronised from the snapshot (seq %d)", self.synced_seq)

    def _on_message(self, data: bytes):
        head, _, payload = data.partition(b"\n")
        header = orjson.loads(head)
        kind = header["k"]
        if kind == "state":
            if header["seq"] > self.synced_seq:  # older ones are in the snapshot read
                self._apply_state(header["prices"], header["candles"])
        elif kind == "user":
            self._user_event(header["u"], header.get("e"), payload)
        elif kind == "topic":
            topic = header["t"]
            if isinstance(topic, list):
                topic = tuple(topic)
            if topic == "rates":
                self.quote = payload
            self.hub.publish_event(topic, payload)
        elif kind == "revoke":
            self._revoke(header["f"], header["at"])
        elif kind == "resync":  # the core wrote a new snapshot (it reconnected)
            client = self.bus.client
            if client is not None and header["seq"] > self.synced_seq:
                return self._resync(client)
        return None

    # -- alert events and resume -------------------------------------------------------

    def _user_event(self, user_id: int, event_id: int | None, payload: bytes) -> None:
        self.resumer.deliver(user_id, event_id, payload)

    def resume_client(self, hub: Hub, client, data: dict) -> None:
        """A live-feed client's `{"action": "resume", "since": EVENT_ID}`, answered as the
        core answers it (alerts.AlertEngine.resume, resume.py): the user's alert events
        after `since` in order (at most REPLAY_MAX, then `"more": true`), then `{"type":
        "resumed", "since", "last", "more", "complete"}`, then the live ones with no gap and
        no duplicate; once per RESUME_EVERY seconds per connection. They come from the
        user's Redis stream (the last EVENTS_KEPT); `complete` is false when older ones may
        be missing (the stream was trimmed, or Redis restarted since): GET /api/v1/events
        on the core has them all."""
        since = self.resumer.check(client, data)
        if since is None:
            return

        def send(data: bytes) -> None:
            hub.send(client, data)

        self.resumer.start(client.user_id, since, send, client)

    def _events(self, user_id: int, since: int) -> Callable[[], Awaitable[Events]]:
        async def read() -> Events:
            client = self.bus.client
            if client is None:
                raise ConnectionError("no Redis")
            pipe = client.pipeline(transaction=True)
            pipe.get(EVENTS_FLOOR)
            pipe.xrange(events_key(user_id))
            floor, entries = await pipe.execute()
            complete = (
                floor is not None
                and since >= int(floor)
                and (len(entries) < EVENTS_KEPT or int(entries[0][1][b"e"]) <= since)
            )
            events = ((int(fields[b"e"]), fields[b"d"]) for _, fields in entries)
            return [(event_id, data) for event_id, data in events if event_id > since], complete

        return read

    async def drained(self) -> None:
        """For shutdown (server.close_websockets): nothing is committed here."""

    async def stop(self) -> None:
        await self.resumer.stop()

    # -- applying ---------------------------------------------------------------------

    def _set_latest(self, symbol: str, row: list) -> bool:
        latest = self.market.latest.get(symbol)
        if latest is None:
            return False
        latest.price, latest.time, latest.bid, latest.ask = row
        return True

    def _apply_state(self, prices: dict[str, list], candles: list[list]) -> None:
        self.applied += 1
        book = self.market.candles
        changed: dict[str, dict[str, list[int]]] = {}
        for symbol, tf, wire in candles:
            if symbol in self.market.latest:
                book.put(symbol, tf, (symbol, tf, *wire))
                changed.setdefault(symbol, {}).setdefault(tf, []).append(wire[0])
        for symbol in (set(prices) & self.market.latest.keys()) | set(changed):
            # (a symbol this edge does not watch: PRICEWATCH_SYMBOLS differs from the core's)
            price = symbol in prices and self._set_latest(symbol, prices[symbol])
            self._touch(symbol, price, changed.get(symbol, {}))

    def _touch(self, symbol: str, price: bool, candles: dict[str, list[int]]) -> None:
        """Tell the hub what changed; it renders and sends at each client's max_rate."""
        market, hub = self.market, self.hub
        market.ticks[symbol] = market.ticks.get(symbol, 0) + 1  # snapshot cache version
        if not hub.topics:
            return
        if price:
            for fmt in (None, *market.price_formats):
                topic = market.price_topic(symbol, fmt)
                if topic in hub.topics:
                    hub.mark_dirty(topic)
        for tf, starts in candles.items():
            topic = ("ohlc", symbol, tf)
            if topic in hub.topics:
                for start in starts:
                    hub.mark_dirty(topic, start)

    def _revoke(self, family: str, at: float) -> None:
        """A login ended on the core: its sockets here close now (1008)."""
        self.auth.note_revoked(family, at)
        for client in tuple(self.hub.clients):
            if client.family == family:
                self.hub.end_session(client)


EDGE = web.AppKey("edge", Edge)
START_WAIT = 5.0  # seconds an edge waits for its first snapshot before serving


async def edge_ctx(app: web.Application) -> AsyncIterator[None]:
    """A cluster edge: tokens checked with the shared secret and the revocations heard;
    market state and events from Redis. Serving starts once the snapshot is read (or after
    START_WAIT seconds without Redis: then /healthz says so)."""
    from ..alerts import ENGINE, AlertEngine
    from ..market import MARKET
    from ..server import SETTINGS, background

    settings = app[SETTINGS]
    assert settings.jwt_secret is not None  # Settings.from_env requires it for an edge
    # No database: no user check (see the docstring). Auth.store is typed Store for the core's
    # routes, which need one; an edge serves none of them.
    auth_ = app[auth.AUTH] = auth.Auth(
        settings,
        None,  # type: ignore[arg-type]
        settings.jwt_secret,
        {},
    )
    app[HUB].revoked = auth_.revoked
    edge = app[EDGE] = Edge(settings, app[MARKET], app[HUB], auth_)
    # The live feed's `resume` asks app[ENGINE]; on an edge the Edge answers it from Redis.
    app[ENGINE] = cast(AlertEngine, edge)  # an edge has no engine; only `resume` is asked
    async with background(edge.bus.run(), "redis-bus"):
        try:
            async with asyncio.timeout(START_WAIT):
                await edge.bus.ready()
        except TimeoutError:
            log.warning(
                "no Redis yet (%s): serving without market data until it answers",
                edge.bus.health().get("error", "connecting"),
            )
        try:
            yield
        finally:
            await edge.stop()


# -- routes that differ from the single process's ---------------------------------------


async def healthz(request: web.Request) -> web.Response:
    """200 `ok` while connected to Redis and synchronised; else 503 `stale` (the sockets
    stay open; prices and candles catch up at the next connection)."""
    edge = request.app[EDGE]
    health = edge.bus.health()
    ok = health["connected"]
    body = {"status": "ok" if ok else "stale", "role": "edge", "redis": health}
    return json_response(body, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    edge, hub = app[EDGE], app[HUB]
    out = Exposition()
    render_websockets(out, hub)
    bus = edge.bus
    for name, kind, text, value in [
        (
            "pricewatch_redis_connected",
            "gauge",
            "1 while connected to Redis.",
            int(bus.client is not None),
        ),
        (
            "pricewatch_redis_reconnects_total",
            "counter",
            "Redis reconnect attempts.",
            bus.reconnects,
        ),
        ("pricewatch_redis_messages_total", "counter", "Bus messages received.", bus.received),
        ("pricewatch_redis_resyncs_total", "counter", "Snapshots read from Redis.", edge.resyncs),
    ]:
        out.metric(name, kind, text)
        out.sample(name, value)
    edge.resumer.render_metrics(out)
    render_http(out, app[HTTP_METRICS])
    return web.Response(
        body=out.text().encode(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


async def edge_ohlc(request: web.Request) -> web.StreamResponse:
    """`/api/v1/ohlc` from memory; `start`/`end` (stored history) only the core serves."""
    if "start" in request.query or "end" in request.query:
        raise ApiError(
            503, "unavailable", "Candle history (start/end) is served by the core, not by an edge."
        )
    return await ohlc(request)


async def ws_rates(request: web.Request) -> web.StreamResponse:
    """`/ws/rates/` as quotes_api serves it: the latest quote on connect, then every new
    one (both from the core, over Redis)."""
    edge, hub = request.app[EDGE], request.app[HUB]

    def on_open(client) -> None:
        if edge.quote is not None:
            hub.send(client, edge.quote)
        hub.subscribe(client, "rates")

    def on_message(client, data: dict) -> None:
        hub.send(
            client, orjson.dumps({"type": "error", "detail": "This stream takes no messages."})
        )

    return await serve_ws(request, "rates", None, on_open, on_message)


def routes() -> list[tuple[str, str, Any]]:
    from .. import market

    return [
        ("GET", "/healthz", healthz),
        ("GET", "/metrics", metrics),
        ("GET", "/api/v1/prices", market.prices),
        ("GET", "/api/v1/prices/{symbol}", market.price),
        ("GET", "/api/v1/ohlc", edge_ohlc),
        ("GET", "/live-feed/subscribe", market.live_feed),
        ("GET", "/ws/ohlc", market.ws_ohlc),
        ("GET", "/ws/rates", ws_rates),
    ]
