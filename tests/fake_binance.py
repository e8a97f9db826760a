"""A loopback stand-in for Binance's combined-stream websocket (``/stream?streams=a/b``).

Usage::

    async with FakeBinance() as fake:
        feed = BinanceFeed(fake.url, ["BTCUSDT"], on_tick, on_book)
        ...
        await fake.wait_connections(1)
        await fake.send_trade("BTCUSDT", 1, "42000.5", "0.1", 1704067200000)

Every accepted connection's requested streams are appended to ``connections``. Frames go to
every open connection. ``port`` may be fixed (to start the fake after a client began retrying).
"""

from __future__ import annotations

import asyncio
import socket

import orjson
from aiohttp import WSCloseCode, web


def free_port() -> int:
    """A currently free loopback TCP port (for a fake that must start later on a known port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _num(value: float | int | str) -> str:
    # Binance sends decimal strings; a str passes through so tests can send "abc" or "-1".
    return value if isinstance(value, str) else f"{value:.8f}"


class FakeBinance:
    """aiohttp websocket server on 127.0.0.1 speaking Binance's combined-stream format."""

    def __init__(self, *, port: int = 0) -> None:
        self._port = port
        self._runner: web.AppRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()
        self._changed = asyncio.Condition()
        self.connections: list[list[str]] = []

    # ---- lifetime

    async def start(self) -> FakeBinance:
        app = web.Application()
        app.router.add_get("/stream", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._port)
        await site.start()
        self._port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        """Close every client socket (1001 going away), then stop listening."""
        await self.drop_all(code=WSCloseCode.GOING_AWAY)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeBinance:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``ws://127.0.0.1:PORT`` (clients append ``/stream?streams=...``)."""
        return f"ws://127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def open_count(self) -> int:
        return len(self._sockets)

    # ---- server side

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        streams = [s for s in request.query.get("streams", "").split("/") if s]
        async with self._changed:
            self._sockets.add(ws)
            self.connections.append(streams)
            self._changed.notify_all()
        try:
            async for _ in ws:  # clients send nothing we need; pings are answered by aiohttp
                pass
        finally:
            async with self._changed:
                self._sockets.discard(ws)
                self._changed.notify_all()
        return ws

    # ---- test controls

    async def wait_connections(self, n: int, timeout: float = 5.0) -> None:
        """Wait until at least ``n`` connections were accepted in total (TimeoutError if not)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.connections) >= n)

    async def wait_open(self, n: int, timeout: float = 5.0) -> None:
        """Wait until exactly ``n`` connections are open right now."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self._sockets) == n)

    async def send_raw(self, text: str | bytes) -> None:
        """Send one text frame, as is, to every open connection."""
        if isinstance(text, bytes):
            text = text.decode()
        for ws in list(self._sockets):
            if not ws.closed:
                await ws.send_str(text)

    async def send_event(self, stream: str, data: dict) -> None:
        """Send ``{"stream": stream, "data": data}``."""
        await self.send_raw(orjson.dumps({"stream": stream, "data": data}).decode())

    async def send_trade(self, symbol: str, trade_id: int, price: float | str, qty: float | str,
                         time_ms: int, *, buyer_maker: bool = False) -> None:
        """Send a ``<symbol>@trade`` event (numbers are sent as Binance-style strings)."""
        await self.send_event(f"{symbol.lower()}@trade", {
            "e": "trade", "E": time_ms + 2, "s": symbol.upper(), "t": trade_id,
            "p": _num(price), "q": _num(qty), "T": time_ms, "m": buyer_maker, "M": True,
        })

    async def send_book(self, symbol: str, bid: float | str, ask: float | str,
                        bid_qty: float | str = 1.0, ask_qty: float | str = 1.0, *,
                        update_id: int = 400900217) -> None:
        """Send a ``<symbol>@bookTicker`` event."""
        await self.send_event(f"{symbol.lower()}@bookTicker", {
            "u": update_id, "s": symbol.upper(), "b": _num(bid), "B": _num(bid_qty),
            "a": _num(ask), "A": _num(ask_qty),
        })

    async def send_server_shutdown(self, time_ms: int = 1704153600000) -> None:
        await self.send_raw(orjson.dumps({"e": "serverShutdown", "E": time_ms}).decode())

    async def drop_all(self, *, code: int = WSCloseCode.OK) -> None:
        """Close every open connection from the server side (like Binance's 24 h close)."""
        for ws in list(self._sockets):
            await ws.close(code=code, message=b"fake closing")
