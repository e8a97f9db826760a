"""Live markets end to end: a fake Binance upstream feeds a real server on loopback.

Trades go in through `FakeBinance`, come out through the HTTP API and the websockets. The
server handles one upstream socket in order, so a test knows every earlier frame was
processed once the message caused by its *last* frame arrives on a websocket. Every wait is
on a websocket message, an event or a condition, with a timeout; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType
from conftest import LiveServer, bearer, register
from fake_binance import FakeBinance
from websockets.asyncio.client import connect as ws_client_connect
from websockets.exceptions import ConnectionClosed

from pricewatch import server as server_mod
from pricewatch.feeds import Tick
from pricewatch.hub import frame
from pricewatch.market import HUB, MARKET

DATA = Path(__file__).parent / "data"
T0 = 1704067200000  # 2024-01-01T00:00:00Z
SYMBOLS = ("BTCUSDT", "ETHUSDT")
SYMBOLS_SORTED = sorted(SYMBOLS)
NOT_AUTHENTICATED = {"error": "not_authenticated", "detail": "Invalid Authentication Credentials"}


# --------------------------------------------------------------------------- helpers


class Upstream:
    """FakeBinance plus increasing trade ids per symbol."""

    def __init__(self, fake: FakeBinance):
        self.fake = fake
        self._ids = dict.fromkeys(SYMBOLS, 0)

    async def trade(self, symbol: str, price: float, qty: float, time_ms: int) -> None:
        self._ids[symbol] += 1
        await self.fake.send_trade(symbol, self._ids[symbol], price, qty, time_ms)


@pytest.fixture
async def fake() -> AsyncIterator[FakeBinance]:
    async with FakeBinance() as upstream:
        yield upstream


@pytest.fixture
async def upstream(fake: FakeBinance) -> Upstream:
    return Upstream(fake)


@pytest.fixture
async def live(fake: FakeBinance, make_settings) -> AsyncIterator[LiveServer]:
    """A server whose Binance feed is connected to `fake`."""
    settings = make_settings(feed="binance", binance_ws_url=fake.url, symbols=SYMBOLS)
    async with LiveServer(settings) as server:
        await fake.wait_connections(1)
        yield server


async def recv_json(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> dict:
    """The next websocket message, which must be a JSON text frame."""
    msg = await ws.receive(timeout=timeout)
    assert msg.type == WSMsgType.TEXT, msg
    return orjson.loads(msg.data)


async def recv_until(
    ws: aiohttp.ClientWebSocketResponse, predicate: Callable[[dict], bool], timeout: float = 5.0
) -> list[dict]:
    """Receive until a message satisfies `predicate`; returns every message up to it."""
    seen = []
    async with asyncio.timeout(timeout):
        while True:
            seen.append(await recv_json(ws, timeout=None))
            if predicate(seen[-1]):
                return seen


@contextlib.asynccontextmanager
async def ohlc_ws(
    http: aiohttp.ClientSession, server: LiveServer, symbol: str = "BTCUSDT", timeframe: str = "1s"
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A /ws/ohlc/ client already subscribed (its snapshot consumed)."""
    async with http.ws_connect(server.ws_url("/ws/ohlc/")) as ws:
        await ws.send_json({"symbol": symbol, "timeframe": timeframe})
        assert (await recv_json(ws))["type"] == "snapshot"
        yield ws


def candle_at(timestamp: str, close: float) -> Callable[[dict], bool]:
    """Predicate: a candle message for the candle `timestamp` closing at `close`."""
    return lambda m: (
        m["type"] == "candle"
        and m["candle"]["timestamp"] == timestamp
        and m["candle"]["close"] == close
    )


async def get_json(http: aiohttp.ClientSession, url: str, **kw) -> tuple[int, dict]:
    async with http.get(url, **kw) as resp:
        return resp.status, await resp.json()


async def get_ohlc(http: aiohttp.ClientSession, server: LiveServer, **params) -> tuple[int, dict]:
    return await get_json(
        http, server.url + "/api/v1/ohlc", params={k: str(v) for k, v in params.items()}
    )


def candle(
    timestamp: str, o: float, h: float, lo: float, c: float, volume: float, trades: int
) -> dict:
    return {
        "timestamp": timestamp,
        "open": o,
        "high": h,
        "low": lo,
        "close": c,
        "volume": volume,
        "trades": trades,
    }


