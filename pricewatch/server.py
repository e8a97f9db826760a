"""The aiohttp application: app factory, middlewares, routes and lifetimes.

`create_app(settings)` wires every part; `main()` in __main__.py only parses argv,
configures logging and runs it. Startup order (cleanup contexts) follows DESIGN.md:
store -> auth -> (engine, hub, writer, deliveries, feeds); shutdown is the reverse.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, cast

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from . import alerts_api, auth, compat, docs_page, feed_admin, market, openapi, quotes_api, startup
from .addresses import CLIENT_ADDRESSES, ClientAddresses, client_address
from .alerts import ENGINE, AlertEngine
from .api import json_response
from .candle_writer import CANDLE_WRITER, CandleWriter
from .channels_api import add_routes as add_channel_routes
from .cluster.bus import require_redis
from .cluster.core import PUBLISHER, RelayHub, core_ctx
from .cluster.edge import edge_ctx
from .config import Settings
from .delivery.email import MAILER, EmailSink
from .delivery.outbox import DELIVERER, Deliverer, make_sinks
from .delivery.outbox import render_metrics as render_delivery_metrics
from .errors import MAX_BODY, Handler, error_middleware
from .feed_admin import EXTRA_FEEDS, HEALTH, ExtraFeeds, FeedRunner, binance_factory
from .feeds import Feed
from .httpd import make_runner
from .hub import Hub
from .links import PUBLIC_URL
from .market import HUB, MARKET, Market
from .metrics import (
    HTTP_METRICS,
    Exposition,
    HttpMetrics,
    metrics_middleware,
    render_http,
    render_websockets,
)
from .store import Store
from .upstream.alphavantage import QuotePoller
from .upstream.binance_rest import MARKETS, BinanceRest
from .upstream.demo_quotes import DemoQuotes
from .upstream.factory import make_feed
from .verify_api import add_routes as add_verify_routes

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)


async def healthz(request: web.Request) -> web.Response:
    app = request.app
    try:  # "degraded": writes fail (disk full, read-only file), reads work
        async with asyncio.timeout(2.0):
            status = db = await app[STORE].ping()
    except Exception as exc:  # any failure means "not healthy", reported, not raised
        status, db = "error", f"error: {type(exc).__name__}"
    feeds = {name: health() for name, health in app[HEALTH].items()}
    stale = sorted(name for name, h in feeds.items() if h.get("stale"))
    if stale and status == "ok":
        status = "stale"
    degraded = sorted(name for name, h in feeds.items() if h.get("degraded"))
    if degraded and status == "ok":
        status = "degraded"
    body = {"status": status, "db": db, "feeds": feeds}
    if stale:
        body["stale_feeds"] = stale
    if degraded:
        body["degraded_feeds"] = degraded
    if PUBLISHER in app:  # a cluster's core: edges see nothing new while Redis is away
        body["redis"] = redis = app[PUBLISHER].bus.health()
        if not redis["connected"] and status == "ok":
            body["status"] = status = "stale"
    return json_response(body, status=200 if status == "ok" else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of the whole process."""
    app = request.app
    out = Exposition()
    mkt, hub, engine = app[MARKET], app[HUB], app[ENGINE]
    out.metric("pricewatch_ticks_total", "counter", "Trades ingested, per symbol.")
    for symbol, count in mkt.ticks.items():
        out.sample("pricewatch_ticks_total", count, symbol=symbol)
    out.metric(
        "pricewatch_trades_duplicate_total",
        "counter",
        "Trades dropped as already taken (same id and time, from any feed).",
    )
    out.sample("pricewatch_trades_duplicate_total", mkt.duplicates)
    healths = {name: health() for name, health in app[HEALTH].items()}
    for key, kind, text in [
        ("messages", "counter", "Upstream messages received."),
        ("reconnects", "counter", "Upstream reconnect attempts."),
        ("parse_errors", "counter", "Malformed upstream messages."),
        ("out_of_order", "counter", "Trades dropped: ids already passed."),
        ("future_trades", "counter", "Trades dropped: from the future."),
        ("id_resets", "counter", "Trade-id sequences started again."),
        ("degraded", "gauge", "1 while trades are dropped out of order."),
        ("stale", "gauge", "1 when a live feed sent nothing for too long."),
    ]:
        name = f"pricewatch_feed_{key}" + ("_total" if kind == "counter" else "")
        out.metric(name, kind, text)
        for feed, health in healths.items():
            if key in health:
                out.sample(name, health[key] or 0, feed=feed)
    for key, text in [
        ("gaps", "Trade-id gaps seen, per symbol."),
        ("missed_trades", "Trades missed and not recovered, per symbol."),
        ("backfilled_trades", "Missed trades recovered over REST, per symbol."),
        (
            "kline_filled_trades",
            "Missed trades accounted for by 1m klines (gaps too large to fetch).",
        ),
    ]:
        name = f"pricewatch_feed_{key}_total"
        out.metric(name, "counter", text)
        for feed, health in healths.items():
            for symbol, count in (health.get(key) or {}).items():
                out.sample(name, count, feed=feed, symbol=symbol)
    render_websockets(out, hub)
    out.metric(
        "pricewatch_websocket_slow_dropped_total",
        "counter",
        "Websocket clients closed with 1008 for reading too slowly.",
    )
    out.sample("pricewatch_websocket_slow_dropped_total", hub.dropped)
    out.metric(
        "pricewatch_websocket_state_flushes_total",
        "counter",
        "Flushes of conflated prices/candles that sent something.",
    )
    out.sample("pricewatch_websocket_state_flushes_total", hub.state_flushes)
    out.metric(
        "pricewatch_websocket_state_flush_seconds_total",
        "counter",
        "Time spent in those flushes (rendering and writing to every due client).",
    )
    out.sample("pricewatch_websocket_state_flush_seconds_total", round(hub.flush_seconds, 6))
    out.metric(
        "pricewatch_websocket_state_flush_max_seconds",
        "gauge",
        "The longest of those flushes since start.",
    )
    out.sample("pricewatch_websocket_state_flush_max_seconds", round(hub.flush_max, 6))
    out.metric(
        "pricewatch_alerts_active",
        "gauge",
        "CREATED alerts held by the engine (price and percent).",
    )
    out.sample("pricewatch_alerts_active", len(engine.index) + len(engine.percent))
    out.metric("pricewatch_alerts_triggered_total", "counter", "Alerts triggered by this process.")
    out.sample("pricewatch_alerts_triggered_total", engine.triggered)
    out.metric(
        "pricewatch_events_purged_total",
        "counter",
        "Alert events purged past the retention (PRICEWATCH_EVENT_RETENTION_DAYS).",
    )
    out.sample("pricewatch_events_purged_total", engine.purged_events)
    engine.resumer.render_metrics(out)
    await render_delivery_metrics(out, app[DELIVERER])
    if PUBLISHER in app:
        bus = app[PUBLISHER].bus
        out.metric("pricewatch_redis_connected", "gauge", "1 while connected to Redis.")
        out.sample("pricewatch_redis_connected", int(bus.client is not None))
        out.metric("pricewatch_redis_reconnects_total", "counter", "Redis reconnect attempts.")
        out.sample("pricewatch_redis_reconnects_total", bus.reconnects)
        out.metric(
            "pricewatch_redis_published_total",
            "counter",
            "Messages and snapshot writes executed by Redis.",
        )
        out.sample("pricewatch_redis_published_total", bus.published)
    render_http(out, app[HTTP_METRICS])
    return web.Response(
        body=out.text().encode(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


FEED: web.AppKey[Feed | None] = web.AppKey("feed")  # the configured Feed, or None for "off"


STATIC = Path(__file__).parent / "static"


async def live_page(request: web.Request) -> web.FileResponse:
    """The live page: one self-contained HTML file (inline JS/CSS, works offline)."""
    return web.FileResponse(
        STATIC / "live.html",
        headers={"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-cache"},
    )


# The browser asks for /favicon.ico on every page: a tiny inline SVG (a candle) instead of 404.
FAVICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
    b'<rect width="32" height="32" rx="6" fill="#161b22"/>'
    b'<rect x="8" y="4" width="2" height="24" fill="#ef5350"/>'
    b'<rect x="5" y="9" width="8" height="12" fill="#ef5350"/>'
    b'<rect x="21" y="3" width="2" height="26" fill="#26a69a"/>'
    b'<rect x="18" y="7" width="8" height="16" fill="#26a69a"/></svg>'
)
VENDOR_CHART = "lightweight-charts.standalone.production.js"


async def favicon(request: web.Request) -> web.Response:
    """`/favicon.ico`: an SVG icon (browsers take SVG at this path by its content type)."""
    return web.Response(
        body=FAVICON,
        content_type="image/svg+xml",
        headers={"Cache-Control": "public, max-age=86400"},
    )


async def vendor_chart(request: web.Request) -> web.FileResponse:
    """The vendored charting library the live page loads (served locally: no CDN)."""
    return web.FileResponse(
        STATIC / "vendor" / VENDOR_CHART,
        headers={
            "Content-Type": "text/javascript; charset=utf-8",
            "Cache-Control": "public, max-age=86400",
        },
    )


def add_route(app: web.Application, method: str, path: str, handler: Handler) -> None:
    """Register `path` with and without its trailing slash (the contract treats both alike)."""
    base = path.rstrip("/") or "/"
    app.router.add_route(method, base, handler)
    if base != "/":
        app.router.add_route(method, base + "/", handler)


@asynccontextmanager
async def background(coro: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    """Run `coro` as a task for the body's duration; cancelled and awaited at the end."""
    task = asyncio.create_task(coro, name=name)
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = await Store.open(settings.db)
    app[STORE] = store
    log.info("database %s ready (schema version %d)", settings.db, await store.schema_version())
    try:
        yield
    finally:
        await store.close()


async def candles_ctx(app: web.Application) -> AsyncIterator[None]:
    """Stored candles back into the rings before any feed runs; changed ones written each
    second; a last flush at shutdown, after the feeds have stopped."""
    settings = app[SETTINGS]
    writer = app[CANDLE_WRITER] = CandleWriter(
        app[MARKET].candles,
        app[STORE],
        settings.symbols,
        settings.candle_retention,
        max_clock_skew=settings.max_clock_skew,
    )
    began = time.monotonic()
    count = await writer.load()
    log.info("loaded %d stored candles in %.2fs", count, time.monotonic() - began)
    try:
        async with background(writer.run(), "candle-writer"):
            yield
    finally:
        try:
            await writer.flush()
        except Exception:
            log.exception("final candle write failed")


async def auth_ctx(app: web.Application) -> AsyncIterator[None]:
    app[auth.AUTH] = await auth.Auth.create(app[SETTINGS], app[STORE])
    app[HUB].revoked = app[auth.AUTH].revoked  # live sessions end when their login does
    yield


async def delivery_ctx(app: web.Application) -> AsyncIterator[None]:
    """Deliver alert events (email, webhooks, Telegram); pending rows from before a restart
    are resumed. The email sink also sends verification codes (MAILER)."""
    sinks = make_sinks(app[SETTINGS])
    app[MAILER] = cast(EmailSink, sinks["email"])  # make_sinks makes an EmailSink for it
    deliverer = app[DELIVERER] = Deliverer(app[SETTINGS], app[STORE], sinks)
    await deliverer.start()
    try:
        yield
    finally:
        await deliverer.stop()


async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
    """Load every CREATED alert into memory and run the trigger writer."""
    settings = app[SETTINGS]
    engine = app[ENGINE] = AlertEngine(
        app[STORE],
        app[HUB],
        max_active=settings.max_alerts_per_user,
        create_rate=settings.alert_create_rate,
        event_retention_days=settings.event_retention_days,
    )
    began = time.monotonic()
    count = await engine.load()
    log.info("alert engine loaded %d active alerts in %.2fs", count, time.monotonic() - began)
    engine.notify_hook = app[DELIVERER].wake
    app[MARKET].trade_hooks.append(engine.on_tick)
    app[MARKET].bar_hooks.append(engine.on_bar)
    await engine.start()
    try:
        yield
    finally:
        app[MARKET].trade_hooks.remove(engine.on_tick)
        app[MARKET].bar_hooks.remove(engine.on_bar)
        await engine.stop()


HTTP_SESSION = web.AppKey("http_session", aiohttp.ClientSession)
BINANCE_REST = web.AppKey("binance_rest", BinanceRest)


async def http_session_ctx(app: web.Application) -> AsyncIterator[None]:
    """The one outgoing HTTP client session (AlphaVantage, Binance REST)."""
    async with aiohttp.ClientSession() as session:
        app[HTTP_SESSION] = app[BINANCE_REST].session = session
        yield


async def quotes_ctx(app: web.Application) -> AsyncIterator[None]:
    """The quotes service, and its source (PRICEWATCH_QUOTES): the AlphaVantage poller, the
    offline demo quotes from the latest market price, or none."""
    settings = app[SETTINGS]
    session = app[HTTP_SESSION]
    quotes = app[quotes_api.QUOTES] = quotes_api.Quotes(settings, app[STORE], app[HUB], session)
    source = settings.quote_source
    if source == "demo":
        mkt = app[MARKET]

        def latest(symbol: str) -> tuple[float, float | None, float | None] | None:
            row = mkt.latest.get(symbol)
            return None if row is None or row.price is None else (row.price, row.bid, row.ask)

        async with FeedRunner(
            app,
            DemoQuotes(
                latest, list(settings.quote_pairs), settings.alphavantage_interval, quotes.save
            ),
        ):
            yield
        return
    if source is None:
        log.info(
            "quotes are off (PRICEWATCH_QUOTES=%s, no PRICEWATCH_ALPHAVANTAGE_API_KEY)",
            settings.quotes,
        )
        yield
        return
    assert settings.alphavantage_api_key is not None  # quote_source needs it for "alphavantage"
    quotes.poller = QuotePoller(
        session,
        settings.alphavantage_url,
        settings.alphavantage_api_key,
        list(settings.quote_pairs),
        settings.alphavantage_interval,
        quotes.save,
        timeout=settings.alphavantage_timeout,
        max_bytes=settings.upstream_max_bytes,
    )
    async with FeedRunner(app, quotes.poller):
        yield


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    """The hub's flusher (writes queued frames as sockets drain) and watchdog (closes
    clients that fall behind, sessions that ended)."""
    async with background(app[HUB].run(), "hub"):
        yield


async def close_websockets(app: web.Application) -> None:
    """On shutdown, before handlers are awaited. In DESIGN.md's order: no more ticks are
    taken in, the alert writer commits (and pushes) what it holds, then every websocket gets
    1001 going away. The feed tasks themselves stop in their cleanup contexts."""
    app[MARKET].closed = True
    if ENGINE in app:
        with suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await app[ENGINE].drained()
    await app[HUB].close_all()


async def feed_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run the configured market feed (PRICEWATCH_FEED) into the tick pipeline."""
    feed = app[FEED]
    if feed is None:
        log.info("market feed is off")
        yield
        return
    live = feed.kind in ("binance", "demo")
    async with FeedRunner(app, feed, app[SETTINGS].feed_stale_after if live else None):
        yield


async def extra_feeds_ctx(app: web.Application) -> AsyncIterator[None]:
    """Admin-added feeds: restarted from the DB, stopped on shutdown."""
    settings, mkt = app[SETTINGS], app[MARKET]
    feeds = app[EXTRA_FEEDS] = ExtraFeeds(
        app,
        app[STORE],
        binance_factory(
            settings.symbols,
            mkt.on_tick,
            mkt.on_book,
            settings.allow_private_feeds,
            settings.max_clock_skew,
            settings.max_id_jump,
        ),
        settings.allow_private_feeds,
        main=app[FEED],
    )
    await feeds.restore()
    try:
        yield
    finally:
        await feeds.stop_all()


# Each role's cleanup contexts, in startup order (DESIGN.md); shutdown is the reverse.
ROLES: dict[str, list[Callable[[web.Application], AsyncIterator[None]]]] = {
    "all": [
        store_ctx,
        candles_ctx,
        auth_ctx,
        hub_ctx,
        delivery_ctx,
        engine_ctx,
        http_session_ctx,
        quotes_ctx,
        core_ctx,
        feed_ctx,
        extra_feeds_ctx,
    ],
    "edge": [edge_ctx, hub_ctx],
}
ROLES["core"] = ROLES["all"]  # the core also serves websockets, as `all` does


def create_app(settings: Settings) -> web.Application:
    """Build the whole application for PRICEWATCH_ROLE; nothing starts until the app runs."""
    app = web.Application(
        client_max_size=MAX_BODY,
        middlewares=[metrics_middleware, error_middleware, auth.identity_middleware],
    )
    app[HTTP_METRICS] = HttpMetrics()
    app[SETTINGS] = settings
    app[CLIENT_ADDRESSES] = ClientAddresses(settings.trusted_proxies)
    if settings.public_url is not None:
        app[PUBLIC_URL] = settings.public_url
    app[HEALTH] = {}
    # A cluster's core hands every event its hub sends to the edges too (cluster/core.py).
    hub_class = RelayHub if settings.redis_url is not None and settings.role != "edge" else Hub
    hub = hub_class(
        max_queue_bytes=settings.ws_max_queue_bytes,
        max_per_address=settings.max_ws_per_address,
        max_rate=settings.ws_max_rate,
    )
    app[HUB] = hub
    mkt = app[MARKET] = Market(settings.symbols, hub)
    app.cleanup_ctx.extend(ROLES[settings.role])
    app.on_shutdown.append(close_websockets)
    if settings.role == "edge":
        from .cluster import edge

        for method, path, handler in edge.routes():
            add_route(app, method, path, handler)
        for name, render in compat.PRICE_FORMATS.items():
            mkt.add_price_format(name, render)
        add_route(app, "GET", "/openapi.json", openapi.spec_handler)
        return app
    rest = app[BINANCE_REST] = BinanceRest(
        settings.binance_rest_url,
        settings.binance_api_key,
        market=MARKETS[settings.binance_market],
        max_bytes=settings.upstream_max_bytes,
    )
    # Built now so that a bad PRICEWATCH_FEED (missing replay file...) fails before any I/O.
    app[FEED] = make_feed(
        settings.feed,
        symbols=settings.symbols,
        binance_url=settings.binance_ws_url,
        on_tick=mkt.on_tick,
        on_book=mkt.on_book,
        replay_speed=settings.replay_speed,
        rest=rest,
        backfill_max_trades=settings.backfill_max_trades,
        history=mkt.candles.rings() if settings.candle_history else None,
        on_history=mkt.on_history,
        on_bar=mkt.on_bar,
        max_clock_skew=settings.max_clock_skew,
        max_id_jump=settings.max_id_jump,
    )

    add_route(app, "GET", "/healthz", healthz)
    add_route(app, "GET", "/metrics", metrics)
    add_route(app, "GET", "/openapi.json", openapi.spec_handler)
    add_route(app, "GET", "/docs", docs_page.docs_handler)
    add_route(app, "GET", "/", live_page)
    add_route(app, "GET", "/rates/live", live_page)
    add_route(app, "GET", "/favicon.ico", favicon)
    add_route(app, "GET", "/static/vendor/" + VENDOR_CHART, vendor_chart)
    add_route(app, "POST", "/auth/register", auth.register)
    add_route(app, "POST", "/auth/token", auth.token)
    add_route(app, "POST", "/auth/token/refresh", auth.refresh)
    add_route(app, "POST", "/auth/logout", auth.logout)
    add_route(app, "GET", "/auth/me", auth.me)
    add_verify_routes(app, add_route)
    add_route(app, "GET", "/api/v1/prices", market.prices)
    add_route(app, "GET", "/api/v1/prices/{symbol}", market.price)
    add_route(app, "GET", "/api/v1/ohlc", market.ohlc)
    add_route(app, "GET", "/live-feed/subscribe", market.live_feed)
    add_route(app, "GET", "/ws/ohlc", market.ws_ohlc)
    alerts_api.add_routes(app, add_route)
    add_channel_routes(app, add_route)
    quotes_api.add_routes(app, add_route)
    feed_admin.add_routes(app, add_route)
    compat.add_routes(app, add_route)
    return app


class AccessLogger(AbstractAccessLogger):
    """One line per request. `token` query values are masked: browsers authenticate
    websockets with `?token=`, and access tokens must not end up in logs."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        url = request.rel_url
        if "token" in url.query:
            url = url.update_query(token="***")
        self.logger.info(
            '%s "%s %s" %s %s %.6fs',
            client_address(request),
            request.method,
            url,
            response.status,
            response.body_length,
            time,
        )


def run(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully (within ~5 s).

    Before anything starts: `redis` must import if PRICEWATCH_REDIS_URL is set, the
    database path is checked and locked against a second pricewatch, and the port is bound.
    Each failure raises `startup.StartupError` (one line for `main()`); "pricewatch serving
    on ..." is logged only once the port is listening.
    """
    if settings.redis_url is not None:
        require_redis()
    # An edge has no database to lock.
    lock = startup.lock_database(settings.db) if settings.role != "edge" else None
    try:
        sockets = startup.bind(settings.host, settings.port)
        try:
            asyncio.run(_serve(settings, sockets))
        finally:
            startup.close_all(sockets)
    finally:
        if lock is not None:
            lock.release()


async def _serve(settings: Settings, sockets: list[socket.socket]) -> None:
    started = time.monotonic()
    app = create_app(settings)
    runner = make_runner(
        app,
        shutdown_timeout=1.0,
        access_log=logging.getLogger("pricewatch.access"),
        access_log_class=AccessLogger,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await runner.setup()  # the cleanup contexts: database, auth, feeds...
        except BaseException:
            await app.cleanup()  # close what did start (aiohttp leaves that to us)
            raise
        for sock in sockets:
            await web.SockSite(runner, sock, shutdown_timeout=1.0).start()
        port = sockets[0].getsockname()[1]
        role = (
            "cluster edge"
            if settings.role == "edge"
            else f"feed {settings.feed}" + (", cluster core" if settings.redis_url else "")
        )
        log.info(
            "pricewatch serving on http://%s:%d (%s, symbols %s) after %.2fs",
            settings.host,
            port,
            role,
            ",".join(settings.symbols),
            time.monotonic() - started,
        )
        await stop.wait()
        log.info("pricewatch shutting down")
    finally:
        await runner.cleanup()
