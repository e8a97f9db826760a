"""Gap-free market data: backfill throughput and startup time with stored candles.

* ``backfill``: a REST fake in its own process serves ``historicalTrades`` pages (pre-built,
  so it is never the bottleneck); a `Sequencer` in this process fills a gap of ``--trades``
  ids through the real tick pipeline (latest price, seven candle rings, alert engine with
  ``--alerts`` resting alerts, hub without clients). Figure: trades/s from the first REST
  call to the gap closed. The naive baseline in the same run: the same trades handed to the
  pipeline straight from memory (the ceiling).
* ``startup``: a database holding 1000 candles x 7 timeframes x ``--symbols`` symbols;
  ``python -m pricewatch`` (feed off) timed from spawn to its first healthy ``/healthz``, and
  the candle load itself from its log line; a baseline start on an empty database.

Prints one JSON line. Loopback only; bounded by --trades and --symbols.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/http.py would shadow the standard library's `http`: import from the checkout's root.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    ServerProcess,
    emit,
    free_port,
    loadavg,
    setup_logging,
)

T0 = 1704067200000


def trades(n: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    price, out = 60_000.0, []
    for i in range(n):
        price = round(max(1.0, price * (1 + rng.gauss(0, 0.0004))), 2)
        out.append(
            {
                "id": i + 2,
                "price": f"{price:.2f}",
                "qty": f"{rng.random():.5f}",
                "quoteQty": "0",
                "time": T0 + 1000 + i * 7,
                "isBuyerMaker": False,
                "isBestMatch": True,
            }
        )
    return out


def rest_fake(port: int, n: int, ready) -> None:
    """historicalTrades from pre-serialised pages of 1000 (fromId = 2, 1002, ...)."""
    import orjson
    from aiohttp import web

    rows = trades(n)
    pages = {rows[i]["id"]: orjson.dumps(rows[i : i + 1000]) for i in range(0, n, 1000)}

    async def historical(request: web.Request) -> web.Response:
        body = pages.get(int(request.query["fromId"]))
        if body is None:  # not page-aligned: slice
            start = int(request.query["fromId"]) - 2
            body = orjson.dumps(rows[start : start + int(request.query.get("limit", 500))])
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/api/v3/historicalTrades", historical)
    ready.set()
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def backfill(args) -> dict:
    import aiohttp

    from pricewatch.alerts import AlertEngine
    from pricewatch.feeds import FeedStats, Tick
    from pricewatch.hub import Hub
    from pricewatch.market import Market
    from pricewatch.upstream.backfill import Sequencer
    from pricewatch.upstream.binance_rest import BinanceRest

    def pipeline() -> Market:
        market = Market(("BTCUSDT",), Hub())
        engine = AlertEngine(None, market.hub)  # type: ignore[arg-type]
        rng = random.Random(3)
        engine.index.load(
            (i, "BTCUSDT", 60_000 * (1 + rng.uniform(0.2, 0.5)), "above")
            for i in range(args.alerts)
        )
        market.trade_hooks.append(engine.on_tick)
        return market

    port = free_port()
    ready = multiprocessing.Event()
    fake = multiprocessing.Process(target=rest_fake, args=(port, args.trades, ready), daemon=True)
    fake.start()
    ready.wait(10)
    try:
        market = pipeline()
        stats = FeedStats("binance", ("BTCUSDT",))
        rest = BinanceRest(f"http://127.0.0.1:{port}", timeout=10)
        seq = Sequencer(market.on_tick, stats, rest, max_trades=args.trades + 1, hold_limit=600)
        async with aiohttp.ClientSession() as session:
            rest.session = session
            for _ in range(50):  # the fake is up when it answers
                try:
                    await rest.trades("BTCUSDT", 2, 1)
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            seq.on_trade(Tick("BTCUSDT", 60_000.0, 1.0, T0, 1))
            began = time.perf_counter()
            seq.on_trade(Tick("BTCUSDT", 60_000.0, 1.0, T0 + 10**7, args.trades + 2))
            await asyncio.wait_for(seq.changed.wait(), 600)
            took = time.perf_counter() - began
        assert seq.backfilled["BTCUSDT"] == args.trades, seq.backfilled
        # Baseline: the same trades straight into a fresh pipeline (no REST, no parsing).
        market = pipeline()
        ticks = [
            Tick("BTCUSDT", float(r["price"]), float(r["qty"]), r["time"], r["id"])
            for r in trades(args.trades)
        ]
        began = time.perf_counter()
        for tick in ticks:
            market.on_tick(tick)
        base = time.perf_counter() - began
    finally:
        fake.terminate()
        fake.join(5)
    return {
        "backfill_trades": args.trades,
        "backfill_seconds": round(took, 3),
        "backfill_trades_per_s": round(args.trades / took),
        "rest_calls": rest.calls,
        "alerts_resting": args.alerts,
        "pipeline_only_trades_per_s": round(args.trades / base),
    }


def seed_db(path: str, symbols: list[str]) -> int:
    from pricewatch.ohlc import TIMEFRAMES
    from pricewatch.store import Store

    async def fill() -> int:
        store = await Store.open(path)
        rows = []
        for s in symbols:
            for tf, ms in TIMEFRAMES.items():
                rows += [
                    (
                        s,
                        tf,
                        T0 + i * ms,
                        100.0,
                        101.0,
                        99.0,
                        100.5,
                        1.0,
                        3,
                        T0 + i * ms,
                        T0 + i * ms,
                    )
                    for i in range(1000)
                ]
        await store.upsert_candles(rows)
        await store.close()
        return len(rows)

    return asyncio.run(fill())


def startup(args) -> dict:
    symbols = [f"SYM{i}USDT" for i in range(args.symbols)]
    env = {"PRICEWATCH_SYMBOLS": ",".join(symbols), "PRICEWATCH_LOG_LEVEL": "INFO"}
    out = {}
    for label, seeded in (("empty", False), ("seeded", True)):
        with tempfile.TemporaryDirectory(prefix="pricewatch-bench-") as tmp:
            rows = seed_db(str(Path(tmp) / "pricewatch.db"), symbols) if seeded else 0
            began = time.perf_counter()
            server = ServerProcess(env, tmpdir=tmp).start()
            ready = time.perf_counter() - began
            server.stop()
            match = re.search(
                r"loaded (\d+) stored candles in ([\d.]+)s", (Path(tmp) / "server.log").read_text()
            )
            out[label] = {
                "candles": rows,
                "ready_seconds": round(ready, 3),
                "candle_load_seconds": float(match.group(2)) if match else None,
            }
    return {
        "startup_empty_ready_s": out["empty"]["ready_seconds"],
        "startup_seeded_candles": out["seeded"]["candles"],
        "startup_seeded_ready_s": out["seeded"]["ready_seconds"],
        "startup_candle_load_s": out["seeded"]["candle_load_seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=100_000)
    parser.add_argument("--alerts", type=int, default=10_000)
    parser.add_argument("--symbols", type=int, default=10)
    args = parser.parse_args(argv)
    setup_logging()
    figures = {"bench": "backfill", "load_avg": loadavg()}
    figures.update(asyncio.run(backfill(args)))
    figures.update(startup(args))
    emit(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
