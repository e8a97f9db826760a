"""A loopback stand-in for Binance's combined-stream websocket (``/stream?streams=a/b``).

Usage::

    async with FakeBinance() as fake:
        feed = BinanceFeed(fake.url, ["BTCUSDT"], on_tick, on_book)
        ...
        await fake.wait_connections(1)
        await fake.send_trade("BTCUSDT", 1, "42000.5", "0.1", 1704067200000)

Every accepted connection's requested streams are appended to ``connections``. Frames go to
every open connection. ``port`` may be fixed (to start the fake after a client began retrying).

The same server answers Binance's REST market data at ``rest_url`` (``/api/v3/historicalTrades``,
``/api/v3/aggTrades``, ``/api/v3/klines``) from the trades it knows: every trade sent, plus
those recorded with ``record_trade`` (trades "sent while the client was away"). Klines are
aggregated from those trades. ``refuse_historical``, ``answer_first`` (statuses such as 429 to
give before serving) and ``served_from`` (the oldest id still served) script REST failures;
``rest_calls`` lists every REST request's path and query.
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
        self.trades: dict[str, list[dict]] = {}  # symbol -> trades by id
        self.rest_calls: list[tuple[str, dict[str, str]]] = []
        self.refuse_historical = False
        self.answer_first: list[int] = []  # e.g. [429]: answered (with Retry-After) first
        self.retry_after = 1
        self.served_from: dict[str, int] = {}
        self.agg_size = 1  # trades per aggregate in aggTrades answers

    # ---- lifetime

    async def start(self) -> FakeBinance:
        app = web.Application()
        app.router.add_get("/stream", self._handle)
        app.on_response_prepare.append(self._weight)
        for prefix in ("/api/v3", "/fapi/v1", "/dapi/v1"):  # spot, USD-M, COIN-M
            app.router.add_get(prefix + "/historicalTrades", self._historical)
            app.router.add_get(prefix + "/aggTrades", self._agg_trades)
            app.router.add_get(prefix + "/klines", self._klines)
            app.router.add_get(prefix + "/trades", self._recent)
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
    def rest_url(self) -> str:
        """REST base, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self._port}"

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

    # ---- REST side

    async def _weight(self, request: web.Request, response: web.StreamResponse) -> None:
        if request.path.startswith(("/api/", "/fapi/", "/dapi/")):  # like Binance: 2 a call
            response.headers["X-MBX-USED-WEIGHT-1M"] = str(2 * len(self.rest_calls))

    def _rest_gate(self, request: web.Request) -> web.Response | None:
        self.rest_calls.append((request.path, dict(request.query)))
        if self.answer_first:
            status = self.answer_first.pop(0)
            return web.json_response(
                {"code": -1003, "msg": "Too many requests."},
                status=status,
                headers={"Retry-After": str(self.retry_after)},
            )
        return None

    def _known(self, request: web.Request) -> list[dict]:
        symbol = request.query.get("symbol", "")
        oldest = self.served_from.get(symbol, 0)
        return [t for t in self.trades.get(symbol, []) if t["id"] >= oldest]

    async def _historical(self, request: web.Request) -> web.Response:
        if (refused := self._rest_gate(request)) is not None:
            return refused
        if self.refuse_historical:
            return web.json_response({"code": -2014, "msg": "API-key format invalid."}, status=401)
        from_id, limit = int(request.query["fromId"]), int(request.query.get("limit", 500))
        rows = [t for t in self._known(request) if t["id"] >= from_id][:limit]
        return web.json_response(
            [
                {
                    "id": t["id"],
                    "price": _num(t["price"]),
                    "qty": _num(t["qty"]),
                    "quoteQty": _num(t["price"] * t["qty"]),
                    "time": t["time"],
                    "isBuyerMaker": False,
                    "isBestMatch": True,
                }
                for t in rows
            ]
        )

    async def _recent(self, request: web.Request) -> web.Response:
        if (refused := self._rest_gate(request)) is not None:
            return refused
        limit = int(request.query.get("limit", 500))
        rows = self._known(request)[-limit:]
        return web.json_response(
            [
                {
                    "id": t["id"],
                    "price": _num(t["price"]),
                    "qty": _num(t["qty"]),
                    "quoteQty": "0",
                    "time": t["time"],
                    "isBuyerMaker": False,
                    "isBestMatch": True,
                }
                for t in rows
            ]
        )

    async def _agg_trades(self, request: web.Request) -> web.Response:
        if (refused := self._rest_gate(request)) is not None:
            return refused
        query = request.query
        start, end = int(query.get("startTime", 0)), int(query.get("endTime", 2**62))
        from_id, limit = int(query.get("fromId", 0)), int(query.get("limit", 500))
        groups: dict[int, list[dict]] = {}  # aggregates: fixed blocks of ids, numbered from 1
        for t in self._known(request):
            groups.setdefault((t["id"] - 1) // self.agg_size + 1, []).append(t)
        aggs = [
            {
                "a": key,
                "p": _num(group[0]["price"]),
                "q": _num(sum(t["qty"] for t in group)),
                "f": group[0]["id"],
                "l": group[-1]["id"],
                "T": group[0]["time"],
                "m": False,
                "M": True,
            }
            for key, group in sorted(groups.items())
            if start <= group[0]["time"] <= end and key >= from_id
        ]
        if not {"fromId", "startTime", "endTime"} & set(query):
            return web.json_response(aggs[-limit:])  # the most recent ones
        return web.json_response(aggs[:limit])

    async def _klines(self, request: web.Request) -> web.Response:
        if (refused := self._rest_gate(request)) is not None:
            return refused
        size = {
            "1s": 1_000,
            "1m": 60_000,
            "5m": 300_000,
            "15m": 900_000,
            "1h": 3_600_000,
            "4h": 14_400_000,
            "1d": 86_400_000,
        }[request.query["interval"]]
        start = int(request.query.get("startTime", 0))
        end = int(request.query.get("endTime", 2**62))
        limit = int(request.query.get("limit", 500))
        candles: dict[int, list] = {}
        for t in self._known(request):
            if not start <= t["time"] - t["time"] % size <= end:
                continue
            open_time = t["time"] - t["time"] % size
            k = candles.get(open_time)
            if k is None:
                candles[open_time] = [
                    open_time,
                    t["price"],
                    t["price"],
                    t["price"],
                    t["price"],
                    t["qty"],
                    open_time + size - 1,
                    0.0,
                    1,
                ]
            else:
                k[2], k[3] = max(k[2], t["price"]), min(k[3], t["price"])
                k[4] = t["price"]
                k[5] += t["qty"]
                k[8] += 1
        rows = [candles[k] for k in sorted(candles)][-limit:]
        return web.json_response(
            [
                [
                    k[0],
                    _num(k[1]),
                    _num(k[2]),
                    _num(k[3]),
                    _num(k[4]),
                    _num(k[5]),
                    k[6],
                    "0",
                    k[8],
                    "0",
                    "0",
                    "0",
                ]
                for k in rows
            ]
        )

    # ---- test controls

    def record_trade(
        self, symbol: str, trade_id: int, price: float, qty: float, time_ms: int
    ) -> None:
        """Make a trade known to REST without streaming it (it happened while away)."""
        trades = [t for t in self.trades.get(symbol.upper(), []) if t["id"] != trade_id]
        trades.append({"id": trade_id, "price": float(price), "qty": float(qty), "time": time_ms})
        self.trades[symbol.upper()] = sorted(trades, key=lambda t: t["id"])

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

    async def send_trade(
        self,
        symbol: str,
        trade_id: int,
        price: float | str,
        qty: float | str,
        time_ms: int,
        *,
        buyer_maker: bool = False,
    ) -> None:
        """Send a ``<symbol>@trade`` event (numbers are sent as Binance-style strings); a
        numeric trade is also recorded for REST."""
        if not isinstance(price, str) and not isinstance(qty, str):
            self.record_trade(symbol, trade_id, price, qty, time_ms)
        await self.send_event(
            f"{symbol.lower()}@trade",
            {
                "e": "trade",
                "E": time_ms + 2,
                "s": symbol.upper(),
                "t": trade_id,
                "p": _num(price),
                "q": _num(qty),
                "T": time_ms,
                "m": buyer_maker,
                "M": True,
            },
        )

    async def send_book(
        self,
        symbol: str,
        bid: float | str,
        ask: float | str,
        bid_qty: float | str = 1.0,
        ask_qty: float | str = 1.0,
        *,
        update_id: int = 400900217,
    ) -> None:
        """Send a ``<symbol>@bookTicker`` event."""
        await self.send_event(
            f"{symbol.lower()}@bookTicker",
            {
                "u": update_id,
                "s": symbol.upper(),
                "b": _num(bid),
                "B": _num(bid_qty),
                "a": _num(ask),
                "A": _num(ask_qty),
            },
        )

    async def send_agg_trade(
        self, symbol: str, agg_id: int, price: float, qty: float, time_ms: int
    ) -> None:
        """Send a futures ``<symbol>@aggTrade`` event holding one trade whose id is `agg_id`
        (with ``agg_size`` 1, REST numbers that aggregate `agg_id` too)."""
        self.record_trade(symbol, agg_id, price, qty, time_ms)
        await self.send_event(
            f"{symbol.lower()}@aggTrade",
            {
                "e": "aggTrade",
                "E": time_ms + 2,
                "s": symbol.upper(),
                "a": agg_id,
                "p": _num(price),
                "q": _num(qty),
                "f": agg_id,
                "l": agg_id,
                "T": time_ms,
                "m": False,
            },
        )

    async def send_futures_book(
        self, symbol: str, bid: float, ask: float, time_ms: int = 1704067200000
    ) -> None:
        """Send a futures ``<symbol>@bookTicker`` event (with ``e``, ``E``, ``T``, ``ps``)."""
        await self.send_event(
            f"{symbol.lower()}@bookTicker",
            {
                "e": "bookTicker",
                "u": 400900217,
                "E": time_ms + 1,
                "T": time_ms,
                "s": symbol.upper(),
                "ps": symbol.upper().split("_")[0],
                "b": _num(bid),
                "B": "10",
                "a": _num(ask),
                "A": "12",
            },
        )

    async def send_server_shutdown(self, time_ms: int = 1704153600000) -> None:
        await self.send_raw(orjson.dumps({"e": "serverShutdown", "E": time_ms}).decode())

    async def drop_all(self, *, code: int = WSCloseCode.OK) -> None:
        """Close every open connection from the server side (like Binance's 24 h close)."""
        for ws in list(self._sockets):
            await ws.close(code=code, message=b"fake closing")
