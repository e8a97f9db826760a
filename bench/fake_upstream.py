"""The upstream side of the abuse benchmark: a fake Binance REST and the hostile trade tapes.

* ``FakeRest``: Binance's REST market data (``/api/v3/historicalTrades``, ``aggTrades``,
  ``klines``, ``trades``) on loopback. Quiet, it answers ``[]`` at once. With ``huge_bytes``
  set, every answer is that many bytes: ``[`` + spaces + ``]``, valid JSON, written in 1 MiB
  slices of one pre-built buffer (generated, never held whole), with its Content-Length
  announced as a real upstream would. ``served`` counts answers written to the end,
  ``cut`` those the server stopped reading (it closed the connection), ``sent_mb`` the
  bytes written; ``done`` is set after each huge answer ends either way.
* ``Tape``: one symbol's trades on a ``FakeUpstream``, with consecutive ids unless an attack
  says otherwise, and the last price sent.
* ``future_trades``, ``id_reset``, ``huge_rest``: the upstream attacks of ``abuse.py``; each
  runs until a loop time and returns its own figures (``future_figures`` and
  ``feed_counter`` read what the server made of them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aiohttp
from aiohttp import web

from bench._common import FakeUpstream, free_port, log, trade_frame

SLICE = b" " * (1 << 20)
YEAR_4000_MS = 64_060_588_800_000  # 4000-01-01T00:00:00Z
DAY_MS = 86_400_000
REST_PATHS = ("historicalTrades", "aggTrades", "klines", "trades")


class FakeRest:
    """Binance REST on 127.0.0.1: ``[]`` at once, or ``huge_bytes`` bytes when set."""

    def __init__(self) -> None:
        self.huge_bytes = 0
        self.calls: list[str] = []
        self.served = self.cut = 0
        self.sent_bytes = 0
        self.done = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> FakeRest:
        app = web.Application()
        for name in REST_PATHS:
            app.router.add_get("/api/v3/" + name, self._answer)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def sent_mb(self) -> float:
        return round(self.sent_bytes / 2**20, 1)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.calls.append(request.path.rsplit("/", 1)[1])
        size = self.huge_bytes
        if size <= 0:
            return web.Response(body=b"[]", content_type="application/json")
        resp = web.StreamResponse(
            headers={"Content-Type": "application/json", "Content-Length": str(size)}
        )
        try:
            await resp.prepare(request)
            await resp.write(b"[")
            left = size - 2
            while left > 0:
                piece = SLICE if left >= len(SLICE) else SLICE[:left]
                await resp.write(piece)
                self.sent_bytes += len(piece)
                left -= len(piece)
            await resp.write(b"]")
            await resp.write_eof()
            self.served += 1
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            self.cut += 1  # the server stopped reading: the bound worked
        finally:
            self.done.set()
        return resp


class Tape:
    """Trades of one symbol on `fake`: `send()` uses the next id unless given one."""

    def __init__(self, fake: FakeUpstream, symbol: str, price: float, first_id: int = 1):
        self.fake, self.symbol = fake, symbol
        self.next_id, self.price = first_id, price
        self.sent = 0

    def send(
        self, price: float | None = None, *, trade_id: int | None = None, time_ms: int | None = None
    ) -> None:
        if price is not None:
            self.price = price
        if trade_id is None:
            trade_id, self.next_id = self.next_id, self.next_id + 1
        self.fake.write(
            trade_frame(
                self.symbol,
                trade_id,
                f"{self.price:.2f}",
                "0.01",
                int(time.time() * 1000) if time_ms is None else time_ms,
            )
        )
        self.sent += 1


PriceOf = Callable[[str], Awaitable[float | None]]


async def _pace(loop: asyncio.AbstractEventLoop, next_at: float, stop_at: float) -> bool:
    """Sleep until `next_at`; False once `stop_at` is reached."""
    await asyncio.sleep(max(0.0, min(next_at, stop_at) - loop.time()))
    return loop.time() < stop_at


async def future_trades(tape: Tape, stop_at: float, rate: float = 50.0) -> dict:
    """Trades alternately now, +1 day and in the year 4000 (consecutive ids), `rate` a second;
    a future trade's price is 10x the normal one, so a latest price that took it shows."""
    loop = asyncio.get_running_loop()
    normal = future = 0
    base, next_at = tape.price, loop.time()
    while True:
        k = normal + future
        now_ms = int(time.time() * 1000)
        if k % 3 == 0:
            tape.send(base + (k % 7) * 0.5, time_ms=now_ms)
            normal += 1
        else:
            ahead = now_ms + DAY_MS if k % 3 == 1 else YEAR_4000_MS + k
            tape.fake.write(
                trade_frame(tape.symbol, tape.next_id, f"{base * 10:.2f}", "0.01", ahead)
            )
            tape.next_id += 1
            future += 1
        next_at += 1.0 / rate
        if not await _pace(loop, next_at, stop_at):
            break
    tape.send(base, time_ms=int(time.time() * 1000))  # the last word: a normal trade
    return {
        "normal_sent": normal + 1,
        "future_sent": future,
        "future_price": base * 10,
        "last_normal_price": base,
    }


