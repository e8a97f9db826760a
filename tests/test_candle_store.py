"""Candles survive restarts: written to SQLite in batches, loaded at start, paged back."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from conftest import LiveServer

from pricewatch import server as server_mod
from pricewatch.candle_writer import CandleWriter
from pricewatch.ohlc import TIMEFRAMES, CandleBook
from pricewatch.store import Store

DATA = Path(__file__).parent / "data"
H = 3_600_000
T0 = 1704067200000  # 2024-01-01T00:00:00Z


async def ohlc(http, server, **params) -> tuple[int, dict]:
    async with http.get(server.url + "/api/v1/ohlc", params=params) as resp:
        return resp.status, await resp.json()


async def test_replayed_candles_survive_a_restart_with_any_feed(make_settings, http):
    path = DATA / "BTCUSDT-trades-sample.csv"
    settings = make_settings(feed=f"replay:{path}", symbols=("BTCUSDT",))
    before = {}
    async with LiveServer(settings) as server:
        await asyncio.wait_for(server.app[server_mod.FEED].done.wait(), 5)
        for tf in TIMEFRAMES:
            status, before[tf] = await ohlc(
                http, server, symbol="BTCUSDT", timeframe=tf, limit=1000
            )
            assert status == 200 and before[tf]["data"]
    # A restart without any feed: the chart is what it was (the final flush ran at stop).
    async with LiveServer(dataclasses.replace(settings, feed="off")) as server:
        for tf in TIMEFRAMES:
            status, after = await ohlc(http, server, symbol="BTCUSDT", timeframe=tf, limit=1000)
            assert status == 200 and after == before[tf], tf


def hourly(n: int, symbol: str = "BTCUSDT") -> list[tuple]:
    return [
        (
            symbol,
            "1h",
            T0 + i * H,
            100.0 + i,
            101.0 + i,
            99.0 + i,
            100.5 + i,
            1.5,
            3,
            T0 + i * H,
            T0 + i * H + 10,
        )
        for i in range(n)
    ]


async def test_stored_history_beyond_the_ring_is_paged_with_start_and_end(make_settings, http):
    settings = make_settings(symbols=("BTCUSDT",))
    store = await Store.open(settings.db)
    await store.upsert_candles(hourly(1200))
    await store.close()
    async with LiveServer(settings) as server:
        status, newest = await ohlc(http, server, symbol="BTCUSDT", timeframe="1h", limit=1000)
        assert status == 200 and len(newest["data"]) == 1000  # the ring: the newest 1000
        assert newest["data"][0]["open"] == 300.0
        status, older = await ohlc(
            http, server, symbol="BTCUSDT", timeframe="1h", end=str(T0 + 199 * H), limit=50
        )
        assert status == 200
        assert [c["open"] for c in older["data"]] == [250.0 + i for i in range(50)]  # 150..199
        status, iso = await ohlc(
            http,
            server,
            symbol="BTCUSDT",
            timeframe="1h",
            start="2024-01-01T00:00:00Z",
            end="2024-01-01T02:00:00+00:00",
        )
        assert [c["timestamp"] for c in iso["data"]] == [
            "2024-01-01T00:00:00Z",
            "2024-01-01T01:00:00Z",
            "2024-01-01T02:00:00Z",
        ]
        assert iso["data"][0] == {
            "timestamp": "2024-01-01T00:00:00Z",
            "open": 100.0,
            "high": 101.0,
            "low": 99.0,
            "close": 100.5,
            "volume": 1.5,
            "trades": 3,
        }


@pytest.mark.parametrize(
    "params, field",
    [
        ({"start": "yesterday"}, "start"),
        ({"end": "2024-13-01T00:00:00Z"}, "end"),
        ({"start": "-5"}, "start"),
        ({"start": "\u00b3"}, "start"),
        ({"end": "\u0661"}, "end"),
    ],
)
async def test_bad_start_or_end_is_a_400_naming_the_field(server, http, params, field):
    status, body = await ohlc(http, server, symbol="BTCUSDT", timeframe="1h", **params)
    assert status == 400 and body["error"] == "validation" and field in body["fields"]


class FlakyStore:
    """Stands in for Store's candle writes: fails the first write, records the rest."""

    def __init__(self) -> None:
        self.writes: list[list[tuple]] = []
        self.fail = True

    async def upsert_candles(self, rows) -> None:
        if self.fail:
            self.fail = False
            raise OSError("disk full")
        self.writes.append(sorted(rows))


