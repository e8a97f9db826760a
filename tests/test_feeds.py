"""Feeds against real loopback sockets: a fake Binance websocket, recorded files, fake AlphaVantage.

Every wait is on a queue, event or condition with a timeout; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from conftest import LiveServer, bearer, register
from fake_alphavantage import FakeAlphaVantage
from fake_binance import FakeBinance, free_port

from pricewatch.feeds import (
    Book,
    Feed,
    FeedConfigError,
    FeedRefused,
    ParseError,
    ServerShutdown,
    Tick,
    decode_event,
)
from pricewatch.upstream.alphavantage import (
    Quote,
    QuotePoller,
    UpstreamError,
    UpstreamRateLimited,
    fetch_rate,
)
from pricewatch.upstream.binance import BinanceFeed
from pricewatch.upstream.factory import make_feed
from pricewatch.upstream.offline import DemoFeed, ReplayFeed

DATA = Path(__file__).parent / "data"
SYMBOLS = ["BTCUSDT", "ETHUSDT"]
T0 = 1704067200121  # 2024-01-01T00:00:00.121Z


class Sink:
    """Collects what a feed delivers; lets a test wait for a condition on it."""

    def __init__(self) -> None:
        self.ticks: list[Tick] = []
        self.books: list[Book] = []
        self.events: asyncio.Queue[Tick | Book] = asyncio.Queue()
        self._changed = asyncio.Event()

    def on_tick(self, tick: Tick) -> None:
        self.ticks.append(tick)
        self.events.put_nowait(tick)
        self._changed.set()

    def on_book(self, book: Book) -> None:
        self.books.append(book)
        self.events.put_nowait(book)
        self._changed.set()

    async def next(self, timeout: float = 5.0) -> Tick | Book:
        async with asyncio.timeout(timeout):
            return await self.events.get()

    async def wait(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


async def wait_state(feed: Feed, state: str, timeout: float = 5.0) -> None:
    """Wait until ``feed.health()["state"] == state``.

    State is a plain attribute with no notifier, so this checks it on every loop turn (with a
    short pause); the timeout makes the test fail rather than hang.
    """
    async with asyncio.timeout(timeout):
        while feed.health()["state"] != state:
            await asyncio.sleep(0.002)


@contextlib.asynccontextmanager
async def running(feed: Feed) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(feed.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def sink() -> Sink:
    return Sink()


def binance(fake: FakeBinance, sink: Sink, **kw: float) -> BinanceFeed:
    kw.setdefault("backoff_initial", 0.05)
    kw.setdefault("backoff_cap", 0.2)
    return BinanceFeed(fake.url, SYMBOLS, sink.on_tick, sink.on_book, **kw)


# --------------------------------------------------------------------------- parsers


def test_decode_event_reads_combined_and_raw_frames() -> None:
    wrapped = (
        b'{"stream":"btcusdt@trade","data":{"e":"trade","E":1704067200123,"s":"BTCUSDT",'
        b'"t":3340000001,"p":"42283.58000000","q":"0.00120000","T":1704067200121,'
        b'"m":true,"M":true}}'
    )
    assert decode_event(wrapped) == Tick("BTCUSDT", 42283.58, 0.0012, 1704067200121, 3340000001)
    raw = (
        '{"u":400900217,"s":"BNBUSDT","b":"25.35190000","B":"31.21000000",'
        '"a":"25.36520000","A":"40.66000000"}'
    )
    assert decode_event(raw) == Book("BNBUSDT", 25.3519, 25.3652, 31.21, 40.66)
    assert decode_event('{"result":null,"id":7}') is None
    assert decode_event('{"e":"serverShutdown","E":1704153600000}') == ServerShutdown(1704153600000)
    # float() keeps Binance's decimal strings exactly (repr round-trips them)
    tick = decode_event(wrapped.replace(b"42283.58000000", b"0.00000001"))
    assert isinstance(tick, Tick) and repr(tick.price) == "1e-08"


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        ("not json", "invalid_json"),
        ("[1, 2, 3]", "not_an_object"),
        ('{"stream":"x","data":[1]}', "not_an_object"),
        ('{"e":"trade","s":"BTCUSDT","t":1,"q":"1","T":1}', "missing_field"),
        ('{"e":"trade","s":"BTCUSDT","t":1,"p":"abc","q":"1","T":1}', "bad_number"),
        ('{"e":"trade","s":"BTCUSDT","t":1,"p":"-1","q":"1","T":1}', "bad_number"),
        ('{"e":"trade","s":"BTCUSDT","t":1,"p":"0","q":"1","T":1}', "bad_number"),
        ('{"e":"trade","s":"BTCUSDT","t":1,"p":"NaN","q":"1","T":1}', "bad_number"),
        ('{"e":"trade","s":"BTCUSDT","t":1,"p":"inf","q":"1","T":1}', "bad_number"),
        ('{"e":"trade","s":"BTCUSDT","t":"1","p":"1","q":"1","T":1}', "bad_field"),
        ('{"u":1,"s":"BTCUSDT","b":"1","B":"1","a":"1"}', "missing_field"),
        ('{"code":2,"msg":"Invalid request"}', "error_reply"),
        ('{"e":"kline","s":"BTCUSDT"}', "unknown_event"),
    ],
)
def test_decode_event_rejects_malformed_frames(frame: str, kind: str) -> None:
    with pytest.raises(ParseError) as info:
        decode_event(frame)
    assert info.value.kind == kind


# --------------------------------------------------------------------------- Binance


async def test_trade_is_parsed_into_tick_with_exact_values(fake: FakeBinance, sink: Sink) -> None:
    feed = binance(fake, sink)
    async with running(feed):
        await fake.wait_connections(1)
        assert fake.connections == [
            ["btcusdt@trade", "btcusdt@bookTicker", "ethusdt@trade", "ethusdt@bookTicker"]
        ]
        await fake.send_trade("XRPUSDT", 9, "0.61", "10", T0)  # not watched: ignored
        await fake.send_trade("BTCUSDT", 3340000001, "42283.58000000", "0.00120000", T0)
        await fake.send_trade("ETHUSDT", 1288860001, "2281.47000000", "0.43340000", T0 + 8)
        assert await sink.next() == Tick("BTCUSDT", 42283.58, 0.0012, T0, 3340000001)
        assert await sink.next() == Tick("ETHUSDT", 2281.47, 0.4334, T0 + 8, 1288860001)
        health = feed.health()
    assert health["kind"] == "binance"
    assert health["state"] == "connected"
    assert health["url"] == fake.url + (
        "/stream?streams=btcusdt@trade/btcusdt@bookTicker/ethusdt@trade/ethusdt@bookTicker"
    )
    assert health["messages"] == 3 and health["parse_errors"] == 0
    assert health["reconnects"] == 0
    assert 0 <= health["last_message_age"] < 5
    assert health["gaps"] == {"BTCUSDT": 0, "ETHUSDT": 0}


async def test_book_ticker_is_parsed_into_book(fake: FakeBinance, sink: Sink) -> None:
    async with running(binance(fake, sink)):
        await fake.wait_connections(1)
        await fake.send_book(
            "ETHUSDT", "2281.46000000", "2281.47000000", "12.40210000", "8.10000000"
        )
        assert await sink.next() == Book("ETHUSDT", 2281.46, 2281.47, 12.4021, 8.1)
    assert sink.ticks == []


async def test_upstream_close_reconnects_with_the_same_streams(
    fake: FakeBinance, sink: Sink
) -> None:
    feed = binance(fake, sink)
    async with running(feed):
        await fake.wait_connections(1)
        await fake.send_trade("BTCUSDT", 1, 42000, 1, T0)
        await sink.next()
        await fake.drop_all()  # Binance's routine 24 h close
        await fake.wait_connections(2)
        await fake.send_trade("BTCUSDT", 2, 42001, 1, T0 + 1)
        assert await sink.next() == Tick("BTCUSDT", 42001.0, 1.0, T0 + 1, 2)
        assert feed.health()["reconnects"] == 1
        assert feed.health()["state"] == "connected"
    assert len(fake.connections) == 2
    assert fake.connections[0] == fake.connections[1]
    assert len(fake.connections[0]) == 4


async def test_garbage_frames_are_counted_and_skipped(
    fake: FakeBinance, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    feed = binance(fake, sink)
    async with running(feed):
        await fake.wait_connections(1)
        await fake.send_raw("not json")
        await fake.send_raw("{not json either")
        await fake.send_raw("[1, 2, 3]")
        await fake.send_event("btcusdt@trade", {"e": "trade", "s": "BTCUSDT", "t": 1, "T": T0})
        await fake.send_trade("BTCUSDT", 2, "abc", "1", T0)
        await fake.send_trade("BTCUSDT", 3, "-42000", "1", T0)
        await fake.send_book("BTCUSDT", "NaN", "42000", "1", "1")
        await fake.send_raw('{"result": null, "id": 1}')  # control reply: ignored, not an error
        await fake.send_trade("BTCUSDT", 4, "42000.10", "0.5", T0)
        assert await sink.next() == Tick("BTCUSDT", 42000.1, 0.5, T0, 4)
        health = feed.health()
    assert health["parse_errors"] == 7
    assert health["messages"] == 9
    assert health["reconnects"] == 0 and len(fake.connections) == 1
    warnings = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == 4  # invalid_json (twice: logged once), not_an_object, missing, number


async def test_trade_id_jump_is_counted_as_gap(fake: FakeBinance, sink: Sink) -> None:
    # No REST client: gaps cannot be filled, so they are counted as missed at once.
    feed = binance(fake, sink)
    async with running(feed):
        await fake.wait_connections(1)
        for trade_id in (10, 11, 15, 13, 16, 20):  # 11→15 misses 3, 13 is late, 16→20 misses 3
            await fake.send_trade("BTCUSDT", trade_id, 42000, 1, T0)
        await fake.send_trade("ETHUSDT", 500, 2281, 1, T0)
        await fake.send_trade("ETHUSDT", 501, 2281, 1, T0)
        await sink.wait(lambda: len(sink.ticks) == 7)
    # 13 came after 15: delivered trades stay in id order, each id once.
    assert [t.trade_id for t in sink.ticks if t.symbol == "BTCUSDT"] == [10, 11, 15, 16, 20]
    assert feed.stats.out_of_order == 1
    assert feed.health()["gaps"] == {"BTCUSDT": 2, "ETHUSDT": 0}
    assert feed.health()["missed_trades"] == {"BTCUSDT": 6, "ETHUSDT": 0}


async def test_server_shutdown_reconnects_without_backoff(fake: FakeBinance, sink: Sink) -> None:
    # a 10 s backoff would blow the 2 s wait below: the reconnect must be immediate
    feed = binance(fake, sink, backoff_initial=10.0, backoff_cap=30.0)
    async with running(feed):
        await fake.wait_connections(1)
        await fake.send_server_shutdown()
        await fake.wait_connections(2, timeout=2.0)
        await fake.send_trade("BTCUSDT", 7, 42000, 1, T0)
        assert (await sink.next()).trade_id == 7
        assert feed.health()["reconnects"] == 1
    assert fake.connections[0] == fake.connections[1]


async def test_stale_connection_is_closed_and_reconnected(fake: FakeBinance, sink: Sink) -> None:
    feed = binance(fake, sink, stale_after=0.3)
    async with running(feed):
        await fake.wait_connections(1)
        started = time.monotonic()
        await fake.wait_connections(2, timeout=3.0)
        assert time.monotonic() - started >= 0.25
        assert feed.health()["reconnects"] >= 1


async def test_busy_connection_is_not_considered_stale(fake: FakeBinance, sink: Sink) -> None:
    feed = binance(fake, sink, stale_after=0.5)
    async with running(feed):
        await fake.wait_connections(1)
        for trade_id in range(1, 9):  # one trade per 0.1 s for 0.8 s: never 0.5 s of silence
            await fake.send_trade("BTCUSDT", trade_id, 42000, 1, T0)
            assert (await sink.next()).trade_id == trade_id
            await asyncio.sleep(0.1)
        assert len(fake.connections) == 1
        assert feed.health()["reconnects"] == 0


async def test_refused_connection_backs_off_then_connects(sink: Sink) -> None:
    port = free_port()
    feed = BinanceFeed(
        f"ws://127.0.0.1:{port}",
        SYMBOLS,
        sink.on_tick,
        sink.on_book,
        backoff_initial=0.05,
        backoff_cap=0.2,
    )
    async with running(feed):
        await wait_state(feed, "backoff")
        async with FakeBinance(port=port) as fake:
            await fake.wait_connections(1)
            await fake.send_trade("BTCUSDT", 1, 42000, 1, T0)
            assert (await sink.next()).trade_id == 1
            await wait_state(feed, "connected")
            assert feed.health()["reconnects"] >= 1


async def test_failing_callback_does_not_kill_the_feed(fake: FakeBinance, sink: Sink) -> None:
    def on_tick(tick: Tick) -> None:
        if tick.trade_id == 1:
            raise RuntimeError("downstream bug")
        sink.on_tick(tick)

    feed = BinanceFeed(fake.url, SYMBOLS, on_tick, sink.on_book, backoff_initial=0.05)
    async with running(feed):
        await fake.wait_connections(1)
        await fake.send_trade("BTCUSDT", 1, 42000, 1, T0)
        await fake.send_trade("BTCUSDT", 2, 42001, 1, T0)
        assert (await sink.next()).trade_id == 2
        assert feed.health()["callback_errors"] == 1
    assert len(fake.connections) == 1


async def test_cancel_closes_the_socket_and_stops(fake: FakeBinance, sink: Sink) -> None:
    feed = binance(fake, sink)
    task = asyncio.create_task(feed.run())
    await fake.wait_open(1)
    await wait_state(feed, "connected")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await fake.wait_open(0)
    assert feed.health()["state"] == "stopped"


def test_binance_feed_rejects_bad_configuration(sink: Sink) -> None:
    many = [f"S{i:04d}USDT" for i in range(513)]
    with pytest.raises(FeedConfigError, match="512"):
        BinanceFeed("wss://stream.binance.com:9443", many, sink.on_tick, sink.on_book)
    with pytest.raises(FeedConfigError, match="ws://"):
        BinanceFeed("https://stream.binance.com", SYMBOLS, sink.on_tick, sink.on_book)
    with pytest.raises(FeedConfigError, match="symbol"):
        BinanceFeed("wss://x", ["BTC/USDT"], sink.on_tick, sink.on_book)


# --------------------------------------------------------------------------- replay


def csv_ticks(path: Path, symbol: str) -> list[Tick]:
    """The expected ticks, read independently with the csv module."""
    out = []
    with path.open(newline="") as f:
        for row in csv.reader(f):
            if not row[0].isdigit():
                continue
            t = int(row[4])
            out.append(
                Tick(
                    symbol,
                    float(row[1]),
                    float(row[2]),
                    t // 1000 if t > 10**14 else t,
                    int(row[0]),
                )
            )
    return out


async def test_replay_csv_yields_exact_ticks_in_order(sink: Sink) -> None:
    path = DATA / "BTCUSDT-trades-sample.csv"
    feed = ReplayFeed(path, SYMBOLS, sink.on_tick, sink.on_book)
    await feed.run()
    assert feed.done.is_set()
    assert sink.ticks[0] == Tick("BTCUSDT", 42283.59, 0.0005, 1704067200124, 3340000001)
    assert sink.ticks[-1] == Tick("BTCUSDT", 42283.45, 0.15, 1704067200233, 3340000020)
    assert sink.ticks == csv_ticks(path, "BTCUSDT")
    assert len(sink.ticks) == 20
    health = feed.health()
    assert health["kind"] == "replay" and health["state"] == "finished"
    assert health["parse_errors"] == 0 and health["gaps"]["BTCUSDT"] == 0


async def test_replay_csv_with_header_and_microsecond_times(sink: Sink) -> None:
    path = DATA / "BTCUSDT-trades-2025-sample.csv"
    feed = ReplayFeed(path, ["BTCUSDT"], sink.on_tick, sink.on_book)
    await feed.run()
    assert sink.ticks[0] == Tick("BTCUSDT", 93576.03, 0.00331, 1735689600042, 4382617201)
    assert sink.ticks == csv_ticks(path, "BTCUSDT")
    assert len(sink.ticks) == 6 and feed.health()["parse_errors"] == 0


async def test_replay_jsonl_of_stream_frames(sink: Sink) -> None:
    feed = ReplayFeed(DATA / "binance-stream-sample.jsonl", SYMBOLS, sink.on_tick, sink.on_book)
    await feed.run()
    assert feed.done.is_set()
    assert sink.ticks == [  # the BNBUSDT trade is not watched
        Tick("BTCUSDT", 42283.58, 0.0012, 1704067200121, 3340000001),
        Tick("ETHUSDT", 2281.47, 0.4334, 1704067200129, 1288860001),
        Tick("BTCUSDT", 42283.59, 0.05, 1704067200199, 3340000002),
        Tick("BTCUSDT", 42283.1, 0.00024, 1704067200300, 3340000003),
    ]
    assert sink.books == [
        Book("BTCUSDT", 42283.57, 42283.58, 3.51722, 0.79511),
        Book("ETHUSDT", 2281.46, 2281.47, 12.4021, 8.1),
    ]
    assert feed.health()["parse_errors"] == 0


async def test_replay_skips_and_counts_bad_lines(sink: Sink, tmp_path: Path) -> None:
    path = tmp_path / "ETHUSDT-trades-2024-01-01.csv"
    path.write_text(
        "1,2281.47,0.5,1140.735,1704067200000,True,True\n"
        "garbage\n"
        "2,abc,0.5,1,1704067200001,True,True\n"
        "\n"
        "3,-1,0.5,1,1704067200002,True,True\n"
        "4,2281.48,0.25,570.37,1704067200003,False,True\n"
    )
    feed = ReplayFeed(path, SYMBOLS, sink.on_tick, sink.on_book)
    await feed.run()
    assert [(t.symbol, t.trade_id) for t in sink.ticks] == [("ETHUSDT", 1), ("ETHUSDT", 4)]
    assert feed.health()["parse_errors"] == 3
    assert feed.health()["gaps"]["ETHUSDT"] == 1  # ids 2 and 3 never arrived
    assert feed.health()["missed_trades"]["ETHUSDT"] == 2


async def test_replay_speed_keeps_trade_spacing(sink: Sink) -> None:
    # the sample spans 109 ms of trades; at speed 1 the replay cannot finish sooner
    feed = ReplayFeed(
        DATA / "BTCUSDT-trades-sample.csv", SYMBOLS, sink.on_tick, sink.on_book, speed=1.0
    )
    started = time.monotonic()
    await feed.run()
    assert 0.1 <= time.monotonic() - started < 3.0
    assert len(sink.ticks) == 20


async def test_fast_replay_yields_to_the_loop(sink: Sink, tmp_path: Path) -> None:
    path = tmp_path / "BTCUSDT-trades-big.csv"
    path.write_text(
        "".join(f"{i},42000.{i % 100:02d},0.001,42,{T0 + i},True,True\n" for i in range(1, 2001))
    )
    feed = ReplayFeed(path, SYMBOLS, sink.on_tick, sink.on_book)
    seen: list[int] = []

    async def watcher() -> None:
        while not feed.done.is_set():
            seen.append(len(sink.ticks))
            await asyncio.sleep(0)

    await asyncio.gather(feed.run(), watcher())
    assert len(sink.ticks) == 2000
    assert any(0 < n < 2000 for n in seen)  # other tasks ran in the middle of the replay


async def test_replay_symbol_falls_back_to_first_watched(sink: Sink, tmp_path: Path) -> None:
    path = tmp_path / "trades.csv"
    path.write_text("5,2281.47,0.5,1140.735,1704067200000,True,True\n")
    await ReplayFeed(path, ["ETHUSDT", "BTCUSDT"], sink.on_tick, sink.on_book).run()
    assert sink.ticks == [Tick("ETHUSDT", 2281.47, 0.5, 1704067200000, 5)]


def test_replay_configuration_errors(sink: Sink, tmp_path: Path) -> None:
    with pytest.raises(FeedConfigError, match="not found"):
        ReplayFeed(tmp_path / "nope.csv", SYMBOLS, sink.on_tick, sink.on_book)
    other = tmp_path / "SOLUSDT-trades-2024-01-01.csv"
    other.write_text("")
    with pytest.raises(FeedConfigError, match="SOLUSDT"):
        ReplayFeed(other, SYMBOLS, sink.on_tick, sink.on_book)


# --------------------------------------------------------------------------- demo


async def test_demo_feed_produces_ticks_at_its_rate_for_every_symbol(sink: Sink) -> None:
    symbols = ["BTCUSDT", "ETHUSDT", "XRPUSDT"]
    feed = DemoFeed(symbols, sink.on_tick, sink.on_book, rate=50.0, seed=1)

    def count(symbol: str) -> int:
        return sum(1 for t in sink.ticks if t.symbol == symbol)

    started = time.monotonic()
    async with running(feed):
        await sink.wait(lambda: all(count(s) >= 10 for s in symbols), timeout=5.0)
        elapsed = time.monotonic() - started
        assert feed.health()["state"] == "running"
    assert feed.health()["state"] == "stopped"
    assert elapsed >= 0.15  # 10 ticks at 50/s are 9 periods (0.18 s) apart: it cannot be faster
    first = {s: next(t for t in sink.ticks if t.symbol == s) for s in symbols}
    assert first["BTCUSDT"].price == pytest.approx(60000, rel=0.01)
    assert first["ETHUSDT"].price == pytest.approx(3000, rel=0.01)
    assert first["XRPUSDT"].price == pytest.approx(100, rel=0.01)
    assert [t.trade_id for t in sink.ticks if t.symbol == "ETHUSDT"][:3] == [1, 2, 3]
    assert abs(first["BTCUSDT"].time - time.time() * 1000) < 10_000
    assert all(b.bid < b.ask for b in sink.books)
    assert {b.symbol for b in sink.books} == set(symbols)
    assert all(v == 0 for v in feed.health()["gaps"].values())


def test_demo_trades_lie_inside_the_book_sent_before_them(sink: Sink) -> None:
    feed = DemoFeed(["BTCUSDT", "ETHUSDT", "XRPUSDT"], sink.on_tick, sink.on_book, seed=7)
    for _ in range(200):
        for symbol in feed.symbols:
            feed._step(symbol)  # one scheduled step, without the clock
    book: dict[str, Book] = {}
    checked = 0
    while not sink.events.empty():
        event = sink.events.get_nowait()
        if isinstance(event, Book):
            book[event.symbol] = event
        else:
            quote = book[event.symbol]  # a book always comes before its trade
            assert quote.bid <= event.price <= quote.ask, (event, quote)
            checked += 1
    assert checked == 600


async def test_every_demo_price_message_lies_within_its_bid_and_ask(make_settings, http) -> None:
    async with LiveServer(make_settings(feed="demo")) as server:
        tok = (await register(http, server))["access"]
        async with http.ws_connect(
            server.ws_url("/live-feed/subscribe/"), headers=bearer(tok)
        ) as ws:
            await ws.send_json({"action": "subscribe"})
            prices = []
            async with asyncio.timeout(10):
                while len(prices) < 30:
                    msg = orjson.loads((await ws.receive()).data)
                    if msg["type"] == "price":
                        prices.append(msg)
    outside = [m for m in prices if not m["bid"] <= m["price"] <= m["ask"]]
    assert outside == []


# --------------------------------------------------------------------------- make_feed


def test_make_feed_parses_every_spec(sink: Sink) -> None:
    kw = dict(
        symbols=SYMBOLS,
        binance_url="wss://stream.binance.com:9443",
        on_tick=sink.on_tick,
        on_book=sink.on_book,
    )
    feed = make_feed("binance", **kw)
    assert isinstance(feed, BinanceFeed)
    assert feed.url.startswith("wss://stream.binance.com:9443/stream?streams=btcusdt@trade/")
    assert isinstance(make_feed("demo", **kw), DemoFeed)
    replay = make_feed(f"replay:{DATA / 'BTCUSDT-trades-sample.csv'}", replay_speed=2.0, **kw)
    assert isinstance(replay, ReplayFeed) and replay.speed == 2.0
    assert make_feed("off", **kw) is None
    for bad in ("", "kraken", "replay:", "binance:fast", "demo2"):
        with pytest.raises(FeedConfigError, match="PRICEWATCH_FEED"):
            make_feed(bad, **kw)
    with pytest.raises(FeedConfigError, match="not found"):
        make_feed("replay:/no/such/file.csv", **kw)


# --------------------------------------------------------------------------- AlphaVantage

KEY = "SECRETKEY123"


@pytest.fixture
async def alpha() -> AsyncIterator[FakeAlphaVantage]:
    async with FakeAlphaVantage() as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def assert_no_key(exc: BaseException | None, caplog: pytest.LogCaptureFixture) -> None:
    while exc is not None:  # the message and anything chained to it
        assert KEY not in str(exc) and KEY not in repr(exc)
        exc = exc.__cause__ or exc.__context__
    for record in caplog.records:
        assert KEY not in record.getMessage()
        assert KEY not in (record.exc_text or "")


async def test_fetch_rate_parses_a_quote(
    alpha: FakeAlphaVantage, session: aiohttp.ClientSession
) -> None:
    quote = await fetch_rate(session, alpha.url, KEY, "BTC", "USD")
    assert quote == Quote("BTC", "USD", 58073.74, 58073.73, 58073.74, "2021-05-01T02:58:06Z")
    assert alpha.requests == [
        {
            "function": "CURRENCY_EXCHANGE_RATE",
            "from_currency": "BTC",
            "to_currency": "USD",
            "apikey": KEY,
        }
    ]


async def test_fetch_rate_converts_the_time_zone_to_utc(
    alpha: FakeAlphaVantage, session: aiohttp.ClientSession
) -> None:
    rec = dict(alpha.success["Realtime Currency Exchange Rate"])
    rec.update({"7. Time Zone": "US/Eastern", "8. Bid Price": "-"})
    del rec["9. Ask Price"]
    alpha.success = {"Realtime Currency Exchange Rate": rec}
    quote = await fetch_rate(session, alpha.url, KEY, "BTC", "USD")
    assert quote.source_time == "2021-05-01T06:58:06Z"  # EDT is UTC-4
    assert quote.bid is None and quote.ask is None


@pytest.mark.parametrize(
    ("mode", "error", "text"),
    [
        ("note", UpstreamRateLimited, "rate limit"),
        ("information", UpstreamRateLimited, "rate limit"),
        ("error", UpstreamError, "invalid or missing"),
        ("500", UpstreamError, "HTTP 500"),
        ("garbage", UpstreamError, "not JSON"),
        ("missing_field", UpstreamError, "invalid field"),
        ("slow", UpstreamError, "no answer within"),
    ],
)
async def test_fetch_rate_failures_raise_without_the_key(
    alpha: FakeAlphaVantage,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    error: type[Exception],
    text: str,
) -> None:
    alpha.mode = mode
    with pytest.raises(error, match=text) as info:
        await fetch_rate(session, alpha.url, KEY, "BTC", "USD", timeout=0.3)
    if error is UpstreamError:
        assert not isinstance(info.value, UpstreamRateLimited)
    assert_no_key(info.value, caplog)


async def test_fetch_rate_connection_refused(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{free_port()}/query"
    with pytest.raises(UpstreamError, match="request failed") as info:
        await fetch_rate(session, url, KEY, "BTC", "USD")
    assert_no_key(info.value, caplog)


async def test_quote_poller_delivers_every_pair(
    alpha: FakeAlphaVantage, session: aiohttp.ClientSession
) -> None:
    quotes: asyncio.Queue[Quote] = asyncio.Queue()
    poller = QuotePoller(
        session, alpha.url, KEY, [("BTC", "USD"), ("ETH", "USD")], 0.05, quotes.put
    )
    async with running(poller):  # type: ignore[arg-type]
        async with asyncio.timeout(5):
            first, second, third = [await quotes.get() for _ in range(3)]
    assert first.rate == 58073.74 and third.rate == 58073.74
    assert [r["from_currency"] for r in alpha.requests[:3]] == ["BTC", "ETH", "BTC"]
    assert poller.health()["messages"] >= 3
    assert poller.health()["state"] == "stopped"


async def test_quote_poller_rate_limit_skips_the_slot_and_logs_once(
    alpha: FakeAlphaVantage, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    alpha.mode = "information"
    quotes: asyncio.Queue[Quote] = asyncio.Queue()
    poller = QuotePoller(
        session, alpha.url, KEY, [("BTC", "USD"), ("ETH", "USD")], 0.05, quotes.put
    )
    with caplog.at_level(logging.WARNING, logger="pricewatch.feeds"):
        async with running(poller):  # type: ignore[arg-type]
            await alpha.wait_requests(3)
            alpha.mode = "500"  # errors are logged and the slot goes on to the next pair
            await alpha.wait_requests(len(alpha.requests) + 2)
    pairs = [r["from_currency"] for r in alpha.requests]
    first_ok = next(i for i, r in enumerate(pairs) if r == "ETH")
    assert pairs[:3] == ["BTC", "BTC", "BTC"] and first_ok >= 3  # ETH never asked while limited
    limited = [r for r in caplog.records if "rate limited" in r.getMessage()]
    assert len(limited) == 1
    assert poller.health()["rate_limited"] >= 3 and poller.health()["errors"] >= 1
    assert quotes.empty()
    assert_no_key(None, caplog)


# --------------------------------------------------------------------------- hardening


@pytest.mark.parametrize(
    "time_value, expected",
    [
        (1704067200121, 1704067200121),  # milliseconds, as Binance sends
        (1704067200121000, 1704067200121),  # microseconds (2025+ dumps): converted
        (10**17, None),
        (0, None),
        (-5, None),  # nonsense: refused, never reaches candles
    ],
)
def test_trade_times_are_checked(time_value: int, expected: int | None) -> None:
    frame = orjson.dumps(
        {
            "stream": "btcusdt@trade",
            "data": {"e": "trade", "s": "BTCUSDT", "t": 1, "p": "1.5", "q": "1", "T": time_value},
        }
    )
    if expected is None:
        with pytest.raises(ParseError):
            decode_event(frame)
    else:
        assert decode_event(frame).time == expected


def test_feed_urls_shown_in_health_hide_credentials(sink: Sink) -> None:
    feed = BinanceFeed(
        "wss://user:s3cret@example.com:9443/stream?streams=btcusdt@trade&apikey=TOPSECRET",
        SYMBOLS,
        sink.on_tick,
        sink.on_book,
    )
    shown = feed.health()["url"]
    assert "s3cret" not in shown and "TOPSECRET" not in shown and "user" not in shown
    assert shown == "wss://example.com:9443/stream?streams=btcusdt@trade&apikey=***"


async def test_precheck_refusal_means_no_connection(fake: FakeBinance, sink: Sink) -> None:
    checked = asyncio.Event()

    async def refuse(url: str) -> None:
        checked.set()
        raise FeedRefused("forbidden address")

    feed = binance(fake, sink, precheck=refuse)
    async with running(feed):
        await asyncio.wait_for(checked.wait(), 5)
        await wait_state(feed, "backoff")
    assert fake.open_count == 0 and fake.connections == []


async def test_redirects_are_refused_when_asked(fake: FakeBinance, sink: Sink) -> None:
    async def redirect(request: web.Request) -> web.Response:
        hits.set()
        raise web.HTTPFound(fake.url + "/stream?streams=btcusdt@trade")

    hits = asyncio.Event()
    app = web.Application()
    app.router.add_get("/stream", redirect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        feed = BinanceFeed(
            f"ws://127.0.0.1:{port}",
            SYMBOLS,
            sink.on_tick,
            sink.on_book,
            backoff_initial=0.05,
            backoff_cap=0.2,
            follow_redirects=False,
        )
        async with running(feed):
            await asyncio.wait_for(hits.wait(), 5)
            await wait_state(feed, "backoff")
        assert fake.connections == []  # the redirect target was never contacted
        followed = BinanceFeed(
            f"ws://127.0.0.1:{port}",
            SYMBOLS,
            sink.on_tick,
            sink.on_book,
            backoff_initial=0.05,
            backoff_cap=0.2,
        )
        async with running(followed):  # the default follows it: the check above can fail
            await fake.wait_connections(1)
    finally:
        await runner.cleanup()


async def test_precheck_pins_the_connection_to_the_checked_address(
    fake: FakeBinance, sink: Sink
) -> None:
    async def pin(url: str) -> dict:
        return {"host": "127.0.0.1", "port": fake.port}

    # The name does not resolve: only a connection pinned to the checked address gets there.
    feed = BinanceFeed(
        "ws://feed.invalid:1/stream?streams=btcusdt@trade",
        SYMBOLS,
        sink.on_tick,
        sink.on_book,
        backoff_initial=0.05,
        backoff_cap=0.2,
        precheck=pin,
    )
    async with running(feed):
        await fake.wait_connections(1)
        await fake.send_trade("BTCUSDT", 1, 42000, 1, T0)
        assert (await sink.next()).price == 42000