# --------------------------------------------------------------------------- candles


async def test_trades_build_exact_candles_across_timeframe_boundaries(
    live: LiveServer, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    # Dyadic prices and sizes: every sum is exact in binary floating point.
    trades = [
        ("BTCUSDT", 100.0, 0.125, T0 + 1_000),
        ("ETHUSDT", 2000.0, 1.0, T0 + 30_000),  # another symbol: its own candles
        ("BTCUSDT", 102.5, 0.25, T0 + 59_500),
        ("BTCUSDT", 101.0, 0.5, T0 + 60_000),  # exactly on the boundary: opens 00:01
        ("BTCUSDT", 99.75, 2.0, T0 + 90_000),
        ("BTCUSDT", 100.25, 1.0, T0 + 119_999),  # last millisecond of 00:01
    ]
    async with ohlc_ws(http, live, "BTCUSDT", "1s") as ws:
        for trade in trades:
            await upstream.trade(*trade)
        await recv_until(ws, candle_at("2024-01-01T00:01:59Z", 100.25))

    status, body = await get_ohlc(http, live, symbol="BTCUSDT", timeframe="1m")
    assert status == 200
    assert body == {
        "symbol": "BTCUSDT",
        "timeframe": "1m",
        "data": [
            candle("2024-01-01T00:00:00Z", 100.0, 102.5, 100.0, 102.5, 0.375, 2),
            candle("2024-01-01T00:01:00Z", 101.0, 101.0, 99.75, 100.25, 3.5, 3),
        ],
    }
    status, body = await get_ohlc(http, live, symbol="btcusdt", timeframe="1s")
    assert status == 200 and body["symbol"] == "BTCUSDT"
    assert body["data"] == [
        candle("2024-01-01T00:00:01Z", 100.0, 100.0, 100.0, 100.0, 0.125, 1),
        candle("2024-01-01T00:00:59Z", 102.5, 102.5, 102.5, 102.5, 0.25, 1),
        candle("2024-01-01T00:01:00Z", 101.0, 101.0, 101.0, 101.0, 0.5, 1),
        candle("2024-01-01T00:01:30Z", 99.75, 99.75, 99.75, 99.75, 2.0, 1),
        candle("2024-01-01T00:01:59Z", 100.25, 100.25, 100.25, 100.25, 1.0, 1),
    ]
    status, body = await get_ohlc(http, live, symbol="BTCUSDT", timeframe="1h")
    assert body["data"] == [candle("2024-01-01T00:00:00Z", 100.0, 102.5, 99.75, 100.25, 3.875, 5)]
    status, body = await get_ohlc(http, live, symbol="ETHUSDT", timeframe="1m")
    assert body["data"] == [candle("2024-01-01T00:00:00Z", 2000.0, 2000.0, 2000.0, 2000.0, 1.0, 1)]


async def test_book_ticker_sets_bid_and_ask_of_latest_price(
    live: LiveServer, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    status, body = await get_json(http, live.url + "/api/v1/prices")
    assert (status, body) == (200, {"results": []})

    async with ohlc_ws(http, live, "BTCUSDT", "1m") as ws:
        await upstream.fake.send_book("BTCUSDT", 42000.25, 42000.75)
        await upstream.trade("BTCUSDT", 42000.5, 0.5, T0 + 1_500)
        await recv_until(ws, candle_at("2024-01-01T00:00:00Z", 42000.5))

    expected = {
        "symbol": "BTCUSDT",
        "price": 42000.5,
        "bid": 42000.25,
        "ask": 42000.75,
        "time": "2024-01-01T00:00:01.500Z",
        "open_24h": 42000.5,
        "high_24h": 42000.5,
        "low_24h": 42000.5,
        "volume_24h": 0.5,
        "change_24h": 0.0,
    }
    status, body = await get_json(http, live.url + "/api/v1/prices")
    assert (status, body) == (200, {"results": [expected]})
    for path in ("/api/v1/prices/BTCUSDT", "/api/v1/prices/btcusdt/"):
        status, body = await get_json(http, live.url + path)
        assert (status, body) == (200, expected), path

    # ETHUSDT is watched but has never traded; DOGEUSDT is not watched at all.
    for path in ("/api/v1/prices/ETHUSDT", "/api/v1/prices/DOGEUSDT"):
        status, body = await get_json(http, live.url + path)
        assert status == 404, path
        assert body["error"] == "not_found" and body["detail"] and "fields" not in body


async def test_ohlc_query_is_validated_field_by_field(
    live: LiveServer, http: aiohttp.ClientSession
) -> None:
    cases = [
        ({"timeframe": "1m"}, {"symbol"}),
        ({"symbol": ""}, {"symbol"}),
        ({"symbol": "DOGEUSDT"}, {"symbol"}),
        ({"symbol": "BTCUSDT", "timeframe": "2m"}, {"timeframe"}),
        ({"symbol": "BTCUSDT", "timeframe": "1M"}, {"timeframe"}),
        ({"symbol": "BTCUSDT", "limit": 0}, {"limit"}),
        ({"symbol": "BTCUSDT", "limit": 1001}, {"limit"}),
        ({"symbol": "BTCUSDT", "limit": "abc"}, {"limit"}),
        ({"symbol": "BTCUSDT", "limit": 1.5}, {"limit"}),
        ({"symbol": "BTCUSDT", "limit": -1}, {"limit"}),
        ({"symbol": "NOPE", "timeframe": "7m", "limit": "x"}, {"symbol", "timeframe", "limit"}),
    ]
    for params, fields in cases:
        status, body = await get_ohlc(http, live, **params)
        assert status == 400, params
        assert body["error"] == "validation", params
        assert set(body["fields"]) == fields, (params, body)
        assert all(isinstance(v, str) and v for v in body["fields"].values())
    for limit in (1, 1000):
        status, body = await get_ohlc(http, live, symbol="BTCUSDT", limit=limit)
        assert (status, body) == (200, {"symbol": "BTCUSDT", "timeframe": "1m", "data": []})


async def test_ohlc_limit_defaults_to_100_and_returns_the_newest_oldest_first(
    live: LiveServer, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    def ts(second: int) -> str:
        return f"2024-01-01T00:{second // 60:02d}:{second % 60:02d}Z"

    async with ohlc_ws(http, live, "BTCUSDT", "1s") as ws:
        for second in range(150):  # one trade per second: 150 one-second candles
            await upstream.trade("BTCUSDT", 1000.0 + second, 1.0, T0 + second * 1000)
        await recv_until(ws, candle_at(ts(149), 1149.0))

    status, body = await get_ohlc(http, live, symbol="BTCUSDT", timeframe="1s")
    assert status == 200
    assert [c["timestamp"] for c in body["data"]] == [ts(s) for s in range(50, 150)]
    assert [c["close"] for c in body["data"]] == [1000.0 + s for s in range(50, 150)]
    status, body = await get_ohlc(http, live, symbol="BTCUSDT", timeframe="1s", limit=3)
    assert [c["timestamp"] for c in body["data"]] == [ts(147), ts(148), ts(149)]
    status, body = await get_ohlc(http, live, symbol="BTCUSDT", timeframe="1s", limit=1000)
    assert len(body["data"]) == 150 and body["data"][0]["timestamp"] == ts(0)


async def test_trade_too_old_for_the_ring_sends_no_candle(
    live: LiveServer, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    # 1001 one-second candles: the 1s ring (1000 candles) has let go of second 0.
    async with ohlc_ws(http, live, "BTCUSDT", "1d") as watch:
        for first in range(0, 1001, 200):  # batches, so no queue overflows in a burst
            for second in range(first, min(first + 200, 1001)):
                await upstream.trade("BTCUSDT", 1000.0 + second, 1.0, T0 + 1000 * second)
            await recv_until(watch, lambda m, s=second: m["candle"]["close"] == 1000.0 + s)

    async with http.ws_connect(live.ws_url("/ws/ohlc/")) as ws:
        for tf in ("1s", "1m"):
            await ws.send_json({"symbol": "BTCUSDT", "timeframe": tf})
            assert (await recv_json(ws))["type"] == "snapshot"
        await upstream.trade("BTCUSDT", 5.0, 1.0, T0 + 500)  # second 0: gone from 1s
        await upstream.trade("BTCUSDT", 6.0, 1.0, T0 + 1_001_000)
        # Conflated state: one flush may carry both trades; each touched candle arrives
        # (per topic in start order), the 1s candle of the dropped trade never does.
        got: list[dict] = []
        await recv_until(
            ws, lambda m: got.append(m) or sum(x["candle"]["close"] == 6.0 for x in got) == 2
        )
        assert sorted(
            (m["timeframe"], m["candle"]["timestamp"], m["candle"]["close"]) for m in got
        ) == [
            ("1m", "2024-01-01T00:00:00Z", 1059.0),
            ("1m", "2024-01-01T00:16:00Z", 6.0),
            ("1s", "2024-01-01T00:16:41Z", 6.0),
        ]
        assert [m["candle"]["low"] for m in got if m["candle"]["close"] == 1059.0] == [5.0]


def reference_candles(path: Path, tf_ms: int) -> list[dict]:
    """Candles computed the obvious way from a trades CSV (times in ms or µs)."""
    groups: dict[int, list[tuple[int, float, float]]] = {}
    with path.open(newline="") as f:
        for row in csv.reader(f):
            if not row[0].isdigit():
                continue  # header
            t = int(row[4])
            t = t // 1000 if t >= 10**14 else t
            groups.setdefault(t - t % tf_ms, []).append((t, float(row[1]), float(row[2])))
    out = []
    for start, rows in sorted(groups.items()):
        prices = [p for _, p, _ in rows]
        by_time = sorted(rows, key=lambda r: r[0])  # stable: ties keep file order
        sec = start // 1000
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sec))
        out.append(
            candle(
                stamp,
                by_time[0][1],
                max(prices),
                min(prices),
                by_time[-1][1],
                round(sum(q for _, _, q in rows), 8),
                len(rows),
            )
        )
    return out


@pytest.mark.parametrize("name", ["BTCUSDT-trades-sample.csv", "BTCUSDT-trades-2025-sample.csv"])
async def test_replayed_trades_csv_gives_exact_candles(
    name: str, make_settings, http: aiohttp.ClientSession
) -> None:
    path = DATA / name
    settings = make_settings(feed=f"replay:{path}", symbols=SYMBOLS)
    async with LiveServer(settings) as server:
        await asyncio.wait_for(server.app[server_mod.FEED].done.wait(), 5)
        for timeframe, tf_ms in (("1s", 1_000), ("1m", 60_000), ("1d", 86_400_000)):
            status, body = await get_ohlc(http, server, symbol="BTCUSDT", timeframe=timeframe)
            assert status == 200
            expected = reference_candles(path, tf_ms)
            assert expected and body["data"] == expected, timeframe
        with path.open() as f:
            last = [line for line in f if line[:1].isdigit()][-1].split(",")
        status, body = await get_json(http, server.url + "/api/v1/prices/BTCUSDT")
        assert status == 200 and body["price"] == float(last[1])
        status, body = await get_json(http, server.url + "/healthz")
        assert body["feeds"]["replay"]["state"] == "finished"


# --------------------------------------------------------------------------- /ws/ohlc/


async def test_ws_ohlc_sends_snapshot_then_every_change_of_the_candle(
    live: LiveServer, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    async with ohlc_ws(http, live, "BTCUSDT", "1m") as first:
        await upstream.trade("BTCUSDT", 100.0, 1.0, T0 + 5_000)
        msg = await recv_json(first)
        assert msg == {
            "type": "candle",
            "symbol": "BTCUSDT",
            "timeframe": "1m",
            "candle": candle("2024-01-01T00:00:00Z", 100.0, 100.0, 100.0, 100.0, 1.0, 1),
        }

        async with http.ws_connect(live.ws_url("/ws/ohlc")) as ws:
            await ws.send_json({"symbol": "btcusdt", "timeframe": "1m"})
            assert await recv_json(ws) == {
                "type": "snapshot",
                "symbol": "BTCUSDT",
                "timeframe": "1m",
                "data": [candle("2024-01-01T00:00:00Z", 100.0, 100.0, 100.0, 100.0, 1.0, 1)],
            }

            await upstream.trade("BTCUSDT", 104.0, 0.5, T0 + 20_000)
            await upstream.trade("ETHUSDT", 2000.0, 0.5, T0 + 21_000)  # not subscribed
            await upstream.trade("BTCUSDT", 96.0, 0.25, T0 + 61_000)  # opens the next minute
            expected = [
                candle("2024-01-01T00:00:00Z", 100.0, 104.0, 100.0, 104.0, 1.5, 2),
                candle("2024-01-01T00:01:00Z", 96.0, 96.0, 96.0, 96.0, 0.25, 1),
            ]
            for client in (ws, first):
                for want in expected:
                    msg = await recv_json(client)
                    assert msg == {
                        "type": "candle",
                        "symbol": "BTCUSDT",
                        "timeframe": "1m",
                        "candle": want,
                    }

            # Bad subscriptions are answered with an error; the socket stays usable.
            bad = [
                {"symbol": "DOGEUSDT", "timeframe": "1m"},
                {"symbol": "BTCUSDT", "timeframe": "2m"},
                {"symbol": "BTCUSDT", "timeframe": ["1m"]},
                {"timeframe": "1m"},
            ]
            for message in bad:
                await ws.send_json(message)
                msg = await recv_json(ws)
                assert msg["type"] == "error" and msg["detail"], message
                assert msg["fields"], (message, msg)
            for text in ("not json", "[1, 2]", '"BTCUSDT"'):
                await ws.send_str(text)
                msg = await recv_json(ws)
                assert msg["type"] == "error" and msg["detail"], text
            await ws.send_bytes(b'{"symbol": "BTCUSDT"}')
            assert (await recv_json(ws))["type"] == "error"

            await ws.send_json({"symbol": "BTCUSDT", "timeframe": "1h", "limit": 1})
            msg = await recv_json(ws)
            assert msg == {
                "type": "snapshot",
                "symbol": "BTCUSDT",
                "timeframe": "1h",
                "data": [candle("2024-01-01T00:00:00Z", 100.0, 104.0, 96.0, 96.0, 1.75, 3)],
            }
            await upstream.trade("BTCUSDT", 97.0, 0.25, T0 + 62_000)
            # Subscribed to 1m and 1h now: one update for each, in TIMEFRAMES order.
            got = [await recv_json(ws), await recv_json(ws)]
            assert [(m["type"], m["timeframe"], m["candle"]["close"]) for m in got] == [
                ("candle", "1m", 97.0),
                ("candle", "1h", 97.0),
            ]
            assert not ws.closed


# --------------------------------------------------------------------------- /live-feed/


async def test_live_feed_refuses_the_upgrade_without_a_valid_token(
    live: LiveServer, http: aiohttp.ClientSession
) -> None:
    url = live.ws_url("/live-feed/subscribe/")
    upgrade = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
    }
    for extra, query in (({}, ""), (bearer("not-a-token"), ""), ({}, "?token=garbage")):
        async with http.get(
            live.url + "/live-feed/subscribe/" + query, headers={**upgrade, **extra}
        ) as resp:
            assert resp.status == 401
            assert await resp.json() == NOT_AUTHENTICATED
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await http.ws_connect(url + query, headers=extra)
        assert err.value.status == 401

    user = await register(http, live)
    # A refresh token is not an access token.
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await http.ws_connect(url, headers=bearer(user["refresh"]))
    assert err.value.status == 401
    for kwargs in ({"headers": bearer(user["access"])}, {"params": {"token": user["access"]}}):
        async with http.ws_connect(url, **kwargs) as ws:
            await ws.send_json({"action": "subscribe", "symbols": ["BTCUSDT"]})
            assert await recv_json(ws) == {"type": "subscribed", "symbols": SYMBOLS_SORTED}


async def test_live_feed_sends_only_subscribed_symbols(
    live: LiveServer, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    user = await register(http, live)
    async with http.ws_connect(
        live.ws_url("/live-feed/subscribe"), headers=bearer(user["access"])
    ) as ws:
        # Default: every watched symbol.
        await upstream.fake.send_book("ETHUSDT", 1999.5, 2000.5)
        await upstream.trade("ETHUSDT", 2000.0, 1.0, T0 + 1_000)
        assert await recv_json(ws) == {
            "type": "price",
            "symbol": "ETHUSDT",
            "price": 2000.0,
            "bid": 1999.5,
            "ask": 2000.5,
            "time": "2024-01-01T00:00:01.000Z",
        }

        await ws.send_json({"action": "unsubscribe", "symbols": ["ethusdt"]})
        assert await recv_json(ws) == {"type": "unsubscribed", "symbols": ["BTCUSDT"]}
        await upstream.trade("ETHUSDT", 2001.0, 1.0, T0 + 2_000)
        await upstream.trade("BTCUSDT", 42000.0, 0.5, T0 + 3_000)
        msg = await recv_json(ws)
        assert (msg["type"], msg["symbol"], msg["price"]) == ("price", "BTCUSDT", 42000.0)

        # Bad requests get an error each and change nothing.
        for message in (
            {"action": "watch", "symbols": ["BTCUSDT"]},
            {"symbols": ["BTCUSDT"]},
            {"action": "subscribe", "symbols": ["DOGEUSDT"]},
            {"action": "subscribe", "symbols": ["BTCUSDT", 7]},
            {"action": "subscribe", "symbols": [["ETHUSDT"]]},
            {"action": "subscribe", "symbols": "ETHUSDT"},
            {"action": "subscribe", "symbols": []},
            {"action": "subscribe", "symbols": {"ETHUSDT": 1}},
        ):
            await ws.send_json(message)
            msg = await recv_json(ws)
            assert msg["type"] == "error" and isinstance(msg["detail"], str), message
        await ws.send_str("{not json")
        assert (await recv_json(ws))["type"] == "error"
        await upstream.trade("ETHUSDT", 2002.0, 1.0, T0 + 4_000)
        await upstream.trade("BTCUSDT", 42001.0, 0.5, T0 + 5_000)
        msg = await recv_json(ws)
        assert (msg["symbol"], msg["price"]) == ("BTCUSDT", 42001.0)

        # Subscribing again acks, then sends the latest price of what was added.
        await ws.send_json({"action": "subscribe", "symbols": ["ETHUSDT"]})
        assert await recv_json(ws) == {"type": "subscribed", "symbols": SYMBOLS_SORTED}
        msg = await recv_json(ws)
        assert (msg["type"], msg["symbol"], msg["price"]) == ("price", "ETHUSDT", 2002.0)
        await upstream.trade("ETHUSDT", 2003.0, 1.0, T0 + 6_000)
        assert (await recv_json(ws))["price"] == 2003.0


# --------------------------------------------------------------------------- hub policy


class SlowClientRig:
    """A reading live-feed client, a slow /ws/ohlc/ client, and trades pushed in batches.

    The slow client has a tiny kernel receive buffer, a client library that stops reading
    the socket once one message waits unread, and subscribes to every timeframe with
    `max_rate: 0` (up to 7 candle messages per trade: state is still conflated, but flushed
    as often as the loop allows). The server side of its socket gets a small send buffer
    too: loopback buffers autotune up to megabytes, and a test must fill them within a
    bounded number of trades. The hub's `drop` and `detach` are wrapped to signal events.
    """

    def __init__(
        self,
        server: LiveServer,
        upstream: Upstream,
        http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch,
    ):
        self.server, self.upstream, self.http = server, upstream, http
        self.hub = hub = server.app[HUB]
        self.dropped, self.slow_detached = asyncio.Event(), asyncio.Event()
        drop, detach = hub.drop, hub.detach

        def spy_drop(client, reason, why=""):
            drop(client, reason, why)
            self.dropped.set()

        async def spy_detach(client):
            await detach(client)
            if client.endpoint == "ohlc":
                self.slow_detached.set()

        monkeypatch.setattr(hub, "drop", spy_drop)
        monkeypatch.setattr(hub, "detach", spy_detach)
        hub.slow_timeout = hub.send_timeout = 0.5
        self.prices: list[float] = []  # what the reading client received
        self.sent: list[float] = []

    async def start(self) -> None:
        user = await register(self.http, self.server)
        self.reader = await self.http.ws_connect(
            self.server.ws_url("/live-feed/subscribe/"), headers=bearer(user["access"])
        )
        await self.reader.send_json({"action": "unsubscribe", "symbols": ["ETHUSDT"]})
        assert (await recv_json(self.reader))["type"] == "unsubscribed"

        self.hub.max_queue_bytes = 64 * 1024  # about 400 candle messages
        self.sock = sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        host, port = self.server.url.removeprefix("http://").split(":")
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        self.slow = await ws_client_connect(
            self.server.ws_url("/ws/ohlc/"),
            sock=sock,
            max_queue=1,
            compression=None,
            ping_interval=None,
        )
        for tf in ("1s", "1m", "5m", "15m", "1h", "4h", "1d"):
            await self.slow.send(
                orjson.dumps({"symbol": "BTCUSDT", "timeframe": tf, "max_rate": 0}).decode()
            )
            msg = orjson.loads(await asyncio.wait_for(self.slow.recv(), 5))
            assert msg["type"] == "snapshot"
        (self.slow_client,) = [c for c in self.hub.clients if c.endpoint == "ohlc"]
        server_sock = self.slow_client.request.transport.get_extra_info("socket")
        server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    def close(self) -> None:
        """Release the slow client's socket whatever state the test ended in."""
        slow = getattr(self, "slow", None)
        if slow is not None:
            slow.transport.abort()
        sock = getattr(self, "sock", None)
        if sock is not None:
            sock.close()

    async def push(self, n: int = 50) -> None:
        """Send `n` BTC trades, then read the reading client until it has the last one
        (conflated: it gets some of them, in order, and always the newest)."""
        sent = self.sent
        for _ in range(n):
            price = 10_000.0 + len(sent)
            await self.upstream.trade("BTCUSDT", price, 0.5, T0 + len(sent) * 10)
            sent.append(price)
        async with asyncio.timeout(5):
            while not self.prices or self.prices[-1] != sent[-1]:
                msg = await recv_json(self.reader, timeout=None)
                assert msg["type"] == "price" and msg["symbol"] == "BTCUSDT", msg
                self.prices.append(msg["price"])

    async def finish(self) -> None:
        """After the drop: the reader still gets everything; the slow socket is released."""
        await asyncio.wait_for(self.slow_detached.wait(), 5)
        assert self.slow_client not in self.hub.clients
        await self.push(200)
        # In order, never a price that was not sent, and the newest one each time.
        assert self.prices == sorted(self.prices) and set(self.prices) <= set(self.sent)
        assert self.hub.dropped == 1 and not self.reader.closed
        # The slow client sees its connection end (a peer that does not read cannot take
        # the close frame, so it may be cut off rather than closed with 1008).
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(5):
                while True:
                    await self.slow.recv()
        assert self.slow.close_code in (1008, 1006, None)
        await self.reader.close()


async def test_client_that_never_reads_is_dropped_and_others_keep_the_newest_price(
    live: LiveServer,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = SlowClientRig(live, upstream, http, monkeypatch)
    try:
        await rig.start()
        # Push until the slow client is behind although the loop had every chance to drain
        # it (the reader caught up): its frames queue up on a socket nobody reads, until
        # they pass the byte bound (or one waited too long) and it is closed.
        for _ in range(200):
            await rig.push()
            writer = rig.slow_client.writer
            if writer.events or writer.state or rig.dropped.is_set():
                break
        assert writer.events or writer.state or rig.dropped.is_set(), (
            "the slow client never filled its buffers"
        )
        await asyncio.wait_for(rig.dropped.wait(), 5)
        assert rig.slow_client.writer.peak <= rig.hub.max_queue_bytes
        await rig.finish()
    finally:
        rig.close()


async def test_client_that_reads_too_slowly_is_dropped(
    live: LiveServer,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = SlowClientRig(live, upstream, http, monkeypatch)
    try:
        await rig.start()
        # The slow client reads after every batch, so its socket never stays full for
        # send_timeout; but it takes one of the several messages each batch brings (at least
        # one candle per timeframe) and what waits for it gets older for good: it is dropped
        # once the oldest byte or state held for it waited slow_timeout (the lag), not left
        # to read ever older prices.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not rig.dropped.is_set():
            assert loop.time() < deadline, "a client that reads too slowly was never dropped"
            await rig.push()
            with contextlib.suppress(ConnectionClosed):
                await asyncio.wait_for(rig.slow.recv(), 5)
        await rig.finish()
    finally:
        rig.close()


async def test_shutdown_closes_websockets_with_going_away(
    fake: FakeBinance, make_settings, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(feed="binance", binance_ws_url=fake.url, symbols=SYMBOLS)
    async with LiveServer(settings) as server:
        user = await register(http, server)
        live_ws = await http.ws_connect(
            server.ws_url("/live-feed/subscribe/"), headers=bearer(user["access"])
        )
        ohlc = await http.ws_connect(server.ws_url("/ws/ohlc/"))
        await ohlc.send_json({"symbol": "BTCUSDT", "timeframe": "1m"})
        assert (await recv_json(ohlc))["type"] == "snapshot"
        await live_ws.send_json({"action": "subscribe"})
        assert (await recv_json(live_ws))["type"] == "subscribed"
        waiting = [asyncio.create_task(ws.receive(timeout=5)) for ws in (live_ws, ohlc)]
    # The server has stopped: every client got a close frame with 1001 going away.
    for ws, task in zip((live_ws, ohlc), waiting, strict=True):
        msg = await task
        assert msg.type == WSMsgType.CLOSE, msg
        assert msg.data == 1001
        await ws.close()
        assert ws.close_code == 1001


async def test_upstream_close_reconnects_the_server_feed(
    live: LiveServer, fake: FakeBinance, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    await fake.drop_all()
    await fake.wait_connections(2)
    assert fake.connections[1] == fake.connections[0]
    assert sorted(fake.connections[0]) == [
        "btcusdt@bookTicker",
        "btcusdt@trade",
        "ethusdt@bookTicker",
        "ethusdt@trade",
    ]
    # Data flows over the new connection.
    async with ohlc_ws(http, live, "BTCUSDT", "1m") as ws:
        await upstream.trade("BTCUSDT", 50_000.0, 1.0, T0)
        await recv_until(ws, candle_at("2024-01-01T00:00:00Z", 50_000.0))
    status, body = await get_json(http, live.url + "/healthz")
    assert status == 200
    feed = body["feeds"]["binance"]
    assert feed["state"] == "connected" and feed["reconnects"] >= 1
    assert feed["messages"] >= 1


@pytest.mark.parametrize("candles", [1, 3, 1000])  # frames of <126 B, <64 KiB and >64 KiB
async def test_snapshots_of_every_size_arrive_intact(server, http, candles):
    """The hub frames each message itself (one frame for all receivers): every length
    encoding must decode in a real client, and two clients get the same thing."""
    market = server.app[MARKET]
    for i in range(candles):
        market.on_tick(Tick("BTCUSDT", 100.0 + i, 0.5, T0 + i * 1000, i + 1))
    query = {"symbol": "BTCUSDT", "timeframe": "1s", "limit": 1000}
    async with (
        http.ws_connect(server.ws_url("/ws/ohlc/")) as a,
        http.ws_connect(server.ws_url("/ws/ohlc/")) as b,
    ):
        got = []
        for ws in (a, b):
            await ws.send_json(query)
            msg = await ws.receive(timeout=5)
            assert msg.type == WSMsgType.TEXT
            got.append(msg.data)
        snapshot = orjson.loads(got[0])
        assert got[0] == got[1] and len(snapshot["data"]) == candles
        assert snapshot["data"][-1]["close"] == 100.0 + candles - 1
        if candles == 1000:
            assert len(got[0]) > 65536
        market.on_tick(Tick("BTCUSDT", 5.0, 1, T0 + candles * 1000, candles + 1))
        for ws in (a, b):  # small frames after a big one: the stream stays in step
            update = await ws.receive_json(timeout=5)
            assert update["type"] == "candle" and update["candle"]["close"] == 5.0


async def test_snapshots_are_built_once_per_change_of_the_candles(server) -> None:
    """Repeated snapshot requests (the abuse benchmark sends hundreds a second) reuse one
    framed message until a trade changes the symbol's candles."""
    market = server.app[MARKET]
    market.on_tick(Tick("BTCUSDT", 100.0, 0.5, T0, 1))
    first = market.snapshot("BTCUSDT", "1s", 1000)
    assert market.snapshot("BTCUSDT", "1s", 1000) is first
    market.on_tick(Tick("BTCUSDT", 101.0, 0.5, T0 + 1000, 2))
    second = market.snapshot("BTCUSDT", "1s", 1000)
    assert second is not first
    assert second.endswith(b'"close":101.0,"volume":0.5,"trades":1}]}')
    assert second.startswith(frame(second[4:])[:4])  # one whole frame (126..65535 bytes)