async def test_writer_batches_changes_and_keeps_them_when_a_write_fails():
    book = CandleBook(timeframes={"1m": 60_000}, size=10)
    writer = CandleWriter(book, FlakyStore(), ("X",), retention=1000)  # type: ignore[arg-type]
    for i in range(5):
        book.add("X", 100.0 + i, 1.0, T0 + i * 1000)  # one open candle, five trades
    with pytest.raises(OSError):
        await writer.flush()
    book.add("X", 200.0, 1.0, T0 + 60_000)  # the first candle closes, a second opens
    assert await writer.flush() == 2  # nothing lost from the failed write
    assert await writer.flush() == 0  # nothing changed since
    book.add("X", 50.0, 1.0, T0 + 30_000)  # a late trade into the closed candle
    assert await writer.flush() == 1
    store = writer.store
    first, late = store.writes[0][0], store.writes[1][0]
    assert first[2:9] == (T0, 100.0, 104.0, 100.0, 104.0, 5.0, 5)
    assert late[2:9] == (T0, 100.0, 104.0, 50.0, 50.0, 6.0, 6)  # latest trade time: close


def test_rolling_day_figures_cover_the_trailing_24_hours_of_minutes():
    book = CandleBook(timeframes={"1m": 60_000}, size=1440)
    m = 60_000
    book.add("X", 50.0, 1.0, T0 - 10 * m)  # 24 h + 9 min before the last trade: outside
    book.add("X", 100.0, 2.0, T0)  # the window's first minute
    book.add("X", 130.0, 1.0, T0 + 5 * m)
    book.add("X", 90.0, 1.0, T0 + 600 * m)
    assert book.rolling("X") == (50.0, 130.0, 50.0, 5.0)  # a day not over yet: all of it
    book.add("X", 110.0, 0.5, T0 + 1439 * m)  # now the window starts at T0
    assert book.rolling("X") == (100.0, 130.0, 90.0, 4.5)
    book.add("X", 140.0, 0.25, T0 + 1439 * m + 1)  # the open candle counts at once
    assert book.rolling("X") == (100.0, 140.0, 90.0, 4.75)
    assert book.rolling("Y") is None


async def test_prices_carry_the_24_hour_figures(make_settings, http):
    path = DATA / "BTCUSDT-trades-sample.csv"
    settings = make_settings(feed=f"replay:{path}", symbols=("BTCUSDT",))
    async with LiveServer(settings) as server:
        await asyncio.wait_for(server.app[server_mod.FEED].done.wait(), 5)
        async with http.get(server.url + "/api/v1/prices/BTCUSDT") as resp:
            body = await resp.json()
        _, candles = await ohlc(http, server, symbol="BTCUSDT", timeframe="1m", limit=1000)
    data = candles["data"]
    assert body["open_24h"] == data[0]["open"]
    assert body["high_24h"] == max(c["high"] for c in data)
    assert body["low_24h"] == min(c["low"] for c in data)
    assert body["volume_24h"] == round(sum(c["volume"] for c in data), 8)
    assert body["change_24h"] == round((body["price"] - data[0]["open"]) / data[0]["open"] * 100, 4)


async def test_a_restart_with_the_demo_feed_keeps_the_closed_candles(make_settings, http):
    settings = make_settings(feed="demo", symbols=("BTCUSDT",))
    async with LiveServer(settings) as server, http.ws_connect(server.ws_url("/ws/ohlc/")) as ws:
        await ws.send_json({"symbol": "BTCUSDT", "timeframe": "1s"})
        seen = set()
        while len(seen) < 3:  # three different seconds: at least two closed candles
            msg = await ws.receive_json(timeout=5)
            if msg["type"] == "candle":
                seen.add(msg["candle"]["timestamp"])
        status, before = await ohlc(http, server, symbol="BTCUSDT", timeframe="1s", limit=1000)
        assert status == 200 and len(before["data"]) >= 3
    async with LiveServer(dataclasses.replace(settings, feed="off")) as server:
        status, after = await ohlc(http, server, symbol="BTCUSDT", timeframe="1s", limit=1000)
    closed = before["data"][:-1]  # the last one was still open when read
    assert after["data"][: len(closed)] == closed


def test_a_late_trade_into_a_closed_minute_updates_the_24_hour_figures():
    book = CandleBook(timeframes={"1m": 60_000}, size=1440)
    book.add("X", 100.0, 1.0, T0)
    book.add("X", 101.0, 1.0, T0 + 60_000)
    assert book.rolling("X") == (100.0, 101.0, 100.0, 2.0)
    book.add("X", 500.0, 1.0, T0 + 5)  # late, into the closed first minute
    assert book.rolling("X") == (100.0, 500.0, 100.0, 3.0)
