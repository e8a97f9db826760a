"""Abuse benchmark: clients that never read hammer /ws/ohlc/ with 1000-candle snapshot requests.

    python bench/abuse.py [--attackers 24] [--duration 30] [--rate 20]

``python -m pricewatch`` runs as a subprocess (PRICEWATCH_FEED=binance pointed at a fake
Binance served by this process over raw asyncio sockets, default limits). The fake first
sends 1100 trades one second apart, so every 1s snapshot holds 1000 candles (~128 KB), then
``--trades`` trades/s for the rest of the run. ``--attackers`` raw sockets (4 KiB receive
buffer, never read after the handshake) each send ``--rate`` snapshot requests per second
(20/s is the most the server allows; ``--rate`` above it shows the message-rate limit) for
``--duration`` s; an attacker whose connection the server ends reconnects at once and goes
on. Meanwhile one polite client times ``GET /healthz`` every 50 ms and one reads candle
updates from /ws/ohlc/.

Figures: server ``rss_mb`` before the attack, at its end, ``peak`` (sampled every 0.25 s
and VmHWM) and ``growth_peak`` (peak minus before), again ``after_s`` seconds after the
attackers left; ``health_ms`` p50/p99/max (and failures); ``dropped`` (connections the
attackers saw end, and the server's pricewatch_websocket_dropped_total by reason);
``requests_sent``; ``reader_messages`` (candle updates the polite client got);
``server_cpu_pct`` over the attack (100 = one core), ``server_runqueue_wait_pct`` (time it
was runnable but had no core: other load on the machine) and this process's
``bench_cpu_pct``.
Goal (README): growth < 50 MB and health p99 < 100 ms with 24 attackers.

Prints one JSON line; logs go to stderr. Takes about duration + 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench._common import (  # noqa: E402
    CpuMeter,
    FakeUpstream,
    Refused,
    ServerProcess,
    client_frame,
    emit_run,
    loadavg,
    log,
    percentile,
    raise_nofile,
    raw_ws_socket,
    setup_logging,
    status_mb,
    trade_frame,
)

REQUEST = client_frame(b'{"symbol":"BTCUSDT","timeframe":"1s","limit":1000}')
HISTORY = 1100  # one-second trades sent before the attack: a full 1000-candle 1s ring


class Attackers:
    """`n` never-reading raw clients, each sending `rate` snapshot requests per second."""

    def __init__(self, port: int, n: int, rate: float):
        self.port, self.n, self.rate = port, n, rate
        self.sent = 0
        self.ended = 0  # connections the server ended under us
        self.refused: dict[int, int] = {}  # upgrade answers other than 101, by status
        self.open = 0
        self.peak_open = 0

    async def run_one(self, stop_at: float) -> None:
        loop = asyncio.get_running_loop()
        period = 1.0 / self.rate
        while loop.time() < stop_at:
            try:
                sock = await raw_ws_socket(self.port, "/ws/ohlc/")
            except Refused as exc:
                self.refused[exc.args[0]] = self.refused.get(exc.args[0], 0) + 1
                await asyncio.sleep(0.1)
                continue
            except OSError:
                await asyncio.sleep(0.1)
                continue
            self.open += 1
            self.peak_open = max(self.peak_open, self.open)
            try:
                next_at = loop.time()
                while loop.time() < stop_at:
                    await asyncio.wait_for(loop.sock_sendall(sock, REQUEST), 5)
                    self.sent += 1
                    next_at += period
                    await asyncio.sleep(max(0.0, next_at - loop.time()))
            except (OSError, TimeoutError):
                self.ended += 1  # reset by the server (or our send blocked 5 s)
            finally:
                self.open -= 1
                sock.close()

    async def run(self, duration: float) -> None:
        stop_at = asyncio.get_running_loop().time() + duration
        await asyncio.gather(*(self.run_one(stop_at) for _ in range(self.n)))


async def time_health(session: aiohttp.ClientSession, url: str, stop: asyncio.Event,
                      samples: list[float]) -> int:
    """GET /healthz every 50 ms until `stop`; latencies (ms) into `samples`; returns
    failures (errors, non-200, over 10 s)."""
    failures = 0
    while not stop.is_set():
        began = time.perf_counter()
        try:
            async with session.get(url + "/healthz",
                                   timeout=aiohttp.ClientTimeout(total=10)) as resp:
                await resp.read()
                ok = resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        samples.append((time.perf_counter() - began) * 1000)
        failures += not ok
        await asyncio.sleep(0.05)
    return failures


async def read_candles(session: aiohttp.ClientSession, ws_url: str, stop: asyncio.Event,
                       counts: dict[str, int]) -> None:
    async with session.ws_connect(ws_url + "/ws/ohlc/") as ws:
        await ws.send_json({"symbol": "BTCUSDT", "timeframe": "1m", "limit": 10})
        while not stop.is_set():
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                counts["closed"] = 1
                return
            counts["messages"] += 1


async def feed_trades(fake: FakeUpstream, rate: float, stop: asyncio.Event,
                      first_id: int) -> None:
    loop = asyncio.get_running_loop()
    trade_id, next_at, price = first_id, loop.time(), 60000.0
    while not stop.is_set():
        trade_id += 1
        price = round(price + (0.5 if trade_id % 3 else -1.0), 2)
        fake.write(trade_frame("BTCUSDT", trade_id, f"{price:.2f}", "0.01",
                               int(time.time() * 1000)))
        next_at += 1.0 / rate
        await asyncio.sleep(max(0.0, next_at - loop.time()))


async def sample_rss(pid: int, stop: asyncio.Event, peak: list[float]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], status_mb(pid, "VmRSS"))
        await asyncio.sleep(0.25)


async def server_drops(session: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    return {m.group(1): int(float(m.group(2))) for m in re.finditer(
        r'^pricewatch_websocket_dropped_total\{reason="(\w+)"\} (\S+)$', text, re.MULTILINE)}


async def run(args) -> dict:
    fake = await FakeUpstream().start()
    server = ServerProcess({"PRICEWATCH_FEED": "binance", "PRICEWATCH_BINANCE_WS_URL": fake.url,
                            "PRICEWATCH_SYMBOLS": "BTCUSDT"})
    await asyncio.to_thread(server.start)
    try:
        await fake.wait_client(timeout=20.0)
        start_ms = (int(time.time()) - HISTORY - 5) * 1000
        fake.write(b"".join(trade_frame("BTCUSDT", i + 1, f"{60000 + i % 100}.00", "0.01",
                                        start_ms + i * 1000) for i in range(HISTORY)))
        await fake.drain()
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url + "/api/v1/ohlc", params={
                    "symbol": "BTCUSDT", "timeframe": "1s", "limit": "1000"}) as resp:
                candles = len((await resp.json())["data"])
            log.info("server pid %d up on %s; %d 1s candles", server.pid, server.url, candles)
            await asyncio.sleep(1.0)  # settle
            rss_before = status_mb(server.pid, "VmRSS")
            stop = asyncio.Event()
            peak = [rss_before]
            health: list[float] = []
            reader = {"messages": 0, "closed": 0}
            background = [
                asyncio.create_task(feed_trades(fake, args.trades, stop, HISTORY)),
                asyncio.create_task(sample_rss(server.pid, stop, peak)),
                asyncio.create_task(read_candles(session, server.ws_url, stop, reader)),
            ]
            health_task = asyncio.create_task(time_health(session, server.url, stop, health))
            server_cpu, own_cpu = CpuMeter(server.pid), CpuMeter()
            server_cpu.start()
            own_cpu.start()
            attackers = Attackers(server.port, args.attackers, args.rate)
            log.info("%d attackers for %.0fs at %g requests/s each", args.attackers,
                     args.duration, args.rate)
            await attackers.run(args.duration)
            cpu, bench_cpu = server_cpu.stop(), own_cpu.stop()
            rss_end = status_mb(server.pid, "VmRSS")
            hwm = status_mb(server.pid, "VmHWM")
            await asyncio.sleep(args.after)
            rss_after = status_mb(server.pid, "VmRSS")
            stop.set()
            failures = await health_task
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            drops = await server_drops(session, server.url)
    finally:
        await asyncio.to_thread(server.stop)
        await fake.close()

    lat = sorted(health)
    peak_mb = max(peak[0], rss_end)
    return {
        "attackers": args.attackers,
        "duration_s": args.duration,
        "rate_per_attacker": args.rate,
        "snapshot_candles": candles,
        "requests_sent": attackers.sent,
        "rss_mb": {"before": round(rss_before, 1), "end": round(rss_end, 1),
                   "peak": round(peak_mb, 1), "hwm": round(hwm, 1),
                   "growth_peak": round(peak_mb - rss_before, 1),
                   "after": round(rss_after, 1), "after_s": args.after},
        "health_ms": {"n": len(lat), "p50": _r(percentile(lat, 50)),
                      "p99": _r(percentile(lat, 99)), "max": _r(lat[-1] if lat else None),
                      "failures": failures},
        "dropped": {"seen_by_attackers": attackers.ended, "server": drops,
                    "refused_upgrades": attackers.refused},
        "server_cpu_pct": round(cpu, 1),
        "server_runqueue_wait_pct": server_cpu.wait_pct,
        "bench_cpu_pct": round(bench_cpu, 1),
        "attackers_open_peak": attackers.peak_open,
        "reader_messages": reader["messages"],
        "reader_closed": bool(reader["closed"]),
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attackers", type=int, default=24, help="never-reading clients")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of attack")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="snapshot requests per second per attacker (server allows 20)")
    parser.add_argument("--trades", type=float, default=20.0, help="live trades per second")
    parser.add_argument("--after", type=float, default=3.0,
                        help="seconds after the attack to read RSS again")
    args = parser.parse_args(argv)
    if not (0 < args.duration <= 600 and 0 < args.rate and 0 < args.attackers <= 2000):
        parser.error("need 0 < duration <= 600, rate > 0, 0 < attackers <= 2000")
    setup_logging()
    raise_nofile()
    load_before = loadavg()
    began = time.monotonic()
    out = asyncio.run(run(args))
    emit_run(out, load_before, began)
    return 0


if __name__ == "__main__":
    sys.exit(main())
