"""Candle history at start from REST klines, meeting the live stream exactly."""

from __future__ import annotations

import time

import orjson
from conftest import LiveServer

from pricewatch.ohlc import TIMEFRAMES


def reference(trades: list[tuple[int, float, float]], tf_ms: int, limit: int) -> list[dict]:
    """Candles computed directly from (time, price, qty) trades in id order."""
    groups: dict[int, list] = {}
    for t, p, q in trades:
        groups.setdefault(t - t % tf_ms, []).append((t, p, q))
    out = []
    for start, rows in sorted(groups.items()):
        by_time = sorted(rows, key=lambda r: r[0])
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start // 1000)) + "Z"
        out.append(
            {
                "timestamp": stamp,
                "open": by_time[0][1],
                "high": max(r[1] for r in rows),
                "low": min(r[1] for r in rows),
                "close": by_time[-1][1],
                "volume": sum(r[2] for r in rows),
                "trades": len(rows),
            }
        )
    return out[-limit:]


async def test_history_and_live_stream_meet_without_double_counting(make_settings, http, fake):
    now = int(time.time() * 1000)
    cut = now - now % 60_000
    trades: list[tuple[int, float, float]] = []
    trade_id = 0
    # Three hours of history at uneven times, then a few trades inside the current minute.
    times = [now - 3 * 3_600_000 + i * 53_000 + (i % 7) * 1_000 for i in range(200)]
    times += [t for t in (cut + 5, cut + 17) if t < now]
    for i, t in enumerate(times):
        trade_id += 1
        price, qty = 100.0 + (i * 37 % 23), 0.25 * (1 + i % 4)
        fake.record_trade("BTCUSDT", trade_id, price, qty, t)
        trades.append((t, price, qty))
    settings = make_settings(
        feed="binance",
        binance_ws_url=fake.url,
        binance_rest_url=fake.rest_url,
        symbols=("BTCUSDT",),
    )
    async with LiveServer(settings) as server:
        await fake.wait_open(1)  # history is loaded before the stream connects
        for i in range(3):  # gone by when the stream connected: only REST knows them
            trade_id += 1
            t = max(now, times[-1]) + 1 + i
            fake.record_trade("BTCUSDT", trade_id, 120.0 + i, 0.5, t)
            trades.append((t, 120.0 + i, 0.5))
        async with http.ws_connect(server.ws_url("/ws/ohlc/")) as ws:
            await ws.send_json({"symbol": "BTCUSDT", "timeframe": "1s"})
            assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
            for i in range(2):  # live again
                trade_id += 1
                t = trades[-1][0] + 1
                await fake.send_trade("BTCUSDT", trade_id, 130.0 + i, 0.25, t)
                trades.append((t, 130.0 + i, 0.25))
            while True:  # until the last live trade is in its candle
                msg = orjson.loads((await ws.receive(timeout=5)).data)
                if msg["type"] == "candle" and msg["candle"]["close"] == 131.0:
                    break
        for tf, tf_ms in TIMEFRAMES.items():
            async with http.get(
                server.url + "/api/v1/ohlc",
                params={"symbol": "BTCUSDT", "timeframe": tf, "limit": 1000},
            ) as resp:
                data = (await resp.json())["data"]
            assert data == reference(trades, tf_ms, 1000), tf
        async with http.get(server.url + "/api/v1/prices/BTCUSDT") as resp:
            day = await resp.json()
        prices = [p for _, p, _ in trades]  # in time order; all within the last 24 h
        assert (day["open_24h"], day["high_24h"], day["low_24h"], day["volume_24h"]) == (
            prices[0],
            max(prices),
            min(prices),
            round(sum(q for _, _, q in trades), 8),
        )
        assert day["change_24h"] == round((prices[-1] - prices[0]) / prices[0] * 100, 4)
        async with http.get(server.url + "/healthz") as resp:
            feed = (await resp.json())["feeds"]["binance"]
        assert feed["missed_trades"]["BTCUSDT"] == 0
        assert feed["backfilled_trades"]["BTCUSDT"] == 3 + sum(1 for t in times if t >= cut)


async def test_history_failure_starts_without_it(make_settings, http, fake):
    fake.answer_first = [500] * 20
    settings = make_settings(
        feed="binance",
        binance_ws_url=fake.url,
        binance_rest_url=fake.rest_url,
        symbols=("BTCUSDT",),
    )
    async with LiveServer(settings) as server, http.ws_connect(server.ws_url("/ws/ohlc/")) as ws:
        await ws.send_json({"symbol": "BTCUSDT", "timeframe": "1m"})
        assert (await ws.receive_json(timeout=5))["data"] == []  # no history
        await fake.wait_open(1)
        await fake.send_trade("BTCUSDT", 7, 100.0, 1.0, int(time.time() * 1000))
        msg = await ws.receive_json(timeout=5)
        assert msg["type"] == "candle" and msg["candle"]["trades"] == 1
        assert [path for path, _ in fake.rest_calls][0] == "/api/v3/klines"
