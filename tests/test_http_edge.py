"""The HTTP edge with raw sockets: slow heads and bodies, aborted bodies, malformed requests,
errors after a websocket upgrade, and JSON numbers a float cannot hold.

aiohttp's client always sends complete, well-formed requests, so these tests talk HTTP by
hand (asyncio.open_connection) to the app served by the same runner as `python -m pricewatch`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import time

import orjson
import pytest
from aiohttp import web
from conftest import LiveServer, bearer, register
from test_ops import sample, scrape

from pricewatch import api, httpd
from pricewatch.errors import error_middleware, error_response
from pricewatch.httpd import make_runner
from pricewatch.metrics import HTTP_METRICS, HttpMetrics, metrics_middleware

WS_HEAD = (
    "GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture
def fast_limits(monkeypatch):
    """Head 0.4 s, body 0.4 s instead of 10 s / 30 s (read when the runner is made)."""
    monkeypatch.setattr(httpd, "HEAD_TIMEOUT", 0.4)
    monkeypatch.setattr(api, "BODY_TIMEOUT", 0.4)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port_of(url))


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (fails after `timeout`)."""
    return await asyncio.wait_for(reader.read(), timeout)


def split_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length body, leaving the connection open."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status, headers, _ = split_response(head)
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    return status, headers, body


# -- slow clients ------------------------------------------------------------------------------


async def test_a_client_that_sends_nothing_is_disconnected(make_settings, fast_limits):
    async with LiveServer(make_settings()) as server:
        reader, writer = await connect(server.url)
        began = time.monotonic()
        assert await read_until_closed(reader) == b""
        assert time.monotonic() - began >= 0.3
        writer.close()


async def test_a_head_sent_byte_by_byte_is_cut_off_at_the_deadline(make_settings, fast_limits):
    head = b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + b"X-Slow: " + b"a" * 100
    async with LiveServer(make_settings()) as server:
        reader, writer = await connect(server.url)
        began = time.monotonic()
        # Each byte is data, but no complete head: the deadline does not move.
        for byte in head:
            if reader.at_eof() or writer.is_closing():
                break
            writer.write(bytes([byte]))
            try:
                assert await asyncio.wait_for(reader.read(1), 0.02) == b""
                break  # closed by the server
            except TimeoutError:
                pass
        else:
            raise AssertionError("the trickled head was never cut off")
        assert 0.3 <= time.monotonic() - began < 3
        writer.close()


async def test_an_idle_keep_alive_connection_is_closed_after_its_response(
    make_settings, fast_limits
):
    async with LiveServer(make_settings()) as server:
        reader, writer = await connect(server.url)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers.get("connection", "").lower() != "close"
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")  # still usable at once
        assert (await read_response(reader))[0] == 200
        assert await read_until_closed(reader) == b""  # then idle: closed
        writer.close()


async def test_a_stalled_body_gets_408_timeout_and_the_connection_ends(
    make_settings, fast_limits, http
):
    async with LiveServer(make_settings()) as server:
        reader, writer = await connect(server.url)
        writer.write(
            b"POST /auth/token HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
            b"\r\nContent-Length: 100\r\n\r\n{"
        )
        data = await read_until_closed(reader)
        status, headers, body = split_response(data)
        assert status == 408 and headers["content-type"].startswith("application/json")
        assert orjson.loads(body)["error"] == "timeout"
        assert headers["connection"].lower() == "close"
        writer.close()
        text = await scrape(http, server)
    assert (
        sample(
            text, "pricewatch_http_requests_total", method="POST", route="/auth/token", status=408
        )
        == 1
    )


async def test_a_websocket_outlives_the_head_deadline(make_settings, fast_limits, http):
    async with LiveServer(make_settings()) as server:
        async with http.ws_connect(server.ws_url("/ws/ohlc/")) as ws:
            # Wait on the clock past the 0.4 s head deadline: the upgraded connection is
            # not idle in the HTTP sense and must survive it.
            await asyncio.sleep(1.0)
            await ws.send_json({"symbol": "BTCUSDT", "timeframe": "1m"})
            assert (await ws.receive_json(timeout=5))["type"] == "snapshot"


# -- aborted bodies and malformed requests -----------------------------------------------------


async def test_a_client_that_aborts_mid_body_is_no_500_and_no_traceback(server, http, caplog):
    caplog.set_level(logging.DEBUG)
    reader, writer = await connect(server.url)
    writer.write(
        b'POST /auth/register HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n{"username": "abc'
    )
    await writer.drain()
    writer.close()
    for _ in range(100):  # the server's own record of it, polled, at most ~5 s
        text = await scrape(http, server)
        if 'route="/auth/register",status="499"' in text:
            break
        await asyncio.sleep(0.05)
    assert (
        sample(
            text,
            "pricewatch_http_requests_total",
            method="POST",
            route="/auth/register",
            status=499,
        )
        == 1
    )
    assert 'status="500"' not in text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "Traceback" not in caplog.text


