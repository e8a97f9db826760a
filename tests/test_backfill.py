"""Gap-free trades: missed trade ids are fetched over REST from the loopback fake and handed
on in id order, exactly once, before newer live trades."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from conftest import LiveServer, register
from fake_binance import FakeBinance
from smtp_sink import SmtpSink
from test_alerts import Trader, create, fetch
from test_feeds import SYMBOLS, T0, Sink, running

from pricewatch.alerts import ENGINE
from pricewatch.server import DELIVERER
from pricewatch.upstream.binance import BinanceFeed
from pricewatch.upstream.binance_rest import BinanceRest


@pytest.fixture
def sink() -> Sink:
    return Sink()


@contextlib.asynccontextmanager
async def rest_client(fake: FakeBinance) -> AsyncIterator[BinanceRest]:
    rest = BinanceRest(fake.rest_url, timeout=2.0)
    async with aiohttp.ClientSession() as session:
        rest.session = session
        yield rest


def feed_with(fake: FakeBinance, sink: Sink, rest: BinanceRest, **kw) -> BinanceFeed:
    return BinanceFeed(
        fake.url,
        SYMBOLS,
        sink.on_tick,
        sink.on_book,
        rest=rest,
        backoff_initial=0.05,
        backoff_cap=0.2,
        **kw,
    )


def ids(sink: Sink, symbol: str = "BTCUSDT") -> list[int]:
    return [t.trade_id for t in sink.ticks if t.symbol == symbol]


async def test_trades_missed_inside_a_gap_are_fetched_and_delivered_in_order(fake, sink):
    async with rest_client(fake) as rest:
        feed = feed_with(fake, sink, rest)
        async with running(feed):
            await fake.wait_open(1)
            for i in (1, 2, 3):
                await fake.send_trade("BTCUSDT", i, 100 + i, 1, T0 + i)
            for i in range(4, 9):  # happened, but never reached us
                fake.record_trade("BTCUSDT", i, 100 + i, 0.5, T0 + i)
            await fake.send_trade("BTCUSDT", 9, 109, 1, T0 + 9)
            await fake.send_trade("BTCUSDT", 10, 110, 1, T0 + 10)
            await sink.wait(lambda: len(ids(sink)) >= 10)
        assert ids(sink) == list(range(1, 11))
        assert [t.price for t in sink.ticks] == [100.0 + i for i in range(1, 11)]
        health = feed.health()
        assert health["gaps"]["BTCUSDT"] == 1
        assert health["missed_trades"]["BTCUSDT"] == 0
        assert health["backfilled_trades"]["BTCUSDT"] == 5
        assert health["backfill_state"]["BTCUSDT"] == "idle"
        assert [c for c in fake.rest_calls if c[0] == "/api/v3/historicalTrades"][0][1][
            "fromId"
        ] == "4"


async def test_trades_sent_during_a_reconnect_are_recovered(fake, sink):
    async with rest_client(fake) as rest:
        feed = feed_with(fake, sink, rest)
        async with running(feed):
            await fake.wait_open(1)
            for i in (1, 2):
                await fake.send_trade("BTCUSDT", i, 100, 1, T0 + i)
            await sink.wait(lambda: len(sink.ticks) == 2)
            await fake.drop_all()  # the daily close
            for i in (3, 4, 5):
                fake.record_trade("BTCUSDT", i, 90 + i, 1, T0 + i)
            await fake.wait_connections(2)
            await fake.wait_open(1)
            await fake.send_trade("BTCUSDT", 5, 95, 1, T0 + 5)  # replayed overlap: a duplicate
            await fake.send_trade("BTCUSDT", 6, 96, 1, T0 + 6)
            await sink.wait(lambda: len(sink.ticks) >= 6)
        assert ids(sink) == [1, 2, 3, 4, 5, 6]  # each exactly once


async def test_refused_historical_trades_fall_back_to_aggregate_trades(fake, sink):
    fake.refuse_historical = True
    fake.agg_size = 2
    async with rest_client(fake) as rest:
        feed = feed_with(fake, sink, rest)
        async with running(feed):
            await fake.wait_open(1)
            await fake.send_trade("BTCUSDT", 1, 100, 1, T0 + 1)
            await fake.send_trade("BTCUSDT", 2, 100, 1, T0 + 2)
            for i in range(3, 7):  # 3..6: two aggregates of two trades (ids 3-4, 5-6)
                fake.record_trade("BTCUSDT", i, 100 + i, 0.25, T0 + i)
            await fake.send_trade("BTCUSDT", 7, 107, 1, T0 + 7)
            await sink.wait(lambda: ids(sink)[-1:] == [7])
        assert ids(sink) == [1, 2, 4, 6, 7]  # aggregates carry their last trade id ...
        assert [t.count for t in sink.ticks] == [1, 1, 2, 2, 1]  # ... and how many they hold
        assert sum(t.qty for t in sink.ticks) == 4.0
        assert feed.health()["missed_trades"]["BTCUSDT"] == 0
        assert feed.health()["backfilled_trades"]["BTCUSDT"] == 4


async def test_an_aggregate_partly_seen_live_is_counted_missed_not_twice(fake, sink):
    fake.refuse_historical = True
    fake.agg_size = 2
    async with rest_client(fake) as rest:
        feed = feed_with(fake, sink, rest)
        async with running(feed):
            await fake.wait_open(1)
            await fake.send_trade("BTCUSDT", 1, 100, 1, T0 + 1)  # aggregate 1-2, half live
            for i in range(2, 5):
                fake.record_trade("BTCUSDT", i, 100 + i, 0.25, T0 + 1)
            await fake.send_trade("BTCUSDT", 5, 105, 1, T0 + 5)
            await sink.wait(lambda: ids(sink)[-1:] == [5])
        assert ids(sink) == [1, 4, 5]
        assert feed.health()["missed_trades"]["BTCUSDT"] == 1  # trade 2
        assert feed.health()["backfilled_trades"]["BTCUSDT"] == 2


async def test_rate_limit_retry_after_is_obeyed(fake, sink):
    fake.answer_first = [429]
    fake.retry_after = 1
    async with rest_client(fake) as rest:
        feed = feed_with(fake, sink, rest)
        stamps: list[float] = []
        real_get = rest.get

        async def timed_get(name, params):
            stamps.append(time.monotonic())
            return await real_get(name, params)

        rest.get = timed_get  # type: ignore[method-assign]
        async with running(feed):
            await fake.wait_open(1)
            await fake.send_trade("BTCUSDT", 1, 100, 1, T0)
            fake.record_trade("BTCUSDT", 2, 102, 1, T0 + 2)
            await fake.send_trade("BTCUSDT", 3, 103, 1, T0 + 3)
            await sink.wait(lambda: ids(sink)[-1:] == [3])
        assert ids(sink) == [1, 2, 3]
        assert len(stamps) == 2 and stamps[1] - stamps[0] >= 0.99  # waited out Retry-After
        assert feed.health()["rest"] == {"calls": 2, "used_weight": 4, "blocked_for": 0}


async def test_gap_rest_cannot_fill_is_given_up_and_counted(fake, sink):
    fake.served_from["BTCUSDT"] = 50  # ids below 50 are no longer served
    async with rest_client(fake) as rest:
        feed = feed_with(fake, sink, rest, backfill_hold=1.0)
        async with running(feed):
            await fake.wait_open(1)
            await fake.send_trade("BTCUSDT", 1, 100, 1, T0)
            await fake.send_trade("BTCUSDT", 8, 108, 1, T0 + 8)
            await fake.send_trade("BTCUSDT", 9, 109, 1, T0 + 9)
            await sink.wait(lambda: ids(sink)[-1:] == [9])
        assert ids(sink) == [1, 8, 9]
        assert feed.health()["missed_trades"]["BTCUSDT"] == 6
        assert feed.health()["backfill_state"]["BTCUSDT"] == "gave_up"


async def test_a_stuck_backfill_never_holds_live_trades_past_its_bound(fake, sink):
    fake.answer_first = [429]
    fake.retry_after = 600  # Binance says: come back in 10 minutes
    async with rest_client(fake) as rest:
        feed = feed_with(fake, sink, rest, backfill_hold=0.5)
        async with running(feed):
            await fake.wait_open(1)
            await fake.send_trade("BTCUSDT", 1, 100, 1, T0)
            fake.record_trade("BTCUSDT", 2, 102, 1, T0 + 2)
            await fake.send_trade("BTCUSDT", 3, 103, 1, T0 + 3)
            await sink.wait(lambda: ids(sink)[-1:] == [3], timeout=3.0)
            assert rest.blocked_for() > 500  # and no call is made before that
            await fake.send_trade("BTCUSDT", 4, 104, 1, T0 + 4)
            fake.record_trade("BTCUSDT", 5, 105, 1, T0 + 5)
            await fake.send_trade("BTCUSDT", 6, 106, 1, T0 + 6)
            await sink.wait(lambda: ids(sink)[-1:] == [6], timeout=3.0)
        assert ids(sink) == [1, 3, 4, 6]
        assert feed.health()["missed_trades"]["BTCUSDT"] == 2
        assert len(fake.rest_calls) == 1


async def test_gap_beyond_the_trade_limit_is_not_fetched_trade_by_trade(fake, sink):
    async with rest_client(fake) as rest:
        feed = feed_with(fake, sink, rest, backfill_max_trades=10)
        async with running(feed):
            await fake.wait_open(1)
            await fake.send_trade("BTCUSDT", 1, 100, 1, T0)
            await fake.send_trade("BTCUSDT", 100, 108, 1, T0 + 8)
            await sink.wait(lambda: ids(sink)[-1:] == [100])
        assert feed.health()["missed_trades"]["BTCUSDT"] == 98
        assert not [c for c in fake.rest_calls if c[0] == "/api/v3/historicalTrades"]


async def test_symbols_are_sequenced_independently(fake, sink):
    async with rest_client(fake) as rest:
        feed = feed_with(fake, sink, rest)
        async with running(feed):
            await fake.wait_open(1)
            await fake.send_trade("BTCUSDT", 1, 100, 1, T0)
            fake.record_trade("BTCUSDT", 2, 102, 1, T0 + 2)
            await fake.send_trade("ETHUSDT", 70, 2000, 1, T0)
            await fake.send_trade("BTCUSDT", 3, 103, 1, T0 + 3)
            await fake.send_trade("ETHUSDT", 71, 2001, 1, T0 + 1)
            await sink.wait(lambda: len(sink.ticks) == 5)
        assert ids(sink) == [1, 2, 3]
        assert ids(sink, "ETHUSDT") == [70, 71]


async def test_alert_crossed_only_inside_a_gap_triggers_at_that_trade(make_settings, http, fake):
    """End to end: the server's Binance feed backfills from the fake's REST; the alert fires
    with the missed trade's own price and time, and the candle counts every trade once."""
    settings = make_settings(
        feed="binance", binance_ws_url=fake.url, binance_rest_url=fake.rest_url, max_clock_skew=120
    )  # its trades are in the next minute
    async with LiveServer(settings) as server:
        tok = (await register(http, server))["access"]
        async with Trader(fake, server, http, tok) as market:
            now = int(time.time() * 1000)
            t0 = now - now % 60_000 + 60_000  # the next minute: every trade in one candle
            await fake.send_trade("BTCUSDT", 1, 100.0, 1, t0)
            await market.next_of("price", price=100.0)
            status, alert = await create(
                http, server, tok, asset="BTCUSDT", price=150.0, direction="above"
            )
            assert status == 201
            t_spike = t0 + 3
            fake.record_trade("BTCUSDT", 2, 120.0, 1, t_spike - 1)
            fake.record_trade("BTCUSDT", 3, 155.5, 1, t_spike)  # only this one crosses 150
            fake.record_trade("BTCUSDT", 4, 110.0, 1, t_spike + 1)
            await fake.send_trade("BTCUSDT", 5, 105.0, 1, t0 + 5)  # the gap 2..4 goes first
            event = await market.alert_event(alert["id"])
            assert event["status"] == "TRIGGERED"
            _, stored = await fetch(http, server, tok, alert["id"])
            assert stored["triggered_price"] == 155.5 and stored["backfill"] == "trade"
            assert stored["triggered_at"] == time.strftime(
                "%Y-%m-%dT%H:%M:%S.003Z", time.gmtime(t0 // 1000)
            )
            async with http.get(
                server.url + "/api/v1/ohlc", params={"symbol": "BTCUSDT", "timeframe": "1m"}
            ) as resp:
                candle = (await resp.json())["data"][-1]
            assert candle["trades"] == 5 and candle["volume"] == 5.0
            assert (candle["open"], candle["high"], candle["low"], candle["close"]) == (
                100.0,
                155.5,
                100.0,
                105.0,
            )
            async with http.get(server.url + "/healthz") as resp:
                feed = (await resp.json())["feeds"]["binance"]
            assert feed["backfilled_trades"]["BTCUSDT"] == 3
            assert feed["missed_trades"]["BTCUSDT"] == 0


async def test_an_alert_never_triggers_on_a_backfilled_trade_older_than_itself(
    make_settings, http, fake
):
    """Trades from before an alert's creation, recovered by a backfill, are history: the
    alert stays CREATED through them and triggers on the first crossing after its creation."""
    settings = make_settings(
        feed="binance", binance_ws_url=fake.url, binance_rest_url=fake.rest_url
    )
    async with LiveServer(settings) as server:
        tok = (await register(http, server))["access"]
        async with Trader(fake, server, http, tok) as market:
            now = int(time.time() * 1000)
            await fake.send_trade("BTCUSDT", 1, 100.0, 1, now - 60_000)
            await market.next_of("price", price=100.0)
            status, alert = await create(
                http, server, tok, asset="BTCUSDT", price=150.0, direction="above"
            )
            assert status == 201
            fake.record_trade("BTCUSDT", 2, 155.0, 1, now - 30_000)  # before the alert
            await fake.send_trade("BTCUSDT", 3, 120.0, 1, now + 5_000)
            await market.next_of("price", price=120.0)
            await server.app[ENGINE].drained()
            _, stored = await fetch(http, server, tok, alert["id"])
            assert stored["status"] == "CREATED"
            await fake.send_trade("BTCUSDT", 4, 151.0, 1, now + 6_000)  # after it: news
            event = await market.alert_event(alert["id"])
            assert event["status"] == "TRIGGERED" and event["triggered_price"] == 151.0


async def test_a_gap_too_large_for_trades_is_filled_from_one_minute_klines(
    make_settings, http, fake
):
    """Whole minutes inside the gap come from 1m klines: candles exact for them, an alert
    crossed inside one triggers at its target and the kline's open time, marked "kline"; the
    trades of the held trade's own minute before it cannot be known and count as missed."""
    settings = make_settings(
        feed="binance",
        binance_ws_url=fake.url,
        binance_rest_url=fake.rest_url,
        backfill_max_trades=10,
        max_clock_skew=600,
    )  # its trades are minutes ahead
    async with LiveServer(settings) as server:
        tok = (await register(http, server))["access"]
        async with Trader(fake, server, http, tok) as market:
            now = int(time.time() * 1000)
            m0 = now - now % 60_000 + 60_000  # the next minute, after the alert's creation
            await fake.send_trade("BTCUSDT", 1, 100.0, 1, m0 + 1_000)
            await market.next_of("price", price=100.0)
            status, alert = await create(
                http, server, tok, asset="BTCUSDT", price=150.0, direction="above"
            )
            assert status == 201
            trade_id, expected = 1, {m0: [(100.0, 1.0)]}
            for minute, prices in (
                (0, [101.0, 99.0, 102.0]),
                (1, [110.0, 151.0, 120.0]),
                (2, [121.0] * 5),
                (3, [130.0, 131.0]),
            ):
                for i, price in enumerate(prices):
                    trade_id += 1
                    start = m0 + minute * 60_000
                    fake.record_trade("BTCUSDT", trade_id, price, 0.5, start + 2_000 + i)
                    expected.setdefault(start, []).append((price, 0.5))
            held_minute = m0 + 3 * 60_000
            missed_before_live = len(expected.pop(held_minute))  # its kline: not usable
            await fake.send_trade("BTCUSDT", trade_id + 1, 140.0, 2, held_minute + 30_000)
            expected[held_minute] = [(140.0, 2.0)]
            event = await market.alert_event(alert["id"])
            assert event["status"] == "TRIGGERED"
            _, stored = await fetch(http, server, tok, alert["id"])
            assert stored["triggered_price"] == 150.0 and stored["backfill"] == "kline"
            assert stored["triggered_at"] == time.strftime(
                "%Y-%m-%dT%H:%M:%S.000Z", time.gmtime((m0 + 60_000) // 1000)
            )
            async with http.get(
                server.url + "/api/v1/ohlc",
                params={"symbol": "BTCUSDT", "timeframe": "1m", "start": str(m0)},
            ) as resp:
                candles = {c["timestamp"]: c for c in (await resp.json())["data"]}
            for start, trades in expected.items():
                c = candles[time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start // 1000))]
                prices = [p for p, _ in trades]
                assert (c["open"], c["high"], c["low"], c["close"], c["volume"], c["trades"]) == (
                    prices[0],
                    max(prices),
                    min(prices),
                    prices[-1],
                    sum(q for _, q in trades),
                    len(trades),
                ), start
            async with http.get(server.url + "/healthz") as resp:
                feed = (await resp.json())["feeds"]["binance"]
            assert feed["missed_trades"]["BTCUSDT"] == missed_before_live
            assert feed["kline_filled_trades"]["BTCUSDT"] == 3 + 3 + 5


async def test_stream_dropped_trades_meanwhile_candles_exact_and_one_email(
    make_settings, http, fake
):
    """The daily close: the stream drops, trades happen meanwhile (only REST knows them), the
    feed reconnects; every candle comes out exact and the alert crossed only in the gap
    triggers with that trade's price and time, with exactly one email."""
    async with SmtpSink() as smtp:
        settings = make_settings(
            feed="binance",
            binance_ws_url=fake.url,
            binance_rest_url=fake.rest_url,
            smtp_host="127.0.0.1",
            smtp_port=smtp.port,
            smtp_retry_base=0.05,
            max_clock_skew=120,
        )  # its trades are in the next minute
        async with LiveServer(settings) as server:
            tok = (await register(http, server))["access"]
            async with Trader(fake, server, http, tok) as market:
                now = int(time.time() * 1000)
                t0 = now - now % 60_000 + 60_000
                await fake.send_trade("BTCUSDT", 1, 100.0, 1, t0 + 1)
                await market.next_of("price", price=100.0)
                status, alert = await create(
                    http, server, tok, asset="BTCUSDT", price=150.0, direction="above"
                )
                assert status == 201
                await fake.drop_all()  # the 24 h close
                gap = [(2, 130.0, t0 + 2), (3, 160.5, t0 + 3), (4, 125.0, t0 + 4)]
                for trade_id, price, t in gap:
                    fake.record_trade("BTCUSDT", trade_id, price, 1, t)
                await fake.wait_connections(2)
                await fake.wait_open(1)
                await fake.send_trade("BTCUSDT", 5, 110.0, 1, t0 + 5)
                event = await market.alert_event(alert["id"])
                assert event["status"] == "TRIGGERED"
                _, stored = await fetch(http, server, tok, alert["id"])
                assert (stored["triggered_price"], stored["backfill"]) == (160.5, "trade")
                assert stored["triggered_at"].endswith(".003Z")
                async with http.get(
                    server.url + "/api/v1/ohlc", params={"symbol": "BTCUSDT", "timeframe": "1m"}
                ) as resp:
                    candle = (await resp.json())["data"][-1]
                assert (
                    candle["open"],
                    candle["high"],
                    candle["low"],
                    candle["close"],
                    candle["volume"],
                    candle["trades"],
                ) == (100.0, 160.5, 100.0, 110.0, 5.0, 5)
                (mail,) = await smtp.wait_messages(1)
                assert "160.5" in mail.get_body().get_content()
                notifier = server.app[DELIVERER]
                await notifier.wait_until(lambda: notifier.sent >= 1, 10)
            assert len(smtp.messages) == 1


async def test_after_a_restart_older_alerts_still_trigger_on_backfilled_trades(tmp_path):
    """The creation log is rebuilt at start: alerts from before its horizon count as always
    there, so a backfilled trade crossing one of them triggers it even when a newer alert
    exists (which that trade predates)."""
    from pricewatch import clock
    from pricewatch.alerts import CREATION_HORIZON, AlertEngine
    from pricewatch.feeds import Tick
    from pricewatch.hub import Hub
    from pricewatch.store import Store

    store = await Store.open(str(tmp_path / "pw.db"))
    try:
        user = await store.create_user("alice", "a@example.com", "$2b$hash")
        old = await store.create_alert(user.id, "BTCUSDT", 100.0, "above", max_active=10)
        new = await store.create_alert(user.id, "BTCUSDT", 200.0, "above", max_active=10)
        now = clock.now()
        async with store._tx() as db:  # the old one from two days ago, the new one 10 s ago
            await db.execute(
                "UPDATE alerts SET created_at = ? WHERE id = ?",
                (now - 2 * CREATION_HORIZON, old.id),
            )
            await db.execute("UPDATE alerts SET created_at = ? WHERE id = ?", (now - 10, new.id))
        engine = AlertEngine(store, Hub())
        await engine.load()
        engine.on_tick(Tick("BTCUSDT", 250.0, 1.0, int((now - 30) * 1000), 7, backfill="trade"))
        assert [hit.alert_id for hit in engine._hits] == [old.id]  # not the newer one
        assert new.id in engine.index
    finally:
        await store.close()
