"""PRICEWATCH_QUOTES: the offline demo quote source, and which source each setting picks."""

from __future__ import annotations

import asyncio
import calendar
import time

import aiohttp
import pytest
from conftest import LiveServer, bearer, register
from fake_binance import FakeBinance

from pricewatch.config import Settings


@pytest.mark.parametrize(
    ("quotes", "feed", "key", "source"),
    [
        ("auto", "demo", None, "demo"),
        ("auto", "demo", "KEY", "alphavantage"),
        ("auto", "binance", None, None),
        ("auto", "binance", "KEY", "alphavantage"),
        ("demo", "binance", "KEY", "demo"),
        ("alphavantage", "demo", None, None),
        ("off", "demo", "KEY", None),
    ],
)
def test_quote_source_follows_the_setting_the_feed_and_the_key(
    quotes: str, feed: str, key: str | None, source: str | None
) -> None:
    settings = Settings(quotes=quotes, feed=feed, alphavantage_api_key=key)
    assert settings.quote_source == source


def test_quotes_setting_is_read_from_the_environment() -> None:
    assert Settings.from_env({"PRICEWATCH_QUOTES": "Demo"}, dotenv=None).quotes == "demo"


async def test_demo_quotes_store_the_latest_usdt_price_and_push_it_on_ws_rates(
    make_settings,
) -> None:
    now = int(time.time() * 1000)
    async with (
        FakeBinance() as fake,
        LiveServer(
            make_settings(
                feed="binance", binance_ws_url=fake.url, quotes="demo", alphavantage_interval=0.05
            )
        ) as server,
        aiohttp.ClientSession() as http,
    ):
        await fake.wait_connections(1)
        async with http.ws_connect(server.ws_url("/ws/rates/")) as rates:
            await fake.send_book("BTCUSDT", 42000.25, 42000.75)
            await fake.send_trade("BTCUSDT", 1, 42000.5, 0.25, now)
            async with asyncio.timeout(10):
                while True:  # quotes taken before the book arrived may lack bid/ask
                    msg = await rates.receive_json()
                    if msg["type"] == "quote" and msg["bid"] is not None:
                        break
        assert (msg["from_currency"], msg["to_currency"]) == ("BTC", "USD")
        assert (msg["rate"], msg["bid"], msg["ask"]) == (42000.5, 42000.25, 42000.75)
        quoted = calendar.timegm(time.strptime(msg["source_time"], "%Y-%m-%dT%H:%M:%SZ"))
        assert abs(time.time() - quoted) < 60  # source_time is now, not the trade's time

        user = await register(http, server)
        async with http.get(
            server.url + "/api/v1/quotes?per_page=1", headers=bearer(user["access"])
        ) as resp:
            assert resp.status == 200
            stored = (await resp.json())["results"][0]
        assert stored["rate"] == 42000.5 and stored["from_currency"] == "BTC"

        async with http.get(server.url + "/healthz") as resp:
            feeds = (await resp.json())["feeds"]
        assert feeds["quotes-demo"]["kind"] == "demo-quotes"
        assert feeds["quotes-demo"]["messages"] >= 1
