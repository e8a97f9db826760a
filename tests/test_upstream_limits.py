"""Upstream answers are bounded: an endless or oversized body (Binance REST, AlphaVantage,
webhooks, Telegram) is abandoned at PRICEWATCH_UPSTREAM_MAX_BYTES and is an upstream error;
a large body is parsed without holding the event loop; the server keeps answering."""

from __future__ import annotations

import asyncio
import logging
import zlib

import aiohttp
import orjson
import pytest
from aiohttp import web
from conftest import LiveServer
from fake_binance import free_port
from test_sinks import delivery, hook, running, telegrams, to_chat, webhooks

from pricewatch.delivery.base import Retry, Sent
from pricewatch.quotes_api import QUOTES
from pricewatch.upstream.binance_rest import BinanceRest, RestError
from pricewatch.upstream_read import MAX_VALUES, PARSE_INLINE, BadAnswer, parse_json

ROW = [
    1499040000000,
    "0.01634790",
    "0.80000000",
    "0.01575800",
    "0.01577100",
    "148976.11427815",
    1499644799999,
    "2434.19055334",
    308,
    "1756.87402397",
    "28.46694368",
    "17928899.62484339",
]
LIMIT = 256 * 1024


class Flood:
    """A loopback upstream whose every answer is an endless chunked JSON array (no
    Content-Length). It pauses after PAUSE_AFTER bytes until `release` is set, so that a
    test can act while a client is in the middle of reading; `ended` is set when a client
    has gone away (the connection was closed)."""

    PAUSE_AFTER = 64 * 1024

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.ended = asyncio.Event()
        self.paths: list[str] = []
        self._runner: web.AppRunner | None = None
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Flood:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._endless)
        app.router.add_get("/sized", self._sized)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc) -> None:
        self.release.set()
        await self._runner.cleanup()

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        self.paths.append(request.path)
        resp = web.StreamResponse(status=self.status, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunk = b",".join([orjson.dumps(ROW)] * 64) + b","
        sent = 0
        try:
            await resp.write(b"[")
            self.started.set()
            while True:
                if sent >= self.PAUSE_AFTER:
                    await self.release.wait()
                await resp.write(chunk)
                sent += len(chunk)
        except (ConnectionError, asyncio.CancelledError):
            self.ended.set()
            raise
        return resp

    async def _sized(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(100 << 20)})
        await resp.prepare(request)
        await resp.write(b"[")
        await self.release.wait()
        return resp


@pytest.fixture
async def flood():
    async with Flood() as f:
        yield f


async def test_a_large_body_is_parsed_in_slices_giving_the_loop_back():
    body = orjson.dumps([ROW] * 15_000)  # ~2.4 MB: orjson would hold the loop throughout
    assert len(body) > PARSE_INLINE
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    try:
        assert await parse_json(body) == orjson.loads(body)
    finally:
        task.cancel()
    assert ticks - before > 2  # the loop ran other tasks while the body was parsed


BAD = {
    "trailing comma": b"[" + b"[1,2]," * 60_000 + b"]",
    "NaN": b"[" + b'"x",' * 90_000 + b"NaN]",
    "object trailing comma": b"{" + b'"k": 1, ' * 40_000 + b"}",
    "extra data": b"[" + b"1," * 150_000 + b"1] 2",
    "unclosed": b"[" + b"1," * 150_000 + b"1",
    "too many values": b"[" + b"1," * MAX_VALUES + b"1]",
    "too deep": b"[" * (MAX_VALUES + 1) + b"]" * (MAX_VALUES + 1),
    "not UTF-8": b"\xff" * (PARSE_INLINE + 1),
    # Deeper than orjson takes, yet under MAX_VALUES and past PARSE_INLINE: a Binance error
    # answer {"msg": [[[...]]]} like this once reached str() and raised RecursionError.
    "nested past 1024": b'{"code": 1, "msg": ' + b"[" * 150_000 + b"]" * 150_000 + b"}",
}


@pytest.mark.parametrize("body", BAD.values(), ids=BAD.keys())
async def test_a_large_body_that_is_not_json_is_refused(body):
    assert len(body) > PARSE_INLINE
    with pytest.raises(BadAnswer):
        await parse_json(body)


async def test_large_bodies_parse_as_orjson_does():
    doc = {
        "a": [{"k": ['é\n"\\', None, True, False, -1.5e-7, 12]}] * 20_000,
        "b": {},
        "c": [],
        "d": [[[]]],
    }
    for raw in (orjson.dumps(doc), orjson.dumps(doc, option=orjson.OPT_INDENT_2)):
        assert len(raw) > PARSE_INLINE
        assert await parse_json(raw) == doc


