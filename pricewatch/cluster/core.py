"""What a cluster's core publishes (PRICEWATCH_ROLE=core, or all with PRICEWATCH_REDIS_URL).

- **State**, conflated: every FLUSH_INTERVAL (at most 20 publishes a second in all) one
  message with the latest price of each symbol that changed and every candle that changed
  (the candles of the trades and bars seen since the last one); every RECONCILE seconds the
  rings are compared with what was published, which catches what no trade announced
  (REST history fills, late trades into old candles) and trims candles that left a ring.
- **Events**, each as it happens: whatever the hub sends to a user (alert events) or
  publishes on an event topic (quotes), the payload byte for byte (`RelayHub`).
- **Revocations**: each login family `Auth` revokes (logout, a reused refresh token).

Every message carries `seq` (increasing across core restarts: microseconds since the epoch
at least). The snapshot keys are written in the same MULTI/EXEC as the message announcing
them, with `pricewatch:seq`: an edge that reads them with the seq knows which messages it
already has. Keys: `pricewatch:latest` (hash symbol -> [price, time, bid, ask]),
`pricewatch:candles:SYMBOL:TF` (hash start -> [start, open, high, low, close, volume,
trades, first_ts, last_ts], the whole ring), `pricewatch:quote` (the latest quote message),
`pricewatch:revoked` (sorted set family -> revocation time, the last access_ttl),
`pricewatch:events:USER_ID` (a stream of the user's last EVENTS_KEPT alert messages, for
`resume` on an edge) and `pricewatch:events:floor` (see `_on_connect`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from aiohttp import web

from ..hub import Hub
from ..market import Market
from .bus import CHANNEL, RedisBus

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.05  # seconds between state publishes (20 a second at most)
RECONCILE = 2.0  # seconds between comparisons of the whole rings with what was published
LATEST = "pricewatch:latest"
QUOTE = "pricewatch:quote"
REVOKED = "pricewatch:revoked"
SEQ = "pricewatch:seq"
EVENTS_FLOOR = "pricewatch:events:floor"  # events up to this id may be missing from streams
EVENTS_KEPT = 1000  # alert events kept per user for resume on edges (resume.REPLAY_MAX)
RATES_TOPIC = "rates"  # quotes_api.RATES_TOPIC: its latest message is kept for new edges


def candles_key(symbol: str, timeframe: str) -> str:
    return f"pricewatch:candles:{symbol}:{timeframe}"


def events_key(user_id: int) -> str:
    return f"pricewatch:events:{user_id}"


def _event_id(payload: bytes) -> int | None:
    """The event id an `{"type": "alert"}` message carries (None for other messages)."""
    try:
        event = orjson.loads(payload).get("event")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    event_id = event.get("id") if isinstance(event, dict) else None
    return event_id if isinstance(event_id, int) else None


def message(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """One bus message: the JSON header, a newline, the payload (see bus.py)."""
    return orjson.dumps(header) + b"\n" + payload


class RelayHub(Hub):
    """The core's hub: sends as any hub does, and hands every user and topic event to
    `relay` (the Publisher) so that edges send the same. State (prices, candles) is not
    relayed here: the Publisher reads it from the market, conflated."""

    relay: Publisher | None = None

    def send_user(self, user_id: int, data: bytes) -> None:
        super().send_user(user_id, data)
        self.relay_user(user_id, data)

    def relay_user(self, user_id: int, data: bytes) -> None:
        """Only the edges' part of `send_user` (resume.Resumer sends to this process's
        connections itself while one of them resumes)."""
        if self.relay is not None:
            self.relay.event({"k": "user", "u": user_id}, data)

    def publish_event(self, topic: Any, data: bytes) -> None:
        super().publish_event(topic, data)
        if self.relay is not None:
            self.relay.event({"k": "topic", "t": topic}, data)
            if topic == RATES_TOPIC:
                self.relay.quote = data


class Publisher:
    """The core's side of the bus; see the module docstring."""

    def __init__(self, url: str, market: Market, access_ttl: int):
        self.market = market
        self.access_ttl = access_ttl
        self.bus = RedisBus(url, self._on_connect)
        self.timeframes = market.candles.timeframes
        self.spans: dict[str, list[int]] = {}  # symbol -> [first, last] trade time since
        self.sent_latest: dict[str, tuple] = {}
        self.sent_rows: dict[tuple[str, str], dict[int, list]] = {}
        self.quote: bytes | None = None  # the latest quote message
        # The highest alert event id announced so far (AlertEngine.announced, set by the app).
        self.announced: Callable[[], int] = int
        # Every revoked family still remembered -> when (Auth.revocations, set by the app).
        self.revocations: Callable[[], dict[str, float]] = dict
        self.seq = 0
        self.published_states = 0

    def next_seq(self) -> int:
        self.seq = max(self.seq + 1, time.time_ns() // 1000)
        return self.seq

    # -- hooks (the tick path: no I/O, no serialisation) ------------------------------

    def on_tick(self, tick) -> None:
        span = self.spans.get(tick.symbol)
        t = tick.time
        if span is None:
            self.spans[tick.symbol] = [t, t]
        elif t < span[0]:
            span[0] = t
        elif t > span[1]:
            span[1] = t

    def on_bar(self, bar) -> None:
        span = self.spans.setdefault(bar.symbol, [bar.start, bar.end])
        span[0] = min(span[0], bar.start)
        span[1] = max(span[1], bar.end)

    def event(self, header: dict[str, Any], payload: bytes) -> None:
        header["seq"] = self.next_seq()
        event_id = _event_id(payload) if header["k"] == "user" else None
        if event_id is not None:
            header["e"] = event_id  # edges resume from the user's stream (edge.py)
        data = message(header, payload)
        quote = payload if header.get("t") == RATES_TOPIC else None

        def fill(pipe) -> None:
            if quote is not None:
                pipe.set(QUOTE, quote)
            if event_id is not None:
                pipe.xadd(
                    events_key(header["u"]),
                    {"e": event_id, "d": payload},
                    maxlen=EVENTS_KEPT,
                    approximate=False,
                )
            pipe.set(SEQ, header["seq"])
            pipe.publish(CHANNEL, data)

        self.bus.send(fill)

    def on_revoke(self, family: str, at: float) -> None:
        seq = self.next_seq()
        data = message({"k": "revoke", "seq": seq, "f": family, "at": at})
        horizon = time.time() - self.access_ttl

        def fill(pipe) -> None:
            pipe.zadd(REVOKED, {family: at})
            pipe.zremrangebyscore(REVOKED, "-inf", horizon)
            pipe.set(SEQ, seq)
            pipe.publish(CHANNEL, data)

        self.bus.send(fill)

    # -- state ------------------------------------------------------------------------

    def _prices(self) -> dict[str, list]:
        out = {}
        sent = self.sent_latest
        for symbol, latest in self.market.latest.items():
            row = (latest.price, latest.time, latest.bid, latest.ask)
            if latest.price is not None and sent.get(symbol) != row:
                sent[symbol] = row
                out[symbol] = list(row)
        return out

    def _changed(self, symbol: str, timeframe: str, lo: int, hi: int) -> list[list]:
        """Rows of `symbol`'s `timeframe` candles starting in [lo, hi] that differ from
        what was published (and are now recorded as published)."""
        sent = self.sent_rows.setdefault((symbol, timeframe), {})
        out = []
        for row in self.market.candles.between(symbol, timeframe, lo, hi):
            wire = list(row[2:])
            if sent.get(row[2]) != wire:
                sent[row[2]] = wire
                out.append(wire)
        return out

    def _collect(self) -> tuple[dict, list]:
        """What changed since the last publish: prices, and the candles of the trades seen."""
        spans, self.spans = self.spans, {}
        candles = []
        for symbol, (lo, hi) in spans.items():
            for tf, ms in self.timeframes.items():
                for wire in self._changed(symbol, tf, lo - lo % ms, hi - hi % ms):
                    candles.append([symbol, tf, wire])
        return self._prices(), candles

    def _reconcile(self) -> tuple[list, dict[str, list[int]]]:
        """Every candle of every ring that differs from what was published, and the
        published ones no longer in a ring (to delete from the snapshot)."""
        candles, gone = [], {}
        for symbol in self.market.symbols:
            for tf in self.timeframes:
                sent = self.sent_rows.setdefault((symbol, tf), {})
                rows = self.market.candles.between(symbol, tf, 0, 2**62)
                current = {row[2] for row in rows}
                old = [start for start in sent if start not in current]
                for start in old:
                    del sent[start]
                if old:
                    gone[candles_key(symbol, tf)] = old
                for row in rows:
                    wire = list(row[2:])
                    if sent.get(row[2]) != wire:
                        sent[row[2]] = wire
                        candles.append([symbol, tf, wire])
        return candles, gone

    def _publish_state(self, prices: dict, candles: list, gone: dict | None = None) -> None:
        if not prices and not candles and not gone:
            return
        seq = self.next_seq()
        data = message({"k": "state", "seq": seq, "prices": prices, "candles": candles})
        self.published_states += 1

        def fill(pipe) -> None:
            _write_state(pipe, prices, candles)
            for key, starts in (gone or {}).items():
                pipe.hdel(key, *starts)
            pipe.set(SEQ, seq)
            pipe.publish(CHANNEL, data)

        self.bus.send(fill)

    async def run(self) -> None:
        """Publish state every FLUSH_INTERVAL while connected (changes wait meanwhile:
        the snapshot written at the next connection holds them), reconcile every
        RECONCILE seconds, and keep the bus connected; until cancelled."""
        bus_task = asyncio.create_task(self.bus.run(), name="redis-bus")
        try:
            reconciled = time.monotonic()
            while True:
                await asyncio.sleep(FLUSH_INTERVAL)
                if self.bus.client is None:
                    continue
                prices, candles = self._collect()
                gone = None
                if time.monotonic() - reconciled >= RECONCILE:
                    reconciled = time.monotonic()
                    more, gone = self._reconcile()
                    candles += more
                self._publish_state(prices, candles, gone)
        finally:
            bus_task.cancel()
            await asyncio.gather(bus_task, return_exceptions=True)

    async def _on_connect(self, client) -> None:
        """A (re)connection: Redis may have lost everything (a restart): write the whole
        snapshot, then tell the edges to read it again."""
        self.sent_latest.clear()
        self.sent_rows.clear()
        self.spans.clear()
        prices = self._prices()
        candles, _ = self._reconcile()
        seq = self.next_seq()
        pipe = client.pipeline(transaction=True)
        pipe.delete(LATEST, REVOKED, QUOTE)
        for symbol in self.market.symbols:
            for tf in self.timeframes:
                pipe.delete(candles_key(symbol, tf))
        _write_state(pipe, prices, candles)
        if self.quote is not None:
            pipe.set(QUOTE, self.quote)
        horizon = time.time() - self.access_ttl
        live = {f: at for f, at in self.revocations().items() if at >= horizon}
        if live:
            pipe.zadd(REVOKED, live)
        # Events announced until now may be missing from the users' streams (a restarted
        # Redis has none): a resume from before them is reported incomplete.
        pipe.set(EVENTS_FLOOR, self.announced())
        pipe.set(SEQ, seq)
        pipe.publish(CHANNEL, message({"k": "resync", "seq": seq}))
        async with asyncio.timeout(10.0):
            await pipe.execute()
        log.info("cluster snapshot written: %d prices, %d candles", len(prices), len(candles))


PUBLISHER = web.AppKey("publisher", Publisher)


async def core_ctx(app: web.Application) -> AsyncIterator[None]:
    """With PRICEWATCH_REDIS_URL (role core, or all): publish prices, candles, quotes, alert
    events and revocations for the cluster's edges. Without it: nothing. Runs after the
    engine and quotes contexts (their hooks) and before the feeds (no trade is missed)."""
    from .. import auth
    from ..alerts import ENGINE
    from ..market import HUB, MARKET
    from ..server import SETTINGS, STORE, background

    settings = app[SETTINGS]
    if settings.redis_url is None:
        yield
        return
    mkt, hub, auth_, engine = app[MARKET], app[HUB], app[auth.AUTH], app[ENGINE]
    assert isinstance(hub, RelayHub)  # create_app makes it so with a Redis URL
    publisher = app[PUBLISHER] = Publisher(settings.redis_url, mkt, settings.access_ttl)
    publisher.revocations = auth_.revocations
    publisher.announced = lambda: engine.announced
    quote = await app[STORE].latest_quote()
    if quote is not None:
        publisher.quote = orjson.dumps({"type": "quote", **quote.public()})
    hub.relay = publisher
    mkt.trade_hooks.append(publisher.on_tick)
    mkt.bar_hooks.append(publisher.on_bar)
    auth_.revoke_hooks.append(publisher.on_revoke)
    try:
        async with background(publisher.run(), "cluster-core"):
            yield
    finally:
        hub.relay = None
        mkt.trade_hooks.remove(publisher.on_tick)
        mkt.bar_hooks.remove(publisher.on_bar)
        auth_.revoke_hooks.remove(publisher.on_revoke)


def _write_state(pipe, prices: dict, candles: list) -> None:
    """Latest prices and candle states into the snapshot keys (one pipeline)."""
    if prices:
        pipe.hset(LATEST, mapping={s: orjson.dumps(r) for s, r in prices.items()})
    by_key: dict[str, dict] = {}
    for symbol, tf, wire in candles:
        by_key.setdefault(candles_key(symbol, tf), {})[wire[0]] = orjson.dumps(wire)
    for key, mapping in by_key.items():
        pipe.hset(key, mapping=mapping)
