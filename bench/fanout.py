"""Benchmark websocket fan-out: N subscribers on /live-feed/subscribe/, tick -> client latency.

    python bench/fanout.py [--clients 2000] [--rate 10] [--duration 15]

``python -m pricewatch`` runs as a subprocess (PRICEWATCH_FEED=binance pointed at a fake
Binance served by this process over raw asyncio sockets). One user is registered
(PRICEWATCH_BCRYPT_ROUNDS=4) and its access token opens ``--clients`` websockets (aiohttp,
one ClientSession, connected ``--batch`` at a time), each subscribed to every symbol (the
default). Then the fake sends ``--rate`` trades/s, alternating BTCUSDT / ETHUSDT, for
``--duration`` s. Every trade has a price never used before in the run, and the fake records
``perf_counter()`` just before writing it; a client receiving ``{"type": "price", price}``
looks the price up, so the latency is upstream write -> client has parsed the message
(client-side queueing in this process included: ``client_cpu_pct`` says how busy it was).

Figures: ``latency_ms`` p50/p99/max, ``messages`` received vs ``expected`` (clients x
trades), ``drain_s`` (time after the last trade until every message arrived, at most
``--grace``), ``server_cpu_pct`` (utime+stime of the server over the tick window and the
drain; 100 = one core), ``server_rss_mb`` (VmRSS at the end of the trades) and
``server_hwm_mb`` (VmHWM), ``slow_drops`` (clients closed with 1008 during the window; the
server's /healthz does not report its drop counter), ``connect_s`` for all clients.

Prints one JSON line; logs go to stderr. Takes ~duration + connect + drain + ~3 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import orjson  # noqa: E402

from bench._common import (  # noqa: E402
    CpuMeter,
    FakeUpstream,
    ServerProcess,
    emit,
    loadavg,
    log,
    percentile,
    raise_nofile,
    setup_logging,
    status_mb,
    trade_frame,
)

SYMBOLS = ("BTCUSDT", "ETHUSDT")
START = {"BTCUSDT": 60000.0, "ETHUSDT": 3000.0}


class Clients:
    """The subscribers: latencies of every price message, close codes, message counts."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str,
                 sent: dict[float, float]):
        self.session, self.url, self.sent = session, url, sent
        self.headers = {"Authorization": f"Bearer {token}"}
        self.latencies: list[float] = []
        self.recording = False
        self.messages = 0  # price messages received while recording
        self.unknown = 0  # price messages whose price was never sent (should stay 0)
        self.close_codes: dict[int | None, int] = {}
        self.closed_during_window = 0
        self.drops = 0  # 1008 while recording
        self.connect_errors = 0
        self.tasks: list[asyncio.Task] = []
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []

    async def connect(self, n: int, batch: int) -> None:
        for start in range(0, n, batch):
            results = await asyncio.gather(
                *(self._open() for _ in range(min(batch, n - start))),
                return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    self.connect_errors += 1
                    if self.connect_errors <= 3:
                        log.warning("connect failed: %r", r)
                else:
                    self.sockets.append(r)
                    self.tasks.append(asyncio.create_task(self._read(r)))

    async def _open(self) -> aiohttp.ClientWebSocketResponse:
        return await self.session.ws_connect(self.url, headers=self.headers, autoping=True,
                                             heartbeat=None, compress=0,
                                             timeout=aiohttp.ClientWSTimeout(ws_close=2.0))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        sent, lat = self.sent, self.latencies
        clock = time.perf_counter
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            now = clock()
            data = orjson.loads(msg.data)
            if not self.recording or data.get("type") != "price":
                continue
            self.messages += 1
            t = sent.get(data["price"])
            if t is None:
                self.unknown += 1
            else:
                lat.append((now - t) * 1000.0)
        code = ws.close_code
        self.close_codes[code] = self.close_codes.get(code, 0) + 1
        if self.recording:
            self.closed_during_window += 1
            if code == 1008:
                self.drops += 1


async def register(session: aiohttp.ClientSession, base: str) -> str:
    async with session.post(base + "/auth/register", json={
            "username": "fanout", "password": "fanout-password", "email": "f@example.com"}
            ) as resp:
        body = await resp.json()
        if resp.status != 201:
            raise RuntimeError(f"register failed: {resp.status} {body}")
        return body["access"]


async def tick_loop(fake: FakeUpstream, sent: dict[float, float], rate: float,
                    duration: float, seed: int) -> int:
    """Send rate trades/s for duration s; each price unique in the run. Returns trades sent."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    prices = dict(START)
    ids = dict.fromkeys(SYMBOLS, 5_000_000)
    period = 1.0 / rate
    n = round(rate * duration)
    next_at = loop.time()
    for i in range(n):
        symbol = SYMBOLS[i % len(SYMBOLS)]
        price = round(prices[symbol] * (1 + rng.gauss(0, 0.0003)), 2)
        while price in sent:
            price = round(price + 0.01, 2)
        prices[symbol] = price
        ids[symbol] += 1
        frame = trade_frame(symbol, ids[symbol], f"{price:.2f}", "0.01000000",
                            int(time.time() * 1000))
        sent[price] = time.perf_counter()
        fake.write(frame)
        next_at += period
        await asyncio.sleep(max(0.0, next_at - loop.time()))
    return n


async def run(args) -> dict:
    fake = await FakeUpstream().start()
    server = ServerProcess({"PRICEWATCH_FEED": "binance",
                            "PRICEWATCH_BINANCE_WS_URL": fake.url,
                            "PRICEWATCH_BCRYPT_ROUNDS": "4",
                            # every client comes from 127.0.0.1
                            "PRICEWATCH_MAX_WS_PER_ADDRESS": str(args.clients)})
    await asyncio.to_thread(server.start)
    try:
        await fake.wait_client(timeout=20.0)
        log.info("server pid %d up on %s, feed connected", server.pid, server.url)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            token = await register(session, server.url)
            sent: dict[float, float] = {}
            clients = Clients(session, server.ws_url + "/live-feed/subscribe/", token, sent)
            server_cpu = CpuMeter(server.pid)
            server_cpu.start()
            began = time.monotonic()
            await clients.connect(args.clients, args.batch)
            connect_s = time.monotonic() - began
            connect_cpu = server_cpu.stop()
            rss_idle = status_mb(server.pid, "VmRSS")
            log.info("%d clients connected in %.1fs (%d failed); server RSS %.0f MB",
                     len(clients.sockets), connect_s, clients.connect_errors, rss_idle)
            await asyncio.sleep(0.5)
            clients.recording = True
            server_cpu.start()
            client_cpu = CpuMeter()
            client_cpu.start()
            trades = await tick_loop(fake, sent, args.rate, args.duration, args.seed)
            rss = status_mb(server.pid, "VmRSS")
            expected = len(clients.sockets) * trades
            deadline = time.monotonic() + args.grace  # let the last trades arrive
            while clients.messages < expected and time.monotonic() < deadline:
                if all(ws.closed for ws in clients.sockets):
                    break
                await asyncio.sleep(0.05)
            drain_s = time.monotonic() - deadline + args.grace
            cpu = server_cpu.stop()
            ccpu = client_cpu.stop()
            clients.recording = False
            hwm = status_mb(server.pid, "VmHWM")
            open_now = sum(1 for ws in clients.sockets if not ws.closed)
            log.info("ticks done: %d trades, %d messages; stopping the server", trades,
                     clients.messages)
            began = time.monotonic()
            rc = await asyncio.to_thread(server.stop)  # our loop keeps answering closes
            shutdown_s = time.monotonic() - began
            await asyncio.wait(clients.tasks, timeout=5.0)
            for t in clients.tasks:
                t.cancel()
    finally:
        await asyncio.to_thread(server.stop)
        await fake.close()

    lat = sorted(clients.latencies)
    return {
        "clients": args.clients,
        "connected": len(clients.sockets),
        "connect_errors": clients.connect_errors,
        "connect_s": round(connect_s, 2),
        "connect_server_cpu_pct": round(connect_cpu, 1),
        "trades": trades,
        "rate_per_s": args.rate,
        "duration_s": args.duration,
        "messages": clients.messages,
        "expected": expected,
        "latency_ms": {"p50": _r(percentile(lat, 50)), "p99": _r(percentile(lat, 99)),
                       "max": _r(lat[-1] if lat else None)},
        "drain_s": round(drain_s, 2),
        "server_cpu_pct": round(cpu, 1),
        "server_runqueue_wait_pct": server_cpu.wait_pct,
        "client_cpu_pct": round(ccpu, 1),
        "client_runqueue_wait_pct": client_cpu.wait_pct,
        "server_rss_mb": round(rss, 1),
        "server_rss_idle_mb": round(rss_idle, 1),
        "server_hwm_mb": round(hwm, 1),
        "slow_drops": clients.drops,
        "closed_during_window": clients.closed_during_window,
        "open_at_end": open_now,
        "unknown_prices": clients.unknown,
        "shutdown_s": round(shutdown_s, 2),
        "server_rc": rc,
        "close_codes_at_shutdown": {str(k): v for k, v in clients.close_codes.items()},
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=10.0, help="trades per second (total)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of trades")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="at most this many seconds to wait for the last messages")
    parser.add_argument("--batch", type=int, default=100, help="clients connecting at once")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    setup_logging()
    nofile = raise_nofile()
    if nofile < args.clients + 100:
        parser.error(f"RLIMIT_NOFILE is {nofile}: too low for {args.clients} clients")
    load_before = loadavg()
    began = time.monotonic()
    out = asyncio.run(run(args))
    out["cores"] = os.cpu_count()
    out["loadavg_1m_before"] = load_before
    out["elapsed_s"] = round(time.monotonic() - began, 1)
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
