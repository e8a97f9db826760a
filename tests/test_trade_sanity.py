"""Trades an upstream should never send, against the fake Binance upstream: times in the
future, trade-id resets and huge ids, a second feed of the same market, crossed books, and
24 h figures that must hold the latest trade.

Every wait is on a websocket message, an event or a poll with a deadline; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from conftest import LiveServer, bearer, register
from fake_binance import FakeBinance
from test_alerts import Trader, create
from test_feed_admin import admin_token
from test_feeds import Sink, binance, running

from pricewatch.candle_writer import CANDLE_WRITER, CandleWriter
from pricewatch.feed_admin import EXTRA_FEEDS, ExtraFeeds
from pricewatch.feeds import Tick
from pricewatch.hub import Hub
from pricewatch.market import MARKET, Latest, Market
from pricewatch.ohlc import DAY_OF_MINUTES, CandleBook
from pricewatch.server import STORE
from pricewatch.store import Store
from pricewatch.upstream import binance as binance_module
from pricewatch.upstream.backfill import RESET_CONFIRM, RESET_WAIT
from pricewatch.upstream.binance import MARKETS, BinanceFeed, traded_symbols, venue_of
from pricewatch.upstream.offline import ReplayFeed

YEAR_4000 = 64_060_588_800_000  # 4000-01-01T00:00:00Z in ms
DAY = 86_400_000


def now_ms() -> int:
    return int(time.time() * 1000)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll `check` (a state with no notifier: /healthz) until true; fail at the deadline."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


async def feed_health(http, server, name: str = "binance") -> tuple[int, dict, dict]:
    async with http.get(server.url + "/healthz") as resp:
        body = await resp.json()
        return resp.status, body, body["feeds"][name]


async def metric(http, server, line_start: str) -> str:
    async with http.get(server.url + "/metrics") as resp:
        text = await resp.text()
    return next(line for line in text.splitlines() if line.startswith(line_start))


def settings_for(make_settings, fake: FakeBinance, **kw):
    return make_settings(
        feed="binance",
        binance_ws_url=fake.url,
        binance_rest_url=fake.rest_url,
        **{"candle_history": False, **kw},
    )


# --------------------------------------------------------------------------- future trades


async def test_a_future_trade_is_dropped_counted_and_stored_candles_survive_the_prune(
    make_settings, http, fake
):
    async with LiveServer(settings_for(make_settings, fake)) as server:
        tok = (await register(http, server))["access"]
        async with Trader(fake, server, http, tok) as market:
            start = now_ms() - 5 * 60_000
            for i in range(3):  # three real minutes
                await fake.send_trade("BTCUSDT", 1 + i, 100.0 + i, 1, start + i * 60_000)
            await market.next_of("price", price=102.0)
            status, alert = await create(
                http,
                server,
                tok,
                asset="BTCUSDT",
                price=500.0,
                direction="above",
                repeat=True,
                cooldown=60,
            )
            assert status == 201
            await fake.send_trade("BTCUSDT", 4, 999.0, 1, YEAR_4000)
            await fake.send_trade("BTCUSDT", 5, 998.0, 1, now_ms() + DAY)
            latest = now_ms()
            await fake.send_trade("BTCUSDT", 6, 103.0, 1, latest)
            await market.next_of("price", price=103.0)
            assert market.alerts == []  # no trigger (and no cooldown) from the future
            await fake.send_trade("BTCUSDT", 7, 501.0, 0, latest)  # the same candle
            event = await market.alert_event(alert["id"])
            assert event["triggered_price"] == 501.0
        assert server.app[MARKET].latest["BTCUSDT"].price == 501.0
        status, _, feed = await feed_health(http, server)
        assert status == 200 and feed["future_trades"] == 2
        assert feed["missed_trades"]["BTCUSDT"] == 0  # their ids were accounted for
        assert (
            await metric(http, server, 'pricewatch_feed_future_trades_total{feed="binance"}')
        ).endswith(" 2")
        async with http.get(server.url + "/api/v1/prices/BTCUSDT") as resp:
            day = await resp.json()
        assert day["high_24h"] == 501.0 and day["low_24h"] == 100.0
        writer = server.app[CANDLE_WRITER]
        await writer.flush()
        await writer.prune()
        stored = await server.app[STORE].recent_candles("BTCUSDT", "1m", 100)
        assert [row[3] for row in stored] == [100.0, 101.0, 102.0, 103.0]  # opens


async def test_the_candle_prune_counts_back_from_now_not_from_a_stored_future_candle(tmp_path):
    """Candles stored before future trades were dropped: the prune keeps the real ones
    (it counts back from min(newest, now)) and deletes the impossible one; a load skips it."""
    store = await Store.open(str(tmp_path / "c.db"))
    try:
        now = now_ms() - now_ms() % 60_000
        real = [
            (
                "BTCUSDT",
                "1m",
                now - k * 60_000,
                100.0,
                101.0,
                99.0,
                100.5,
                1.0,
                1,
                now - k * 60_000,
                now - k * 60_000,
            )
            for k in range(3)
        ]
        bogus = (
            "BTCUSDT",
            "1m",
            YEAR_4000,
            999.0,
            999.0,
            999.0,
            999.0,
            1.0,
            1,
            YEAR_4000,
            YEAR_4000,
        )
        await store.upsert_candles([*real, bogus])
        writer = CandleWriter(CandleBook(sizes=DAY_OF_MINUTES), store, ("BTCUSDT",), retention=1000)
        assert await writer.load() == 3  # the future one is not loaded
        assert writer.book.candles("BTCUSDT", "1m", 10)[-1]["close"] == 100.5
        assert await writer.prune() == 1
        rows = await store.recent_candles("BTCUSDT", "1m", 10)
        assert sorted(row[2] for row in rows) == sorted(row[2] for row in real)
    finally:
        await store.close()


@pytest.mark.parametrize("speed", [0.0, 1.0])  # at 1x, it is not waited for either
async def test_a_replayed_future_trade_is_dropped_too(tmp_path, speed):
    path = Path(tmp_path / "trades.jsonl")
    lines = [
        f'{{"e":"trade","E":1,"s":"BTCUSDT","t":{i},"p":"{p}","q":"1","T":{t}}}'
        for i, p, t in ((1, 100, now_ms()), (2, 999, YEAR_4000), (3, 101, now_ms()))
    ]
    path.write_text("\n".join(lines) + "\n")
    sink = Sink()
    feed = ReplayFeed(path, ["BTCUSDT"], sink.on_tick, sink.on_book, speed=speed)
    async with asyncio.timeout(5):
        await feed.run()
    assert [t.price for t in sink.ticks] == [100.0, 101.0]
    assert feed.health()["future_trades"] == 1
    assert feed.health()["gaps"] == {"BTCUSDT": 0}  # its id counts as seen: no gap


@pytest.mark.parametrize("speed", [0.0, 1.0])
async def test_a_replayed_future_trade_with_a_huge_id_is_no_reset_and_no_gap(tmp_path, speed):
    path = Path(tmp_path / "trades.jsonl")
    lines = [
        f'{{"e":"trade","E":1,"s":"BTCUSDT","t":{i},"p":"{p}","q":"1","T":{t}}}'
        for i, p, t in ((1, 100, now_ms()), (2**62, 999, YEAR_4000), (2, 101, now_ms()))
    ]
    path.write_text("\n".join(lines) + "\n")
    sink = Sink()
    feed = ReplayFeed(path, ["BTCUSDT"], sink.on_tick, sink.on_book, speed=speed)
    async with asyncio.timeout(5):
        await feed.run()
    assert [t.price for t in sink.ticks] == [100.0, 101.0]
    health = feed.health()
    assert health["future_trades"] == 1 and health["id_resets"] == 0
    assert health["gaps"] == {"BTCUSDT": 0} and health["out_of_order"] == 0


async def test_a_replayed_reset_just_behind_the_last_id_is_a_reset_and_a_late_one_is_not(tmp_path):
    t = now_ms() - 60_000
    rows = [*((i, t + i) for i in range(1, 51)), (49, t + 50), (1, t + 100), (2, t + 101)]
    path = Path(tmp_path / "trades.jsonl")
    path.write_text(
        "".join(
            f'{{"e":"trade","E":1,"s":"BTCUSDT","t":{i},"p":"1","q":"1","T":{at}}}\n'
            for i, at in rows
        )
    )
    sink = Sink()
    feed = ReplayFeed(path, ["BTCUSDT"], sink.on_tick, sink.on_book)
    async with asyncio.timeout(5):
        await feed.run()
    health = feed.health()
    assert health["id_resets"] == 1 and health["out_of_order"] == 1  # 49 again: a tie
    assert health["gaps"] == {"BTCUSDT": 0}


async def test_a_streamed_future_trade_counts_its_next_id_and_ignores_a_huge_one():
    """The Binance path follows the same rule as replay: dropped, the next id seen (no gap,
    no backfill), any other id ignored (no reset, nothing held, nothing dropped with it)."""
    sink = Sink()
    feed = binance(FakeBinance(), sink)
    t = now_ms() - 10_000
    for i in range(1, 4):
        feed._deliver(Tick("BTCUSDT", 100.0, 1.0, t + i, i))
    feed._deliver(Tick("BTCUSDT", 999.0, 1.0, YEAR_4000, 4))
    feed._deliver(Tick("BTCUSDT", 101.0, 1.0, t + 5, 5))
    feed._deliver(Tick("BTCUSDT", 999.0, 1.0, YEAR_4000, 2**62))
    feed._deliver(Tick("BTCUSDT", 102.0, 1.0, t + 6, 6))
    assert [k.trade_id for k in sink.ticks] == [1, 2, 3, 5, 6]
    stats = feed.stats
    assert stats.future_trades == 2 and stats.id_resets == 0 and stats.out_of_order == 0
    assert stats.gaps["BTCUSDT"] == 0 and stats.missed_trades["BTCUSDT"] == 0
    await feed.sequencer.stop()


# --------------------------------------------------------------------------- trade ids


async def trading_at_100(fake, market) -> int:
    """Trades 1000..1004 at 100.0, ten seconds ago, seen by the server; returns their time."""
    t = now_ms() - 10_000
    for i in range(1000, 1005):
        await fake.send_trade("BTCUSDT", i, 100.0, 1, t + i - 1000)
    await market.next_of("price", price=100.0)
    return t


async def test_a_trade_id_reset_rebases_and_an_alert_crossed_after_it_fires(
    make_settings, http, fake
):
    async with LiveServer(settings_for(make_settings, fake)) as server:
        tok = (await register(http, server))["access"]
        async with Trader(fake, server, http, tok) as market:
            t = await trading_at_100(fake, market)
            status, alert = await create(
                http, server, tok, asset="BTCUSDT", price=150.0, direction="above"
            )
            assert status == 201
            # The venue restarted: ids from 1 again, later times. Three in a row re-base at
            # once (how fast is bench/abuse.py's to measure, not a unit test's).
            prices = [120.0, 140.0, 151.0, 152.0]
            for i, price in enumerate(prices, start=1):
                await fake.send_trade("BTCUSDT", i, price, 1, t + 100 + i)
            await market.next_of("price", price=152.0)
            event = await market.alert_event(alert["id"])
            assert event["status"] == "TRIGGERED" and event["triggered_price"] == 151.0
        _, _, feed = await feed_health(http, server)
        assert feed["id_resets"] == 1 and feed["missed_trades"]["BTCUSDT"] == 0
        assert feed["out_of_order"] == 0 and not feed["degraded"]
        assert (
            await metric(http, server, 'pricewatch_feed_id_resets_total{feed="binance"}')
        ).endswith(" 1")
        assert not [c for c in fake.rest_calls if "historicalTrades" in c[0]]  # no backfill
        candles = server.app[MARKET].candles.candles("BTCUSDT", "1m", 5)
        assert sum(c["trades"] for c in candles) == 5 + len(prices)


async def test_one_huge_trade_id_neither_freezes_the_price_nor_explodes_missed_trades(
    make_settings, http, fake
):
    async with LiveServer(settings_for(make_settings, fake)) as server:
        tok = (await register(http, server))["access"]
        async with Trader(fake, server, http, tok) as market:
            t = await trading_at_100(fake, market)
            status, alert = await create(
                http, server, tok, asset="BTCUSDT", price=150.0, direction="above"
            )
            assert status == 201
            await fake.send_trade("BTCUSDT", 2**63, 170.0, 1, t + 10)  # one bogus id
            await fake.send_trade("BTCUSDT", 1005, 110.0, 1, t + 11)
            await fake.send_trade("BTCUSDT", 1006, 151.0, 1, t + 12)
            await market.next_of("price", price=151.0)
            event = await market.alert_event(alert["id"])
            assert event["triggered_price"] == 151.0
        _, _, feed = await feed_health(http, server)
        assert feed["missed_trades"]["BTCUSDT"] == 0 and feed["gaps"]["BTCUSDT"] == 0
        assert feed["out_of_order"] == 1  # the lone outlier, dropped
        assert 170.0 not in [
            c["high"] for c in server.app[MARKET].candles.candles("BTCUSDT", "1m", 5)
        ]


async def test_a_sustained_jump_past_max_id_jump_rebases_without_backfill(
    make_settings, http, fake
):
    settings = settings_for(make_settings, fake, max_id_jump=1000)
    async with LiveServer(settings) as server:
        tok = (await register(http, server))["access"]
        async with Trader(fake, server, http, tok) as market:
            t = now_ms() - 10_000
            await fake.send_trade("BTCUSDT", 10, 100.0, 1, t)
            await market.next_of("price", price=100.0)
            for k in range(RESET_CONFIRM + 1):
                await fake.send_trade("BTCUSDT", 5000 + k, 200.0 + k, 1, t + 1 + k)
            await market.next_of("price", price=200.0 + RESET_CONFIRM)
        _, _, feed = await feed_health(http, server)
        assert feed["id_resets"] == 1 and feed["missed_trades"]["BTCUSDT"] == 0
        assert feed["gaps"]["BTCUSDT"] == 0
        assert not [c for c in fake.rest_calls if "Trades" in c[0] or "klines" in c[0]]


async def test_healthz_says_degraded_while_trades_are_dropped_out_of_order(
    make_settings, http, fake
):
    async with LiveServer(settings_for(make_settings, fake)) as server:
        tok = (await register(http, server))["access"]
        async with Trader(fake, server, http, tok) as market:
            t = await trading_at_100(fake, market)
            await fake.send_trade("BTCUSDT", 1002, 100.0, 1, t + 2)  # one late duplicate
            await fake.send_trade("ETHUSDT", 1, 2000.0, 1, t)  # a marker: the above is done
            await market.next_of("price", symbol="ETHUSDT")
            status, body, feed = await feed_health(http, server)
            assert status == 200 and not feed["degraded"] and feed["out_of_order"] == 1
            assert feed["id_resets"] == 0
            # Far behind and older: replayed history, not a reset; dropped, again and again.
            for i in range(1, 6):
                await fake.send_trade("BTCUSDT", i, 50.0, 1, t - 60_000 + i)

            async def degraded() -> bool:
                status, body, _ = await feed_health(http, server)
                return status == 503 and body["status"] == "degraded"

            await until(degraded)
            _, body, feed = await feed_health(http, server)
            assert body["degraded_feeds"] == ["binance"] and feed["degraded"]
            assert feed["id_resets"] == 0
            assert (
                await metric(http, server, 'pricewatch_feed_degraded{feed="binance"}')
            ).endswith(" 1")
            await fake.send_trade("BTCUSDT", 1005, 101.0, 1, t + 5)
            await market.next_of("price", price=101.0)
            status, body, feed = await feed_health(http, server)
            assert status == 200 and not feed["degraded"]
        assert server.app[MARKET].latest["BTCUSDT"].price == 101.0


async def test_a_lone_id_far_behind_is_held_then_dropped_when_the_sequence_goes_on():
    sink = Sink()
    feed = binance(FakeBinance(), sink)  # never connected: trades go straight in

    def trade(trade_id: int, price: float, t: int) -> None:
        feed._deliver(Tick("BTCUSDT", price, 1.0, t, trade_id))

    for i in range(1000, 1005):
        trade(i, 100.0, 1_704_067_200_000 + i)
    trade(1, 666.0, 1_704_067_300_000)  # one bogus id with a fresh time
    trade(1005, 101.0, 1_704_067_300_001)
    assert [t.trade_id for t in sink.ticks] == [*range(1000, 1006)]
    assert feed.stats.id_resets == 0 and feed.stats.out_of_order == 1
    assert feed.sequencer._symbols["BTCUSDT"].timer is None  # its wait was cancelled


async def test_a_candidate_out_of_step_with_the_run_starts_a_new_run_and_is_kept():
    sink = Sink()
    feed = binance(FakeBinance(), sink)
    t = 1_704_067_200_000
    for i in range(1000, 1005):
        feed._deliver(Tick("BTCUSDT", 100.0, 1.0, t + i - 1000, i))
    feed._deliver(Tick("BTCUSDT", 666.0, 1.0, t + 1000, 1))  # an outlier
    for k, i in enumerate(range(500, 500 + RESET_CONFIRM)):  # older than it: a run of its own
        feed._deliver(Tick("BTCUSDT", 200.0 + k, 1.0, t + 900 + k, i))
    assert [k.trade_id for k in sink.ticks[5:]] == [*range(500, 500 + RESET_CONFIRM)]
    assert feed.stats.id_resets == 1 and feed.stats.out_of_order == 1
    await feed.sequencer.stop()


async def test_a_reset_followed_by_one_trade_then_silence_shows_that_trade(
    make_settings, http, fake
):
    """A slow market: one trade of the new sequence and nothing after it. The price follows
    it once it has waited RESET_WAIT with no trade of the old sequence."""
    async with LiveServer(settings_for(make_settings, fake)) as server:
        tok = (await register(http, server))["access"]
        async with Trader(fake, server, http, tok) as market:
            t = await trading_at_100(fake, market)
            await fake.send_trade("BTCUSDT", 1, 120.0, 1, t + 100)  # then silence
            async with asyncio.timeout(RESET_WAIT + 2.0):
                await market.next_of("price", price=120.0)
            await fake.send_trade("BTCUSDT", 2, 121.0, 1, t + 101)  # the new sequence goes on
            await market.next_of("price", price=121.0)
        _, _, feed = await feed_health(http, server)
        assert feed["id_resets"] == 1 and feed["out_of_order"] == 0
        assert feed["missed_trades"]["BTCUSDT"] == 0 and feed["gaps"]["BTCUSDT"] == 0
        assert not [c for c in fake.rest_calls if "Trades" in c[0]]  # no backfill


async def test_a_held_candidate_is_not_released_after_the_feed_stops():
    sink = Sink()
    feed = binance(FakeBinance(), sink)
    t = 1_704_067_200_000
    for i in range(1000, 1003):
        feed._deliver(Tick("BTCUSDT", 100.0, 1.0, t + i, i))
    feed._deliver(Tick("BTCUSDT", 120.0, 1.0, t + 5_000, 1))
    sym = feed.sequencer._symbols["BTCUSDT"]
    assert sym.timer is not None and sym.candidates
    await feed.sequencer.stop()
    assert sym.timer is None and [k.trade_id for k in sink.ticks] == [1000, 1001, 1002]


async def test_a_reset_to_ids_just_behind_the_last_one_rebases():
    """Last id 50, the venue starts again from 1: ids 1..50 come back with newer times. They
    are a reset, not 50 late duplicates; a late duplicate (same or older time) still drops."""
    sink = Sink()
    feed = binance(FakeBinance(), sink)
    t = 1_704_067_200_000
    for i in range(1, 51):
        feed._deliver(Tick("BTCUSDT", 100.0, 1.0, t + i, i))
    feed._deliver(Tick("BTCUSDT", 100.0, 1.0, t + 50, 49))  # a tie: a late duplicate
    feed._deliver(Tick("BTCUSDT", 100.0, 1.0, t + 10, 10))  # older
    assert feed.stats.out_of_order == 2
    for i in range(1, 6):
        feed._deliver(Tick("BTCUSDT", 200.0 + i, 1.0, t + 1000 + i, i))
    assert [k.price for k in sink.ticks[50:]] == [201.0, 202.0, 203.0, 204.0, 205.0]
    assert feed.stats.id_resets == 1 and feed.stats.out_of_order == 2
    assert feed.stats.missed_trades["BTCUSDT"] == 0
    await feed.sequencer.stop()


# --------------------------------------------------------------------------- one feed per market


def test_binance_hosts_of_one_market_are_one_venue():
    spot = MARKETS["spot"]
    assert venue_of("wss://stream.binance.com:9443", spot) == "binance:spot"
    assert venue_of("wss://data-stream.binance.vision/ws/btcusdt@trade", spot) == "binance:spot"
    assert venue_of("wss://fstream.binance.com", MARKETS["usdm"]) == "binance:usdm"
    assert venue_of("wss://dstream.binance.com", MARKETS["coinm"]) == "binance:coinm"
    assert venue_of("wss://stream.binance.us:9443", spot) == "binanceus:spot"
    assert venue_of("ws://127.0.0.1:81", spot) != venue_of("ws://127.0.0.1:82", spot)
    watched = ("BTCUSDT", "ETHUSDT")
    assert traded_symbols("wss://data-stream.binance.vision", watched) == set(watched)
    assert traded_symbols("wss://x/stream?streams=btcusdt@trade/ethusdt@bookTicker", watched) == {
        "BTCUSDT"
    }
    assert traded_symbols("wss://x/ws/ethusdt@aggTrade", watched) == {"ETHUSDT"}
    assert traded_symbols("wss://x/custom", watched) is None


def test_a_host_merely_ending_like_binance_is_not_binance():
    spot = MARKETS["spot"]
    for host in ("evilbinance.vision", "evilbinance.com", "evilbinance.us"):
        assert not venue_of(f"wss://{host}/ws/btcusdt@trade", spot).startswith("binance")
    assert venue_of("wss://binance.vision", spot) == "binance:spot"


def test_a_binance_url_that_does_not_say_what_it_carries_is_judged_and_refused():
    """Any path but /stream and /ws/... on a Binance host: taken to carry every watched
    symbol, so it duplicates the main feed (not waved through as a relay would be)."""
    watched = ("BTCUSDT", "ETHUSDT")
    assert traded_symbols("wss://x.binance.vision/custom", watched, "binance:spot") == set(watched)

    def feed(url: str) -> BinanceFeed:
        return BinanceFeed(url, watched, lambda tick: None, lambda book: None)

    extra = ExtraFeeds(
        web.Application(), None, None, False, main=feed("wss://stream.binance.com:9443")
    )
    for url in (
        "wss://data-stream.binance.vision/custom",
        "wss://stream.binance.com/x/y",
        "wss://stream.binance.com:9443/stream;a=1",
    ):
        assert feed(url).carries == set(watched), url
        assert extra.duplicated(feed(url)) == "main feed", url
    assert extra.duplicated(feed("wss://evilbinance.vision/custom")) is None  # another venue


async def test_an_added_feed_is_built_once_and_that_one_runs(make_settings, http, fake):
    async with LiveServer(make_settings(allow_private_feeds=True)) as server:
        feeds = server.app[EXTRA_FEEDS]
        built = []
        make = feeds._make

        def counting(url: str, name: str):
            built.append(make(url, name))
            return built[-1]

        feeds._make = counting
        tok = await admin_token(http, server)
        async with http.post(
            server.url + "/api/v1/feeds", headers=bearer(tok), json={"url": fake.url}
        ) as resp:
            body = await resp.json()
            assert resp.status == 201
        assert len(built) == 1 and feeds.running[body["id"]][1].feed is built[0]
        assert body["name"] == f"extra-{body['id']}"
        await fake.wait_open(1)


async def test_an_admin_feed_duplicating_the_main_feed_is_refused_with_409(
    make_settings, http, fake
):
    settings = settings_for(make_settings, fake, allow_private_feeds=True)
    async with FakeBinance() as other, LiveServer(settings) as server:
        tok = await admin_token(http, server)
        for url in (
            fake.url,
            fake.url + "/stream?streams=btcusdt@trade",
            fake.url + "/ws/ethusdt@trade",
        ):
            async with http.post(
                server.url + "/api/v1/feeds", headers=bearer(tok), json={"url": url}
            ) as resp:
                body = await resp.json()
                assert resp.status == 409 and body["error"] == "conflict", (url, body)
                assert "main feed" in body["detail"]
        async with http.post(
            server.url + "/api/v1/feeds", headers=bearer(tok), json={"url": other.url}
        ) as resp:
            assert resp.status == 201  # another venue
        async with http.post(
            server.url + "/api/v1/feeds",
            headers=bearer(tok),
            json={"url": other.url + "/ws/btcusdt@trade"},
        ) as resp:
            assert resp.status == 409  # ... but only one feed of it
        async with http.post(
            server.url + "/save_quotes/", headers=bearer(tok), json={"api_url": fake.url + "/"}
        ) as resp:
            assert resp.status == 409


async def test_two_concurrent_adds_of_one_market_start_one_feed(make_settings, http, fake):
    async with LiveServer(make_settings(allow_private_feeds=True)) as server:  # main feed off
        tok = await admin_token(http, server)

        async def add(url: str) -> int:
            async with http.post(
                server.url + "/api/v1/feeds", headers=bearer(tok), json={"url": url}
            ) as resp:
                return resp.status

        statuses = await asyncio.gather(add(fake.url), add(fake.url + "/ws/btcusdt@trade"))
        assert sorted(statuses) == [201, 409]


async def test_a_stored_feed_duplicating_the_main_feed_is_not_started(
    make_settings, http, fake, caplog
):
    settings = make_settings(allow_private_feeds=True)
    async with LiveServer(settings) as server:  # main feed off: the extra feed is welcome
        tok = await admin_token(http, server)
        async with http.post(
            server.url + "/api/v1/feeds", headers=bearer(tok), json={"url": fake.url}
        ) as resp:
            assert resp.status == 201
    async with LiveServer(settings_for(make_settings, fake, allow_private_feeds=True)) as server:
        await fake.wait_open(1)
        tok = await admin_token(http, server, create=False)
        async with http.get(server.url + "/api/v1/feeds", headers=bearer(tok)) as resp:
            assert (await resp.json())["results"] == []
        _, body, _ = await feed_health(http, server)
        assert list(body["feeds"]) == ["binance"]
    assert any("would duplicate the main feed" in r.getMessage() for r in caplog.records)


async def test_a_duplicate_feed_that_slips_through_counts_each_trade_once(
    make_settings, http, fake
):
    """A relay URL that does not say what it carries is accepted; the market still takes
    each trade (same id and time) once."""
    settings = settings_for(make_settings, fake, allow_private_feeds=True)
    async with LiveServer(settings) as server:
        tok = await admin_token(http, server)
        async with http.post(
            server.url + "/api/v1/feeds",
            headers=bearer(tok),
            json={"url": fake.url + "/stream?relay=1"},
        ) as resp:
            assert resp.status == 201
        await fake.wait_open(2)
        t = now_ms() - 5_000
        for i in range(1, 6):
            await fake.send_trade("BTCUSDT", i, 100.0 + i, 0.5, t + i)
        mkt = server.app[MARKET]

        async def both_delivered() -> bool:  # each feed handed on all five
            return mkt.duplicates + mkt.ticks["BTCUSDT"] >= 10

        await until(both_delivered)
        assert mkt.ticks["BTCUSDT"] == 5 and mkt.duplicates == 5
        assert (await metric(http, server, "pricewatch_trades_duplicate_total ")) == (
            "pricewatch_trades_duplicate_total 5"
        )
        candles = mkt.candles.candles("BTCUSDT", "1m", 5)
        assert sum(c["volume"] for c in candles) == 2.5
        assert sum(c["trades"] for c in candles) == 5


def test_the_market_takes_a_trade_id_again_after_a_reset_but_never_the_same_trade_twice():
    mkt = Market(("BTCUSDT",), Hub())
    trade = Tick("BTCUSDT", 100.0, 1.0, 1_704_067_200_000, 7)
    mkt.on_tick(trade)
    mkt.on_tick(trade)
    mkt.on_tick(Tick("BTCUSDT", 101.0, 1.0, 1_704_067_260_000, 7))  # id 7 after a reset
    assert mkt.ticks["BTCUSDT"] == 2 and mkt.duplicates == 1


# --------------------------------------------------------------------------- books and 24 h


async def test_a_crossed_book_is_rejected_and_the_last_good_one_kept(fake):
    sink = Sink()
    feed = binance(fake, sink)
    async with running(feed):
        await fake.wait_open(1)
        await fake.send_book("BTCUSDT", 99.0, 100.0)
        await fake.send_book("BTCUSDT", 101.0, 100.0)  # bid above ask
        await fake.send_book("ETHUSDT", 10.0, 11.0)
        await sink.wait(lambda: len(sink.books) == 2)
    assert [(b.symbol, b.bid, b.ask) for b in sink.books] == [
        ("BTCUSDT", 99.0, 100.0),
        ("ETHUSDT", 10.0, 11.0),
    ]
    assert feed.stats.parse_errors == 1


def _day(latest: Latest, candles: CandleBook) -> tuple[float, float, float]:
    day = latest.with_day(candles)
    return day["low_24h"], day["price"], day["high_24h"]


def test_the_24h_high_and_low_hold_the_open_candle_and_the_latest_trade():
    mkt = Market(("BTCUSDT",), Hub())
    t = 1_704_067_200_000
    for k, price in enumerate((100.0, 99.0, 101.0)):  # closed minutes
        mkt.on_tick(Tick("BTCUSDT", price, 1.0, t + k * 60_000, k + 1))
    mkt.on_tick(Tick("BTCUSDT", 110.0, 1.0, t + 3 * 60_000, 4))  # the open one, above
    low, price, high = _day(mkt.latest["BTCUSDT"], mkt.candles)
    assert (low, price, high) == (99.0, 110.0, 110.0)
    # A late trade outside the day of the newest candle is still the latest price.
    mkt.on_tick(Tick("BTCUSDT", 120.0, 1.0, t - 2 * DAY, 5))
    low, price, high = _day(mkt.latest["BTCUSDT"], mkt.candles)
    assert low <= price <= high and price == 120.0


@pytest.mark.parametrize("skew", [0.0, 10.0])
def test_a_trade_just_within_the_allowed_skew_is_taken(skew):
    sink = Sink()
    feed = binance(FakeBinance(), sink, max_clock_skew=skew)
    feed._deliver(Tick("BTCUSDT", 100.0, 1.0, now_ms() + 5_000, 1))
    assert len(sink.ticks) == (1 if skew else 0)
    assert feed.stats.future_trades == (0 if skew else 1)


def test_a_flood_of_future_trades_logs_one_line_a_minute(caplog):
    sink = Sink()
    feed = binance(FakeBinance(), sink)
    with caplog.at_level("WARNING", logger="pricewatch"):
        for i in range(1, 101):
            feed._deliver(Tick("BTCUSDT", 100.0, 1.0, YEAR_4000 + i, i))
    assert feed.stats.future_trades == 100 and sink.ticks == []
    assert len([r for r in caplog.records if "ahead of the server clock" in r.getMessage()]) == 1


# --------------------------------------------------------------------------- upstream surprises


async def test_a_history_load_that_fails_unforeseen_still_starts_the_live_feed(
    make_settings, http, fake, monkeypatch, caplog
):
    """An answer nobody foresaw (here: the history reader raising ValueError) costs the
    candle history, never the live feed: before, it ended the feed's task for good."""

    async def unforeseen(*args, **kwargs):
        raise ValueError("an answer of a shape nobody foresaw")

    monkeypatch.setattr(binance_module, "fetch_history", unforeseen)
    settings = settings_for(make_settings, fake, candle_history=True)
    async with LiveServer(settings) as server:
        await fake.wait_open(1)
        await fake.send_trade("BTCUSDT", 1, 100.0, 1, now_ms())
        deadline = asyncio.get_running_loop().time() + 5
        while server.app[MARKET].price("BTCUSDT") != 100.0:
            assert asyncio.get_running_loop().time() < deadline, "the live feed never ran"
            await asyncio.sleep(0.02)
    assert "no candle history" in caplog.text