async def _follows(
    price_of: PriceOf, symbol: str, price: float, within: float = 1.0
) -> float | None:
    """Milliseconds until the server's latest `symbol` price is `price` (None: not in time)."""
    began = time.monotonic()
    while time.monotonic() - began < within:
        if await price_of(symbol) == price:
            return round((time.monotonic() - began) * 1000, 1)
        await asyncio.sleep(0.02)
    return None


async def id_reset(tape: Tape, price_of: PriceOf, stop_at: float) -> dict:
    """Ids 1000..1004, then a restart from 1, one id 2**63, then small ids again; after each
    step, does the latest price equal the last trade's within 1 s? Then normal trades."""
    loop = asyncio.get_running_loop()
    lag: dict[str, float | None] = {}
    price = tape.price
    steps = [
        ("before", list(range(1000, 1005))),
        ("after_reset", list(range(1, 6))),
        ("after_2_63", [2**63]),
        ("after_2_63_small_ids", list(range(6, 11))),
    ]
    for name, ids in steps:
        for trade_id in ids:
            price = round(price + 1.25, 2)
            tape.send(price, trade_id=trade_id)
            await asyncio.sleep(0.01)
        lag[name] = await _follows(price_of, tape.symbol, price)
    tape.next_id = 11
    next_at = loop.time()
    while await _pace(loop, next_at, stop_at):  # ordinary trades for the rest of the phase
        price = round(price + 0.25, 2)
        tape.send(price)
        next_at += 0.1
    return {
        "price_follows": all(v is not None for k, v in lag.items() if k != "before"),
        "follows_ms": lag,
    }


async def huge_rest(tape: Tape, rest: FakeRest, stop_at: float, size_mb: float) -> dict:
    """Gaps in `tape`'s ids, one at a time: each makes the server fetch the missed trades
    from `rest`, which answers `size_mb` MB. The next gap follows once an answer ended (or
    5 s passed)."""
    loop = asyncio.get_running_loop()
    rest.huge_bytes = int(size_mb * 2**20)
    gaps = 0
    try:
        while loop.time() < stop_at:
            rest.done.clear()
            tape.send()
            tape.next_id += 4  # three ids missed
            tape.send()
            gaps += 1
            try:
                async with asyncio.timeout(max(0.0, min(5.0, stop_at - loop.time()))):
                    await rest.done.wait()
            except TimeoutError:
                pass
            await asyncio.sleep(0.2)
    finally:
        rest.huge_bytes = 0
    log.info(
        "huge REST: %d gaps, %d answers read whole, %d cut, %.0f MB sent",
        gaps,
        rest.served,
        rest.cut,
        rest.sent_mb,
    )
    return {
        "gaps": gaps,
        "rest_calls": len(rest.calls),
        "answers_read_whole": rest.served,
        "answers_cut": rest.cut,
        "answer_mb": size_mb,
        "sent_mb": rest.sent_mb,
    }


def feed_counter(health: dict, key: str) -> int | None:
    """The sum of a feed counter over /healthz feeds (an int or per-symbol dict); None when
    no feed reports it."""
    found, total = False, 0
    for feed in [health, *(health.get("feeds") or {}).values()]:
        value = feed.get(key) if isinstance(feed, dict) else None
        if isinstance(value, dict):
            value = sum(v for v in value.values() if isinstance(v, int | float))
        if isinstance(value, int | float) and not isinstance(value, bool):
            found, total = True, total + int(value)
    return total if found else None


async def future_figures(
    http: aiohttp.ClientSession, url: str, symbol: str, sent: dict, health: dict
) -> dict:
    """What the server made of the future trades: dropped (if counted), its latest price and
    time for the symbol, and how many 1m candles start over a minute ahead of now."""
    out = {**sent, "dropped": feed_counter(health, "future_trades")}
    now = datetime.now(UTC)

    def ahead_s(iso: str | None) -> float | None:
        if not iso:
            return None
        return round((datetime.fromisoformat(iso.replace("Z", "+00:00")) - now).total_seconds(), 1)

    try:
        async with asyncio.timeout(5):
            async with http.get(f"{url}/api/v1/prices/{symbol}") as resp:
                latest = await resp.json()
            out.update(
                latest_price=latest.get("price"), latest_time_ahead_s=ahead_s(latest.get("time"))
            )
            async with http.get(
                url + "/api/v1/ohlc", params={"symbol": symbol, "timeframe": "1m", "limit": "1000"}
            ) as resp:
                candles = (await resp.json()).get("data") or [] if resp.status == 200 else []
            out["future_candles"] = sum(
                1 for c in candles if (ahead_s(c.get("timestamp")) or 0) > 60
            )
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.warning("future trades: figures not read: %r", exc)
    return out
