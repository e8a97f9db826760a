"""Binance futures: a COIN-M `BTCUSD_PERP` feed (aggTrade + futures bookTicker) drives prices,
candles and alerts, and its gaps are backfilled by aggregate id."""

from __future__ import annotations

import time

import pytest
from conftest import LiveServer, bearer, register
from test_alerts import create, fetch

from pricewatch.config import ConfigError, Settings
from pricewatch.feeds import decode_event

PERP = "BTCUSD_PERP"


def test_market_picks_hosts_and_explicit_urls_win():
    coinm = Settings.from_env(
        {"PRICEWATCH_BINANCE_MARKET": "coinm", "PRICEWATCH_SYMBOLS": "btcusd_perp"}, dotenv=None
    )
    assert (coinm.binance_ws_url, coinm.binance_rest_url, coinm.symbols) == (
        "wss://dstream.binance.com",
        "https://dapi.binance.com",
        (PERP,),
    )
    usdm = Settings.from_env(
        {"PRICEWATCH_BINANCE_MARKET": "usdm", "PRICEWATCH_BINANCE_REST_URL": "http://127.0.0.1:5"},
        dotenv=None,
    )
    assert (usdm.binance_ws_url, usdm.binance_rest_url) == (
        "wss://fstream.binance.com",
        "http://127.0.0.1:5",
    )
    for env in ({"PRICEWATCH_BINANCE_MARKET": "margin"}, {"PRICEWATCH_SYMBOLS": "BTC_USD_PERP"}):
        with pytest.raises(ConfigError):
            Settings.from_env(env, dotenv=None)


def test_futures_frames_are_parsed():
    tick = decode_event(
        '{"stream":"btcusd_perp@aggTrade","data":{"e":"aggTrade","E":2,'
        '"s":"BTCUSD_PERP","a":5933014,"p":"42000.5","q":"3","f":100,'
        '"l":105,"T":1704067200001,"m":true}}'
    )
    assert (tick.symbol, tick.price, tick.qty, tick.trade_id, tick.count) == (
        PERP,
        42000.5,
        3.0,
        5933014,
        6,
    )
    book = decode_event(
        '{"e":"bookTicker","u":1,"E":2,"T":1,"s":"BTCUSD_PERP","ps":"BTCUSD",'
        '"b":"41999.9","B":"10","a":"42000.1","A":"12"}'
    )
    assert (book.symbol, book.bid, book.ask) == (PERP, 41999.9, 42000.1)


async def test_coinm_perpetual_drives_prices_candles_and_alerts_with_backfill(
    make_settings, http, fake
):
    settings = make_settings(
        feed="binance",
        binance_market="coinm",
        symbols=(PERP,),
        binance_ws_url=fake.url,
        binance_rest_url=fake.rest_url,
        candle_history=False,
        max_clock_skew=120,
    )  # its trades are in the next minute
    async with LiveServer(settings) as server:
        tok = (await register(http, server))["access"]
        await fake.wait_open(1)
        assert fake.connections[0] == ["btcusd_perp@aggTrade", "btcusd_perp@bookTicker"]
        now = int(time.time() * 1000)
        t0 = now - now % 60_000 + 60_000  # one candle; after the alert's creation
        async with http.ws_connect(
            server.ws_url("/live-feed/subscribe/"), headers=bearer(tok)
        ) as ws:
            await fake.send_futures_book(PERP, 99.5, 100.5)
            await fake.send_agg_trade(PERP, 1, 100.0, 2, t0 + 1)
            msg = await ws.receive_json(timeout=5)
            while msg.get("type") != "price":
                msg = await ws.receive_json(timeout=5)
            assert (msg["symbol"], msg["price"], msg["bid"], msg["ask"]) == (
                PERP,
                100.0,
                99.5,
                100.5,
            )
            status, alert = await create(
                http, server, tok, asset="btcusd_perp", price=150.0, direction="above"
            )
            assert status == 201, alert
            fake.record_trade(PERP, 2, 151.0, 1, t0 + 2)  # aggregate 2: only REST has it
            await fake.send_agg_trade(PERP, 3, 120.0, 1, t0 + 3)
            while True:
                msg = await ws.receive_json(timeout=5)
                if msg["type"] == "alert":
                    break
            assert msg["alert"]["id"] == alert["id"]
        _, stored = await fetch(http, server, tok, alert["id"])
        assert (stored["status"], stored["triggered_price"]) == ("TRIGGERED", 151.0)
        async with http.get(
            server.url + "/api/v1/ohlc", params={"symbol": PERP, "timeframe": "1m"}
        ) as resp:
            candle = (await resp.json())["data"][-1]
        assert (candle["open"], candle["high"], candle["close"], candle["trades"]) == (
            100.0,
            151.0,
            120.0,
            3,
        )
        assert any(
            path == "/dapi/v1/aggTrades" and query.get("fromId") == "2"
            for path, query in fake.rest_calls
        )
        async with http.get(server.url + "/healthz") as resp:
            feed = (await resp.json())["feeds"]["binance"]
        assert feed["backfilled_trades"][PERP] == 1 and feed["missed_trades"][PERP] == 0


async def test_futures_history_skips_the_1s_ring_it_has_no_klines_for(make_settings, http, fake):
    now = int(time.time() * 1000)
    for i in range(1, 4):
        fake.record_trade(PERP, i, 100.0 + i, 1, now - 3_600_000 + i * 60_000)
    settings = make_settings(
        feed="binance",
        binance_market="coinm",
        symbols=(PERP,),
        binance_ws_url=fake.url,
        binance_rest_url=fake.rest_url,
    )
    async with LiveServer(settings) as server:
        await fake.wait_open(1)  # after the history
        async with http.get(
            server.url + "/api/v1/ohlc", params={"symbol": PERP, "timeframe": "1h"}
        ) as resp:
            assert (await resp.json())["data"]  # history loaded for the other rings
    intervals = {q.get("interval") for path, q in fake.rest_calls if path.endswith("/klines")}
    assert "1s" not in intervals and {"1m", "1h", "1d"} <= intervals
