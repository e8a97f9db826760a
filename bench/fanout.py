"""Benchmark websocket fan-out at market rates: N live-feed subscribers, R trades/s.

    python bench/fanout.py --rate 500 --clients 2000 [--max-rate M] [--procs P]
                           [--duration 15] [--server-root PATH] [--compare-root PATH]

``python -m pricewatch`` runs as a subprocess (PRICEWATCH_FEED=binance pointed at a fake
Binance served by this process over raw asyncio sockets; ``--server-root`` runs another
checkout's server, e.g. an export of the old design; ``--compare-root`` runs the same load
against this checkout and then that one, in the same invocation, and prints both).
One user is registered (PRICEWATCH_BCRYPT_ROUNDS=4) and its access token opens ``--clients``
websockets spread over ``--procs`` client processes (aiohttp), each subscribed to both
symbols (with ``"max_rate": M`` when given). The fake then sends ``--rate`` trades/s,
alternating BTCUSDT / ETHUSDT, for ``--duration`` s, each with the send time (wall clock,
ms) as its trade time, and then stops: the burst's end.

Figures (one JSON line on stdout; logs on stderr):

- ``delivered``: price messages received; ``per_client_per_s`` the rate each client saw.
- ``latency_ms`` p50/p99/max: trade sent -> client parsed it (from the message's ``time``,
  ms resolution, the clocks are the same machine's).
- ``last_value``: after the burst (and ``--grace`` s), how many clients' last price per
  symbol equals that symbol's last trade (``equal_last``/``clients``: both symbols), and
  ``age_ms`` p50/p99/max over the (client, symbol) pairs that got it: when that last
  message arrived, counted from the last trade's send.
- ``server_cpu_pct`` over the trade window (100 = one core), ``server_rss_mb`` at its end,
  ``idle_kb_per_client`` (RSS growth from connecting the clients / clients),
  ``client_cpu_pct`` (all client processes together): on a small machine the client
  load competes with the server for the same cores, so both are reported.
- ``drops``: clients closed with 1008 during the window.
- ``server_flush_ms``: from the server's /metrics (where it has them), the mean and longest
  conflation flush during the window (render + one write per due client): the server's own
  share of the latency, apart from the client processes' backlog.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import urllib.request  # noqa: E402  (after the path fix: bench/http.py is not `http`)

import aiohttp  # noqa: E402
import orjson  # noqa: E402

from bench._common import (  # noqa: E402
    CpuMeter,
    FakeUpstream,
    ServerProcess,
    emit_run,
    loadavg,
    log,
    raise_nofile,
    setup_logging,
    status_mb,
    trade_frame,
)

SYMBOLS = ("BTCUSDT", "ETHUSDT")
START = {"BTCUSDT": 60000.0, "ETHUSDT": 3000.0}


# --------------------------------------------------------------------------- client process


def _epoch_ms(iso: str, cache: dict[str, float]) -> float:
    value = cache.get(iso)
    if value is None:
        if len(cache) > 100_000:
            cache.clear()
        value = cache[iso] = datetime.fromisoformat(iso).timestamp() * 1000.0
    return value


async def _client_main(
    conn, url: str, token: str, n: int, batch: int, max_rate: int | None
) -> None:
    """One client process: open `n` sockets, record while told to, report at the end."""
    raise_nofile()
    headers = {"Authorization": f"Bearer {token}"}
    hist: Counter[int] = Counter()  # latency in whole ms -> count
    last: list[dict[str, tuple[float, float]]] = []  # per client: symbol -> (price, arrival)
    state = {"recording": False, "messages": 0, "drops": 0, "closed": 0}
    iso_cache: dict[str, float] = {}
    loop = asyncio.get_running_loop()

    async def read(ws, mine: dict) -> None:
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            data = orjson.loads(msg.data)
            if data.get("type") != "price" or not state["recording"]:
                continue
            now = time.time() * 1000.0
            state["messages"] += 1
            hist[int(now - _epoch_ms(data["time"], iso_cache))] += 1
            mine[data["symbol"]] = (data["price"], time.monotonic())
        if state["recording"]:
            state["closed"] += 1
            if ws.close_code == 1008:
                state["drops"] += 1

    connector = aiohttp.TCPConnector(limit=0)
    sockets, tasks, errors = [], [], 0
    async with aiohttp.ClientSession(connector=connector) as session:
        for start in range(0, n, batch):
            results = await asyncio.gather(
                *(
                    session.ws_connect(
                        url,
                        headers=headers,
                        heartbeat=None,
                        compress=0,
                        timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
                    )
                    for _ in range(min(batch, n - start))
                ),
                return_exceptions=True,
            )
            for ws in results:
                if isinstance(ws, BaseException):
                    errors += 1
                    continue
                if max_rate is not None:
                    await ws.send_json(
                        {"action": "subscribe", "symbols": list(SYMBOLS), "max_rate": max_rate}
                    )
                mine: dict = {}
                last.append(mine)
                sockets.append(ws)
                tasks.append(asyncio.create_task(read(ws, mine)))
        conn.send(("connected", len(sockets), errors))
        cpu0 = time.process_time()
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command == "record":
                state["recording"] = True
                cpu0 = time.process_time()
            elif command == "report":
                state["recording"] = False
                conn.send(
                    (
                        "report",
                        dict(hist),
                        last,
                        state["messages"],
                        state["drops"],
                        state["closed"],
                        time.process_time() - cpu0,
                    )
                )
            elif command == "close":
                for ws in sockets:
                    if not ws.closed:
                        await ws.close()
                for t in tasks:
                    t.cancel()
                conn.send(("closed",))
                return


def client_process(conn, *args) -> None:
    asyncio.run(_client_main(conn, *args))


# --------------------------------------------------------------------------- driver


async def register(session: aiohttp.ClientSession, base: str) -> str:
    async with session.post(
        base + "/auth/register",
        json={"username": "fanout", "password": "fanout-password", "email": "f@example.com"},
    ) as resp:
        body = await resp.json()
        if resp.status != 201:
            raise RuntimeError(f"register failed: {resp.status} {body}")
        return body["access"]


async def tick_loop(
    fake: FakeUpstream, rate: float, duration: float, seed: int
) -> dict[str, tuple[float, float]]:
    """Send rate trades/s for duration s; returns each symbol's last (price, monotonic send)."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    prices = dict(START)
    ids = dict.fromkeys(SYMBOLS, 5_000_000)
    period = 1.0 / rate
    last: dict[str, tuple[float, float]] = {}
    next_at = loop.time()
    for i in range(round(rate * duration)):
        symbol = SYMBOLS[i % len(SYMBOLS)]
        price = round(prices[symbol] * (1 + rng.gauss(0, 0.0003)), 2)
        prices[symbol] = price
        ids[symbol] += 1
        fake.write(
            trade_frame(symbol, ids[symbol], f"{price:.2f}", "0.01000000", int(time.time() * 1000))
        )
        last[symbol] = (price, time.monotonic())
        next_at += period
        delay = next_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif i % 50 == 0:
            await asyncio.sleep(0)  # behind schedule: still let the writes go out
    return last


