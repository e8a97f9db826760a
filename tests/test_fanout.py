"""Websocket fan-out at market rates (CONTRACT "conflation"), end to end on loopback.

A fake Binance feeds bursts of trades to a real server; subscribers read in the test's own
loop. Prices and candles are state: a subscriber gets at most `max_rate` of them a second
per topic, and the newest value always arrives within 1/max_rate s + 100 ms of the server
processing the last trade (timed by a trade hook in the same process). Alerts are events:
every one, in order. Counts are bounded by max_rate and the measured time; every wait is on
a message or condition with a timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from conftest import LiveServer, bearer, register
from fake_binance import FakeBinance
from raw_ws import RawWebSocket
from test_alerts import Trader, create
from test_ops import sample, scrape

from pricewatch.hub import SLOW
from pricewatch.market import HUB, MARKET

T0 = 1704067200000  # 2024-01-01T00:00:00Z
SYMBOLS = ("BTCUSDT", "ETHUSDT")
BURST = 2000
SLACK = 0.1  # the contract's 100 ms beyond 1/max_rate


@pytest.fixture
async def fake() -> AsyncIterator[FakeBinance]:
    async with FakeBinance() as upstream:
        yield upstream


@pytest.fixture
async def live(fake: FakeBinance, make_settings) -> AsyncIterator[LiveServer]:
    settings = make_settings(feed="binance", binance_ws_url=fake.url, symbols=SYMBOLS)
    async with LiveServer(settings) as server:
        await fake.wait_open(1)
        yield server


class Processed:
    """When the server's tick path last ran, per symbol (a trade hook, same process)."""

    def __init__(self, server: LiveServer):
        self.at: dict[str, float] = {}
        self.count = 0
        server.app[MARKET].trade_hooks.append(self._hook)

    def _hook(self, tick) -> None:
        self.at[tick.symbol] = time.monotonic()
        self.count += 1