async def test_binance_rest_endless_answer_is_an_error_and_the_connection_closed(flood):
    flood.release.set()
    async with aiohttp.ClientSession() as session:
        rest = BinanceRest(flood.url, timeout=5.0, max_bytes=LIMIT)
        rest.session = session
        with pytest.raises(RestError, match="larger than 262144 bytes"):
            await rest.klines("BTCUSDT", "1m")
        await asyncio.wait_for(flood.ended.wait(), 5)  # stopped reading, closed


async def test_binance_rest_refuses_a_content_length_past_the_limit(flood):
    async with aiohttp.ClientSession() as session:
        rest = BinanceRest(flood.url, timeout=5.0, max_bytes=LIMIT)
        rest.session = session
        rest.paths = {"klines": "/sized"}
        with pytest.raises(RestError, match="Content-Length 104857600"):
            await rest.klines("BTCUSDT", "1m")


async def test_binance_rest_counts_the_bytes_a_compressed_answer_expands_to():
    packer = zlib.compressobj(wbits=31)  # gzip
    bomb = packer.compress(b"[" + b"0," * (25 << 20)) + packer.flush()  # 50 MB in ~50 KB

    async def klines(request: web.Request) -> web.Response:
        return web.Response(
            body=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    app = web.Application()
    app.router.add_get("/api/v3/klines", klines)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            rest = BinanceRest(f"http://127.0.0.1:{port}", timeout=5.0, max_bytes=LIMIT)
            rest.session = session
            assert len(bomb) < LIMIT  # its Content-Length is within the limit
            with pytest.raises(RestError, match="larger than 262144 bytes"):
                await rest.klines("BTCUSDT", "1m")
    finally:
        await runner.cleanup()


async def healthz(http, server) -> int:
    async with http.get(server.url + "/healthz") as resp:
        await resp.read()
        return resp.status


async def test_feed_reports_an_endless_rest_answer_while_the_server_answers(
    make_settings, http, fake, flood, caplog
):
    caplog.set_level(logging.WARNING, "pricewatch")
    settings = make_settings(
        feed="binance",
        binance_ws_url=fake.url,
        binance_rest_url=flood.url,
        upstream_max_bytes=LIMIT,
    )
    async with LiveServer(settings) as server:
        await asyncio.wait_for(flood.started.wait(), 10)  # the candle history call
        assert await healthz(http, server) in (200, 503)  # answered mid-read
        flood.release.set()
        await asyncio.wait_for(flood.ended.wait(), 10)
        deadline = asyncio.get_running_loop().time() + 10
        while not any("larger than" in r.getMessage() for r in caplog.records):
            assert asyncio.get_running_loop().time() < deadline, caplog.text
            await asyncio.sleep(0.01)
        assert await healthz(http, server) in (200, 503)
    assert "/klines" in flood.paths[0]


async def test_quote_poller_reports_an_endless_answer_while_the_server_answers(
    make_settings, http, flood
):
    settings = make_settings(
        alphavantage_url=flood.url + "/query",
        alphavantage_api_key="KEY",
        alphavantage_interval=3600,
        upstream_max_bytes=LIMIT,
    )
    async with LiveServer(settings) as server:
        await asyncio.wait_for(flood.started.wait(), 10)  # the poller's first poll
        assert await healthz(http, server) in (200, 503)
        flood.release.set()
        poller = server.app[QUOTES].poller
        deadline = asyncio.get_running_loop().time() + 10
        while poller.errors < 1:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        assert "larger than 262144 bytes" in poller.last_error
        assert "KEY" not in poller.last_error
        await asyncio.wait_for(flood.ended.wait(), 5)


@pytest.mark.parametrize(("status", "outcome"), [(200, Sent), (500, Retry)])
async def test_webhook_endless_answer_is_judged_by_its_status(status, outcome):
    async with Flood(status) as upstream:
        upstream.release.set()
        async with running(webhooks()) as sink:
            result = await asyncio.wait_for(
                sink.send([delivery(1, hook(upstream.url + "/hook"))]), 10
            )
        assert isinstance(result, outcome), result
        await asyncio.wait_for(upstream.ended.wait(), 5)  # the rest was never read


async def test_telegram_endless_answer_is_judged_by_its_status():
    async with Flood(502) as upstream:
        upstream.release.set()
        async with running(telegrams(upstream.url)) as sink:
            result = await asyncio.wait_for(sink.send(to_chat("42")), 10)
        assert isinstance(result, Retry), result
        await asyncio.wait_for(upstream.ended.wait(), 5)