def _pct(hist: Counter, p: float) -> float | None:
    total = sum(hist.values())
    if not total:
        return None
    rank = p / 100 * (total - 1)
    seen = 0
    for value in sorted(hist):
        seen += hist[value]
        if seen > rank:
            return float(value)
    return float(max(hist))


def _sorted_pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))], 1)


async def run(args) -> dict:
    fake = await FakeUpstream().start()
    server = ServerProcess(
        {
            "PRICEWATCH_FEED": "binance",
            "PRICEWATCH_BINANCE_WS_URL": fake.url,
            "PRICEWATCH_BINANCE_REST_URL": "http://127.0.0.1:9",
            "PRICEWATCH_CANDLE_HISTORY": "false",
            "PRICEWATCH_SYMBOLS": ",".join(SYMBOLS),
            "PRICEWATCH_BCRYPT_ROUNDS": "4",
            # every client comes from 127.0.0.1
            "PRICEWATCH_MAX_WS_PER_ADDRESS": str(args.clients + 10),
        },
        root=args.server_root,
    )
    await asyncio.to_thread(server.start)
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    try:
        await fake.wait_client(timeout=20.0)
        log.info(
            "server pid %d (%s) up on %s, feed connected",
            server.pid,
            args.server_root or ROOT,
            server.url,
        )
        async with aiohttp.ClientSession() as session:
            token = await register(session, server.url)
        rss_before = status_mb(server.pid, "VmRSS")
        began = time.monotonic()
        share = [
            args.clients // args.procs + (i < args.clients % args.procs) for i in range(args.procs)
        ]
        for n in share:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=client_process,
                daemon=True,
                args=(
                    child,
                    server.ws_url + "/live-feed/subscribe/",
                    token,
                    n,
                    args.batch,
                    args.max_rate,
                ),
            )
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        connected = errors = 0
        for pipe in pipes:
            _, ok, bad = await asyncio.to_thread(pipe.recv)
            connected += ok
            errors += bad
        connect_s = time.monotonic() - began
        await asyncio.sleep(1.0)  # initial prices and acks settle
        rss_idle = status_mb(server.pid, "VmRSS")
        log.info(
            "%d clients connected in %.1fs (%d failed); RSS %.0f -> %.0f MB",
            connected,
            connect_s,
            errors,
            rss_before,
            rss_idle,
        )
        for pipe in pipes:
            pipe.send("record")
        await asyncio.sleep(0.2)
        flushes0 = await asyncio.to_thread(flush_figures, server.url)
        server_cpu = CpuMeter(server.pid)
        server_cpu.start()
        window = time.monotonic()
        last_trades = await tick_loop(fake, args.rate, args.duration, args.seed)
        window = time.monotonic() - window
        cpu = server_cpu.stop()
        rss = status_mb(server.pid, "VmRSS")
        flushes1 = (await asyncio.to_thread(flush_figures, server.url)) if flushes0 else {}
        log.info("burst over; waiting %.1fs for the last values", args.grace)
        await asyncio.sleep(args.grace)  # the newest values must arrive within this
        hist: Counter[int] = Counter()
        lasts: list[dict] = []
        messages = drops = closed = 0
        client_cpu = 0.0
        for pipe in pipes:
            pipe.send("report")
            _, h, last, m, d, c, ccpu = await asyncio.to_thread(pipe.recv)
            hist.update(h)
            lasts.extend(last)
            messages, drops, closed = messages + m, drops + d, closed + c
            client_cpu += ccpu
        hwm = status_mb(server.pid, "VmHWM")
        for pipe in pipes:
            pipe.send("close")
        for pipe in pipes:
            await asyncio.to_thread(pipe.recv)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        await asyncio.to_thread(server.stop)
        await fake.close()

    equal, ages = 0, []
    for mine in lasts:
        ok = True
        for symbol, (price, sent_at) in last_trades.items():
            got = mine.get(symbol)
            if got is None or got[0] != price:
                ok = False
            else:
                ages.append((got[1] - sent_at) * 1000.0)
        equal += ok
    ages.sort()
    trades = round(args.rate * args.duration)
    return {
        "clients": args.clients,
        "connected": connected,
        "connect_errors": errors,
        "procs": args.procs,
        "rate_per_s": args.rate,
        "max_rate": args.max_rate,
        "duration_s": args.duration,
        "trades": trades,
        "server": str(args.server_root or "this checkout"),
        "delivered": messages,
        "per_client_per_s": round(messages / max(1, connected) / window, 2),
        "every_trade_would_be": connected * trades,
        "latency_ms": {
            "p50": _pct(hist, 50),
            "p99": _pct(hist, 99),
            "max": float(max(hist)) if hist else None,
        },
        "last_value": {
            "equal_last": equal,
            "clients": len(lasts),
            "age_ms": {
                "p50": _sorted_pct(ages, 50),
                "p99": _sorted_pct(ages, 99),
                "max": _sorted_pct(ages, 100),
            },
        },
        "server_cpu_pct": round(cpu, 1),
        "server_runqueue_wait_pct": server_cpu.wait_pct,
        "client_cpu_pct": round(100.0 * client_cpu / window, 1),
        "server_rss_mb": round(rss, 1),
        "server_hwm_mb": round(hwm, 1),
        "idle_kb_per_client": round((rss_idle - rss_before) * 1024 / max(1, connected), 1),
        "drops": drops,
        "closed_during_window": closed,
        "connect_s": round(connect_s, 1),
        "server_flush_ms": _flush_ms(flushes0, flushes1),
    }