class Feed:
    """Trades with fresh ids through the fake upstream."""

    def __init__(self, fake: FakeBinance):
        self.fake = fake
        self.next_id = 1
        self.sent = 0

    async def burst(
        self, prices: list[float], symbol: str = "BTCUSDT", spread_ms: int = 0, chunks: int = 10
    ) -> None:
        """Send `prices` as trades, `spread_ms` apart in trade time, in `chunks` writes
        with a loop turn between them (so the server flushes while the burst goes on)."""
        size = max(1, len(prices) // chunks)
        for i, price in enumerate(prices):
            await self.fake.send_trade(symbol, self.next_id, price, 0.5, T0 + self.sent * spread_ms)
            self.next_id += 1
            self.sent += 1
            if (i + 1) % size == 0:
                await asyncio.sleep(0.02)  # pacing the load, not waiting for a result


class Subscriber:
    """A live-feed socket read in the background: price messages with arrival times."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.prices: list[tuple[float, dict]] = []  # (monotonic arrival, message)
        self.events: list[dict] = []  # everything that is not a price
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, http, server: LiveServer, token: str, **subscribe) -> Subscriber:
        ws = await http.ws_connect(server.ws_url("/live-feed/subscribe/"), headers=bearer(token))
        sub = cls(ws)
        if subscribe:
            await ws.send_json({"action": "subscribe", **subscribe})
            await sub.wait(lambda: any(e["type"] == "subscribed" for e in sub.events))
        return sub

    async def _read(self) -> None:
        async for msg in self.ws:
            data = orjson.loads(msg.data)
            if data["type"] == "price":
                self.prices.append((time.monotonic(), data))
            else:
                self.events.append(data)
            self._changed.set()

    async def wait(self, predicate, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def wait_price(self, symbol: str, price: float) -> float:
        """Arrival time of the price message for `symbol` at `price`."""

        def seen():
            return any(m["symbol"] == symbol and m["price"] == price for _, m in self.prices)

        await self.wait(seen)
        return next(t for t, m in self.prices if m["symbol"] == symbol and m["price"] == price)

    def since(self, start: float, symbol: str = "BTCUSDT") -> list[tuple[float, dict]]:
        return [(t, m) for t, m in self.prices if t >= start and m["symbol"] == symbol]

    async def close(self) -> None:
        await self.ws.close()
        await self._task


def assert_rate(got: list[tuple[float, dict]], rate: int, start: float, end: float) -> None:
    """At most `rate` a second over the measured span (+1 for the first flush, +1 for the
    one that carried the last value); and about that many when the span is long enough."""
    span = end - start
    assert len(got) <= span * rate + 2, (len(got), span, rate)
    assert len(got) >= int(span * rate * 0.5) - 1, (len(got), span, rate)


async def test_a_burst_arrives_conflated_at_max_rate_with_the_exact_last_price(
    live: LiveServer, fake: FakeBinance, http
) -> None:
    processed = Processed(live)
    feed = Feed(fake)
    user = await register(http, live)
    default = await Subscriber.open(http, live, user["access"])
    two = await Subscriber.open(http, live, user["access"], symbols=["BTCUSDT"], max_rate=2)
    every = await Subscriber.open(http, live, user["access"], symbols=["BTCUSDT"], max_rate=0)
    prices = [10_000.0 + i / 4 for i in range(BURST)]
    start = time.monotonic()
    await feed.burst(prices)
    last = prices[-1]
    arrivals = {
        name: await sub.wait_price("BTCUSDT", last)
        for name, sub in (("default", default), ("two", two), ("every", every))
    }
    done = processed.at["BTCUSDT"]
    assert processed.count == BURST
    max_rate = live.settings.ws_max_rate
    for name, rate in (("default", max_rate), ("two", 2)):
        assert arrivals[name] - done <= 1 / rate + SLACK, name
    for sub, rate in ((default, max_rate), (two, 2)):
        got = sub.since(start)
        assert got[-1][1]["price"] == last
        assert [m["price"] for _, m in got] == sorted(m["price"] for _, m in got)
        assert_rate(got, rate, start, done)
    # max_rate 0: as often as the loop allows; still conflated (fewer than the trades).
    got = every.since(start)
    assert got[-1][1]["price"] == last and len(default.since(start)) <= len(got) < BURST
    # /metrics tells the server's own share of the latency: its flushes and their time.
    text = await scrape(http, live)
    flushes = sample(text, "pricewatch_websocket_state_flushes_total")
    assert len(got) <= flushes and len(default.since(start)) + len(two.since(start)) <= flushes
    assert (
        0
        < sample(text, "pricewatch_websocket_state_flush_max_seconds")
        <= sample(text, "pricewatch_websocket_state_flush_seconds_total")
    )
    for sub in (default, two, every):
        await sub.close()


async def test_bad_max_rate_is_an_error_naming_the_field(live: LiveServer, http) -> None:
    user = await register(http, live)
    sub = await Subscriber.open(http, live, user["access"])
    async with http.ws_connect(live.ws_url("/ws/ohlc/")) as ohlc:
        for bad in (11, -1, 2.5, "5", True, [1]):
            await sub.ws.send_json({"action": "subscribe", "symbols": ["BTCUSDT"], "max_rate": bad})
            await ohlc.send_json({"symbol": "BTCUSDT", "timeframe": "1m", "max_rate": bad})
            msg = await ohlc.receive_json(timeout=5)
            assert msg["type"] == "error" and "max_rate" in msg["fields"], (bad, msg)
        await sub.wait(lambda: len(sub.events) == 6)
        assert all(e["type"] == "error" and "max_rate" in e["fields"] for e in sub.events)
        await ohlc.send_json({"symbol": "BTCUSDT", "timeframe": "1m", "max_rate": 1})
        assert (await ohlc.receive_json(timeout=5))["type"] == "snapshot"
    await sub.close()


async def test_thirty_alerts_crossed_by_one_burst_arrive_in_order_while_prices_conflate(
    live: LiveServer, fake: FakeBinance, http
) -> None:
    user = await register(http, live)
    async with Trader(fake, live, http, user["access"]) as trader:
        await trader.trade(1000.0)
        ids = []
        for k in range(30):
            status, alert = await create(
                http, live, user["access"], asset="BTCUSDT", price=1001.0 + k, direction="above"
            )
            assert status == 201, alert
            ids.append(alert["id"])
        feed = Feed(fake)
        feed.next_id = next(trader.ids)  # trade ids go on without a gap
        processed = Processed(live)
        prices = [1000.0 + 31 * (i + 1) / BURST for i in range(BURST)]  # rises through all
        await feed.burst(prices)
        prices_seen = 0
        async with asyncio.timeout(10):
            while len(trader.alerts) < 30 or prices_seen == 0:
                msg = orjson.loads((await trader.ws.receive()).data)
                if msg["type"] == "alert":
                    trader.alerts.append(msg["alert"])
                elif msg["type"] == "price" and msg["price"] == prices[-1]:
                    prices_seen += 1
                elif msg["type"] == "price":
                    assert msg["price"] in prices
        assert [a["id"] for a in trader.alerts] == ids  # every one, once, in order
        assert all(a["status"] == "TRIGGERED" for a in trader.alerts)
        assert processed.count == BURST and prices_seen == 1
        # No further alert event is pending behind them.
        trader.ids = itertools.count(feed.next_id)
        await trader.trade(2000.0)
        assert len(trader.alerts) == 30


async def test_candle_conflation_keeps_exact_ohlcv(
    live: LiveServer, fake: FakeBinance, http
) -> None:
    feed = Feed(fake)
    async with http.ws_connect(live.ws_url("/ws/ohlc/")) as ws:
        await ws.send_json({"symbol": "BTCUSDT", "timeframe": "1m"})
        assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
        # 2000 trades over 3 minutes of trade time (90 ms apart), prices going up and down.
        prices = [100.0 + (i * 7919 % 1000) / 100 for i in range(BURST)]
        await feed.burst(prices, spread_ms=90)
        async with http.get(
            live.url + "/api/v1/ohlc", params={"symbol": "BTCUSDT", "timeframe": "1m"}
        ) as resp:
            rest = (await resp.json())["data"]
        assert len(rest) == 3 and sum(c["trades"] for c in rest) == BURST
        last: dict[str, dict] = {}
        count = 0
        async with asyncio.timeout(10):
            while last.get(rest[-1]["timestamp"]) != rest[-1]:
                msg = await ws.receive_json()
                assert msg["type"] == "candle"
                last[msg["candle"]["timestamp"]] = msg["candle"]
                count += 1
        # Every candle's last message is its exact final state (closed ones included),
        # in far fewer messages than trades.
        assert [last[c["timestamp"]] for c in rest] == rest
        assert count < BURST / 10


async def test_a_non_reader_stays_within_its_byte_bound_and_never_delays_the_others(
    live: LiveServer, fake: FakeBinance, http
) -> None:
    hub = live.app[HUB]
    processed = Processed(live)
    feed = Feed(fake)
    user = await register(http, live)
    reader = await Subscriber.open(http, live, user["access"], symbols=["BTCUSDT"])
    stalled = await RawWebSocket.connect(live.url, "/ws/ohlc/", rcvbuf=4096)
    (client,) = [c for c in hub.clients if c.endpoint == "ohlc"]
    client.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stalled.send_json(
        *[
            {"symbol": "BTCUSDT", "timeframe": tf, "limit": 1000, "max_rate": 0}
            for tf in ("1s", "1m", "5m", "15m", "1h", "4h", "1d")
        ]
    )
    stalled.writer.transport.pause_reading()  # from now on not even the kernel reads for it
    price = 20_000.0
    bursts = 0
    while not (client.writer.state or client.closed):  # until state is held back for it
        bursts += 1
        assert bursts <= 50, "the non-reader's socket never filled"
        prices = [price + i for i in range(200)]
        price += 200
        await feed.burst(prices, spread_ms=10, chunks=2)
        arrived = await reader.wait_price("BTCUSDT", prices[-1])
        assert arrived - processed.at["BTCUSDT"] <= 1 / hub.max_rate + SLACK
    held_since = time.monotonic()
    while not client.closed:  # it keeps not reading: the others never wait for it
        prices = [price + i for i in range(200)]
        price += 200
        await feed.burst(prices, spread_ms=10, chunks=2)
        arrived = await reader.wait_price("BTCUSDT", prices[-1])
        assert arrived - processed.at["BTCUSDT"] <= 1 / hub.max_rate + SLACK
        assert client.writer.peak <= hub.max_queue_bytes
        assert time.monotonic() - held_since < hub.slow_timeout + 2, "never closed"
    await asyncio.wait_for(hub.dropped_for(SLOW), 5)
    assert client.writer.peak <= hub.max_queue_bytes
    assert not client.writer.state and not client.writer.events  # freed at once
    assert not reader.ws.closed
    stalled.abort()
    await reader.close()