MARKER = "ECHO-ME-NOT"
MALFORMED = {
    "long URL": (431, f"GET /{MARKER}{'a' * 9000} HTTP/1.1\r\nHost: t\r\n\r\n"),
    "long header": (431, f"GET / HTTP/1.1\r\nHost: t\r\nX-{MARKER}: {'a' * 9000}\r\n\r\n"),
    "many headers": (
        431,
        "GET / HTTP/1.1\r\nHost: t\r\n"
        + "".join(f"X-{MARKER}-{i}: a\r\n" for i in range(200))
        + "\r\n",
    ),
    "bad method": (400, f"G{MARKER}(T / HTTP/1.1\r\nHost: t\r\n\r\n"),
    "bad header": (400, f"GET / HTTP/1.1\r\nHost: t\r\n{MARKER} no colon\r\n\r\n"),
    "garbage": (400, f"\x16\x03\x01\x02\x00{MARKER}\r\n\r\n"),
    "body not gzip": (
        400,
        "POST /auth/token HTTP/1.1\r\nHost: t\r\nContent-Encoding: gzip\r\n"
        f"Content-Length: {len(MARKER)}\r\n\r\n{MARKER}",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_requests_get_a_json_error_that_echoes_nothing(server, caplog, case):
    caplog.set_level(logging.DEBUG)
    expected, request = MALFORMED[case]
    reader, writer = await connect(server.url)
    writer.write(request.encode("latin-1"))
    data = await read_until_closed(reader)
    writer.close()
    status, headers, body = split_response(data)
    assert status == expected
    assert headers["content-type"].startswith("application/json")
    error = orjson.loads(body)
    assert (
        error["error"] == "invalid_request"
        and error["detail"]
        and set(error) == {"error", "detail"}
    )
    assert MARKER.encode() not in data
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


# -- nothing written into an upgraded socket ---------------------------------------------------


def upgraded_app(raise_after_prepare: Exception) -> web.Application:
    """A websocket route that prepares (101) and then raises, behind pricewatch's middlewares."""

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        raise raise_after_prepare

    app = web.Application(middlewares=[metrics_middleware, error_middleware])
    app[HTTP_METRICS] = HttpMetrics()
    app.router.add_get("/ws", handler)
    return app


@pytest.mark.parametrize(
    "error",
    [RecursionError("deep"), api.ApiError(400, "validation", "x")],
    ids=["bug", "api-error"],
)
async def test_an_error_after_the_upgrade_writes_no_http_into_the_socket(error, caplog):
    caplog.set_level(logging.DEBUG)
    app = upgraded_app(error)
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(WS_HEAD.format(path="/ws", key=key).encode())
        data = await read_until_closed(reader)
        writer.close()
    finally:
        await runner.cleanup()
    assert data.startswith(b"HTTP/1.1 101 ")
    assert data.count(b"HTTP/1.1") == 1, data  # no second (error) response after the 101
    if isinstance(error, api.ApiError):
        assert "Traceback" not in caplog.text
    else:  # a bug is logged once, with its traceback, by us (not by aiohttp as well)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].exc_info, caplog.text
    recorded = error.status if isinstance(error, api.ApiError) else 500
    assert dict(app[HTTP_METRICS].requests) == {("GET", "/ws", recorded): 1}


def test_a_408_answer_ends_the_connection():
    assert error_response(408, "timeout", "Too slow.").keep_alive is False


# -- JSON numbers ----------------------------------------------------------------------------


async def test_an_integer_price_past_1e308_is_a_validation_error(server, http):
    token = (await register(http, server))["access"]
    raw = b'{"asset": "BTCUSDT", "direction": "above", "price": 1' + b"0" * 400 + b"}"
    async with http.post(
        server.url + "/api/v1/alerts",
        data=raw,
        headers={**bearer(token), "Content-Type": "application/json"},
    ) as resp:
        body = await resp.json()
        assert resp.status == 400, body
    assert body["error"] == "validation" and "price" in body["fields"]


async def test_a_client_that_never_reads_its_answers_is_cut_off(make_settings, fast_limits):
    """Pipelined requests behind answers nobody reads would hold the server's memory for
    ever: once the socket's buffer stays full for the head deadline, the connection goes."""
    async with LiveServer(make_settings()) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        sock.connect(("127.0.0.1", port_of(server.url)))
        sock.setblocking(False)
        request = b"GET /openapi.json HTTP/1.1\r\nHost: t\r\n\r\n"
        with contextlib.suppress(BlockingIOError):
            sock.send(request * 200)  # and never read a byte
        edge = server._runner.server
        async with asyncio.timeout(5):
            while not any(p.writing_paused for p in edge.connections):
                await asyncio.sleep(0.01)  # until its answers fill the socket
            began = time.monotonic()
            while edge.connections:
                await asyncio.sleep(0.01)  # until the server lets it go
        assert time.monotonic() - began >= 0.3  # after the deadline, not before
        sock.close()