def flush_figures(url: str) -> dict[str, float]:
    """The conflation flush samples of the server's /metrics (none on the old design, or
    when a saturated server does not answer in time)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        if line.startswith("pricewatch_websocket_state_flush"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def _flush_ms(before: dict[str, float], after: dict[str, float]) -> dict | None:
    count = "pricewatch_websocket_state_flushes_total"
    seconds = "pricewatch_websocket_state_flush_seconds_total"
    if count not in after:
        return None
    flushes = after[count] - before.get(count, 0)
    return {
        "flushes": int(flushes),
        "mean": round(1000 * (after[seconds] - before.get(seconds, 0)) / max(1, flushes), 2),
        "max_since_start": round(1000 * after["pricewatch_websocket_state_flush_max_seconds"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=10.0, help="trades per second (total)")
    parser.add_argument(
        "--max-rate",
        type=int,
        default=None,
        help="max_rate in each client's subscribe message (default: none sent)",
    )
    parser.add_argument(
        "--procs", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="client processes"
    )
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of trades")
    parser.add_argument(
        "--grace",
        type=float,
        default=3.0,
        help="seconds after the burst before the last values are read",
    )
    parser.add_argument("--batch", type=int, default=100, help="clients connecting at once")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--server-root",
        type=Path,
        default=None,
        help="run the server from this checkout instead (old design)",
    )
    parser.add_argument(
        "--compare-root",
        type=Path,
        default=None,
        help="then run the same load against this checkout's server",
    )
    args = parser.parse_args(argv)
    setup_logging()
    nofile = raise_nofile()
    if nofile < args.clients + 100:
        parser.error(f"RLIMIT_NOFILE is {nofile}: too low for {args.clients} clients")
    load_before = loadavg()
    began = time.monotonic()
    out = asyncio.run(run(args))
    if args.compare_root is not None:
        other = argparse.Namespace(**{**vars(args), "server_root": args.compare_root})
        out = {"this": out, "compared": asyncio.run(run(other))}
    emit_run(out, load_before, began)
    return 0


if __name__ == "__main__":
    sys.exit(main())
